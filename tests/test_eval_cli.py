import json

from fedmed_components.brat import write_brat_dir
from fedmed_components.cli import main
from fedmed_components.document import write_jsonl
from fedmed_components.synth import generate_site_corpus


def test_eval_cli_json_and_table(tmp_path, capsys):
    gold = generate_site_corpus("s", 3, seed=1, style="case_report")
    write_brat_dir(gold, tmp_path / "gold")
    pred = [d for d in generate_site_corpus("s", 3, seed=1, style="case_report")]
    for d in pred:
        d.entities = d.entities[1:]  # drop one span per note
        d.relations = [r for r in d.relations if r.head != "T1" and r.tail != "T1"]
    write_jsonl(pred, tmp_path / "pred.jsonl")
    assert main(["eval", "--gold", str(tmp_path / "gold"), "--pred", str(tmp_path / "pred.jsonl"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["documents"] == 3
    assert result["entities"]["strict"]["fn"] == 3 and result["entities"]["strict"]["fp"] == 0
    assert set(result["entities"]["strict"]) == {"precision", "recall", "f1", "tp", "fp", "fn"}
    assert main(["eval", "--gold", str(tmp_path / "gold"), "--pred", str(tmp_path / "gold")]) == 0
    assert "entities (micro)" in capsys.readouterr().out
