"""`fedmed job export|simulate`: write FLARE job folders from one builder, or run one."""

from __future__ import annotations

import sys
from pathlib import Path

# The committed jobs/ folders: `fedmed job export --all --out jobs` regenerates them.
COMMITTED_JOBS = {
    "fed_medlora": dict(algorithm="fed_medlora"),
    "fed_medlora_plus": dict(algorithm="fed_medlora_plus", loss_source="sites"),
    "fed_medlora_plus_server": dict(algorithm="fed_medlora_plus", loss_source="server"),
    "fedsa_lora": dict(algorithm="fedsa_lora"),
    "fed_exact_lora": dict(algorithm="fed_exact_lora"),
    # Server optimisers on the token-weighted average (lr: SERVER_LR_DEFAULTS unless --server-lr).
    "fed_avgm": dict(algorithm="fed_avgm"),
    "fed_adam": dict(algorithm="fed_adam"),
    "fed_yogi": dict(algorithm="fed_yogi"),
    "fed_prox": dict(algorithm="fed_prox"),
    # Per-site LoRA ranks (FlexLoRA): hospitals with smaller GPUs train rank 4 or 8, the
    # global adapter keeps the job's 16; the server averages the products B_k·A_k and each
    # site takes the global update cut to its rank by SVD (the residual is in its log).
    "fed_flexlora": dict(
        algorithm="fed_exact_lora",
        sites=["site-1", "site-2", "site-3"],
        site_overrides={"site-1": {"rank": "4"}, "site-2": {"rank": "8"}},
    ),
    # The BERT baseline (BIO tagging) aggregated with Fed-MedLoRA; MiniLM is the embedded
    # encoder, production passes --model emilyalsentzer/Bio_ClinicalBERT (BERT: <= 512 tokens).
    # Its sites' privacy scope clinical_bert lets the classifier head leave with the adapter.
    # LoRA scaling 1 (alpha = r) and lr 3e-3: with the LLM's alpha 64 / lr <= 1e-3 a new
    # tagging head stays at all-O for short rounds (MiniLM sweep, 30 steps: F1 0 vs 0.36).
    "fed_bert": dict(
        algorithm="fed_medlora",
        task_model="token-classification",
        model="minilm",
        max_length=256,
        learning_rate=3e-3,
        alpha=16,
        scope="clinical_bert",
    ),
}


def register(subparsers) -> None:
    from fedmed_components.federation.robust_aggregation import ROBUST_RULES
    from fedmed_components.flare.job import ALGORITHMS, JobSpec
    from fedmed_components.settings import Budget, add_budget_arguments

    d = JobSpec()
    job = subparsers.add_parser("job", help="export FLARE job folders (nvflare job submit takes them as is) or simulate one")
    sub = job.add_subparsers(dest="job_command", metavar="SUBCOMMAND")

    export = sub.add_parser(
        "export", help="write a job folder", description="Write a FLARE job folder for one algorithm (or --all committed ones)."
    )
    export.add_argument("--out", default="jobs", help="folder that receives <name>/")
    export.add_argument("--all", action="store_true", help="export every committed job (fed_medlora, fed_medlora_plus, ...)")
    export.add_argument("--name", default=None, help="job name (default: the algorithm)")
    export.add_argument("--algorithm", default=d.algorithm, choices=ALGORITHMS)
    export.add_argument(
        "--loss-source", default=d.loss_source, choices=["sites", "server"], help="Fed-MedLoRA+: who measures candidate losses"
    )
    export.add_argument("--server-val-data", default=None, help="Fed-MedLoRA+ with --loss-source server: the server's validation JSONL")
    export.add_argument(
        "--task-model",
        default=d.task_model,
        choices=["causal-lm", "token-classification"],
        help="causal-lm: generative IE (the paper); token-classification: the BERT BIO baseline (fed_bert)",
    )
    export.add_argument("--sites", default=",".join(d.sites), help="comma-separated site names (simulator)")
    export.add_argument("--rounds", type=int, default=d.num_rounds)
    export.add_argument("--min-clients", type=int, default=d.min_clients)
    # the training and LoRA budget every site gets: options, defaults and help from settings.Budget
    add_budget_arguments(export, names=tuple(n for n in Budget.names() if n not in ("dropout", "target_modules", "tasks", "warmup_ratio")))
    export.add_argument("--data", default=d.data, help="site data root (default: each site's $FEDMED_DATA)")
    export.add_argument(
        "--temperature",
        type=float,
        default=d.temperature,
        help="Fed-MedLoRA+: temperature T of the weights exp((1 - L_k) / T) (default: %(default)s, the paper's)",
    )
    export.add_argument("--use-sizes", action="store_true", help="Fed-MedLoRA+: multiply each site's weight by its supervised tokens")
    export.add_argument(
        "--server-lr",
        type=float,
        default=d.server_lr,
        help="fed_avgm/fed_adam/fed_yogi: server learning rate (default: 1 for fed_avgm, 0.01 for the adaptive rules)",
    )
    export.add_argument("--server-momentum", type=float, default=d.server_beta1, help="server optimisers: beta1 (FedAvgM's momentum)")
    export.add_argument("--server-beta2", type=float, default=d.server_beta2, help="fed_adam/fed_yogi: second-moment decay")
    export.add_argument("--server-tau", type=float, default=d.server_tau, help="fed_adam/fed_yogi: adaptivity (added to sqrt(v))")
    sampling = export.add_mutually_exclusive_group()
    sampling.add_argument(
        "--sample-fraction",
        type=float,
        default=d.sample_fraction,
        help="train a seeded fraction (0, 1] of the sites each round (at least --min-clients)",
    )
    sampling.add_argument(
        "--sample-clients", type=int, default=d.sample_clients, help="train this many sites each round (at least --min-clients)"
    )
    export.add_argument(
        "--prox-mu",
        type=float,
        default=d.prox_mu,
        help="fed_prox: mu of the sites' proximal term mu/2 ||theta - theta_global||^2 (default 0.01)",
    )
    export.add_argument(
        "--robust-rule",
        default=d.robust_rule,
        choices=ROBUST_RULES,
        help="fed_medlora: aggregate the updates with a Byzantine-robust rule (docs/robust_aggregation.md)",
    )
    export.add_argument("--trim-beta", type=float, default=d.trim_beta, help="trimmed_mean: share of sites trimmed on each side")
    export.add_argument(
        "--robust-clip", type=float, default=d.robust_clip, help="norm_bounded: clip norm (default: the round's median update norm)"
    )
    export.add_argument("--sample-seed", type=int, default=d.sample_seed, help="seed of the per-round site sample")
    export.add_argument("--train-timeout", type=int, default=d.train_timeout, help="seconds a site has for a round before it is dropped")
    export.add_argument("--output-dir", default=d.output_dir, help="where the server keeps adapters (absolute: survives restarts)")
    export.add_argument("--site-args", default="", help="extra arguments for the site script")
    export.add_argument(
        "--site",
        action="append",
        default=[],
        metavar="NAME:key=value[,key=value...]",
        help="one site's own settings (repeatable), e.g. site-1:batch_size=2,rank=4,device=cpu: the site script's options "
        "by dest name (data, mapping, batch_size, rank, alpha, lr, max_length, local_steps, local_epochs, quantize, "
        "precision, device, prompt_style, ...), each replacing the job's; switches take true/false. The job then "
        "deploys one app per site, to the sites in --sites only. A per-site rank needs --algorithm fed_exact_lora "
        "(mixed ranks); the other algorithms' screening rejects an update whose rank is not the job's. Keep alpha "
        "the job's: the server scales every site by the job's alpha",
    )
    export.add_argument(
        "--mlflow-uri",
        default=d.mlflow_uri,
        help="also log every site's scalars to MLflow at this tracking URI (sqlite:////abs/mlflow.db, http://host:5000, ...)",
    )
    export.add_argument(
        "--mlflow-experiment", default=d.mlflow_experiment, help="MLflow experiment of the site runs (default: %(default)s)"
    )
    export.set_defaults(func=_export)

    sim = sub.add_parser(
        "simulate",
        help="run a job folder in the FLARE simulator, bounded by a timeout",
        description="Run a job folder in the FLARE simulator in its own process group; every process it started is stopped when it ends.",
    )
    sim.add_argument("job_folder")
    sim.add_argument("--sites", default=",".join(d.sites), help="comma-separated site names")
    sim.add_argument("--workspace", required=True, help="simulator workspace (one per run)")
    sim.add_argument("--timeout", type=float, default=1800, help="wall-clock limit in seconds")
    sim.add_argument("--data", default=None, help="site data root, exported to the sites as FEDMED_DATA")
    sim.set_defaults(func=_simulate)


def spec_from_args(args, **overrides):
    from fedmed_components.flare.job import JobSpec

    values = dict(
        name=args.name or args.algorithm,
        algorithm=args.algorithm,
        loss_source=args.loss_source,
        server_val_data=args.server_val_data,
        model=args.model,
        sites=args.sites.split(","),
        num_rounds=args.rounds,
        min_clients=args.min_clients,
        local_steps=args.local_steps or None,  # 0: use --local-epochs
        local_epochs=args.local_epochs,
        batch_size=args.batch_size,
        max_length=args.max_length,
        learning_rate=args.lr,
        rank=args.rank,
        alpha=args.alpha,
        data=args.data,
        quantize=args.quantize,
        precision=args.precision,
        prompt_style=args.prompt_style,
        ner_sentences=args.ner_sentences,
        temperature=args.temperature,
        use_sizes=args.use_sizes,
        train_timeout=args.train_timeout,
        output_dir=args.output_dir,
        extra_site_args=args.site_args,
        site_overrides=parse_site_options(getattr(args, "site", None) or [], args.sites.split(",")),
        task_model=args.task_model,
        server_lr=args.server_lr,
        server_beta1=args.server_momentum,
        server_beta2=args.server_beta2,
        server_tau=args.server_tau,
        sample_fraction=args.sample_fraction,
        sample_clients=args.sample_clients,
        sample_seed=args.sample_seed,
        prox_mu=args.prox_mu,
        robust_rule=args.robust_rule,
        trim_beta=args.trim_beta,
        robust_clip=args.robust_clip,
        mlflow_uri=args.mlflow_uri,
        mlflow_experiment=args.mlflow_experiment,
    )
    values.update(overrides)
    return JobSpec(**values)


# Site options whose value holds commas (a --site value continues past them).
COMMA_VALUES = ("tasks", "dp_sgd")


def parse_site_options(options: list[str], sites: list[str]) -> dict[str, dict[str, str]]:
    """`--site NAME:key=value[,key=value...]` options -> {site: {key: value}}, each key and
    value checked against the site script's parser. After a key whose value is a comma
    list (`tasks=ner,modifier`, `dp_sgd=noise=1.0,clip=1.0`), a piece that is not a key of
    its own continues that value.
    Raises SiteOptionError("--site <option>: <what is wrong>")."""
    from fedmed_components.flare.job import SiteOptionError, check_site_override, site_options

    known = site_options()
    overrides: dict[str, dict[str, str]] = {}
    for option in options:
        try:
            name, sep, body = option.partition(":")
            name = name.strip()
            if not sep or not name or not body.strip():
                raise SiteOptionError("expected NAME:key=value[,key=value...]")
            if name not in sites:
                raise SiteOptionError(f"site {name!r} is not in --sites ({','.join(sites)})")
            pairs: list[list[str]] = []
            for piece in body.split(","):
                key, eq, value = piece.partition("=")
                key = key.strip()
                if pairs and pairs[-1][0] in COMMA_VALUES and (not eq or key not in known):  # its value goes on
                    pairs[-1][1] += "," + piece
                elif not eq or not key:
                    raise SiteOptionError(f"{piece!r} is not key=value")
                else:
                    pairs.append([key, value.strip()])
            for key, value in pairs:
                check_site_override(key, value)
                overrides.setdefault(name, {})[key] = value
        except SiteOptionError as exc:
            raise SiteOptionError(f"--site {option}: {exc}") from None
    return overrides


def site_override_warnings(spec) -> list[str]:
    """What a per-site job will do that its author may not expect: a site rank other than
    the job's (only fed_exact_lora aggregates mixed ranks) or its own alpha."""
    found = []
    for site, overrides in spec.site_overrides.items():
        if "rank" in overrides and int(overrides["rank"]) != spec.rank and spec.algorithm != "fed_exact_lora":
            found.append(
                f"{site} trains rank {overrides['rank']}, the job {spec.rank}: {spec.algorithm}'s screening rejects "
                "its updates (only fed_exact_lora aggregates mixed ranks)"
            )
        if "alpha" in overrides and int(overrides["alpha"]) != spec.alpha:
            found.append(f"{site} trains alpha {overrides['alpha']}, the job {spec.alpha}: the server scales every site by the job's")
    return found


def _export(args) -> int:
    from fedmed_components.flare.recipe import export_job

    try:  # a bad --site fails here, before anything is written
        specs = [spec_from_args(args, name=n, **extra) for n, extra in COMMITTED_JOBS.items()] if args.all else [spec_from_args(args)]
    except ValueError as exc:
        print(f"fedmed job export: error: {exc}", file=sys.stderr)
        return 2
    for spec in specs:
        for warning in site_override_warnings(spec):
            print(f"fedmed job export: warning: {warning}", file=sys.stderr)
        try:
            folder = export_job(spec, Path(args.out))
        except ValueError as exc:  # a bad setting (sampling, server optimiser, ...): the components refuse it
            print(f"fedmed job export: error: {exc}", file=sys.stderr)
            return 2
        print(f"wrote {folder}")
    return 0


def _simulate(args) -> int:
    import os

    from fedmed_components.commands.results import print_tables_under
    from fedmed_components.flare.job import round_progress, run_simulator
    from fedmed_components.flare.job_check import check_job_folder

    check_job_folder(args.job_folder)  # a bad config fails here, not in the simulator's log
    if args.data:
        os.environ["FEDMED_DATA"] = str(Path(args.data).resolve())
    progress = round_progress(_num_rounds(Path(args.job_folder)), indent="  ")
    workspace = run_simulator(args.job_folder, args.workspace, args.sites.split(","), timeout=args.timeout, progress=progress)
    print(f"simulator finished; workspace {workspace}")
    print_tables_under(workspace)
    return 0


def _num_rounds(job_folder: Path) -> int | None:
    """The rounds the job's controller runs (for "round r/n" progress); None if unknown."""
    import inspect
    import json

    from fedmed_components.flare.controller import FedMedController

    for config in sorted(job_folder.glob("app*/config/config_fed_server.json")):
        for entry in json.loads(config.read_text()).get("workflows", []):
            if entry.get("path", "").endswith("FedMedController"):
                default = inspect.signature(FedMedController).parameters["num_rounds"].default
                return int(entry.get("args", {}).get("num_rounds", default))
    return None
