"""n2c2-style scoring: exact counts on hand-made cases, and lenient >= strict always."""

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmed_components.data.document import Document, Entity, Relation
from fedmed_components.task.metrics import (
    ScoringError,
    bio_tags,
    format_table,
    match_entities,
    score_documents,
    seqeval_scores,
)

TEXT = "Severe chest pain, no fever. Aspirin 81 mg daily."


def gold_doc():
    ents = [
        Entity("T1", "severity", [(0, 6)], "Severe"),
        Entity("T2", "problem", [(7, 17)], "chest pain"),
        Entity("T3", "negation", [(19, 21)], "no"),
        Entity("T4", "problem", [(22, 27)], "fever"),
        Entity("T5", "drug", [(29, 36)], "Aspirin"),
        Entity("T6", "strength", [(37, 42)], "81 mg"),
    ]
    rels = [Relation("hasAttr", "T2", "T1"), Relation("hasAttr", "T4", "T3"), Relation("hasAttr", "T5", "T6")]
    return Document("d1", TEXT, entities=ents, relations=rels)


def pred_doc(*ents, rels=()):
    return Document("d1", TEXT, entities=list(ents), relations=list(rels))


def counts(m):
    return (m["tp"], m["fp"], m["fn"])


def test_gold_against_itself_is_perfect():
    result = score_documents([gold_doc()], [copy.deepcopy(gold_doc())])
    for mode in ("strict", "lenient"):
        assert result["entities"][mode]["f1"] == 1.0 and result["relations"][mode]["f1"] == 1.0
        assert all(v[mode]["f1"] == 1.0 for v in result["entities"]["per_type"].values())
    assert set(result) == {"documents", "entities", "relations", "parse_failures"}
    assert set(result["entities"]) == {"strict", "lenient", "per_type"}
    assert set(result["entities"]["strict"]) == {"precision", "recall", "f1", "tp", "fp", "fn"}


def test_boundary_shift_is_lenient_only():
    shifted = [Entity("P1", "problem", [(13, 17)], "pain"), Entity("P2", "severity", [(0, 6)], "Severe")]
    result = score_documents([gold_doc()], [pred_doc(*shifted, rels=[Relation("hasAttr", "P1", "P2")])], types={"problem", "severity"})
    assert counts(result["entities"]["strict"]) == (1, 1, 2)
    assert counts(result["entities"]["lenient"]) == (2, 0, 1)
    assert counts(result["relations"]["strict"]) == (0, 1, 1)  # head "pain" not strictly matched
    assert counts(result["relations"]["lenient"]) == (1, 0, 0)


def test_type_error_matches_in_neither_mode():
    pred = pred_doc(Entity("P1", "test", [(7, 17)], "chest pain"))
    result = score_documents([gold_doc()], [pred])
    assert counts(result["entities"]["strict"]) == (0, 1, 6) == counts(result["entities"]["lenient"])
    assert counts(result["entities"]["per_type"]["test"]["strict"]) == (0, 1, 0)
    assert counts(result["entities"]["per_type"]["problem"]["lenient"]) == (0, 0, 2)


def test_duplicate_predictions_match_once():
    same = [Entity(f"P{i}", "problem", [(7, 17)], "chest pain") for i in range(2)] + [Entity("P3", "problem", [(7, 13)], "chest ")]
    result = score_documents([gold_doc()], [pred_doc(*same)], types={"problem"})
    assert counts(result["entities"]["strict"]) == (1, 2, 1)
    assert counts(result["entities"]["lenient"]) == (1, 2, 1)  # "chest " overlaps only the gold already matched
    # two overlapping predictions, one gold: the exact one wins, then the larger overlap
    two = [Entity("P1", "problem", [(7, 12)], "chest"), Entity("P2", "problem", [(7, 17)], "chest pain")]
    assert match_entities(gold_doc().entities, two, "lenient") == {"P2": "T2"}
    two = [Entity("P1", "problem", [(7, 12)], "chest"), Entity("P2", "problem", [(8, 17)], "hest pain")]
    assert match_entities(gold_doc().entities, two, "lenient") == {"P2": "T2"}


def test_one_prediction_spanning_two_gold_entities_matches_one():
    wide = Entity("P1", "problem", [(7, 27)], "chest pain, no fever")
    result = score_documents([gold_doc()], [pred_doc(wide)], types={"problem"})
    assert counts(result["entities"]["lenient"]) == (1, 0, 1)


def test_relation_needs_both_arguments_matched_in_the_same_mode():
    ents = [
        Entity("P1", "problem", [(7, 17)], "chest pain"),
        Entity("P2", "severity", [(0, 6)], "Severe"),
        Entity("P3", "drug", [(29, 36)], "Aspirin"),
        Entity("P4", "strength", [(37, 40)], "81 "),
        Entity("P5", "problem", [(22, 27)], "fever"),
    ]
    rels = [
        Relation("hasAttr", "P1", "P2"),  # right
        Relation("hasAttr", "P3", "P4"),  # tail boundary off: lenient only
        Relation("hasAttr", "P5", "P2"),  # wrong tail
        Relation("hasAttr", "P1", "P2"),
    ]  # duplicate
    result = score_documents([gold_doc()], [pred_doc(*ents, rels=rels)])
    assert counts(result["relations"]["strict"]) == (1, 3, 2)
    assert counts(result["relations"]["lenient"]) == (2, 2, 1)
    swapped = score_documents([gold_doc()], [pred_doc(*ents, rels=[Relation("hasAttr", "P2", "P1")])])
    assert counts(swapped["relations"]["lenient"]) == (0, 1, 3)
    other_type = score_documents([gold_doc()], [pred_doc(*ents, rels=[Relation("hasTemporal", "P1", "P2")])])
    assert counts(other_type["relations"]["strict"]) == (0, 1, 3)


def test_discontinuous_spans_need_every_fragment_for_strict():
    gold = Document("g", "left and right knee", entities=[Entity("T1", "bodyloc", [(0, 4), (15, 19)], "left knee")])
    covering = Document("g", gold.text, entities=[Entity("P1", "bodyloc", [[0, 19]], "left and right knee")])
    exact = Document("g", gold.text, entities=[Entity("P1", "bodyloc", [[15, 19], [0, 4]], "knee left")])
    assert counts(score_documents([gold], [covering])["entities"]["strict"]) == (0, 1, 1)
    assert counts(score_documents([gold], [covering])["entities"]["lenient"]) == (1, 0, 0)
    assert counts(score_documents([gold], [exact])["entities"]["strict"]) == (1, 0, 0)


def test_types_restrict_partial_schema_sites():
    pred = pred_doc(Entity("P1", "problem", [(7, 17)], "chest pain"), Entity("P2", "test", [(29, 36)], "Aspirin"))
    result = score_documents([gold_doc()], [pred], types={"problem", "negation"})
    assert counts(result["entities"]["strict"]) == (1, 0, 2)
    assert set(result["entities"]["per_type"]) == {"problem", "negation"}
    assert counts(result["relations"]["strict"]) == (0, 0, 1)  # only fever -> no is in scope


def test_document_pairing():
    other = Document("d2", "Cough.", entities=[Entity("T1", "problem", [(0, 5)], "Cough")])
    result = score_documents([gold_doc(), other], [copy.deepcopy(gold_doc())], parse_failures=3)
    assert result["documents"] == 2 and result["parse_failures"] == 3
    assert counts(result["entities"]["strict"]) == (6, 0, 1)
    assert counts(score_documents([gold_doc()], [])["entities"]["strict"]) == (0, 0, 6)
    with pytest.raises(ScoringError, match="not in gold"):
        score_documents([gold_doc()], [gold_doc(), other])
    with pytest.raises(ValueError, match="twice"):
        score_documents([gold_doc(), gold_doc()], [])
    with pytest.raises(ScoringError, match="text differs"):
        score_documents([gold_doc()], [Document("d1", TEXT.upper())])


def test_empty_everything_scores_zero_without_dividing_by_zero():
    result = score_documents([Document("e", "")], [Document("e", "")])
    assert result["entities"]["strict"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "tp": 0, "fp": 0, "fn": 0}


def test_format_table_lists_types_and_relations():
    table = format_table(score_documents([gold_doc()], [gold_doc()]))
    assert "1 documents, 0 parse failures" in table
    for label in ("entities (micro)", "  problem", "  strength", "relations"):
        assert label in table
    assert len({len(line) for line in table.splitlines()[2:]}) == 1  # aligned columns


# ---------------------------------------------------------------- property: lenient >= strict

span = st.tuples(st.integers(0, 30), st.integers(1, 8)).map(lambda t: (t[0], t[0] + t[1]))
entity_lists = st.lists(st.tuples(st.sampled_from(["problem", "drug"]), span), max_size=8)


def _doc(items, prefix):
    ents = [Entity(f"{prefix}{i}", t, [s], "") for i, (t, s) in enumerate(items)]
    rels = [Relation("hasAttr", a.id, b.id) for a, b in zip(ents, ents[1:])]
    return Document("p", "x" * 40, entities=ents, relations=rels)


@settings(max_examples=200, deadline=None)
@given(entity_lists, entity_lists)
def test_lenient_is_never_below_strict(gold_items, pred_items):
    result = score_documents([_doc(gold_items, "T")], [_doc(pred_items, "P")])
    for group in (result["entities"], result["relations"], *result["entities"]["per_type"].values()):
        strict, lenient = group["strict"], group["lenient"]
        assert lenient["tp"] >= strict["tp"] and lenient["f1"] >= strict["f1"] - 1e-12
        assert strict["tp"] + strict["fn"] == lenient["tp"] + lenient["fn"]  # the same gold
        assert strict["tp"] + strict["fp"] == lenient["tp"] + lenient["fp"]  # the same predictions


# ---------------------------------------------------------------- BERT baseline helpers


def test_bio_tags_and_seqeval():
    tokens = [(0, 6), (7, 12), (13, 17), (17, 18), (19, 21), (22, 27), (0, 0)]
    tags = bio_tags(gold_doc(), tokens, types={"problem", "severity"})
    assert tags == ["B-severity", "B-problem", "I-problem", "O", "O", "B-problem", "O"]
    assert bio_tags(gold_doc(), [(7, 10), (10, 20)], types={"problem"}) == ["B-problem", "I-problem"]  # subwords overlap
    scores = seqeval_scores([tags], [["B-severity", "B-problem", "O", "O", "O", "B-problem", "O"]])
    assert scores["precision"] == pytest.approx(2 / 3) and scores["recall"] == pytest.approx(2 / 3)
    assert scores["per_type"]["severity"]["f1"] == 1.0
    assert seqeval_scores([tags], [tags])["f1"] == 1.0
