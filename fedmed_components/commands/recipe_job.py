"""The command line of a job folder's `job.py`: which FLARE environment runs the recipe.

    python jobs/fed_medlora_plus/job.py --data SITES_ROOT                  # SimEnv (default)
    python jobs/fed_medlora_plus/job.py --env poc --data SITES_ROOT        # PocEnv
    python jobs/fed_medlora_plus/job.py --env prod --startup-kit ADMIN_KIT # ProdEnv

Budget options (--model, --rank, --local-steps, ...) replace the job's values only when
given; `--export --export-dir DIR` (FLARE's own flags) writes the folder instead of running.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from fedmed_components.settings import Budget, add_budget_arguments

# Budget option -> JobSpec field, where the names differ.
_SPEC_FIELD = {"lr": "learning_rate"}
_BUDGET_NAMES = tuple(n for n in Budget.names() if n not in ("dropout", "target_modules", "tasks", "warmup_ratio"))
ENVS = ("sim", "poc", "prod")


@dataclass
class JobArgs:
    given: dict  # JobSpec field -> value, only what the command line named
    site_options: list[str] = field(default_factory=list)
    env: str = "sim"
    workspace: str = "/tmp/nvflare/simulation"
    threads: int | None = None
    timeout: float = 7200
    startup_kit: str | None = None
    username: str | None = None
    poc_workspace: str | None = None
    wait: bool = False

    def settings(self, **job) -> dict:
        """The job's settings with the command line's on top (--site merged per site and key)."""
        from fedmed_components.commands.job import parse_site_options
        from fedmed_components.flare.job import JobSpec

        merged = {**job, **self.given}
        if self.site_options:
            sites = merged.get("sites") or JobSpec().sites
            overrides = {site: dict(values) for site, values in (merged.get("site_overrides") or {}).items()}
            for site, values in parse_site_options(self.site_options, sites).items():
                overrides.setdefault(site, {}).update(values)
            merged["site_overrides"] = overrides
        return merged


def job_parser(doc: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    run = parser.add_argument_group("where it runs")
    run.add_argument("--env", choices=ENVS, default="sim", help="FLARE's SimEnv, PocEnv or ProdEnv (default: sim)")
    run.add_argument("--workspace", default="/tmp/nvflare/simulation", help="sim: workspace root; the run is <root>/<job name>")
    run.add_argument("--threads", type=int, default=None, help="sim: sites training at once (default: all)")
    run.add_argument("--timeout", type=float, default=7200, help="sim: seconds before every process is stopped (default: 7200)")
    run.add_argument("--poc-workspace", default=None, help="poc: FLARE's POC workspace (default: $NVFLARE_POC_WORKSPACE or FLARE's)")
    run.add_argument("--startup-kit", default=None, help="prod: the admin startup kit folder (from provisioning)")
    run.add_argument("--username", default=None, help="prod: the admin's name in its certificate (default: the kit folder's name)")
    run.add_argument("--wait", action="store_true", help="prod: wait for the job to finish and print where its result is")
    job = parser.add_argument_group("the job (each option given replaces the value in job.py)")
    job.add_argument("--sites", default=argparse.SUPPRESS, help="comma-separated site names")
    job.add_argument("--rounds", dest="num_rounds", type=int, default=argparse.SUPPRESS, help="federated rounds")
    job.add_argument("--min-clients", type=int, default=argparse.SUPPRESS, help="fewest sites a round needs")
    job.add_argument("--data", default=argparse.SUPPRESS, help="site data root: <data>/<site>/ (default: each site's $FEDMED_DATA)")
    job.add_argument("--server-val-data", default=argparse.SUPPRESS, help="Fed-MedLoRA+ with server losses: the server's validation JSONL")
    job.add_argument(
        "--site",
        action="append",
        default=[],
        metavar="NAME:key=value[,key=value...]",
        help="one site's own site-script options (repeatable), as `fedmed job export --site`",
    )
    add_budget_arguments(job, names=_BUDGET_NAMES)
    for action in job._group_actions:
        if action.dest in _BUDGET_NAMES:
            action.default = argparse.SUPPRESS  # absent unless given: the job's own value stays
    return parser


def parse_job_args(doc: str | None = None, argv: list[str] | None = None) -> JobArgs:
    args = vars(job_parser(doc).parse_args(argv))
    run_keys = ("env", "workspace", "threads", "timeout", "poc_workspace", "startup_kit", "username", "wait")
    run = {k: args.pop(k) for k in run_keys}
    site_options = args.pop("site")
    given = {_SPEC_FIELD.get(k, k): v for k, v in args.items()}
    if "sites" in given:
        given["sites"] = [s.strip() for s in given["sites"].split(",") if s.strip()]
    if given.get("local_steps") == 0:
        given["local_steps"] = None  # 0: train --local-epochs instead
    for path in ("data", "server_val_data"):
        if given.get(path):
            given[path] = str(Path(given[path]).resolve())  # server and sites start elsewhere
    if run["env"] == "prod" and not run["startup_kit"]:
        raise SystemExit("job.py: error: --env prod needs --startup-kit (the admin startup kit from provisioning)")
    return JobArgs(given=given, site_options=site_options, **run)


def run_recipe(recipe, args: JobArgs) -> int:
    """Run (or, with FLARE's --export, export) `recipe` in the environment `args` names."""
    from nvflare.recipe import PocEnv, ProdEnv, SimEnv

    from fedmed_components.flare.processes import blas_thread_caps

    sites = recipe.spec.sites
    if args.env == "sim":
        os.environ.update(blas_thread_caps(args.threads or len(sites)))
        workspace_root = str(Path(args.workspace).resolve())
        env = SimEnv(clients=sites, num_threads=args.threads, workspace_root=workspace_root)
        with _bounded(args.timeout, marker=os.path.join(workspace_root, recipe.name)):
            run = recipe.execute(env)
        _report(run, "simulator finished; workspace")
        return 0
    if args.env == "poc":
        if args.poc_workspace:
            os.environ["NVFLARE_POC_WORKSPACE"] = str(Path(args.poc_workspace).resolve())
        env = PocEnv(clients=sites)
        try:
            run = recipe.execute(env)
            _report(run, f"job {run.get_job_id()} finished; result")
        finally:
            env.stop(clean_up=False)  # PocEnv leaves its services running otherwise
        return 0
    kit = Path(args.startup_kit).resolve()
    # A provisioned admin logs in under the name its certificate holds: the kit folder's
    # name (FLARE's ProdEnv would use admin@nvidia.com, which such a server refuses).
    env = ProdEnv(startup_kit_location=str(kit), username=args.username or kit.name)
    run = recipe.execute(env)
    print(f"submitted job {run.get_job_id()}")
    if args.wait:
        _report(run, f"job {run.get_job_id()} finished; result")
    return 0


def _report(run, label: str) -> None:
    """Wait for the job, print where its result is and its cross-site evaluation table.
    clean_up=False: FLARE's default deletes a POC workspace, the downloaded result with it."""
    from fedmed_components.commands.results import print_tables_under

    result = run.get_result(clean_up=False)
    print(f"{label} {result}")
    if result:
        print_tables_under(result)


class _bounded:
    """Stop every process this one started once `timeout` seconds pass, and on exit:
    FLARE's SimEnv waits on its simulator without a limit."""

    def __init__(self, timeout: float, marker: str):
        self.timeout, self.marker = timeout, marker
        self.timed_out = threading.Event()

    def _children(self) -> list[int]:
        import psutil

        return [p.pid for p in psutil.Process().children()]

    def _expire(self) -> None:
        from fedmed_components.flare.processes import stop_process_trees

        self.timed_out.set()
        print(f"job.py: the simulator ran past {self.timeout:.0f} s; stopping it", file=sys.stderr, flush=True)
        stop_process_trees(self._children(), marker=self.marker)

    def __enter__(self):
        self.timer = threading.Timer(self.timeout, self._expire)
        self.timer.daemon = True
        self.timer.start()
        return self

    def __exit__(self, exc_type, exc, tb):
        from fedmed_components.flare.processes import stop_process_trees

        self.timer.cancel()
        stop_process_trees(self._children(), marker=self.marker)
        # SimEnv may return normally once its simulator is killed: the timeout decides.
        if self.timed_out.is_set():
            raise SystemExit(f"job.py: error: timed out after {self.timeout:.0f} s") from exc
        return False
