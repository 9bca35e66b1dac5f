"""Time to quality: training minutes for centralised SmolLM2 on MTSamples to reach a
validation main-entity strict F1 (default 0.65), before and after the speed-ups.

- before: fp32 and the paper's prompts (the product before bf16 autocast and the
  compact prompt style);
- after: precision auto (bf16 autocast where the CPU has AVX512-BF16) and the compact
  prompts, the product's defaults;
- packed: after, with 2 consecutive sentences in each NER example (--ner-sentences 2:
  the fixed prompt paid once per 2 sentences; at 256 tokens, 9% of 2-sentence examples
  are cut, 49% of 4-sentence ones: bench_token_economy.py). Its notes are cut into runs
  of 2 sentences, so its validation gold also holds the few entities that cross a
  sentence boundary inside a run (the other arms drop them).

Everything else is the same for both arms, which run one after the other in this
process: the NER task (the main-entity figure), the MTSamples notes of both note types
pooled (20% of notes held out as test and never read here, 10% of the rest as the
fixed validation split, cut once with seed 0 by the experiment's own `prepare_site`),
batch 8, lr 1e-3, LoRA r16 / alpha 32, max length 256, one warm-up + cosine over
--max-steps. Every --every steps the adapter is scored on the validation sentences;
an arm stops at the first check that reaches --target. The figure is the training
seconds summed up to that check (validation scoring excluded: it is the same work in
both arms and not part of training), and the row is after / before (target <= 0.5x).
An arm that never reaches the target reports its best F1 and the row says so.

Each arm's rounds are saved under --work, so a cut run resumes (a finished arm is not
trained again). Needs ../shared/data (the real corpus); a quiet machine for the timing.

    python bench/bench_time_to_quality.py --json bench/results/time_to_quality.json --work /tmp/ttq
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARMS = {
    "before": {"precision": "fp32", "prompt_style": "paper"},
    "after": {"precision": "auto", "prompt_style": "compact"},
    "packed": {"precision": "auto", "prompt_style": "compact", "ner_sentences": 2},
}
FIGURE = "time to quality"


def reached(history: list[dict], target: float) -> dict | None:
    """The first round record whose validation main-entity strict F1 reaches `target`."""
    return next((h for h in history if (h.get("val_main_strict_f1") or 0) >= target), None)


def seconds_to(history: list[dict], target: float) -> float | None:
    """Training seconds summed up to (and including) the first round that reaches `target`."""
    hit = reached(history, target)
    if hit is None:
        return None
    return sum(h["seconds"] for h in history[: history.index(hit) + 1])


def run_arm(name: str, args, work: Path) -> dict:
    """Train one arm until the target or --max-steps; its rounds with validation F1."""
    from dataclasses import replace

    from fedmed_components.model.modeling import resolve_model
    from fedmed_components.model.precision import resolve_precision
    from fedmed_components.runs.experiment.config import ExperimentConfig
    from fedmed_components.runs.experiment.data import DataSource, Sampling, prepare_site
    from fedmed_components.runs.experiment.scoring import Scorer, pool_scores
    from fedmed_components.runs.experiment.training import train_locally

    cfg = ExperimentConfig(
        name=f"time_to_quality_{name}",
        model=args.model,
        quantize="none",
        rank=16,
        alpha=32,
        local_steps=args.every,
        batch_size=8,
        max_length=256,
        lr=1e-3,
        schedule="run",
        generation_batch_size=32,
        max_new_tokens=160,
        **ARMS[name],
    )
    size = ARMS[name].get("ner_sentences", 1)
    source, sampling = DataSource(name="mtsamples", path=args.data, mapping="kiwi"), Sampling(max_val_sentences=args.val_sentences)
    site = prepare_site(source, sampling, work / ("data" if size == 1 else f"data_{size}_sentences"), sentences_per_document=size)
    run_dir = work / name
    log = run_dir / "rounds.json"
    history = json.loads(log.read_text()) if log.exists() else []
    if reached(history, args.target):
        return {"arm": name, **ARMS[name], "rounds": history}
    scorer = Scorer(cfg, resolve_model(args.model), work)
    val_set = {site.name: replace(site, relations=set())}  # NER only: no modifier prompts

    def validate(record, state) -> bool:
        started = time.perf_counter()
        scores = scorer.score_sets(state, val_set, run_dir / "val_scores" / f"round_{record['round']:03d}", part="val")
        record["val_main_strict_f1"] = pool_scores(list(scores.values()))["main_entities"]["strict"]["f1"]
        record["val_seconds"] = round(time.perf_counter() - started, 1)
        print(f"  {name}: {record['examples']} examples, validation main-entity strict F1 {record['val_main_strict_f1']:.3f}", flush=True)
        return record["val_main_strict_f1"] >= args.target

    history = train_locally(
        cfg, [site.folder], run_dir, rounds=args.max_steps // args.every, steps=args.every, tasks=("ner",), after_round=validate
    )
    scorer.release()
    return {"arm": name, **ARMS[name], "resolved_precision": resolve_precision(cfg.precision, "cpu"), "rounds": history}


def table_row(arms: dict[str, dict], target: float, arm: str = "after") -> dict:
    """`arm` / before training time to the target; where an arm misses it, its best F1."""
    pair = {name: arms[name] for name in ("before", arm)}
    secs = {name: seconds_to(a["rounds"], target) for name, a in pair.items()}
    figure = f"{FIGURE}: training minutes to {target:.2f} validation main-entity strict F1, {arm} / before (centralised, MTSamples)"
    if None in secs.values():
        best = {name: max((h.get("val_main_strict_f1") or 0) for h in a["rounds"]) for name, a in pair.items()}
        missed = ", ".join(f"{n} best {best[n]:.3f}" for n, s in secs.items() if s is None)
        return {"figure": figure, "value": f"not reached ({missed})", "target": "<= 0.5x", "met": None}
    ratio = secs[arm] / secs["before"]
    return {
        "figure": figure,
        "value": f"{ratio:.2f}x ({secs[arm] / 60:.1f} vs {secs['before'] / 60:.1f} min)",
        "target": "<= 0.5x",
        "met": ratio <= 0.5,
    }


def equal_steps_row(work: Path, arms: dict[str, dict], arm: str, base: str) -> dict | None:
    """Validation main-entity strict F1, `arm` - `base`, at the last check both arms made
    (the same training steps: the F1 effect of the change at a fixed budget), paired over
    the validation notes with a bootstrap interval. None if either arm has no check."""
    from fedmed_components.task.bootstrap import aligned_counts, paired_difference

    common = min(len(arms[arm]["rounds"]), len(arms[base]["rounds"]))
    if common == 0:
        return None
    record = arms[base]["rounds"][common - 1]
    per_arm = {}
    for name in (arm, base):
        folder = work / name / "val_scores" / f"round_{record['round']:03d}"
        per_arm[name] = {f.stem: json.loads(f.read_text())["per_note"] for f in sorted(folder.glob("*.json"))}  # {site: per_note}
    counts_a, strata, notes = aligned_counts(per_arm[arm], "main_entities", "strict")
    counts_b, _, _ = aligned_counts(per_arm[base], "main_entities", "strict", notes)
    gap = paired_difference(counts_a, counts_b, strata)
    return {
        "figure": f"validation main-entity strict F1 at {record['round'] + 1} checks ({record['round'] + 1} x {record['steps']} steps), "
        f"{arm} - {base}, paired over {len(notes)} validation notes",
        "value": f"{gap.estimate:+.3f} [{gap.low:+.3f}, {gap.high:+.3f}]",
        "target": "report (F1 effect at a fixed budget)",
        "met": None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="model id or folder (default smollm2-135m)")
    parser.add_argument(
        "--data",
        default=str(ROOT.parent / "shared" / "data" / "mtsamples_kiwi" / "train"),
        help="MTSamples (Kiwi) BRAT folder, or a JSONL file of notes",
    )
    parser.add_argument("--target", type=float, default=0.65, help="validation main-entity strict F1 to reach (default 0.65)")
    parser.add_argument("--every", type=int, default=40, help="training steps between validation checks (default 40)")
    parser.add_argument("--max-steps", type=int, default=480, help="an arm's step budget (its cosine schedule's length; default 480)")
    parser.add_argument(
        "--val-sentences",
        type=int,
        default=None,
        help="a sample of the validation sentences scored at each check (default: every sentence of the validation "
        "notes, the same for every arm; a sample draws sentences or runs of them, so it differs between arms)",
    )
    parser.add_argument("--arms", default=",".join(ARMS), help=f"which arms to run, in order (default {','.join(ARMS)})")
    parser.add_argument(
        "--work", required=True, help="folder for the data cut, adapters and scores (note text: keep it outside the repository)"
    )
    parser.add_argument("--json", default=None, help="write {'rows': [...], 'arms': {...}} here (rows: bench/report.py format)")
    args = parser.parse_args()
    if not Path(args.data).exists():
        print(f"error: {args.data}: no such corpus (the MTSamples corpus is in ../shared/data)", file=sys.stderr)
        return 2
    unknown = sorted(set(args.arms.split(",")) - set(ARMS))
    if unknown:
        print(f"error: --arms: unknown {unknown}; choose from {list(ARMS)}", file=sys.stderr)
        return 2
    work = Path(args.work).resolve()
    from fedmed_components.data.document import InputError

    try:
        arms = {name: run_arm(name, args, work) for name in args.arms.split(",")}
    except InputError as exc:  # e.g. a --work cut from another corpus path: one line, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = {"target": args.target, "every": args.every, "max_steps": args.max_steps, "arms": arms}
    out["rows"] = [table_row(arms, args.target, arm) for arm in ("after", "packed") if "before" in arms and arm in arms]
    for arm, base in (("after", "before"), ("packed", "after")):
        if arm in arms and base in arms and (row := equal_steps_row(work, arms, arm, base)):
            out["rows"].append(row)
    for row in out["rows"]:
        print(json.dumps(row, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
