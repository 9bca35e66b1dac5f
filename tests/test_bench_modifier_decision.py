"""bench/bench_modifier_decision.py: the probability of a "none" modifier answer at its deciding token."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import bench_modifier_decision as bench  # noqa: E402


def test_auc_on_a_hand_made_case():
    # pairs: 0.9>0.4, 0.9>0.1, 0.4=0.4 (half), 0.4>0.1 -> 3.5 of 4
    assert bench.auc([0.9, 0.4], [0.4, 0.1]) == pytest.approx(0.875)
    assert bench.auc([0.1], [0.9]) == 0.0
    assert bench.auc([], [0.3]) is None


def test_the_deciding_token_parts_none_from_some(tiny_model_path):
    from fedmed_components.model.inference import empty_answer_decision
    from fedmed_components.model.modeling import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_path)
    prefix, empty_id = empty_answer_decision(tokenizer)
    assert tokenizer.decode([*prefix, empty_id]) == "[]"
    other = tokenizer('[{"', add_special_tokens=False)["input_ids"]
    assert tuple(other[: len(prefix)]) == prefix and other[len(prefix)] != empty_id


def _note(doc_id: str) -> "Document":  # noqa: F821
    """Two entities: "chest pain" with a negation, "aspirin" with none."""
    from fedmed_components.data.document import Document, Entity, Relation

    text = "No chest pain. Started aspirin."
    ents = [
        Entity(id="T1", type="negation", spans=[(0, 2)], text="No"),
        Entity(id="T2", type="problem", spans=[(3, 13)], text="chest pain"),
        Entity(id="T3", type="drug", spans=[(23, 30)], text="aspirin"),
    ]
    return Document(id=doc_id, text=text, site="site", entities=ents, relations=[Relation(type="hasAttr", head="T2", tail="T1")])


def _site_folder(tmp_path) -> Path:
    from fedmed_components.data.document import write_jsonl
    from fedmed_components.data.synth import demo_corpus

    (synthetic,) = demo_corpus(n_sites=1, docs_per_site=2, seed=3).values()
    folder = tmp_path / "site"
    write_jsonl([*synthetic, _note("n1")], folder / "train.jsonl")  # nearly every synthetic entity has modifiers
    write_jsonl([_note("n2"), _note("n3")], folder / "test.jsonl")
    write_jsonl([_note("n4")], folder / "val.jsonl")
    return folder


def _untrained_adapter(tmp_path, model_path) -> Path:
    """A rank-4 adapter folder at its seeded start (LoRA B = 0)."""
    from fedmed_components.model.modeling import LoraSettings, initial_adapter_from_config, save_adapter_folder

    settings = LoraSettings(r=4, alpha=8)
    adapter = tmp_path / "adapter"
    save_adapter_folder(initial_adapter_from_config(model_path, settings), settings, model_path, adapter)
    return adapter


def test_probabilities_are_read_at_the_deciding_token(tmp_path, tiny_model_path):
    """The bench's p(empty) equals the same token's probability read off a forward pass of
    the whole "[]" answer, at the position where the two answers part."""
    import torch

    from fedmed_components.data.document import read_jsonl
    from fedmed_components.model.inference import empty_answer_decision
    from fedmed_components.model.modeling import load_base_model, load_tokenizer
    from fedmed_components.task.prompts import PROMPT_STYLES, render_chat

    folder = _site_folder(tmp_path)
    tokenizer = load_tokenizer(tiny_model_path)
    model = load_base_model(tiny_model_path, quantize="none")
    examples = bench.modifier_examples(read_jsonl(folder / "test.jsonl"), None, "compact")[:4]
    assert examples, "the synthetic note must give modifier examples"
    system = PROMPT_STYLES["compact"].system
    got = bench.empty_probabilities(model, tokenizer, examples, system)

    prefix, empty_id = empty_answer_decision(tokenizer)
    for example, p in zip(examples, got):
        prompt = tokenizer(render_chat(tokenizer, example.prompt, system=system)[0], add_special_tokens=False)["input_ids"]
        whole = prompt + tokenizer("[]", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([whole])).logits[0].float()
        at = len(prompt) + len(prefix) - 1  # the logits that predict the deciding token
        assert whole[at + 1] == empty_id
        assert p == pytest.approx(float(logits[at].softmax(-1)[empty_id]), rel=1e-4)
        assert 0.0 < p < 1.0


def test_site_decision_counts_the_classes_and_the_training_share(tmp_path, tiny_model_path):
    from fedmed_components.data.document import read_jsonl
    from fedmed_components.model.modeling import load_base_model, load_tokenizer
    from fedmed_components.model.site import load_site_data

    folder = _site_folder(tmp_path)
    model = load_base_model(tiny_model_path, quantize="none")
    data = load_site_data(folder, val_fraction=0)
    row = bench.site_decision(model, load_tokenizer(tiny_model_path), folder, data, split="test", max_examples=50, style="compact")

    test = bench.modifier_examples(read_jsonl(folder / "test.jsonl"), None, "compact")[:50]
    train = bench.modifier_examples(read_jsonl(folder / "train.jsonl"), None, "compact")
    with_modifiers = sum(bool(e.spans) for e in test)
    assert 0 < with_modifiers < len(test), "the synthetic notes must hold entities with and without modifiers"
    assert row["examples"] == len(test)
    assert row["gold_nonempty"]["examples"] == with_modifiers
    assert row["gold_empty"]["examples"] == len(test) - with_modifiers
    assert row["train_nonempty_share"] == pytest.approx(sum(bool(e.spans) for e in train) / len(train))
    assert 0.0 <= row["auc"] <= 1.0


def test_cli_writes_json_and_refuses_a_missing_split(tmp_path, tiny_model_path):
    from fedmed_components.data.document import InputError

    folder = _site_folder(tmp_path)
    adapter = _untrained_adapter(tmp_path, tiny_model_path)
    out = tmp_path / "decision.json"
    argv = ["--model", tiny_model_path, "--run", "site", str(adapter), str(folder), "--max-examples", "3", "--json", str(out)]
    assert bench.main(argv) == 0
    row = json.loads(out.read_text())["decision"]["site/site"]
    assert row["examples"] == 3 and row["split"] == "test"  # capped at --max-examples
    (folder / "val.jsonl").unlink()
    with pytest.raises(InputError, match="no val notes"):
        bench.main(argv[:-2] + ["--split", "val"])


def test_cli_sweep_chooses_on_validation_and_scores_test_at_0_and_the_choice(tmp_path, tiny_model_path):
    from fedmed_components.model.inference import choose_none_bias

    folder = _site_folder(tmp_path)
    adapter = _untrained_adapter(tmp_path, tiny_model_path)
    out = tmp_path / "sweep.json"
    argv = ["--model", tiny_model_path, "--run", "g", str(adapter), str(folder), "--max-examples", "3", "--json", str(out)]
    with pytest.raises(SystemExit):  # the baseline must be in the grid
        bench.main([*argv, "--biases", "1", "2"])
    assert bench.main([*argv, "--biases", "0", "2"]) == 0
    row = json.loads(out.read_text())["bias_sweep"]["g"]
    assert set(row["validation_modifier_strict_f1"]) == {"0", "2"}
    assert row["chosen_bias"] == choose_none_bias({float(k): v for k, v in row["validation_modifier_strict_f1"].items()})
    arms = row["test"]
    assert "0" in arms and f"{row['chosen_bias']:g}" in arms
    chosen = arms[f"{row['chosen_bias']:g}"]["relations"]["strict"]["estimate"]
    assert row["test_chosen_minus_0"]["strict"]["estimate"] == pytest.approx(chosen - arms["0"]["relations"]["strict"]["estimate"])
    # the bias touches modifier answers only: the entities are the same in both arms
    mains = {k: v["main_entities"]["strict"]["estimate"] for k, v in arms.items()}
    assert len(set(mains.values())) == 1


def test_stored_predictions_are_the_bias_0_arm_and_give_the_entities(tmp_path, tiny_model_path):
    from fedmed_components.data.document import Document, Entity, Relation, read_jsonl, write_jsonl
    from fedmed_components.model.inference import entities_only
    from fedmed_components.runs.experiment.scoring import per_note_counts

    folder = _site_folder(tmp_path)
    gold = read_jsonl(folder / "test.jsonl")
    # a stored run that found "chest pain" and its negation in note n2, nothing in n3
    found = Document(
        id="n2",
        text=gold[0].text,
        site="site",
        entities=[
            Entity(id="T1", type="problem", spans=[(3, 13)], text="chest pain"),
            Entity(id="T2", type="negation", spans=[(0, 2)], text="No"),
        ],
        relations=[Relation(type="hasAttr", head="T1", tail="T2")],
    )
    stored = [found, Document(id="n3", text=gold[1].text, site="site")]
    assert [[e.id for e in d.entities] for d in entities_only(stored)] == [["T1"], []]
    assert all(not d.relations for d in entities_only(stored)) and len(stored[0].entities) == 2  # copies

    write_jsonl(stored, tmp_path / "site.predictions.jsonl")

    adapter = _untrained_adapter(tmp_path, tiny_model_path)
    out = tmp_path / "sweep.json"
    run = ["g", str(adapter), str(folder), str(tmp_path / "site.predictions.jsonl")]
    assert bench.main(["--model", tiny_model_path, "--run", *run, "--biases", "0", "--max-examples", "2", "--json", str(out)]) == 0
    arm = json.loads(out.read_text())["bias_sweep"]["g"]["test"]["0"]["relations"]["strict"]["estimate"]
    counts = per_note_counts(gold, stored, None)
    tp, fp, fn = (sum(n["relations"]["strict"][i] for n in counts.values()) for i in range(3))
    assert arm == pytest.approx(2 * tp / (2 * tp + fp + fn)) and tp == 1  # the stored modifier, scored as stored
