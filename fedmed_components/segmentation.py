"""Sentence segmentation that keeps character offsets (clinical-aware).

Splits at line breaks that end a line of text (notes put headers and list items on
their own lines) and after sentence-final punctuation followed by space and an
upper-case letter or digit, except after clinical abbreviations ("Dr.", "b.i.d.",
"p.o.") and inside numbers ("2.5 mg"). Every segment is ``text[start:end]``, stripped.
"""

from __future__ import annotations

import re

ABBREVIATIONS = {
    "dr", "mr", "mrs", "ms", "st", "vs", "no", "approx", "e.g", "i.e", "etc", "pt", "b.i.d", "t.i.d", "q.i.d",
    "q.d", "p.o", "p.r.n", "q.h.s", "a.m", "p.m", "h.s", "i.v", "i.m", "s.c", "cm", "mm", "kg", "mg", "ml", "fig",
}
_BOUNDARY = re.compile(r"[.!?](?=[\"')\]]*\s+[A-Z0-9(\[])")


def _is_abbreviation(text: str, dot: int) -> bool:
    if text[dot] != ".":
        return False
    start = dot
    while start > 0 and (text[start - 1].isalpha() or text[start - 1] == "."):
        start -= 1
    word = text[start:dot].lower()
    return word in ABBREVIATIONS or (len(word) == 1 and word.isalpha())


def _strip(text: str, start: int, end: int) -> tuple[int, int] | None:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return (start, end) if end > start else None


def split_sentences(text: str) -> list[tuple[int, int]]:
    """(start, end) offsets of each sentence or line segment of `text`."""
    spans: list[tuple[int, int]] = []
    for line in re.finditer(r"[^\r\n]+", text):
        cut = line.start()
        for match in _BOUNDARY.finditer(text, line.start(), line.end()):
            if _is_abbreviation(text, match.start()):
                continue
            seg = _strip(text, cut, match.end())
            if seg:
                spans.append(seg)
            cut = match.end()
        seg = _strip(text, cut, line.end())
        if seg:
            spans.append(seg)
    return spans


def chunk_long(spans: list[tuple[int, int]], text: str, max_chars: int) -> list[tuple[int, int]]:
    """Cut segments longer than max_chars at whitespace (offsets preserved)."""
    out = []
    for start, end in spans:
        while end - start > max_chars:
            cut = text.rfind(" ", start, start + max_chars)
            cut = cut if cut > start else start + max_chars
            out.append((start, cut))
            start = cut
            while start < end and text[start].isspace():
                start += 1
        if end > start:
            out.append((start, end))
    return out
