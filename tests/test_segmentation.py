"""Sentence segmentation: exact offsets, clinical abbreviations, headers and wraps."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmed_components.data.segmentation import chunk_long, split_sentences


def segments(text):
    return [text[s:e] for s, e in split_sentences(text)]


def test_offsets_are_exact_and_stripped():
    text = "  HISTORY:\r\nHe has fever.  She denies pain!\n\n\tPlan?  Rest.  \n"
    spans = split_sentences(text)
    assert [text[s:e] for s, e in spans] == ["HISTORY:", "He has fever.", "She denies pain!", "Plan?", "Rest."]
    assert all(text[s:e] == text[s:e].strip() for s, e in spans)
    assert spans == sorted(spans)


def test_clinical_abbreviations_and_numbers_do_not_split():
    text = "Seen by Dr. Smith today. Aspirin 2.5 mg p.o. b.i.d. Then follow up, e.g. Monday. Temp 98.6. Pulse 80."
    assert segments(text) == [
        "Seen by Dr. Smith today.",
        "Aspirin 2.5 mg p.o. b.i.d. Then follow up, e.g. Monday.",
        "Temp 98.6.",
        "Pulse 80.",
    ]


def test_initials_list_numbers_and_single_letters():
    assert segments("Referred by Dr. J. Smith. He agreed.") == ["Referred by Dr. J. Smith.", "He agreed."]
    assert segments("1. Hypertension.\n2 . Diabetes.") == ["1. Hypertension.", "2 . Diabetes."]
    assert segments("History of hepatitis C. The liver is normal.") == ["History of hepatitis C.", "The liver is normal."]


def test_headers_on_their_own_line_and_blank_lines():
    text = "ASSESSMENT:\nPneumonia.\n\nPLAN:\nAntibiotics."
    assert segments(text) == ["ASSESSMENT:", "Pneumonia.", "PLAN:", "Antibiotics."]


def test_soft_wrapped_prose_stays_one_sentence():
    text = "The patient was admitted with\nchest pain and was treated.\nNEXT LINE"
    assert segments(text) == ["The patient was admitted with\nchest pain and was treated.", "NEXT LINE"]


def test_closing_quotes_and_brackets_stay_with_their_sentence():
    assert segments('He said "no pain." (Later) she agreed.') == ['He said "no pain."', "(Later) she agreed."]


def test_empty_and_blank_text():
    assert split_sentences("") == []
    assert split_sentences(" \n\r\n\t ") == []


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab Dr.12\n\r?!:ABC")), max_size=80))
def test_segments_never_overlap_and_keep_offsets(text):
    spans = split_sentences(text)
    for (_s1, e1), (s2, _e2) in zip(spans, spans[1:]):
        assert e1 <= s2
    for s, e in spans:
        assert 0 <= s < e <= len(text) and text[s:e].strip() == text[s:e]
    covered = {i for s, e in spans for i in range(s, e)}
    assert all(i in covered for i, ch in enumerate(text) if not ch.isspace())  # nothing lost


def test_chunk_long_cuts_at_whitespace():
    text = "alpha beta gamma delta epsilon"
    pieces = chunk_long([(0, len(text))], text, 12)
    assert [text[s:e] for s, e in pieces] == ["alpha beta", "gamma delta", "epsilon"]
    assert all(e - s <= 12 for s, e in pieces)


def test_chunk_long_cuts_hard_without_whitespace_and_keeps_short_spans():
    text = "x" * 25 + " short"
    pieces = chunk_long([(0, 25), (26, 31)], text, 10)
    assert pieces == [(0, 10), (10, 20), (20, 25), (26, 31)]
    with pytest.raises(ValueError):
        chunk_long(pieces, text, 0)


def test_mixed_note_keeps_offsets_and_abbreviations():
    text = "HISTORY:\r\nSeen by Dr. Smith today. Takes aspirin 2.5 mg p.o. b.i.d. for pain.  Denies fever.\n\nPLAN: follow up."
    segments = [text[s:e] for s, e in split_sentences(text)]
    assert segments == [
        "HISTORY:",
        "Seen by Dr. Smith today.",
        "Takes aspirin 2.5 mg p.o. b.i.d. for pain.",
        "Denies fever.",
        "PLAN: follow up.",
    ]


def test_chunk_long_keeps_every_word():
    text = "word " * 50
    spans = chunk_long(split_sentences(text), text, 40)
    assert all(e - s <= 40 for s, e in spans)
    assert " ".join(text[s:e] for s, e in spans) == text.strip()


def test_sentence_windows_cover_runs_of_sentences_with_the_text_between():
    from fedmed_components.data.segmentation import sentence_windows

    text = "One. Two.\nThree.  Four. Five."
    assert [text[a:b] for a, b in sentence_windows(text, 1)] == [text[a:b] for a, b in split_sentences(text)]
    assert [text[a:b] for a, b in sentence_windows(text, 2)] == ["One. Two.", "Three.  Four.", "Five."]
    assert [text[a:b] for a, b in sentence_windows(text, 9)] == [text]
    assert sentence_windows("", 3) == []
    with pytest.raises(ValueError, match="at least 1"):
        sentence_windows(text, 0)
