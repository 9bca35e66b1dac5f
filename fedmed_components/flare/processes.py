"""Stopping what we started: process trees, plus stragglers found by a marker.

FLARE's simulator workers and POC job processes start sessions of their own, so a
process group is not enough: descendants are collected while their parents live, and
any process whose command line names our workspace is caught as well.
"""

from __future__ import annotations

import os
from collections.abc import Iterable


def blas_thread_caps(concurrent_sites: int) -> dict[str, str]:
    """Environment that shares this machine's cores between the sites that train at once
    on it (simulator workers, POC site processes): oversubscribed BLAS threads make CPU
    training several times slower. An explicit OMP_NUM_THREADS wins (empty dict)."""
    if "OMP_NUM_THREADS" in os.environ:
        return {}
    per_site = str(max(1, (os.cpu_count() or 1) // max(1, concurrent_sites)))
    return {"OMP_NUM_THREADS": per_site, "MKL_NUM_THREADS": per_site}


def stop_process_trees(root_pids: Iterable[int], *, marker: str | None = None, grace: float = 5.0) -> list[int]:
    """SIGTERM each root, its descendants and every FLARE process whose command line
    holds `marker`; SIGKILL what is left after `grace` seconds. Returns the pids stopped.

    This process and its ancestors are never touched: the shell or `timeout` that
    started us may well carry the workspace path on its own command line.
    """
    import psutil

    victims: dict[int, psutil.Process] = {}
    for pid in root_pids:
        try:
            root = psutil.Process(pid)
            for p in [root, *root.children(recursive=True)]:
                victims[p.pid] = p
        except psutil.NoSuchProcess:
            continue
    if marker:
        me = psutil.Process(os.getpid())
        spared = {me.pid} | {p.pid for p in me.parents()}
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                cmdline = " ".join(p.info["cmdline"] or [])
                if p.pid not in spared and p.pid not in victims and marker in cmdline and "nvflare" in cmdline:
                    victims[p.pid] = p
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
    for p in victims.values():
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(victims.values()), timeout=grace)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace)
    return sorted(victims)
