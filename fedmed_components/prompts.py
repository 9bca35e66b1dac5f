"""The paper's two generative task formats, chat rendering and label masking.

- NER: the model rewrites the input sentence as HTML with
  ``<span class="problem|treatment|test|drug">`` around the main entities.
- Modifiers: one main entity is marked in the input with ``<main class="TYPE">``;
  the model rewrites the sentence with that entity's modifiers wrapped in
  ``<span class="MODIFIER">``.
A JSON variant answers ``[{"type": ..., "text": ...}, ...]`` in sentence order.

Entities are tagged by their covering span (a discontinuous entity becomes one tag
from its first to its last character); an entity that overlaps one already tagged in
the same answer cannot be expressed in flat HTML and is left out (counted by
`answer_coverage`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from fedmed_components.document import Document
from fedmed_components.schema import MAIN_TYPES, MODIFIER_TYPES
from fedmed_components.segmentation import split_sentences

SYSTEM_PROMPT = "You are a clinical information extraction assistant."
IGNORE_INDEX = -100

Span = tuple[str, int, int]  # (type, start, end) relative to the sentence


@dataclass
class Example:
    doc_id: str
    task: str  # "ner" | "modifier"
    sentence_start: int
    sentence: str
    prompt: str
    answer: str
    main: Span | None = None
    spans: tuple[Span, ...] = ()


def _flat(spans: list[Span]) -> list[Span]:
    """Sorted, non-overlapping spans (first and longest wins)."""
    kept: list[Span] = []
    for span in sorted(set(spans), key=lambda s: (s[1], -(s[2] - s[1]), s[0])):
        if not kept or span[1] >= kept[-1][2]:
            kept.append(span)
    return kept


def tag_html(sentence: str, spans: list[Span], tag: str = "span") -> str:
    out, cursor = [], 0
    for etype, start, end in _flat(spans):
        out += [sentence[cursor:start], f'<{tag} class="{etype}">', sentence[start:end], f"</{tag}>"]
        cursor = end
    out.append(sentence[cursor:])
    return "".join(out)


def _json_answer(sentence: str, spans: list[Span]) -> str:
    return json.dumps([{"type": t, "text": sentence[s:e]} for t, s, e in _flat(spans)], ensure_ascii=False)


def _types_phrase(types) -> str:
    return ", ".join(types)


def ner_prompt(sentence: str, output_format: str = "html", types=MAIN_TYPES) -> str:
    wanted = [t for t in MAIN_TYPES if t in set(types)]
    if output_format == "json":
        how = 'Answer with a JSON list of {"type": ..., "text": ...} objects in sentence order.'
    else:
        how = 'Rewrite the sentence as HTML, wrapping each entity in <span class="TYPE">...</span>.'
    return f"Extract the clinical entities ({_types_phrase(wanted)}) from the sentence. {how}\nSentence: {sentence}"


def ner_answer(sentence: str, spans: list[Span], output_format: str = "html") -> str:
    return _json_answer(sentence, spans) if output_format == "json" else tag_html(sentence, spans)


def modifier_prompt(sentence: str, main: Span, output_format: str = "html", types=MODIFIER_TYPES) -> str:
    marked = tag_html(sentence, [main], tag="main")
    if output_format == "json":
        how = 'Answer with a JSON list of {"type": ..., "text": ...} objects in sentence order.'
    else:
        how = 'Rewrite the sentence as HTML, wrapping each modifier in <span class="TYPE">...</span>.'
    return (
        f"Find the modifiers ({_types_phrase(t for t in MODIFIER_TYPES if t in set(types))}) of the {main[0]} "
        f"marked with <main>. {how}\nSentence: {marked}"
    )


def modifier_answer(sentence: str, main: Span, modifiers: list[Span], output_format: str = "html") -> str:
    return _json_answer(sentence, modifiers) if output_format == "json" else tag_html(sentence, modifiers)


def _inside(ent, start: int, end: int) -> bool:
    return ent.start >= start and ent.end <= end


def document_examples(
    doc: Document,
    tasks=("ner", "modifier"),
    output_format: str = "html",
    types: set[str] | None = None,
    include_empty_modifier_examples: bool = True,
) -> list[Example]:
    """Sentence-level examples; `types` limits a partial-schema site to what it annotates."""
    allowed = set(types) if types else set(MAIN_TYPES) | set(MODIFIER_TYPES)
    main_types = [t for t in MAIN_TYPES if t in allowed]
    mod_types = [t for t in MODIFIER_TYPES if t in allowed]
    by_id = {e.id: e for e in doc.entities}
    tails: dict[str, list[str]] = {}
    for rel in doc.relations:
        tails.setdefault(rel.head, []).append(rel.tail)
    examples = []
    for s_start, s_end in split_sentences(doc.text):
        sentence = doc.text[s_start:s_end]
        mains = [e for e in doc.entities if e.type in main_types and _inside(e, s_start, s_end)]
        rel_spans = [(e.type, e.start - s_start, e.end - s_start) for e in mains]
        if "ner" in tasks and main_types:
            examples.append(Example(doc.id, "ner", s_start, sentence, ner_prompt(sentence, output_format, main_types),
                                    ner_answer(sentence, rel_spans, output_format), spans=tuple(_flat(rel_spans))))
        if "modifier" not in tasks or not mod_types:
            continue
        for ent, main in zip(mains, rel_spans):
            mods = [by_id[t] for t in tails.get(ent.id, []) if t in by_id]
            mods = [(m.type, m.start - s_start, m.end - s_start) for m in mods if m.type in mod_types and _inside(m, s_start, s_end)]
            if not mods and not include_empty_modifier_examples:
                continue
            examples.append(Example(doc.id, "modifier", s_start, sentence, modifier_prompt(sentence, main, output_format, mod_types),
                                    modifier_answer(sentence, main, mods, output_format), main=main, spans=tuple(_flat(mods))))
    return examples


def render_chat(tokenizer, prompt: str, answer: str | None = None, system: str | None = SYSTEM_PROMPT) -> tuple[str, str | None]:
    """(prompt text ending in the assistant turn, prompt + answer + end-of-turn)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if answer is None:
        return prompt_text, None
    return prompt_text, prompt_text + answer + (tokenizer.eos_token or "")


def tokenize_example(tokenizer, example: Example, max_length: int, train_on_prompt: bool = False) -> dict:
    """input_ids and labels; the loss is on the answer only unless train_on_prompt."""
    prompt_text, _ = render_chat(tokenizer, example.prompt)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(example.answer + (tokenizer.eos_token or ""), add_special_tokens=False)["input_ids"]
    input_ids = (prompt_ids + answer_ids)[:max_length]
    prompt_labels = list(prompt_ids) if train_on_prompt else [IGNORE_INDEX] * len(prompt_ids)
    labels = (prompt_labels + list(answer_ids))[:max_length]
    return {"input_ids": input_ids, "labels": labels, "num_supervised_tokens": sum(1 for x in labels if x != IGNORE_INDEX)}
