"""`fedmed demo`: the first federated run on the embedded synthetic corpus."""

from __future__ import annotations

from fedmed_components.settings import BUDGET


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run Fed-MedLoRA on 3 synthetic sites in the FLARE simulator and score before/after",
        description=(
            "Make a synthetic clinical corpus for 3 sites, score the untrained model, run "
            "Fed-MedLoRA in the FLARE simulator, then score the global adapter on held-out "
            "synthetic notes. --model tiny takes ~1-2 min on a 2-core CPU; the default "
            "SmolLM2-135M-Instruct ~10 min."
        ),
    )
    p.add_argument("--model", default=BUDGET.model, help=f"{BUDGET.model} (default) | tiny | HF id | folder")
    p.add_argument("--out", default="demo_output", help="output folder (data, job, simulator workspace, adapter)")
    p.add_argument("--algorithm", default="fed_medlora", choices=["fed_medlora", "fed_medlora_plus", "fedsa_lora", "fed_exact_lora"])
    p.add_argument("--rounds", type=int, default=None, help="federated rounds (default: per-model preset)")
    p.add_argument("--local-steps", type=int, default=None, help="local steps per round")
    p.add_argument("--lr", type=float, default=None, help="learning rate")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--timeout", type=float, default=None, help="simulator wall-clock limit, seconds (default 900)")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from fedmed_components.runs.demo import DemoConfig, run_demo

    cfg = DemoConfig.for_model(
        args.model,
        out=args.out,
        algorithm=args.algorithm,
        rounds=args.rounds,
        local_steps=args.local_steps,
        lr=args.lr,
        seed=args.seed,
        timeout=args.timeout,
    )
    run_demo(cfg)
    return 0
