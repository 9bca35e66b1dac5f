"""The document contract shared by every reader, writer, prompt and metric.

One `Document` is one clinical note (or one sentence for sentence corpora such as
PHEE). Offsets are Python string indices into `text`; discontinuous entities carry
several spans. JSONL holds one `Document.to_dict()` per line (README.md, "Data").
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from fedmed_components.data.files import atomic_open


class InputError(ValueError):
    """Bad input that a user must fix; the message names the file and line."""

    def __init__(self, path: str | os.PathLike | None, line: int | None, reason: str):
        self.path = str(path) if path is not None else None
        self.line = line
        self.reason = reason
        where = self.path or "<input>"
        if line is not None:
            where = f"{where}:{line}"
        super().__init__(f"{where}: {reason}")


@dataclass
class ReadReport:
    """What a lenient read skipped (per kind and item by item) and what it set aside."""

    counts: Counter = field(default_factory=Counter)
    problems: list[tuple[str, int | None, str]] = field(default_factory=list)
    # Well-formed annotation the Document contract cannot carry (kept on BratFile).
    not_carried: Counter = field(default_factory=Counter)
    documents: int = 0
    skipped_documents: int = 0

    def add(self, path: str | os.PathLike, line: int | None, kind: str, detail: str) -> None:
        self.counts[kind] += 1
        self.problems.append((str(path), line, f"{kind}: {detail}"))

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())

    def merge(self, other: ReadReport) -> None:
        self.counts.update(other.counts)
        self.problems.extend(other.problems)
        self.not_carried.update(other.not_carried)
        self.documents += other.documents
        self.skipped_documents += other.skipped_documents

    def summary(self) -> str:
        if not self.skipped:
            return "nothing skipped"
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(self.counts.items()))
        return f"skipped {self.skipped} item(s): {kinds}"

    def to_dict(self) -> dict:
        return {
            "documents": self.documents,
            "skipped_documents": self.skipped_documents,
            "skipped": dict(sorted(self.counts.items())),
            "problems": [{"file": f, "line": ln, "reason": r} for f, ln, r in self.problems],
            "not_carried": dict(sorted(self.not_carried.items())),
        }


@dataclass
class Entity:
    id: str
    type: str
    spans: list[tuple[int, int]]
    text: str
    negated: bool | None = None

    @property
    def start(self) -> int:
        return min(s for s, _ in self.spans)

    @property
    def end(self) -> int:
        return max(e for _, e in self.spans)

    def to_dict(self) -> dict:
        out = {"id": self.id, "type": self.type, "spans": [list(s) for s in self.spans], "text": self.text}
        if self.negated is not None:
            out["negated"] = self.negated
        return out

    @classmethod
    def from_dict(cls, d: dict) -> Entity:
        return cls(
            id=str(d["id"]),
            type=str(d["type"]),
            spans=[(int(s), int(e)) for s, e in d["spans"]],
            text=str(d.get("text", "")),
            negated=_optional(d, "negated", bool),
        )


@dataclass
class Relation:
    type: str
    head: str  # main entity id
    tail: str  # modifier entity id

    def to_dict(self) -> dict:
        return {"type": self.type, "head": self.head, "tail": self.tail}

    @classmethod
    def from_dict(cls, d: dict) -> Relation:
        return cls(type=str(d["type"]), head=str(d["head"]), tail=str(d["tail"]))


@dataclass
class Document:
    id: str
    text: str
    site: str | None = None
    entities: list[Entity] = field(default_factory=list)
    relations: list[Relation] = field(default_factory=list)

    def entity(self, entity_id: str) -> Entity:
        for ent in self.entities:
            if ent.id == entity_id:
                return ent
        raise KeyError(entity_id)

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "site": self.site,
            "text": self.text,
            "entities": [e.to_dict() for e in self.entities],
            "relations": [r.to_dict() for r in self.relations],
        }

    @classmethod
    def from_dict(cls, d: dict) -> Document:
        return cls(
            id=str(d["id"]),
            site=_optional(d, "site", str),
            text=str(d["text"]),
            entities=[Entity.from_dict(e) for e in d.get("entities", [])],
            relations=[Relation.from_dict(r) for r in d.get("relations", [])],
        )


def _optional(d: dict, key: str, kind: type):
    """d[key] when it is absent, null or of `kind`; a wrong type is a bad document."""
    value = d.get(key)
    if value is not None and not isinstance(value, kind):
        raise TypeError(f"{key!r} must be {kind.__name__} or null, not {type(value).__name__}")
    return value


# What a hostile line can make json.loads / from_dict raise: bad JSON, missing keys,
# wrong types, Infinity as an offset (OverflowError), nesting deeper than the stack.
DOCUMENT_PARSE_ERRORS = (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError, OverflowError, RecursionError)


def write_jsonl(docs: Iterable[Document], path: str | os.PathLike) -> Path:
    """Write documents atomically: a reader never sees a half-written file."""
    path = Path(path)
    with atomic_open(path, "w", encoding="utf-8", newline="") as fh:
        for doc in docs:
            fh.write(json.dumps(doc.to_dict(), ensure_ascii=False) + "\n")
    return path


def iter_jsonl(path: str | os.PathLike) -> Iterator[Document]:
    path = Path(path)
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise InputError(path, None, f"cannot open: {exc.strerror}") from exc
    with fh:
        # decoded line by line: a text-mode read fails a whole buffer ahead of the bad line
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InputError(path, lineno, f"not UTF-8 text ({exc.reason})") from exc
            if not line.strip():
                continue
            try:
                yield Document.from_dict(json.loads(line))
            except DOCUMENT_PARSE_ERRORS as exc:
                raise InputError(path, lineno, f"not a document object: {exc}") from exc


def read_jsonl(path: str | os.PathLike) -> list[Document]:
    return list(iter_jsonl(path))
