"""Task formats: prompts and answers of both tasks, chat rendering, answer-only labels.

The round trip gold -> answer -> parser on the MTSamples notes is in test_parsing.py.
"""

import copy
import json
from collections import Counter

import pytest

from fedmed_components.data.document import Document, Entity, Relation
from fedmed_components.task.prompts import (
    IGNORE_INDEX,
    SYSTEM_PROMPT,
    Example,
    document_examples,
    flatten_spans,
    modifier_answer,
    modifier_prompt,
    ner_answer,
    ner_prompt,
    render_chat,
    tokenize_example,
)

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
NO_SYSTEM = (  # like Gemma's: the system role is refused
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    """A small byte-level BPE tokenizer trained here (no download) with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|pad|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [
        'He has <span class="problem">chest pain</span> and fever.',
        "Extract the clinical entities",
        '<main class="drug">aspirin</main> 81 mg daily',
        "system user assistant",
    ] * 20
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>")
    fast.chat_template = CHATML
    return fast


def _note():
    text = "HISTORY:\nHe has severe chest pain. No fever or cough.\nTake aspirin 81 mg daily."
    ents = [
        Entity("T1", "severity", [(16, 22)], "severe"),
        Entity("T2", "problem", [(23, 33)], "chest pain"),
        Entity("T3", "negation", [(35, 37)], "No"),
        Entity("T4", "problem", [(38, 43)], "fever"),
        Entity("T5", "problem", [(47, 52)], "cough"),
        Entity("T6", "drug", [(59, 66)], "aspirin"),
        Entity("T7", "strength", [(67, 72)], "81 mg"),
        Entity("T8", "frequency", [(73, 78)], "daily"),
    ]
    rels = [
        Relation("hasAttr", "T2", "T1"),
        Relation("hasAttr", "T4", "T3"),
        Relation("hasAttr", "T5", "T3"),
        Relation("hasAttr", "T6", "T7"),
        Relation("hasTemporal", "T6", "T8"),
    ]
    doc = Document("n1", text, entities=ents, relations=rels)
    assert all(text[e.start : e.end] == e.text for e in ents)
    return doc


def _short_note():
    text = "Denies chest pain. Aspirin 81 mg daily."
    ents = [
        Entity("T1", "negation", [(0, 6)], "Denies"),
        Entity("T2", "problem", [(7, 17)], "chest pain"),
        Entity("T3", "drug", [(19, 26)], "Aspirin"),
        Entity("T4", "strength", [(27, 32)], "81 mg"),
        Entity("T5", "frequency", [(33, 38)], "daily"),
    ]
    rels = [Relation("hasAttr", "T2", "T1"), Relation("hasAttr", "T3", "T4"), Relation("hasAttr", "T3", "T5")]
    return Document(id="n1", text=text, entities=ents, relations=rels)


def test_ner_answer_is_the_sentence_with_span_tags():
    sentence = "He has chest pain after aspirin."
    spans = [("drug", 24, 31), ("problem", 7, 17)]
    assert ner_answer(sentence, spans) == 'He has <span class="problem">chest pain</span> after <span class="drug">aspirin</span>.'
    assert json.loads(ner_answer(sentence, spans, "json")) == [
        {"type": "problem", "text": "chest pain"},
        {"type": "drug", "text": "aspirin"},
    ]
    prompt = ner_prompt(sentence)
    assert prompt.endswith(sentence) and "problem, treatment, test, drug" in prompt


def test_modifier_prompt_marks_the_main_entity_with_its_own_tag():
    sentence = "No fever or cough."
    prompt = modifier_prompt(sentence, ("problem", 12, 17))
    assert prompt.endswith('No fever or <main class="problem">cough</main>.')
    assert "<span" not in prompt.split("Sentence:")[1]
    assert modifier_answer(sentence, ("problem", 12, 17), [("negation", 0, 2)]) == '<span class="negation">No</span> fever or cough.'


def test_overlapping_spans_keep_the_earliest_longest_and_report_the_rest():
    kept, dropped = flatten_spans([("problem", 5, 9), ("problem", 0, 9), ("test", 0, 3), ("drug", 12, 15)])
    assert kept == [("problem", 0, 9), ("drug", 12, 15)]
    assert dropped == [("test", 0, 3), ("problem", 5, 9)]
    doc = Document("o", "chest pain", entities=[Entity("T1", "problem", [(0, 10)], "chest pain"), Entity("T2", "test", [(0, 5)], "chest")])
    stats = Counter()
    (ner,) = document_examples(doc, tasks=("ner",), stats=stats)
    assert ner.spans == (("problem", 0, 10),) and ner.unexpressed == (("test", 0, 5),) and stats["overlapping_main"] == 1


def test_examples_of_both_tasks_come_sentence_by_sentence():
    ex = document_examples(_short_note())
    assert [e.task for e in ex] == ["ner", "modifier", "ner", "modifier"]
    assert ex[0].answer == 'Denies <span class="problem">chest pain</span>.'
    assert '<main class="drug">Aspirin</main>' in ex[3].prompt
    assert ex[3].answer == 'Aspirin <span class="strength">81 mg</span> <span class="frequency">daily</span>.'


def test_document_examples_ner_and_modifier():
    examples = document_examples(_note())
    ner = [e for e in examples if e.task == "ner"]
    assert [e.sentence for e in ner] == ["HISTORY:", "He has severe chest pain.", "No fever or cough.", "Take aspirin 81 mg daily."]
    assert ner[0].answer == "HISTORY:" and ner[0].spans == ()
    assert ner[2].answer == 'No <span class="problem">fever</span> or <span class="problem">cough</span>.'
    mods = {(e.sentence, e.main): e for e in examples if e.task == "modifier"}
    cough = mods[("No fever or cough.", ("problem", 12, 17))]
    assert cough.answer == '<span class="negation">No</span> fever or cough.' and cough.sentence_start == 35
    drug = mods[("Take aspirin 81 mg daily.", ("drug", 5, 12))]  # hasTemporal counts like hasAttr
    assert drug.spans == (("strength", 13, 18), ("frequency", 19, 24))


def test_empty_modifier_examples_are_optional():
    doc = _note()
    doc.relations = [r for r in doc.relations if r.head != "T2"]
    chest_pain = ("problem", 14, 24)
    with_empty = [e for e in document_examples(doc, tasks=("modifier",)) if e.main == chest_pain]
    assert len(with_empty) == 1 and with_empty[0].spans == ()
    without = document_examples(doc, tasks=("modifier",), include_empty_modifier_examples=False)
    assert chest_pain not in [e.main for e in without] and len(without) == 3


def test_partial_schema_site_is_asked_only_for_its_types():
    ex = document_examples(_short_note(), types={"drug", "strength"})
    assert "problem" not in ex[0].prompt.split("Sentence:")[0]
    assert all("negation" not in e.answer and "frequency" not in e.answer for e in ex)
    assert {e.main[0] for e in ex if e.task == "modifier"} == {"drug"}


def test_cross_sentence_entities_are_counted_not_tagged():
    doc = Document("x", "Pain in the chest. Wall is sore.", entities=[Entity("T1", "problem", [(12, 23)], "chest. Wall")])
    stats = Counter()
    examples = document_examples(doc, stats=stats)
    assert all(e.spans == () for e in examples) and stats["cross_sentence_main"] == 1


@pytest.mark.parametrize("style", ["paper", "compact"])
def test_packed_ner_examples_hold_runs_of_sentences_with_note_offsets(style):
    doc = _note()  # 4 sentences
    one = document_examples(doc, style=style)
    packed = document_examples(doc, style=style, ner_sentences=3)
    ner = [e for e in packed if e.task == "ner"]
    # 2 NER examples instead of 4: the fixed prompt is paid once per 3 sentences
    assert [e.sentence for e in ner] == ["HISTORY:\nHe has severe chest pain. No fever or cough.", "Take aspirin 81 mg daily."]
    assert (
        ner[0].answer
        == 'HISTORY:\nHe has severe <span class="problem">chest pain</span>. No <span class="problem">fever</span> or <span class="problem">cough</span>.'
    )
    for e in ner:  # offsets relative to the run's start: note offsets = sentence_start + offset
        assert all(doc.text[e.sentence_start + a : e.sentence_start + b] == e.sentence[a:b] for _, a, b in e.spans)
    note_spans = lambda examples: sorted(
        (t, e.sentence_start + a, e.sentence_start + b) for e in examples if e.task == "ner" for t, a, b in e.spans
    )  # noqa: E731
    assert note_spans(packed) == note_spans(one)
    # modifier examples are the same sentence-level ones, in text order after their run's NER example
    assert [e for e in packed if e.task == "modifier"] == [e for e in one if e.task == "modifier"]
    assert [e.task for e in packed][:2] == ["ner", "modifier"] and packed.index(ner[1]) > packed.index(ner[0]) + 1


def test_packed_ner_keeps_an_entity_that_crosses_sentences_inside_its_run():
    doc = Document("x", "Pain in the chest. Wall is sore.", entities=[Entity("T1", "problem", [(12, 23)], "chest. Wall")])
    assert document_examples(doc, ner_sentences=2, tasks=("ner",))[0].spans == (("problem", 12, 23),)
    with pytest.raises(ValueError, match="ner_sentences must be at least 1"):
        document_examples(doc, ner_sentences=0)


def test_discontinuous_entity_is_tagged_by_its_covering_span():
    doc = Document("d", "Pain in left and right knee.", entities=[Entity("T1", "problem", [(0, 4), (17, 27)], "Pain right knee")])
    ner = document_examples(doc, tasks=("ner",))[0]
    assert ner.answer == '<span class="problem">Pain in left and right knee</span>.'


def test_unknown_output_format_is_refused():
    with pytest.raises(ValueError):
        ner_answer("x", [], "xml")


def test_render_chat_uses_the_template_and_appends_eos(tokenizer):
    prompt_text, full = render_chat(tokenizer, "Q?", "A.")
    assert prompt_text == f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\n"
    assert full == prompt_text + "A.<|im_end|>"
    assert render_chat(tokenizer, "Q?", system=None)[0].startswith("<|im_start|>user")


def test_render_chat_without_system_role_or_without_template(tokenizer):
    gemma_like = copy.deepcopy(tokenizer)
    gemma_like.chat_template = NO_SYSTEM
    prompt_text, _ = render_chat(gemma_like, "Q?")
    assert prompt_text == f"<start_of_turn>user\n{SYSTEM_PROMPT}\n\nQ?<end_of_turn>\n<start_of_turn>model\n"
    base = copy.deepcopy(tokenizer)
    base.chat_template = None
    prompt_text, full = render_chat(base, "Q?", "A.")
    assert prompt_text.endswith("### Input:\nQ?\n\n### Response:\n") and full.endswith("A.<|im_end|>")


def _example():
    sentence = "He has chest pain."
    return Example("d", "ner", 0, sentence, ner_prompt(sentence), ner_answer(sentence, [("problem", 7, 17)]))


def test_tokenize_example_masks_the_prompt(tokenizer):
    example = _example()
    item = tokenize_example(tokenizer, example, max_length=4096)
    prompt_ids = tokenizer(render_chat(tokenizer, example.prompt)[0], add_special_tokens=False)["input_ids"]
    n = len(prompt_ids)
    assert item["input_ids"][:n] == prompt_ids  # the prompt tokenised as at inference
    assert item["labels"][:n] == [IGNORE_INDEX] * n
    assert item["labels"][n:] == item["input_ids"][n:]
    assert item["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(item["input_ids"][n:], skip_special_tokens=True) == example.answer
    assert item["num_supervised_tokens"] == len(item["input_ids"]) - n


def test_tokenize_example_train_on_prompt_and_truncation(tokenizer):
    example = _example()
    full = tokenize_example(tokenizer, example, max_length=4096)
    everything = tokenize_example(tokenizer, example, max_length=4096, train_on_prompt=True)
    assert everything["labels"] == everything["input_ids"] and everything["num_supervised_tokens"] == len(full["input_ids"])
    n_prompt = full["labels"].count(IGNORE_INDEX)
    cut = tokenize_example(tokenizer, example, max_length=n_prompt + 3)
    assert cut["input_ids"] == full["input_ids"][: n_prompt + 3] and cut["num_supervised_tokens"] == 3
    assert tokenize_example(tokenizer, example, max_length=n_prompt - 1)["num_supervised_tokens"] == 0


def test_compact_style_asks_briefly_and_answers_modifiers_as_a_json_list():
    doc = _note()
    paper = document_examples(doc)
    compact = document_examples(doc, style="compact")
    assert [(e.task, e.spans) for e in compact] == [(e.task, e.spans) for e in paper]  # same gold, other words
    for short, long in zip(compact, paper):
        assert len(short.prompt) < len(long.prompt) - 60
        assert short.prompt.endswith(long.prompt.split("Sentence: ")[1])
    ner = next(e for e in compact if e.task == "ner" and e.spans)
    assert ner.answer == next(e for e in paper if e.task == "ner" and e.spans).answer  # NER stays HTML
    mods = [e for e in compact if e.task == "modifier"]
    bare = Document("b", "He has a cough.", entities=[Entity("T1", "problem", [(9, 14)], "cough")])
    assert [e.answer for e in document_examples(bare, tasks=("modifier",), style="compact")] == ["[]"]
    with_mods = next(e for e in mods if e.spans)
    assert json.loads(with_mods.answer) == [{"type": t, "text": with_mods.sentence[s:e]} for t, s, e in with_mods.spans]


def test_compact_modifier_prompt_names_types_only_for_a_partial_schema():
    sentence = "No fever or cough."
    full = modifier_prompt(sentence, ("problem", 12, 17), style="compact")
    partial = modifier_prompt(sentence, ("problem", 12, 17), types=["severity", "negation"], style="compact")
    assert "negation" not in full and "(negation, severity)" in partial
    assert full.endswith('<main class="problem">cough</main>.')
    with pytest.raises(ValueError, match="prompt style"):
        modifier_prompt(sentence, ("problem", 12, 17), style="terse")


def test_compact_style_uses_its_own_short_system_prompt(tokenizer):
    from fedmed_components.task.prompts import PROMPT_STYLES

    example = document_examples(_note(), tasks=("ner",), style="compact")[0]
    paper = tokenize_example(tokenizer, example, 512)
    compact = tokenize_example(tokenizer, example, 512, style="compact")
    text = tokenizer.decode(compact["input_ids"])
    assert PROMPT_STYLES["compact"].system in text and SYSTEM_PROMPT not in text
    assert len(compact["input_ids"]) < len(paper["input_ids"])
    assert compact["num_supervised_tokens"] == paper["num_supervised_tokens"]  # the answer is the same
