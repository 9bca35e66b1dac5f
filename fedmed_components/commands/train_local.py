"""`fedmed train-local`: the single-site and centralised baselines, same trainer as the sites."""

from __future__ import annotations

import json
from pathlib import Path


def register(subparsers) -> None:
    from fedmed_components.model.site import add_site_arguments

    p = subparsers.add_parser(
        "train-local",
        help="train one adapter without federation (single-site or centralised baseline)",
        description=(
            "Train a LoRA adapter with the same trainer the sites use. One --data folder is "
            "the single-site baseline; several (comma-separated) are pooled: the centralised "
            "baseline. Writes a PEFT adapter folder and train_log.json."
        ),
    )
    add_site_arguments(p)
    p.add_argument("--rounds", type=int, default=1, help="repeat the local schedule this many times (match a federated run's budget)")
    p.add_argument("--out", required=True, help="output PEFT adapter folder")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from fedmed_components.model.modeling import save_adapter_folder
    from fedmed_components.model.site import SiteRuntime, site_config_from_args

    folders = [f for f in args.data.split(",") if f]
    if not folders:
        raise SystemExit("fedmed train-local: --data is required")
    runtime = SiteRuntime(site_config_from_args(args), site_name="local")
    runtime.load_data(*folders)
    log = []
    for rnd in range(args.rounds):
        _, stats = runtime.train(None, progress=True)
        val_loss, _ = runtime.validation_loss()
        log.append(
            {
                "round": rnd,
                "steps": stats.steps,
                "train_loss": stats.train_loss,
                "val_loss": val_loss,
                "num_supervised_tokens": stats.num_supervised_tokens,
                "tokens_per_s": round(stats.tokens_per_second, 1),
            }
        )
        print(f"round {rnd}: {stats.steps} steps, train loss {stats.train_loss:.4f}, val loss {val_loss:.4f}")
    out = save_adapter_folder(
        runtime.adapter_state(),
        runtime.config.lora,
        runtime.model_path,
        args.out,
        extra_meta={"baseline": "local", "data": folders, "prompt_style": args.prompt_style, "ner_sentences": args.ner_sentences},
    )
    (Path(out) / "train_log.json").write_text(json.dumps(log, indent=2))
    print(f"adapter: {out}")
    return 0
