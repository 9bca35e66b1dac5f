"""Sentence segmentation that keeps character offsets (clinical-aware).

Rules, in order:

- A blank line always ends a segment. A single line break ends one too (notes put
  section headers, list items and paragraphs on their own lines), unless it is a soft
  wrap: the line ends in a letter, digit or comma and the next starts in lower case.
- Inside a line, a segment ends after ``.``, ``!`` or ``?`` (plus closing quotes or
  brackets) followed by space and an upper-case letter, a digit or an opening bracket,
  except after clinical and title abbreviations ("Dr.", "b.i.d.", "p.o.", "e.g."),
  after an initial that follows another abbreviation ("Dr. J. Smith"), and after a
  list number at the start of a line ("1. Hypertension."). Decimals ("2.5 mg") never
  split because no space follows their dot.
- Every segment is ``text[start:end]`` with surrounding whitespace stripped; no
  character of text is moved, so entity offsets map back by adding ``start``.
"""

from __future__ import annotations

import re

ABBREVIATIONS = frozenset(
    """dr mr mrs ms prof st vs no nos approx e.g i.e b.i.d t.i.d q.i.d q.d q.o.d
    p.o p.r p.r.n q.h.s h.s a.m p.m i.v i.m s.c s.q q.h q.4h q.6h q.8h q.12h fig ref
    dept hosp mt sr jr""".split()
)
_BOUNDARY = re.compile(r"[.!?][\"')\]]*(?=\s+[A-Z0-9(\[])")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_LIST_MARKER = re.compile(r"\s*(?:\d{1,3}|[a-zA-Z])\s?$")


def _word_before(text: str, dot: int) -> tuple[int, str]:
    """Start and text of the token (letters, digits, inner dots) ending at `dot`."""
    start = dot
    while start > 0 and (text[start - 1].isalnum() or text[start - 1] == "."):
        start -= 1
    return start, text[start:dot]


def _keeps_sentence_going(text: str, line_start: int, dot: int) -> bool:
    """Whether the punctuation at `dot` is an abbreviation, an initial or a list number."""
    if text[dot] != ".":
        return False
    start, word = _word_before(text, dot)
    if word.lower() in ABBREVIATIONS:
        return True
    if _LIST_MARKER.fullmatch(text[line_start:dot]):
        return True  # "1. Disseminated intravascular coagulation." stays one item
    if len(word) == 1 and word.isalpha():
        # An initial after a title or another initial ("Dr. J. Smith"); a lone capital
        # after an ordinary word ends a sentence ("hepatitis C. The ...").
        before = text[max(line_start, start - 6) : start].rstrip()
        return word.islower() or before.endswith(".")
    return False


def _strip(text: str, start: int, end: int) -> tuple[int, int] | None:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return (start, end) if end > start else None


def _is_soft_wrap(text: str, line_end: int, next_start: int) -> bool:
    """A line break inside a sentence of hard-wrapped prose."""
    last = text[:line_end].rstrip(" \t")[-1:]
    following = text[next_start : next_start + 1]
    return bool(last) and (last.isalnum() or last == ",") and following.islower()


def _paragraphs(text: str) -> list[tuple[int, int]]:
    """Line ranges; soft-wrapped lines joined, blank lines always breaking."""
    ranges, start = [], 0
    for brk in _LINE_BREAK.finditer(text):
        blank_before = not text[start : brk.start()].strip()
        if not blank_before and not _is_soft_wrap(text, brk.start(), brk.end()):
            ranges.append((start, brk.start()))
            start = brk.end()
        elif blank_before:
            start = brk.end()
    ranges.append((start, len(text)))
    return [r for r in ranges if text[r[0] : r[1]].strip()]


def _split_line(text: str, start: int, end: int) -> list[tuple[int, int]]:
    spans, cut = [], start
    for match in _BOUNDARY.finditer(text, start, end):
        if _keeps_sentence_going(text, start, match.start()):
            continue
        segment = _strip(text, cut, match.end())
        if segment:
            spans.append(segment)
        cut = match.end()
    segment = _strip(text, cut, end)
    return spans + ([segment] if segment else [])


def split_sentences(text: str) -> list[tuple[int, int]]:
    """(start, end) offsets of each sentence or line segment of `text`, in order."""
    spans: list[tuple[int, int]] = []
    for start, end in _paragraphs(text):
        spans += _split_line(text, start, end)
    return spans


def sentence_windows(text: str, size: int = 1) -> list[tuple[int, int]]:
    """(start, end) of each run of `size` consecutive sentences (the last run may be
    shorter): the text between them stays inside, so offsets into `text` hold."""
    if size < 1:
        raise ValueError(f"sentences per window must be at least 1, not {size}")
    sentences = split_sentences(text)
    return [(sentences[i][0], sentences[min(i + size, len(sentences)) - 1][1]) for i in range(0, len(sentences), size)]


def chunk_long(spans: list[tuple[int, int]], text: str, max_chars: int) -> list[tuple[int, int]]:
    """Cut segments longer than max_chars at the last whitespace that fits (offsets kept).

    A run of max_chars without whitespace is cut hard. Pieces are stripped like segments.
    """
    if max_chars < 1:
        raise ValueError("max_chars must be positive")
    out = []
    for start, end in spans:
        while end - start > max_chars:
            window = text[start : start + max_chars + 1]
            gaps = [m.start() for m in re.finditer(r"\s", window) if m.start() > 0]
            cut = start + (gaps[-1] if gaps else max_chars)
            piece = _strip(text, start, cut)
            if piece:
                out.append(piece)
            start = cut
            while start < end and text[start].isspace():
                start += 1
        if end > start:
            out.append((start, end))
    return out
