"""Production deployment on loopback: provision poc_setup/project.yml, start the server
and two hospitals from their startup kits, submit as the lead over a secure admin
session, and show that a site with a certificate from another provisioning cannot join."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fedmed_components.flare import poc
from fedmed_components.flare.job import JobSpec
from fedmed_components.flare.recipe import export_job

pytestmark = pytest.mark.slow

PROJECT = Path(__file__).resolve().parents[1] / "poc_setup" / "project.yml"
SITES = ["hospital-a", "hospital-b"]
LEAD = "lead@coordinating-center.example.org"
ORG_ADMIN = "it@hospital-a.example.org"
PORTS = [8002, 8003]


@pytest.fixture
def site_data(write_site_data):
    return write_site_data(SITES)


def _localhost_project(tmp_path: Path) -> Path:
    """The shipped project.yml with the server on localhost and no GPU capacity claims."""
    project = yaml.safe_load(PROJECT.read_text())
    for participant in project["participants"]:
        if participant["type"] == "server":
            participant["name"] = "localhost"
        participant.pop("capacity", None)
    path = tmp_path / "project_localhost.yml"
    path.write_text(yaml.safe_dump(project, sort_keys=False))
    return path


def _provision(project: Path, workspace: Path, env: dict) -> Path:
    proc = subprocess.run(
        [sys.executable, "-m", "nvflare.cli", "provision", "-p", str(project), "-w", str(workspace), "--force"],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return workspace / "fedmed" / "prod_00"


def _wait_for(predicate, timeout: float, what: str, poll: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def test_provisioned_server_and_sites_run_a_job_and_reject_a_foreign_certificate(
    tmp_path, site_data, tiny_model_path, sigterm_raises, poc_lock
):
    if poc.busy_ports(PORTS):
        pytest.skip(f"ports {PORTS} are taken by another FLARE system on this machine")
    from nvflare.fuel.flare_api.api_spec import AuthorizationError
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    env = dict(os.environ, HOME=str(tmp_path / "home"), TMPDIR=str(tmp_path / "tmp"))
    for folder in ("home", "tmp"):
        (tmp_path / folder).mkdir()
    project = _localhost_project(tmp_path)
    kits = _provision(project, tmp_path / "provision", env)
    foreign = _provision(project, tmp_path / "other_provision", env)  # same names, another root CA
    assert (kits / "hospital-c" / "startup" / "rootCA.pem").read_bytes() != (foreign / "hospital-c" / "startup" / "rootCA.pem").read_bytes()
    assert sorted(p.name for p in kits.iterdir()) == sorted(
        [
            "localhost",
            "hospital-a",
            "hospital-b",
            "hospital-c",
            "hospital-d",
            "hospital-e",
            LEAD,
            "admin@coordinating-center.example.org",
            *[f"it@hospital-{x}.example.org" for x in "abcde"],
        ]
    )
    for name in ["localhost", *SITES]:
        poc.install_policy(kits / name, poc.DEFAULT_PRIVACY)

    job = export_job(
        JobSpec(
            name="fed_medlora",
            algorithm="fed_medlora",
            model="tiny",
            sites=SITES,
            num_rounds=1,
            min_clients=2,
            local_steps=2,
            batch_size=4,
            max_length=128,
            rank=4,
            alpha=8,
            quantize="none",
            data=str(site_data),
            output_dir=str(tmp_path / "adapters"),
            train_timeout=240,
            extra_site_args="--max-val-examples 8",
        ),
        tmp_path / "jobs",
    )
    logs = tmp_path / "logs"
    records, sessions = [], []
    try:
        records.append(poc.start_kit(kits / "localhost", logs / "server.log", env))
        deadline = time.monotonic() + 60
        for port in PORTS:
            poc._wait_port(port, deadline, lambda: poc._process(records[0]) is not None)
        for site in SITES:
            records.append(poc.start_kit(kits / site, logs / f"{site}.log", env))
        records.append(poc.start_kit(foreign / "hospital-c", logs / "foreign-hospital-c.log", env))

        lead = new_secure_session(LEAD, str(kits / LEAD), timeout=30)
        sessions.append(lead)
        connected = lambda: sorted(c.name for c in lead.get_connected_client_list())  # noqa: E731
        _wait_for(lambda: set(SITES) <= set(connected()), 60, "both hospitals to register")

        # an org admin may operate its own site but not submit jobs
        org_admin = new_secure_session(ORG_ADMIN, str(kits / ORG_ADMIN), timeout=30)
        sessions.append(org_admin)
        with pytest.raises(AuthorizationError, match="not authorized for 'submit_job'"):
            org_admin.submit_job(str(job))

        job_id = lead.submit_job(str(job))
        meta = lead.wait_for_job(job_id, timeout=300)
        assert meta["status"] == "FINISHED:COMPLETED", meta
        assert lead.get_job_meta(job_id)["submitter_name"] == LEAD
        assert (tmp_path / "adapters" / "global" / "adapter_config.json").exists()
        assert (tmp_path / "adapters" / "global" / "adapter_model.safetensors").exists()

        # the foreign hospital-c never joined: TLS fails on the certificate chain
        foreign_log = logs / "foreign-hospital-c.log"
        _wait_for(lambda: "CERTIFICATE_VERIFY_FAILED" in foreign_log.read_text(errors="replace"), 60, "the foreign site's TLS failure")
        assert "hospital-c" not in connected()
        assert connected() == SITES
    finally:
        for session in sessions:
            session.close()
        poc.stop_processes(records, marker=str(tmp_path) + os.sep)
    leftovers = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    assert str(tmp_path) not in leftovers
    assert poc.busy_ports(PORTS) == []
