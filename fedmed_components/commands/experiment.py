"""`fedmed experiment CONFIG`: the paper's evaluation, from a YAML config to a results folder."""

from __future__ import annotations


def register(subparsers) -> None:
    from fedmed_components.runs.experiment.config import RUN_KINDS

    p = subparsers.add_parser(
        "experiment",
        help="run a named evaluation experiment (baselines, federated algorithms, new site) end to end",
        description=(
            "Run the experiment a YAML config describes (sites and their data, model, rounds, "
            f"local steps, runs: {', '.join(RUN_KINDS)}). Writes one "
            "JSON per run, summary.md and PNG plots into --out. Re-running skips finished runs "
            "(their JSON exists) and resumes an interrupted one from its last saved round."
        ),
        epilog="example: fedmed experiment experiments/mini.yaml --out /tmp/mini --only zero_shot,fed_medlora",
    )
    p.add_argument("config", help="experiment config (YAML), e.g. experiments/default.yaml")
    p.add_argument("--out", default=None, help="results folder (default: experiment_results/<name>)")
    p.add_argument(
        "--work",
        default=None,
        help="work folder for site data, adapters, predictions and simulator "
        "workspaces; holds note text, keep it out of the repository (default: <out>/work)",
    )
    p.add_argument("--only", default=None, help="comma-separated run ids to make (e.g. zero_shot,single_maccrobat)")
    p.add_argument("--report-only", action="store_true", help="rebuild summary.md and the plots from the run JSON")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from pathlib import Path

    from fedmed_components.runs.experiment import load_config, read_results, run_experiment, write_report

    cfg = load_config(args.config)
    out = Path(args.out or Path("experiment_results") / cfg.name)
    if args.report_only:
        write_report(cfg, read_results(out, cfg.run_ids()), out)
        print(f"report rebuilt in {out}")
        return 0
    only = [r.strip() for r in args.only.split(",") if r.strip()] if args.only else None
    run_experiment(cfg, out, work=args.work, only=only)
    return 0
