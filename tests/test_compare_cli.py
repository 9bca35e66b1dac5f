"""`fedmed compare A.json B.json`: two experiment runs paired over the same test notes."""

import json

import pytest

from fedmed_components.cli import main


def _run(tmp_path, name: str, tp_per_note: list[int], *, external_tp: int = 5, notes=None) -> str:
    """A run JSON whose every figure comes from per-note counts (10 gold a note, no false positives)."""
    notes = notes or [f"n{i}" for i in range(len(tp_per_note))]
    counts = lambda tp: {"strict": [tp, 0, 10 - tp], "lenient": [tp, 0, 10 - tp]}  # noqa: E731
    per_note = {n: {"main_entities": counts(tp), "relations": counts(tp // 2)} for n, tp in zip(notes, tp_per_note)}
    f1 = lambda tps: {m: {"f1": 2 * sum(tps) / (sum(tps) + 10 * len(tps))} for m in ("strict", "lenient")}  # noqa: E731
    pooled = {"main_entities": f1(tp_per_note), "relations": f1([tp // 2 for tp in tp_per_note])}
    external = {"main_entities": f1([external_tp]), "per_note": {"e0": {"main_entities": counts(external_tp)}}}
    run = {"run": name, "scores": {"sites": {"a": {"per_note": per_note}}, "pooled": pooled, "external": external}}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(run))
    return str(path)


def test_compare_prints_paired_differences_of_every_figure_both_runs_scored(tmp_path, capsys):
    a = _run(tmp_path, "a", [9] * 10, external_tp=6)
    b = _run(tmp_path, "b", [8] * 10, external_tp=5)
    assert main(["compare", a, b, "--json"]) == 0
    rows = {r["figure"]: r for r in json.loads(capsys.readouterr().out)}
    assert list(rows) == [
        "main-entity strict F1",
        "main-entity lenient F1",
        "modifier strict F1",
        "modifier lenient F1",
        "external main-entity strict F1",
    ]
    main_strict = rows["main-entity strict F1"]
    assert main_strict["difference"]["estimate"] == pytest.approx(2 * 90 / 190 - 2 * 80 / 180)
    # every note moved the same way: the interval is the point (no note disagrees)
    assert main_strict["difference"]["low"] == pytest.approx(main_strict["difference"]["estimate"])
    assert rows["external main-entity strict F1"]["difference"]["estimate"] == pytest.approx(12 / 16 - 10 / 15)
    assert main(["compare", a, b]) == 0
    assert "main-entity strict F1" in capsys.readouterr().out


def test_compare_pairs_the_calibrated_modifiers_when_both_runs_have_them(tmp_path, capsys):
    a = _run(tmp_path, "a", [9] * 10)
    b = _run(tmp_path, "b", [8] * 10)
    calibrated = {}
    for path, tp in ((a, 8), (b, 4)):  # each run's modifiers at its own chosen bias: tp links of 10 a note
        run = json.loads(open(path).read())
        again = json.loads(open(_run(tmp_path, "again", [2 * tp] * 10)).read())
        run["calibrated_modifiers"] = {"chosen_bias": 1.0, "scores": again["scores"]}
        calibrated[path] = run
        open(path, "w").write(json.dumps(run))
    assert main(["compare", a, b, "--json"]) == 0
    rows = {r["figure"]: r for r in json.loads(capsys.readouterr().out)}
    row = rows["modifier strict F1, none bias chosen on validation"]
    assert (row["a"], row["b"]) == (pytest.approx(2 * 80 / 180), pytest.approx(2 * 40 / 140))
    assert row["difference"]["estimate"] == pytest.approx(2 * 80 / 180 - 2 * 40 / 140)
    assert rows["modifier strict F1"]["a"] == pytest.approx(2 * 40 / 140)  # the plain figure is still there
    # one run without them: no calibrated row
    run = calibrated[b]
    del run["calibrated_modifiers"]
    open(b, "w").write(json.dumps(run))
    assert main(["compare", a, b, "--json"]) == 0
    assert not any("none bias" in r["figure"] for r in json.loads(capsys.readouterr().out))


def test_compare_refuses_runs_on_other_notes_or_files_that_are_not_runs(tmp_path, capsys):
    a = _run(tmp_path, "a", [9] * 4)
    other = _run(tmp_path, "other", [9] * 4, notes=["m0", "m1", "m2", "m3"])
    assert main(["compare", a, other]) == 2
    assert "not scored on the same test notes" in capsys.readouterr().err
    junk = tmp_path / "junk.json"
    junk.write_text('{"rows": []}')
    assert main(["compare", a, str(junk)]) == 2
    assert "not a scored experiment run" in capsys.readouterr().err
