"""Simulator run of a fed_bert-like job (MiniLM, 2 sites, 2 rounds): a PEFT adapter for
the token classifier, and the sites' TensorBoard scalars on the server (~60 s)."""

import json

import pytest
import torch

from fedmed_components.data.document import write_jsonl
from fedmed_components.flare.job import JobSpec, run_simulator
from fedmed_components.flare.recipe import export_job
from fedmed_components.model.modeling import initial_adapter_from_config, load_adapter_folder, resolve_model

pytestmark = pytest.mark.slow

SITES = ["site-1", "site-2"]


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory):
    from fedmed_components.data.synth import demo_corpus

    root = tmp_path_factory.mktemp("fed_bert")
    for site, (_, docs) in zip(SITES, sorted(demo_corpus(n_sites=2, docs_per_site=5, seed=1).items())):
        write_jsonl(docs[:4], root / "data" / site / "train.jsonl")
        write_jsonl(docs[4:], root / "data" / site / "val.jsonl")
    spec = JobSpec(
        name="fed_bert",
        algorithm="fed_medlora",
        task_model="token-classification",
        model="minilm",
        sites=SITES,
        num_rounds=2,
        min_clients=2,
        local_steps=3,
        batch_size=8,
        max_length=64,
        learning_rate=3e-3,
        rank=4,
        alpha=8,
        data=str(root / "data"),
        output_dir=str(root / "store"),
        extra_site_args="--max-val-examples 8",
    )
    workspace = run_simulator(export_job(spec, root / "jobs"), root / "ws", SITES, timeout=420)
    return spec, workspace, root / "store"


def test_fed_bert_produces_a_peft_token_classifier_adapter(bert_run):
    from peft import PeftModel
    from transformers import AutoModelForTokenClassification

    from fedmed_components.model.modeling import LoraSettings
    from fedmed_components.model.token_classification import NUM_LABELS, encoder_lora

    spec, workspace, store = bert_run
    state, settings, meta = load_adapter_folder(store / "global")
    initial = initial_adapter_from_config(resolve_model("minilm"), encoder_lora(LoraSettings(r=4, alpha=8)))
    assert state.keys() == initial.keys() and settings.task_type == "TOKEN_CLS"
    assert any(not torch.equal(state[k], initial[k]) for k in state)
    assert not any(torch.equal(state[k], initial[k]) for k in state if "classifier" in k), "the head did not travel"
    assert meta["current_round"] == 1 and sorted(meta["sites"]) == SITES
    history = json.loads((store / "state.json").read_text())["history"]
    assert all(entry["rejected"] == [] for entry in history)
    base = AutoModelForTokenClassification.from_pretrained(resolve_model("minilm"), num_labels=NUM_LABELS)
    model = PeftModel.from_pretrained(base, str(store / "global"))
    assert torch.equal(model.base_model.model.classifier.modules_to_save["default"].weight, state["base_model.model.classifier.weight"])


def test_server_tensorboard_holds_every_sites_scalars(bert_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    spec, workspace, store = bert_run
    runs = {p.name: p for p in workspace.glob("server/*/tb_events/*") if p.is_dir()}
    assert sorted(runs) == SITES
    for site, folder in runs.items():
        events = EventAccumulator(str(folder))
        events.Reload()
        tags = set(events.Tags()["scalars"])
        assert {"train/loss", "train/lr", "round/val_loss", "round/tokens_per_s", "round/val_f1"} <= tags, site
        assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 7))  # 2 rounds x 3 steps
        assert [e.step for e in events.Scalars("round/val_loss")] == [0, 1]
