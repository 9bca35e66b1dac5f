"""bench/bench_token_economy.py: packed NER examples pay the fixed prompt once per run of sentences."""

import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import bench_token_economy  # noqa: E402


def test_packed_ner_examples_cost_fewer_tokens_a_sentence_until_they_are_cut():
    from fedmed_components.model.modeling import load_tokenizer, resolve_model
    from fedmed_components.runs.experiment import load_config

    cfg = load_config(ROOT / "experiments" / "mini.yaml")
    tokenizer = load_tokenizer(resolve_model("tiny"))
    cfg = replace(cfg, sampling=replace(cfg.sampling, max_train_sentences=None))  # every sentence, whatever the grouping
    roomy = bench_token_economy.packed_ner_counts(tokenizer, replace(cfg, max_length=4096), sizes=(1, 2, 3))
    assert len({c["sentences"] for c in roomy.values()}) == 1  # the same sentences, grouped differently
    assert [c["examples"] for c in roomy.values()] == sorted((c["examples"] for c in roomy.values()), reverse=True)
    per_sentence = [c["tokens_per_sentence"] for c in roomy.values()]
    assert per_sentence[0] > per_sentence[1] > per_sentence[2] and all(c["cut_share"] == 0 for c in roomy.values())
    tight = bench_token_economy.packed_ner_counts(tokenizer, replace(cfg, max_length=48), sizes=(1, 3))
    assert tight[3]["cut_share"] > tight[1]["cut_share"]
