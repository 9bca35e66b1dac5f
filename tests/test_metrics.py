"""n2c2-style scoring: exact counts on hand-made cases, and lenient >= strict always."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmed_components.document import Document, Entity, Relation
from fedmed_components.metrics import bio_tags, format_table, score_documents, seqeval_scores

TEXT = "Patient denies chest pain and severe headache today."


def ent(i, t, s, e):
    return Entity(id=f"T{i}", type=t, spans=[(s, e)], text=TEXT[s:e])


def doc(ents, rels=()):
    return Document(id="d1", text=TEXT, entities=list(ents), relations=[Relation("hasAttr", h, t) for h, t in rels])


GOLD = doc([ent(1, "negation", 8, 14), ent(2, "problem", 15, 25), ent(3, "severity", 30, 36), ent(4, "problem", 37, 45)],
           [("T2", "T1"), ("T4", "T3")])


def counts(result, group, mode):
    m = result[group][mode]
    return m["tp"], m["fp"], m["fn"]


def test_gold_against_itself_is_perfect():
    r = score_documents([GOLD], [GOLD])
    for mode in ("strict", "lenient"):
        assert r["entities"][mode]["f1"] == 1.0 and r["relations"][mode]["f1"] == 1.0
    assert r["documents"] == 1 and set(r) == {"documents", "entities", "relations", "parse_failures"}


def test_boundary_shift_is_lenient_only():
    pred = doc([ent(1, "negation", 8, 14), ent(2, "problem", 15, 20), ent(3, "severity", 30, 36), ent(4, "problem", 37, 45)],
               [("T2", "T1"), ("T4", "T3")])
    r = score_documents([GOLD], [pred])
    assert counts(r, "entities", "strict") == (3, 1, 1)
    assert counts(r, "entities", "lenient") == (4, 0, 0)
    assert counts(r, "relations", "strict") == (1, 1, 1)  # head "chest" not strictly matched
    assert counts(r, "relations", "lenient") == (2, 0, 0)
    assert r["entities"]["per_type"]["problem"]["strict"]["tp"] == 1


def test_type_error_counts_as_fp_and_fn():
    pred = doc([ent(1, "negation", 8, 14), ent(2, "test", 15, 25), ent(3, "severity", 30, 36), ent(4, "problem", 37, 45)])
    r = score_documents([GOLD], [pred])
    assert counts(r, "entities", "strict") == (3, 1, 1) == counts(r, "entities", "lenient")
    assert r["entities"]["per_type"]["test"]["strict"]["fp"] == 1
    assert r["entities"]["per_type"]["problem"]["strict"]["fn"] == 1


def test_duplicate_predictions_match_once():
    pred = doc([ent(1, "problem", 15, 25), ent(2, "problem", 15, 25), ent(3, "problem", 15, 21)])
    r = score_documents([GOLD], [pred], types={"problem"})
    assert counts(r, "entities", "strict") == (1, 2, 1)
    assert counts(r, "entities", "lenient") == (1, 2, 1)  # "chest " overlaps only the already matched gold


def test_relation_argument_mismatch():
    pred = doc(GOLD.entities, [("T2", "T3"), ("T4", "T3")])  # negation swapped for severity on chest pain
    r = score_documents([GOLD], [pred])
    assert counts(r, "relations", "strict") == (1, 1, 1) == counts(r, "relations", "lenient")


def test_missing_prediction_document_and_unknown_document():
    r = score_documents([GOLD], [])
    assert counts(r, "entities", "strict") == (0, 0, 4)
    with pytest.raises(ValueError, match="not in gold"):
        score_documents([GOLD], [Document(id="other", text="x")])


def test_types_restrict_scoring_for_partial_schema_sites():
    pred = doc([ent(2, "problem", 15, 25), ent(4, "problem", 37, 45), ent(9, "test", 0, 7)])
    r = score_documents([GOLD], [pred], types={"problem"})
    assert counts(r, "entities", "strict") == (2, 0, 0)


def test_format_table_lists_types():
    text = format_table(score_documents([GOLD], [GOLD]))
    assert "negation" in text and "relations" in text


spans = st.tuples(st.sampled_from(["problem", "test"]), st.integers(0, 45), st.integers(1, 8))


@settings(max_examples=150, deadline=None)
@given(st.lists(spans, max_size=6), st.lists(spans, max_size=6))
def test_lenient_is_never_below_strict(gold_spans, pred_spans):
    g = doc([ent(i, t, s, min(s + n, len(TEXT))) for i, (t, s, n) in enumerate(gold_spans)])
    p = doc([ent(i, t, s, min(s + n, len(TEXT))) for i, (t, s, n) in enumerate(pred_spans)])
    r = score_documents([g], [p])
    assert r["entities"]["lenient"]["tp"] >= r["entities"]["strict"]["tp"]
    assert r["entities"]["lenient"]["f1"] >= r["entities"]["strict"]["f1"]


def test_bio_tags_and_seqeval():
    offsets = [(0, 7), (8, 14), (15, 20), (21, 25), (26, 29)]
    tags = bio_tags(GOLD, offsets, types={"problem"})
    assert tags == ["O", "O", "B-problem", "I-problem", "O"]
    assert seqeval_scores([tags], [tags])["f1"] == 1.0
