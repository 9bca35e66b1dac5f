import json
import random
from collections import Counter
from pathlib import Path

import pytest

from fedmed_components.data.document import Document, Entity, Relation, read_jsonl
from fedmed_components.data.partition import (
    dominant_type,
    label_distribution,
    split_by_corpus,
    split_by_note_type,
    split_dirichlet,
    split_iid,
    split_quantity,
    train_test_split,
    write_partition,
)

LABELS = ("problem", "treatment", "test", "drug")


def corpus(n: int = 200) -> list[Document]:
    """Documents whose dominant main type cycles through the four labels."""
    docs = []
    for i in range(n):
        label = LABELS[i % 4]
        ents = [Entity("T1", label, [(0, 4)], "word"), Entity("T2", label, [(5, 9)], "word"), Entity("T3", "negation", [(10, 13)], "not")]
        docs.append(Document(f"doc{i:03d}", "word word not", site=f"c{i % 2}", entities=ents, relations=[Relation("hasAttr", "T1", "T3")]))
    return docs


def ids(site_docs):
    return {site: [d.id for d in docs] for site, docs in site_docs.items()}


def test_dominant_type_breaks_ties_in_schema_order():
    doc = Document(
        "x",
        "a b c",
        entities=[Entity("T1", "drug", [(0, 1)], "a"), Entity("T2", "problem", [(2, 3)], "b"), Entity("T3", "bodyloc", [(4, 5)], "c")],
    )
    assert dominant_type(doc) == "problem"
    assert dominant_type(Document("y", "")) == "none"


@pytest.mark.parametrize(
    "split",
    [
        lambda d, s: split_dirichlet(d, 4, 0.3, seed=s),
        lambda d, s: split_quantity(d, 4, 0.5, seed=s),
        lambda d, s: split_iid(d, 4, seed=s),
    ],
)
def test_splits_are_deterministic_and_ignore_input_order(split):
    docs = corpus()
    shuffled = docs[:]
    random.Random(9).shuffle(shuffled)
    first = ids(split(docs, 7))
    assert first == ids(split(shuffled, 7))
    assert first != ids(split(docs, 8))
    assert sorted(i for site in first.values() for i in site) == [d.id for d in docs]  # a partition
    assert list(first) == ["site-1", "site-2", "site-3", "site-4"] and all(first.values())


def _skew(site_docs) -> float:
    """Mean total-variation distance between each site's labels and the whole corpus's."""
    everything = label_distribution([d for docs in site_docs.values() for d in docs])
    dists = [label_distribution(docs) for docs in site_docs.values()]
    return sum(0.5 * sum(abs(d.get(k, 0) - p) for k, p in everything.items()) for d in dists) / len(dists)


def test_dirichlet_small_alpha_skews_labels_large_alpha_does_not():
    docs = corpus(400)
    skewed = [_skew(split_dirichlet(docs, 4, 0.1, seed=s)) for s in range(5)]
    near_iid = [_skew(split_dirichlet(docs, 4, 1000.0, seed=s)) for s in range(5)]
    assert min(skewed) > 0.3 and max(near_iid) < 0.05


def test_quantity_skew_changes_sizes_not_label_mix():
    docs = corpus(400)
    sizes = sorted(len(v) for v in split_quantity(docs, 4, 0.3, seed=1).values())
    assert sizes[-1] > 3 * sizes[0]
    assert [len(v) for v in split_iid(docs, 4).values()] == [100, 100, 100, 100]


def test_no_site_is_left_empty_even_with_extreme_skew():
    docs = corpus(12)
    for seed in range(20):
        assert all(split_dirichlet(docs, 6, 0.01, seed=seed).values())
    with pytest.raises(ValueError, match="cannot fill"):
        split_iid(docs, 13)


def test_natural_splits():
    docs = corpus(10)
    assert {k: len(v) for k, v in split_by_corpus(docs).items()} == {"c0": 5, "c1": 5}
    notes = [
        Document("a", "Sample Type / Medical Specialty: General Medicine\n..."),
        Document("b", "Sample Type / Medical Specialty: Discharge Summary\n..."),
        Document("c", "Chief Complaint\n..."),
    ]
    assert ids(split_by_note_type(notes)) == {"discharge_summary": ["b"], "general_medicine": ["a"], "other": ["c"]}


def test_train_test_split_is_deterministic_and_disjoint():
    docs = corpus(50)
    train, test = train_test_split(docs, 0.2, seed=3)
    assert len(test) == 10 and len(train) == 40
    assert not {d.id for d in train} & {d.id for d in test}
    assert [d.id for d in test] == [d.id for d in train_test_split(list(reversed(docs)), 0.2, seed=3)[1]]
    assert len(train_test_split(docs[:3], 0.01, seed=0)[1]) == 1  # at least one test document
    assert train_test_split(docs, 0.0)[1] == []


def test_write_partition_folders_and_manifest_counts(tmp_path):
    site_docs = split_dirichlet(corpus(80), 3, 0.5, seed=2)
    manifest_path = write_partition(
        site_docs,
        tmp_path,
        test_fraction=0.25,
        val_fraction=0.1,
        seed=2,
        annotated_types={"site-1": ["drug", "problem", "dosage"]},
        info={"strategy": "dirichlet"},
    )
    manifest = json.loads(manifest_path.read_text())
    assert manifest["strategy"] == "dirichlet" and set(manifest["sites"]) == {"site-1", "site-2", "site-3"}
    for site, docs in site_docs.items():
        entry = manifest["sites"][site]
        assert entry["documents"] == len(docs)
        written = {name: read_jsonl(tmp_path / site / name) for name in entry["files"]}
        assert set(written) == {"train.jsonl", "val.jsonl", "test.jsonl"}
        assert sorted(d.id for part in written.values() for d in part) == [d.id for d in docs]
        for name, part in written.items():
            counts = entry["files"][name]
            assert counts["documents"] == len(part)
            assert counts["spans_per_type"] == dict(Counter(e.type for d in part for e in d.entities))
            assert counts["relations"] == sum(len(d.relations) for d in part)
            assert {d.site for d in part} == {site}
    assert manifest["total"]["documents"] == 80
    assert manifest["total"]["spans_per_type"]["negation"] == 80
    site_manifest = json.loads((tmp_path / "site-1" / "manifest.json").read_text())
    assert site_manifest["annotated_types"] == ["problem", "drug", "dosage"]  # schema order
    assert "annotated_types" not in manifest["sites"]["site-2"]


def test_write_partition_is_reproducible(tmp_path):
    for out in ("a", "b"):
        write_partition(split_quantity(corpus(40), 3, 1.0, seed=5), tmp_path / out, test_fraction=0.2, seed=5)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert Path("site-1/train.jsonl") in files and Path("site-1/test.jsonl") in files


def test_write_partition_refuses_unsafe_site_names(tmp_path):
    from fedmed_components.data.document import InputError

    with pytest.raises(InputError, match="folder name"):
        write_partition({"../x": corpus(2)}, tmp_path)
