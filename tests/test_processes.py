"""Stopping what a run started, and nothing else."""

import subprocess
import sys
import time

import psutil

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
