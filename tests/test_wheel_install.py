"""A non-editable install works: the wheel carries the site script and the POC setup.

The wheel is built offline from a copy of the sources (the repository gets no build/
folder), installed with ``pip install --target`` and run from a folder outside the
repository, with that folder first on PYTHONPATH: ahead of the editable finder in the
venv, which would otherwise serve the repository's own copy.
"""

import filecmp
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fedmed_components.commands.job import COMMITTED_JOBS

REPO = Path(__file__).resolve().parents[1]
# the whole tiny demo (both scorings and the simulator): ~7 min on a busy 2-core CPU
DEMO_TIMEOUT = 1200


def _run(cmd: list[str], cwd: Path, env: dict | None = None, timeout: float = 300) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{cmd} exited with {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The folder the wheel was installed into (``pip install --target``)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    shutil.copytree(REPO / "fedmed_components", src / "fedmed_components", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    build_log = _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", str(src), "-w", str(root / "dist")], cwd=root)
    assert "deprecated" not in build_log.lower(), build_log  # e.g. setuptools' licence-table warning
    (wheel,) = (root / "dist").glob("fedmed_components-*.whl")
    _run([*pip, "install", "--no-deps", "--no-index", "--target", str(root / "site"), str(wheel)], cwd=root)
    return root / "site"


def _env(site: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(site)}


def test_the_installed_package_is_the_one_imported_and_carries_its_files(installed, tmp_path):
    probe = (
        "import json, fedmed_components, fedmed_components.flare.job as job, fedmed_components.flare.poc as poc\n"
        "print(json.dumps([fedmed_components.__file__, str(job.SITE_SCRIPT), str(poc.DEFAULT_PRIVACY), str(poc.POC_SETUP / 'project.yml')]))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=_env(installed), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    package, site_script, privacy, project = (Path(p) for p in json.loads(out.stdout.strip().splitlines()[-1]))
    assert package.is_relative_to(installed), package
    assert filecmp.cmp(site_script, REPO / "fedmed_components" / "flare" / "site_script" / "fedmed_site.py", shallow=False)
    assert filecmp.cmp(privacy, REPO / "poc_setup" / "privacy.json", shallow=False)
    assert filecmp.cmp(project, REPO / "poc_setup" / "project.yml", shallow=False)


def test_the_installed_package_exports_the_committed_jobs(installed, tmp_path):
    jobs = tmp_path / "jobs"
    _run([sys.executable, "-m", "fedmed_components.cli", "job", "export", "--all", "--out", str(jobs)], cwd=tmp_path, env=_env(installed))
    for name in COMMITTED_JOBS:
        written = sorted(p.relative_to(jobs / name) for p in (jobs / name).rglob("*") if p.is_file())
        assert written == sorted(p.relative_to(REPO / "jobs" / name) for p in (REPO / "jobs" / name).rglob("*") if p.is_file()), name
        for rel in written:  # the site script(s), configs and job.py, as committed
            assert filecmp.cmp(jobs / name / rel, REPO / "jobs" / name / rel, shallow=False), f"{name}/{rel}"
        assert not list((jobs / name).rglob("fedmed_components")), name


@pytest.mark.slow
def test_the_installed_package_runs_the_tiny_demo_with_progress(installed, no_leftovers):
    """`fedmed demo --model tiny` from the installed console script, bounded; every process it
    started is stopped, pass or fail (`no_leftovers` checks)."""
    from fedmed_components.flare.processes import stop_process_trees

    tmp_path = no_leftovers
    out, log = tmp_path / "demo", tmp_path / "demo_console.txt"
    cmd = [str(installed / "bin" / "fedmed"), "demo", "--model", "tiny", "--out", str(out), "--timeout", "900"]
    with open(log, "w") as console:
        proc = subprocess.Popen(
            cmd,
            cwd=tmp_path,
            env=_env(installed),
            stdin=subprocess.DEVNULL,
            stdout=console,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            rc = proc.wait(timeout=DEMO_TIMEOUT)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            stop_process_trees([proc.pid], marker=str(tmp_path))
    text = log.read_text(errors="replace")
    assert rc == 0, f"demo {'timed out' if rc is None else f'exited with {rc}'}\n{text[-4000:]}"
    result = json.loads((out / "demo_result.json").read_text())
    assert result["last_round"]["current_round"] == result["rounds"] - 1 == 1
    assert (out / "global_adapter_store" / "global" / "adapter_model.safetensors").is_file()
    # the simulator's progress, one line per round and per site result
    for rnd in (1, 2):
        assert f"round {rnd}/2 started" in text, text[-4000:]
        for site in ("site-1", "site-2", "site-3"):
            assert f"round {rnd}/2 {site}: train loss " in text, text[-4000:]
