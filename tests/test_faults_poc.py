"""Site dropout in POC mode (real FLARE server and site processes on loopback, tiny
model): site-2's machine goes down (SIGKILL of the site and its job process) during
round 1. The round completes with site-1 once the job's train timeout has passed, the
job finishes, and the server log names the missing site. Restarted from its startup
kit, site-2 registers again and, in the next job on the same absolute output dir, gets
the current global adapter (the run resumes at round 2) and contributes again.

FLARE does not redeploy a running job to a site that comes back, so a returning site
contributes from the next job (a resubmission resumes from the persisted rounds)."""

import json
import re
import signal
from dataclasses import replace

import psutil
import pytest

from fedmed_components import poc
from fedmed_components.document import write_jsonl
from fedmed_components.flare.job import JobSpec, export_job

pytestmark = pytest.mark.slow

SITES = ["site-1", "site-2"]
TRAIN_TIMEOUT = 60  # seconds a round waits for a silent site (short for the test)
OUTCOME_WAIT = 20


@pytest.fixture
def sigterm_raises():
    """A SIGTERM to pytest (a CI timeout) still runs the finally blocks that stop the POC."""

    def _raise(signum, frame):
        raise KeyboardInterrupt(f"terminated by signal {signum}")

    previous = signal.signal(signal.SIGTERM, _raise)
    yield
    signal.signal(signal.SIGTERM, previous)


def _history(store):
    return json.loads((store / "state.json").read_text())["history"]


def _job_log(ws, job_id, name):
    """A job's log at a participant: the server's from the downloaded job, a site's from its kit."""
    if name == "server":
        return (poc.download(ws, job_id) / "workspace" / "log.txt").read_text(errors="replace")
    state = poc.PocWorkspace.at(ws).require()
    return (ws / "nvflare_poc" / state["project"] / "prod_00" / name / job_id / "log.txt").read_text(errors="replace")


def test_site_killed_mid_round_is_dropped_and_contributes_again_after_restart(tmp_path, tiny_model_path, sigterm_raises, poc_lock, no_leftovers, monkeypatch):
    from fedmed_components.synth import demo_corpus

    # Once a job's server side is done, FLARE waits for every site's own end-of-job
    # report, up to client_outcome_wait_timeout (900 s by default) for a dead site.
    monkeypatch.setenv("NVFLARE_CLIENT_OUTCOME_WAIT_TIMEOUT", str(OUTCOME_WAIT))

    data = tmp_path / "data"
    for site, (_, docs) in zip(SITES, sorted(demo_corpus(n_sites=2, docs_per_site=5, seed=1).items())):
        write_jsonl(docs[:4], data / site / "train.jsonl")
        write_jsonl(docs[4:], data / site / "val.jsonl")
    store = tmp_path / "store"
    spec = JobSpec(
        name="dropout", model="tiny", sites=SITES, num_rounds=2, min_clients=1, local_steps=2, batch_size=4,
        max_length=128, rank=4, alpha=8, quantize="none", data=str(data), output_dir=str(store),
        train_timeout=TRAIN_TIMEOUT, extra_site_args="--max-val-examples 4",
    )
    job = export_job(spec, tmp_path / "jobs")
    ws = tmp_path / "poc"
    try:
        poc.prepare(ws, SITES, data=str(data))
        poc.start(ws, timeout=120)
        job_id = poc.submit(ws, job)
        deadline = psutil.time.monotonic() + 300
        while not ((store / "state.json").exists() and _history(store)):
            assert psutil.time.monotonic() < deadline, "round 0 never finished"
            psutil.time.sleep(0.2)
        killed = poc.stop_participant(ws, "site-2", kill=True)  # round 1 has just been sent out
        assert len(killed) >= 2, "the site's parent and its job process"
        assert not [p for p in killed if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]

        assert poc.wait(ws, job_id, timeout=400)["status"] == poc.DONE_OK
        first = _history(store)
        assert [h["sites"] for h in first] == [SITES, ["site-1"]]
        assert first[1]["round_seconds"] >= TRAIN_TIMEOUT * 0.9, "round 1 must have waited out the train timeout"
        server_log = _job_log(ws, job_id, "server")
        assert "round 1: no update from ['site-2'] (timed out or failed); continuing without them" in server_log
        assert "finished 2 rounds" in server_log

        poc.start_participant(ws, "site-2", timeout=120)
        assert poc.running(poc.PocWorkspace.at(ws))["site-2"]
        more = export_job(replace(spec, name="dropout_more", num_rounds=3), tmp_path / "jobs")
        again = poc.submit(ws, more)
        poc.wait(ws, again, timeout=400)
        history = _history(store)
        assert [h["current_round"] for h in history] == [0, 1, 2]
        assert history[2]["sites"] == SITES
        assert f"resuming from {store / 'round_001'}: next round 2" in _job_log(ws, again, "server")
        assert re.search(r"site-2 round 2: \d+ steps", _job_log(ws, again, "site-2"))
    finally:
        poc.down(ws)
