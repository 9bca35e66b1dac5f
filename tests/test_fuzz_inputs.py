"""Fuzzing the readers and the model-output parser (hypothesis).

Whatever bytes a corpus file holds, and whatever a model generates, a reader gives
Documents (the parser a ParseResult) or raises an InputError that names the file and
the line; never another exception. Two kinds of input: any bytes, and near-valid input
built from each format's own pieces (random offsets, ids, types, truncations, wrong
field types), which reaches far deeper into the readers than noise does.

Document ids become file names when BRAT is written (`fedmed predict`, `fedmed data
convert`): no id ('../', absolute, NUL, very long, '.') may put a file outside the
output folder.

FEDMED_FUZZ_SCALE=10 multiplies every example budget for a deeper local run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fedmed_components.data import brat
from fedmed_components.data.bioc import read_bioc_files
from fedmed_components.data.brat import read_brat_file, write_brat_dir
from fedmed_components.data.corpora import read_jsonl_checked
from fedmed_components.data.document import Document, Entity, InputError, read_jsonl
from fedmed_components.data.schema import MAIN_TYPES, MODIFIER_TYPES
from fedmed_components.task.parsing import ParseResult, parse_modifiers, parse_ner

SCALE = float(os.environ.get("FEDMED_FUZZ_SCALE", "1"))


def fuzz(examples: int):
    """Settings for one fuzz test: no deadline and no slow-generation health checks (a loaded CI box)."""
    return settings(
        max_examples=max(1, int(examples * SCALE)),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """One folder for the module; each example overwrites the same few files."""
    return tmp_path_factory.mktemp("fuzz")


def line_count(path: Path) -> int:
    """Lines as the most generous reader counts them (XML also ends a line at a lone CR)."""
    return len(re.split(rb"\r\n|\r|\n", path.read_bytes()))


def assert_names_file_and_line(exc: InputError, *files: Path) -> None:
    """The error points at one of the files and at a line that exists in it."""
    named = {str(f): f for f in files}
    assert exc.path in named, f"{exc} names none of {list(named)}"
    assert exc.line is not None, f"{exc} names no line"
    assert 1 <= exc.line <= line_count(named[exc.path]), f"{exc}: no such line"


def assert_sound(doc: Document) -> None:
    """What the readers promise about a Document they return."""
    assert isinstance(doc.id, str) and isinstance(doc.text, str)
    ids = {e.id for e in doc.entities}
    for ent in doc.entities:
        assert ent.spans and all(0 <= s < e <= len(doc.text) for s, e in ent.spans)
        assert ent.negated in (None, True, False)
    assert all(r.head in ids and r.tail in ids for r in doc.relations)


# ---------------------------------------------------------------- pieces of near-valid input

# Offsets: plausible, negative, far past the text, and numbers too long for int().
OFFSETS = st.one_of(
    st.integers(-3, 80).map(str),
    st.integers(-(10**30), 10**30).map(str),
    st.sampled_from(["9" * 5000, "", "x", "1.5", "\u0663", "0x10", " 7"]),
)
IDS = st.sampled_from(["T1", "T2", "T3", "E1", "E2", "R1", "A1", "N1", "#1", "T", "X9", "", "T1 ", "Arg1:T1"])
TYPES = st.sampled_from(["problem", "drug", "Negated", "Sign_symptom", "", "a b", "hasAttr", "\u00e9t\u00e9"])
WORDS = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12)
SEP = st.sampled_from(["\t", " ", "", "\t\t"])
NOTE_TEXT = st.text(st.sampled_from(list("ab cd\n\r\t.;:") + ["\u00e9", "\u2028", "\U0001f600", "\x00"]), max_size=80)


def text_at(text: str, fragments) -> str:
    """What a reader finds at these offsets, where they are small numbers: the right text column."""
    small = [(int(a), int(b)) for a, b in fragments if re.fullmatch(r"-?\d{1,6}", a) and re.fullmatch(r"-?\d{1,6}", b)]
    return " ".join(text[a:b] for a, b in small)


@st.composite
def t_line(draw, text: str) -> str:
    ident = draw(st.sampled_from(["T1", "T2", "T3", "T4"]) | IDS)
    fragments = draw(st.lists(st.tuples(OFFSETS, OFFSETS), min_size=1, max_size=3))
    offsets = ";".join(f"{a} {b}" for a, b in fragments)
    actual = text_at(text, fragments)
    column = draw(st.sampled_from([actual, actual.replace("\n", " "), actual + "\textra"]) | WORDS)
    return f"{ident}{draw(SEP)}{draw(TYPES)} {offsets}{draw(SEP)}{column}"


# The other line kinds, each drawing only what it needs: R, A/M, E, N, #, * and noise.
OTHER_LINES = [
    lambda draw: f"R{draw(st.integers(0, 3))}\t{draw(TYPES)} Arg1:{draw(IDS)} Arg2:{draw(IDS)}",
    lambda draw: f"R1\thasAttr Arg2:{draw(IDS)} Arg1:{draw(IDS)}\t",
    lambda draw: f"R1\thasAttr {draw(IDS)} {draw(IDS)}",
    lambda draw: f"A{draw(st.integers(0, 3))}\tNegated {draw(IDS)}",
    lambda draw: f"A1\t{draw(TYPES)} {draw(IDS)} {draw(WORDS)}",
    lambda draw: f"M1\tNegated {draw(IDS)} false",
    lambda draw: f"E{draw(st.integers(0, 3))}\t{draw(TYPES)}:{draw(IDS)} Cause:{draw(IDS)}",
    lambda draw: f"E1\t{draw(TYPES)}:{draw(IDS)}",
    lambda draw: f"E1\t{draw(WORDS)}",
    lambda draw: f"N1\tReference {draw(IDS)} Wiki:{draw(WORDS)}\t{draw(WORDS)}",
    lambda draw: f"#1\tAnnotatorNotes {draw(IDS)}\t{draw(WORDS)}",
    lambda draw: f"*\tOverlap {draw(IDS)} {draw(IDS)}",
    lambda draw: f"*\t{draw(WORDS)}",
    lambda draw: draw(WORDS),
]


@st.composite
def other_line(draw) -> str:
    return draw(st.sampled_from(OTHER_LINES))(draw)


@st.composite
def brat_note(draw) -> tuple[str, str]:
    text = draw(NOTE_TEXT)
    lines = draw(st.lists(t_line(text) | other_line(), max_size=8))
    return text, draw(st.sampled_from(["\n", "\r\n"])).join(lines)


# ---------------------------------------------------------------- BRAT


def read_brat_pair(folder: Path, txt: bytes, ann: bytes) -> None:
    """Strict: a sound BratFile or an InputError at a real line; lenient: never raises."""
    txt_path, ann_path = folder / "note.txt", folder / "note.ann"
    txt_path.write_bytes(txt)
    ann_path.write_bytes(ann)
    try:
        parsed = read_brat_file(txt_path)
    except InputError as exc:
        assert_names_file_and_line(exc, txt_path, ann_path)
    else:
        assert_sound(parsed.document)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a lenient read warns about what it skipped
        lenient = read_brat_file(txt_path, lenient=True)
    if lenient is not None:
        assert_sound(lenient.document)


@fuzz(250)
@given(txt=st.binary(max_size=200), ann=st.binary(max_size=400))
def test_brat_any_bytes(scratch, txt, ann):
    read_brat_pair(scratch, txt, ann)


@fuzz(500)
@given(note=brat_note())
@example(note=("ab", "T1\tproblem 0 " + "9" * 5000 + "\tab"))  # int() refused 5000 digits: ValueError
def test_brat_near_valid_ann(scratch, note):
    text, ann = note
    read_brat_pair(scratch, text.encode("utf-8"), ann.encode("utf-8"))


# ---------------------------------------------------------------- BioC

ENCODINGS = st.sampled_from([None, "UTF-8", "utf-16", "latin-1", "ascii", "rot13", "klingon", "idna", "utf-7", "punycode"])
PASSAGE_OFFSETS = OFFSETS | st.sampled_from(["10000001", "1000000000000", "-1"])


def xml_text(draw, text: str) -> str:
    """Escaped as a writer would, or raw (a '<' or '&' breaks the tree)."""
    return escape(text) if draw(st.booleans()) else text


INFONS = st.lists(st.tuples(st.sampled_from(["type", "negated", "site", "", "x"]), TYPES | st.sampled_from(["true", "false"])), max_size=3)


@st.composite
def bioc_annotation(draw, text: str) -> str:
    infons = "".join(f"<infon key={quoteattr(k)}>{escape(v)}</infon>" for k, v in draw(INFONS))
    locations = draw(st.lists(st.tuples(OFFSETS, OFFSETS), max_size=2))
    actual = text_at(text, [(o, str(int(o) + int(n))) for o, n in locations if re.fullmatch(r"\d{1,6}", o) and re.fullmatch(r"\d{1,6}", n)])
    written = draw(st.sampled_from([None, actual]) | WORDS)
    body = infons + "".join(f"<location offset={quoteattr(o)} length={quoteattr(n)}/>" for o, n in locations)
    body += "" if written is None else f"<text>{xml_text(draw, written)}</text>"
    return f"<annotation id={quoteattr(draw(IDS))}>{body}</annotation>"


@st.composite
def bioc_relation(draw) -> str:
    infons = draw(st.sampled_from(['<infon key="type">hasAttr</infon>', "", '<infon key="type"></infon>']))
    nodes = draw(st.lists(st.tuples(IDS, st.sampled_from(["head", "Tail", "Arg1", "arg2", "", "x"])), max_size=3))
    return (
        f"<relation id={quoteattr(draw(IDS))}>{infons}"
        + "".join(f"<node refid={quoteattr(r)} role={quoteattr(o)}/>" for r, o in nodes)
        + "</relation>"
    )


@st.composite
def bioc_passage(draw) -> str:
    text = draw(NOTE_TEXT)
    offset = draw(st.none() | PASSAGE_OFFSETS)
    parts = [] if offset is None else [f"<offset>{escape(offset)}</offset>"]
    if draw(st.booleans()):
        parts.append(f"<text>{xml_text(draw, text)}</text>")
    else:  # sentence-level BioC
        parts.append(f"<sentence><offset>{escape(offset or '0')}</offset><text>{xml_text(draw, text)}</text></sentence>")
    parts += draw(st.lists(bioc_annotation(text) | bioc_relation(), max_size=4))
    return "<passage>" + "".join(parts) + "</passage>"


@st.composite
def bioc_collection(draw) -> bytes:
    documents = []
    for _ in range(draw(st.integers(0, 3))):
        doc_id = draw(st.sampled_from(["n1", "n2", "", " "]) | WORDS)
        passages = "".join(draw(st.lists(bioc_passage(), max_size=3)))
        documents.append(f"<document><id>{xml_text(draw, doc_id)}</id>{passages}</document>\n")
    root = draw(st.sampled_from(["collection", "collection", "collection", "document", "x"]))
    encoding = draw(ENCODINGS)
    declaration = f'<?xml version="1.0" encoding="{encoding}"?>\n' if encoding else ""
    data = (declaration + f"<{root}><source>fuzz</source>\n" + "".join(documents) + f"</{root}>\n").encode("utf-8")
    cut = draw(st.none() | st.integers(0, len(data)))
    return data if cut is None else data[:cut]


def read_bioc_bytes(folder: Path, data: bytes) -> None:
    path = folder / "corpus.xml"
    path.write_bytes(data)
    for lenient in (False, True):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                files = read_bioc_files(path, lenient=lenient)
        except InputError as exc:
            assert_names_file_and_line(exc, path)
        else:
            for parsed in files:
                assert_sound(parsed.document)


@fuzz(200)
@given(data=st.binary(max_size=300))
def test_bioc_any_bytes(scratch, data):
    read_bioc_bytes(scratch, data)


XML_PIECES = list("<>/=\"' &;#x0a\r\n\x00\u00e9") + [
    "collection",
    "document",
    "passage",
    "offset",
    "text",
    "annotation",
    "location",
    "id",
    "<?xml version='1.0'?>",
    "<!DOCTYPE c [<!ENTITY e 'x'>]>",
    "&e;",
    "&#13;",
    "&#0;",
    "<![CDATA[",
    "]]>",
    "<!--",
    "-->",
    "<?pi x?>",
]


@fuzz(200)
@given(pieces=st.lists(st.sampled_from(XML_PIECES), max_size=30))
def test_bioc_xml_fragments(scratch, pieces):
    read_bioc_bytes(scratch, "".join(pieces).encode("utf-8"))


@fuzz(250)
@given(data=bioc_collection())
@example(data=b'<?xml version="1.0" encoding="rot13"?><collection/>')  # LookupError from the codec
@example(data=b'<?xml version="1.0" encoding="idna"?><collection/>')  # UnicodeError
@example(data=b'<?xml version="1.0" encoding="utf-7"?><collection/>')  # ValueError
@example(
    data=b"<collection><document><id>a</id><passage><offset>1000000000000</offset><text>t</text></passage></document></collection>"
)  # MemoryError
def test_bioc_near_valid_collection(scratch, data):
    read_bioc_bytes(scratch, data)


# ---------------------------------------------------------------- JSONL


def json_containers(inner):
    return st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)


JSON_SCALARS = st.none() | st.booleans() | st.integers(-(10**20), 10**20) | st.floats() | st.text(max_size=6)
JSON_VALUES = st.recursive(JSON_SCALARS, json_containers, max_leaves=6)
SPAN = st.lists(st.integers(-2, 40) | st.floats() | st.sampled_from(["3", "x", None, True]), min_size=0, max_size=3)


def maybe(value, draw):
    """The right value, or (now and then) any JSON value in its place."""
    return draw(st.sampled_from([value]) | JSON_VALUES) if draw(st.integers(0, 4)) == 0 else value


@st.composite
def json_entity(draw) -> dict:
    entity = {
        "id": maybe(draw(IDS), draw),
        "type": maybe(draw(TYPES), draw),
        "spans": maybe(draw(st.lists(st.lists(st.integers(-2, 40), min_size=2, max_size=2) | SPAN, max_size=2)), draw),
        "text": maybe("x", draw),
        "negated": maybe(draw(st.sampled_from([True, False, None])), draw),
    }
    return {k: v for k, v in entity.items() if draw(st.integers(0, 9))}  # now and then a key is missing


@st.composite
def json_document(draw) -> str:
    doc = {
        "id": maybe(draw(st.sampled_from(["n1", "n2"]) | WORDS), draw),
        "site": maybe(draw(st.sampled_from([None, "a"])), draw),
        "text": maybe(draw(NOTE_TEXT), draw),
        "entities": maybe(draw(st.lists(json_entity(), max_size=3)), draw),
        "relations": maybe(draw(st.lists(st.fixed_dictionaries({"type": TYPES, "head": IDS, "tail": IDS}), max_size=2)), draw),
    }
    doc = {k: v for k, v in doc.items() if draw(st.integers(0, 9))}
    return json.dumps(maybe(doc, draw))  # allow_nan: NaN and Infinity reach the reader


JSONL_LINES = (
    json_document() | st.sampled_from(["", " ", "[" * 3000 + "]" * 3000, '{"id": "n", "text": "t"', "\ufeff{}"]) | st.text(max_size=20)
)


def read_jsonl_bytes(folder: Path, data: bytes) -> None:
    """Both JSONL readers: the plain one and the validating one (strict and lenient)."""
    path = folder / "docs.jsonl"
    path.write_bytes(data)
    try:
        docs = read_jsonl(path)
    except InputError as exc:
        assert_names_file_and_line(exc, path)
    else:
        for doc in docs:
            assert isinstance(doc.id, str) and isinstance(doc.text, str) and (doc.site is None or isinstance(doc.site, str))
            assert all(isinstance(s, int) and isinstance(e, int) for ent in doc.entities for s, e in ent.spans)
            assert all(ent.negated in (None, True, False) for ent in doc.entities)
    for lenient in (False, True):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                checked = read_jsonl_checked(path, lenient=lenient)
        except InputError as exc:
            assert_names_file_and_line(exc, path)
        else:
            for doc in checked:
                assert_sound(doc)


@fuzz(200)
@given(data=st.binary(max_size=300))
def test_jsonl_any_bytes(scratch, data):
    read_jsonl_bytes(scratch, data)


@fuzz(300)
@given(lines=st.lists(JSONL_LINES, min_size=1, max_size=4), newline=st.sampled_from(["\n", "\r\n"]))
@example(
    lines=['{"id": "a", "text": "t", "entities": [{"id": "T1", "type": "x", "spans": [[Infinity, 1]]}]}'], newline="\n"
)  # OverflowError
@example(lines=["[" * 3000 + "]" * 3000], newline="\n")  # RecursionError
@example(
    lines=[
        '{"id": "a", "text": "t", "site": true}',
        '{"id": "b", "text": "t", "entities": [{"id": "T1", "type": "x", "spans": [[0, 1]], "negated": "no"}]}',
    ],
    newline="\n",
)  # wrong types accepted
def test_jsonl_near_valid_lines(scratch, lines, newline):
    read_jsonl_bytes(scratch, newline.join(lines).encode("utf-8", "surrogatepass"))


# ---------------------------------------------------------------- model-output parser

SENTENCES = st.sampled_from(
    [
        "Denies chest pain; aspirin 81 mg p.o. daily.",
        "No fever.",
        "",
        "İstanbul ß straße ﬁ",
        "a a a a",
        "\n\t",
    ]
) | st.text(max_size=60)


def assert_parse_result(result, sentence: str, allowed) -> None:
    assert isinstance(result, ParseResult) and isinstance(result.failed, bool)
    assert all(isinstance(p, str) for p in result.problems)
    for kind, start, end in result.spans:
        assert kind in {t.lower() for t in allowed} and 0 <= start < end <= len(sentence)


def parse_both(output: str, sentence: str, output_format: str, main_at: int) -> None:
    assert_parse_result(parse_ner(output, sentence, output_format), sentence, MAIN_TYPES)
    main = ("drug", main_at % max(len(sentence), 1), main_at % max(len(sentence), 1) + 1)
    assert_parse_result(parse_modifiers(output, sentence, output_format, main=main), sentence, MODIFIER_TYPES)


@st.composite
def html_answer(draw, sentence: str) -> str:
    """The sentence cut at random points with tags (good, odd and broken) between."""
    cuts = sorted(draw(st.lists(st.integers(0, len(sentence)), max_size=6)))
    tags = st.sampled_from(
        [
            '<span class="problem">',
            '<span class="dosage">',
            "</span>",
            "<span>",
            "< / span >",
            "<span class=drug>",
            "<span class='bodyloc'>",
            '<span class="nope">',
            '<main class="drug">',
            "</main>",
            "```html\n",
            "```",
            "<",
            ">",
            "",
        ]
    )
    pieces, last = [], 0
    for cut in cuts + [len(sentence)]:
        pieces += [sentence[last:cut], draw(tags)]
        last = cut
    return "".join(pieces)


@st.composite
def json_answer(draw, sentence: str) -> str:
    items = []
    for _ in range(draw(st.integers(0, 4))):
        a, b = sorted(draw(st.tuples(st.integers(0, len(sentence)), st.integers(0, len(sentence)))))
        item = {"type": draw(st.sampled_from(["problem", "drug", "dosage", "negation", "nope", ""])), "text": sentence[a:b]}
        items.append(draw(st.sampled_from([item, {"class": item["type"], "text": item["text"]}]) | JSON_VALUES))
    body = json.dumps(draw(st.sampled_from([items, {"entities": items}, {"x": 1}])))
    return draw(st.sampled_from(["", "Sure: ", "```json\n"])) + body + draw(st.sampled_from(["", "```", " ]", "["]))


@fuzz(300)
@given(output=st.text(max_size=200), sentence=SENTENCES, output_format=st.sampled_from(["html", "json"]), main_at=st.integers(0, 100))
def test_parser_any_text(output, sentence, output_format, main_at):
    parse_both(output, sentence, output_format, main_at)


@fuzz(250)
@given(data=st.data(), sentence=SENTENCES, main_at=st.integers(0, 100))
def test_parser_near_valid_answers(data, sentence, main_at):
    parse_both(data.draw(html_answer(sentence)), sentence, "html", main_at)
    parse_both(data.draw(json_answer(sentence)), sentence, "json", main_at)


@pytest.mark.parametrize("output", ["[" * 5_000, "{" * 5_000, '[{"text": ' * 2_000])
def test_parser_survives_degenerate_nesting(output):
    """A model stuck repeating '[' must not blow the JSON decoder's stack."""
    for output_format in ("json", "html"):
        parse_both(output, "No fever.", output_format, 0)


# ---------------------------------------------------------------- document ids as file names

ID_PIECES = st.sampled_from(
    [
        "..",
        ".",
        "/",
        "\\",
        "",
        "a",
        "note",
        "\x00",
        "\n",
        "~",
        "C:",
        " ",
        "...",
        "x" * 300,
        "\u00e9" * 130,
        "\ud800",
    ]
)
HOSTILE_IDS = st.lists(ID_PIECES, max_size=6).map("".join) | st.text(max_size=30)
NOTE = "Aspirin 81 mg."


def sandbox_for_ids(scratch: Path) -> Path:
    """A fresh output folder four levels below the scratch folder (room to climb)."""
    sandbox = scratch / "ids"
    shutil.rmtree(sandbox, ignore_errors=True)
    out = sandbox / "a" / "b" / "c" / "out"
    out.mkdir(parents=True)
    return out


@fuzz(250)
@given(doc_id=HOSTILE_IDS)
@example(doc_id=".")  # wrote out.txt and out.ann beside the output folder
@example(doc_id="nul\x00")  # ValueError from open()
@example(doc_id="\ud800")  # UnicodeEncodeError from open()
@example(doc_id="x" * 300)  # OSError: file name too long
def test_document_ids_never_leave_the_output_folder(scratch, doc_id):
    out = sandbox_for_ids(scratch)
    around = sorted(os.listdir(scratch))
    doc = Document(doc_id, NOTE, entities=[Entity("T1", "drug", [(0, 7)], "Aspirin")])
    try:
        write_brat_dir([doc], out, source="notes.jsonl")
    except InputError as exc:
        assert exc.path == "notes.jsonl" and "cannot be a file name" in exc.reason and "\n" not in str(exc)
        assert not any(out.iterdir()), "a refused id still wrote something"
    else:
        written = [p for p in (scratch / "ids").rglob("*") if p.is_file()]
        assert sorted(p.name for p in written) == sorted([Path(doc_id).name + ".ann", Path(doc_id).name + ".txt"])
        assert all(p.resolve().is_relative_to(out.resolve()) for p in written)
        assert Path(f"{out / doc_id}.txt").read_text(encoding="utf-8") == NOTE
        assert brat.file_name_problem(doc_id) is None
    assert sorted(os.listdir(scratch)) == around


def jsonl_with_id(folder: Path, doc_id: str) -> Path:
    path = folder / "notes.jsonl"
    path.write_text(json.dumps({"id": doc_id, "text": NOTE}) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("doc_id", ["../escaped", "/tmp/fedmed-absolute", "a/../../b", ".", "nul\x00byte", "x" * 400])
def test_cli_refuses_ids_that_would_write_outside_the_output_folder(tmp_path, capsys, doc_id):
    """`fedmed data convert` and `fedmed predict`: one line naming the input, nothing written."""
    from fedmed_components.cli import main

    notes = jsonl_with_id(tmp_path, doc_id)
    runs = {
        "convert": ["data", "convert", str(notes), str(tmp_path / "out_brat"), "--to", "brat"],
        # the ids are checked before the model is even resolved: no model is built here
        "predict": ["predict", "--model", "tiny", "--input", str(notes), "--out", str(tmp_path / "pred")],
    }
    for name, argv in runs.items():
        assert main(argv) == 2, name
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"fedmed: error: {notes}: document id ") and "cannot be a file name" in err, err
        assert "\n" not in err
        assert sorted(os.listdir(tmp_path)) == ["notes.jsonl"], name
    assert not Path("/tmp/fedmed-absolute.txt").exists()
