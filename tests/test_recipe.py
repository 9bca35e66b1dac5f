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
    assert "set_per_site_config" in (folder / "job.py").read_text()


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
    data = write_site_data(["site-1", "site-2"])
    extra = ["--server-val-data", str(data / "site-1" / "val.jsonl")] if name == "fed_medlora_plus_server" else []
    proc = _job_py(name, tmp_path, data, *extra)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    run_dir = tmp_path / "ws" / name
    assert f"simulator finished; workspace {run_dir}" in proc.stdout
    server_log = (run_dir / "server" / "simulate_job" / "log.txt").read_text()
    assert "round 0 done" in server_log
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
