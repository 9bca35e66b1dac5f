from fedmed_components.segmentation import chunk_long, split_sentences


def test_offsets_are_exact_and_clinical_abbreviations_do_not_split():
    text = "HISTORY:\r\nSeen by Dr. Smith today. Takes aspirin 2.5 mg p.o. b.i.d. for pain.  Denies fever.\n\nPLAN: follow up."
    spans = split_sentences(text)
    segments = [text[s:e] for s, e in spans]
    assert segments == ["HISTORY:", "Seen by Dr. Smith today.", "Takes aspirin 2.5 mg p.o. b.i.d. for pain.", "Denies fever.", "PLAN: follow up."]


def test_chunk_long_keeps_offsets():
    text = "word " * 50
    spans = chunk_long(split_sentences(text), text, 40)
    assert all(e - s <= 40 for s, e in spans)
    assert " ".join(text[s:e] for s, e in spans) == text.strip()
