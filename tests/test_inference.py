"""Batched greedy generation: same outputs as one prompt at a time, and as HF generate."""

import pytest
import torch

from fedmed_components.data.document import Document, Entity
from fedmed_components.model.inference import (
    AnswerBias,
    GenerationSettings,
    _extra_stop_ids,
    choose_none_bias,
    generate,
    greedy_decode,
    predict_modifiers,
    shared_prefix_length,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls gain nothing from a second thread, and on a busy shared machine they
    stall waiting for it (measured: 30x slower); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tiny_model_path):
    """The tiny Llama with a LoRA adapter whose B is non-zero (so LoRA changes outputs)."""
    from fedmed_components.model.modeling import LoraSettings, attach_lora, load_base_model, load_tokenizer

    tokenizer = load_tokenizer(tiny_model_path)
    model = attach_lora(load_base_model(tiny_model_path, quantize="none", device="cpu"), LoraSettings(r=4, alpha=8))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen))  # large: varied, non-degenerate tokens
    return model, tokenizer


@pytest.fixture(scope="module")
def prompts(tiny):
    """Chat-rendered NER prompts for synthetic sentences of varied lengths."""
    from fedmed_components.data.segmentation import split_sentences
    from fedmed_components.data.synth import generate_site_corpus
    from fedmed_components.task.prompts import ner_prompt, render_chat

    _, tokenizer = tiny
    doc = generate_site_corpus("site-1", 2, seed=3, style="discharge_summary")[0]
    sentences = [doc.text[s:e] for s, e in split_sentences(doc.text)][:10]
    assert len({len(s) for s in sentences}) > 3  # varied lengths: batches carry left padding
    lengths = [len(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in sentences]
    return [render_chat(tokenizer, ner_prompt(s))[0] for s in sentences], lengths


SHORT = dict(max_new_tokens=20, length_factor=1.0, length_slack=2)  # rows end at different steps


def test_batched_outputs_equal_one_at_a_time(tiny, prompts):
    model, tokenizer = tiny
    texts, lengths = prompts
    batched = generate(model, tokenizer, texts, GenerationSettings(batch_size=8, **SHORT), answer_lengths=lengths)
    one_by_one = generate(model, tokenizer, texts, GenerationSettings(batch_size=1, **SHORT), answer_lengths=lengths)
    assert batched == one_by_one
    assert len(set(batched)) > 1 and all(batched)


def test_outputs_match_hf_generate_in_input_order(tiny, prompts):
    """Positions, mask, shared-prefix cache and row dropping agree with HF's own greedy
    decoding of each prompt alone."""
    model, tokenizer = tiny
    texts, lengths = prompts
    texts, lengths = texts[:5], lengths[:5]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert shared_prefix_length(ids) >= GenerationSettings().min_shared_prefix  # the shared-prefix path runs
    # fp32 like HF's generate here: on a CPU with AVX512-BF16 "auto" is bf16 autocast,
    # whose rounding flips the random model's near-tied argmaxes (margins ~1e-3)
    settings = GenerationSettings(batch_size=4, precision="fp32", **SHORT)
    ours = generate(model, tokenizer, texts, settings, answer_lengths=lengths)
    stops = sorted({tokenizer.eos_token_id, *_extra_stop_ids(tokenizer)})
    reference = []
    with torch.no_grad():
        for text, n in zip(texts, lengths):
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
            out = model.generate(
                **ids, max_new_tokens=settings.budget(n), do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=stops
            )
            reference.append(tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip())
    assert ours == reference
    assert model.training  # generate puts the model back in the mode it found it in


def test_rows_stopping_early_leave_the_batch_without_changing_the_others(tiny, prompts):
    """A token the model often emits is made a stop token, so rows finish at different
    steps and are compacted out of the batch (and its cache) while the rest go on."""
    model, tokenizer = tiny
    texts, _ = prompts
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    pad = tokenizer.pad_token_id
    model.eval()
    with torch.inference_mode():
        free = greedy_decode(model, ids, [16] * len(ids), [pad], pad, "cpu")
        counts = torch.bincount(torch.tensor(sum(free, [])))
        stop = int(counts.argmax())
        batched = greedy_decode(model, ids, [16] * len(ids), [stop], pad, "cpu")
        alone = [greedy_decode(model, [p], [16], [stop], pad, "cpu")[0] for p in ids]
    model.train()
    lengths = [len(row) for row in batched]
    assert len(set(lengths)) > 1 and min(lengths) < 16  # some rows did stop early
    assert all(stop not in row for row in batched)
    assert batched == alone
    assert batched == [row[: row.index(stop)] if stop in row else row for row in free]


def test_an_answer_bias_moves_one_decision_only_on_rows_that_reached_its_prefix(tiny, prompts):
    """The bias lowers one token's logit at the step after its prefix, on the rows whose
    answer so far is that prefix; every other row decodes exactly as without it."""
    model, tokenizer = tiny
    texts, _ = prompts
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    pad = tokenizer.pad_token_id
    model.eval()
    with torch.inference_mode():
        free = greedy_decode(model, ids, [8] * len(ids), [pad], pad, "cpu")
        first, second = free[0][0], free[0][1]
        at_start = greedy_decode(model, ids, [8] * len(ids), [pad], pad, "cpu", answer_bias=AnswerBias((), first, 1e4))
        after_one = greedy_decode(model, ids, [8] * len(ids), [pad], pad, "cpu", answer_bias=AnswerBias((first,), second, 1e4))
        favoured = greedy_decode(model, ids, [8] * len(ids), [pad], pad, "cpu", answer_bias=AnswerBias((), first, -1e4))
    model.train()
    assert any(row[0] != first for row in free), "the prompts must not all start alike"
    for row, a, b, c in zip(free, at_start, after_one, favoured):
        if row[0] == first:
            assert a[0] != first  # the decision moved
            assert b[0] == first and (b[1] != second if row[1] == second else b == row)
        else:
            assert a == row and b == row  # not at the prefix: untouched
        assert c[0] == first  # a negative bias favours the token


def test_the_none_bias_is_the_best_on_validation_and_ties_go_to_the_smaller():
    assert choose_none_bias({0.0: 0.10, 1.0: 0.30, 2.0: 0.25}) == 1.0
    assert choose_none_bias({0.0: 0.20, 1.0: 0.20, 3.0: 0.20}) == 0.0
    assert choose_none_bias({0.0: 0.0, 0.5: 0.1, 1.5: 0.1}) == 0.5


def test_a_none_bias_needs_json_modifier_answers(tiny):
    model, tokenizer = tiny
    doc = Document(id="n#s000", text="No chest pain.", entities=[Entity(id="T1", type="problem", spans=[(3, 13)], text="chest pain")])
    with pytest.raises(ValueError, match="JSON modifier answers"):
        predict_modifiers(model, tokenizer, [doc], prompt_style="paper", none_bias=1.0)


def test_shared_prefix_leaves_each_prompt_a_token_of_its_own():
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5, 6]]) == 3
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3, 4]]) == 2
    assert shared_prefix_length([[7, 1], [8, 1]]) == 0
    assert shared_prefix_length([[1, 2, 3]]) == 2


def test_predict_cli_batch_size_defaults_to_the_generation_settings():
    import argparse

    from fedmed_components.commands import predict

    sub = argparse.ArgumentParser().add_subparsers()
    predict.register(sub)
    args = sub.choices["predict"].parse_args(["--input", "notes", "--out", "out"])
    assert args.batch_size == GenerationSettings().batch_size
