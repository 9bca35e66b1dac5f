"""Model output back to character offsets in the input sentence.

Generated text is not trusted to copy the sentence exactly: tags are stripped to get
the model's version of the sentence, and each tagged fragment is located in the real
sentence, preferring the occurrence nearest where the model put it (so repeated
mentions map to the right one). Unknown classes, unclosed tags and fragments that are
not in the sentence (hallucinations) are dropped and recorded as problems.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from fedmed_components.schema import MAIN_TYPES, MODIFIER_TYPES

_TAG = re.compile(r"<\s*(/?)\s*(span|main)\b([^>]*)>", re.IGNORECASE)
_CLASS = re.compile(r"""class\s*=\s*["']?([\w-]+)""", re.IGNORECASE)
_CHATTY = re.compile(r"^\s*(?:sure[,!.]?|here is[^:\n]*:|output:|answer:|sentence:)\s*", re.IGNORECASE)

Span = tuple[str, int, int]


@dataclass
class ParseResult:
    spans: list[Span] = field(default_factory=list)
    failed: bool = False
    problems: list[str] = field(default_factory=list)


def _tagged_fragments(output: str) -> tuple[str, list[tuple[str, int, int]], list[str]]:
    """Untagged text plus (class, start, end) of each closed span within it."""
    plain, fragments, problems, stack = [], [], [], []
    cursor, length = 0, 0
    for match in _TAG.finditer(output):
        piece = output[cursor : match.start()]
        plain.append(piece)
        length += len(piece)
        cursor = match.end()
        closing, name, attrs = match.group(1), match.group(2).lower(), match.group(3)
        if name == "main":
            continue  # the input's marker copied back: not an answer tag
        if not closing:
            cls = _CLASS.search(attrs)
            stack.append((cls.group(1).lower() if cls else "", length))
        elif stack:
            cls, start = stack.pop()
            fragments.append((cls, start, length))
        else:
            problems.append("closing tag without an opening tag")
    tail = output[cursor:]
    plain.append(tail)
    problems += [f"unclosed <span class=\"{cls}\">" for cls, _ in stack]
    return "".join(plain), fragments, problems


def _locate(fragment: str, sentence: str, expected: float) -> tuple[int, int] | None:
    """The occurrence of fragment in sentence nearest the expected start."""
    for haystack, needle in ((sentence, fragment), (sentence.lower(), fragment.lower())):
        starts = [m.start() for m in re.finditer(re.escape(needle), haystack)]
        if starts:
            best = min(starts, key=lambda s: (abs(s - expected), s))
            return best, best + len(needle)
    return None


def _align(sentence: str, plain: str, fragments, allowed: set[str]) -> ParseResult:
    result = ParseResult()
    scale = len(sentence) / max(len(plain), 1)
    exact = plain == sentence
    for cls, start, end in fragments:
        text = plain[start:end]
        stripped = text.strip()
        if cls not in allowed:
            result.problems.append(f"unknown class {cls!r}")
            continue
        if not stripped:
            result.problems.append("empty span")
            continue
        if exact:
            lead = len(text) - len(text.lstrip())
            result.spans.append((cls, start + lead, start + lead + len(stripped)))
            continue
        where = _locate(stripped, sentence, start * scale)
        if where is None:
            result.problems.append(f"not in the sentence: {stripped!r}")
            continue
        result.spans.append((cls, *where))
    result.spans = sorted(set(result.spans), key=lambda s: (s[1], s[2], s[0]))
    return result


def _parse_html(output: str, sentence: str, allowed: set[str]) -> ParseResult:
    output = _CHATTY.sub("", output.strip())
    plain, fragments, problems = _tagged_fragments(output)
    result = _align(sentence, plain, fragments, allowed)
    result.problems = problems + result.problems
    result.failed = bool(fragments or problems) and not result.spans and bool(result.problems)
    return result


def _parse_json(output: str, sentence: str, allowed: set[str]) -> ParseResult:
    match = re.search(r"\[.*\]", output, re.DOTALL)
    try:
        items = json.loads(match.group(0)) if match else None
    except json.JSONDecodeError:
        items = None
    if not isinstance(items, list):
        return ParseResult(failed=True, problems=["no JSON list in the output"])
    result = ParseResult()
    cursor = 0
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("text"), str):
            result.problems.append(f"malformed item {item!r}")
            continue
        cls, text = str(item.get("type", "")).lower(), item["text"].strip()
        if cls not in allowed:
            result.problems.append(f"unknown class {cls!r}")
            continue
        where = _locate(text, sentence, cursor) if text else None
        if where is None:
            result.problems.append(f"not in the sentence: {text!r}")
            continue
        result.spans.append((cls, *where))
        cursor = where[1]
    result.spans = sorted(set(result.spans), key=lambda s: (s[1], s[2], s[0]))
    result.failed = bool(items) and not result.spans
    return result


def _parse(output: str, sentence: str, output_format: str, allowed) -> ParseResult:
    allowed = {t.lower() for t in allowed}
    if output_format == "json":
        return _parse_json(output, sentence, allowed)
    return _parse_html(output, sentence, allowed)


def parse_ner(output: str, sentence: str, output_format: str = "html", allowed_types=MAIN_TYPES) -> ParseResult:
    return _parse(output, sentence, output_format, allowed_types)


def parse_modifiers(output: str, sentence: str, output_format: str = "html", allowed_types=MODIFIER_TYPES) -> ParseResult:
    return _parse(output, sentence, output_format, allowed_types)
