"""Stopping what a run started, and nothing else."""

import subprocess
import sys
import time

import psutil
import pytest

from fedmed_components.flare.processes import stop_process_trees


def test_tree_and_marked_stragglers_are_stopped_but_never_our_ancestors(tmp_path):
    marker = f"{tmp_path}/nvflare-ws"
    straggler = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", marker], start_new_session=True)
    unrelated = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "nvflare-elsewhere"])
    tree = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)",
        ]
    )
    time.sleep(1.0)
    children = psutil.Process(tree.pid).children(recursive=True)
    # The stopper runs under a shell whose own command line carries the marker.
    script = f"from fedmed_components.flare.processes import stop_process_trees as s; s([{tree.pid}], marker={marker!r}, grace=3)"
    shell = subprocess.run(
        ["bash", "-c", f"{sys.executable} -c {script!r} && echo survived # {marker}"], capture_output=True, text=True, timeout=60
    )
    try:
        assert shell.stdout.strip() == "survived", shell.stderr
        assert straggler.wait(timeout=10) is not None
        assert tree.wait(timeout=10) is not None
        assert all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE for p in children)
        assert unrelated.poll() is None
    finally:
        for proc in (straggler, unrelated, tree):
            proc.kill()
        stop_process_trees([], marker=marker)


def test_blas_thread_caps_share_the_cores_and_an_explicit_setting_wins(monkeypatch):
    from fedmed_components.flare.processes import blas_thread_caps

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert blas_thread_caps(2) == {"OMP_NUM_THREADS": "4", "MKL_NUM_THREADS": "4"}
    assert blas_thread_caps(10) == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert blas_thread_caps(2) == {}


# A stand-in for `nvflare simulator`: its first start logs a site's fatal stop and then
# hangs, as the real server does while it waits for that site; later starts finish.
_FAKE_SIMULATOR = """
import pathlib, sys, time
starts = pathlib.Path(sys.argv[1])
starts.write_text(starts.read_text() + "x" if starts.exists() else "x")
if len(starts.read_text()) <= int(sys.argv[2]):
    print("2026-12-07 15:09:56,191 - ERROR - Stopped ClientRunner due to FATAL_SYSTEM_ERROR: "
          "ClientAPIExecutor cannot start: ValueError: Can not find fedmed_site.py", flush=True)
    time.sleep(600)
print("INFO - round 0 done in 0.1 s", flush=True)
"""


def _fake_simulator(monkeypatch, tmp_path, failing_starts):
    from fedmed_components.flare import job

    script = tmp_path / "fake_simulator.py"
    script.write_text(_FAKE_SIMULATOR)
    starts = tmp_path / "starts"
    monkeypatch.setattr(
        job, "simulator_command", lambda *a: [sys.executable, str(script), str(starts), str(failing_starts), str(tmp_path / "ws")]
    )
    return starts


def test_a_sites_fatal_stop_ends_the_run_at_once_and_is_retried_in_a_fresh_start(monkeypatch, tmp_path, no_leftovers):
    from fedmed_components.flare.job import run_simulator

    starts = _fake_simulator(monkeypatch, tmp_path, failing_starts=1)
    lines = []
    workspace = run_simulator(tmp_path / "job", tmp_path / "ws", ["site-1"], timeout=120, progress=lines.append)
    assert workspace == (tmp_path / "ws").resolve()
    assert starts.read_text() == "xx"  # failed once, started again
    assert "round 0 done" in (tmp_path / "ws.log").read_text()
    assert "Can not find fedmed_site.py" in (tmp_path / "ws.log.failed1").read_text()
    assert "INFO - round 0 done in 0.1 s" in lines  # the caller's progress sees the good start's log


def test_a_site_that_fails_every_start_gives_its_line_not_a_timeout(monkeypatch, tmp_path, no_leftovers):
    from fedmed_components.flare.job import SimulatorSiteFailed, run_simulator

    starts = _fake_simulator(monkeypatch, tmp_path, failing_starts=5)
    with pytest.raises(SimulatorSiteFailed, match="Can not find fedmed_site.py"):
        run_simulator(tmp_path / "job", tmp_path / "ws", ["site-1"], timeout=120, retries=1)
    assert starts.read_text() == "xx"
