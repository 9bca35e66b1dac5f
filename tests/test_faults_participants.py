"""`poc.stop_participant`: one participant's processes (its recorded tree and anything
run from its kit folder) are stopped, and nothing of another site, even one whose name
starts the same (site-1 / site-10). No FLARE needed: stand-in processes."""

import json
import subprocess
import sys
import time

import psutil
import pytest
import yaml

from fedmed_components.commands import poc as poc_command
from fedmed_components.flare import poc

SLEEPER = "import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)', *sys.argv[1:]]); time.sleep(120)"


def _fake_poc(tmp_path):
    """A workspace as `fedmed poc up` leaves it, its participants stand-ins that sleep."""
    ws = poc.PocWorkspace.at(tmp_path / "poc")
    prod = ws.poc_dir / "proj" / "prod_00"
    participants = [{"name": "server", "type": "server"}, {"name": "admin@x.org", "type": "admin", "role": "project_admin"}]
    participants += [{"name": s, "type": "client"} for s in ("site-1", "site-10")]
    ws.poc_dir.mkdir(parents=True)
    (ws.poc_dir / "project.yml").write_text(yaml.safe_dump({"name": "proj", "participants": participants}))
    procs, records = [], {}
    for name in ("site-1", "site-10"):
        kit = prod / name
        kit.mkdir(parents=True)
        proc = subprocess.Popen([sys.executable, "-c", SLEEPER, "-m", str(kit)], start_new_session=True)
        procs.append(proc)
        records[name] = {"pid": proc.pid, "pgid": proc.pid, "create_time": psutil.Process(proc.pid).create_time()}
    # a job process run from site-1's kit that is not in the recorded tree
    stray = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)", "-w", str(prod / "site-1" / "startup")], start_new_session=True
    )
    procs.append(stray)
    ws.save({"owner": poc.OWNER, "sites": ["site-1", "site-10"], "server": "server", "processes": records})
    return ws, procs


def test_stop_participant_stops_that_site_only(tmp_path):
    ws, procs = _fake_poc(tmp_path)
    site1, site10, stray = procs
    try:
        deadline = time.monotonic() + 20
        while len(psutil.Process(site1.pid).children()) < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        child = psutil.Process(site1.pid).children()[0]
        stopped = poc.stop_participant(ws.root, "site-1", kill=True)
        assert set(stopped) == {site1.pid, child.pid, stray.pid}
        for proc in (site1, stray):
            proc.wait(timeout=10)  # (psutil reaped them already: no exit status left to read)
            assert not psutil.pid_exists(proc.pid)
        assert site10.poll() is None, "site-10 must keep running"
        assert set(json.loads(ws.state_file.read_text())["processes"]) == {"site-10"}
        with pytest.raises(poc.PocError, match="not a participant"):
            poc.stop_participant(ws.root, "site-3")
        # the command line: site-10 stopped with SIGTERM
        assert poc_command._stop_site(type("Args", (), {"workspace": str(ws.root), "name": "site-10", "kill": False})()) == 0
        site10.wait(timeout=20)
        assert not psutil.pid_exists(site10.pid)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        poc.stop_processes([], marker=str(tmp_path))  # the sleepers' children
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])]
