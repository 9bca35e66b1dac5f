"""FedMed as a FLARE recipe: what a `job.py` builds, runs and exports.

`FedMedRecipe(algorithm=..., **settings)` is a `nvflare.recipe.Recipe` around FedMed's
job builder (`flare/job.py`): `recipe.run(env)` runs it in FLARE's `SimEnv`, `PocEnv` or
`ProdEnv`, `recipe.export(dir)` writes the folder `nvflare job submit` takes (the
committed `jobs/` folders are such exports), and `recipe.set_per_site_config(...)` gives
each hospital its own site-script options. Every folder it exports carries a `job.py`
that rebuilds the same recipe.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path

from nvflare.recipe.spec import ExecEnv, Recipe

from fedmed_components.data.files import atomic_write_text
from fedmed_components.flare.job import SITE_SCRIPT, JobSpec, build_job, check_site_overrides


class FedMedRecipe(Recipe):
    """One FedMed federation. `algorithm` is one of `flare.job.ALGORITHMS`; every other
    keyword is a `JobSpec` field (sites, num_rounds, local_steps, rank, temperature, ...)."""

    def __init__(self, algorithm: str = "fed_medlora", *, name: str | None = None, spec: JobSpec | None = None, **settings):
        if spec is None:
            spec = JobSpec(name=name or algorithm, algorithm=algorithm, **settings)
        elif settings or name:
            raise TypeError("give a JobSpec or settings, not both")
        check_site_overrides(spec)
        self.spec = spec
        super().__init__(self._build())

    @classmethod
    def from_spec(cls, spec: JobSpec) -> FedMedRecipe:
        return cls(spec=spec)

    @property
    def job(self):
        """The FLARE FedJob behind the recipe (benchmarks add components to it)."""
        return self._job

    def _build(self):
        with _in_site_script_folder():  # FLARE finds the site script relative to the cwd
            return build_job(self.spec)

    def _apply_per_site_config(self, config: dict[str, dict]) -> None:
        """{site: {site-script option: value}}: e.g. {"site-1": {"rank": 8, "data": "/data/a"}}.
        A site not yet in `sites` joins the job; each key and value is checked against the
        site script's options (SiteOptionError names what is wrong)."""
        overrides = {site: {key: _option_text(value) for key, value in values.items()} for site, values in config.items()}
        sites = list(self.spec.sites) + [site for site in config if site not in self.spec.sites]
        spec = dataclasses.replace(self.spec, sites=sites, site_overrides=overrides)
        check_site_overrides(spec)
        self.spec = spec
        self._job = self._build()  # one client app per site: FLARE allows it before any client customisation

    def export(self, job_dir: str, server_exec_params=None, client_exec_params=None, env: ExecEnv | None = None) -> Path:
        """Write <job_dir>/<name>/: the job folder and the job.py that rebuilds this recipe.
        Returns the folder."""
        job_root = Path(job_dir).resolve()
        with _in_site_script_folder():
            super().export(str(job_root), server_exec_params=server_exec_params, client_exec_params=client_exec_params, env=env)
        folder = job_root / self.name
        atomic_write_text(folder / "job.py", job_py_source(self.spec))
        return folder

    def run(self, env: ExecEnv, server_exec_params=None, client_exec_params=None):
        _absolute_paths(env)  # they are read from the site script's folder
        with _in_site_script_folder():
            return super().run(env, server_exec_params=server_exec_params, client_exec_params=client_exec_params)


def export_job(spec: JobSpec, job_root: str | os.PathLike, customize=None) -> Path:
    """Write the job folder of `spec` (through its recipe). ``customize(job)`` may add
    components to the FedJob (benchmarks add a wire meter) before export."""
    recipe = FedMedRecipe.from_spec(spec)
    if customize is not None:
        customize(recipe.job)
    return recipe.export(str(job_root))


def job_py_source(spec: JobSpec) -> str:
    """The job.py of an exported folder: this recipe, each setting that differs from
    JobSpec's default written out; what its command line names replaces them
    (fedmed_components/commands/recipe_job.py)."""
    defaults = JobSpec()
    fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(JobSpec)}
    written = {name: value for name, value in fields.items() if value != getattr(defaults, name) or name in ("name", "algorithm")}
    settings = "".join(f"    {name}={_literal(value)},\n" for name, value in written.items())
    return f'''"""{spec.name}: a FedMed federation ({spec.algorithm}) as a FLARE recipe.

Run it in FLARE's simulator, POC mode or a provisioned production system:

    python job.py --data SITES_ROOT [--sites site-1,site-2] [--rounds N] ...   # SimEnv
    python job.py --env poc --data SITES_ROOT                                  # PocEnv
    python job.py --env prod --startup-kit /path/to/admin@org                  # ProdEnv
    python job.py --export --export-dir DIR    # write DIR/{spec.name}/ for nvflare job submit

SITES_ROOT/<site name>/ holds each site's notes (train.jsonl, ...). `python job.py --help`
lists every option; each one given replaces the value below.
Written by FedMedRecipe.export (fedmed_components/flare/recipe.py); `--export` rewrites it.
"""

from fedmed_components.commands.recipe_job import parse_job_args, run_recipe
from fedmed_components.flare.recipe import FedMedRecipe

args = parse_job_args(__doc__)
recipe = FedMedRecipe(
    **args.settings(
{"".join("    " + line for line in settings.splitlines(keepends=True))}    )
)
raise SystemExit(run_recipe(recipe, args))
'''


def _literal(value) -> str:
    """Python source for a setting, strings in double quotes as ruff writes them."""
    return json.dumps(value) if isinstance(value, str) else repr(value)


def _option_text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


@contextlib.contextmanager
def _in_site_script_folder():
    cwd = os.getcwd()
    os.chdir(SITE_SCRIPT.parent)
    try:
        yield
    finally:
        os.chdir(cwd)


def _absolute_paths(env: ExecEnv) -> None:
    for attr in ("workspace_root", "startup_kit_location", "poc_workspace"):
        value = getattr(env, attr, None)
        if isinstance(value, str) and value and not os.path.isabs(value):
            setattr(env, attr, os.path.abspath(value))
