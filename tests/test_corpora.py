import json
from collections import Counter
from pathlib import Path

import pytest

from fedmed_components.data.bioc import write_bioc
from fedmed_components.data.brat import MALFORMED_LINE, OFFSETS_OUTSIDE_TEXT, BratAttribute, ReadReport, write_brat_dir
from fedmed_components.data.corpora import (
    ARGUMENT_DROPPED,
    NO_COUNTERPART,
    NOT_MAIN_TO_MODIFIER,
    MappingReport,
    apply_mapping,
    corpus_stats,
    detect_format,
    load_corpus,
    mtsamples_note_type,
)
from fedmed_components.data.document import Document, Entity, InputError, Relation, write_jsonl

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is not beside the project")


def maccrobat_like() -> Document:
    text = "No fever. Chest CT showed a left mass after surgery."
    ents = [
        Entity("T1", "Sign_symptom", [(3, 8)], "fever"),
        Entity("T2", "Biological_structure", [(10, 15)], "Chest"),
        Entity("T3", "Diagnostic_procedure", [(16, 18)], "CT"),
        Entity("T4", "Detailed_description", [(28, 32)], "left"),
        Entity("T5", "Sign_symptom", [(33, 37)], "mass"),
        Entity("T6", "Therapeutic_procedure", [(44, 51)], "surgery"),
    ]
    rels = [
        Relation("MODIFY", "T2", "T3"),  # modifier -> main
        Relation("MODIFY", "T4", "T5"),  # Detailed_description has no Kiwi type
        Relation("MODIFY", "T5", "T3"),  # problem -> test: not main -> modifier
        Relation("BEFORE", "T6", "T3"),
    ]
    return Document("m1", text, entities=ents, relations=rels)


def test_maccrobat_mapping_swaps_modify_negates_and_counts_drops():
    report = MappingReport("maccrobat")
    attrs = [BratAttribute("A1", "POLARITY", "T1", "NEG"), BratAttribute("A2", "POLARITY", "T5", "MAYBE_NEG")]
    doc = apply_mapping(maccrobat_like(), "maccrobat", attrs, report)
    assert [(e.id, e.type) for e in doc.entities] == [
        ("T1", "problem"),
        ("T2", "bodyloc"),
        ("T3", "test"),
        ("T5", "problem"),
        ("T6", "treatment"),
    ]
    assert doc.entity("T1").negated is True and doc.entity("T5").negated is None
    assert [(r.type, r.head, r.tail) for r in doc.relations] == [("hasAttr", "T3", "T2")]
    assert report.dropped_entities == {"Detailed_description": 1}
    assert report.dropped_relations == {
        f"MODIFY: {ARGUMENT_DROPPED}": 1,
        f"MODIFY: {NOT_MAIN_TO_MODIFIER}": 1,
        f"BEFORE: {NO_COUNTERPART}": 1,
    }
    assert report.swapped_relations == 1 and report.negated_entities == 1


def test_mapping_leaves_the_input_document_alone():
    original = maccrobat_like()
    before = original.to_dict()
    apply_mapping(original, "maccrobat")
    assert original.to_dict() == before


def test_load_corpus_reads_brat_bioc_and_jsonl_alike(tmp_path):
    doc = maccrobat_like()
    write_brat_dir([doc], tmp_path / "brat")
    write_bioc([doc], tmp_path / "c.xml")
    write_jsonl([doc], tmp_path / "c.jsonl")
    (tmp_path / "noext").write_text(json.dumps(doc.to_dict()) + "\n", encoding="utf-8")
    assert [detect_format(tmp_path / p) for p in ("brat", "c.xml", "c.jsonl", "noext")] == ["brat", "bioc", "jsonl", "jsonl"]
    loaded = [load_corpus(tmp_path / p, "maccrobat", site="hosp") for p in ("brat", "c.xml", "c.jsonl")]
    assert loaded[0][0].to_dict() == loaded[1][0].to_dict() == loaded[2][0].to_dict()
    assert loaded[0][0].site == "hosp" and len(loaded[0][0].relations) == 1
    raw = load_corpus(tmp_path / "c.jsonl", mapping=None)
    assert raw[0].entities[0].type == "Sign_symptom"


def test_load_corpus_reads_a_single_brat_note(tmp_path):
    write_brat_dir([maccrobat_like()], tmp_path)
    (doc,) = load_corpus(tmp_path / "m1.ann", "maccrobat")
    assert doc.id == "m1" and len(doc.entities) == 5


def test_load_corpus_missing_path_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_corpus(tmp_path / "nope.jsonl")


def test_jsonl_bad_lines_strict_and_lenient(tmp_path):
    good = Document("a", "Chest pain", entities=[Entity("T1", "problem", [(0, 10)], "Chest pain")])
    outside = Document("b", "short", entities=[Entity("T1", "problem", [(0, 99)], "")])
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([json.dumps(good.to_dict()), "{not json", json.dumps(outside.to_dict())]) + "\n", encoding="utf-8")
    with pytest.raises(InputError) as err:
        load_corpus(path)
    assert err.value.line == 2 and MALFORMED_LINE in err.value.reason
    report = ReadReport()
    with pytest.warns(UserWarning, match="skipped 2"):
        docs = load_corpus(path, lenient=True, report=report)
    assert [d.id for d in docs] == ["a", "b"] and docs[1].entities == []
    assert report.counts == {MALFORMED_LINE: 1, OFFSETS_OUTSIDE_TEXT: 1}


def test_corpus_stats_counts_types_pairs_and_discontinuous():
    doc = Document(
        "s",
        "Aspirin 81 mg",
        entities=[Entity("T1", "drug", [(0, 7)], "Aspirin"), Entity("T2", "strength", [(8, 10), (11, 13)], "81 mg", negated=True)],
        relations=[Relation("hasAttr", "T1", "T2")],
    )
    stats = corpus_stats([doc, doc])
    assert stats["documents"] == 2 and stats["spans"] == 4
    assert stats["spans_per_type"] == {"drug": 2, "strength": 2}
    assert stats["relations_per_type"] == {"hasAttr drug -> strength": 2}
    assert stats["discontinuous_spans"] == 2 and stats["negated_spans"] == 2


@pytest.mark.parametrize(
    "head, expected",
    [
        ("Sample Type / Medical Specialty: General Medicine\nSample Name: Consult\n", "general_medicine"),
        ("Sample Type/Medical Specialty : \nDischarge Summary \nSample Name: x\n", "discharge_summary"),
        ("Chief Complaint \nshe has MS\n", "other"),
    ],
)
def test_mtsamples_note_type_reads_the_header(head, expected):
    assert mtsamples_note_type(Document("x", head + "Body text.\n")) == expected


# ---------------------------------------------------------------- real corpora


@pytest.fixture(scope="module")
def kiwi_train():
    if not DATA.is_dir():
        pytest.skip("../shared/data is not beside the project")
    with pytest.warns(UserWarning):
        return load_corpus(DATA / "mtsamples_kiwi" / "train", "kiwi", lenient=True, site="mtsamples")


def test_mtsamples_note_types_are_56_38_2(kiwi_train):
    counts = Counter(mtsamples_note_type(d) for d in kiwi_train)
    assert counts == {"general_medicine": 56, "discharge_summary": 38, "other": 2}


def test_kiwi_mapping_keeps_every_mtsamples_span_and_relation(kiwi_train):
    stats = corpus_stats(kiwi_train)
    assert (stats["documents"], stats["spans"], stats["relations"]) == (96, 10_838, 4_742)
    pairs = stats["relations_per_type"]
    readme = {
        "problem -> negation": 1478,
        "problem -> bodyloc": 959,
        "test -> labvalue": 893,
        "problem -> course": 220,
        "drug -> frequency": 209,
        "drug -> strength": 154,
        "test -> temporal": 115,
        "problem -> severity": 114,
        "drug -> route": 106,
        "problem -> temporal": 101,
        "problem -> uncertain": 62,
        "drug -> dosage": 61,
        "drug -> form": 58,
    }
    assert {k: pairs[f"hasAttr {k}"] for k in readme} == readme
    assert {d.site for d in kiwi_train} == {"mtsamples"}


@needs_data
def test_maccrobat_mapped_onto_kiwi():
    report = MappingReport()
    docs = load_corpus(DATA / "maccrobat2020" / "brat", "maccrobat", mapping_report=report)
    stats = corpus_stats(docs)
    assert stats["documents"] == 200
    assert set(stats["spans_per_type"]) <= {
        "problem",
        "test",
        "labvalue",
        "drug",
        "treatment",
        "dosage",
        "route",
        "frequency",
        "duration",
        "severity",
        "bodyloc",
        "temporal",
    }
    assert stats["spans_per_type"]["problem"] == 3_382 + 1_362  # Sign_symptom + Disease_disorder
    assert stats["spans"] + sum(report.dropped_entities.values()) == 25_189
    assert stats["relations"] == report.swapped_relations == 6_813
    assert stats["relations"] + sum(report.dropped_relations.values()) == 16_307
    assert stats["negated_spans"] == report.negated_entities > 1_000
    assert all(k.startswith("hasAttr ") for k in stats["relations_per_type"])


@needs_data
def test_phee_mapped_is_partial_schema_without_relations():
    report = MappingReport()
    docs = load_corpus(DATA / "phee" / "brat", "phee", mapping_report=report)
    stats = corpus_stats(docs)
    assert stats["documents"] == 4_827
    assert "test" not in stats["spans_per_type"] and "labvalue" not in stats["spans_per_type"]
    assert stats["relations"] == 0 and sum(report.dropped_relations.values()) == 349
    assert stats["spans"] + sum(report.dropped_entities.values()) == 30_310
