"""FLARE simulator runs of the real job folders (tiny model, CPU, bounded, no leftovers)."""

import dataclasses
import json
import subprocess
from pathlib import Path

import pytest
import torch

from fedmed_components.data.document import write_jsonl
from fedmed_components.federation.lora_keys import is_lora_key
from fedmed_components.flare.job import JobSpec, run_simulator
from fedmed_components.flare.recipe import export_job
from fedmed_components.model.modeling import LoraSettings, initial_adapter_from_config, load_adapter_folder

pytestmark = pytest.mark.slow

SITES = ["site-1", "site-2"]


@pytest.fixture(scope="module")
def site_data(tmp_path_factory):
    from fedmed_components.data.synth import demo_corpus

    root = tmp_path_factory.mktemp("sites")
    corpus = demo_corpus(n_sites=2, docs_per_site=5, seed=1)
    for site, (_, docs) in zip(SITES, sorted(corpus.items())):
        write_jsonl(docs[:4], root / site / "train.jsonl")
        write_jsonl(docs[4:], root / site / "val.jsonl")
    return root


def _run(tmp_path, site_data, tiny_model_path, sites=SITES, **spec_overrides):
    spec = JobSpec(
        name=spec_overrides.pop("name", "job"),
        model="tiny",
        sites=sites,
        num_rounds=2,
        min_clients=2,
        local_steps=3,
        batch_size=4,
        max_length=192,
        learning_rate=5e-3,
        rank=4,
        alpha=8,
        data=str(site_data),
        quantize="none",
        output_dir=str(tmp_path / "store"),
        extra_site_args=spec_overrides.pop("extra_site_args", "--max-val-examples 8"),
        **spec_overrides,
    )
    job = export_job(spec, tmp_path / "jobs")
    workspace = run_simulator(job, tmp_path / "ws", sites, timeout=420)
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
    spec, workspace, store = _run(
        tmp_path,
        site_data,
        tiny_model_path,
        algorithm="fed_medlora_plus",
        loss_source="sites",
        name="plus",
        prompt_style="paper",
        ner_sentences=2,
    )
    log = _server_log(workspace)
    assert "candidate losses from 2 sites" in log
    assert "Fed-MedLoRA+ from validation losses" in log
    _, _, meta = load_adapter_folder(store / "global")
    weights = meta["weights"]
    assert sorted(weights) == SITES and abs(sum(weights.values()) - 1) < 1e-6
    # how the sites prompted travels with the adapter: `fedmed predict` reads it from there
    assert (meta["prompt_style"], meta["ner_sentences"]) == ("paper", 2)
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


@pytest.mark.parametrize(
    "algorithm, extra",
    [
        ("fedsa_lora", {}),
        ("fed_exact_lora", {}),
        ("fed_medlora_plus", {"loss_source": "server"}),
        ("fed_prox", {"prox_mu": 0.5}),
        ("fed_medlora", {"robust_rule": "median"}),
        ("fed_medlora", {"extra_site_args": "--max-val-examples 8 --dp-sgd noise=1.0,clip=1.0,record=note"}),
        ("fed_medlora", {"extra_site_args": "--max-val-examples 8 --dp-sgd epsilon=4,clip=1.0"}),
    ],
)
def test_every_algorithm_runs_and_produces_an_adapter(tmp_path, site_data, tiny_model_path, algorithm, extra):
    if extra.get("loss_source") == "server":
        extra = {**extra, "server_val_data": str(site_data / "site-1" / "val.jsonl")}
    spec, workspace, store = _run(tmp_path, site_data, tiny_model_path, algorithm=algorithm, name=algorithm, **extra)
    state, _, meta = load_adapter_folder(store / "global")
    client_config = (tmp_path / "jobs" / algorithm / "app" / "config" / "config_fed_client.json").read_text()
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
    if algorithm == "fed_prox":
        assert "--prox-mu 0.5" in client_config
    if extra.get("robust_rule"):
        assert "robust aggregation median" in log
    if "--dp-sgd" in extra.get("extra_site_args", ""):
        history = json.loads((store / "state.json").read_text())["history"]
        spent = [h["dp_sgd"] for h in history]  # every round, every site: epsilon so far
        assert all(set(s) == set(SITES) for s in spent)
        assert all(spent[1][site]["epsilon"] > spent[0][site]["epsilon"] > 0 for site in SITES)
        assert all(spent[1][site]["steps"] == 6 for site in SITES)
        assert all(f"{site} DP-SGD: epsilon" in log for site in SITES)
        if "epsilon=4" in extra["extra_site_args"]:  # the budget, spread over the server's 2 rounds, is spent
            assert all(3.98 <= spent[-1][site]["epsilon"] <= 4.0 and spent[0][site]["epsilon"] < 3.9 for site in SITES), spent
    assert _no_processes_left(str(tmp_path / "ws"))


def test_server_optimizer_job_persists_its_moments_every_round(tmp_path, site_data, tiny_model_path, no_leftovers):
    from safetensors.torch import load_file

    from fedmed_components.flare.persistor import SERVER_OPTIMIZER_FILE

    spec, workspace, store = _run(tmp_path, site_data, tiny_model_path, algorithm="fed_adam", name="fed_adam")
    adapter_keys = load_adapter_folder(store / "global")[0].keys()
    moments = [load_file(str(store / f"round_{rnd:03d}" / SERVER_OPTIMIZER_FILE)) for rnd in range(2)]
    for saved in moments:
        assert saved.keys() == {f"{m}/{k}" for k in adapter_keys for m in ("m", "v")}
        assert all(torch.isfinite(v).all() for v in saved.values())
    assert any(not torch.equal(moments[0][k], moments[1][k]) for k in moments[0]), "the moments did not move in round 1"
    global_moments = load_file(str(store / "global" / SERVER_OPTIMIZER_FILE))
    assert all(torch.equal(global_moments[k], moments[1][k]) for k in moments[1])
    history = json.loads((store / "state.json").read_text())["history"]
    assert [h["server_optimizer"]["rule"] for h in history] == ["fedadam", "fedadam"]
    assert all(h["server_optimizer"]["step_norm"] > 0 for h in history)
    assert "round 1 fedadam (lr 0.01)" in _server_log(workspace)

    # a restarted server (the same store, one more round) takes the moments back
    more = export_job(dataclasses.replace(spec, num_rounds=3, name="fed_adam_more"), tmp_path / "jobs_more")
    resumed_log = _server_log(run_simulator(more, tmp_path / "ws_resumed", SITES, timeout=420))
    assert "resuming at round 2 of 3" in resumed_log
    assert f"fedadam state resumed: {len(moments[1])} moment tensors from round 1" in resumed_log
    assert load_file(str(store / "round_002" / SERVER_OPTIMIZER_FILE)).keys() == moments[1].keys()
    assert json.loads((store / "state.json").read_text())["last_round"] == 2


THREE_SITES = ["site-1", "site-2", "site-3"]


@pytest.fixture(scope="module")
def three_site_data(tmp_path_factory):
    from fedmed_components.data.synth import demo_corpus

    root = tmp_path_factory.mktemp("three_sites")
    for site, (_, docs) in zip(THREE_SITES, sorted(demo_corpus(n_sites=3, docs_per_site=3, seed=2).items())):
        write_jsonl(docs[:2], root / site / "train.jsonl")
        write_jsonl(docs[2:], root / site / "val.jsonl")
    return root


def test_sampled_sites_alone_train_each_round(tmp_path, three_site_data, tiny_model_path, no_leftovers):
    from fedmed_components.federation.sampling import sample_sites

    # seed 0 leaves out site-2 in round 0 and site-1 in round 1
    expected = [sample_sites(THREE_SITES, rnd, count=2, seed=0) for rnd in range(2)]
    assert expected == [["site-1", "site-3"], ["site-2", "site-3"]]
    spec, workspace, store = _run(
        tmp_path,
        three_site_data,
        tiny_model_path,
        sites=THREE_SITES,
        algorithm="fed_medlora",
        name="sampled",
        sample_clients=2,
        sample_seed=0,
    )
    history = json.loads((store / "state.json").read_text())["history"]
    assert [h["sampled"] for h in history] == expected
    assert [h["sites"] for h in history] == expected  # the updates aggregated: exactly the sampled sites
    assert all(h["available"] == THREE_SITES for h in history)
    log = _server_log(workspace)
    for rnd, chosen in enumerate(expected):
        assert f"round {rnd}: sampled {chosen} of {THREE_SITES}" in log
        this_round = log.split(f"round {rnd} started", 1)[1].split(f"round {rnd} done", 1)[0]
        trained = {site for site in THREE_SITES if f"accepted update from {site}" in this_round}
        assert trained == set(chosen)
        assert f"Sending task train to {chosen}" in this_round
        assert "no update from" not in this_round  # nobody sampled stayed silent
    # each site's own log: a train task only in the rounds that sampled it
    for site in THREE_SITES:
        site_log = (workspace / site / "log.txt").read_text(errors="replace")
        assert site_log.count("execute for task (train)") == sum(site in chosen for chosen in expected), site
