"""One builder for every FedMed job folder, and a bounded simulator run.

`JobSpec` says what a federation runs (algorithm, model, sites, rounds, local steps,
data); `build_job` turns it into a FLARE `FedJob`; `flare/recipe.py` wraps it as a FLARE
recipe whose `export` writes the folder `nvflare job submit` / the admin console take as is.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from fedmed_components.federation.aggregation import FED_PLUS_TEMPERATURE
from fedmed_components.flare.processes import blas_thread_caps, stop_process_trees
from fedmed_components.settings import BUDGET

# Server optimisers (Reddi et al. 2021) on Fed-MedLoRA's token-weighted average: job algorithm -> rule.
SERVER_OPTIMIZERS = {"fed_avgm": "fedavgm", "fed_adam": "fedadam", "fed_yogi": "fedyogi"}
ALGORITHMS = ("fed_medlora", "fed_medlora_plus", "fedsa_lora", "fed_exact_lora", *SERVER_OPTIMIZERS, "fed_prox")
# FedProx (Li et al. 2020): Fed-MedLoRA's aggregation, sites train with a proximal term.
PROX_MU_DEFAULT = 0.01
# FedAvgM's usual server lr is 1 (lr 1 without momentum is FedAvg); the adaptive rules
# divide by sqrt(v), so each coordinate moves about lr per round: far smaller.
SERVER_LR_DEFAULTS = {"fedavgm": 1.0, "fedadam": 1e-2, "fedyogi": 1e-2}
# The site script FLARE copies into each app's custom/ folder: package data, so an installed
# (non-editable) package exports jobs too.
SITE_SCRIPT = Path(__file__).resolve().parent / "site_script" / "fedmed_site.py"


@dataclass
class JobSpec:
    name: str = "fed_medlora"
    algorithm: str = "fed_medlora"
    model: str = BUDGET.model  # the embedded default; any HF id or folder in production
    sites: list[str] = field(default_factory=lambda: ["site-1", "site-2"])
    num_rounds: int = 3
    min_clients: int = 1
    local_steps: int | None = BUDGET.local_steps
    local_epochs: float = BUDGET.local_epochs
    batch_size: int = BUDGET.batch_size
    max_length: int = BUDGET.max_length
    learning_rate: float = BUDGET.lr
    rank: int = BUDGET.rank
    alpha: int = BUDGET.alpha
    precision: str = BUDGET.precision
    prompt_style: str = BUDGET.prompt_style
    ner_sentences: int = BUDGET.ner_sentences
    data: str = ""  # site folder root (<data>/<site name>); empty: each site's $FEDMED_DATA
    quantize: str = BUDGET.quantize
    loss_source: str = "sites"  # Fed-MedLoRA+: sites | server
    server_val_data: str | None = None
    weighting: str = "supervised_tokens"
    # Fed-MedLoRA+: softmax temperature of the weights exp((1 - L_k) / T), and whether
    # each weight is also multiplied by the site's supervised tokens
    temperature: float = FED_PLUS_TEMPERATURE
    use_sizes: bool = False
    max_norm_ratio: float = 10.0
    # fed_avgm / fed_adam / fed_yogi: server lr (None: SERVER_LR_DEFAULTS), momentum
    # beta1, second-moment beta2 and tau (adaptive rules)
    server_lr: float | None = None
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 1e-3
    # Client sampling per round (controller): a fraction or a count of the connected
    # sites, seeded, never fewer than min_clients; None for both: every site trains.
    sample_fraction: float | None = None
    sample_clients: int | None = None
    sample_seed: int = 0
    # fed_prox: mu of the sites' proximal term (None: PROX_MU_DEFAULT; 0 is plain Fed-MedLoRA)
    prox_mu: float | None = None
    # fed_medlora with a Byzantine-robust rule on the updates (docs/robust_aggregation.md):
    # median | trimmed_mean (trim_beta per side) | norm_bounded (robust_clip; None: median norm)
    robust_rule: str | None = None
    trim_beta: float = 0.2
    robust_clip: float | None = None
    train_timeout: int = 3600
    eval_timeout: int = 1800
    # After the last round each site scores the final global adapter on its test notes and
    # the server writes cross_site_eval.json beside it (docs/cross_site_evaluation.md).
    cross_site_eval: bool = True
    output_dir: str = "fedmed_adapters"
    extra_site_args: str = ""
    # Per-site settings (`fedmed job export --site NAME:key=value,...`): site name -> the site
    # script's options by dest name (rank, batch_size, device, data, ...), each replacing the
    # same option of site_args(). Non-empty: one client app per site in `sites` (FLARE names
    # them app_<site>; meta.json deploys each to its site alone); empty: one app for all sites.
    site_overrides: dict[str, dict[str, str]] = field(default_factory=dict)
    scope: str = "clinical"
    # causal-lm: the paper's generative IE; token-classification: the BERT BIO baseline
    # (fed_bert), whose trained classifier head travels with the LoRA tensors.
    task_model: str = "causal-lm"
    tensorboard: bool = True  # sites' scalars -> <server run dir>/tb_events/<site>/
    # The same scalars in MLflow as well (flare/tracking.py add_mlflow): a tracking URI the
    # server reaches (sqlite:////abs/mlflow.db, http://host:5000, ...); None: off.
    mlflow_uri: str | None = None
    mlflow_experiment: str = "fedmed"
    # How long a site waits after a task before asking for the next one (FLARE's
    # default is 2 s, which every round paid in full: bench/bench_overhead.py).
    task_request_interval: float = 0.5

    def lora(self) -> dict:
        """What the persistor needs to build and save the global adapter."""
        if self.task_model != "token-classification":
            return {"r": self.rank, "alpha": self.alpha}
        from fedmed_components.model.token_classification import ENCODER_TARGET_MODULES

        return {"r": self.rank, "alpha": self.alpha, "target_modules": list(ENCODER_TARGET_MODULES), "task_type": "TOKEN_CLS"}

    def head_modules(self) -> list[str] | None:
        return ["classifier"] if self.task_model == "token-classification" else None

    def site_args(self, site: str | None = None) -> str:
        """The site script's arguments; for a `site` with overrides, its own."""
        args = [
            "--model",
            self.model,
            "--quantize",
            self.quantize,
            "--rank",
            str(self.rank),
            "--alpha",
            str(self.alpha),
            "--lr",
            str(self.learning_rate),
            "--batch-size",
            str(self.batch_size),
            "--max-length",
            str(self.max_length),
            "--local-epochs",
            str(self.local_epochs),
            "--precision",
            self.precision,
            "--prompt-style",
            self.prompt_style,
        ]
        if self.local_steps:
            args += ["--local-steps", str(self.local_steps)]
        if self.ner_sentences != BUDGET.ner_sentences:
            args += ["--ner-sentences", str(self.ner_sentences)]
        if self.data:
            args += ["--data", self.data]
        if self.task_model != "causal-lm":
            args += ["--task-model", self.task_model, "--target-modules", ",".join(self.lora()["target_modules"])]
        if not self.tensorboard:
            args += ["--no-tensorboard"]
        if self.algorithm == "fed_prox":
            args += ["--prox-mu", str(PROX_MU_DEFAULT if self.prox_mu is None else self.prox_mu)]
        common = shlex.join(args) + (" " + self.extra_site_args if self.extra_site_args else "")
        overrides = self.site_overrides.get(site) if site else None
        return shlex.join(with_site_overrides(shlex.split(common), overrides)) if overrides else common


# Site script options a --site override may not change: the server builds one adapter on
# one base model, one task model and one set of LoRA modules for every site.
JOB_WIDE_SITE_OPTIONS = ("model", "task_model", "target_modules")
_SWITCH_VALUES = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


class SiteOptionError(ValueError):
    pass


def site_parser():
    """The site script's command line (site_script/fedmed_site.py): what per-site overrides
    are checked against. Its error() raises SiteOptionError instead of exiting."""
    import argparse

    from fedmed_components.flare.site_tasks import add_site_script_arguments
    from fedmed_components.model.site import add_site_arguments

    class _Parser(argparse.ArgumentParser):
        def error(self, message):
            raise SiteOptionError(message)

    parser = _Parser(prog=SITE_SCRIPT.name, add_help=False)
    add_site_arguments(parser)
    add_site_script_arguments(parser)
    return parser


def site_options() -> dict:
    """dest name -> argparse action of every site script option."""
    return {a.dest: a for a in site_parser()._actions if a.option_strings}


def check_site_override(key: str, value: str) -> None:
    """Raise SiteOptionError saying what is wrong unless the site script takes `key=value`."""
    options = site_options()
    if key in JOB_WIDE_SITE_OPTIONS:
        raise SiteOptionError(f"{key} is the same at every site: set it for the whole job")
    action = options.get(key)
    if action is None:
        keys = ", ".join(sorted(k for k in options if k not in JOB_WIDE_SITE_OPTIONS))
        raise SiteOptionError(f"unknown key {key!r}; the keys are the site script's options: {keys}")
    if action.nargs == 0:
        _switch(key, value)
    else:
        site_parser().parse_args([f"{_flag(action)}={value}"])


def check_site_overrides(spec: JobSpec) -> None:
    for site, overrides in spec.site_overrides.items():
        if site not in spec.sites:
            raise SiteOptionError(f"site {site!r} is not one of the job's sites ({', '.join(spec.sites)})")
        for key, value in overrides.items():
            check_site_override(key, value)


def with_site_overrides(args: list[str], overrides: dict[str, str]) -> list[str]:
    """`args` with each override replacing the same option (its first occurrence; later
    ones dropped) or appended; a switch (store_true) is added for true, removed for false."""
    options = site_options()
    takes_value = {flag for a in options.values() if a.nargs != 0 for flag in a.option_strings}
    out = list(args)
    for key, value in overrides.items():
        action = options[key]
        flags, flag = set(action.option_strings), _flag(action)
        if action.nargs == 0:
            out = [token for token in out if token not in flags] + ([flag] if _switch(key, value) else [])
            continue
        kept, i, replaced = [], 0, False
        while i < len(out):
            token = out[i]
            if token.split("=", 1)[0] in flags:
                if not replaced:
                    kept += [flag, value]
                    replaced = True
                i += 1 if "=" in token else 2
                continue
            step = 2 if token in takes_value else 1  # an option's value is never taken for an option
            kept += out[i : i + step]
            i += step
        out = kept if replaced else kept + [flag, value]
    return out


def _flag(action) -> str:
    return max(action.option_strings, key=len)


def _switch(key: str, value: str) -> bool:
    try:
        return _SWITCH_VALUES[value.strip().lower()]
    except KeyError:
        raise SiteOptionError(f"{key} is a switch: give true or false, not {value!r}") from None


def _per_site_job(sites: list[str], **kwargs):
    """A FedJob whose `to_clients` puts a component into each named site's own app. FLARE
    writes either one app for every site ("@ALL") or per-site apps, and beside an "@ALL"
    app it would silently drop the per-site ones: so what tracking (the event relay) or a
    benchmark's filter sends `to_clients` has to go to every site's app."""
    from nvflare.job_config.api import FedJob

    class PerSiteFedJob(FedJob):
        def to_clients(self, obj, id=None, **kw):
            result = None
            for site in sites:
                result = self.to(obj, site, id=id, **kw)
            return result

    return PerSiteFedJob(**kwargs)


def build_aggregator(spec: JobSpec):
    from fedmed_components.flare import aggregators as agg

    if spec.robust_rule is not None:
        if spec.algorithm != "fed_medlora":
            raise ValueError(f"a robust rule ({spec.robust_rule}) applies to fed_medlora's updates, not to {spec.algorithm}")
        return agg.RobustAggregator(
            robust_rule=spec.robust_rule,
            trim_beta=spec.trim_beta,
            clip=spec.robust_clip,
            weighting=spec.weighting,
            max_norm_ratio=spec.max_norm_ratio,
            head_modules=spec.head_modules(),
        )
    if spec.algorithm in ("fed_medlora", "fed_prox"):
        return agg.FedMedLoRAAggregator(weighting=spec.weighting, max_norm_ratio=spec.max_norm_ratio, head_modules=spec.head_modules())
    if spec.algorithm == "fed_medlora_plus":
        return agg.FedMedLoRAPlusAggregator(
            temperature=spec.temperature, use_sizes=spec.use_sizes, max_norm_ratio=spec.max_norm_ratio, head_modules=spec.head_modules()
        )
    if spec.algorithm == "fedsa_lora":
        return agg.FedSALoRAAggregator(num_rounds=spec.num_rounds, weighting=spec.weighting, max_norm_ratio=spec.max_norm_ratio)
    if spec.algorithm == "fed_exact_lora":
        return agg.ExactLoRAAggregator(rank=spec.rank, alpha=spec.alpha, weighting=spec.weighting, max_norm_ratio=spec.max_norm_ratio)
    if spec.algorithm in SERVER_OPTIMIZERS:
        rule = SERVER_OPTIMIZERS[spec.algorithm]
        return agg.ServerOptimizerAggregator(
            rule=rule,
            lr=spec.server_lr if spec.server_lr is not None else SERVER_LR_DEFAULTS[rule],
            beta1=spec.server_beta1,
            beta2=spec.server_beta2,
            tau=spec.server_tau,
            weighting=spec.weighting,
            max_norm_ratio=spec.max_norm_ratio,
        )
    raise ValueError(f"unknown algorithm {spec.algorithm!r}; choose from {ALGORITHMS}")


def build_job(spec: JobSpec):
    from nvflare.client.config import ExchangeFormat
    from nvflare.job_config.api import FedJob
    from nvflare.job_config.script_runner import FrameworkType, ScriptRunner

    from fedmed_components.flare.controller import FedMedController
    from fedmed_components.flare.persistor import AdapterPersistor

    loss_source = spec.loss_source if spec.algorithm == "fed_medlora_plus" else "none"
    if spec.task_model == "token-classification" and (spec.algorithm not in ("fed_medlora", "fed_medlora_plus") or loss_source == "server"):
        raise ValueError(
            "the BERT baseline runs with fed_medlora or fed_medlora_plus (site losses): its head is not a LoRA factor and the server evaluator is generative"
        )
    check_site_overrides(spec)
    job_args = dict(name=spec.name, min_clients=spec.min_clients, meta_props={"scope": spec.scope})
    job = _per_site_job(spec.sites, **job_args) if spec.site_overrides else FedJob(**job_args)
    job.set_app_packages(["fedmed_components"])  # installed at every site and server: FLARE copies none of it into custom/
    job.to_server({"server": {"task_request_interval": spec.task_request_interval}})
    job.to_server(
        AdapterPersistor(model=spec.model, lora=spec.lora(), output_dir=spec.output_dir),
        id="persistor",
    )
    job.to_server(build_aggregator(spec), id="aggregator")
    if loss_source == "server":
        from fedmed_components.flare.evaluator import ServerLossEvaluator

        job.to_server(
            ServerLossEvaluator(model=spec.model, data=spec.server_val_data or "", max_length=spec.max_length, quantize=spec.quantize),
            id="evaluator",
        )
    job.to_server(
        FedMedController(
            num_rounds=spec.num_rounds,
            min_clients=spec.min_clients,
            loss_source=loss_source,
            evaluator_id="evaluator" if loss_source == "server" else None,
            train_timeout=spec.train_timeout,
            eval_timeout=spec.eval_timeout,
            sample_fraction=spec.sample_fraction,
            sample_clients=spec.sample_clients,
            sample_seed=spec.sample_seed,
            cross_site_eval=spec.cross_site_eval,
        ),
        id="controller",
    )

    def runner(site: str | None = None):
        return ScriptRunner(
            script=SITE_SCRIPT.name,  # relative: FLARE runs it from the app's custom/ folder
            script_args=spec.site_args(site),
            framework=FrameworkType.PYTORCH,
            server_expected_format=ExchangeFormat.PYTORCH,
        )

    if spec.site_overrides:  # one app per site (app_<site>), each with its own arguments
        for site in spec.sites:
            job.to(runner(site), site)
    else:
        job.to_clients(runner())
    if spec.tensorboard:
        from fedmed_components.flare.tracking import add_tensorboard

        add_tensorboard(job)
    if spec.mlflow_uri:
        from fedmed_components.flare.tracking import add_mlflow

        add_mlflow(job, spec)
    return job


class SimulatorTimeout(RuntimeError):
    pass


class SimulatorSiteFailed(RuntimeError):
    """A site's FLARE client stopped with a fatal error: the server would wait for it until
    the timeout, so the run is stopped at once."""


# FLARE's client runner logs this when a site cannot go on (its executor failed to start,
# say); the simulator's server keeps waiting for that site's result.
_SITE_FATAL = "Stopped ClientRunner due to FATAL_SYSTEM_ERROR"


def run_simulator(
    job_folder: str | os.PathLike,
    workspace: str | os.PathLike,
    sites: list[str],
    *,
    timeout: float = 600,
    threads: int | None = None,
    log_file: str | os.PathLike | None = None,
    progress: Callable[[str], None] | None = None,
    retries: int = 1,
) -> Path:
    """Run the FLARE simulator bounded by `timeout`; every process it started is stopped.

    ``progress``, if given, is called with each line of the simulator's log as it is
    written (`round_progress` turns that into one line per round and per site result).

    A site whose FLARE client stops with a fatal error ends the run at once
    (`SimulatorSiteFailed`) instead of leaving the server waiting until the timeout. The
    simulator itself sometimes starts two workers for one site (its client threads pick
    the next site outside their lock), and the loser cannot find the site script; such a
    run is started again, up to `retries` times, in a fresh workspace (the simulator
    wipes it; a job's persistor store outside it resumes as usual).

    The simulator's site workers start sessions of their own, so killing its process
    group is not enough: the whole process tree is collected and stopped, and any
    straggler still naming this workspace on its command line as well. The simulator
    wipes its workspace at start, so the log lives beside it. Returns the workspace.
    """
    workspace = Path(workspace).resolve()
    workspace.parent.mkdir(parents=True, exist_ok=True)
    log_path = Path(log_file) if log_file else workspace.with_name(workspace.name + ".log")
    threads = threads or len(sites)
    for attempt in range(1, retries + 1):
        try:
            return _run_simulator_once(job_folder, workspace, sites, timeout, threads, log_path, progress)
        except SimulatorSiteFailed as failed:
            failed_log = log_path.with_name(f"{log_path.name}.failed{attempt}")
            log_path.replace(failed_log)
            print(f"{failed}; starting the simulator again (its log kept as {failed_log})", file=sys.stderr, flush=True)
    return _run_simulator_once(job_folder, workspace, sites, timeout, threads, log_path, progress)


def simulator_command(job_folder, workspace: Path, sites: list[str], threads: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "nvflare.cli",
        "simulator",
        str(job_folder),
        "-w",
        str(workspace),
        "-c",
        ",".join(sites),
        "-t",
        str(threads),
    ]


def _run_simulator_once(job_folder, workspace: Path, sites, timeout, threads: int, log_path: Path, progress) -> Path:
    cmd = simulator_command(job_folder, workspace, sites, threads)
    site_fatal: list[str] = []

    def on_line(line: str) -> None:
        if _SITE_FATAL in line and not site_fatal:
            site_fatal.append(line.strip())
        if progress is not None:
            progress(line)

    with open(log_path, "w") as log, _terminate_raises(), follow_log(log_path, on_line, interval=0.2):
        env = {**os.environ, **blas_thread_caps(threads)}
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, env=env)
        try:
            deadline = time.monotonic() + timeout
            while (rc := proc.poll()) is None:
                if site_fatal:
                    raise SimulatorSiteFailed(f"a site stopped with a fatal error: {site_fatal[0]}; log: {log_path}")
                if time.monotonic() > deadline:
                    raise SimulatorTimeout(f"simulator did not finish within {timeout:.0f} s; log: {log_path}")
                time.sleep(0.2)
        finally:
            stop_process_trees([proc.pid], marker=str(workspace))
    if rc != 0:
        raise RuntimeError(f"simulator exited with {rc}; log: {log_path}\n{tail(log_path)}")
    return workspace


class _terminate_raises:
    """Turn SIGTERM into an exception while a run is under way, so cleanup runs."""

    def __enter__(self):
        import threading

        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._raise)
        return self

    @staticmethod
    def _raise(signum, frame):
        raise KeyboardInterrupt(f"terminated by signal {signum}")

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False


@contextlib.contextmanager
def follow_log(path: str | os.PathLike, on_line: Callable[[str], None] | None, interval: float = 0.5) -> Iterator[None]:
    """While the block runs, a thread reads the lines appended to `path` and hands each to
    `on_line`; on exit it reads what is left and stops. None: nothing is followed."""
    if on_line is None:
        yield
        return
    done = threading.Event()

    def follow():
        with open(path, errors="replace", newline="") as log:  # newline="": progress bars' \r stay as written
            pending = ""
            while True:
                chunk = log.read()
                if not chunk:
                    if done.is_set():
                        break
                    done.wait(interval)
                    continue
                *lines, pending = (pending + chunk).split("\n")
                pending = pending[pending.rfind("\r") + 1 :]  # a progress bar redraws itself: keep its last state
                for line in lines:
                    on_line(line)
            if pending:
                on_line(pending)

    thread = threading.Thread(target=follow, name="simulator-log", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=10)


# What the simulator's log says about progress: the controller's round start and end
# (flare/controller.py), each site's training result (flare/site_tasks.py `train`) and
# the controller's warnings about a round (a site dropped).
# POC and production logs put FLARE's "[identity=..., run=..., wf=...] - " before the message.
_CONTEXT = r"(?:\[[^\]]*\] - )?"
_ROUND_STARTED = re.compile(rf"INFO - {_CONTEXT}round (?P<round>\d+) started")
_ROUND_DONE = re.compile(rf"INFO - {_CONTEXT}round (?P<round>\d+) done in (?P<seconds>[\d.]+) s")
_ROUND_WARNING = re.compile(rf"WARNING - {_CONTEXT}round (?P<round>\d+): (?P<message>.*)$")
_SITE_TRAINED = re.compile(
    rf"INFO - {_CONTEXT}(?P<site>\S+) round (?P<round>\d+): (?P<steps>\d+) steps, .*?train loss (?P<train>[^\s,]+), "
    r"val loss (?P<val>[^\s,]+), .*, (?P<seconds>[\d.]+) s\s*$"
)


def progress_message(line: str, num_rounds: int | None = None) -> str | None:
    """The progress a simulator log line reports, as one line for a person (rounds counted
    from 1), or None for every other line."""

    def rnd(match) -> str:
        number = int(match["round"]) + 1
        return f"round {number}/{num_rounds}" if num_rounds else f"round {number}"

    if match := _ROUND_STARTED.search(line):
        return f"{rnd(match)} started"
    if match := _SITE_TRAINED.search(line):
        return (
            f"{rnd(match)} {match['site']}: train loss {match['train']}, val loss {match['val']} "
            f"({match['steps']} steps, {float(match['seconds']):.0f} s)"
        )
    if match := _ROUND_DONE.search(line):
        return f"{rnd(match)} done in {float(match['seconds']):.0f} s"
    if match := _ROUND_WARNING.search(line):
        return f"{rnd(match)} warning: {match['message'].strip()}"
    return None


def round_progress(
    num_rounds: int | None = None, write: Callable[[str], None] | None = None, indent: str = "      "
) -> Callable[[str], None]:
    """A `run_simulator(progress=...)` callback writing (default: printing at once) one line
    per round start and end, per site result and per dropped site."""

    emit = write or (lambda text: print(text, flush=True))

    def on_line(line: str) -> None:
        if message := progress_message(line, num_rounds):
            emit(indent + message)

    return on_line


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
