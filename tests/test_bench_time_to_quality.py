"""bench/bench_time_to_quality.py: training minutes to a validation F1, after / before."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import bench_time_to_quality as ttq  # noqa: E402


def _rounds(f1s: list[float], seconds: float) -> list[dict]:
    return [{"round": i, "seconds": seconds, "val_main_strict_f1": f} for i, f in enumerate(f1s)]


def test_time_to_quality_sums_training_seconds_up_to_the_first_check_that_reaches_the_target():
    before = _rounds([0.3, 0.6, 0.66, 0.7], 100.0)
    after = _rounds([0.5, 0.65], 40.0)
    assert ttq.seconds_to(before, 0.65) == 300.0 and ttq.seconds_to(after, 0.65) == 80.0
    row = ttq.table_row({"before": {"rounds": before}, "after": {"rounds": after}}, 0.65)
    assert row["value"] == "0.27x (1.3 vs 5.0 min)" and row["met"] is True
    slow = ttq.table_row({"before": {"rounds": before}, "after": {"rounds": _rounds([0.2, 0.3, 0.66], 80.0)}}, 0.65)
    assert slow["value"].startswith("0.80x") and slow["met"] is False
    missed = ttq.table_row({"before": {"rounds": before}, "after": {"rounds": _rounds([0.5, 0.61], 40.0)}}, 0.65)
    assert missed["value"] == "not reached (after best 0.610)" and missed["met"] is None
    packed = ttq.table_row(
        {"before": {"rounds": before}, "after": {"rounds": after}, "packed": {"rounds": _rounds([0.7], 30.0)}}, 0.65, "packed"
    )
    assert packed["value"] == "0.10x (0.5 vs 5.0 min)" and "packed / before" in packed["figure"]


@pytest.mark.slow
def test_each_arm_trains_until_its_validation_check_reaches_the_target(tmp_path):
    """Tiny model on synthetic notes: a target of 0 is reached at the first check, so each
    arm stops after one round of --every steps instead of its --max-steps."""
    from fedmed_components.data.document import write_jsonl
    from fedmed_components.data.synth import generate_site_corpus

    data = tmp_path / "notes"
    write_jsonl(generate_site_corpus("a", 12, 0, "general_medicine"), data / "notes.jsonl")
    out = tmp_path / "ttq.json"
    command = [sys.executable, str(ROOT / "bench" / "bench_time_to_quality.py"), "--model", "tiny", "--data", str(data / "notes.jsonl")]
    command += [
        "--target",
        "0",
        "--every",
        "2",
        "--max-steps",
        "6",
        "--val-sentences",
        "4",
        "--work",
        str(tmp_path / "work"),
        "--json",
        str(out),
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    for name, arm in result["arms"].items():
        assert len(arm["rounds"]) == 1 and arm["rounds"][0]["steps"] == 2 and "val_main_strict_f1" in arm["rounds"][0], name
    assert result["arms"]["before"]["prompt_style"] == "paper" and result["arms"]["after"]["prompt_style"] == "compact"
    assert result["arms"]["packed"]["ner_sentences"] == 2
    timed = [row for row in result["rows"] if row["figure"].startswith(ttq.FIGURE)]
    assert [row["figure"].split(", ")[1].split(" (")[0] for row in timed] == ["after / before", "packed / before"]
    assert all(row["value"].endswith("min)") for row in timed)
    fixed = [row["figure"].split(", ")[1] for row in result["rows"] if row not in timed]
    assert fixed == ["after - before", "packed - after"]  # the F1 effect at equal steps, paired
    with pytest.raises(subprocess.CalledProcessError):  # no corpus there: a clear error, exit 2
        subprocess.run([*command[:4], str(tmp_path / "missing"), *command[5:]], check=True, capture_output=True, timeout=120)


def test_equal_steps_row_pairs_the_two_arms_validation_notes_at_their_last_common_check(tmp_path):
    def scores(arm: str, rnd: int, counts: dict[str, list[int]]):
        folder = tmp_path / arm / "val_scores" / f"round_{rnd:03d}"
        folder.mkdir(parents=True)
        per_note = {note: {"main_entities": {"strict": c}} for note, c in counts.items()}
        (folder / "mtsamples.json").write_text(json.dumps({"per_note": per_note}))

    # after stopped at its 2nd check, packed made 3: compared at the 2nd (40 x 2 steps)
    scores("after", 1, {"n1": [8, 2, 2], "n2": [6, 2, 4], "n3": [5, 5, 5]})
    scores("packed", 1, {"n1": [9, 1, 1], "n2": [7, 1, 3], "n3": [6, 4, 4]})
    arms = {"after": {"rounds": _rounds([0.5, 0.6], 10.0)}, "packed": {"rounds": _rounds([0.5, 0.6, 0.7], 10.0)}}
    for arm in arms.values():
        for r in arm["rounds"]:
            r["steps"] = 40
    row = ttq.equal_steps_row(tmp_path, arms, "packed", "after")
    f1 = lambda tp, fp, fn: 2 * tp / (2 * tp + fp + fn)  # noqa: E731
    expected = f1(22, 6, 8) - f1(19, 9, 11)
    assert row["value"].startswith(f"{expected:+.3f} [") and "2 checks (2 x 40 steps), packed - after" in row["figure"]
    low, high = (float(x) for x in row["value"].split("[")[1].rstrip("]").split(", "))
    assert low <= expected <= high and low > 0  # packed wins on every note: the interval excludes 0
    assert ttq.equal_steps_row(tmp_path, {"after": {"rounds": []}, "packed": arms["packed"]}, "packed", "after") is None
