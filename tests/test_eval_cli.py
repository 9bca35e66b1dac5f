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


# ---------------------------------------------------------------- --lenient-input


def _gold_with_a_malformed_line(tmp_path):
    """Two gold notes; note1.ann gets a stray line `5` (as MTSamples has) as its line 3."""
    other = Document("note2", "Cough.", entities=[Entity("T1", "problem", [(0, 5)], "Cough")])
    write_brat_dir([_gold(), other], tmp_path / "gold")
    ann = tmp_path / "gold" / "note1.ann"
    lines = ann.read_text(encoding="utf-8").splitlines(keepends=True)
    ann.write_text("".join(lines[:2] + ["5\n"] + lines[2:]), encoding="utf-8")
    write_jsonl([_pred(), other], tmp_path / "pred.jsonl")
    return ["eval", "--gold", str(tmp_path / "gold"), "--pred", str(tmp_path / "pred.jsonl")], ann


def test_a_malformed_gold_line_is_refused_with_file_and_line(tmp_path, capsys):
    argv, ann = _gold_with_a_malformed_line(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"fedmed: error: {ann}:3: malformed line" in err and "--lenient-input" in err


def test_lenient_input_scores_the_rest_and_counts_the_skipped_line(tmp_path, capsys):
    argv, ann = _gold_with_a_malformed_line(tmp_path)
    assert main([*argv, "--lenient-input", "--json"]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    skipped = result["skipped_input"]
    assert skipped["gold"]["skipped"] == {"malformed line": 1} and skipped["pred"]["skipped"] == {}
    assert skipped["gold"]["problems"][0]["file"] == str(ann) and skipped["gold"]["problems"][0]["line"] == 3
    assert result["documents"] == 2
    s = result["entities"]["strict"]  # note1 as in test_json_output_has_the_contract_keys, note2 exact
    assert (s["tp"], s["fp"], s["fn"]) == (2, 1, 3)
    assert abs(s["precision"] - 2 / 3) < 1e-9 and abs(s["recall"] - 0.4) < 1e-9 and abs(s["f1"] - 0.5) < 1e-9
    assert "warning" in err and f"{ann}:3: malformed line" in err
    assert main([*argv, "--lenient-input"]) == 0
    assert "skipped input: gold skipped 1 item(s): 1 malformed line; predictions nothing skipped" in capsys.readouterr().out
