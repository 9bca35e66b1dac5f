"""Model output back to character offsets in the input sentence.

Generated text is not trusted to copy the sentence exactly. For HTML answers the tags
are stripped to get the model's version of the sentence ("plain"), plain is aligned
to the real sentence (difflib matching blocks), and each tagged fragment is located
in the sentence: exactly, then ignoring case, then ignoring whitespace differences,
taking the occurrence nearest to where the alignment puts it (so a repeated mention
maps to the one the model tagged). JSON items carry no position: NER items are placed
in sentence order; modifier items in order and as near their main entity as possible
(pass ``main=``), which leaves a few repeated cue words ambiguous.

Dropped, each recorded in `ParseResult.problems`: unknown classes, empty spans,
unclosed tags, fragments that are not in the sentence (hallucinations). A stray
``<span>`` without a class while a span is open is read as its missing ``</span>``.
``failed`` is True when the output could not be used at all: tags or JSON items were
present but nothing could be placed, the JSON does not parse, or an HTML answer is
empty. A sentence with no entities is not a failure.
"""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass, field

from fedmed_components.data.schema import MAIN_TYPES, MODIFIER_TYPES

_TAG = re.compile(r"<\s*(/?)\s*(span|main)\b([^>]*)>", re.IGNORECASE)
_CLASS = re.compile(r"""class\s*=\s*["']?([\w-]+)""", re.IGNORECASE)
_FENCE = re.compile(r"```(?:json|html)?\s*(.*?)```", re.IGNORECASE | re.DOTALL)

Span = tuple[str, int, int]


@dataclass
class ParseResult:
    spans: list[Span] = field(default_factory=list)
    failed: bool = False
    problems: list[str] = field(default_factory=list)


# ------------------------------------------------------------------ locating text


def _whole_words(found: list[tuple[int, int]], sentence: str) -> list[tuple[int, int]]:
    """The occurrences not cut out of a longer word ("no" in "no edema", not in "known")."""

    def clean(start: int, end: int) -> bool:
        left = start == 0 or not (sentence[start - 1].isalnum() and sentence[start].isalnum())
        right = end == len(sentence) or not (sentence[end - 1].isalnum() and sentence[end].isalnum())
        return left and right

    return [w for w in found if clean(*w)] or found


def _find_all(needle: str, haystack: str) -> list[tuple[int, int]]:
    found, start = [], haystack.find(needle)
    while start >= 0:
        found.append((start, start + len(needle)))
        start = haystack.find(needle, start + 1)
    return found


def _occurrences(fragment: str, sentence: str) -> list[tuple[int, int]]:
    """Where fragment occurs: exact, else case-insensitive, else whitespace-insensitive."""
    found = _find_all(fragment, sentence)
    if not found and len(sentence.lower()) == len(sentence):  # lower() keeps offsets
        found = _find_all(fragment.lower(), sentence.lower())
    words = fragment.split()
    if not found and words:
        loose = r"\s*".join(re.escape(w) for w in words)
        found = [(m.start(), m.end()) for m in re.finditer(loose, sentence, re.IGNORECASE)]
    return _whole_words(found, sentence)


def locate(fragment: str, sentence: str, expected: float) -> tuple[int, int] | None:
    """The occurrence of `fragment` in `sentence` starting nearest to `expected`."""
    found = _occurrences(fragment, sentence)
    if not found:
        return None
    return min(found, key=lambda where: (abs(where[0] - expected), where[0]))


class _Alignment:
    """Maps positions in the model's plain text to positions in the sentence."""

    def __init__(self, plain: str, sentence: str):
        if plain == sentence:  # the usual case: a faithful copy, identity map
            self.blocks = [difflib.Match(0, 0, len(plain))]
        else:
            matcher = difflib.SequenceMatcher(None, plain, sentence, autojunk=False)
            self.blocks = [b for b in matcher.get_matching_blocks() if b.size]
        self.scale = len(sentence) / max(len(plain), 1)

    def position(self, i: int) -> float:
        before = [b for b in self.blocks if b.a <= i]
        if not before:
            return i * self.scale
        block = before[-1]
        return block.b + min(i - block.a, block.size)


# ------------------------------------------------------------------ HTML


def _strip_tags(output: str) -> tuple[str, list[tuple[str, int, int]], list[str]]:
    """Untagged text, (class, start, end) of each closed span within it, and problems."""
    plain, fragments, problems, stack = [], [], [], []
    cursor = length = 0
    for match in _TAG.finditer(output):
        piece = output[cursor : match.start()]
        plain.append(piece)
        length += len(piece)
        cursor = match.end()
        closing, name, attrs = match.group(1), match.group(2).lower(), match.group(3)
        if name == "main":
            continue  # the input's marker copied back: not an answer tag
        cls = _CLASS.search(attrs)
        if not closing and (cls or not stack):
            stack.append(((cls.group(1) if cls else "").lower(), length))
        elif stack:  # </span>, or a class-less <span> standing for the missing slash
            kind, start = stack.pop()
            fragments.append((kind, start, length))
        else:
            problems.append("closing tag without an opening tag")
    plain.append(output[cursor:])
    problems += [f'unclosed <span class="{kind}">' for kind, _ in stack]
    return "".join(plain), fragments, problems


def _place_fragments(sentence: str, plain: str, fragments, allowed: set[str], result: ParseResult) -> None:
    alignment = _Alignment(plain, sentence)
    for kind, start, end in fragments:
        text = plain[start:end]
        stripped = text.strip()
        if kind not in allowed:
            result.problems.append(f"unknown class {kind!r}")
        elif not stripped:
            result.problems.append(f"empty {kind!r} span")
        else:
            lead = len(text) - len(text.lstrip())
            where = locate(stripped, sentence, alignment.position(start + lead))
            if where is None:
                result.problems.append(f"not in the sentence: {stripped!r}")
            else:
                result.spans.append((kind, *where))


def _parse_html(output: str, sentence: str, allowed: set[str]) -> ParseResult:
    result = ParseResult()
    if not output.strip():
        return ParseResult(failed=bool(sentence.strip()), problems=["empty output"])
    fenced = _FENCE.search(output)
    plain, fragments, result.problems = _strip_tags(fenced.group(1) if fenced else output)
    _place_fragments(sentence, plain, fragments, allowed, result)
    result.failed = bool(fragments or result.problems) and not result.spans
    return result


# ------------------------------------------------------------------ JSON


def _json_list(output: str):
    """The first JSON list in the output (bare, fenced or inside chatter); None if none."""
    fenced = _FENCE.search(output)
    text = fenced.group(1) if fenced else output
    decoder = json.JSONDecoder()
    for start in [m.start() for m in re.finditer(r"[\[{]", text)]:
        try:
            value, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        except RecursionError:  # nested deeper than any answer (a model stuck on '['): give up
            return None
        if isinstance(value, dict):  # {"entities": [...]}
            value = next((v for v in value.values() if isinstance(v, list)), None)
        if isinstance(value, list):
            return value
    return None


def _json_items(items: list, sentence: str, allowed: set[str], result: ParseResult) -> list[tuple[str, list[tuple[int, int]]]]:
    """(type, occurrences in the sentence) of each usable item, in answer order."""
    usable = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("text"), str):
            result.problems.append(f"malformed item {item!r}")
            continue
        kind, text = str(item.get("type", item.get("class", ""))).lower(), item["text"].strip()
        found = _occurrences(text, sentence) if text else []
        if kind not in allowed:
            result.problems.append(f"unknown class {kind!r}")
        elif not found:
            result.problems.append(f"not in the sentence: {text!r}")
        else:
            usable.append((kind, found))
    return usable


def _place_in_order(usable) -> list[Span]:
    """Items come in sentence order: each at its first occurrence after the previous item."""
    spans, cursor = [], 0
    for kind, found in usable:
        start, end = min([w for w in found if w[0] >= cursor] or found)
        spans.append((kind, start, end))
        cursor = end
    return spans


def _gap(a: tuple[int, int], b: tuple[int, int]) -> int:
    return max(a[0] - b[1], b[0] - a[1], 0)


def _cost(where: tuple[int, int], anchor: tuple[int, int]) -> int:
    """Distance to the main entity; on a tie the occurrence before it wins (cues precede)."""
    return 2 * _gap(where, anchor) + (where[0] >= anchor[1])


def _place_near(usable, main: Span) -> list[Span]:
    """Modifiers in sentence order and as close to their main entity as that allows.

    A repeated text ("p.o." after each drug of a list) gets the occurrence that keeps
    the items in order with the least total distance to the main entity (a small
    dynamic programme); if no in-order choice exists, each item goes nearest the main.
    """
    if not usable:
        return []
    anchor = (main[1], main[2])
    layers: list[list[tuple[int, int, tuple[int, int]]]] = []  # per item: (cost, back link, occurrence)
    previous = [(0, -1, (0, 0))]  # a virtual start before the sentence
    for _, found in usable:
        layer = []
        for where in found:
            options = [(cost + _cost(where, anchor), k) for k, (cost, _, before) in enumerate(previous) if before[1] <= where[0]]
            if options:
                layer.append((*min(options), where))
        if not layer:
            return [(kind, *min(found, key=lambda w: (_cost(w, anchor), w[0]))) for kind, found in usable]
        layers.append(layer)
        previous = layer
    chosen, k = [], min(range(len(previous)), key=lambda i: previous[i][0])
    for layer in reversed(layers):
        _, k, where = layer[k]
        chosen.append(where)
    return [(kind, *where) for (kind, _), where in zip(usable, reversed(chosen))]


def _parse_json(output: str, sentence: str, allowed: set[str], main: Span | None) -> ParseResult:
    items = _json_list(output)
    if items is None:
        return ParseResult(failed=True, problems=["no JSON list in the output"])
    result = ParseResult()
    usable = _json_items(items, sentence, allowed, result)
    result.spans = _place_near(usable, main) if main else _place_in_order(usable)
    result.failed = bool(items) and not result.spans
    return result


# ------------------------------------------------------------------ public


def _parse(output: str, sentence: str, output_format: str, allowed, main: Span | None = None) -> ParseResult:
    allowed = {t.lower() for t in allowed}
    if output_format == "json":
        result = _parse_json(output, sentence, allowed, main)
    elif output_format == "html":
        result = _parse_html(output, sentence, allowed)
    else:
        raise ValueError(f"output_format must be 'html' or 'json', not {output_format!r}")
    result.spans = sorted(set(result.spans), key=lambda s: (s[1], s[2], s[0]))
    return result


def parse_ner(output: str, sentence: str, output_format: str = "html", allowed_types=MAIN_TYPES) -> ParseResult:
    """Main entities (type, start, end) in `sentence` from a model's NER answer."""
    return _parse(output, sentence, output_format, allowed_types)


def parse_modifiers(
    output: str, sentence: str, output_format: str = "html", allowed_types=MODIFIER_TYPES, main: Span | None = None
) -> ParseResult:
    """Modifiers (type, start, end) in `sentence` from a model's modifier answer.

    `main` (the marked entity) places JSON items whose text occurs more than once at
    the occurrence nearest to it; HTML answers carry their own positions.
    """
    return _parse(output, sentence, output_format, allowed_types, main)
