"""`fedmed eval --gold G --pred P [--json] [--types ...]`: n2c2-style strict/lenient scores."""

from __future__ import annotations

import json
import sys

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
    p.add_argument("--mapping", default=None, help="map both onto the Kiwi schema first: kiwi | maccrobat | phee")
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
    from fedmed_components.data.corpora import load_corpus
    from fedmed_components.data.document import InputError
    from fedmed_components.task.metrics import ScoringError, format_table, score_documents

    gold = load_corpus(args.gold, mapping=args.mapping)
    pred = load_corpus(args.pred, mapping=args.mapping)
    types = _types(args.types)
    missing = sorted((types or set()) - {e.type for doc in gold for e in doc.entities})
    if missing:
        print(f"fedmed eval: note: no gold entity of type {', '.join(missing)}", file=sys.stderr)
    try:
        result = score_documents(gold, pred, types=types, parse_failures=args.parse_failures)
    except ScoringError as exc:
        raise InputError(args.pred, None, str(exc)) from exc
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0
