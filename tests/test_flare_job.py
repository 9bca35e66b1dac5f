"""FLARE simulator runs of the real job folders (tiny model, CPU, bounded, no leftovers)."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from fedmed_components.document import write_jsonl
from fedmed_components.flare.job import JobSpec, export_job, run_simulator
from fedmed_components.aggregation import is_lora_key
from fedmed_components.modeling import LoraSettings, initial_adapter_from_config, load_adapter_folder

pytestmark = pytest.mark.slow

SITES = ["site-1", "site-2"]


@pytest.fixture(scope="module")
def site_data(tmp_path_factory):
    from fedmed_components.synth import demo_corpus

    root = tmp_path_factory.mktemp("sites")
    corpus = demo_corpus(n_sites=2, docs_per_site=5, seed=1)
    for site, (_, docs) in zip(SITES, sorted(corpus.items())):
        write_jsonl(docs[:4], root / site / "train.jsonl")
        write_jsonl(docs[4:], root / site / "val.jsonl")
    return root


def _run(tmp_path, site_data, tiny_model_path, **spec_overrides):
    spec = JobSpec(
        name=spec_overrides.pop("name", "job"), model="tiny", sites=SITES, num_rounds=2, min_clients=2,
        local_steps=3, batch_size=4, max_length=192, learning_rate=5e-3, rank=4, alpha=8,
        data=str(site_data), quantize="none", output_dir=str(tmp_path / "store"),
        extra_site_args="--max-val-examples 8", **spec_overrides,
    )
    job = export_job(spec, tmp_path / "jobs")
    workspace = run_simulator(job, tmp_path / "ws", SITES, timeout=420)
    return spec, workspace, tmp_path / "store"


def _no_processes_left(marker: str) -> bool:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return marker not in out


def _server_log(workspace: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in workspace.rglob("log.txt"))


def test_fed_medlora_two_rounds_produces_loadable_adapter(tmp_path, site_data, tiny_model_path):
    spec, workspace, store = _run(tmp_path, site_data, tiny_model_path, algorithm="fed_medlora")
    state, settings, meta = load_adapter_folder(store / "global")
    initial = initial_adapter_from_config(tiny_model_path, LoraSettings(r=4, alpha=8))
    assert state.keys() == initial.keys() and all(is_lora_key(k) for k in state)
    assert any(not torch.equal(state[k], initial[k]) for k in state), "global adapter never changed"
    assert all(torch.isfinite(v).all() for v in state.values())
    assert meta["current_round"] == 1 and sorted(meta["sites"]) == SITES
    assert (store / "round_000").is_dir() and (store / "round_001").is_dir()
    history = json.loads((store / "state.json").read_text())
    assert history["last_round"] == 1
    # Loadable by PEFT on the base model.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_path), str(store / "global"))
    assert _no_processes_left(str(tmp_path / "ws"))


def test_fed_medlora_plus_with_site_losses_logs_weights(tmp_path, site_data, tiny_model_path):
    spec, workspace, store = _run(tmp_path, site_data, tiny_model_path, algorithm="fed_medlora_plus", loss_source="sites", name="plus")
    log = _server_log(workspace)
    assert "candidate losses from 2 sites" in log
    assert "Fed-MedLoRA+ from validation losses" in log
    _, _, meta = load_adapter_folder(store / "global")
    weights = meta["weights"]
    assert sorted(weights) == SITES and abs(sum(weights.values()) - 1) < 1e-6
    assert _no_processes_left(str(tmp_path / "ws"))


def test_sites_send_only_lora_tensors(tmp_path, site_data, tiny_model_path):
    """What the aggregator received: every update accepted, each exactly the LoRA keys."""
    spec, workspace, store = _run(tmp_path, site_data, tiny_model_path, algorithm="fed_medlora", name="payload")
    n_keys = len(initial_adapter_from_config(tiny_model_path, LoraSettings(r=4, alpha=8)))
    log = _server_log(workspace)
    for site in SITES:
        assert f"accepted update from {site}: {n_keys} LoRA tensors" in log
    history = json.loads((store / "state.json").read_text())["history"]
    assert all(entry["rejected"] == [] for entry in history)


@pytest.mark.parametrize("algorithm, extra", [
    ("fedsa_lora", {}),
    ("fed_exact_lora", {}),
    ("fed_medlora_plus", {"loss_source": "server"}),
])
def test_every_algorithm_runs_and_produces_an_adapter(tmp_path, site_data, tiny_model_path, algorithm, extra):
    if extra.get("loss_source") == "server":
        extra = {**extra, "server_val_data": str(site_data / "site-1" / "val.jsonl")}
    spec, workspace, store = _run(tmp_path, site_data, tiny_model_path, algorithm=algorithm, name=algorithm, **extra)
    state, _, meta = load_adapter_folder(store / "global")
    initial = initial_adapter_from_config(tiny_model_path, LoraSettings(r=4, alpha=8))
    assert state.keys() == initial.keys()
    assert all(torch.isfinite(v).all() for v in state.values())
    assert any(not torch.equal(state[k], initial[k]) for k in state)
    assert meta["current_round"] == 1
    log = _server_log(workspace)
    if algorithm == "fed_medlora_plus":
        assert "Fed-MedLoRA+ from validation losses" in log
    if algorithm == "fed_exact_lora":
        assert "exact aggregation: residual" in log
    assert _no_processes_left(str(tmp_path / "ws"))
