"""The Kiwi / Fed-MedLoRA annotation schema and how each source corpus maps onto it.

One source of truth for entity and relation type names. Every other module (prompts,
metrics, partitioning, readers) imports the names from here.

A `CorpusMapping` says how one corpus's BRAT types become Kiwi types. Corpora that
annotate only part of the schema (PHEE has no tests or lab values, MACCROBAT no
negation-cue spans) list what they do annotate in `annotated_types`: a site must never
be trained or scored as if the types it does not annotate were absent from its notes.

A mapping is a YAML or JSON file (README.md, "Corpus mappings"); the built-in ones
(kiwi, maccrobat, phee) are such files in `mappings/`, and `get_mapping` takes either a
built-in name or the path of a user's file:

    entities: {Sign_symptom: problem, Lab_value: labvalue}
    relations: {MODIFY: {type: hasAttr, main: Arg2}}   # main: the argument that is the main entity
    negation: {attribute: POLARITY, values: [NEG]}     # optional; no values: a binary attribute
    annotated: [problem, labvalue, hasAttr]            # optional; default: the mapped types

A bad file is an `InputError` that names the file and the line.
"""

from __future__ import annotations

import bisect
import difflib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from fedmed_components.data.document import InputError

MAIN_TYPES: tuple[str, ...] = ("problem", "treatment", "test", "drug")

MODIFIER_TYPES: tuple[str, ...] = (
    "bodyloc",
    "condition",
    "course",
    "dosage",
    "duration",
    "form",
    "frequency",
    "labvalue",
    "negation",
    "reference_range",
    "route",
    "severity",
    "strength",
    "subject",
    "temporal",
    "uncertain",
)

ENTITY_TYPES: tuple[str, ...] = MAIN_TYPES + MODIFIER_TYPES

# Both link a main entity (head, BRAT Arg1) to one of its modifiers (tail, Arg2).
RELATION_TYPES: tuple[str, ...] = ("hasAttr", "hasTemporal")


def is_main_type(entity_type: str) -> bool:
    return entity_type in MAIN_TYPES


def is_modifier_type(entity_type: str) -> bool:
    return entity_type in MODIFIER_TYPES


def fits_schema(head_type: str, tail_type: str) -> bool:
    """A Kiwi relation always points from a main entity to a modifier."""
    return is_main_type(head_type) and is_modifier_type(tail_type)


@dataclass(frozen=True)
class RelationRule:
    """How one source relation type becomes a Kiwi relation."""

    kiwi_type: str
    # MACCROBAT writes MODIFY as modifier -> main; Kiwi wants main -> modifier.
    swap_arguments: bool = False


@dataclass(frozen=True)
class CorpusMapping:
    """How one corpus's source annotation maps onto the Kiwi schema."""

    name: str
    # source entity type -> Kiwi entity type; source types not listed are dropped.
    type_map: dict[str, str]
    # source relation type -> rule; relation types not listed have no Kiwi counterpart.
    relation_map: dict[str, RelationRule] = field(default_factory=dict)
    # (attribute name, value) pairs that mark the annotated entity negated; value None
    # matches a binary attribute (`A1 Negated T3`).
    negation_attributes: frozenset[tuple[str, str | None]] = frozenset()
    # Kiwi entity types this corpus annotates at all (partial-schema sites).
    annotated_types: frozenset[str] = frozenset(ENTITY_TYPES)
    # Kiwi relation types this corpus annotates; empty: do not score or train relations.
    annotated_relations: frozenset[str] = frozenset(RELATION_TYPES)

    def kiwi_type(self, source_type: str) -> str | None:
        """The Kiwi type for a source entity type, or None when it has no counterpart."""
        return self.type_map.get(source_type)

    def relation_rule(self, source_type: str) -> RelationRule | None:
        return self.relation_map.get(source_type)

    def marks_negated(self, name: str, value: str | None) -> bool:
        return (name, value) in self.negation_attributes


# ---------------------------------------------------------------- mapping files

MAPPING_SUFFIXES = (".yaml", ".yml", ".json")
MAPPINGS_FOLDER = Path(__file__).with_name("mappings")
BUILTIN_MAPPINGS = ("kiwi", "maccrobat", "phee")

_TOP_KEYS = ("entities", "relations", "negation", "annotated")
_RELATION_KEYS = ("type", "main")
_NEGATION_KEYS = ("attribute", "values")
_ARGUMENTS = ("Arg1", "Arg2")
_MAX_NODES = 100_000

_Where = tuple  # where a value sits: keys and list indices from the top of the file


def _mapping_error(path: Path, line: int | None, reason: str) -> InputError:
    return InputError(path, line, f"corpus mapping: {reason}")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# -- reading a YAML or JSON file into plain values and the line of each key


def _line_at(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _yaml_tree(path: Path, text: str) -> tuple[object, dict[_Where, int]]:
    """The file as dicts, lists and strings (scalars stay as written: `No` and `true`
    are names, not booleans), with the line of every key and list item."""
    import yaml

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        what = ", ".join(_one_line(p) for p in (exc.context, exc.problem) if p)
        raise _mapping_error(path, mark.line + 1 if mark else None, f"not valid YAML: {what}") from None
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow (NUL, ...)
        what = f"character #x{exc.character:04x}: {exc.reason}" if isinstance(exc.character, int) else _one_line(exc)
        raise _mapping_error(path, _line_at(text, exc.position), f"not valid YAML: {what}") from None
    except yaml.YAMLError as exc:
        raise _mapping_error(path, None, f"not valid YAML: {_one_line(exc)}") from None
    lines: dict[_Where, int] = {}
    budget = [_MAX_NODES]  # aliases share nodes: a few lines can stand for billions of values

    def plain(node, where: _Where):
        budget[0] -= 1
        if budget[0] < 0:
            raise _mapping_error(path, node.start_mark.line + 1, f"more than {_MAX_NODES:,} values (aliases expanded): not a mapping file")
        if isinstance(node, yaml.MappingNode):
            out = {}
            for key_node, value_node in node.value:
                line = key_node.start_mark.line + 1
                if not isinstance(key_node, yaml.ScalarNode):
                    raise _mapping_error(path, line, f"{_where(where)}: a key must be a name")
                key = key_node.value
                if key in out:
                    raise _mapping_error(path, line, f"{_where(where + (key,))} is given twice")
                lines[where + (key,)] = line
                out[key] = plain(value_node, where + (key,))
            return out
        if isinstance(node, yaml.SequenceNode):
            items = []
            for i, item in enumerate(node.value):
                lines[where + (i,)] = item.start_mark.line + 1
                items.append(plain(item, where + (i,)))
            return items
        return None if node.tag == "tag:yaml.org,2002:null" else node.value

    return (plain(root, ()) if root is not None else None), lines


_JSON_SPACE = re.compile(r"[ \t\n\r]*")


def _json_tree(path: Path, text: str) -> tuple[object, dict[_Where, int]]:
    """The file as plain values (true/false/numbers as the strings a YAML file gives),
    with the line of every key and list item."""
    try:
        json.loads(text)  # the standard parser's verdict and line on malformed JSON
    except json.JSONDecodeError as exc:
        raise _mapping_error(path, exc.lineno, f"not valid JSON: {exc.msg} (column {exc.colno})") from None
    decoder, lines = json.JSONDecoder(), {}
    breaks = [i for i, ch in enumerate(text) if ch == "\n"]

    def line_at(pos: int) -> int:
        return bisect.bisect_left(breaks, pos) + 1

    def skip(pos: int) -> int:
        return _JSON_SPACE.match(text, pos).end()

    def value(pos: int, where: _Where):  # -> (value, end); the text is valid JSON
        pos = skip(pos)
        if text[pos] in "{[":
            closing, out = ("}", {}) if text[pos] == "{" else ("]", [])
            pos = skip(pos + 1)
            while text[pos] != closing:
                if closing == "}":
                    key, end = decoder.raw_decode(text, pos)
                    if key in out:
                        raise _mapping_error(path, line_at(pos), f"{_where(where + (key,))} is given twice")
                    lines[where + (key,)] = line_at(pos)
                    out[key], pos = value(skip(end) + 1, where + (key,))  # past the ':'
                else:
                    lines[where + (len(out),)] = line_at(pos)
                    item, pos = value(pos, where + (len(out),))
                    out.append(item)
                pos = skip(pos)
                if text[pos] == ",":
                    pos = skip(pos + 1)
            return out, pos + 1
        scalar, end = decoder.raw_decode(text, pos)
        if isinstance(scalar, bool):
            scalar = "true" if scalar else "false"
        elif isinstance(scalar, (int, float)):
            scalar = text[pos:end]
        return scalar, end

    return value(0, ())[0], lines


def _read_tree(path: Path) -> tuple[object, dict[_Where, int]]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise _mapping_error(path, None, "no such mapping file") from None
    except OSError as exc:
        raise _mapping_error(path, None, f"cannot read: {exc.strerror}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _mapping_error(path, data.count(b"\n", 0, exc.start) + 1, f"not UTF-8 text ({exc.reason})") from None
    reader = _json_tree if path.suffix.lower() == ".json" else _yaml_tree
    try:
        return reader(path, text)
    except RecursionError:
        raise _mapping_error(path, None, "nested too deeply") from None


# -- checking what the file says


def _where(where: _Where) -> str:
    return ".".join(str(part) for part in where) or "the file"


def _suggest(word: str, known) -> str:
    close = difflib.get_close_matches(word, list(known), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


class _Checker:
    """Turns the plain values of a mapping file into a CorpusMapping, or says where it is wrong."""

    def __init__(self, path: Path, lines: dict[_Where, int]):
        self.path = path
        self.lines = lines

    def fail(self, where: _Where, reason: str) -> InputError:
        line = None
        for depth in range(len(where), 0, -1):  # the key itself, else the nearest key above it
            line = self.lines.get(where[:depth])
            if line is not None:
                break
        return _mapping_error(self.path, line, reason)

    def table(self, value, where: _Where, what: str) -> dict:
        if not isinstance(value, dict):
            raise self.fail(where, f"{_where(where)} must be a mapping ({what})")
        return value

    def keys(self, value: dict, where: _Where, known: tuple[str, ...]) -> None:
        for key in value:
            if key not in known:
                raise self.fail(where + (key,), f"unknown key {key!r} in {_where(where)}{_suggest(key, known)} (known: {', '.join(known)})")

    def name(self, value, where: _Where, what: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(where, f"{_where(where)} must be {what}, not {value!r}")
        return value

    def choice(self, value, where: _Where, known: tuple[str, ...], what: str) -> str:
        value = self.name(value, where, what)
        if value not in known:
            raise self.fail(where, f"{_where(where)}: unknown {what} {value!r}{_suggest(value, known)} (known: {', '.join(known)})")
        return value

    def mapping(self, name: str, data) -> CorpusMapping:
        if data is None:
            raise _mapping_error(self.path, None, "the file is empty; it needs at least an `entities:` table")
        data = self.table(data, (), "entities, relations, negation, annotated")
        self.keys(data, (), _TOP_KEYS)
        if "entities" not in data:
            raise _mapping_error(self.path, None, "no `entities:` table (source type: schema type)")
        type_map = self.entities(data["entities"])
        relation_map = self.relations(data.get("relations"))
        negation = self.negation(data.get("negation"))
        types, relations = self.annotated(data.get("annotated"))
        return CorpusMapping(
            name=name,
            type_map=type_map,
            relation_map=relation_map,
            negation_attributes=negation,
            annotated_types=types if types is not None else frozenset(type_map.values()),
            annotated_relations=relations if relations is not None else frozenset(r.kiwi_type for r in relation_map.values()),
        )

    def entities(self, value) -> dict[str, str]:
        table = self.table(value, ("entities",), "source type: schema type")
        if not table:
            raise self.fail(("entities",), "entities maps no source type")
        return {src: self.choice(kiwi, ("entities", src), ENTITY_TYPES, "schema entity type") for src, kiwi in table.items()}

    def relations(self, value) -> dict[str, RelationRule]:
        if value is None:
            return {}
        table = self.table(value, ("relations",), "source relation: {type: ..., main: Arg1 or Arg2}")
        rules = {}
        for src, rule in table.items():
            where = ("relations", src)
            rule = self.table(rule, where, "{type: hasAttr, main: Arg1}")
            self.keys(rule, where, _RELATION_KEYS)
            if "type" not in rule:
                raise self.fail(where, f"{_where(where)} needs a type ({', '.join(RELATION_TYPES)})")
            kiwi = self.choice(rule["type"], where + ("type",), RELATION_TYPES, "schema relation type")
            main = self.choice(rule.get("main", "Arg1"), where + ("main",), _ARGUMENTS, "main argument")
            rules[src] = RelationRule(kiwi, swap_arguments=main == "Arg2")
        return rules

    def negation(self, value) -> frozenset[tuple[str, str | None]]:
        if value is None:
            return frozenset()
        entries = value if isinstance(value, list) else [value]
        marks = set()
        for i, entry in enumerate(entries):
            where = ("negation", i) if isinstance(value, list) else ("negation",)
            entry = self.table(entry, where, "{attribute: NAME, values: [VALUE, ...]}")
            self.keys(entry, where, _NEGATION_KEYS)
            attribute = self.name(entry.get("attribute"), where + ("attribute",), "an attribute name")
            if "values" not in entry:  # a binary attribute: `A1 Negated T3`
                marks.add((attribute, None))
                continue
            values = entry["values"]
            values = values if isinstance(values, list) else [values]
            if not values:
                raise self.fail(where + ("values",), f"{_where(where + ('values',))} is empty (leave it out for a binary attribute)")
            for j, v in enumerate(values):
                at = where + ("values", j) if isinstance(entry["values"], list) else where + ("values",)
                marks.add((attribute, self.name(v, at, "an attribute value")))
        return frozenset(marks)

    def annotated(self, value) -> tuple[frozenset[str] | None, frozenset[str] | None]:
        """Entity and relation types the corpus annotates (None: the mapped ones)."""
        if value is None:
            return None, None
        if not isinstance(value, list) or not value:
            raise self.fail(("annotated",), "annotated must be a non-empty list of schema types")
        known = ENTITY_TYPES + RELATION_TYPES
        names = [self.choice(v, ("annotated", i), known, "schema type") for i, v in enumerate(value)]
        types = frozenset(n for n in names if n in ENTITY_TYPES)
        relations = frozenset(n for n in names if n in RELATION_TYPES)
        return types or None, relations or None


def load_mapping_file(path: str | os.PathLike, name: str | None = None) -> CorpusMapping:
    """A CorpusMapping from a YAML (.yaml/.yml) or JSON (.json) file; named after the file."""
    path = Path(path)
    data, lines = _read_tree(path)
    return _Checker(path, lines).mapping(name or path.stem, data)


def is_mapping_file(name: str) -> bool:
    """Does a --mapping value name a file rather than a built-in mapping?"""
    return name.lower().endswith(MAPPING_SUFFIXES) or os.sep in name or "/" in name or Path(name).is_file()


# (resolved path, mtime, size) -> mapping: a file read once per process unless it changes
_FILE_CACHE: dict[tuple[str, int, int], CorpusMapping] = {}


def _cached_file(path: Path) -> CorpusMapping:
    try:
        stat = path.stat()
    except OSError:
        return load_mapping_file(path)  # says why it cannot be read
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _FILE_CACHE:
        _FILE_CACHE[key] = load_mapping_file(path)
    return _FILE_CACHE[key]


MAPPINGS: dict[str, CorpusMapping] = {name: load_mapping_file(MAPPINGS_FOLDER / f"{name}.yaml") for name in BUILTIN_MAPPINGS}


def get_mapping(name: str | os.PathLike | CorpusMapping) -> CorpusMapping:
    """A built-in mapping by name (any case) or a user's mapping file by path."""
    if isinstance(name, CorpusMapping):
        return name
    if isinstance(name, os.PathLike):
        return _cached_file(Path(name))
    if name.lower() in MAPPINGS:
        return MAPPINGS[name.lower()]
    if is_mapping_file(name):
        return _cached_file(Path(name))
    known = ", ".join(sorted(MAPPINGS))
    raise ValueError(f"unknown corpus mapping {name!r} (known: {known}; or the path of a .yaml / .json mapping file)")
