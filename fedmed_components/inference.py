"""Batched greedy generation and note-level prediction (entities, then their modifiers).

Batches are left-padded (generation appends on the right), decoded greedily with the
KV cache, and the number of new tokens is bounded by the input length: the answer is
the input sentence with tags added, so it cannot need much more than that.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from fedmed_components.document import Document, Entity, Relation

log = logging.getLogger("fedmed.inference")


@dataclass
class GenerationSettings:
    batch_size: int = 16
    max_new_tokens: int = 256
    # answer length <= input tokens * factor + slack (tags add tokens)
    length_factor: float = 2.5
    length_slack: int = 32


@torch.no_grad()
def generate(model, tokenizer, prompt_texts: list[str], settings: GenerationSettings | None = None, progress: bool = False, answer_lengths: list[int] | None = None) -> list[str]:
    """Greedy completions for already chat-rendered prompts, in input order.

    answer_lengths: the token length of the text each answer rewrites (the sentence),
    which bounds the new tokens; without it the prompt length is used.
    """
    from tqdm.auto import tqdm

    settings = settings or GenerationSettings()
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in prompt_texts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths batch together
    outputs: list[str] = [""] * len(encoded)
    eos_ids = {tokenizer.eos_token_id} | set(_extra_stop_ids(tokenizer))
    for start in tqdm(range(0, len(order), settings.batch_size), disable=not progress, desc="generating", leave=False):
        idx = order[start : start + settings.batch_size]
        batch = tokenizer.pad({"input_ids": [encoded[i] for i in idx]}, return_tensors="pt", padding=True)
        longest = batch["input_ids"].shape[1]
        base = max(answer_lengths[i] for i in idx) if answer_lengths else longest
        budget = min(settings.max_new_tokens, int(base * settings.length_factor) + settings.length_slack)
        generated = model.generate(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            max_new_tokens=budget,
            do_sample=False,
            use_cache=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=sorted(i for i in eos_ids if i is not None),
        )
        for row, i in enumerate(idx):
            outputs[i] = tokenizer.decode(generated[row, longest:], skip_special_tokens=True).strip()
    model.train(was_training)
    return outputs


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


def predict_documents(
    model,
    tokenizer,
    docs: list[Document],
    *,
    tasks: tuple[str, ...] = ("ner", "modifier"),
    output_format: str = "html",
    settings: GenerationSettings | None = None,
    progress: bool = False,
) -> tuple[list[Document], PredictionReport]:
    """Predict main entities per sentence, then each entity's modifiers; note offsets."""
    from fedmed_components.parsing import parse_modifiers, parse_ner
    from fedmed_components.prompts import modifier_prompt, ner_prompt, render_chat
    from fedmed_components.segmentation import split_sentences

    report = PredictionReport()
    sentences = []  # (doc index, sentence start, sentence text)
    for d, doc in enumerate(docs):
        for start, end in split_sentences(doc.text):
            sentences.append((d, start, doc.text[start:end]))
    report.sentences = len(sentences)
    preds = [Document(id=doc.id, text=doc.text, site=doc.site) for doc in docs]

    prompts = [render_chat(tokenizer, ner_prompt(s, output_format=output_format))[0] for _, _, s in sentences]
    lengths = [len(tokenizer(s, add_special_tokens=False)["input_ids"]) for _, _, s in sentences]
    ner_outputs = generate(model, tokenizer, prompts, settings, progress, answer_lengths=lengths)
    mains = []  # (doc index, sentence start, sentence, (type, start, end), entity id)
    for (d, offset, sentence), output in zip(sentences, ner_outputs):
        parsed = parse_ner(output, sentence, output_format=output_format)
        report.ner_parse_failures += int(parsed.failed)
        for etype, s, e in parsed.spans:
            ent = _add_entity(preds[d], etype, offset + s, offset + e)
            mains.append((d, offset, sentence, (etype, s, e), ent.id))

    if "modifier" in tasks and mains:
        prompts = [render_chat(tokenizer, modifier_prompt(sent, main, output_format=output_format))[0] for _, _, sent, main, _ in mains]
        lengths = [len(tokenizer(sent, add_special_tokens=False)["input_ids"]) for _, _, sent, _, _ in mains]
        mod_outputs = generate(model, tokenizer, prompts, settings, progress, answer_lengths=lengths)
        for (d, offset, sentence, _main, head_id), output in zip(mains, mod_outputs):
            parsed = parse_modifiers(output, sentence, output_format=output_format, main=_main)
            report.modifier_parse_failures += int(parsed.failed)
            for mtype, s, e in parsed.spans:
                tail = _add_entity(preds[d], mtype, offset + s, offset + e)
                preds[d].relations.append(Relation(type="hasAttr", head=head_id, tail=tail.id))
    return preds, report


def _add_entity(doc: Document, etype: str, start: int, end: int) -> Entity:
    """Add an entity, reusing an identical one (a modifier shared by two entities)."""
    for ent in doc.entities:
        if ent.type == etype and ent.spans == [(start, end)]:
            return ent
    ent = Entity(id=f"T{len(doc.entities) + 1}", type=etype, spans=[(start, end)], text=doc.text[start:end])
    doc.entities.append(ent)
    return ent
