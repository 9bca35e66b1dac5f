"""The committed jobs/ folders are exactly what the builder exports today."""

import filecmp
from pathlib import Path

from fedmed_components.commands.job import COMMITTED_JOBS
from fedmed_components.cli import main

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
            assert filecmp.cmp(fresh / rel, committed / rel, shallow=False), f"jobs/{name}/{rel} is stale: run `fedmed job export --all --out jobs`"


def test_jobs_declare_the_clinical_scope_and_carry_no_package_copy():
    import json

    scopes = {s["name"] for s in json.loads((REPO / "poc_setup" / "privacy.json").read_text())["scopes"]}
    for name in COMMITTED_JOBS:
        meta = json.loads((REPO / "jobs" / name / "meta.json").read_text())
        # clinical; the BERT baseline's clinical_bert also lets its classifier head travel
        assert meta["scope"] == ("clinical_bert" if name == "fed_bert" else "clinical") and meta["scope"] in scopes
        assert not list((REPO / "jobs" / name).rglob("fedmed_components"))
        assert (REPO / "jobs" / name / "app" / "custom" / "fedmed_site.py").is_file()
