"""`fedmed eval --gold G --pred P [--json] [--types ...]`: n2c2-style strict/lenient scores.

With --lenient-input a bad input item (a malformed `.ann` line, a JSONL line that is
not a document, ...) in either file is skipped, counted and listed on stderr, and the
rest is scored; the JSON object then carries the counts under "skipped_input".
"""

from __future__ import annotations

import json
import sys

from fedmed_components.commands.data import MAPPING_HELP, mapping_argument

_PATH_HELP = "a BRAT folder (searched recursively), a BioC XML file or a JSONL file of documents"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="score predictions against gold (n2c2-style strict/lenient, entities and relations)",
        description=(
            "Score predictions against gold annotations, documents paired by id. strict: same "
            "type and same span(s); lenient: same type and any overlap; each gold and each "
            "prediction matched at most once. Relations count when their type matches and "
            "head and tail are matched in the same mode."
        ),
        epilog="example: fedmed eval --gold test.jsonl --pred predictions.jsonl --types problem drug negation --json",
    )
    p.add_argument("--gold", required=True, metavar="G", help=_PATH_HELP)
    p.add_argument("--pred", required=True, metavar="P", help=_PATH_HELP)
    p.add_argument("--json", action="store_true", help="print the score object as JSON instead of a table")
    p.add_argument(
        "--types",
        nargs="+",
        default=None,
        metavar="TYPE",
        help="score only these entity types, space- or comma-separated (a partial-schema site)",
    )
    p.add_argument(
        "--mapping",
        type=mapping_argument,
        default=None,
        metavar="MAPPING",
        help=f"first {MAPPING_HELP}, gold and predictions alike. Default: compare the types as written",
    )
    p.add_argument(
        "--lenient-input",
        action="store_true",
        help=(
            "skip bad input items in gold or predictions (malformed lines, offsets outside the text, span text "
            "that does not match, ...) instead of refusing to score; each is listed and counted (the JSON output "
            "gets a skipped_input object)"
        ),
    )
    p.add_argument(
        "--parse-failures",
        type=int,
        default=0,
        metavar="N",
        help="model outputs that could not be parsed (from `fedmed predict`), reported alongside",
    )
    p.set_defaults(func=run_eval)


def _types(values: list[str] | None) -> set[str] | None:
    if not values:
        return None
    return {t.strip() for value in values for t in value.split(",") if t.strip()}


def run_eval(args) -> int:
    from fedmed_components.commands.data import read_corpus
    from fedmed_components.data.document import InputError
    from fedmed_components.data.schema import get_mapping
    from fedmed_components.task.metrics import ScoringError, format_table, score_documents

    mapping = get_mapping(args.mapping) if args.mapping else None  # a bad mapping file is named before any input is read
    gold, gold_report, _ = read_corpus(args.gold, mapping, lenient=args.lenient_input)
    pred, pred_report, _ = read_corpus(args.pred, mapping, lenient=args.lenient_input)
    types = _types(args.types)
    missing = sorted((types or set()) - {e.type for doc in gold for e in doc.entities})
    if missing:
        print(f"fedmed eval: note: no gold entity of type {', '.join(missing)}", file=sys.stderr)
    try:
        result = score_documents(gold, pred, types=types, parse_failures=args.parse_failures)
    except ScoringError as exc:
        raise InputError(args.pred, None, str(exc)) from exc
    if args.lenient_input:
        result["skipped_input"] = {"gold": gold_report.to_dict(), "pred": pred_report.to_dict()}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_table(result))
        if args.lenient_input:
            print(f"skipped input: gold {gold_report.summary()}; predictions {pred_report.summary()}")
    return 0
