"""BRAT standoff (`NAME.txt` + `NAME.ann`) reader and writer.

The reader keeps the corpus's own type names; `corpora.apply_mapping` turns them into
the Kiwi schema. Offsets are character indices into the `.txt` read byte-exact
(`newline=""`), so Windows line endings count, as BRAT counts them.

Real corpora are imperfect. In strict mode (the default) the first bad item raises
`InputError(path, line, reason)`. In lenient mode the bad item is skipped, recorded in a
`ReadReport` (and logged), and the read ends with one warning that sums up what was
skipped; nothing is dropped silently.

Line kinds: `T` text-bound spans (also discontinuous `0 5;10 15`), `R` binary
relations, `E` events (a relation or attribute that names an event resolves to the
event's trigger span), `A`/`M` attributes, `N` normalisations, `#` notes and `*`
equivalence groups. The binary attribute `Negated` sets `Entity.negated` (the writer
emits it); event arguments, other attributes, notes, normalisations and equivalences do
not fit the Document contract and are kept on `BratFile` instead.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

# ReadReport lives beside InputError in document.py; still importable from here (model/site.py, commands/data.py)
from fedmed_components.data.document import Document, Entity, InputError, ReadReport, Relation
from fedmed_components.data.files import TEMP_SUFFIX, atomic_write_text

logger = logging.getLogger(__name__)

# Problem kinds, the keys of `ReadReport.counts`.
MALFORMED_LINE = "malformed line"
OFFSETS_OUTSIDE_TEXT = "offsets outside text"
SPAN_TEXT_MISMATCH = "span text mismatch"
UNKNOWN_ARGUMENT = "unknown relation argument"
UNKNOWN_TARGET = "unknown annotation target"
DUPLICATE_ID = "duplicate id"
NOT_UTF8 = "not UTF-8"
EMPTY_TEXT = "empty text file"
MISSING_FILE = "missing file"

NEGATED_ATTRIBUTE = "Negated"

_ID = re.compile(r"^(?:[TREAMN#]\S*|\*)$")
# At most 18 digits: no text is longer, and int() refuses a few thousand digits.
_SPAN = re.compile(r"^(\d{1,18})\s+(\d{1,18})$")


@dataclass
class BratEvent:
    id: str
    type: str
    trigger: str  # T id
    arguments: list[tuple[str, str]]  # (role, T id)
    line: int | None = None  # where it sits in the .ann


@dataclass
class BratAttribute:
    id: str
    name: str
    target: str  # T id (an event target is resolved to its trigger)
    value: str | None


@dataclass
class BratNote:
    id: str
    kind: str  # AnnotatorNotes, or the N line's resource type
    target: str
    text: str


@dataclass
class BratEquivalence:
    type: str
    members: list[str]  # T ids


@dataclass
class BratFile:
    """Everything one `.ann` says about one `.txt`; `document` is the contract part."""

    document: Document
    events: list[BratEvent] = field(default_factory=list)
    attributes: list[BratAttribute] = field(default_factory=list)
    notes: list[BratNote] = field(default_factory=list)
    equivalences: list[BratEquivalence] = field(default_factory=list)


# ---------------------------------------------------------------- reading one file


class InputProblems:
    """Raise (strict) or record, log and skip (lenient) one bad item."""

    def __init__(self, lenient: bool, report: ReadReport):
        self.lenient = lenient
        self.report = report

    def __call__(self, path: Path, line: int | None, kind: str, detail: str) -> None:
        if not self.lenient:
            raise InputError(path, line, f"{kind}: {detail}")
        self.report.add(path, line, kind, detail)
        where = f"{path}:{line}" if line is not None else str(path)
        # Each item at INFO; the read ends with one warning that sums them up.
        logger.info("%s: %s: %s (skipped)", where, kind, detail)


def _read_text(path: Path, problem: InputProblems) -> str | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        problem(path, None, MISSING_FILE, "no such file")
        return None
    try:
        text = data.decode("utf-8")  # bytes -> str: no newline translation
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        problem(path, line, NOT_UTF8, f"byte {exc.start}: {exc.reason}")
        return None
    if not text:
        problem(path, 1, EMPTY_TEXT, "the note has no text")
        return None
    return text


def _read_ann_lines(path: Path, problem: InputProblems) -> list[tuple[int, str]] | None:
    """(line number, line) pairs; a line that is not UTF-8 is a bad item of its own."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        problem(path, None, MISSING_FILE, "no .ann beside the .txt")
        return None
    lines = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            line = raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as exc:
            problem(path, number, NOT_UTF8, f"byte {exc.start} of the line: {exc.reason}")
            continue
        if line.strip():
            lines.append((number, line))
    return lines


def _visible(text: str) -> str:
    """Span text as the single-line `.ann` text column can hold it."""
    return text.replace("\r", " ").replace("\n", " ")


def _same_text(written: str, actual: str) -> bool:
    """Does the `.ann` text column agree with the text at the offsets?

    Fields after a further tab are an extra column that BRAT ignores (MACCROBAT and
    PHEE each have one such line); the span text itself may contain a tab.
    """
    visible = _visible(actual)
    return written == visible or written.startswith(visible + "\t")


class _AnnParser:
    """Parses one `.ann` in passes: spans, then events, then lines that refer to them."""

    def __init__(self, ann_path: Path, text: str, problem: InputProblems):
        self.path = ann_path
        self.text = text
        self.problem = problem
        self.report = problem.report
        self.entities: dict[str, Entity] = {}
        self.event_trigger: dict[str, str] = {}
        self.out = BratFile(document=Document(id="", text=text))

    def parse(self, lines: list[tuple[int, str]]) -> BratFile:
        rest = self._parse_spans(lines)
        rest = [item for item in rest if not self._maybe_event(*item)]
        self._resolve_event_arguments()
        for number, line in rest:
            self._parse_other(number, line)
        self.out.document.entities = list(self.entities.values())
        return self.out

    # -- T lines -------------------------------------------------------------

    def _parse_spans(self, lines):
        """Parse T lines; return the other lines. Consumes text that spilled over."""
        rest, i = [], 0
        while i < len(lines):
            number, line = lines[i]
            ident = line.split("\t", 1)[0]
            if not _ID.match(ident):
                self.problem(self.path, number, MALFORMED_LINE, f"{_clip(line)!r} is not an annotation line")
            elif ident.startswith("T"):
                i += self._parse_span(lines, i)
            else:
                rest.append((number, line))
            i += 1
        return rest

    def _parse_span(self, lines, i) -> int:
        """Parse the T line at lines[i]; return how many following lines it consumed."""
        number, line = lines[i]
        parts = line.split("\t", 2)
        fields = parts[1].split(" ", 1) if len(parts) > 1 else []
        spans = _parse_fragments(fields[1]) if len(fields) == 2 else None
        if spans is None:
            self.problem(self.path, number, MALFORMED_LINE, f"{_clip(line)!r} is not 'T<n>\\tTYPE START END[;START END]\\tTEXT'")
            return 0
        ident, etype = parts[0], fields[0]
        if not self._offsets_inside(number, ident, spans):
            return 0
        actual = " ".join(self.text[s:e] for s, e in spans)
        consumed = 0
        if len(parts) == 3 and not _same_text(parts[2], actual):
            consumed = self._spilled_lines(lines, i, parts[2], actual)
            if consumed is None:
                self.problem(
                    self.path, number, SPAN_TEXT_MISMATCH, f"{ident} says {_clip(parts[2])!r}, the text at {fields[1]} is {_clip(actual)!r}"
                )
                return 0
        self._add_entity(number, Entity(id=ident, type=etype, spans=spans, text=actual))
        return consumed

    def _spilled_lines(self, lines, i, written: str, actual: str) -> int | None:
        """A span that contains a line break, written raw, spills onto the next lines.

        The entity is sound (its offsets and text agree); each spilled line is a
        malformed line of its own and is reported as one.
        """
        joined, last = written, i
        while joined != actual and last + 1 < len(lines) and actual.startswith(joined + "\n"):
            last += 1
            joined += "\n" + lines[last][1]
        if joined != actual:
            return None
        ident = lines[i][1].split("\t", 1)[0]
        for number, line in lines[i + 1 : last + 1]:
            self.problem(
                self.path, number, MALFORMED_LINE, f"{_clip(line)!r} is the rest of {ident}'s text (the span contains a line break)"
            )
        return last - i

    def _offsets_inside(self, number, ident, spans) -> bool:
        for start, end in spans:
            if not 0 <= start < end <= len(self.text):
                self.problem(
                    self.path, number, OFFSETS_OUTSIDE_TEXT, f"{ident} span {start}-{end} is not inside the text (length {len(self.text)})"
                )
                return False
        return True

    def _add_entity(self, number, entity: Entity) -> None:
        if entity.id in self.entities:
            self.problem(self.path, number, DUPLICATE_ID, f"{entity.id} is defined twice")
            return
        self.entities[entity.id] = entity

    # -- E lines -------------------------------------------------------------

    def _maybe_event(self, number, line) -> bool:
        ident, _, body = line.partition("\t")
        if not ident.startswith("E"):
            return False
        roles = [part.split(":", 1) for part in body.split()]
        if not roles or any(len(r) != 2 for r in roles):
            self.problem(self.path, number, MALFORMED_LINE, f"{_clip(line)!r} is not 'E<n>\\tTYPE:T<n> [ROLE:ID ...]'")
            return True
        (etype, trigger), arguments = roles[0], roles[1:]
        if trigger not in self.entities:
            self.problem(self.path, number, UNKNOWN_TARGET, f"{ident} trigger {trigger} is not a T line")
            return True
        if ident in self.event_trigger:
            self.problem(self.path, number, DUPLICATE_ID, f"{ident} is defined twice")
            return True
        self.event_trigger[ident] = trigger
        self.out.events.append(BratEvent(ident, etype, trigger, [(role, ref) for role, ref in arguments], number))
        return True

    def _resolve(self, ref: str) -> str | None:
        """The T id behind a T or E id (an event stands for its trigger span)."""
        ref = self.event_trigger.get(ref, ref)
        return ref if ref in self.entities else None

    def _resolve_event_arguments(self) -> None:
        """After all E lines: arguments may name events defined further down."""
        for event in self.out.events:
            resolved = []
            for role, ref in event.arguments:
                target = self._resolve(ref)
                if target is None:
                    self.problem(self.path, event.line, UNKNOWN_TARGET, f"{event.id} argument {role}:{ref} names no T or E line")
                else:
                    resolved.append((role, target))
            event.arguments = resolved
            if resolved:
                self.report.not_carried["event arguments"] += len(resolved)

    # -- R, A, M, N, #, * lines ----------------------------------------------

    def _parse_other(self, number, line) -> None:
        kind = line[0]
        handler = {
            "R": self._parse_relation,
            "A": self._parse_attribute,
            "M": self._parse_attribute,
            "N": self._parse_normalisation,
            "#": self._parse_note,
            "*": self._parse_equivalence,
        }[kind]
        handler(number, line)

    def _parse_relation(self, number, line) -> None:
        ident, _, body = line.partition("\t")
        fields = body.split()
        args = [f.split(":", 1) for f in fields[1:]]
        if len(fields) != 3 or any(len(a) != 2 for a in args):
            self.problem(self.path, number, MALFORMED_LINE, f"{_clip(line)!r} is not 'R<n>\\tTYPE Arg1:ID Arg2:ID'")
            return
        (role1, ref1), (role2, ref2) = sorted(args) if {args[0][0], args[1][0]} == {"Arg1", "Arg2"} else args
        head, tail = self._resolve(ref1), self._resolve(ref2)
        if head is None or tail is None:
            missing = ref1 if head is None else ref2
            self.problem(self.path, number, UNKNOWN_ARGUMENT, f"{ident} names {missing}, which no T or E line defines")
            return
        self.out.document.relations.append(Relation(type=fields[0], head=head, tail=tail))

    def _parse_attribute(self, number, line) -> None:
        ident, _, body = line.partition("\t")
        fields = body.split()
        if len(fields) not in (2, 3):
            self.problem(self.path, number, MALFORMED_LINE, f"{_clip(line)!r} is not 'A<n>\\tNAME ID [VALUE]'")
            return
        name, ref, value = fields[0], fields[1], (fields[2] if len(fields) == 3 else None)
        target = self._resolve(ref)
        if target is None:
            self.problem(self.path, number, UNKNOWN_TARGET, f"{ident} names {ref}, which no T or E line defines")
            return
        if name == NEGATED_ATTRIBUTE:
            self.entities[target].negated = (value or "true").lower() != "false"
            return
        self.out.attributes.append(BratAttribute(ident, name, target, value))
        self.report.not_carried[f"attribute {name}"] += 1

    def _parse_normalisation(self, number, line) -> None:
        parts = line.split("\t")
        fields = parts[1].split() if len(parts) > 1 else []
        if len(fields) != 3:
            self.problem(self.path, number, MALFORMED_LINE, f"{_clip(line)!r} is not 'N<n>\\tReference ID RESOURCE:ID\\tTEXT'")
            return
        target = self._resolve(fields[1])
        if target is None:
            self.problem(self.path, number, UNKNOWN_TARGET, f"{parts[0]} names {fields[1]}, which no T or E line defines")
            return
        self.out.notes.append(BratNote(parts[0], fields[2], target, parts[2] if len(parts) > 2 else ""))
        self.report.not_carried["normalisations"] += 1

    def _parse_note(self, number, line) -> None:
        parts = line.split("\t", 2)
        fields = parts[1].split() if len(parts) > 1 else []
        if len(fields) != 2:
            self.problem(self.path, number, MALFORMED_LINE, f"{_clip(line)!r} is not '#<n>\\tAnnotatorNotes ID\\tTEXT'")
            return
        target = self._resolve(fields[1]) or fields[1]  # notes may sit on R or A lines too
        self.out.notes.append(BratNote(parts[0], fields[0], target, parts[2] if len(parts) > 2 else ""))
        self.report.not_carried["notes"] += 1

    def _parse_equivalence(self, number, line) -> None:
        fields = line.partition("\t")[2].split()
        if len(fields) < 3:
            self.problem(self.path, number, MALFORMED_LINE, f"{_clip(line)!r} is not '*\\tTYPE ID ID [ID ...]'")
            return
        members = [self._resolve(ref) for ref in fields[1:]]
        if None in members:
            missing = fields[1:][members.index(None)]
            self.problem(self.path, number, UNKNOWN_TARGET, f"equivalence names {missing}, which no T or E line defines")
            return
        self.out.equivalences.append(BratEquivalence(fields[0], members))
        self.report.not_carried["equivalence groups"] += 1


def _parse_fragments(offsets: str) -> list[tuple[int, int]] | None:
    spans = []
    for fragment in offsets.split(";"):
        match = _SPAN.match(fragment.strip())
        if not match:
            return None
        spans.append((int(match.group(1)), int(match.group(2))))
    return spans


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_brat_file(
    txt_path: str | os.PathLike,
    ann_path: str | os.PathLike | None = None,
    *,
    lenient: bool = False,
    report: ReadReport | None = None,
    doc_id: str | None = None,
) -> BratFile | None:
    """Read one note with everything its `.ann` says (events, attributes, notes).

    Returns None only in lenient mode, when the `.txt` itself is unusable (missing,
    empty, not UTF-8); the report says why.
    """
    txt_path = Path(txt_path)
    ann_path = Path(ann_path) if ann_path is not None else txt_path.with_suffix(".ann")
    own = ReadReport()
    parsed = _read_note(txt_path, ann_path, InputProblems(lenient, own), doc_id or txt_path.stem)
    warn_if_skipped(ann_path, own)
    if report is not None:
        report.merge(own)
    return parsed


def _read_note(txt_path: Path, ann_path: Path, problem: InputProblems, doc_id: str) -> BratFile | None:
    report = problem.report
    text = _read_text(txt_path, problem)
    if text is None:
        report.skipped_documents += 1
        return None
    lines = _read_ann_lines(ann_path, problem)
    parsed = _AnnParser(ann_path, text, problem).parse(lines or [])
    parsed.document.id = doc_id
    report.documents += 1
    return parsed


def read_brat_document(
    txt_path: str | os.PathLike,
    ann_path: str | os.PathLike | None = None,
    *,
    lenient: bool = False,
    report: ReadReport | None = None,
) -> Document | None:
    """One BRAT note as a Document with the source's own types (None: see read_brat_file)."""
    parsed = read_brat_file(txt_path, ann_path, lenient=lenient, report=report)
    return parsed.document if parsed else None


# ---------------------------------------------------------------- reading a folder


def _corpus_files(folder: Path, pattern: str) -> list[Path]:
    """Files under folder, skipping hidden ones (.ipynb_checkpoints, editor backups)."""
    return [p for p in folder.rglob(pattern) if not any(part.startswith(".") for part in p.relative_to(folder).parts)]


def _document_id(txt_path: Path, folder: Path) -> str:
    """Relative path without suffix: split folders (train/dev/test) stay distinct."""
    return txt_path.relative_to(folder).with_suffix("").as_posix()


def read_brat_files(
    folder: str | os.PathLike,
    *,
    lenient: bool = False,
    report: ReadReport | None = None,
    progress: bool = False,
) -> list[BratFile]:
    """Every `NAME.txt` under `folder` (recursively) with its `NAME.ann`, sorted by id."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, None, "not a folder of BRAT files")
    report = report if report is not None else ReadReport()
    own = ReadReport()
    problem = InputProblems(lenient, own)
    txts = sorted(_corpus_files(folder, "*.txt"), key=lambda p: _document_id(p, folder))
    for stray in sorted(set(_corpus_files(folder, "*.ann")) - {p.with_suffix(".ann") for p in txts}):
        problem(stray, None, MISSING_FILE, "no .txt beside the .ann")
    files = []
    for txt in tqdm(txts, desc=f"reading {folder.name}", unit="doc", disable=not progress):
        parsed = _read_note(txt, txt.with_suffix(".ann"), problem, _document_id(txt, folder))
        if parsed is not None:
            files.append(parsed)
    warn_if_skipped(folder, own)
    report.merge(own)
    return files


def read_brat_dir(
    folder: str | os.PathLike,
    *,
    lenient: bool = False,
    report: ReadReport | None = None,
    progress: bool = False,
) -> list[Document]:
    """Every BRAT note under `folder` as Documents with source types, sorted by id."""
    files = read_brat_files(folder, lenient=lenient, report=report, progress=progress)
    return [f.document for f in files]


def warn_if_skipped(source: str | os.PathLike, report: ReadReport) -> None:
    """One warning per lenient read that skipped something; the report lists each item."""
    if report.skipped:
        first = report.problems[0]
        message = f"{source}: {report.summary()} (lenient input; first: {first[0]}:{first[1]}: {first[2]})"
        warnings.warn(message, stacklevel=3)


# ---------------------------------------------------------------- writing


def _brat_ids(doc: Document) -> dict[str, str]:
    """Keep T ids when they already are valid and unique, else number them T1.."""
    ids = [e.id for e in doc.entities]
    if all(re.fullmatch(r"T\d+", i) for i in ids) and len(set(ids)) == len(ids):
        return {i: i for i in ids}
    return {e.id: f"T{n}" for n, e in enumerate(doc.entities, start=1)}


def _ann_lines(doc: Document) -> list[str]:
    ids = _brat_ids(doc)
    lines = []
    for entity in doc.entities:
        _check_spans(doc, entity)
        offsets = ";".join(f"{s} {e}" for s, e in entity.spans)
        text = _visible(" ".join(doc.text[s:e] for s, e in entity.spans))
        lines.append(f"{ids[entity.id]}\t{entity.type} {offsets}\t{text}")
    for n, rel in enumerate(doc.relations, start=1):
        for ref in (rel.head, rel.tail):
            if ref not in ids:
                raise InputError(None, None, f"document {doc.id}: relation R{n} names unknown entity {ref}")
        lines.append(f"R{n}\t{rel.type} Arg1:{ids[rel.head]} Arg2:{ids[rel.tail]}\t")
    negations = [e for e in doc.entities if e.negated is not None]
    for n, entity in enumerate(negations, start=1):
        value = "" if entity.negated else " false"
        lines.append(f"A{n}\t{NEGATED_ATTRIBUTE} {ids[entity.id]}{value}")
    return lines


def _check_spans(doc: Document, entity: Entity) -> None:
    for start, end in entity.spans:
        if not 0 <= start < end <= len(doc.text):
            raise InputError(None, None, f"document {doc.id}: entity {entity.id} span {start}-{end} is not inside the text")


# Each name must fit NAME_MAX (255 bytes) with the longest suffix the writer adds.
_MAX_NAME_BYTES = 255 - len(".ann" + TEMP_SUFFIX)
_MAX_ID_BYTES = 1024  # deep enough for any corpus layout, far below PATH_MAX
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def file_name_problem(doc_id: str) -> str | None:
    """Why a document id cannot name BRAT files inside an output folder (None: it can).

    An id is written as a relative path of plain names ('train/note1', what the reader
    gives). Anything that could climb out of the folder, or that the file system
    refuses, is turned down here rather than met as an OSError half-way through.
    """
    if not doc_id:
        return "it is empty"
    if _CONTROL.search(doc_id):
        return "it holds a control character (NUL, newline, ...)"
    try:
        size = len(doc_id.encode("utf-8"))
    except UnicodeEncodeError:
        return "it is not valid Unicode (a lone surrogate)"
    if doc_id.startswith(("/", "\\")):
        return "it is an absolute path"
    parts = re.split(r"[/\\]", doc_id)  # a backslash separates folders on Windows
    if any(part in ("", ".", "..") for part in parts):
        return "an empty, '.' or '..' part could lead outside the folder"
    if size > _MAX_ID_BYTES or any(len(part.encode("utf-8")) > _MAX_NAME_BYTES for part in parts):
        return f"it is too long for a file name (at most {_MAX_NAME_BYTES} bytes a part, {_MAX_ID_BYTES} in all)"
    return None


def check_file_names(docs: Iterable[Document], folder: str | os.PathLike, source: str | os.PathLike | None = None) -> None:
    """Refuse, before anything is written, an id that cannot be a file inside `folder`."""
    for doc in docs:
        problem = file_name_problem(doc.id)
        if problem:
            raise InputError(
                source, None, f"document id {_clip(doc.id)!r} cannot be a file name inside {folder}: {problem}; rename the document"
            )


def _document_stem(doc: Document, folder: Path, source: str | os.PathLike | None = None) -> Path:
    check_file_names([doc], folder, source)
    return folder / doc.id


def write_brat_document(doc: Document, folder: str | os.PathLike, *, source: str | os.PathLike | None = None) -> Path:
    """Write `<folder>/<id>.txt` (byte-exact) and `<id>.ann`; returns the .ann path.

    `source` (the input the document came from) is what an InputError names.
    """
    folder = Path(folder)
    stem = _document_stem(doc, folder, source)
    stem.parent.mkdir(parents=True, exist_ok=True)
    lines = _ann_lines(doc)  # validate before touching the disk
    txt_path, ann_path = Path(f"{stem}.txt"), Path(f"{stem}.ann")
    atomic_write_text(txt_path, doc.text)
    atomic_write_text(ann_path, "".join(line + "\n" for line in lines))
    return ann_path


def write_brat_dir(docs: Iterable[Document], folder: str | os.PathLike, *, source: str | os.PathLike | None = None) -> Path:
    folder = Path(folder)
    docs = list(docs)
    check_file_names(docs, folder, source)  # no half-written folder for one bad id
    folder.mkdir(parents=True, exist_ok=True)
    for doc in docs:
        write_brat_document(doc, folder, source=source)
    return folder
