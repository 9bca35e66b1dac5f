import json
import sys
import types
from pathlib import Path

import pytest

from fedmed_components.cli import main
from fedmed_components.data.document import Document, Entity, Relation, read_jsonl, write_jsonl

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is not beside the project")
KIWI = DATA / "mtsamples_kiwi" / "train"


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def stats_json(capsys, *argv) -> dict:
    rc, out, _ = run(capsys, "data", "stats", *argv, "--json")
    assert rc == 0
    return json.loads(out)


def small_corpus(prefix: str, n: int = 8) -> list[Document]:
    docs = []
    for i in range(n):
        ents = [Entity("T1", "drug", [(0, 7)], "Aspirin"), Entity("T2", "dosage", [(8, 13)], "81 mg")]
        docs.append(Document(f"{prefix}{i}", "Aspirin 81 mg daily", entities=ents, relations=[Relation("hasAttr", "T1", "T2")]))
    return docs


# ---------------------------------------------------------------- help


def test_data_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["data", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert all(name in out for name in ("convert", "split", "stats"))
    rc, out, _ = run(capsys, "data")
    assert rc == 2 and "SUBCOMMAND" in out


@pytest.mark.parametrize(
    "sub, words",
    [
        ("convert", ["--mapping", "--lenient-input", "BioC", "--to"]),
        ("split", ["--by", "--alpha", "--test-fraction", "Dirichlet", "manifest.json"]),
        ("stats", ["--json", "discontinuous", "--lenient-input"]),
    ],
)
def test_subcommand_help_explains_the_options(capsys, sub, words):
    with pytest.raises(SystemExit):
        main(["data", sub, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert all(w in out for w in words)


def test_synth_parser_plugs_into_the_data_group(monkeypatch, capsys):
    module = types.ModuleType("fedmed_components.data.synth")

    def add_synth_parser(sub):
        sub.add_parser("synth", help="make a synthetic corpus").set_defaults(func=lambda args: 0)

    module.add_synth_parser = add_synth_parser
    monkeypatch.setitem(sys.modules, "fedmed_components.data.synth", module)
    assert main(["data", "synth"]) == 0


# ---------------------------------------------------------------- stats on the real corpora


@needs_data
def test_stats_mtsamples_lenient_matches_readme_and_reports_the_bad_line(capsys):
    rc, out, err = run(capsys, "data", "stats", KIWI, "--mapping", "kiwi", "--lenient-input")
    assert rc == 0
    lines = [" ".join(line.split()) for line in out.splitlines()]
    for expected in (
        "documents 96",
        "spans 10,838",
        "relations 4,742",
        "hasAttr problem -> negation 1,478",
        "hasAttr problem -> bodyloc 959",
        "hasAttr test -> labvalue 893",
        "skipped input items 1",
        "malformed line 1",
    ):
        assert expected in lines
    assert "warning" in err and "skipped 1 item(s): 1 malformed line" in err
    assert "50_20210610044419_Hayden.ann:121: malformed line" in err


@needs_data
def test_stats_mtsamples_strict_names_file_and_line(capsys):
    rc, out, err = run(capsys, "data", "stats", KIWI)
    assert rc == 2 and out == ""
    assert "50_20210610044419_Hayden.ann:121: malformed line" in err and "--lenient-input" in err


@needs_data
def test_stats_maccrobat_matches_readme(capsys):
    stats = stats_json(capsys, DATA / "maccrobat2020" / "brat")
    assert (stats["documents"], stats["spans"], stats["relations"]) == (200, 25_189, 16_307)
    assert stats["skipped"]["skipped"] == {}
    assert stats["skipped"]["not_carried"]["notes"] == 335
    mapped = stats_json(capsys, DATA / "maccrobat2020" / "brat", "--mapping", "maccrobat")
    assert mapped["relations"] == 6_813 and mapped["mapping"]["swapped_relations"] == 6_813
    assert mapped["spans"] + sum(mapped["mapping"]["dropped_entities"].values()) == 25_189


@needs_data
def test_stats_phee_matches_readme(capsys):
    stats = stats_json(capsys, DATA / "phee" / "brat")
    assert stats["documents"] == 4_827 and stats["discontinuous_spans"] == 620
    assert stats["skipped"]["skipped"] == {}


# ---------------------------------------------------------------- convert


def test_convert_between_all_formats(tmp_path, capsys):
    docs = small_corpus("n", 3)
    write_jsonl(docs, tmp_path / "in.jsonl")
    assert run(capsys, "data", "convert", tmp_path / "in.jsonl", tmp_path / "brat")[0] == 0
    assert run(capsys, "data", "convert", tmp_path / "brat", tmp_path / "c.xml")[0] == 0
    rc, out, _ = run(capsys, "data", "convert", tmp_path / "c.xml", tmp_path / "out.jsonl", "--site", "h1")
    assert rc == 0 and "wrote 3 documents, 6 spans, 3 relations" in out
    again = read_jsonl(tmp_path / "out.jsonl")
    assert [d.to_dict() for d in again] == [Document(**{**d.__dict__, "site": "h1"}).to_dict() for d in docs]
    rc, _, _ = run(capsys, "data", "convert", tmp_path / "brat", tmp_path / "weird", "--to", "jsonl")
    assert rc == 0 and len(read_jsonl(tmp_path / "weird")) == 3


def test_convert_lenient_prints_warning_and_count(tmp_path, capsys):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.txt").write_text("Aspirin 81 mg", encoding="utf-8")
    (tmp_path / "b" / "x.ann").write_text("T1\tdrug 0 7\tAspirin\nT2\tdosage 8 99\t81 mg\n", encoding="utf-8")
    rc, _, err = run(capsys, "data", "convert", tmp_path / "b", tmp_path / "x.jsonl")
    assert rc == 2 and "x.ann:2: offsets outside text" in err
    rc, out, err = run(capsys, "data", "convert", tmp_path / "b", tmp_path / "x.jsonl", "--lenient-input")
    assert rc == 0 and "wrote 1 documents, 1 spans" in out
    assert "warning" in err and "1 offsets outside text" in err and "x.ann:2" in err


@needs_data
def test_convert_maccrobat_onto_kiwi(tmp_path, capsys):
    rc, out, _ = run(
        capsys, "data", "convert", DATA / "maccrobat2020" / "brat", tmp_path / "m.jsonl", "--mapping", "maccrobat", "--site", "maccrobat"
    )
    assert rc == 0 and "mapping maccrobat: dropped" in out
    docs = read_jsonl(tmp_path / "m.jsonl")
    assert len(docs) == 200 and {d.site for d in docs} == {"maccrobat"}
    assert {r.type for d in docs for r in d.relations} == {"hasAttr"}


# ---------------------------------------------------------------- split


@needs_data
def test_split_mtsamples_by_note_type(tmp_path, capsys):
    rc, out, _ = run(
        capsys,
        "data",
        "split",
        KIWI,
        tmp_path / "sites",
        "--by",
        "note-type",
        "--mapping",
        "kiwi",
        "--lenient-input",
        "--test-fraction",
        "0.2",
        "--seed",
        "1",
    )
    assert rc == 0
    manifest = json.loads((tmp_path / "sites" / "manifest.json").read_text())
    assert {s: e["documents"] for s, e in manifest["sites"].items()} == {
        "discharge_summary": 38,
        "general_medicine": 56,
        "other": 2,
    }
    assert manifest["total"]["spans"] == 10_838 and manifest["strategy"] == "note-type"
    gm = manifest["sites"]["general_medicine"]["files"]
    assert gm["test.jsonl"]["documents"] == 11 and gm["train.jsonl"]["documents"] == 45
    assert len(read_jsonl(tmp_path / "sites" / "general_medicine" / "train.jsonl")) == 45


def test_split_by_corpus_marks_partial_schema_sites(tmp_path, capsys):
    write_jsonl(small_corpus("a"), tmp_path / "a.jsonl")
    phee_like = small_corpus("b")
    for doc in phee_like:
        doc.entities[0].type, doc.entities[1].type = "Drug", "Dosage"  # PHEE's own names
    write_jsonl(phee_like, tmp_path / "b.jsonl")
    rc, out, _ = run(
        capsys,
        "data",
        "split",
        tmp_path / "a.jsonl",
        tmp_path / "b.jsonl",
        tmp_path / "out",
        "--by",
        "corpus",
        "--mapping",
        "kiwi",
        "--mapping",
        "phee",
        "--site-names",
        "hosp_a,hosp_b",
    )
    assert rc == 0 and "hosp_a: 8 documents" in out
    site_a = json.loads((tmp_path / "out" / "hosp_a" / "manifest.json").read_text())
    site_b = json.loads((tmp_path / "out" / "hosp_b" / "manifest.json").read_text())
    assert len(site_a["annotated_types"]) == 20
    assert "test" not in site_b["annotated_types"] and "drug" in site_b["annotated_types"]
    assert site_b["files"]["train.jsonl"]["spans_per_type"] == {"drug": 8, "dosage": 8}
    assert site_b["files"]["train.jsonl"]["relations"] == 0  # PHEE has no hasAttr counterpart


def test_split_dirichlet_is_deterministic(tmp_path, capsys):
    docs = small_corpus("d", 40)
    for i, doc in enumerate(docs):
        if i % 3 == 0:
            doc.entities[0].type = "test"
    write_jsonl(docs, tmp_path / "in.jsonl")
    for out in ("x", "y"):
        rc, _, _ = run(
            capsys,
            "data",
            "split",
            tmp_path / "in.jsonl",
            tmp_path / out,
            "--by",
            "dirichlet",
            "--sites",
            "3",
            "--alpha",
            "0.3",
            "--seed",
            "4",
        )
        assert rc == 0
    assert (tmp_path / "x" / "manifest.json").read_text() == (tmp_path / "y" / "manifest.json").read_text()
    manifest = json.loads((tmp_path / "x" / "manifest.json").read_text())
    assert manifest["alpha"] == 0.3 and sum(e["documents"] for e in manifest["sites"].values()) == 40
