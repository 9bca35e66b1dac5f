"""Poisoned or broken updates from one site in a live FLARE job (simulator, tiny model):
site-2 sends NaN, a base-model weight, a wrong shape, a 100x norm outlier and an empty
payload, one per round. Each is rejected with site and reason in the server log, site-1's
update alone is aggregated, and the global adapter stays finite, its change each round
exactly site-1's."""

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from fedmed_components.data.document import write_jsonl
from fedmed_components.federation.update_validation import update_norm
from fedmed_components.flare.job import JobSpec, run_simulator
from fedmed_components.flare.recipe import export_job
from fedmed_components.model.modeling import LoraSettings, initial_adapter_from_config, load_adapter_folder

pytestmark = pytest.mark.slow

SITES = ["site-1", "site-2"]
FAULTS = {  # fault -> what the server's reason says
    "nan": "non-finite values",
    "base_weight": "non-LoRA tensor(s) in the update",
    "shape": "has shape",
    "norm": "x the median",
    "empty": "empty payload",
}
HERE = Path(__file__).resolve().parent


def fault_job(tmp_path, site_data, faults: str, **spec):
    """An exported job whose site script is tests/fault_site.py around the real one."""
    spec = JobSpec(
        **{
            "name": "faults",
            "model": "tiny",
            "sites": SITES,
            "num_rounds": 1,
            "min_clients": 1,
            "local_steps": 2,
            "batch_size": 4,
            "max_length": 128,
            "learning_rate": 5e-3,
            "rank": 4,
            "alpha": 8,
            "quantize": "none",
            "data": str(site_data),
            "output_dir": str(tmp_path / "store"),
            "train_timeout": 240,
            "extra_site_args": f"--max-val-examples 4 --fault-site site-2 --faults {faults}",
            **spec,
        }
    )
    job = export_job(spec, tmp_path / "jobs")
    custom = job / "app" / "custom"
    shutil.copyfile(custom / "fedmed_site.py", custom / "fedmed_site_real.py")
    shutil.copyfile(HERE / "fault_site.py", custom / "fedmed_site.py")
    return job


def server_log(workspace: Path) -> str:
    return next(workspace.rglob("server/**/log.txt")).read_text(errors="replace")


def write_site_data(root):
    from fedmed_components.data.synth import demo_corpus

    for site, (_, docs) in zip(SITES, sorted(demo_corpus(n_sites=2, docs_per_site=5, seed=1).items())):
        write_jsonl(docs[:4], root / site / "train.jsonl")
        write_jsonl(docs[4:], root / site / "val.jsonl")
    return root


def test_each_poisoned_update_is_rejected_and_the_global_stays_sound(tmp_path, tiny_model_path, no_leftovers):
    faults = list(FAULTS)
    job = fault_job(tmp_path, write_site_data(tmp_path / "data"), ",".join(faults), num_rounds=len(faults))
    workspace = run_simulator(job, tmp_path / "ws", SITES, timeout=420)
    log = "\n".join(p.read_text(errors="replace") for p in workspace.rglob("log.txt"))
    store = tmp_path / "store"
    history = json.loads((store / "state.json").read_text())["history"]
    assert [h["current_round"] for h in history] == list(range(len(faults)))
    rounds = re.split(r"round \d+ started", server_log(workspace))[1:]  # the server's log, round by round
    previous = initial_adapter_from_config(tiny_model_path, LoraSettings(r=4, alpha=8))
    for rnd, fault in enumerate(faults):
        rejected = re.findall(rf"rejected update from site-2 in round {rnd}: (.*)", log)
        assert len(rejected) == 1 and FAULTS[fault] in rejected[0], (fault, rejected)
        assert history[rnd]["sites"] == ["site-1"]
        assert [r["site"] for r in history[rnd]["rejected"]] == ["site-2"]
        # the global moved by exactly site-1's update: nothing of site-2 got in
        (site1_norm,) = [float(x) for x in re.findall(r"accepted update from site-1: .* update norm ([0-9.e+-]+)", rounds[rnd])]
        state, _, _ = load_adapter_folder(store / f"round_{rnd:03d}")
        assert all(torch.isfinite(v).all() for v in state.values())
        moved = update_norm(state, previous)
        assert 0 < moved and math.isclose(moved, site1_norm, rel_tol=1e-3), (fault, moved, site1_norm)
        previous = state
    assert f"finished {len(faults)} rounds" in log
