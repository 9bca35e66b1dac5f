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
    export.add_argument("--model", default=d.model, help="tiny | smollm2-135m | minilm | HF id | folder (same name at every site)")
    export.add_argument(
        "--task-model",
        default=d.task_model,
        choices=["causal-lm", "token-classification"],
        help="causal-lm: generative IE (the paper); token-classification: the BERT BIO baseline (fed_bert)",
    )
    export.add_argument("--sites", default=",".join(d.sites), help="comma-separated site names (simulator)")
    export.add_argument("--rounds", type=int, default=d.num_rounds)
    export.add_argument("--min-clients", type=int, default=d.min_clients)
    export.add_argument("--local-steps", type=int, default=d.local_steps, help="local steps per round (0: use --local-epochs)")
    export.add_argument("--local-epochs", type=float, default=d.local_epochs)
    export.add_argument("--batch-size", type=int, default=d.batch_size)
    export.add_argument("--max-length", type=int, default=d.max_length)
    export.add_argument("--lr", type=float, default=d.learning_rate)
    export.add_argument("--rank", type=int, default=d.rank)
    export.add_argument("--alpha", type=int, default=d.alpha)
    export.add_argument("--data", default=d.data, help="site data root (default: each site's $FEDMED_DATA)")
    export.add_argument("--quantize", default=d.quantize, choices=["auto", "4bit", "8bit", "none"])
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
        local_steps=args.local_steps or None,
        local_epochs=args.local_epochs,
        batch_size=args.batch_size,
        max_length=args.max_length,
        learning_rate=args.lr,
        rank=args.rank,
        alpha=args.alpha,
        data=args.data,
        quantize=args.quantize,
        train_timeout=args.train_timeout,
        output_dir=args.output_dir,
        extra_site_args=args.site_args,
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
    )
    values.update(overrides)
    return JobSpec(**values)


def _export(args) -> int:
    from fedmed_components.flare.job import export_job

    specs = [spec_from_args(args, name=name, **extra) for name, extra in COMMITTED_JOBS.items()] if args.all else [spec_from_args(args)]
    for spec in specs:
        try:
            folder = export_job(spec, Path(args.out))
        except ValueError as exc:  # a bad setting (sampling, server optimiser, ...): the components refuse it
            print(f"fedmed job export: error: {exc}", file=sys.stderr)
            return 2
        print(f"wrote {folder}")
    return 0


def _simulate(args) -> int:
    import os

    from fedmed_components.flare.job import run_simulator
    from fedmed_components.flare.job_check import check_job_folder

    check_job_folder(args.job_folder)  # a bad config fails here, not in the simulator's log
    if args.data:
        os.environ["FEDMED_DATA"] = str(Path(args.data).resolve())
    workspace = run_simulator(args.job_folder, args.workspace, args.sites.split(","), timeout=args.timeout)
    print(f"simulator finished; workspace {workspace}")
    return 0
