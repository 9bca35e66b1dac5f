"""`fedmed eval`: strict and lenient P/R/F1 of predictions against gold annotations."""

from __future__ import annotations

import json


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="score predictions against gold (n2c2-style strict/lenient, entities and relations)",
        description=(
            "G and P are each a BRAT folder, a BioC XML file or a JSONL file, matched by "
            "document id. strict = same type and span(s); lenient = same type and any "
            "overlap; each gold and prediction matched at most once. Relations count when "
            "their type matches and head and tail are matched in the same mode."
        ),
    )
    p.add_argument("--gold", required=True, help="gold annotations (BRAT folder, BioC, JSONL)")
    p.add_argument("--pred", required=True, help="predictions (BRAT folder, BioC, JSONL)")
    p.add_argument("--mapping", default=None, help="map both onto the Kiwi schema first: kiwi | maccrobat | phee")
    p.add_argument("--types", default=None, help="comma-separated types to score (a partial-schema site)")
    p.add_argument("--parse-failures", type=int, default=0, help="reported alongside the scores")
    p.add_argument("--json", action="store_true", help="print the JSON object instead of a table")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from fedmed_components.corpora import load_corpus
    from fedmed_components.metrics import format_table, score_documents

    gold = load_corpus(args.gold, mapping=args.mapping)
    pred = load_corpus(args.pred, mapping=args.mapping)
    types = set(args.types.split(",")) if args.types else None
    result = score_documents(gold, pred, types=types, parse_failures=args.parse_failures)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0
