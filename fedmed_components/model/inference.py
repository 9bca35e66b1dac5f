"""Batched greedy generation and note-level prediction (entities, then their modifiers).

Batches are left-padded (generation appends on the right) and decoded greedily with the
KV cache by our own loop rather than HF ``generate``: a row that reaches its stop token
or its own token budget leaves the batch at once (its cache rows are dropped), so a
batch costs what its rows still need instead of running every row to the longest
answer. The instruction every prompt starts with (system prompt, task text) is encoded
once per call and its KV cache shared by all rows, so only each sentence is prefilled.
Each row's budget is bounded by its own input length (the answer is the input
sentence with tags added, so it cannot need much more than that): a row's output never
depends on which rows share its batch, and batched output equals one-at-a-time output.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch

from fedmed_components.data.document import Document, Entity, Relation
from fedmed_components.settings import BUDGET

log = logging.getLogger("fedmed.inference")


@dataclass
class GenerationSettings:
    batch_size: int = 32
    max_new_tokens: int = 256
    # answer length <= input tokens * factor + slack (tags add tokens)
    length_factor: float = 2.5
    length_slack: int = 32
    # share the KV cache of the prompts' common beginning when it is at least this long
    min_shared_prefix: int = 8
    precision: str = BUDGET.precision  # auto | fp32 | bf16 autocast (precision.py)

    def budget(self, answer_length: int) -> int:
        return min(self.max_new_tokens, int(answer_length * self.length_factor) + self.length_slack)


@dataclass(frozen=True)
class AnswerBias:
    """Subtract `value` from `token`'s logit where a row's answer so far is `prefix`: a
    threshold on one decision, e.g. "[]" against '[{"' at a modifier answer's start."""

    prefix: tuple[int, ...]
    token: int
    value: float


EMPTY_MODIFIER_ANSWER = "[]"  # a JSON modifier answer (compact prompts) with nothing in it
NONEMPTY_MODIFIER_START = '[{"'


def empty_answer_decision(tokenizer) -> tuple[tuple[int, ...], int]:
    """(the tokens "[]" and '[{"' share, the token that makes a JSON modifier answer "[]"):
    under greedy decoding this one token decides whether an entity gets any modifier."""
    empty = tokenizer(EMPTY_MODIFIER_ANSWER, add_special_tokens=False)["input_ids"]
    other = tokenizer(NONEMPTY_MODIFIER_START, add_special_tokens=False)["input_ids"]
    shared = 0
    while shared < min(len(empty), len(other)) and empty[shared] == other[shared]:
        shared += 1
    if shared == len(empty):
        raise ValueError(f"this tokenizer writes {EMPTY_MODIFIER_ANSWER!r} as a prefix of {NONEMPTY_MODIFIER_START!r}: no deciding token")
    return tuple(empty[:shared]), empty[shared]


def generate(
    model,
    tokenizer,
    prompt_texts: list[str],
    settings: GenerationSettings | None = None,
    progress: bool = False,
    answer_lengths: list[int] | None = None,
    stats: dict | None = None,
    answer_bias: AnswerBias | None = None,
) -> list[str]:
    """Greedy completions for already chat-rendered prompts, in input order.

    answer_lengths: the token length of the text each answer rewrites (the sentence),
    which bounds that answer's new tokens; without it the prompt length is used.
    stats: if given, receives "new_tokens" (generated, stop tokens excluded).
    answer_bias: a logit bias on one token after a given answer start (`AnswerBias`).
    """
    from tqdm.auto import tqdm

    settings = settings or GenerationSettings()
    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in prompt_texts]
    budgets = [settings.budget(answer_lengths[i] if answer_lengths else len(ids)) for i, ids in enumerate(encoded)]
    stop_ids = sorted(i for i in {tokenizer.eos_token_id, *_extra_stop_ids(tokenizer)} if i is not None)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    # Similar prompt lengths batch together (little padding); a prompt is the sentence
    # plus a fixed instruction, so this also groups similar expected answer lengths.
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i]), budgets[i]))
    outputs: list[str] = [""] * len(encoded)
    if not encoded:
        return outputs
    shared = shared_prefix_length(encoded)
    shared = shared if shared >= settings.min_shared_prefix else 0
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    from fedmed_components.model.precision import autocast, resolve_precision

    try:
        with torch.inference_mode(), autocast(resolve_precision(settings.precision, device), device):
            prefix = encode_prefix(model, encoded[0][:shared], device) if shared else None
            for start in tqdm(range(0, len(order), settings.batch_size), disable=not progress, desc="generating", leave=False):
                idx = order[start : start + settings.batch_size]
                tokens = greedy_decode(
                    model, [encoded[i][shared:] for i in idx], [budgets[i] for i in idx], stop_ids, pad_id, device, prefix, answer_bias
                )
                for i, row in zip(idx, tokens):
                    outputs[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
                if stats is not None:
                    stats["new_tokens"] = stats.get("new_tokens", 0) + sum(len(row) for row in tokens)
    finally:
        model.train(was_training)
    return outputs


def shared_prefix_length(prompts: list[list[int]]) -> int:
    """Tokens all prompts start with, leaving every prompt at least one token of its own."""
    shortest = min(len(p) for p in prompts)
    n = 0
    while n < shortest - 1 and all(p[n] == prompts[0][n] for p in prompts):
        n += 1
    return n


def encode_prefix(model, prefix: list[int], device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The per-layer (keys, values) of a prompt beginning, computed once (batch of 1)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=getattr(model, "config", None))
    model(input_ids=torch.tensor([prefix], device=device), cache=cache, use_cache=True, logits_to_keep=1)
    return [(layer.keys, layer.values) for layer in cache.layers]


def greedy_decode(
    model,
    prompts: list[list[int]],
    budgets: list[int],
    stop_ids: list[int],
    pad_id: int,
    device,
    prefix=None,
    answer_bias: AnswerBias | None = None,
) -> list[list[int]]:
    """New token ids per prompt (stop token excluded): greedy, KV cache, left padding.

    prefix: `encode_prefix` of tokens that precede every prompt (then `prompts` are the
    rest of each). Rows that finish are removed from the batch, cache included.
    answer_bias: applied to the rows whose new tokens equal its prefix, at the next step.
    """
    from transformers import DynamicCache

    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention[row, width - len(ids) :] = 1
    input_ids, attention = input_ids.to(device), attention.to(device)
    cache = DynamicCache(config=getattr(model, "config", None))
    shared = 0
    if prefix:
        shared = prefix[0][0].shape[-2]
        for layer, (keys, values) in enumerate(prefix):
            cache.update(keys.expand(len(prompts), -1, -1, -1), values.expand(len(prompts), -1, -1, -1), layer)
        # [shared prefix][pads][own tokens]: the pads sit between, masked out
        attention = torch.cat([attention.new_ones((len(prompts), shared)), attention], dim=-1)
    # Positions count real tokens only, so a padded row sees the positions it would
    # see alone; pads get a harmless position (they are masked out as keys).
    positions = (attention.cumsum(-1) - 1).clamp(min=0)[:, shared:]
    stops = torch.tensor(stop_ids, device=device)
    budget = torch.tensor(budgets, device=device)
    live = list(range(len(prompts)))  # original row of each batch row
    new_tokens: list[list[int]] = [[] for _ in prompts]
    step_ids, step_positions = input_ids, positions
    produced = 0
    while live:
        logits = model(
            input_ids=step_ids, attention_mask=attention, position_ids=step_positions, cache=cache, use_cache=True, logits_to_keep=1
        ).logits
        scores = logits[:, -1, :]
        if answer_bias is not None and produced == len(answer_bias.prefix):
            rows = [k for k, row in enumerate(live) if tuple(new_tokens[row]) == answer_bias.prefix]
            if rows:
                scores = scores.clone()
                scores[rows, answer_bias.token] -= answer_bias.value
        next_ids = scores.argmax(dim=-1)
        produced += 1
        finished = torch.isin(next_ids, stops) | (budget <= produced)
        for row, token, done in zip(live, next_ids.tolist(), finished.tolist()):
            if not (done and token in stop_ids):
                new_tokens[row].append(token)
        if bool(finished.any()):
            keep = (~finished).nonzero().squeeze(-1)
            if keep.numel() == 0:
                break
            live = [live[k] for k in keep.tolist()]
            cache.batch_select_indices(keep)
            next_ids, attention, budget = next_ids[keep], attention[keep], budget[keep]
            positions = positions[keep]
        attention = torch.cat([attention, attention.new_ones((attention.shape[0], 1))], dim=-1)
        positions = positions[:, -1:] + 1
        step_ids, step_positions = next_ids[:, None], positions
    return new_tokens


def _extra_stop_ids(tokenizer) -> list[int]:
    ids = []
    for token in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid >= 0 and tid != tokenizer.unk_token_id:
            ids.append(tid)
    return ids


@dataclass
class PredictionReport:
    sentences: int = 0
    ner_parse_failures: int = 0
    modifier_parse_failures: int = 0

    @property
    def parse_failures(self) -> int:
        return self.ner_parse_failures + self.modifier_parse_failures

    def summary(self, notes: int) -> str:
        return f"{notes} notes, {self.sentences} sentences, {self.parse_failures} parse failures"


def predict_documents(
    model,
    tokenizer,
    docs: list[Document],
    *,
    tasks: tuple[str, ...] = BUDGET.tasks,
    output_format: str = "html",
    settings: GenerationSettings | None = None,
    progress: bool = False,
    prompt_style: str = BUDGET.prompt_style,
    ner_sentences: int = BUDGET.ner_sentences,
    modifier_none_bias: float = 0.0,
) -> tuple[list[Document], PredictionReport]:
    """Predict main entities per sentence (or per window of `ner_sentences`), then each
    entity's modifiers in its sentence (`predict_modifiers`); note offsets. `prompt_style`
    and `ner_sentences` must be the ones the adapter was trained with (prompts.PROMPT_STYLES)."""
    from fedmed_components.data.segmentation import sentence_windows, split_sentences
    from fedmed_components.task.parsing import parse_ner
    from fedmed_components.task.prompts import ner_prompt, render_chat
    from fedmed_components.task.prompts import prompt_style as get_style

    style = get_style(prompt_style)
    ner_format = style.formats(output_format)[0]

    report = PredictionReport()
    units = []  # (doc index, start, text): the NER inputs, sentences or windows of them
    for d, doc in enumerate(docs):
        sentences = split_sentences(doc.text)
        report.sentences += len(sentences)
        spans = sentences if ner_sentences == 1 else sentence_windows(doc.text, ner_sentences)
        units += [(d, start, doc.text[start:end]) for start, end in spans]
    preds = [Document(id=doc.id, text=doc.text, site=doc.site) for doc in docs]

    prompts = [render_chat(tokenizer, ner_prompt(s, ner_format, style=style), system=style.system)[0] for _, _, s in units]
    lengths = [len(tokenizer(s, add_special_tokens=False)["input_ids"]) for _, _, s in units]
    ner_outputs = generate(model, tokenizer, prompts, settings, progress, answer_lengths=lengths)
    for (d, offset, text), output in zip(units, ner_outputs):
        parsed = parse_ner(output, text, output_format=ner_format)
        report.ner_parse_failures += int(parsed.failed)
        for etype, s, e in parsed.spans:
            _add_entity(preds[d], etype, offset + s, offset + e)

    if "modifier" in tasks:
        report.modifier_parse_failures += predict_modifiers(
            model,
            tokenizer,
            preds,
            output_format=output_format,
            settings=settings,
            progress=progress,
            prompt_style=prompt_style,
            ner_sentences=ner_sentences,
            none_bias=modifier_none_bias,
        )
    return preds, report


def choose_none_bias(validation_f1: dict[float, float]) -> float:
    """The none bias with the highest validation modifier F1; a tie goes to the smaller
    (the closer to plain greedy decoding)."""
    return max(validation_f1, key=lambda bias: (validation_f1[bias], -bias))


def entities_only(preds: list[Document]) -> list[Document]:
    """Copies of predictions with their main entities alone (no modifier, no link): what
    the pipeline's first step gave, ready for `predict_modifiers` to ask again."""
    from fedmed_components.data.schema import MAIN_TYPES

    return [Document(id=d.id, text=d.text, site=d.site, entities=[replace(e) for e in d.entities if e.type in MAIN_TYPES]) for d in preds]


def predict_modifiers(
    model,
    tokenizer,
    preds: list[Document],
    *,
    output_format: str = "html",
    settings: GenerationSettings | None = None,
    progress: bool = False,
    prompt_style: str = BUDGET.prompt_style,
    ner_sentences: int = BUDGET.ner_sentences,
    none_bias: float = 0.0,
) -> int:
    """Ask the modifiers of every main entity of `preds` (in place: modifier entities and
    hasAttr relations are added); returns the parse failures.

    Modifiers are asked in the sentence holding the entity, as training shows them; one
    that crosses sentences inside a packed NER window, in that window. `none_bias` > 0
    lowers the logit of the empty JSON answer at its deciding token
    (`empty_answer_decision`): a threshold on "has this entity any modifier", chosen on
    validation (bench/bench_modifier_decision.py); 0 is plain greedy decoding.
    """
    from fedmed_components.data.schema import MAIN_TYPES
    from fedmed_components.data.segmentation import sentence_windows, split_sentences
    from fedmed_components.task.parsing import parse_modifiers
    from fedmed_components.task.prompts import modifier_prompt, render_chat, sentence_index
    from fedmed_components.task.prompts import prompt_style as get_style

    style = get_style(prompt_style)
    modifier_format = style.formats(output_format)[1]
    bias = None
    if none_bias:
        if modifier_format != "json":
            raise ValueError(f"a none bias needs JSON modifier answers (a compact prompt style), not {modifier_format}")
        bias = AnswerBias(*empty_answer_decision(tokenizer), none_bias)
    mains = []  # (doc index, sentence start, sentence, (type, start, end) in the sentence, entity id)
    for d, doc in enumerate(preds):
        sentences = split_sentences(doc.text)
        starts = [a for a, _ in sentences]
        windows = sentences if ner_sentences == 1 else sentence_windows(doc.text, ner_sentences)
        for ent in [e for e in doc.entities if e.type in MAIN_TYPES]:
            i = sentence_index(ent.start, ent.end, sentences, starts)
            if i is None:
                w = sentence_index(ent.start, ent.end, windows, [a for a, _ in windows])
                a, b = windows[w] if w is not None else (0, len(doc.text))
            else:
                a, b = sentences[i]
            mains.append((d, a, doc.text[a:b], (ent.type, ent.start - a, ent.end - a), ent.id))
    if not mains:
        return 0
    prompts = [
        render_chat(tokenizer, modifier_prompt(sent, main, modifier_format, style=style), system=style.system)[0]
        for _, _, sent, main, _ in mains
    ]
    lengths = [len(tokenizer(sent, add_special_tokens=False)["input_ids"]) for _, _, sent, _, _ in mains]
    outputs = generate(model, tokenizer, prompts, settings, progress, answer_lengths=lengths, answer_bias=bias)
    failures = 0
    for (d, offset, sentence, main, head_id), output in zip(mains, outputs):
        parsed = parse_modifiers(output, sentence, output_format=modifier_format, main=main)
        failures += int(parsed.failed)
        for mtype, s, e in parsed.spans:
            tail = _add_entity(preds[d], mtype, offset + s, offset + e)
            preds[d].relations.append(Relation(type="hasAttr", head=head_id, tail=tail.id))
    return failures


def _add_entity(doc: Document, etype: str, start: int, end: int) -> Entity:
    """Add an entity, reusing an identical one (a modifier shared by two entities)."""
    for ent in doc.entities:
        if ent.type == etype and ent.spans == [(start, end)]:
            return ent
    ent = Entity(id=f"T{len(doc.entities) + 1}", type=etype, spans=[(start, end)], text=doc.text[start:end])
    doc.entities.append(ent)
    return ent
