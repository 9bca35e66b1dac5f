from pathlib import Path

import pytest

from fedmed_components.data.brat import (
    DUPLICATE_ID,
    EMPTY_TEXT,
    MALFORMED_LINE,
    MISSING_FILE,
    NOT_UTF8,
    OFFSETS_OUTSIDE_TEXT,
    SPAN_TEXT_MISMATCH,
    UNKNOWN_ARGUMENT,
    UNKNOWN_TARGET,
    ReadReport,
    read_brat_dir,
    read_brat_document,
    read_brat_file,
    read_brat_files,
    write_brat_dir,
    write_brat_document,
)
from fedmed_components.data.document import Document, Entity, InputError, Relation, read_jsonl, write_jsonl

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is not beside the project")

TEXT = "Patient denies chest pain.\nAspirin 81 mg daily.\n"


def write_pair(folder: Path, name: str, text: str | bytes, ann: str | bytes) -> Path:
    """Write NAME.txt and NAME.ann byte for byte (no newline translation)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.txt").write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    (folder / f"{name}.ann").write_bytes(ann if isinstance(ann, bytes) else ann.encode("utf-8"))
    return folder / f"{name}.txt"


GOOD_ANN = (
    "T1\tnegation 8 14\tdenies\n"
    "T2\tproblem 15 25\tchest pain\n"
    "T3\tdrug 27 34\tAspirin\n"
    "T4\tstrength 35 40\t81 mg\n"
    "T5\tfrequency 41 46\tdaily\n"
    "R1\thasAttr Arg1:T2 Arg2:T1\t\n"
    "R2\thasAttr Arg1:T3 Arg2:T4\n"
    "R3\thasAttr Arg2:T5 Arg1:T3\n"
    "#1\tAnnotatorNotes T2\tchief complaint\n"
)


# ---------------------------------------------------------------- well-formed input


def test_reads_spans_relations_and_notes(tmp_path):
    parsed = read_brat_file(write_pair(tmp_path, "n1", TEXT, GOOD_ANN))
    doc = parsed.document
    assert doc.id == "n1" and doc.text == TEXT
    assert [(e.id, e.type, e.spans, e.text) for e in doc.entities][:2] == [
        ("T1", "negation", [(8, 14)], "denies"),
        ("T2", "problem", [(15, 25)], "chest pain"),
    ]
    # Arg1 is the head even when written second (R3)
    assert [(r.type, r.head, r.tail) for r in doc.relations] == [
        ("hasAttr", "T2", "T1"),
        ("hasAttr", "T3", "T4"),
        ("hasAttr", "T3", "T5"),
    ]
    assert [(n.kind, n.target, n.text) for n in parsed.notes] == [("AnnotatorNotes", "T2", "chief complaint")]


def test_discontinuous_span_is_joined_with_a_space(tmp_path):
    ann = "T1\tproblem 0 7;15 25\tPatient chest pain\n"
    doc = read_brat_document(write_pair(tmp_path, "d", TEXT, ann))
    assert doc.entities[0].spans == [(0, 7), (15, 25)]
    assert doc.entities[0].text == "Patient chest pain"


def test_events_resolve_to_their_trigger_and_attributes_are_kept(tmp_path):
    text = "No fever, then cough after surgery."
    ann = (
        "T1\tSign_symptom 3 8\tfever\n"
        "E1\tSign_symptom:T1 \n"
        "T2\tSign_symptom 15 20\tcough\n"
        "E2\tSign_symptom:T2\n"
        "T3\tTherapeutic_procedure 27 34\tsurgery\n"
        "E3\tTherapeutic_procedure:T3 Cause:E2\n"
        "R1\tAFTER Arg1:E2 Arg2:E3\t\n"
        "A1\tPOLARITY E1 NEG\n"
        "A2\tNegated E2\n"
        "*\tOVERLAP E1 E2\n"
    )
    parsed = read_brat_file(write_pair(tmp_path, "ev", text, ann))
    doc = parsed.document
    assert [(r.type, r.head, r.tail) for r in doc.relations] == [("AFTER", "T2", "T3")]
    assert [(a.name, a.target, a.value) for a in parsed.attributes] == [("POLARITY", "T1", "NEG")]
    assert doc.entity("T2").negated is True and doc.entity("T1").negated is None
    assert [(e.id, e.trigger, e.arguments) for e in parsed.events][2] == ("E3", "T3", [("Cause", "T2")])
    assert [(q.type, q.members) for q in parsed.equivalences] == [("OVERLAP", ["T1", "T2"])]


def test_crlf_counts_in_offsets(tmp_path):
    text = "Chest pain.\r\nDenies fever.\r\n"
    start = text.index("fever")
    assert start == 20  # 13 with the \r dropped: a reader that translates newlines is off by one
    ann = f"T1\tproblem 0 10\tChest pain\r\nT2\tproblem {start} {start + 5}\tfever\r\n"
    doc = read_brat_document(write_pair(tmp_path, "crlf", text, ann))
    assert doc.text == text
    assert [doc.text[s:e] for e in doc.entities for s, e in e.spans] == ["Chest pain", "fever"]
    write_brat_document(doc, tmp_path / "out")
    assert (tmp_path / "out" / "crlf.txt").read_bytes() == text.encode()


def test_span_across_a_line_break_is_written_on_one_line(tmp_path):
    text = "count of 140.\r\n5 later"
    doc = Document("lb", text, entities=[Entity("T1", "labvalue", [(9, 16)], text[9:16])])
    ann = write_brat_document(doc, tmp_path)
    assert ann.read_text(encoding="utf-8") == "T1\tlabvalue 9 16\t140.  5\n"
    again = read_brat_document(tmp_path / "lb.txt")
    assert again.entities[0].text == "140.\r\n5"


def test_extra_tab_column_after_the_span_text_is_accepted(tmp_path):
    # MACCROBAT and PHEE each have one such line; BRAT ignores the extra field
    doc = read_brat_document(write_pair(tmp_path, "x", TEXT, "T1\tproblem 15 25\tchest pain\t\u2005\n"))
    assert doc.entities[0].text == "chest pain"


def test_missing_trailing_newline_and_blank_lines(tmp_path):
    doc = read_brat_document(write_pair(tmp_path, "x", TEXT, "\nT1\tproblem 15 25\tchest pain\n\nT2\tdrug 27 34\tAspirin"))
    assert [e.id for e in doc.entities] == ["T1", "T2"]


# ---------------------------------------------------------------- bad input

BAD_ANN = {
    MALFORMED_LINE: ("T1\tproblem 15 25\tchest pain\nthis is not brat\n", 2),
    OFFSETS_OUTSIDE_TEXT: ("T1\tproblem 15 25\tchest pain\nT2\tdrug 40 400\tx\n", 2),
    SPAN_TEXT_MISMATCH: ("T1\tproblem 15 25\tchest pain\nT2\tdrug 27 34\tAspirin 81\n", 2),
    UNKNOWN_ARGUMENT: ("T1\tproblem 15 25\tchest pain\nR1\thasAttr Arg1:T1 Arg2:T9\n", 2),
    NOT_UTF8: (b"T1\tproblem 15 25\tchest pain\nT2\tdrug 27 34\tAsp\xffrin\n", 2),
    DUPLICATE_ID: ("T1\tproblem 15 25\tchest pain\nT1\tdrug 27 34\tAspirin\n", 2),
    UNKNOWN_TARGET: ("T1\tproblem 15 25\tchest pain\nA1\tNegated T7\n", 2),
}


@pytest.mark.parametrize("kind", sorted(BAD_ANN))
def test_bad_ann_raises_with_file_and_line(tmp_path, kind):
    ann, line = BAD_ANN[kind]
    txt = write_pair(tmp_path, "bad", TEXT, ann)
    with pytest.raises(InputError) as err:
        read_brat_document(txt)
    assert err.value.path == str(tmp_path / "bad.ann") and err.value.line == line
    assert kind in err.value.reason
    assert f"bad.ann:{line}: {kind}" in str(err.value)


@pytest.mark.parametrize("kind", sorted(BAD_ANN))
def test_lenient_skips_the_bad_item_and_counts_it(tmp_path, kind):
    ann, line = BAD_ANN[kind]
    write_pair(tmp_path, "bad", TEXT, ann)
    report = ReadReport()
    with pytest.warns(UserWarning, match=kind):
        docs = read_brat_dir(tmp_path, lenient=True, report=report)
    assert report.counts == {kind: 1}
    assert report.problems[0][:2] == (str(tmp_path / "bad.ann"), line)
    assert docs[0].entities[0].id == "T1"  # the good line before it is kept


@pytest.mark.parametrize(
    "kind, text, line",
    [(EMPTY_TEXT, b"", 1), (NOT_UTF8, b"line one\nline \xe9two\n", 2)],
)
def test_unusable_txt_raises_or_skips_the_document(tmp_path, kind, text, line):
    txt = write_pair(tmp_path, "bad", text, "")
    write_pair(tmp_path, "good", TEXT, GOOD_ANN)
    with pytest.raises(InputError) as err:
        read_brat_document(txt)
    assert (err.value.path, err.value.line) == (str(txt), line) and kind in err.value.reason
    report = ReadReport()
    with pytest.warns(UserWarning):
        docs = read_brat_dir(tmp_path, lenient=True, report=report)
    assert [d.id for d in docs] == ["good"]
    assert report.counts == {kind: 1} and report.skipped_documents == 1


def test_missing_ann_and_stray_ann(tmp_path):
    (tmp_path / "a.txt").write_text("some text", encoding="utf-8")
    (tmp_path / "b.ann").write_text("", encoding="utf-8")
    with pytest.raises(InputError, match=MISSING_FILE):
        read_brat_dir(tmp_path)
    report = ReadReport()
    with pytest.warns(UserWarning):
        docs = read_brat_dir(tmp_path, lenient=True, report=report)
    assert [d.id for d in docs] == ["a"] and report.counts == {MISSING_FILE: 2}


def test_span_text_spilled_onto_the_next_line_keeps_the_span(tmp_path):
    # The shape of the one defect in mtsamples_kiwi/train: a span with a line break
    # written raw, so the rest of its text lands on a line of its own.
    text = "platelets 140. \n5. History"
    ann = "T1\tlabvalue 10 17\t140. \n5\nT2\ttest 0 9\tplatelets\n"
    txt = write_pair(tmp_path, "spill", text, ann)
    with pytest.raises(InputError) as err:
        read_brat_document(txt)
    assert err.value.line == 2 and "rest of T1's text" in err.value.reason
    report = ReadReport()
    with pytest.warns(UserWarning, match="spill.ann: skipped 1 item"):
        doc = read_brat_document(txt, lenient=True, report=report)
    assert [(e.id, e.text) for e in doc.entities] == [("T1", "140. \n5"), ("T2", "platelets")]
    assert report.counts == {MALFORMED_LINE: 1}


def test_strict_is_the_default_and_reports_are_merged(tmp_path):
    write_pair(tmp_path / "a", "x", TEXT, "junk\n")
    write_pair(tmp_path / "b", "y", TEXT, "junk\njunk\n")
    report = ReadReport()
    with pytest.warns(UserWarning, match="skipped 3 item"):
        docs = read_brat_dir(tmp_path, lenient=True, report=report)
    assert [d.id for d in docs] == ["a/x", "b/y"]  # ids keep the subfolder, sorted
    assert report.skipped == 3 and report.documents == 2
    assert "3 malformed line" in report.summary()


# ---------------------------------------------------------------- writing


def test_writer_round_trip_renumbers_foreign_ids_and_keeps_negation(tmp_path):
    doc = Document(
        "note-7",
        TEXT,
        site="a",
        entities=[
            Entity("e1", "problem", [(15, 25)], "chest pain", negated=True),
            Entity("e2", "drug", [(27, 34)], "Aspirin", negated=False),
            Entity("e3", "strength", [(35, 37), (38, 40)], "81 mg"),
        ],
        relations=[Relation("hasAttr", "e2", "e3")],
    )
    write_brat_dir([doc], tmp_path)
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave nothing behind
    again = read_brat_document(tmp_path / "note-7.txt")
    assert [(e.id, e.type, e.spans, e.negated) for e in again.entities] == [
        ("T1", "problem", [(15, 25)], True),
        ("T2", "drug", [(27, 34)], False),
        ("T3", "strength", [(35, 37), (38, 40)], None),
    ]
    assert [(r.head, r.tail) for r in again.relations] == [("T2", "T3")]


def test_writer_refuses_spans_outside_the_text_and_unsafe_ids(tmp_path):
    bad_span = Document("x", "short", entities=[Entity("T1", "problem", [(2, 40)], "")])
    with pytest.raises(InputError, match="not inside the text"):
        write_brat_document(bad_span, tmp_path)
    assert not (tmp_path / "x.txt").exists()
    with pytest.raises(InputError, match="cannot be a file name"):
        write_brat_document(Document("../escape", "text"), tmp_path)
    dangling = Document("y", "text", entities=[Entity("T1", "problem", [(0, 4)], "text")], relations=[Relation("hasAttr", "T1", "T9")])
    with pytest.raises(InputError, match="unknown entity T9"):
        write_brat_document(dangling, tmp_path)


# ---------------------------------------------------------------- real corpora


@pytest.fixture(scope="module")
def mtsamples():
    if not DATA.is_dir():
        pytest.skip("../shared/data is not beside the project")
    report = ReadReport()
    with pytest.warns(UserWarning, match="1 malformed line"):
        docs = read_brat_dir(DATA / "mtsamples_kiwi" / "train", lenient=True, report=report)
    return docs, report


def _all_offsets_match(docs):
    return all(
        e.text == " ".join(d.text[s:t] for s, t in e.spans) and all(0 <= s < t <= len(d.text) for s, t in e.spans)
        for d in docs
        for e in d.entities
    )


def test_mtsamples_counts_match_the_readme(mtsamples):
    docs, report = mtsamples
    assert len(docs) == 96
    assert sum(len(d.entities) for d in docs) == 10_838
    rels = [r for d in docs for r in d.relations]
    assert len(rels) == 4_742 and {r.type for r in rels} == {"hasAttr"}
    assert _all_offsets_match(docs)


def test_mtsamples_malformed_line_is_reported_with_file_and_line(mtsamples):
    _, report = mtsamples
    assert report.counts == {MALFORMED_LINE: 1}
    ((path, line, reason),) = report.problems
    assert Path(path).name == "50_20210610044419_Hayden.ann" and line == 121
    with pytest.raises(InputError) as err:
        read_brat_dir(DATA / "mtsamples_kiwi" / "train")
    assert str(err.value).startswith(f"{path}:121: malformed line")


@needs_data
def test_maccrobat_loads_with_every_offset_matching():
    report = ReadReport()
    files = read_brat_files(DATA / "maccrobat2020" / "brat", report=report)
    docs = [f.document for f in files]
    assert len(docs) == 200 and report.skipped == 0
    assert sum(len(d.entities) for d in docs) == 25_189
    assert sum(len(d.relations) for d in docs) == 16_307
    assert sum(len(f.events) for f in files) == 14_368
    assert sum(a.name == "POLARITY" and a.value == "NEG" for f in files for a in f.attributes) == 1_049
    assert report.not_carried["notes"] == 335 and report.not_carried["equivalence groups"] == 2_023
    assert _all_offsets_match(docs)


@needs_data
def test_phee_loads_with_discontinuous_spans_preserved():
    report = ReadReport()
    docs = read_brat_dir(DATA / "phee" / "brat", report=report)
    assert len(docs) == 4_827 and report.skipped == 0
    assert {d.id.split("/")[0] for d in docs} == {"train", "dev", "test"}
    assert sum(len(e.spans) > 1 for d in docs for e in d.entities) == 620
    assert _all_offsets_match(docs)


def _round_trip(docs, tmp_path: Path) -> list[Document]:
    """BRAT -> Document -> JSONL -> Document -> BRAT -> Document."""
    write_jsonl(docs, tmp_path / "docs.jsonl")
    write_brat_dir(read_jsonl(tmp_path / "docs.jsonl"), tmp_path / "brat")
    return read_brat_dir(tmp_path / "brat")


def test_round_trip_is_lossless_on_mtsamples(mtsamples, tmp_path):
    docs, _ = mtsamples
    assert [d.to_dict() for d in _round_trip(docs, tmp_path)] == [d.to_dict() for d in docs]


@needs_data
def test_round_trip_is_lossless_on_maccrobat_and_phee(tmp_path):
    maccrobat = read_brat_dir(DATA / "maccrobat2020" / "brat")
    assert [d.to_dict() for d in _round_trip(maccrobat, tmp_path / "m")] == [d.to_dict() for d in maccrobat]
    phee_dev = read_brat_dir(DATA / "phee" / "brat" / "dev")[:300]
    assert sum(len(e.spans) > 1 for d in phee_dev for e in d.entities) > 0
    assert [d.to_dict() for d in _round_trip(phee_dev, tmp_path / "p")] == [d.to_dict() for d in phee_dev]
    # the text files are byte-identical to the originals
    original = DATA / "maccrobat2020" / "brat" / f"{maccrobat[0].id}.txt"
    assert (tmp_path / "m" / "brat" / original.name).read_bytes() == original.read_bytes()


def test_hidden_folders_are_not_part_of_the_corpus(tmp_path):
    write_pair(tmp_path, "n1", TEXT, GOOD_ANN)
    write_pair(tmp_path / ".ipynb_checkpoints", "n1-checkpoint", TEXT, "junk\n")
    assert [d.id for d in read_brat_dir(tmp_path)] == ["n1"]
