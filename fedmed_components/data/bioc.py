"""BioC XML reader and writer (collection / document / passage / annotation / relation).

Offsets are document-level character offsets, as BioC passages and locations carry
them; passages (or sentences) are placed at their offsets and the gaps filled with
line breaks to rebuild one `Document.text`. An annotation's `type` infon is its type;
a `negated` infon sets `Entity.negated`; its other infons are returned as attributes
(like BRAT `A` lines) for `corpora.apply_mapping`. Relation nodes with role
`head`/`Arg1` and `tail`/`Arg2` (any case) give head and tail; two nodes with other
roles are taken in order.

The writer puts the whole text in one passage at offset 0 and escapes carriage
returns (`&#13;`): an XML parser would otherwise turn CRLF into LF and shift offsets.
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from xml.parsers import expat

from fedmed_components.data.brat import (
    DUPLICATE_ID,
    MALFORMED_LINE,
    NOT_UTF8,
    OFFSETS_OUTSIDE_TEXT,
    SPAN_TEXT_MISMATCH,
    UNKNOWN_ARGUMENT,
    BratAttribute,
    InputProblems,
    warn_if_skipped,
)
from fedmed_components.data.document import Document, Entity, InputError, ReadReport, Relation
from fedmed_components.data.files import atomic_write_text

# A parse error stops the read even in lenient mode: nothing after it can be trusted.
NOT_WELL_FORMED = "not well-formed XML"
HEAD_ROLES = {"head", "arg1"}
TAIL_ROLES = {"tail", "arg2"}
# A passage further than this past the text before it is an offset typo, not a gap
# to fill with that many newlines (10**12 would exhaust memory).
MAX_PASSAGE_GAP = 10_000_000
# Characters XML 1.0 cannot hold, not even as character references.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


@dataclass
class BioCFile:
    """One BioC document: the contract part and the annotation infons beyond it."""

    document: Document
    attributes: list[BratAttribute] = field(default_factory=list)


# ---------------------------------------------------------------- XML with line numbers


def _parse_xml(path: Path) -> tuple[ET.Element, dict[ET.Element, int]]:
    """Parse with expat directly so every element remembers its line for messages."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(path, None, f"cannot open: {exc.strerror}") from exc
    builder, lines = ET.TreeBuilder(), {}
    parser = expat.ParserCreate()

    def start(tag, attrs):
        lines[builder.start(tag, attrs)] = parser.CurrentLineNumber

    parser.StartElementHandler = start
    parser.EndElementHandler = builder.end
    parser.CharacterDataHandler = builder.data
    try:
        parser.Parse(data, True)
    except expat.ExpatError as exc:
        kind = NOT_UTF8 if "invalid token" in str(exc) and _not_utf8(data) else NOT_WELL_FORMED
        raise InputError(path, exc.lineno, f"{kind}: {expat.ErrorString(exc.code)}") from exc
    except (LookupError, ValueError) as exc:  # Python's codecs, asked by expat for the declared encoding
        raise InputError(path, parser.CurrentLineNumber, f"{NOT_WELL_FORMED}: cannot decode the declared encoding ({exc})") from exc
    return builder.close(), lines


def _not_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


# ---------------------------------------------------------------- reading


class _DocumentReader:
    """Turns one <document> element into a BioCFile, reporting bad items by line."""

    def __init__(self, path: Path, lines: dict, problem: InputProblems):
        self.path = path
        self.lines = lines
        self.problem = problem

    def read(self, element: ET.Element) -> BioCFile | None:
        doc_id = (element.findtext("id") or "").strip()
        if not doc_id:
            self.problem(self.path, self.lines.get(element), MALFORMED_LINE, "<document> has no <id>")
            return None
        text = self._text(element)
        if text is None:
            return None
        out = BioCFile(Document(id=doc_id, text=text, site=_infons(element).get("site")))
        entities: dict[str, Entity] = {}
        for ann in element.iter("annotation"):
            self._annotation(ann, out, entities)
        out.document.entities = list(entities.values())
        for rel in element.iter("relation"):
            self._relation(rel, out.document, entities)
        return out

    def _text(self, element) -> str | None:
        """Place each passage (or sentence) text at its offset; fill gaps with newlines."""
        pieces = []
        for passage in element.findall("passage"):
            holders = [passage] if passage.find("text") is not None else passage.findall("sentence")
            for holder in holders:
                offset = _int(holder.findtext("offset"))
                if offset is None:
                    self.problem(self.path, self.lines.get(holder), MALFORMED_LINE, f"<{holder.tag}> has no numeric <offset>")
                    return None
                pieces.append((offset, holder.findtext("text") or "", holder))
        text = ""
        for offset, piece, holder in sorted(pieces, key=lambda p: p[0]):
            if offset < len(text):
                self.problem(
                    self.path, self.lines.get(holder), MALFORMED_LINE, f"<{holder.tag}> at offset {offset} overlaps the text before it"
                )
                return None
            if offset - len(text) > MAX_PASSAGE_GAP:
                self.problem(
                    self.path,
                    self.lines.get(holder),
                    MALFORMED_LINE,
                    f"<{holder.tag}> at offset {offset} is more than {MAX_PASSAGE_GAP:,} characters past the text before it",
                )
                return None
            text += "\n" * (offset - len(text)) + piece
        return text

    def _annotation(self, ann, out: BioCFile, entities: dict) -> None:
        line = self.lines.get(ann)
        ident, infons = ann.get("id"), _infons(ann)
        spans = [(_int(loc.get("offset")), _int(loc.get("length"))) for loc in ann.findall("location")]
        if not ident or "type" not in infons or not spans or any(o is None or n is None for o, n in spans):
            self.problem(self.path, line, MALFORMED_LINE, "<annotation> needs an id, a type infon and <location offset length>")
            return
        spans = [(o, o + n) for o, n in spans]
        text = out.document.text
        if any(not 0 <= s < e <= len(text) for s, e in spans):
            self.problem(self.path, line, OFFSETS_OUTSIDE_TEXT, f"{ident} locations {spans} are not inside the text (length {len(text)})")
            return
        actual = " ".join(text[s:e] for s, e in spans)
        written = ann.findtext("text")
        if written is not None and written != actual:
            self.problem(self.path, line, SPAN_TEXT_MISMATCH, f"{ident} says {written!r}, the text at its locations is {actual!r}")
            return
        if ident in entities:
            self.problem(self.path, line, DUPLICATE_ID, f"annotation {ident} is defined twice")
            return
        negated = infons.pop("negated", None)
        etype = infons.pop("type")
        entities[ident] = Entity(ident, etype, spans, actual, None if negated is None else negated.lower() == "true")
        out.attributes += [BratAttribute(f"{ident}:{k}", k, ident, v) for k, v in infons.items()]

    def _relation(self, rel, doc: Document, entities: dict) -> None:
        line = self.lines.get(rel)
        rtype = _infons(rel).get("type")
        nodes = [(n.get("role") or "", n.get("refid")) for n in rel.findall("node")]
        if not rtype or len(nodes) != 2 or not all(ref for _, ref in nodes):
            self.problem(self.path, line, MALFORMED_LINE, "<relation> needs a type infon and two <node refid role>")
            return
        head, tail = _order_nodes(nodes)
        for ref in (head, tail):
            if ref not in entities:
                self.problem(self.path, line, UNKNOWN_ARGUMENT, f"relation {rel.get('id')} names {ref}, which no annotation defines")
                return
        doc.relations.append(Relation(rtype, head, tail))


def _order_nodes(nodes: list[tuple[str, str]]) -> tuple[str, str]:
    roles = [role.lower() for role, _ in nodes]
    if roles[0] in TAIL_ROLES or roles[1] in HEAD_ROLES:
        return nodes[1][1], nodes[0][1]
    return nodes[0][1], nodes[1][1]


def _infons(element) -> dict[str, str]:
    return {i.get("key"): (i.text or "") for i in element.findall("infon") if i.get("key")}


def _int(value) -> int | None:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


def read_bioc_files(path: str | os.PathLike, *, lenient: bool = False, report: ReadReport | None = None) -> list[BioCFile]:
    """Every <document> of a BioC XML collection, with its extra annotation infons.

    XML that does not parse raises InputError (with its line) even in lenient mode:
    nothing after the break can be trusted.
    """
    path = Path(path)
    root, lines = _parse_xml(path)
    if root.tag != "collection":
        raise InputError(path, lines.get(root), f"{MALFORMED_LINE}: the root element is <{root.tag}>, not <collection>")
    own = ReadReport()
    reader = _DocumentReader(path, lines, InputProblems(lenient, own))
    files = []
    for element in root.findall("document"):
        parsed = reader.read(element)
        if parsed is None:
            own.skipped_documents += 1
        else:
            own.documents += 1
            files.append(parsed)
    warn_if_skipped(path, own)
    if report is not None:
        report.merge(own)
    return files


def read_bioc(path: str | os.PathLike, *, lenient: bool = False, report: ReadReport | None = None) -> list[Document]:
    """The documents of a BioC XML collection, with the source's own types."""
    return [f.document for f in read_bioc_files(path, lenient=lenient, report=report)]


# ---------------------------------------------------------------- writing


def _add_infon(parent: ET.Element, key: str, value: str) -> None:
    ET.SubElement(parent, "infon", key=key).text = value


def _check_xml_text(doc: Document) -> None:
    """Every string the document puts in the file must be one XML can carry: ElementTree
    writes control characters as they are, and the file would not parse again."""
    fields = [("its text", doc.text), ("its id", doc.id), ("its site", doc.site or "")]
    fields += [(f"entity {e.id!r}", f"{e.id}{e.type}") for e in doc.entities]
    fields += [(f"a {r.type!r} relation", f"{r.type}{r.head}{r.tail}") for r in doc.relations]
    for what, value in fields:
        if _NOT_XML.search(value):
            raise InputError(None, None, f"document {doc.id!r}: {what} holds a control character XML cannot carry")


def _document_element(doc: Document) -> ET.Element:
    _check_xml_text(doc)
    element = ET.Element("document")
    ET.SubElement(element, "id").text = doc.id
    if doc.site is not None:
        _add_infon(element, "site", doc.site)
    passage = ET.SubElement(element, "passage")
    ET.SubElement(passage, "offset").text = "0"
    ET.SubElement(passage, "text").text = doc.text
    for entity in doc.entities:
        passage.append(_annotation_element(doc, entity))
    for n, rel in enumerate(doc.relations, start=1):
        passage.append(_relation_element(rel, f"R{n}"))
    return element


def _annotation_element(doc: Document, entity: Entity) -> ET.Element:
    element = ET.Element("annotation", id=entity.id)
    _add_infon(element, "type", entity.type)
    if entity.negated is not None:
        _add_infon(element, "negated", "true" if entity.negated else "false")
    for start, end in entity.spans:
        if not 0 <= start < end <= len(doc.text):
            raise InputError(None, None, f"document {doc.id}: entity {entity.id} span {start}-{end} is not inside the text")
        ET.SubElement(element, "location", offset=str(start), length=str(end - start))
    ET.SubElement(element, "text").text = " ".join(doc.text[s:e] for s, e in entity.spans)
    return element


def _relation_element(rel: Relation, ident: str) -> ET.Element:
    element = ET.Element("relation", id=ident)
    _add_infon(element, "type", rel.type)
    ET.SubElement(element, "node", refid=rel.head, role="head")
    ET.SubElement(element, "node", refid=rel.tail, role="tail")
    return element


def write_bioc(docs: Iterable[Document], path: str | os.PathLike, *, source: str = "fedmed") -> Path:
    """Write one BioC XML collection atomically."""
    path = Path(path)
    root = ET.Element("collection")
    ET.SubElement(root, "source").text = source
    ET.SubElement(root, "date").text = ""
    ET.SubElement(root, "key").text = "fedmed_kiwi.key"
    for doc in docs:
        root.append(_document_element(doc))
    ET.indent(root)
    body = ET.tostring(root, encoding="unicode").replace("\r", "&#13;")
    xml = "<?xml version='1.0' encoding='UTF-8'?>\n<!DOCTYPE collection SYSTEM 'BioC.dtd'>\n" + body + "\n"
    return atomic_write_text(path, xml)
