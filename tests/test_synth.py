"""The embedded synthetic corpus: exact offsets, full schema coverage, determinism, site skew."""

from collections import Counter

import pytest

from fedmed_components.cli import main
from fedmed_components.data.document import read_jsonl
from fedmed_components.data.schema import MAIN_TYPES, fits_schema
from fedmed_components.data.segmentation import split_sentences
from fedmed_components.data.synth import STYLES, demo_corpus, generate_site_corpus
from fedmed_components.task.prompts import document_examples


@pytest.fixture(scope="module")
def corpus():
    return demo_corpus(n_sites=3, docs_per_site=15, seed=5)


def _type_counts(docs):
    return Counter(e.type for doc in docs for e in doc.entities)


def test_offsets_ids_and_relations_are_exact(corpus):
    for docs in corpus.values():
        for doc in docs:
            types = {e.id: e.type for e in doc.entities}
            assert len(types) == len(doc.entities)
            for e in doc.entities:
                assert all(doc.text[s:t] == e.text for s, t in e.spans)
            assert all(fits_schema(types[r.head], types[r.tail]) and r.type == "hasAttr" for r in doc.relations)


def test_all_main_types_and_common_modifiers_are_present(corpus):
    seen = set().union(*(_type_counts(docs) for docs in corpus.values()))
    assert set(MAIN_TYPES) <= seen
    assert {
        "negation",
        "bodyloc",
        "labvalue",
        "course",
        "severity",
        "temporal",
        "dosage",
        "route",
        "frequency",
        "strength",
        "form",
        "uncertain",
    } <= seen


def test_deterministic_by_seed(corpus):
    assert demo_corpus(n_sites=3, docs_per_site=15, seed=5) == corpus
    assert demo_corpus(n_sites=3, docs_per_site=15, seed=6) != corpus
    assert generate_site_corpus("a", 2, 1, "case_report") == generate_site_corpus("a", 2, 1, "case_report")


def test_sites_differ_in_style_and_label_skew(corpus):
    assert list(corpus) == ["discharge_summary", "general_medicine", "case_report"]
    share = {site: {t: n / sum(c.values()) for t, n in c.items()} for site, c in ((s, _type_counts(d)) for s, d in corpus.items())}
    assert share["discharge_summary"]["drug"] > 1.5 * share["general_medicine"]["drug"]
    assert share["case_report"]["test"] > 2 * share["general_medicine"]["test"]
    assert share["general_medicine"]["negation"] > 2 * share["case_report"]["negation"]
    for site, docs in corpus.items():
        headers = STYLES[site][0]
        assert all(doc.text.startswith(headers[0] + "\n") and doc.site == site for doc in docs)


def test_sentences_are_short_and_every_entity_fits_a_sentence(corpus):
    for doc in corpus["general_medicine"]:
        sentences = split_sentences(doc.text)
        assert max(len(doc.text[s:e].split()) for s, e in sentences) <= 25
        for e in doc.entities:
            assert any(s <= e.start and e.end <= t for s, t in sentences)
        examples = document_examples(doc)
        assert sum(len(x.spans) for x in examples if x.task == "ner") == sum(e.type in MAIN_TYPES for e in doc.entities)


def test_more_sites_than_styles():
    corpus = demo_corpus(n_sites=4, docs_per_site=1, seed=0)
    assert len(corpus) == 4 and list(corpus)[3] == "discharge_summary-4"
    with pytest.raises(ValueError):
        generate_site_corpus("x", 1, 0, "radiology")


def test_synth_command_writes_one_folder_per_site(tmp_path, capsys):
    assert main(["data", "synth", str(tmp_path / "j"), "--sites", "2", "--docs-per-site", "3", "--seed", "1"]) == 0
    docs = read_jsonl(tmp_path / "j" / "general_medicine" / "train.jsonl")
    assert docs == demo_corpus(2, 3, 1)["general_medicine"]
    assert main(["data", "synth", str(tmp_path / "b"), "--sites", "1", "--docs-per-site", "2", "--format", "brat"]) == 0
    assert len(list((tmp_path / "b" / "discharge_summary").glob("*.ann"))) == 2
    assert "synthetic notes" in capsys.readouterr().out
