"""`fedmed compare A.json B.json`: two experiment runs, paired over the same test notes.

An experiment's summary.md pairs the runs of one results folder; a run made with one
setting changed (another precision, batch or schedule) lives in a folder of its own.
This pairs any two run JSONs scored on the same test notes: F1(a) - F1(b) with a 95%
bootstrap interval (notes resampled within each site), pooled over the sites and on the
external cohort, for main entities and modifiers, strict and lenient; and, where both
runs were scored with `modifier_none_biases`, their modifiers at the none bias each chose
on validation.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedmed_components.data.document import InputError

ROWS = (  # (label, group, mode, where)
    ("main-entity strict F1", "main_entities", "strict", "pooled"),
    ("main-entity lenient F1", "main_entities", "lenient", "pooled"),
    ("modifier strict F1", "relations", "strict", "pooled"),
    ("modifier lenient F1", "relations", "lenient", "pooled"),
    ("external main-entity strict F1", "main_entities", "strict", "external"),
)
CALIBRATED_ROWS = (  # each run at its own none bias, chosen on validation (`calibrated_modifiers`)
    ("modifier strict F1, none bias chosen on validation", "relations", "strict", "pooled"),
    ("modifier lenient F1, none bias chosen on validation", "relations", "lenient", "pooled"),
)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "compare",
        help="pair two experiment runs over the same test notes (F1 differences with 95%% intervals)",
        description=(
            "Paired bootstrap differences F1(A) - F1(B) between two run JSONs of `fedmed experiment` "
            "(e.g. from two results folders whose configs differ in one setting), over the test notes both scored."
        ),
        epilog="example: fedmed compare bench/results/experiment_precision_bf16/fed_medlora_plus.json "
        "bench/results/experiment_default/fed_medlora_plus.json",
    )
    p.add_argument("a", metavar="A.json", help="run A (the change)")
    p.add_argument("b", metavar="B.json", help="run B (the reference)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(func=_run)


def read_run(path: str | Path) -> dict:
    path = Path(path)
    try:
        run = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(path, None, f"not a run JSON: {exc}") from None
    if not isinstance(run, dict) or not isinstance((run.get("scores") or {}).get("sites"), dict):
        raise InputError(path, None, "not a scored experiment run (no scores.sites): a run of `fedmed experiment` is wanted")
    return run


def compare_runs(a: dict, b: dict) -> list[dict]:
    """One row per figure both runs scored: {figure, a, b, difference: {estimate, low, high}}."""
    from fedmed_components.runs.experiment.comparisons import paired
    from fedmed_components.runs.experiment.tables import f1

    pairs = [(ROWS, a, b)]
    if a.get("calibrated_modifiers") and b.get("calibrated_modifiers"):
        pairs.append((CALIBRATED_ROWS, a["calibrated_modifiers"], b["calibrated_modifiers"]))
    rows = []
    for figures, run_a, run_b in pairs:
        for label, group, mode, where in figures:
            score_a, score_b = (r["scores"].get(where) for r in (run_a, run_b))
            if f1(score_a, group, mode) is None or f1(score_b, group, mode) is None:
                continue
            gap = paired(run_a, run_b, group, mode, where)
            rows.append({"figure": label, "a": f1(score_a, group, mode), "b": f1(score_b, group, mode), "difference": gap.as_dict()})
    return rows


def _run(args) -> int:
    a, b = read_run(args.a), read_run(args.b)
    if sorted(a["scores"]["sites"]) != sorted(b["scores"]["sites"]):
        raise InputError(
            args.b, None, f"scored other sites ({sorted(b['scores']['sites'])}) than {args.a} ({sorted(a['scores']['sites'])})"
        )
    try:
        rows = compare_runs(a, b)
    except ValueError as exc:  # a note one run scored and the other did not
        raise InputError(args.b, None, f"not scored on the same test notes as {args.a}: {exc}") from None
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(
        f"A: {args.a} ({a.get('run')}, {a.get('resolved_precision', '?')})\nB: {args.b} ({b.get('run')}, {b.get('resolved_precision', '?')})"
    )
    width = max([len("figure"), *(len(row["figure"]) for row in rows)])
    print(f"{'figure':<{width}} {'A':>6} {'B':>6}  A - B [95% CI]")
    for row in rows:
        d = row["difference"]
        print(f"{row['figure']:<{width}} {row['a']:>6.3f} {row['b']:>6.3f}  {d['estimate']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]")
    return 0
