import contextlib
import os
import signal
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def fedmed_cache(tmp_path_factory):
    """Built models go to FEDMED_CACHE (CI sets it; else one temp dir per session)."""
    if not os.environ.get("FEDMED_CACHE"):
        os.environ["FEDMED_CACHE"] = str(tmp_path_factory.mktemp("fedmed_cache"))
    return Path(os.environ["FEDMED_CACHE"])


@pytest.fixture(scope="session")
def tiny_model_path(fedmed_cache):
    from fedmed_components.model.modeling import resolve_model

    return resolve_model("tiny")


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not beside the project")
    return SHARED_DATA


@contextlib.contextmanager
def hold_poc_lock():
    """Exclusive use of the POC ports (8002/8003) on this machine, shared with anyone
    running `flock /tmp/fedmed_poc.lock ...`; on release the ports must be free again."""
    from fedmed_components.flare.poc import DEFAULT_PORTS as POC_PORTS
    from fedmed_components.flare.poc import POC_LOCK, busy_ports, exclusive_poc_lock

    wait = float(os.environ.get("FEDMED_POC_LOCK_WAIT", "900"))
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(exclusive_poc_lock(wait))
        except TimeoutError as exc:
            pytest.skip(str(exc))
        if busy_ports(POC_PORTS):
            pytest.skip(f"ports {list(POC_PORTS)} are taken by a FLARE system that does not take {POC_LOCK}")
        yield
        assert busy_ports(POC_PORTS) == [], "a POC port is still in use after the test"


@pytest.fixture
def poc_lock():
    """See `hold_poc_lock`: for every test that starts a POC or a provisioned server."""
    with hold_poc_lock():
        yield


def flare_processes_naming(marker: str) -> list[str]:
    """Live processes (not this one or its ancestors) whose command line holds marker."""
    import psutil

    me = psutil.Process()
    spared = {me.pid} | {p.pid for p in me.parents()}
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
            if proc.pid not in spared and marker in cmdline and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(f"{proc.pid} {cmdline[:200]}")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


@pytest.fixture
def no_leftovers(tmp_path):
    """After the test, no process naming its tmp_path (workspaces, kits) is alive."""
    yield tmp_path
    import time

    deadline = time.monotonic() + 10  # processes being stopped get a moment to exit
    while flare_processes_naming(str(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert flare_processes_naming(str(tmp_path)) == []


@pytest.fixture
def sigterm_raises():
    """A SIGTERM to pytest (a CI timeout) still runs the tests' finally blocks."""

    def _raise(signum, frame):
        raise KeyboardInterrupt(f"terminated by signal {signum}")

    previous = signal.signal(signal.SIGTERM, _raise)
    yield
    signal.signal(signal.SIGTERM, previous)


@pytest.fixture
def write_site_data(tmp_path):
    """Synthetic train/val JSONL for the named sites under tmp_path/data (4 + 1 notes each)."""

    def write(sites: list[str]) -> Path:
        from fedmed_components.data.document import write_jsonl
        from fedmed_components.data.synth import demo_corpus

        root = tmp_path / "data"
        corpus = demo_corpus(n_sites=len(sites), docs_per_site=5, seed=1)
        for site, (_, docs) in zip(sites, sorted(corpus.items())):
            write_jsonl(docs[:4], root / site / "train.jsonl")
            write_jsonl(docs[4:], root / site / "val.jsonl")
        return root

    return write
