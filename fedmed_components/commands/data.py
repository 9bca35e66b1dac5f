"""`fedmed data convert|split|stats`: corpora in, JSONL / BRAT / BioC and site folders out."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from fedmed_components.data.schema import MAPPINGS, is_mapping_file

FORMATS = ("brat", "bioc", "jsonl")
SPLITS = ("note-type", "corpus", "dirichlet", "quantity", "iid")
_MAX_LISTED_PROBLEMS = 10

_INPUT_HELP = "a BRAT folder (searched recursively), a BioC XML file or a JSONL file"
MAPPING_HELP = (
    "map the source types onto the Kiwi schema: kiwi (MTSamples/Kiwi BRAT), maccrobat "
    "(MACCROBAT2020), phee (PHEE), or the path of your own YAML / JSON mapping file "
    "(README.md, 'Corpus mappings'); unmapped types are dropped and counted"
)
_MAPPING_HELP = MAPPING_HELP + ". Default: keep the source types"
_LENIENT_HELP = (
    "skip bad input items (malformed lines, offsets outside the text, span text that does "
    "not match, unknown relation arguments, non-UTF-8 or empty files) instead of stopping "
    "at the first; a warning and the count of what was skipped are printed"
)


def register(subparsers) -> None:
    data = subparsers.add_parser(
        "data",
        help="convert, split and count clinical IE corpora",
        description="Read BRAT / BioC / JSONL corpora, map them onto the Kiwi schema, split them into sites.",
    )
    sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    _add_convert(sub)
    _add_split(sub)
    _add_stats(sub)
    try:
        from fedmed_components.data.synth import add_synth_parser

        add_synth_parser(sub)
    except ImportError:
        pass
    data.set_defaults(func=lambda args: _usage(data))


def mapping_argument(value: str) -> str:
    """A --mapping value: a built-in name or a mapping file (read, and checked, when used)."""
    if value.lower() in MAPPINGS:
        return value.lower()
    if is_mapping_file(value):
        return value
    raise argparse.ArgumentTypeError(
        f"unknown mapping {value!r}: give {', '.join(sorted(MAPPINGS))} or the path of a .yaml / .json mapping file"
    )


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _add_reading_options(p: argparse.ArgumentParser, *, mapping_append: bool = False) -> None:
    p.add_argument("--from", dest="fmt", choices=FORMATS, default=None, help="input format (default: from the path)")
    if mapping_append:
        p.add_argument(
            "--mapping",
            action="append",
            type=mapping_argument,
            default=None,
            metavar="MAPPING",
            help=_MAPPING_HELP + "; give it once for all inputs or once per input, in order",
        )
    else:
        p.add_argument("--mapping", type=mapping_argument, default=None, metavar="MAPPING", help=_MAPPING_HELP)
    p.add_argument("--lenient-input", action="store_true", help=_LENIENT_HELP)


def _add_convert(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a corpus between BRAT, BioC XML and JSONL (optionally onto the Kiwi schema)",
        description=(
            "Convert a corpus between BRAT standoff, BioC XML and the project's JSONL "
            "documents, optionally mapping it onto the Kiwi schema. Offsets are kept as "
            "they are (Windows line endings included)."
        ),
        epilog="example: fedmed data convert ../shared/data/maccrobat2020/brat mac.jsonl --mapping maccrobat --site maccrobat",
    )
    p.add_argument("input", metavar="IN", help=_INPUT_HELP)
    p.add_argument("output", metavar="OUT", help="output: a .jsonl file, a BioC .xml file or a BRAT folder")
    p.add_argument(
        "--to", dest="to_fmt", choices=FORMATS, default=None, help="output format (default: jsonl for *.jsonl, bioc for *.xml, else brat)"
    )
    p.add_argument("--site", default=None, help="site name for documents that do not name one")
    _add_reading_options(p)
    p.set_defaults(func=_convert)


def _add_split(sub) -> None:
    p = sub.add_parser(
        "split",
        help="split a corpus into federated site folders (natural or Dirichlet non-IID)",
        description=(
            "Split documents into site folders OUT/<site>/train.jsonl (+ val.jsonl, test.jsonl) "
            "with a manifest.json of counts per type. --by note-type: MTSamples General "
            "Medicine / Discharge Summary (/ other); corpus: one site per input (or per the "
            "documents' site field); dirichlet: label skew (each document's label is its most "
            "frequent main entity type; smaller --alpha, stronger skew); quantity: site sizes "
            "in Dirichlet(--alpha) proportions; iid: equal random sites. Deterministic with --seed."
        ),
        epilog=(
            "example: fedmed data split ../shared/data/maccrobat2020/brat ../shared/data/phee/brat sites "
            "--by corpus --mapping maccrobat --mapping phee --test-fraction 0.2"
        ),
    )
    p.add_argument("inputs", metavar="IN", nargs="+", help=_INPUT_HELP + "; several for --by corpus")
    p.add_argument("output", metavar="OUT", help="folder that receives one subfolder per site and manifest.json")
    p.add_argument("--by", choices=SPLITS, required=True, help="how documents are assigned to sites")
    p.add_argument("--sites", type=int, default=2, help="number of sites for dirichlet / quantity / iid (default 2)")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (default 0.5; large = close to IID)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--test-fraction", type=float, default=0.0, help="per-site held-out test.jsonl fraction (default 0)")
    p.add_argument(
        "--val-fraction", type=float, default=0.0, help="per-site val.jsonl fraction (default 0: the site takes its own at training time)"
    )
    p.add_argument("--site-names", default=None, help="comma-separated site names for the inputs of --by corpus")
    _add_reading_options(p, mapping_append=True)
    p.set_defaults(func=_split)


def _add_stats(sub) -> None:
    p = sub.add_parser(
        "stats",
        help="count documents, spans per type and relations per type",
        description=(
            "Print documents, spans per type, relations per (type, head type -> tail type), "
            "discontinuous and negated spans, the input items skipped (--lenient-input), what "
            "the mapping dropped and what the Document contract does not carry (BRAT event "
            "arguments, attributes, notes)."
        ),
    )
    p.add_argument("input", metavar="IN", help=_INPUT_HELP)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    _add_reading_options(p)
    p.set_defaults(func=_stats)


# ---------------------------------------------------------------- reading with reports


def _load(path: str, args, mapping: str | None, site: str | None = None):
    return read_corpus(path, mapping, lenient=args.lenient_input, fmt=args.fmt, site=site)


def read_corpus(path: str, mapping, *, lenient: bool, fmt: str | None = None, site: str | None = None):
    """(documents, ReadReport, MappingReport) of one input; what was skipped is printed.

    A strict read that meets a bad item says that --lenient-input would skip it. The
    mapping (a name or a file) is read first: a bad mapping file is not an input item.
    """
    from fedmed_components.data.bioc import NOT_WELL_FORMED
    from fedmed_components.data.corpora import MappingReport, load_corpus
    from fedmed_components.data.document import InputError, ReadReport
    from fedmed_components.data.schema import get_mapping

    mapping = get_mapping(mapping) if mapping is not None else None
    report, mapped = ReadReport(), MappingReport()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the command prints its own summary below
            docs = load_corpus(
                path,
                mapping,
                lenient=lenient,
                site=site,
                fmt=fmt,
                report=report,
                mapping_report=mapped,
                progress=sys.stderr.isatty(),
            )
    except InputError as exc:
        if lenient or exc.line is None or exc.reason.startswith(NOT_WELL_FORMED):
            raise
        raise InputError(exc.path, exc.line, f"{exc.reason} (--lenient-input skips such items and counts them)") from exc
    print_skipped(path, report)
    return docs, report, mapped


def print_skipped(path: str, report) -> None:
    if not report.skipped:
        return
    print(f"fedmed: warning: {path}: {report.summary()} (--lenient-input)", file=sys.stderr)
    for file, line, reason in report.problems[:_MAX_LISTED_PROBLEMS]:
        where = f"{file}:{line}" if line is not None else file
        print(f"  {where}: {reason}", file=sys.stderr)
    if len(report.problems) > _MAX_LISTED_PROBLEMS:
        print(f"  ... and {len(report.problems) - _MAX_LISTED_PROBLEMS} more", file=sys.stderr)


# ---------------------------------------------------------------- convert


def _output_format(path: str, explicit: str | None) -> str:
    if explicit:
        return explicit
    suffix = Path(path).suffix.lower()
    return {".jsonl": "jsonl", ".json": "jsonl", ".xml": "bioc"}.get(suffix, "brat")


def _convert(args) -> int:
    from fedmed_components.data.bioc import write_bioc
    from fedmed_components.data.brat import write_brat_dir
    from fedmed_components.data.document import write_jsonl

    docs, _, mapped = _load(args.input, args, args.mapping, site=args.site)
    fmt = _output_format(args.output, args.to_fmt)
    if fmt == "brat":  # ids become file names: a bad one is named with the input it came from
        write_brat_dir(docs, args.output, source=args.input)
    else:
        {"jsonl": write_jsonl, "bioc": write_bioc}[fmt](docs, args.output)
    spans = sum(len(d.entities) for d in docs)
    relations = sum(len(d.relations) for d in docs)
    print(f"wrote {len(docs)} documents, {spans} spans, {relations} relations to {args.output} ({fmt})")
    if args.mapping:
        print(mapped.summary())
    return 0


# ---------------------------------------------------------------- split


def _input_mappings(args) -> list[str | None]:
    mappings = args.mapping or [None]
    if len(mappings) == 1:
        return mappings * len(args.inputs)
    if len(mappings) != len(args.inputs):
        raise SystemExit(f"fedmed data split: give --mapping once, or once per input ({len(args.inputs)})")
    return mappings


def _input_site_names(args, mappings) -> list[str]:
    if args.site_names:
        names = [n.strip() for n in args.site_names.split(",")]
        if len(names) != len(args.inputs):
            raise SystemExit(f"fedmed data split: --site-names needs {len(args.inputs)} names")
        return names
    from fedmed_components.data.schema import get_mapping

    return [get_mapping(m).name if m else Path(p).stem for p, m in zip(args.inputs, mappings)]


def _split_docs(docs, args):
    from fedmed_components.data import partition

    if args.by == "note-type":
        return partition.split_by_note_type(docs)
    if args.by == "corpus":
        return partition.split_by_corpus(docs)
    if args.by == "dirichlet":
        return partition.split_dirichlet(docs, args.sites, args.alpha, args.seed)
    if args.by == "quantity":
        return partition.split_quantity(docs, args.sites, args.alpha, args.seed)
    return partition.split_iid(docs, args.sites, args.seed)


def _annotated_types(site_docs, doc_mapping: dict[str, str | None]) -> dict[str, list[str]] | None:
    """A site annotates the types every one of its documents' corpora annotates."""
    from fedmed_components.data.schema import ENTITY_TYPES, get_mapping

    if not any(doc_mapping.values()):
        return None
    out = {}
    for site, docs in site_docs.items():
        types = set(ENTITY_TYPES)
        for m in {doc_mapping[d.id] for d in docs}:
            types &= set(get_mapping(m).annotated_types) if m else set(ENTITY_TYPES)
        out[site] = sorted(types)
    return out


def _split(args) -> int:
    from fedmed_components.data.partition import write_partition
    from fedmed_components.data.schema import get_mapping

    mappings = _input_mappings(args)
    for mapping in {m for m in mappings if m}:  # a bad mapping file stops the split before any input is read
        get_mapping(mapping)
    names = _input_site_names(args, mappings)
    docs, doc_mapping = [], {}
    for path, mapping, name in zip(args.inputs, mappings, names):
        loaded, _, _ = _load(path, args, mapping, site=name if args.by == "corpus" else None)
        docs += loaded
        doc_mapping.update({d.id: mapping for d in loaded})
    if len(doc_mapping) != len(docs):
        raise SystemExit("fedmed data split: document ids repeat; every document needs its own id")
    try:
        site_docs = _split_docs(docs, args)
    except ValueError as exc:
        raise SystemExit(f"fedmed data split: {exc}") from None
    info = {"strategy": args.by, "inputs": args.inputs, "mappings": mappings}
    if args.by in ("dirichlet", "quantity", "iid"):
        info.update(sites=args.sites, alpha=args.alpha if args.by != "iid" else None)
    manifest = write_partition(
        site_docs,
        args.output,
        test_fraction=args.test_fraction,
        val_fraction=args.val_fraction,
        seed=args.seed,
        annotated_types=_annotated_types(site_docs, doc_mapping),
        info=info,
    )
    for site, site_list in site_docs.items():
        print(f"{site}: {len(site_list)} documents")
    print(f"wrote {manifest}")
    return 0


# ---------------------------------------------------------------- stats


def _stats(args) -> int:
    from fedmed_components.data.corpora import corpus_stats

    docs, report, mapped = _load(args.input, args, args.mapping)
    stats = corpus_stats(docs)
    stats["skipped"] = report.to_dict()
    if args.mapping:
        stats["mapping"] = mapped.to_dict()
    if args.json:
        print(json.dumps(stats, indent=2))
    else:
        _print_stats(stats)
    return 0


def _print_counts(title: str, counts: dict) -> None:
    if not counts:
        return
    print(title)
    width = max(len(k) for k in counts)
    for key, n in counts.items():
        print(f"  {key:<{width}}  {n:>7,}")


def _print_stats(stats: dict) -> None:
    print(f"documents            {stats['documents']:>9,}")
    print(f"spans                {stats['spans']:>9,}")
    print(f"discontinuous spans  {stats['discontinuous_spans']:>9,}")
    print(f"negated spans        {stats['negated_spans']:>9,}")
    print(f"relations            {stats['relations']:>9,}")
    _print_counts("spans per type:", stats["spans_per_type"])
    _print_counts("relations per type (head -> tail):", stats["relations_per_type"])
    skipped = stats["skipped"]
    print(f"skipped input items  {sum(skipped['skipped'].values()):>9,}")
    _print_counts("skipped per reason:", skipped["skipped"])
    _print_counts("read but not in the Document contract:", skipped["not_carried"])
    if "mapping" in stats:
        _print_counts(f"dropped by mapping {stats['mapping']['mapping']} (span types):", stats["mapping"]["dropped_entities"])
        _print_counts("dropped by mapping (relations):", stats["mapping"]["dropped_relations"])
