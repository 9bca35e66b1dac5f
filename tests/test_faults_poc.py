"""Faults in POC mode: real FLARE server and site processes on loopback, tiny model,
one POC shared by the tests of this module (it takes /tmp/fedmed_poc.lock).

Site dropout: site-2's machine goes down (SIGKILL of the site and its job process)
during round 1. The round completes with site-1 once the job's train timeout has
passed, the job finishes, and the server log names the missing site. Restarted from
its startup kit, site-2 registers again and, in the next job on the same absolute
output dir, gets the current global adapter (the run resumes at round 2) and
contributes again. FLARE does not redeploy a running job to a site that comes back,
so a returning site contributes from the next job.

Server restart: the server (parent and job process) is SIGKILLed during round 1;
started again from its kit, the sites reconnect by themselves, and the same job
submitted again resumes after the last persisted round and produces the final adapter."""

import json
import os
import re
import signal
from dataclasses import replace

import psutil
import pytest
from conftest import flare_processes_naming, hold_poc_lock

from fedmed_components.data.document import write_jsonl
from fedmed_components.flare import poc
from fedmed_components.flare.job import JobSpec
from fedmed_components.flare.recipe import export_job
from fedmed_components.model.modeling import load_adapter_folder

pytestmark = pytest.mark.slow

SITES = ["site-1", "site-2"]
TRAIN_TIMEOUT = 60  # seconds a round waits for a silent site (short for the test)
# Once a job's server side is done, FLARE waits for every site's own end-of-job report,
# up to client_outcome_wait_timeout (900 s by default) for a site that died.
OUTCOME_WAIT = "20"


@pytest.fixture(scope="module")
def fault_poc(tmp_path_factory, tiny_model_path):
    """A running POC (server + site-1, site-2) with per-site notes; stopped at the end,
    even on SIGTERM (a CI timeout), and nothing of it may be left."""
    from fedmed_components.data.synth import demo_corpus

    root = tmp_path_factory.mktemp("fault_poc")
    data = root / "data"
    for site, (_, docs) in zip(SITES, sorted(demo_corpus(n_sites=2, docs_per_site=5, seed=1).items())):
        write_jsonl(docs[:4], data / site / "train.jsonl")
        write_jsonl(docs[4:], data / site / "val.jsonl")
    ws = root / "poc"

    def _raise(signum, frame):
        raise KeyboardInterrupt(f"terminated by signal {signum}")

    previous_handler = signal.signal(signal.SIGTERM, _raise)
    previous_env = os.environ.get("NVFLARE_CLIENT_OUTCOME_WAIT_TIMEOUT")
    os.environ["NVFLARE_CLIENT_OUTCOME_WAIT_TIMEOUT"] = OUTCOME_WAIT  # the POC processes inherit it
    try:
        with hold_poc_lock():
            try:
                poc.prepare(ws, SITES, data=str(data))
                poc.start(ws, timeout=180)
                yield ws, data
            finally:
                poc.down(ws)
            assert flare_processes_naming(str(ws)) == []
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        if previous_env is None:
            os.environ.pop("NVFLARE_CLIENT_OUTCOME_WAIT_TIMEOUT", None)
        else:
            os.environ["NVFLARE_CLIENT_OUTCOME_WAIT_TIMEOUT"] = previous_env


def _spec(name, data, store, **kw) -> JobSpec:
    return JobSpec(
        **{
            "name": name,
            "model": "tiny",
            "sites": SITES,
            "num_rounds": 2,
            "min_clients": 1,
            "local_steps": 2,
            "batch_size": 4,
            "max_length": 128,
            "rank": 4,
            "alpha": 8,
            "quantize": "none",
            "data": str(data),
            "output_dir": str(store),
            "train_timeout": TRAIN_TIMEOUT,
            "extra_site_args": "--max-val-examples 4",
            **kw,
        }
    )


def _history(store):
    return json.loads((store / "state.json").read_text())["history"]


def _wait_for_round0(store, timeout=300):
    deadline = psutil.time.monotonic() + timeout
    while not ((store / "state.json").exists() and _history(store)):
        assert psutil.time.monotonic() < deadline, "round 0 never finished"
        psutil.time.sleep(0.2)


def _job_log(ws, job_id, name):
    """A job's log at a participant: the server's from the downloaded job, a site's from its kit."""
    if name == "server":
        return (poc.download(ws, job_id) / "workspace" / "log.txt").read_text(errors="replace")
    state = poc.PocWorkspace.at(ws).require()
    return (ws / "nvflare_poc" / state["project"] / "prod_00" / name / job_id / "log.txt").read_text(errors="replace")


def _all_gone(pids):
    return not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


def test_site_killed_mid_round_is_dropped_and_contributes_again_after_restart(fault_poc, tmp_path):
    ws, data = fault_poc
    poc.start(ws, timeout=180)  # both sites up (a no-op when they are)
    store = tmp_path / "store"
    spec = _spec("dropout", data, store)
    job_id = poc.submit(ws, export_job(spec, tmp_path / "jobs"))
    _wait_for_round0(store)
    killed = poc.stop_participant(ws, "site-2", kill=True)  # round 1 has just been sent out
    assert len(killed) >= 2 and _all_gone(killed), "the site's parent and its job process"

    assert poc.wait(ws, job_id, timeout=400)["status"] == poc.DONE_OK
    first = _history(store)
    assert [h["sites"] for h in first] == [SITES, ["site-1"]]
    assert first[1]["round_seconds"] >= TRAIN_TIMEOUT * 0.9, "round 1 must have waited out the train timeout"
    server_log = _job_log(ws, job_id, "server")
    assert "round 1: no update from ['site-2'] (timed out or failed); continuing without them" in server_log
    assert "finished 2 rounds" in server_log

    poc.start_participant(ws, "site-2", timeout=180)
    assert poc.running(poc.PocWorkspace.at(ws))["site-2"]
    again = poc.submit(ws, export_job(replace(spec, name="dropout_more", num_rounds=3), tmp_path / "jobs"))
    assert poc.wait(ws, again, timeout=400)["status"] == poc.DONE_OK
    history = _history(store)
    assert [h["current_round"] for h in history] == [0, 1, 2]
    assert history[2]["sites"] == SITES
    assert f"resuming from {store / 'round_001'}: next round 2" in _job_log(ws, again, "server")
    assert re.search(r"site-2 round 2: \d+ steps", _job_log(ws, again, "site-2"))


def test_server_killed_mid_round_resumes_after_restart(fault_poc, tmp_path):
    ws, data = fault_poc
    poc.start(ws, timeout=180)
    store = tmp_path / "store"
    spec = _spec("server_restart", data, store, num_rounds=3, min_clients=2, train_timeout=240)
    job = export_job(spec, tmp_path / "jobs")
    poc.submit(ws, job)
    _wait_for_round0(store)
    killed = poc.stop_participant(ws, "server", kill=True)
    assert len(killed) >= 2 and _all_gone(killed), "the server's parent and its job process"
    persisted = [h["current_round"] for h in _history(store)]
    assert persisted[-1] < spec.num_rounds - 1, "killed too late: the job was done"

    poc.start_participant(ws, "server", timeout=180)  # waits for both sites to reconnect
    again = poc.submit(ws, job)
    assert poc.wait(ws, again, timeout=400)["status"] == poc.DONE_OK
    log = _job_log(ws, again, "server")
    assert f"resuming at round {persisted[-1] + 1} of {spec.num_rounds}" in log
    assert "round 0 started" not in log
    assert [h["current_round"] for h in _history(store)] == list(range(spec.num_rounds))
    _, _, meta = load_adapter_folder(store / "global")
    assert meta["current_round"] == spec.num_rounds - 1 and meta["sites"] == SITES
