from pathlib import Path

import pytest

from fedmed_components.data.bioc import read_bioc, read_bioc_files, write_bioc
from fedmed_components.data.brat import (
    MALFORMED_LINE,
    OFFSETS_OUTSIDE_TEXT,
    SPAN_TEXT_MISMATCH,
    UNKNOWN_ARGUMENT,
    ReadReport,
    read_brat_dir,
)
from fedmed_components.data.document import Document, Entity, InputError, Relation

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def sample_docs() -> list[Document]:
    text = "Chest pain.\r\nAspirin 81 mg <daily> & PRN.\r\n"
    return [
        Document(
            "n1",
            text,
            site="site-a",
            entities=[
                Entity("T1", "problem", [(0, 10)], "Chest pain", negated=True),
                Entity("T2", "drug", [(13, 20)], "Aspirin"),
                Entity("T3", "strength", [(21, 23), (24, 26)], "81 mg"),
                Entity("T4", "frequency", [(28, 33)], "daily", negated=False),
            ],
            relations=[Relation("hasAttr", "T2", "T3"), Relation("hasTemporal", "T2", "T4")],
        ),
        Document("n2", "No annotations here."),
    ]


def test_round_trip_keeps_text_bytes_spans_relations_and_negation(tmp_path):
    docs = sample_docs()
    path = write_bioc(docs, tmp_path / "c.xml")
    assert not list(tmp_path.glob("*.tmp"))
    xml = path.read_text(encoding="utf-8")
    assert "&#13;" in xml and "&lt;daily&gt; &amp; PRN" in xml  # CR survives XML parsing
    again = read_bioc(path)
    assert [d.to_dict() for d in again] == [d.to_dict() for d in docs]


FOREIGN = """<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE collection SYSTEM "BioC.dtd">
<collection><source>PubMed</source><date>20240101</date><key>x.key</key>
<document><id>123</id>
  <passage><infon key="type">title</infon><offset>0</offset><text>Aspirin rash</text>
    <annotation id="a1"><infon key="type">Drug</infon><infon key="POLARITY">NEG</infon>
      <location offset="0" length="7"/><text>Aspirin</text></annotation>
  </passage>
  <passage><infon key="type">abstract</infon><offset>13</offset>
    <sentence><offset>13</offset><text>A rash appeared.</text>
      <annotation id="a2"><infon key="type">Effect</infon><location offset="15" length="4"/><text>rash</text></annotation>
    </sentence>
  </passage>
  <relation id="r1"><infon key="type">causes</infon>
    <node refid="a2" role="Arg2"/><node refid="a1" role="Arg1"/></relation>
</document>
</collection>
"""


def test_reads_passages_sentences_infons_and_node_roles(tmp_path):
    path = tmp_path / "f.xml"
    path.write_text(FOREIGN, encoding="utf-8")
    (parsed,) = read_bioc_files(path)
    doc = parsed.document
    assert doc.text == "Aspirin rash\nA rash appeared."
    assert [(e.id, e.type, e.text) for e in doc.entities] == [("a1", "Drug", "Aspirin"), ("a2", "Effect", "rash")]
    assert [(r.type, r.head, r.tail) for r in doc.relations] == [("causes", "a1", "a2")]
    assert [(a.name, a.target, a.value) for a in parsed.attributes] == [("POLARITY", "a1", "NEG")]


def _doc_xml(body: str) -> str:
    return (
        "<collection><source/><date/><key/>\n<document><id>d</id>\n"
        "<passage><offset>0</offset><text>Chest pain today</text>\n" + body + "\n</passage></document></collection>\n"
    )


GOOD = '<annotation id="a"><infon key="type">problem</infon><location offset="0" length="10"/><text>Chest pain</text></annotation>'
BAD = {
    OFFSETS_OUTSIDE_TEXT: '<annotation id="b"><infon key="type">problem</infon><location offset="11" length="40"/></annotation>',
    SPAN_TEXT_MISMATCH: '<annotation id="b"><infon key="type">problem</infon><location offset="11" length="5"/><text>tomorrow</text></annotation>',
    MALFORMED_LINE: '<annotation id="b"><location offset="11" length="5"/></annotation>',
    UNKNOWN_ARGUMENT: '<relation id="r"><infon key="type">hasAttr</infon><node refid="a" role="head"/><node refid="zz" role="tail"/></relation>',
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_items_raise_with_line_or_are_counted(tmp_path, kind):
    path = tmp_path / "bad.xml"
    path.write_text(_doc_xml(GOOD + "\n" + BAD[kind]), encoding="utf-8")
    with pytest.raises(InputError) as err:
        read_bioc(path)
    assert (err.value.path, err.value.line) == (str(path), 5) and kind in err.value.reason
    report = ReadReport()
    with pytest.warns(UserWarning, match=kind):
        docs = read_bioc(path, lenient=True, report=report)
    assert report.counts == {kind: 1}
    assert [e.id for e in docs[0].entities] == ["a"]


def test_broken_xml_and_non_utf8_name_the_line(tmp_path):
    path = tmp_path / "broken.xml"
    path.write_text("<collection>\n<document>\n<id>x</id>\n</collection>\n", encoding="utf-8")
    with pytest.raises(InputError) as err:
        read_bioc(path)
    assert err.value.line == 4 and "not well-formed XML: mismatched tag" in err.value.reason
    with pytest.raises(InputError):
        read_bioc(path, lenient=True)  # a broken tree cannot be skipped past
    path.write_bytes(b"<collection>\n<document><id>caf\xe9</id></document>\n</collection>\n")
    with pytest.raises(InputError) as err:
        read_bioc(path)
    assert err.value.line == 2 and "not UTF-8" in err.value.reason


def test_writer_refuses_text_xml_cannot_hold(tmp_path):
    with pytest.raises(InputError, match="its text holds a control character"):
        write_bioc([Document("x", "form\x0cfeed")], tmp_path / "x.xml")


@pytest.mark.parametrize(
    "doc, what",
    [
        (Document("n\x01", "Pain."), "its id"),
        (Document("n", "Pain.", site="a\x02"), "its site"),
        (Document("n", "Pain.", entities=[Entity("T\x1f", "problem", [(0, 4)], "Pain")]), "entity"),
    ],
)
def test_writer_refuses_ids_and_names_xml_cannot_hold_and_writes_nothing(tmp_path, doc, what):
    with pytest.raises(InputError, match=f"{what}.* holds a control character"):
        write_bioc([doc], tmp_path / "x.xml")
    assert not (tmp_path / "x.xml").exists()  # nothing half-written


def test_round_trip_on_real_mtsamples(tmp_path):
    if not DATA.is_dir():
        pytest.skip("../shared/data is not beside the project")
    with pytest.warns(UserWarning):
        docs = read_brat_dir(DATA / "mtsamples_kiwi" / "train", lenient=True)
    again = read_bioc(write_bioc(docs, tmp_path / "kiwi.xml"))
    assert [d.to_dict() for d in again] == [d.to_dict() for d in docs]
