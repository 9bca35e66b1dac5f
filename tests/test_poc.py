"""POC mode end to end on loopback (tiny model): prepare, start, submit Fed-MedLoRA+,
wait, download, load the adapter with PEFT, then a job in the clinical_dp scope; stop;
bounded, nothing left behind."""

import json
import math
import os
import re
import socket
import subprocess
from dataclasses import replace

import psutil
import pytest

from fedmed_components.flare import poc
from fedmed_components.flare.job import JobSpec
from fedmed_components.flare.processes import blas_thread_caps
from fedmed_components.flare.recipe import export_job

SITES = ["site-1", "site-2"]
PORTS = [8002, 8003]


@pytest.fixture
def site_data(write_site_data):
    return write_site_data(SITES)


def processes_naming(marker: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if marker in line]


def test_workspace_not_made_by_fedmed_is_refused(tmp_path):
    foreign = tmp_path / "someone_elses"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(poc.PocError, match="not made by"):
        poc.prepare(foreign, SITES)
    with pytest.raises(poc.PocError, match="not a workspace made by"):
        poc.down(foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_start_refuses_busy_ports_with_a_clear_error(tmp_path, poc_lock):
    ws = tmp_path / "poc"
    state = poc.prepare(ws, SITES)
    port = state["ports"][0]
    holder = socket.socket()
    try:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("0.0.0.0", port))
        holder.listen()
    except OSError:
        pass  # someone else holds it already: the error must come all the same
    try:
        with pytest.raises(poc.PocError, match=rf"port\(s\) \[{port}\] are in use"):
            poc.start(ws, timeout=10)
    finally:
        holder.close()
    assert poc.PocWorkspace.at(ws).load()["processes"] == {}
    # the user's ~/.nvflare was not involved: the kit registry is in the workspace's HOME
    assert (ws / "home" / ".nvflare" / "config.conf").exists()


@pytest.mark.slow
def test_poc_runs_fed_medlora_plus_and_leaves_nothing_behind(tmp_path, site_data, tiny_model_path, sigterm_raises, poc_lock):
    if poc.busy_ports(PORTS):
        pytest.skip(f"ports {PORTS} are taken by another FLARE system on this machine")
    ws = tmp_path / "poc"
    spec = JobSpec(
        name="fed_medlora_plus",
        algorithm="fed_medlora_plus",
        loss_source="sites",
        model="tiny",
        sites=SITES,
        num_rounds=2,
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
        eval_timeout=240,
        extra_site_args="--max-val-examples 8",
    )
    job = export_job(spec, tmp_path / "jobs")
    try:
        poc.prepare(ws, SITES, data=str(site_data))
        state = poc.start(ws, timeout=90)
        pids = {name: rec["pid"] for name, rec in state["processes"].items()}
        assert sorted(pids) == sorted(["server", *SITES])
        # the sites train at once on this machine: their BLAS threads share its cores
        threads = blas_thread_caps(len(SITES)).get("OMP_NUM_THREADS") or os.environ["OMP_NUM_THREADS"]
        assert [psutil.Process(pids[s]).environ().get("OMP_NUM_THREADS") for s in SITES] == [threads] * len(SITES)
        # up again: idempotent, the running POC is kept
        poc.prepare(ws, SITES, data=str(site_data))
        assert {n: r["pid"] for n, r in poc.start(ws)["processes"].items()} == pids
        report = poc.status(ws)
        assert sorted(c["client_name"] for c in report["server"]["clients"]) == SITES

        result = poc.run_job(ws, job, timeout=300)
        assert result["meta"]["status"] == "FINISHED:COMPLETED"
        assert result["adapter"] == tmp_path / "adapters" / "global"
        assert (result["download"] / "workspace" / "log.txt").exists()
        state_json = json.loads((tmp_path / "adapters" / "state.json").read_text())
        assert state_json["last_round"] == 1

        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_path), str(result["adapter"]))
        assert any("lora_A" in name for name, _ in model.named_parameters())

        # the sites' privacy policy was in force on every update they sent
        kits = ws / "nvflare_poc" / state["project"] / "prod_00"
        assert "all LoRA adapter tensors" in (kits / "site-1" / result["job_id"] / "log.txt").read_text()

        # a job asking for the clinical_dp scope: noised at the sites, sent as int8,
        # restored by the server's policy, aggregated
        dp_job = export_job(
            replace(
                spec,
                name="fed_medlora_dp",
                algorithm="fed_medlora",
                num_rounds=1,
                scope="clinical_dp",
                output_dir=str(tmp_path / "adapters_dp"),
            ),
            tmp_path / "jobs",
        )
        dp = poc.run_job(ws, dp_job, timeout=300)
        assert dp["adapter"] == tmp_path / "adapters_dp" / "global"
        site_log = (kits / "site-1" / dp["job_id"] / "log.txt").read_text()
        noise_std, values = re.search(r"noise std ([0-9.e+-]+) on (\d+) values; epsilon", site_log).groups()
        assert re.search(r"8-bit transfer of task 'train': .*\((3\.9\d|4\.00)x", site_log)
        server_log = (dp["download"] / "workspace" / "log.txt").read_text()
        norms = [float(x) for x in re.findall(r"accepted update from site-\d: .* update norm ([0-9.]+)", server_log)]
        expected = float(noise_std) * math.sqrt(int(values))  # the noise dominates the tiny update
        assert len(norms) == 2 and all(abs(n - expected) < 0.1 * expected for n in norms), (norms, expected)
    finally:
        poc.down(ws)
    assert processes_naming(str(ws)) == []
    assert poc.busy_ports(PORTS) == []
    assert poc.PocWorkspace.at(ws).load()["processes"] == {}
    assert poc.down(ws) == []  # down again: nothing to do
