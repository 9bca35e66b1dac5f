"""The paper's two generative task formats, chat rendering and label masking.

- NER: the model rewrites the input sentence as HTML with
  ``<span class="problem|treatment|test|drug">`` around the main entities.
- Modifiers: one main entity is marked in the input with ``<main class="TYPE">``
  (a tag the answers never use, so a copied marker cannot pass for an answer); the
  model rewrites the sentence with that entity's modifiers wrapped in
  ``<span class="MODIFIER">``.
- ``output_format="json"``: the answer is ``[{"type": ..., "text": ...}, ...]`` in
  sentence order instead of the tagged sentence.

Two prompt styles (`PROMPT_STYLES`):

- ``paper``: the instructions above, in full, naming every type and the output format,
  under a one-sentence system prompt; both tasks answer in ``output_format``.
- ``compact``: the fixed part cut to a few tokens (it is 44-63% of a paper-style
  example's tokens on the real corpora: bench/RESULTS.md, "Token economy"). NER answers
  in HTML (the tagged sentence); the modifier task answers with the JSON list of the
  main entity's modifiers, ``[]`` when it has none, so the model is not taught to copy
  a sentence it does not change; the modifier types are named only for a site that
  annotates a subset of them.

What flat tags cannot express, and what is done instead (deterministic):

- a discontinuous entity is tagged by its covering span (first to last character);
- of spans that overlap in one answer, the earliest-starting (then the longest, then
  the first type alphabetically) is kept and the others are left out; each left-out
  span is listed in ``Example.unexpressed``;
- an entity that crosses a sentence boundary belongs to no sentence and is left out.
``document_examples(..., stats=Counter())`` counts all three.

Sentences come from `segmentation.split_sentences`; span offsets in an `Example` are
relative to its sentence (add ``sentence_start`` for note offsets). With
``ner_sentences=k`` a NER example holds k consecutive sentences of the note (the text
between them included, so offsets stay relative to the first one's start): the fixed
prompt is paid once for k sentences. Modifier examples stay one sentence each.
"""

from __future__ import annotations

import bisect
import json
from collections import Counter
from dataclasses import dataclass

from fedmed_components.data.document import Document, Entity
from fedmed_components.data.schema import MAIN_TYPES, MODIFIER_TYPES
from fedmed_components.data.segmentation import sentence_windows, split_sentences
from fedmed_components.settings import BUDGET
from fedmed_components.settings import PROMPT_STYLES as STYLE_NAMES

SYSTEM_PROMPT = "You are a clinical information extraction assistant."
IGNORE_INDEX = -100
OUTPUT_FORMATS = ("html", "json")


@dataclass(frozen=True)
class PromptStyle:
    name: str
    system: str
    compact: bool  # short instructions; NER in HTML, modifiers as a JSON list

    def formats(self, output_format: str = "html") -> tuple[str, str]:
        """(NER answer format, modifier answer format)."""
        _check_format(output_format)
        return ("html", "json") if self.compact else (output_format, output_format)


# A chat template (SmolLM2's) that adds its own long system prompt when none is given
# is why the compact style keeps a short one.
PROMPT_STYLES = {
    "paper": PromptStyle("paper", SYSTEM_PROMPT, compact=False),
    "compact": PromptStyle("compact", "Clinical information extraction.", compact=True),
}
assert tuple(PROMPT_STYLES) == STYLE_NAMES, "settings.PROMPT_STYLES names the styles defined here"


def prompt_style(name: str | PromptStyle) -> PromptStyle:
    if isinstance(name, PromptStyle):
        return name
    if name not in PROMPT_STYLES:
        raise ValueError(f"prompt style must be one of {sorted(PROMPT_STYLES)}, not {name!r}")
    return PROMPT_STYLES[name]


Span = tuple[str, int, int]  # (type, start, end) relative to the sentence


@dataclass
class Example:
    doc_id: str
    task: str  # "ner" | "modifier"
    sentence_start: int
    sentence: str
    prompt: str
    answer: str
    main: Span | None = None  # the marked main entity (modifier task)
    spans: tuple[Span, ...] = ()  # the gold spans the answer expresses
    unexpressed: tuple[Span, ...] = ()  # gold spans left out (overlapping another)


# ------------------------------------------------------------------ answers


def flatten_spans(spans: list[Span]) -> tuple[list[Span], list[Span]]:
    """(kept, left out): non-overlapping spans in sentence order; earliest then longest wins."""
    kept: list[Span] = []
    dropped: list[Span] = []
    for span in sorted(set(spans), key=lambda s: (s[1], -(s[2] - s[1]), s[0])):
        if kept and span[1] < kept[-1][2]:
            dropped.append(span)
        else:
            kept.append(span)
    return kept, dropped


def tag_html(sentence: str, spans: list[Span], tag: str = "span") -> str:
    """The sentence with each (flattened) span wrapped in <tag class="TYPE">."""
    out, cursor = [], 0
    for etype, start, end in flatten_spans(spans)[0]:
        out += [sentence[cursor:start], f'<{tag} class="{etype}">', sentence[start:end], f"</{tag}>"]
        cursor = end
    out.append(sentence[cursor:])
    return "".join(out)


def json_answer(sentence: str, spans: list[Span]) -> str:
    items = [{"type": t, "text": sentence[s:e]} for t, s, e in flatten_spans(spans)[0]]
    return json.dumps(items, ensure_ascii=False)


def _answer(sentence: str, spans: list[Span], output_format: str) -> str:
    _check_format(output_format)
    return json_answer(sentence, spans) if output_format == "json" else tag_html(sentence, spans)


def _check_format(output_format: str) -> None:
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output_format must be one of {OUTPUT_FORMATS}, not {output_format!r}")


# ------------------------------------------------------------------ prompts


def _how(output_format: str, what: str) -> str:
    _check_format(output_format)
    if output_format == "json":
        return 'Answer with a JSON list of {"type": ..., "text": ...} objects in sentence order.'
    return f'Rewrite the sentence as HTML, wrapping each {what} in <span class="TYPE">...</span>.'


def _ordered(types, reference: tuple[str, ...]) -> list[str]:
    wanted = set(types)
    return [t for t in reference if t in wanted]


def ner_prompt(sentence: str, output_format: str = "html", types=MAIN_TYPES, style: str | PromptStyle = "paper") -> str:
    """Ask for the main entities of `types` (a partial-schema site lists only its own)."""
    names = ", ".join(_ordered(types, MAIN_TYPES))
    if prompt_style(style).compact:
        return f"Tag {names}:\n{sentence}"
    return f"Extract the clinical entities ({names}) from the sentence. {_how(output_format, 'entity')}\nSentence: {sentence}"


def ner_answer(sentence: str, spans: list[Span], output_format: str = "html") -> str:
    return _answer(sentence, spans, output_format)


def modifier_prompt(
    sentence: str, main: Span, output_format: str = "html", types=MODIFIER_TYPES, style: str | PromptStyle = "paper"
) -> str:
    """Ask for the modifiers of the main entity marked with <main class="TYPE">."""
    ordered = _ordered(types, MODIFIER_TYPES)
    names = ", ".join(ordered)
    marked = tag_html(sentence, [main], tag="main")
    if prompt_style(style).compact:
        subset = f" ({names})" if len(ordered) < len(MODIFIER_TYPES) else ""
        return f"Modifiers{subset} of <main>:\n{marked}"
    return f"Find the modifiers ({names}) of the {main[0]} marked with <main>. {_how(output_format, 'modifier')}\nSentence: {marked}"


def modifier_answer(sentence: str, main: Span, modifiers: list[Span], output_format: str = "html") -> str:
    """The sentence with `main`'s modifiers tagged (the main entity itself is not marked)."""
    return _answer(sentence, modifiers, output_format)


# ------------------------------------------------------------------ documents


def _relative(ent: Entity, start: int) -> Span:
    return (ent.type, ent.start - start, ent.end - start)


def _modifiers_by_head(doc: Document, modifier_types: list[str]) -> dict[str, list[Entity]]:
    by_id = {e.id: e for e in doc.entities}
    tails: dict[str, list[Entity]] = {}
    for rel in doc.relations:  # hasAttr and hasTemporal: head = main, tail = modifier
        tail = by_id.get(rel.tail)
        if tail is not None and tail.type in modifier_types:
            tails.setdefault(rel.head, []).append(tail)
    return tails


def sentence_index(start: int, end: int, sentences: list[tuple[int, int]], starts: list[int]) -> int | None:
    """Index of the sentence that holds [start, end) whole, None if it crosses a boundary
    (`starts`: the sentences' start offsets, for bisect)."""
    i = bisect.bisect_right(starts, start) - 1
    if i >= 0 and end <= sentences[i][1]:
        return i
    return None


@dataclass
class _ExampleMaker:
    """Builds the examples of one note in one prompt style, output format and (partial) schema."""

    doc_id: str
    output_format: str
    main_types: list[str]
    modifier_types: list[str]
    stats: Counter
    style: PromptStyle = PROMPT_STYLES["paper"]

    def ner(self, s_start: int, sentence: str, mains: list[Entity]) -> Example:
        kept, dropped = flatten_spans([_relative(e, s_start) for e in mains])
        self.stats["overlapping_main"] += len(dropped)
        fmt = self.style.formats(self.output_format)[0]
        prompt = ner_prompt(sentence, fmt, self.main_types, self.style)
        answer = ner_answer(sentence, kept, fmt)
        return Example(self.doc_id, "ner", s_start, sentence, prompt, answer, spans=tuple(kept), unexpressed=tuple(dropped))

    def modifier(self, sentence_range: tuple[int, int], sentence: str, ent: Entity, modifiers: list[Entity]) -> Example:
        s_start, s_end = sentence_range
        main = _relative(ent, s_start)
        inside = [m for m in modifiers if s_start <= m.start and m.end <= s_end]
        self.stats["relations"] += len(modifiers)
        self.stats["cross_sentence_relation"] += len(modifiers) - len(inside)
        kept, dropped = flatten_spans([_relative(m, s_start) for m in inside])
        self.stats["overlapping_modifier"] += len(dropped)
        fmt = self.style.formats(self.output_format)[1]
        prompt = modifier_prompt(sentence, main, fmt, self.modifier_types, self.style)
        answer = modifier_answer(sentence, main, kept, fmt)
        return Example(self.doc_id, "modifier", s_start, sentence, prompt, answer, main=main, spans=tuple(kept), unexpressed=tuple(dropped))


def _mains_by_sentence(doc: Document, main_types: list[str], sentences: list[tuple[int, int]], stats: Counter) -> dict[int, list[Entity]]:
    """Main entities per sentence index; those crossing a sentence boundary are counted."""
    starts = [start for start, _ in sentences]
    by_sentence: dict[int, list[Entity]] = {}
    for ent in doc.entities:
        if ent.type not in main_types:
            continue
        stats["main_entities"] += 1
        stats["discontinuous_main"] += len(ent.spans) > 1
        index = sentence_index(ent.start, ent.end, sentences, starts)
        if index is None:
            stats["cross_sentence_main"] += 1
        else:
            by_sentence.setdefault(index, []).append(ent)
    return by_sentence


def document_examples(
    doc: Document,
    tasks=BUDGET.tasks,
    output_format: str = "html",
    types: set[str] | None = None,
    include_empty_modifier_examples: bool = True,
    stats: Counter | None = None,
    style: str | PromptStyle = "paper",
    ner_sentences: int = BUDGET.ner_sentences,
) -> list[Example]:
    """Sentence-level examples of one note, in text order.

    NER: one example per sentence (with no entities too: the model must learn to copy).
    Modifiers: one example per main entity, including those without modifiers unless
    `include_empty_modifier_examples` is False. `types` limits a partial-schema site to
    the types it annotates (its prompts then name only those). `stats`, if given,
    counts entities and what could not be expressed. `style`: `PROMPT_STYLES`.
    `ner_sentences`: consecutive sentences per NER example (segmentation.sentence_windows).
    """
    _check_format(output_format)
    if ner_sentences < 1:
        raise ValueError(f"ner_sentences must be at least 1, not {ner_sentences}")
    allowed = set(types) if types else set(MAIN_TYPES) | set(MODIFIER_TYPES)
    make = _ExampleMaker(
        doc.id,
        output_format,
        _ordered(allowed, MAIN_TYPES),
        _ordered(allowed, MODIFIER_TYPES),
        stats if stats is not None else Counter(),
        prompt_style(style),
    )
    sentences = split_sentences(doc.text)
    mains_in = _mains_by_sentence(doc, make.main_types, sentences, make.stats)
    tails = _modifiers_by_head(doc, make.modifier_types)
    # NER units: the sentences, or windows of ner_sentences of them (an entity that crosses a
    # sentence boundary inside a window is kept; the stats count per sentence, above)
    windows = sentences if ner_sentences == 1 else sentence_windows(doc.text, ner_sentences)
    mains_in_window = mains_in if ner_sentences == 1 else _mains_by_sentence(doc, make.main_types, windows, Counter())
    examples = []
    for index, (s_start, s_end) in enumerate(sentences):
        sentence, mains = doc.text[s_start:s_end], mains_in.get(index, [])
        if "ner" in tasks and make.main_types and index % ner_sentences == 0:
            w_start, w_end = windows[index // ner_sentences]
            examples.append(make.ner(w_start, doc.text[w_start:w_end], mains_in_window.get(index // ner_sentences, [])))
        if "modifier" not in tasks or not make.modifier_types:
            continue
        for ent in mains:
            example = make.modifier((s_start, s_end), sentence, ent, tails.get(ent.id, []))
            if example.spans or example.unexpressed or include_empty_modifier_examples:
                examples.append(example)
    return examples


# ------------------------------------------------------------------ chat and tokens


def _plain_template(messages: list[dict]) -> str:
    """For a tokenizer without a chat template (a base model): a fixed instruction format."""
    parts = [m["content"] + "\n\n" for m in messages if m["role"] == "system"]
    parts += [f"### Input:\n{m['content']}\n\n" for m in messages if m["role"] == "user"]
    return "".join(parts) + "### Response:\n"


def render_chat(tokenizer, prompt: str, answer: str | None = None, system: str | None = SYSTEM_PROMPT) -> tuple[str, str | None]:
    """(prompt text ending where the assistant's answer begins, that + answer + eos).

    Uses the tokenizer's chat template. A template that rejects the system role gets
    the system text prepended to the user turn; a tokenizer without a template gets a
    plain "### Input / ### Response" format.
    """
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    if not getattr(tokenizer, "chat_template", None):
        prompt_text = _plain_template(messages)
    else:
        try:
            prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:  # jinja raise_exception("System role not supported") and alike
            if not system:
                raise
            merged = [{"role": "user", "content": f"{system}\n\n{prompt}"}]
            prompt_text = tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)
    if answer is None:
        return prompt_text, None
    return prompt_text, prompt_text + answer + (tokenizer.eos_token or "")


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenize_example(
    tokenizer, example: Example, max_length: int, train_on_prompt: bool = False, style: str | PromptStyle = "paper"
) -> dict:
    """input_ids and labels (-100 on the prompt unless train_on_prompt), cut at max_length.

    The prompt is tokenised alone, as at inference; the full text is tokenised whole
    when that keeps the prompt's tokens as its prefix, else prompt and answer tokens
    are concatenated. Truncation drops tokens from the right; num_supervised_tokens
    counts the labelled tokens that are left (Fed-MedLoRA's aggregation weight).
    """
    prompt_text, full_text = render_chat(tokenizer, example.prompt, example.answer, system=prompt_style(style).system)
    prompt_ids = _ids(tokenizer, prompt_text)
    full_ids = _ids(tokenizer, full_text)
    if full_ids[: len(prompt_ids)] != prompt_ids:
        full_ids = prompt_ids + _ids(tokenizer, full_text[len(prompt_text) :])
    answer_ids = full_ids[len(prompt_ids) :]
    prompt_labels = list(prompt_ids) if train_on_prompt else [IGNORE_INDEX] * len(prompt_ids)
    input_ids = full_ids[:max_length]
    labels = (prompt_labels + answer_ids)[:max_length]
    return {"input_ids": input_ids, "labels": labels, "num_supervised_tokens": sum(1 for x in labels if x != IGNORE_INDEX)}
