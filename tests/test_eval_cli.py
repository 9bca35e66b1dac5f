"""`fedmed eval` on small BRAT and JSONL fixtures written here."""

import json

from fedmed_components.cli import main
from fedmed_components.data.brat import write_brat_dir
from fedmed_components.data.document import Document, Entity, Relation, write_jsonl
from fedmed_components.data.synth import generate_site_corpus

TEXT = "No fever. Aspirin 81 mg daily."


def _gold():
    ents = [
        Entity("T1", "negation", [(0, 2)], "No"),
        Entity("T2", "problem", [(3, 8)], "fever"),
        Entity("T3", "drug", [(10, 17)], "Aspirin"),
        Entity("T4", "strength", [(18, 23)], "81 mg"),
    ]
    return Document("note1", TEXT, entities=ents, relations=[Relation("hasAttr", "T2", "T1"), Relation("hasAttr", "T3", "T4")])


def _pred():
    ents = [Entity("P1", "problem", [(3, 8)], "fever"), Entity("P2", "drug", [(10, 23)], "Aspirin 81 mg")]
    return Document("note1", TEXT, entities=ents)


def _eval(tmp_path, *extra):
    write_brat_dir([_gold()], tmp_path / "gold")
    write_jsonl([_pred()], tmp_path / "pred.jsonl")
    return main(["eval", "--gold", str(tmp_path / "gold"), "--pred", str(tmp_path / "pred.jsonl"), *extra])


def test_json_output_has_the_contract_keys(tmp_path, capsys):
    assert _eval(tmp_path, "--json", "--parse-failures", "2") == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {"documents", "entities", "relations", "parse_failures"}
    assert set(result["entities"]) == {"strict", "lenient", "per_type"}
    for metrics in (
        result["entities"]["strict"],
        result["entities"]["lenient"],
        result["relations"]["strict"],
        result["relations"]["lenient"],
        result["entities"]["per_type"]["drug"]["strict"],
    ):
        assert set(metrics) == {"precision", "recall", "f1", "tp", "fp", "fn"}
    assert result["documents"] == 1 and result["parse_failures"] == 2
    s, le = result["entities"]["strict"], result["entities"]["lenient"]
    assert (s["tp"], s["fp"], s["fn"]) == (1, 1, 3) and (le["tp"], le["fp"], le["fn"]) == (2, 0, 2)
    assert result["relations"]["lenient"]["fn"] == 2


def test_types_restrict_and_table_is_the_default(tmp_path, capsys):
    assert _eval(tmp_path, "--types", "problem", "drug") == 0
    out = capsys.readouterr().out
    assert "entities (micro)" in out and "  drug" in out and "negation" not in out
    assert _eval(tmp_path, "--json", "--types", "problem,strength") == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["entities"]["per_type"]) == {"problem", "strength"}
    assert result["entities"]["per_type"]["problem"]["strict"]["f1"] == 1.0 and result["entities"]["strict"]["fn"] == 1


def test_synthetic_notes_brat_gold_against_jsonl_pred(tmp_path, capsys):
    gold = generate_site_corpus("s", 3, seed=1, style="case_report")
    write_brat_dir(gold, tmp_path / "gold")
    pred = generate_site_corpus("s", 3, seed=1, style="case_report")
    for d in pred:
        d.entities = d.entities[1:]  # drop one span per note
        d.relations = [r for r in d.relations if "T1" not in (r.head, r.tail)]
    write_jsonl(pred, tmp_path / "pred.jsonl")
    assert main(["eval", "--gold", str(tmp_path / "gold"), "--pred", str(tmp_path / "pred.jsonl"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["documents"] == 3
    assert result["entities"]["strict"]["fn"] == 3 and result["entities"]["strict"]["fp"] == 0
    assert main(["eval", "--gold", str(tmp_path / "gold"), "--pred", str(tmp_path / "gold")]) == 0
    assert "entities (micro)" in capsys.readouterr().out


def test_predictions_for_unknown_documents_are_an_input_error(tmp_path, capsys):
    write_jsonl([_gold()], tmp_path / "gold.jsonl")
    write_jsonl([Document("other", "x")], tmp_path / "pred.jsonl")
    assert main(["eval", "--gold", str(tmp_path / "gold.jsonl"), "--pred", str(tmp_path / "pred.jsonl")]) == 2
    assert "not in gold" in capsys.readouterr().err
    assert main(["eval", "--gold", str(tmp_path / "missing"), "--pred", str(tmp_path / "pred.jsonl")]) == 2
