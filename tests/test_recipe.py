"""FedMedRecipe (a FLARE Recipe) and the committed jobs' job.py: export, per-site config,
and every committed job run as `python jobs/<name>/job.py` in FLARE's SimEnv (bounded,
nothing left running)."""

import filecmp
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import flare_processes_naming
from nvflare.recipe.spec import Recipe

from fedmed_components.commands.job import COMMITTED_JOBS
from fedmed_components.commands.recipe_job import parse_job_args
from fedmed_components.flare.job import JobSpec, SiteOptionError
from fedmed_components.flare.recipe import FedMedRecipe

REPO = Path(__file__).resolve().parents[1]


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def test_recipe_is_a_flare_recipe_and_exports_the_builders_folder(tmp_path):
    recipe = FedMedRecipe("fed_medlora_plus", loss_source="sites", num_rounds=5, rank=8)
    assert isinstance(recipe, Recipe)
    folder = recipe.export(str(tmp_path))
    assert folder == tmp_path / "fed_medlora_plus"
    server = json.loads((folder / "app" / "config" / "config_fed_server.json").read_text())
    controller = next(w for w in server["workflows"] if w["id"] == "controller")
    assert controller["args"]["num_rounds"] == 5
    client = (folder / "app" / "config" / "config_fed_client.json").read_text()
    assert "--rank 8" in client
    # the installed package is not copied into the job (FLARE's app_packages)
    assert not list(folder.rglob("fedmed_components"))
    assert (folder / "app" / "custom" / "fedmed_site.py").is_file()
    # the job.py beside it rebuilds this very recipe
    source = (folder / "job.py").read_text()
    assert "num_rounds=5" in source and "rank=8" in source and 'algorithm="fed_medlora_plus"' in source
    compile(source, str(folder / "job.py"), "exec")


def test_per_site_config_gives_each_site_its_own_app_and_arguments(tmp_path):
    recipe = FedMedRecipe("fed_exact_lora", sites=["site-1", "site-2"])
    recipe.set_per_site_config({"site-1": {"rank": 4, "batch_size": 2}, "site-3": {"data": "/data/c", "gradient_checkpointing": True}})
    assert recipe.spec.sites == ["site-1", "site-2", "site-3"]
    assert recipe.configured_sites() == ["site-1", "site-3"]
    folder = recipe.export(str(tmp_path))
    meta = json.loads((folder / "meta.json").read_text())
    assert sorted(meta["deploy_map"]) == ["app_server", "app_site-1", "app_site-2", "app_site-3"]
    site1 = (folder / "app_site-1" / "config" / "config_fed_client.json").read_text()
    site3 = (folder / "app_site-3" / "config" / "config_fed_client.json").read_text()
    site2 = (folder / "app_site-2" / "config" / "config_fed_client.json").read_text()
    assert "--rank 4" in site1 and "--batch-size 2" in site1
    assert "--data /data/c" in site3 and "--gradient-checkpointing" in site3
    assert "--rank 16" in site2 and "--gradient-checkpointing" not in site2
    # job.py holds the per-site settings (its --site options merge into them)
    assert "site_overrides={'site-1': {'rank': '4', 'batch_size': '2'}, 'site-3'" in (folder / "job.py").read_text()


def test_per_site_config_errors_name_the_key():
    with pytest.raises(SiteOptionError, match="unknown key 'rnak'"):
        FedMedRecipe("fed_medlora").set_per_site_config({"site-1": {"rnak": 4}})
    with pytest.raises(SiteOptionError, match="model is the same at every site"):
        FedMedRecipe("fed_medlora").set_per_site_config({"site-1": {"model": "tiny"}})
    with pytest.raises(SiteOptionError, match="batch"):
        FedMedRecipe("fed_medlora").set_per_site_config({"site-1": {"batch_size": "many"}})


def test_job_py_command_line_replaces_only_what_it_names():
    args = parse_job_args(argv=["--rank", "8", "--rounds", "2", "--sites", "a,b", "--site", "b:batch_size=2"])
    settings = args.settings(name="fed_bert", model="minilm", rank=16, alpha=16)
    assert settings["model"] == "minilm" and settings["alpha"] == 16  # the job's values stay
    assert settings["rank"] == 8 and settings["num_rounds"] == 2 and settings["sites"] == ["a", "b"]
    assert settings["site_overrides"] == {"b": {"batch_size": "2"}}
    assert parse_job_args(argv=[]).settings(model="minilm") == {"model": "minilm"}
    with pytest.raises(SystemExit):
        parse_job_args(argv=["--env", "prod"])  # no startup kit


def test_every_committed_job_py_exports_its_own_folder(tmp_path):
    """`python jobs/<name>/job.py --export --export-dir DIR` writes exactly the committed folder."""
    for name in ("fed_medlora_plus", "fed_bert"):
        proc = subprocess.run(
            [sys.executable, str(REPO / "jobs" / name / "job.py"), "--export", "--export-dir", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        fresh, committed = tmp_path / name, REPO / "jobs" / name
        assert _files(fresh) == _files(committed)
        assert all(filecmp.cmp(fresh / f, committed / f, shallow=False) for f in _files(fresh)), name
    for name, extra in COMMITTED_JOBS.items():  # and each job.py holds its job's settings
        assert FedMedRecipe.from_spec(JobSpec(name=name, **extra)).spec.name in (REPO / "jobs" / name / "job.py").read_text()


def _job_py(name: str, tmp_path: Path, data: Path, *extra: str, timeout: float = 420) -> subprocess.CompletedProcess:
    tiny = [] if name == "fed_bert" else ["--model", "tiny", "--rank", "4", "--alpha", "8"]
    argv = [
        sys.executable,
        str(REPO / "jobs" / name / "job.py"),
        "--data",
        str(data),
        "--workspace",
        str(tmp_path / "ws"),
        *tiny,
        "--quantize",
        "none",
        "--rounds",
        "1",
        "--local-steps",
        "2",
        "--batch-size",
        "2",
        "--max-length",
        "160",
        "--site",
        "site-1:batch_size=1",
        *extra,
    ]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 60, cwd=tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(COMMITTED_JOBS))
def test_committed_job_py_runs_in_simenv(name, no_leftovers, write_site_data):
    tmp_path = no_leftovers
    sites = JobSpec(**COMMITTED_JOBS[name]).sites
    data = write_site_data(sites)
    extra = ["--server-val-data", str(data / "site-1" / "val.jsonl")] if name == "fed_medlora_plus_server" else []
    if name == "fed_flexlora":  # its sites train ranks 4, 8 and the job's 16 (job.py's)
        extra += ["--rank", "16", "--alpha", "32"]
    proc = _job_py(name, tmp_path, data, *extra)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    run_dir = tmp_path / "ws" / name
    assert f"simulator finished; workspace {run_dir}" in proc.stdout
    server_log = (run_dir / "server" / "log.txt").read_text()
    assert "round 0 done" in server_log
    assert "cross-site evaluation of round 0's global adapter" in proc.stdout  # job.py prints the table
    adapter = run_dir / "server" / "simulate_job" / "fedmed_adapters" / "global" / "adapter_model.safetensors"
    assert adapter.is_file()
    output = proc.stdout + proc.stderr  # SimEnv shows every site's log; site-1 has its own batch size
    assert re.search(r"site-1 settings: .*batch_size 1,", output) and re.search(r"site-2 settings: .*batch_size 2,", output)
    assert flare_processes_naming(str(tmp_path)) == []


@pytest.mark.slow
def test_job_py_timeout_stops_every_process(no_leftovers, write_site_data):
    tmp_path = no_leftovers
    data = write_site_data(["site-1", "site-2"])
    proc = _job_py("fed_medlora", tmp_path, data, "--timeout", "25", "--local-steps", "500", timeout=25)
    assert proc.returncode != 0
    assert "timed out after 25 s" in proc.stderr
    assert flare_processes_naming(str(tmp_path)) == []


@pytest.mark.slow
def test_fedmed_job_simulate_shows_rounds_and_the_cross_site_table(no_leftovers, write_site_data, capsys):
    from fedmed_components.cli import main

    tmp_path = no_leftovers
    data = write_site_data(["site-1", "site-2"])
    export = ["job", "export", "--model", "tiny", "--quantize", "none", "--rounds", "2", "--local-steps", "1", "--batch-size", "2"]
    assert main([*export, "--rank", "4", "--alpha", "8", "--max-length", "160", "--out", str(tmp_path / "jobs")]) == 0
    argv = ["job", "simulate", str(tmp_path / "jobs" / "fed_medlora"), "--workspace", str(tmp_path / "ws"), "--data", str(data)]
    assert main([*argv, "--sites", "site-1,site-2", "--timeout", "400"]) == 0
    out = capsys.readouterr().out
    for line in ("round 1/2 started", "round 1/2 site-1: train loss", "round 2/2 site-2: train loss", "round 2/2 done in"):
        assert line in out, out[-2000:]
    assert "cross-site evaluation of round 1's global adapter" in out  # rounds count from 0 on the server
    assert re.search(r"^site-1 +val +1 ", out, re.M) and re.search(r"^site-2 +val +1 ", out, re.M)


class _FakeRun:
    def __init__(self, calls):
        self.calls = calls

    def get_job_id(self):
        return "job-1"

    def get_result(self, timeout=0.0, clean_up=True):
        self.calls.append(("get_result", clean_up))
        return None


class _FakeRecipe:
    def __init__(self, calls, fail=False):
        self.calls, self.fail = calls, fail
        self.spec = JobSpec(sites=["a", "b"])
        self.name = "job"

    def execute(self, env):
        self.calls.append(("execute", env))
        if self.fail:
            raise RuntimeError("submission refused")
        return _FakeRun(self.calls)


def test_prod_logs_in_as_the_kits_admin_and_poc_keeps_its_result_and_stops(monkeypatch, tmp_path):
    """job.py's wiring of FLARE's ProdEnv and PocEnv (the environments themselves are FLARE's)."""
    import nvflare.recipe

    from fedmed_components.commands.recipe_job import run_recipe

    calls = []

    class Env:
        def __init__(self, **kwargs):
            calls.append(("env", kwargs))

        def stop(self, clean_up=False):
            calls.append(("stop", clean_up))

    monkeypatch.setattr(nvflare.recipe, "ProdEnv", Env)
    monkeypatch.setattr(nvflare.recipe, "PocEnv", Env)
    kit = tmp_path / "lead@hospital.example.org"
    assert run_recipe(_FakeRecipe(calls), parse_job_args(argv=["--env", "prod", "--startup-kit", str(kit), "--wait"])) == 0
    assert calls[0] == ("env", {"startup_kit_location": str(kit), "username": "lead@hospital.example.org"})
    assert ("get_result", False) in calls
    calls.clear()
    argv = ["--env", "prod", "--startup-kit", str(kit), "--username", "ops@hospital.example.org"]
    run_recipe(_FakeRecipe(calls), parse_job_args(argv=argv))
    assert calls[0][1]["username"] == "ops@hospital.example.org"
    calls.clear()
    with pytest.raises(RuntimeError, match="submission refused"):  # POC services stopped even when submission fails
        run_recipe(_FakeRecipe(calls, fail=True), parse_job_args(argv=["--env", "poc"]))
    assert calls[-1] == ("stop", False)
    calls.clear()
    run_recipe(_FakeRecipe(calls), parse_job_args(argv=["--env", "poc"]))
    assert ("get_result", False) in calls and calls[-1] == ("stop", False)  # the result is not deleted
