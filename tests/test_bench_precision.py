"""bench/bench_precision.py --f1-runs: the F1 cost of bf16 training from two experiment runs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import bench_precision  # noqa: E402


def _run(precision: str, tp_per_note: list[int]) -> dict:
    """An experiment run JSON whose pooled main-entity strict F1 comes from per-note counts
    (10 gold entities a note, no false positives)."""
    per_note = {
        f"n{i}": {"main_entities": {"strict": [tp, 0, 10 - tp]}, "relations": {"strict": [1, 0, 1]}} for i, tp in enumerate(tp_per_note)
    }
    tp, gold = sum(tp_per_note), 10 * len(tp_per_note)
    pooled = {"main_entities": {"strict": {"f1": 2 * tp / (tp + gold)}}}
    return {
        "run": "fed_medlora_plus",
        "resolved_precision": precision,
        "scores": {"sites": {"a": {"per_note": per_note}}, "pooled": pooled},
    }


def test_f1_cost_is_the_paired_difference_in_points_and_read_against_half_a_point():
    fp32 = _run("fp32", [8] * 20)
    row = bench_precision.f1_cost_row(fp32, _run("bf16", [8] * 19 + [6]))  # bf16 loses 2 of 160 true positives
    lost = 100 * (2 * 160 / (160 + 200) - 2 * 158 / (158 + 200))  # F1 = 2tp / (tp + gold) with no false positives
    assert row["value"].startswith(f"{lost:+.1f} [") and row["met"] is False
    same = bench_precision.f1_cost_row(fp32, _run("bf16", [8] * 20))
    assert same["value"].startswith("+0.0 [+0.0, +0.0] points") and same["met"] is True
    with pytest.raises(ValueError, match="made in bf16 and bf16"):
        bench_precision.f1_cost_row(_run("bf16", [8] * 20), _run("bf16", [8] * 20))
    # a run made before the precision was recorded counts as fp32 only when the caller says why
    old = {**_run(None, [8] * 20), "config": {"precision": "auto"}}
    with pytest.raises(ValueError, match="made in None and bf16"):
        bench_precision.f1_cost_row(old, _run("bf16", [8] * 20))
    said = bench_precision.f1_cost_row(old, _run("bf16", [8] * 20), fp32_unrecorded="auto on an AVX2-only CPU")
    assert said["met"] is True and "precision unrecorded: auto on an AVX2-only CPU" in said["figure"]
    with pytest.raises(ValueError, match="made in None and bf16"):  # an explicit bf16 config is never taken for fp32
        bench_precision.f1_cost_row({**old, "config": {"precision": "bf16"}}, _run("bf16", [8] * 20), fp32_unrecorded="why")


def test_f1_runs_adds_its_row_to_the_json_and_keeps_the_timing_rows(tmp_path):
    out = tmp_path / "precision.json"
    out.write_text(
        json.dumps({"rows": [{"figure": "site trainer tokens/s bf16 / fp32", "value": "1.5x", "target": ">= 1.5x", "met": True}]})
    )
    runs = []
    for precision in ("fp32", "bf16"):
        runs.append(tmp_path / f"{precision}.json")
        runs[-1].write_text(json.dumps(_run(precision, [8] * 10)))
    for _ in range(2):  # run twice: the row is replaced, not repeated
        subprocess.run(
            [sys.executable, str(ROOT / "bench" / "bench_precision.py"), "--json", str(out), "--f1-runs", *map(str, runs)],
            check=True,
            capture_output=True,
        )
    figures = [row["figure"] for row in json.loads(out.read_text())["rows"]]
    assert figures[0] == "site trainer tokens/s bf16 / fp32" and len(figures) == 2 and figures[1].startswith(bench_precision.F1_COST_FIGURE)
