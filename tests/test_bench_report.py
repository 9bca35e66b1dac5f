"""bench/report.py: result files in, one Markdown table out."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import report  # noqa: E402


def _write(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_rows_from_every_file_become_one_table_and_files_without_rows_are_named(tmp_path):
    a = _write(
        tmp_path / "a.json", {"rows": [{"figure": "bytes | ratio", "value": "1.01x", "target": "<= 1.02x", "met": True}], "extra": 1}
    )
    b = _write(
        tmp_path / "b.json",
        {
            "rows": [
                {"figure": "overhead", "value": "2.5 s", "target": "<= 2 s", "met": False},
                {"figure": "start-up", "value": "17 s", "target": "report", "met": None},
            ]
        },
    )
    gpu = _write(tmp_path / "gpu.json", {"peak_gib": 14.1})
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    rows, skipped = report.load_rows([a, b, gpu, broken])
    assert [r["figure"] for r in rows] == ["bytes | ratio", "overhead", "start-up"]
    assert [s.split()[0] for s in skipped] == ["gpu.json", "broken.json"]
    lines = report.markdown_table(rows).splitlines()
    assert lines[0] == "| figure | measured | target | met |"
    assert lines[2] == "| bytes \\| ratio | 1.01x | <= 1.02x | yes |"  # a pipe in a cell cannot split the row
    assert lines[3].endswith("| **no** |") and lines[4].endswith("| — |")


def test_main_prints_the_table_and_writes_it(tmp_path, capsys):
    _write(tmp_path / "x.json", {"rows": [{"figure": "f", "value": "v", "target": "t", "met": True}]})
    out = tmp_path / "table.md"
    assert report.main(["--results", str(tmp_path), "--out", str(out)]) == 0
    assert "| f | v | t | yes |" in capsys.readouterr().out
    assert out.read_text().startswith("| figure |")
    assert report.main(["--results", str(tmp_path / "empty")]) == 1


def test_suite_times_become_a_row_against_the_20_minute_goal(tmp_path, capsys):
    times = tmp_path / "times"
    times.write_text("aggregation 100\nscaling 250\n")
    assert report.main(["--results", str(tmp_path), "--suite-times", str(times)]) == 0
    (row,) = json.loads((tmp_path / "suite.json").read_text())["rows"]
    assert row["value"].startswith("5.8 min (aggregation 100 s, scaling 250 s)") and row["met"] is True
    assert "suite: bench/run wall time" in capsys.readouterr().out
    assert report.suite_rows([("x", 1300.0)], 2, None)[0]["met"] is False
    times.write_text("aggregation\n")
    with pytest.raises(SystemExit, match=r"times:1: expected 'NAME SECONDS'"):
        report.read_times(times)
