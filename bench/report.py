"""Print the benchmark suite's one table from bench/results/*.json.

Result file format (every benchmark writes one JSON object; anything else in it is
free-form detail, ignored here)::

    {
      "rows": [
        {"figure": "communication: bytes sent per site per round vs raw adapter tensors",
         "value": "1.004x (19.6 MB vs 19.5 MB)",   # what was measured, as text
         "target": "<= 1.02x",                      # the goal it is read against
         "met": true},                              # true | false | null (no target)
        ...
      ]
    }

``value`` and ``target`` are display strings the benchmark formats itself; ``met`` is
its own verdict, computed from the measured numbers. Files without such rows (e.g. a
GPU run's raw output) are listed as skipped, never guessed at.

Usage: ``python bench/report.py [--results bench/results] [--out table.md] [FILE ...]``;
``bench/run`` also calls ``--suite-times FILE`` (lines "NAME SECONDS" it timed) to
record the suite's own wall time as a row (``suite.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

COLUMNS = ("figure", "measured", "target", "met")
SUITE_LIMIT_S = 20 * 60  # the CPU suite's goal on a 2-core machine


def suite_rows(times: list[tuple[str, float]], cpus: int | None, load: tuple[float, float, float] | None) -> list[dict]:
    """The suite's wall time (sum of the timed steps) against its 20-minute goal."""
    total = sum(seconds for _, seconds in times)
    steps = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in times)
    where = f"{cpus} CPUs" + (f", load average {load[0]:.1f} at the end" if load else "")
    return [
        {
            "figure": f"suite: bench/run wall time ({where})",
            "value": f"{total / 60:.1f} min ({steps})",
            "target": f"< {SUITE_LIMIT_S // 60} min on 2 cores",
            "met": total < SUITE_LIMIT_S,
        }
    ]


def read_times(path: Path) -> list[tuple[str, float]]:
    times = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                name, seconds = line.rsplit(maxsplit=1)
                times.append((name, float(seconds)))
            except ValueError:
                raise SystemExit(f"{path}:{number}: expected 'NAME SECONDS', got {line!r}") from None
    return times


def load_rows(files: list[Path]) -> tuple[list[dict], list[str]]:
    rows, skipped = [], []
    for file in files:
        try:
            data = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            skipped.append(f"{file.name} (unreadable: {exc})")
            continue
        entries = data.get("rows") if isinstance(data, dict) else None
        good = [r for r in entries or [] if isinstance(r, dict) and {"figure", "value", "target", "met"} <= set(r)]
        if not good:
            skipped.append(f"{file.name} (no table rows)")
        rows += [{**r, "source": file.name} for r in good]
    return rows, skipped


def verdict(met) -> str:
    return {True: "yes", False: "**no**", None: "—"}.get(met, str(met))


def markdown_table(rows: list[dict]) -> str:
    def cell(text) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append(f"| {cell(r['figure'])} | {cell(r['value'])} | {cell(r['target'])} | {verdict(r['met'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See the module docstring for the JSON row format.")
    parser.add_argument("files", nargs="*", type=Path, help="result files (default: every *.json in --results)")
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "results", help="folder of result JSON files")
    parser.add_argument("--out", type=Path, help="also write the table (Markdown) here")
    parser.add_argument(
        "--suite-times", type=Path, help="bench/run's timings ('NAME SECONDS' lines): written to <results>/suite.json first"
    )
    args = parser.parse_args(argv)
    if args.suite_times:
        import os

        rows = suite_rows(read_times(args.suite_times), os.cpu_count(), os.getloadavg())
        (args.results / "suite.json").write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    files = args.files or sorted(args.results.glob("*.json"))
    if not files:
        print(f"no result files in {args.results}", file=sys.stderr)
        return 1
    rows, skipped = load_rows(files)
    table = markdown_table(rows)
    print(table)
    if skipped:
        print("\nskipped: " + "; ".join(skipped))
    if args.out:
        args.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
