"""Server restart (FLARE simulator, tiny model): the federation is killed (SIGKILL, server
and sites at once) during a round; the same job run again with the same absolute
--output-dir resumes after the last persisted round, not at round 0, and produces the
final adapter. POC: see tests/test_faults_poc.py."""

import json
import signal
import threading
import time

import psutil
import pytest

from fedmed_components.document import write_jsonl
from fedmed_components.flare.job import JobSpec, export_job, run_simulator
from fedmed_components.modeling import load_adapter_folder

pytestmark = pytest.mark.slow

SITES = ["site-1", "site-2"]
ROUNDS = 4


def _kill_everything_naming(marker: str) -> int:
    me = psutil.Process()
    spared = {me.pid} | {p.pid for p in me.parents()}
    victims = [p for p in psutil.process_iter(["cmdline"]) if p.pid not in spared and marker in " ".join(p.info["cmdline"] or [])]
    for p in victims:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(victims, timeout=10)
    return len(victims)


def test_killed_server_resumes_after_the_last_persisted_round(tmp_path, tiny_model_path, no_leftovers):
    from fedmed_components.synth import demo_corpus

    data = tmp_path / "data"
    for site, (_, docs) in zip(SITES, sorted(demo_corpus(n_sites=2, docs_per_site=5, seed=1).items())):
        write_jsonl(docs[:4], data / site / "train.jsonl")
        write_jsonl(docs[4:], data / site / "val.jsonl")
    store = tmp_path / "store"  # absolute: survives the job's run folder
    spec = JobSpec(
        name="restart", model="tiny", sites=SITES, num_rounds=ROUNDS, min_clients=2, local_steps=6, batch_size=4,
        max_length=128, rank=4, alpha=8, quantize="none", data=str(data), output_dir=str(store), train_timeout=240,
        extra_site_args="--max-val-examples 4",
    )
    job = export_job(spec, tmp_path / "jobs")
    first_ws = tmp_path / "ws1"
    outcome = {}

    def first_run():
        try:
            run_simulator(job, first_ws, SITES, timeout=400)
            outcome["finished"] = True
        except Exception as exc:  # killed: the simulator exits with -9
            outcome["error"] = exc

    runner = threading.Thread(target=first_run)
    runner.start()
    state_file = store / "state.json"
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and runner.is_alive():
        if state_file.exists() and json.loads(state_file.read_text()).get("last_round", -1) >= 1:
            break
        time.sleep(0.1)
    assert _kill_everything_naming(str(first_ws)) > 0, "the first run was not running any more"
    runner.join(60)
    assert not runner.is_alive() and "finished" not in outcome, "the run was not killed mid-job"
    killed_after = json.loads(state_file.read_text())["last_round"]
    assert 1 <= killed_after < ROUNDS - 1

    second_ws = run_simulator(job, tmp_path / "ws2", SITES, timeout=400)
    log = next(second_ws.rglob("server/**/log.txt")).read_text(errors="replace")
    assert f"resuming at round {killed_after + 1} of {ROUNDS}" in log
    assert "round 0 started" not in log
    state = json.loads(state_file.read_text())
    assert state["last_round"] == ROUNDS - 1
    assert [h["current_round"] for h in state["history"]] == list(range(ROUNDS)), "a round was redone or lost"
    for rnd in range(ROUNDS):
        load_adapter_folder(store / f"round_{rnd:03d}")  # each one whole
    _, _, meta = load_adapter_folder(store / "global")
    assert meta["current_round"] == ROUNDS - 1 and sorted(meta["sites"]) == SITES
    assert not [p for p in store.iterdir() if p.name.startswith(".")]
