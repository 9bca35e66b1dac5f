"""`fedmed results PATH`: the cross-site evaluation table of a finished FLARE job.

At the end of a job every site scores the final global adapter on its own test notes and
the server writes `cross_site_eval.json` beside the `global/` adapter
(docs/cross_site_evaluation.md). PATH is that file, the adapter output folder, or any
folder above it (a simulator workspace, a downloaded job): every table under it is shown.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedmed_components.data.document import InputError
from fedmed_components.flare.wire import CROSS_SITE_EVAL_FILE


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "results",
        help="print the cross-site evaluation table of a finished job (each site scoring the final global adapter)",
        description=(
            "Print the table the server wrote at the end of a job: per site, the split scored (test, or val when the "
            f"site has no test.jsonl), its notes, and n2c2 strict/lenient F1 of entities and modifiers. PATH: a "
            f"{CROSS_SITE_EVAL_FILE}, the adapter output folder, or a folder above it (a simulator workspace)."
        ),
        epilog="example: fedmed results /tmp/fedmed_ws",
    )
    p.add_argument("path", metavar="PATH", help=f"{CROSS_SITE_EVAL_FILE} or a folder holding one (searched recursively)")
    p.add_argument("--json", action="store_true", help="print the table(s) as JSON instead")
    p.set_defaults(func=run_results)


def find_tables(path: str | Path) -> list[Path]:
    """The table files at PATH: the file itself, or every one under the folder (sorted)."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, None, "no such file or folder")
    if path.is_file():
        return [path]
    direct = path / CROSS_SITE_EVAL_FILE
    found = [direct] if direct.is_file() else sorted(p for p in path.rglob(CROSS_SITE_EVAL_FILE) if p.is_file())
    if not found:
        raise InputError(path, None, f"no {CROSS_SITE_EVAL_FILE} here or below (did the job finish its rounds with cross_site_eval on?)")
    return found


def read_table(path: Path) -> dict:
    try:
        table = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(path, None, f"not a cross-site evaluation table: {exc}") from None
    if not isinstance(table, dict) or not isinstance(table.get("sites"), dict):
        raise InputError(path, None, "not a cross-site evaluation table: no 'sites' object")
    return table


def _f1(entry: dict, group: str, mode: str) -> str:
    scores = entry.get(group) or {}
    value = (scores.get(mode) or {}).get("f1")
    return f"{value:.3f}" if isinstance(value, (int, float)) else "-"


def format_table(table: dict) -> str:
    """The table as text: one row per site (split, notes, entity and modifier F1, strict
    and lenient), then the sites without scores and why."""
    head = f"{'site':20s} {'split':5s} {'docs':>5s}   {'entities strict':>15s} {'lenient':>7s}   {'modifiers strict':>16s} {'lenient':>7s}"
    adapter = table.get("adapter") or "-"
    lines = [f"cross-site evaluation of round {table.get('round', '-')}'s global adapter ({adapter})", "", head]
    for site, entry in sorted(table["sites"].items()):
        lines.append(
            f"{site:20s} {str(entry.get('split', '-')):5s} {entry.get('num_docs', 0):5d}   "
            f"{_f1(entry, 'entities', 'strict'):>15s} {_f1(entry, 'entities', 'lenient'):>7s}   "
            f"{_f1(entry, 'modifiers', 'strict'):>16s} {_f1(entry, 'modifiers', 'lenient'):>7s}"
        )
    if not table["sites"]:
        lines.append("(no site scored the adapter)")
    missing = table.get("missing") or {}
    if isinstance(missing, list):  # a bare list of names
        missing = {site: "" for site in missing}
    for site, why in sorted(missing.items()):
        lines.append(f"{site:20s} missing" + (f": {why}" if why else ""))
    return "\n".join(lines)


def run_results(args) -> int:
    paths = find_tables(args.path)
    tables = [(path, read_table(path)) for path in paths]
    if args.json:
        print(json.dumps(tables[0][1] if len(tables) == 1 else {str(p): t for p, t in tables}, indent=2, sort_keys=True))
        return 0
    print("\n\n".join((f"{path}\n" if len(tables) > 1 else "") + format_table(table) for path, table in tables))
    return 0


def print_tables_under(path: str | Path) -> None:
    """Print every table under `path` (after a run); nothing when the job wrote none."""
    try:
        paths = find_tables(path)
    except InputError:
        return
    for table_path in paths:
        print(format_table(read_table(table_path)))
