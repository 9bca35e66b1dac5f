"""Task formats: gold -> answer -> parser recovers the gold spans; label masking."""

from collections import Counter

import pytest

from fedmed_components.document import Document, Entity, Relation
from fedmed_components.parsing import parse_modifiers, parse_ner
from fedmed_components.prompts import IGNORE_INDEX, document_examples, render_chat, tokenize_example


def _note():
    text = "Denies chest pain. Aspirin 81 mg daily."
    ents = [Entity("T1", "negation", [(0, 6)], "Denies"), Entity("T2", "problem", [(7, 17)], "chest pain"),
            Entity("T3", "drug", [(19, 26)], "Aspirin"), Entity("T4", "strength", [(27, 32)], "81 mg"),
            Entity("T5", "frequency", [(33, 38)], "daily")]
    rels = [Relation("hasAttr", "T2", "T1"), Relation("hasAttr", "T3", "T4"), Relation("hasAttr", "T3", "T5")]
    return Document(id="n1", text=text, entities=ents, relations=rels)


def test_examples_of_both_tasks():
    ex = document_examples(_note())
    assert [e.task for e in ex] == ["ner", "modifier", "ner", "modifier"]
    assert ex[0].answer == 'Denies <span class="problem">chest pain</span>.'
    assert '<main class="drug">Aspirin</main>' in ex[3].prompt
    assert ex[3].answer == 'Aspirin <span class="strength">81 mg</span> <span class="frequency">daily</span>.'


def test_partial_schema_site_is_asked_only_for_its_types():
    ex = document_examples(_note(), types={"drug", "strength"})
    assert "problem" not in ex[0].prompt.split("Sentence:")[0]
    assert all("negation" not in e.answer for e in ex)


def test_answer_only_labels(tiny_model_path):
    from fedmed_components.modeling import load_tokenizer

    tok = load_tokenizer(tiny_model_path)
    example = document_examples(_note())[0]
    item = tokenize_example(tok, example, max_length=512)
    prompt_text, full = render_chat(tok, example.prompt, example.answer)
    n_prompt = len(tok(prompt_text, add_special_tokens=False)["input_ids"])
    assert item["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert item["labels"][n_prompt:] == item["input_ids"][n_prompt:]
    assert tok.decode(item["input_ids"][n_prompt:]).startswith(example.answer)
    assert item["num_supervised_tokens"] == len(item["input_ids"]) - n_prompt
    both = tokenize_example(tok, example, max_length=512, train_on_prompt=True)
    assert both["num_supervised_tokens"] == len(both["input_ids"])
    short = tokenize_example(tok, example, max_length=n_prompt + 3)
    assert len(short["input_ids"]) == n_prompt + 3 and short["num_supervised_tokens"] == 3


def test_mtsamples_gold_answers_parse_back_to_gold_spans(shared_data):
    """Prompt -> gold answer -> parser, every sentence of the 96 MTSamples train notes."""
    from fedmed_components.corpora import load_corpus

    docs = load_corpus(shared_data / "mtsamples_kiwi" / "train", mapping="kiwi", lenient=True)
    assert len(docs) == 96
    stats, reasons = Counter(), Counter()
    for doc in docs:
        for ex in document_examples(doc):
            parse = parse_ner if ex.task == "ner" else parse_modifiers
            got = set(parse(ex.answer, ex.sentence).spans)
            want = set(ex.spans)
            stats[ex.task, "spans"] += len(want)
            stats[ex.task, "recovered"] += len(want & got)
        # what the flat, sentence-level format cannot express at all
        for sentence_gold in _gold_in_sentences(doc):
            reasons[sentence_gold] += 1
    for task in ("ner", "modifier"):
        rate = stats[task, "recovered"] / stats[task, "spans"]
        print(f"{task}: {stats[task, 'recovered']}/{stats[task, 'spans']} answer spans recovered ({rate:.4%})")
        assert rate >= 0.995
    print("gold main entities by expressibility:", dict(reasons))
    total = sum(reasons.values())
    assert reasons["tagged"] / total >= 0.99


def _gold_in_sentences(doc):
    """Per main entity: tagged, or why not (crosses a sentence, overlaps another)."""
    from fedmed_components.schema import MAIN_TYPES
    from fedmed_components.segmentation import split_sentences

    sentences = split_sentences(doc.text)
    mains = [e for e in doc.entities if e.type in MAIN_TYPES]
    for e in mains:
        inside = [s for s in sentences if s[0] <= e.start and e.end <= s[1]]
        if not inside:
            yield "crosses a sentence boundary"
            continue
        overlapping = [o for o in mains if o is not e and o.start < e.end and e.start < o.end]
        yield "overlaps another entity" if any((o.start, -o.end) < (e.start, -e.end) for o in overlapping) else "tagged"
