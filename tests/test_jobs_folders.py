"""The committed jobs/ folders are exactly what the builder exports today."""

import filecmp
import json
from pathlib import Path

import pytest

from fedmed_components.cli import main
from fedmed_components.commands.job import COMMITTED_JOBS

REPO = Path(__file__).resolve().parents[1]


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def test_committed_job_folders_equal_a_fresh_export(tmp_path):
    assert main(["job", "export", "--all", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in (REPO / "jobs").iterdir()) == sorted(COMMITTED_JOBS)
    for name in COMMITTED_JOBS:
        fresh, committed = tmp_path / name, REPO / "jobs" / name
        assert _files(fresh) == _files(committed), name
        for rel in _files(fresh):
            assert filecmp.cmp(fresh / rel, committed / rel, shallow=False), (
                f"jobs/{name}/{rel} is stale: run `fedmed job export --all --out jobs`"
            )


def test_jobs_declare_the_clinical_scope_and_carry_no_package_copy():
    import json

    scopes = {s["name"] for s in json.loads((REPO / "poc_setup" / "privacy.json").read_text())["scopes"]}
    for name in COMMITTED_JOBS:
        meta = json.loads((REPO / "jobs" / name / "meta.json").read_text())
        # clinical; the BERT baseline's clinical_bert also lets its classifier head travel
        assert meta["scope"] == ("clinical_bert" if name == "fed_bert" else "clinical") and meta["scope"] in scopes
        assert not list((REPO / "jobs" / name).rglob("fedmed_components"))
        apps = [p for p in (REPO / "jobs" / name).glob("app*") if p.name != "app_server"]
        assert apps and all((app / "custom" / "fedmed_site.py").is_file() for app in apps), name


def _server_config(job: Path) -> dict:
    config = json.loads((job / "app" / "config" / "config_fed_server.json").read_text())
    return {c["id"]: c for c in config["workflows"] + config["components"]}


def test_export_carries_server_optimizer_and_sampling_options(tmp_path, capsys):
    argv = [
        "job",
        "export",
        "--algorithm",
        "fed_yogi",
        "--server-lr",
        "0.05",
        "--server-tau",
        "0.01",
        "--sample-clients",
        "2",
        "--sample-seed",
        "3",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0
    components = _server_config(tmp_path / "fed_yogi")
    assert components["aggregator"]["path"].endswith("ServerOptimizerAggregator")
    assert components["aggregator"]["args"] == {"rule": "fedyogi", "lr": 0.05, "tau": 0.01}
    assert components["controller"]["args"] == {"sample_clients": 2, "sample_seed": 3}
    # the committed jobs name their optimiser and lr even at the defaults
    assert _server_config(REPO / "jobs" / "fed_avgm")["aggregator"]["args"] == {"rule": "fedavgm", "lr": 1.0}
    assert _server_config(REPO / "jobs" / "fed_adam")["aggregator"]["args"] == {"rule": "fedadam", "lr": 0.01}

    assert main(["job", "export", "--sample-fraction", "1.5", "--out", str(tmp_path / "bad")]) == 2
    assert "sample_fraction must be in (0, 1]" in capsys.readouterr().err
    assert main(["job", "export", "--algorithm", "fed_adam", "--server-lr", "0", "--out", str(tmp_path / "bad")]) == 2
    assert "lr must be a positive number" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # one way of sampling at a time
        main(["job", "export", "--sample-fraction", "0.5", "--sample-clients", "2", "--out", str(tmp_path / "bad")])
