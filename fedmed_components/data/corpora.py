"""Load a corpus in any supported format and bring it onto the Kiwi schema.

`load_corpus` takes a BRAT folder, a BioC XML file or a JSONL file, reads it with the
source's own types, then applies a `CorpusMapping` (see `schema.py`: a built-in name
such as "maccrobat", or the path of a YAML / JSON mapping file): unmapped types
are dropped and counted, MACCROBAT's MODIFY becomes hasAttr with the arguments
swapped, negation attributes become `negated=True`, relations whose arguments were
dropped, that have no Kiwi counterpart, or that do not link a main entity to a
modifier are dropped and counted. Nothing disappears without a count in a report.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from fedmed_components.data.bioc import read_bioc_files
from fedmed_components.data.brat import (
    MALFORMED_LINE,
    NOT_UTF8,
    OFFSETS_OUTSIDE_TEXT,
    UNKNOWN_ARGUMENT,
    BratAttribute,
    InputProblems,
    read_brat_file,
    read_brat_files,
    warn_if_skipped,
)
from fedmed_components.data.document import DOCUMENT_PARSE_ERRORS, Document, Entity, InputError, ReadReport, Relation
from fedmed_components.data.schema import CorpusMapping, fits_schema, get_mapping

logger = logging.getLogger(__name__)

FORMATS = ("brat", "bioc", "jsonl")

# Why a relation did not survive the mapping (keys of MappingReport.dropped_relations
# are "<source type>: <reason>").
NO_COUNTERPART = "no Kiwi counterpart"
ARGUMENT_DROPPED = "an argument's type was dropped"
NOT_MAIN_TO_MODIFIER = "does not link a main entity to a modifier"


@dataclass
class MappingReport:
    """What applying a CorpusMapping kept, changed and dropped."""

    mapping: str | None = None
    dropped_entities: Counter = field(default_factory=Counter)  # source type -> n
    dropped_relations: Counter = field(default_factory=Counter)  # "TYPE: reason" -> n
    swapped_relations: int = 0
    negated_entities: int = 0

    @property
    def dropped(self) -> int:
        return sum(self.dropped_entities.values()) + sum(self.dropped_relations.values())

    def summary(self) -> str:
        ents = sum(self.dropped_entities.values())
        rels = sum(self.dropped_relations.values())
        return (
            f"mapping {self.mapping}: dropped {ents} span(s) of unmapped types and {rels} relation(s); "
            f"swapped {self.swapped_relations} relation(s); {self.negated_entities} negated span(s)"
        )

    def to_dict(self) -> dict:
        return {
            "mapping": self.mapping,
            "dropped_entities": dict(self.dropped_entities.most_common()),
            "dropped_relations": dict(self.dropped_relations.most_common()),
            "swapped_relations": self.swapped_relations,
            "negated_entities": self.negated_entities,
        }


# ---------------------------------------------------------------- mapping


def _map_entities(doc: Document, mapping: CorpusMapping, report: MappingReport) -> dict[str, Entity]:
    kept = {}
    for ent in doc.entities:
        kiwi = mapping.kiwi_type(ent.type)
        if kiwi is None:
            report.dropped_entities[ent.type] += 1
            continue
        kept[ent.id] = Entity(ent.id, kiwi, list(ent.spans), ent.text, ent.negated)
    return kept


def _apply_negation(kept: dict[str, Entity], attributes, mapping: CorpusMapping, report: MappingReport) -> None:
    for attr in attributes:
        ent = kept.get(attr.target)
        if ent is not None and mapping.marks_negated(attr.name, attr.value) and not ent.negated:
            ent.negated = True
            report.negated_entities += 1


def _map_relation(rel: Relation, kept: dict[str, Entity], mapping: CorpusMapping, report: MappingReport) -> Relation | None:
    rule = mapping.relation_rule(rel.type)
    reason = None
    if rule is None:
        reason = NO_COUNTERPART
    else:
        head, tail = (rel.tail, rel.head) if rule.swap_arguments else (rel.head, rel.tail)
        if head not in kept or tail not in kept:
            reason = ARGUMENT_DROPPED
        elif not fits_schema(kept[head].type, kept[tail].type):
            reason = NOT_MAIN_TO_MODIFIER
    if reason:
        report.dropped_relations[f"{rel.type}: {reason}"] += 1
        return None
    report.swapped_relations += rule.swap_arguments
    return Relation(rule.kiwi_type, head, tail)


def apply_mapping(
    doc: Document,
    mapping: str | CorpusMapping,
    attributes: Iterable[BratAttribute] = (),
    report: MappingReport | None = None,
) -> Document:
    """A new Document with Kiwi types; `attributes` are the BRAT A lines / BioC infons."""
    mapping = get_mapping(mapping)
    report = report if report is not None else MappingReport(mapping.name)
    kept = _map_entities(doc, mapping, report)
    _apply_negation(kept, attributes, mapping, report)
    relations = [r for r in (_map_relation(rel, kept, mapping, report) for rel in doc.relations) if r]
    return Document(id=doc.id, text=doc.text, site=doc.site, entities=list(kept.values()), relations=relations)


# ---------------------------------------------------------------- reading any format


def detect_format(path: str | os.PathLike) -> str:
    """brat (a folder, or one .txt/.ann), bioc (.xml or starts with '<') or jsonl."""
    path = Path(path)
    if path.is_dir():
        return "brat"
    if not path.exists():
        raise InputError(path, None, "no such file or folder")
    suffix = path.suffix.lower()
    if suffix in (".txt", ".ann"):
        return "brat"
    if suffix in (".xml", ".bioc"):
        return "bioc"
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    with open(path, "rb") as fh:
        head = fh.read(512).lstrip()
    if head.startswith(b"<"):
        return "bioc"
    if head.startswith(b"{") or not head:
        return "jsonl"
    raise InputError(path, None, "cannot tell the format: give a BRAT folder, a BioC .xml or a .jsonl file")


def _check_document(path: Path, line: int, doc: Document, problem: InputProblems) -> Document:
    """JSONL comes from anywhere: drop spans outside the text and dangling relations."""
    entities = []
    for ent in doc.entities:
        if all(0 <= s < e <= len(doc.text) for s, e in ent.spans) and ent.spans:
            entities.append(ent)
        else:
            problem(path, line, OFFSETS_OUTSIDE_TEXT, f"document {doc.id}: entity {ent.id} spans {ent.spans} are not inside the text")
    ids = {e.id for e in entities}
    relations = []
    for rel in doc.relations:
        if rel.head in ids and rel.tail in ids:
            relations.append(rel)
        else:
            problem(path, line, UNKNOWN_ARGUMENT, f"document {doc.id}: relation {rel.type} {rel.head}->{rel.tail} names an unknown entity")
    doc.entities, doc.relations = entities, relations
    return doc


def read_jsonl_checked(path: str | os.PathLike, *, lenient: bool = False, report: ReadReport | None = None) -> list[Document]:
    """JSONL documents, validated; lenient mode skips bad lines and items, counted."""
    path = Path(path)
    own = ReadReport()
    problem = InputProblems(lenient, own)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(path, None, f"cannot open: {exc.strerror}") from exc
    docs = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        doc = _parse_jsonl_line(path, number, raw, problem)
        if doc is None:
            own.skipped_documents += 1
            continue
        docs.append(_check_document(path, number, doc, problem))
        own.documents += 1
    warn_if_skipped(path, own)
    if report is not None:
        report.merge(own)
    return docs


def _parse_jsonl_line(path: Path, number: int, raw: bytes, problem: InputProblems) -> Document | None:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        problem(path, number, NOT_UTF8, f"byte {exc.start} of the line: {exc.reason}")
        return None
    try:
        return Document.from_dict(json.loads(line))
    except DOCUMENT_PARSE_ERRORS as exc:
        problem(path, number, MALFORMED_LINE, f"not a document object: {exc}")
        return None


def read_any(
    path: str | os.PathLike,
    *,
    fmt: str | None = None,
    lenient: bool = False,
    report: ReadReport | None = None,
    progress: bool = False,
) -> list[tuple[Document, list[BratAttribute]]]:
    """(document, attributes) pairs with source types, from any supported format."""
    fmt = fmt or detect_format(path)
    if fmt == "brat" and not Path(path).is_dir():
        one = read_brat_file(Path(path).with_suffix(".txt"), lenient=lenient, report=report)
        return [(one.document, one.attributes)] if one else []
    if fmt == "brat":
        files = read_brat_files(path, lenient=lenient, report=report, progress=progress)
        return [(f.document, f.attributes) for f in files]
    if fmt == "bioc":
        return [(f.document, f.attributes) for f in read_bioc_files(path, lenient=lenient, report=report)]
    if fmt == "jsonl":
        return [(doc, []) for doc in read_jsonl_checked(path, lenient=lenient, report=report)]
    raise ValueError(f"unknown corpus format {fmt!r} (known: {', '.join(FORMATS)})")


def load_corpus(
    path: str | os.PathLike,
    mapping: str | CorpusMapping | None = "kiwi",
    *,
    lenient: bool = False,
    site: str | None = None,
    fmt: str | None = None,
    report: ReadReport | None = None,
    mapping_report: MappingReport | None = None,
    progress: bool = False,
) -> list[Document]:
    """Read a BRAT folder (or one note), BioC XML or JSONL file; map it onto the Kiwi schema.

    mapping=None keeps the source types. `site` fills `Document.site` where the input
    does not name one. Pass `report` / `mapping_report` to see what was skipped.
    """
    pairs = read_any(path, fmt=fmt, lenient=lenient, report=report, progress=progress)
    if mapping is not None:
        mapping = get_mapping(mapping)
        mapping_report = mapping_report if mapping_report is not None else MappingReport()
        mapping_report.mapping = mapping.name
        pairs = [(apply_mapping(doc, mapping, attrs, mapping_report), attrs) for doc, attrs in pairs]
        if mapping_report.dropped:
            logger.info("%s: %s", path, mapping_report.summary())
    docs = [doc for doc, _ in pairs]
    for doc in docs:
        doc.site = doc.site or site
    return docs


# ---------------------------------------------------------------- MTSamples note types

NOTE_TYPES = ("general_medicine", "discharge_summary", "other")


def mtsamples_note_type(doc: Document, header_lines: int = 3) -> str:
    """The note type from the MTSamples header on the first lines.

    The header (`Sample Type / Medical Specialty: ...`, `Sample Name: ...`,
    `Description: ...`) is sometimes broken over lines, so the first lines are read
    together. A mention of "discharge" there wins over "General Medicine": discharge
    summaries filed under the General Medicine specialty read as discharge notes.
    On mtsamples_kiwi/train this gives 56 / 38 / 2 documents.
    """
    head = " ".join(doc.text.splitlines()[:header_lines])
    head = re.sub(r"\s+", " ", head).lower()
    if "discharge" in head:
        return "discharge_summary"
    if "general medicine" in head:
        return "general_medicine"
    return "other"


# ---------------------------------------------------------------- statistics


def corpus_stats(docs: Iterable[Document]) -> dict:
    """Counts the `fedmed data stats` command prints."""
    docs = list(docs)
    spans, relations, discontinuous, negated = Counter(), Counter(), 0, 0
    for doc in docs:
        types = {e.id: e.type for e in doc.entities}
        spans.update(types.values())
        discontinuous += sum(len(e.spans) > 1 for e in doc.entities)
        negated += sum(bool(e.negated) for e in doc.entities)
        relations.update(f"{r.type} {types.get(r.head, '?')} -> {types.get(r.tail, '?')}" for r in doc.relations)
    return {
        "documents": len(docs),
        "spans": sum(spans.values()),
        "spans_per_type": dict(spans.most_common()),
        "discontinuous_spans": discontinuous,
        "negated_spans": negated,
        "relations": sum(relations.values()),
        "relations_per_type": dict(relations.most_common()),
        "characters": sum(len(d.text) for d in docs),
    }
