"""The BERT baseline: BIO token classification over the Kiwi schema, with LoRA.

Design (why two label layers): a modifier may lie inside or across a main entity
("left knee pain": bodyloc *left knee* inside problem *left knee pain*), so one flat
BIO sequence would have to drop one of them. Every token therefore gets two tags, one
from the main-entity layer (O, B-/I-problem|treatment|test|drug) and one from the
modifier layer (O, B-/I-bodyloc|...). Both are read from ONE linear head of
``MAIN_TAGS + MODIFIER_TAGS`` outputs whose logits are split into two softmax groups:
the model stays a stock ``AutoModelForTokenClassification``, so PEFT's TOKEN_CLS task
saves the head with the adapter (``modules_to_save``) and
``PeftModel.from_pretrained(AutoModelForTokenClassification.from_pretrained(base,
num_labels=NUM_LABELS), folder)`` loads the global adapter as any PEFT tool would.

Inputs are sentences (``segmentation.split_sentences``), cut into windows of at most
``max_length`` tokens (nothing is truncated away); character offsets come from the fast
tokenizer's offset mapping, so predicted spans map back to note offsets and the same
``metrics.score_documents`` scores this baseline and the LLM.

Relations: the paper's BERT baseline has no relation head. Each predicted modifier is
linked (``hasAttr``) to the nearest main entity of its sentence: the one with the
smallest character gap (0 when they overlap), the earlier one on a tie; a modifier in a
sentence without a main entity gets no relation. That keeps relation F1 comparable.

Partial-schema sites (a corpus that does not annotate some types): the logits of the
types a site does not annotate are masked out of its loss, so "O" there never teaches
the model that such entities are absent.

The small API other code uses: ``is_encoder_model``, ``load_tokenizer``,
``load_model``, ``build_examples``, ``train_documents``, ``predict_documents_bert``;
``tagging_loss`` / ``collate_tagged`` plug into ``training.LocalTrainer``. The site
runtime, the trainer and the commands reach all of it through
``task_model.TokenClassificationTask``, never by testing the model kind themselves.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch

from fedmed_components.data.document import Document, Relation
from fedmed_components.data.schema import MAIN_TYPES, MODIFIER_TYPES
from fedmed_components.data.segmentation import split_sentences
from fedmed_components.model.modeling import PEFT_TASKS, LoraSettings
from fedmed_components.model.training import IGNORE_INDEX
from fedmed_components.settings import PAPER_TARGET_MODULES
from fedmed_components.task.bio_labels import ID2LABEL, MAIN_TAGS, MODIFIER_TAGS, NUM_LABELS, NUM_MAIN
from fedmed_components.task.metrics import bio_tags

log = logging.getLogger("fedmed.token_classification")

TOKEN_CLASSIFICATION = "token-classification"
CAUSAL_LM = "causal-lm"
TASK_MODELS = ("auto", CAUSAL_LM, TOKEN_CLASSIFICATION)

# Encoder families the baseline runs on (model_type in the HF config).
ENCODER_MODEL_TYPES = frozenset(
    {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "deberta", "deberta-v2", "camembert", "mpnet", "albert", "modernbert"}
)
# LoRA on every attention projection and dense layer of a BertModel (query/key/value,
# attention output, intermediate and output dense).
ENCODER_TARGET_MODULES = ("query", "key", "value", "dense")
PEFT_TASK_TYPE = "TOKEN_CLS"
# The encoder's own sizes, not the LLM budget's: a tagging window (BERT-sized encoders
# take at most 512 positions) and how many windows are tagged at once.
ENCODER_WINDOW = 256
TAGGING_BATCH = 16
HEAD_MODULES = PEFT_TASKS[PEFT_TASK_TYPE].heads  # the head PEFT saves with a TOKEN_CLS adapter


# ------------------------------------------------------------------------ models


def is_encoder_model(model_path: str) -> bool:
    """True when the model's config names an encoder family (BERT and kin), not a causal LM."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    if any(a.endswith("ForCausalLM") for a in (config.architectures or [])):
        return False
    return config.model_type in ENCODER_MODEL_TYPES


def encoder_lora(settings: LoraSettings) -> LoraSettings:
    """The LoRA settings for token classification: the Llama default targets become
    the encoder's projections; explicit targets are kept."""
    targets = list(settings.target_modules)
    if sorted(targets) == sorted(PAPER_TARGET_MODULES):
        targets = list(ENCODER_TARGET_MODULES)
    return replace(settings, target_modules=targets, task_type=PEFT_TASK_TYPE)


def load_tokenizer(model_path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if not tokenizer.is_fast:
        raise ValueError(f"{model_path}: the BERT baseline needs a fast tokenizer (character offsets)")
    tokenizer.padding_side = "right"
    return tokenizer


def load_model(model_path: str, settings: LoraSettings, *, device: str | None = None, adapter: str | None = None):
    """A token classifier with LoRA attached (or the given PEFT adapter folder loaded)."""
    from peft import get_peft_model
    from transformers import AutoModelForTokenClassification

    from fedmed_components.model.modeling import apply_adapter, default_device

    base = AutoModelForTokenClassification.from_pretrained(
        model_path, num_labels=NUM_LABELS, id2label=ID2LABEL, label2id={v: k for k, v in ID2LABEL.items()}, dtype=torch.float32
    )
    if adapter:
        model, _ = apply_adapter(base, adapter, model_path, is_trainable=True)
    else:
        model = get_peft_model(base, encoder_lora(settings).to_peft())
    return model.to(device or default_device())


# ---------------------------------------------------------------------- examples


def _windows(docs: list[Document], tokenizer, max_length: int):
    """(doc index, sentence index, token ids, note offsets) per window of a sentence."""
    limit = tokenizer.model_max_length if tokenizer.model_max_length < 100_000 else 512  # BERT position table
    room = min(max_length, limit) - 2  # [CLS] and [SEP]
    if room < 1:
        raise ValueError("max_length must leave room for [CLS] and [SEP]")
    for d, doc in enumerate(docs):
        for s, (start, end) in enumerate(split_sentences(doc.text)):
            enc = tokenizer(doc.text[start:end], add_special_tokens=False, return_offsets_mapping=True)
            ids, offsets = enc["input_ids"], [(start + a, start + b) for a, b in enc["offset_mapping"]]
            for w in range(0, len(ids), room):
                yield d, s, ids[w : w + room], offsets[w : w + room]


def _label_ids(tags: list[str], vocabulary: list[str]) -> list[int]:
    index = {t: i for i, t in enumerate(vocabulary)}
    return [index[t] for t in tags]


def _allowed(vocabulary: list[str], types: set[str] | None) -> list[bool]:
    return [t == "O" or types is None or t[2:] in types for t in vocabulary]


def build_examples(docs: list[Document], tokenizer, max_length: int = ENCODER_WINDOW, types: set[str] | None = None) -> list[dict]:
    """Training windows with both tag layers; `types`: the types the documents annotate."""
    main_types = set(MAIN_TYPES) & types if types is not None else set(MAIN_TYPES)
    mod_types = set(MODIFIER_TYPES) & types if types is not None else set(MODIFIER_TYPES)
    allowed = _allowed(MAIN_TAGS, types) + _allowed(MODIFIER_TAGS, types)
    examples = []
    for d, _, ids, offsets in _windows(docs, tokenizer, max_length):
        main = _label_ids(bio_tags(docs[d], offsets, main_types), MAIN_TAGS)
        mod = _label_ids(bio_tags(docs[d], offsets, mod_types), MODIFIER_TAGS)
        examples.append(
            {
                "input_ids": [tokenizer.cls_token_id] + ids + [tokenizer.sep_token_id],
                "main_labels": [IGNORE_INDEX] + main + [IGNORE_INDEX],
                "modifier_labels": [IGNORE_INDEX] + mod + [IGNORE_INDEX],
                "allowed_labels": allowed,
                "num_supervised_tokens": len(ids),  # every real token carries a label
            }
        )
    return examples


def collate_tagged(batch: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ex["input_ids"]) for ex in batch)
    out = {
        "input_ids": torch.full((len(batch), width), pad_token_id, dtype=torch.long),
        "attention_mask": torch.zeros((len(batch), width), dtype=torch.long),
        "main_labels": torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long),
        "modifier_labels": torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long),
        "allowed_labels": torch.tensor([ex["allowed_labels"] for ex in batch], dtype=torch.bool),
    }
    for row, ex in enumerate(batch):
        n = len(ex["input_ids"])
        out["input_ids"][row, :n] = torch.tensor(ex["input_ids"])
        out["attention_mask"][row, :n] = 1
        out["main_labels"][row, :n] = torch.tensor(ex["main_labels"])
        out["modifier_labels"][row, :n] = torch.tensor(ex["modifier_labels"])
    return out


def _input_batch(windows: list[list[int]], tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] ids [SEP], right-padded, and the attention mask."""
    width = max(len(ids) for ids in windows) + 2
    input_ids = torch.full((len(windows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(windows), width), dtype=torch.long)
    for row, ids in enumerate(windows):
        input_ids[row, : len(ids) + 2] = torch.tensor([tokenizer.cls_token_id] + ids + [tokenizer.sep_token_id])
        attention[row, : len(ids) + 2] = 1
    return input_ids, attention


def tagging_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Mean over labelled tokens of the two layers' cross-entropies (summed), and the count."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    # Types the site does not annotate cannot be predicted in its loss.
    logits = logits.masked_fill(~batch["allowed_labels"][:, None, :], float("-inf"))
    n = int((batch["main_labels"] != IGNORE_INDEX).sum())
    total = 0.0
    for part, labels in ((logits[..., :NUM_MAIN], batch["main_labels"]), (logits[..., NUM_MAIN:], batch["modifier_labels"])):
        total = total + torch.nn.functional.cross_entropy(
            part.reshape(-1, part.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        )
    return total / max(n, 1), n


def train_documents(
    model, tokenizer, docs: list[Document], settings, *, types: set[str] | None = None, progress: bool = False, on_step=None
):
    """One local round on documents (for experiment code); returns training.RoundStats."""
    from fedmed_components.model.training import LocalTrainer

    examples = build_examples(docs, tokenizer, settings.max_length, types)
    trainer = LocalTrainer(model, tokenizer.pad_token_id, settings, loss_fn=tagging_loss, collate_fn=collate_tagged)
    return trainer.train_round(examples, progress=progress, on_step=on_step)


# --------------------------------------------------------------------- prediction


@dataclass
class TaggingReport:
    """What a tagging pass reports: nothing is generated, so nothing fails to parse."""

    parse_failures: int = 0

    def summary(self, notes: int) -> str:
        return f"{notes} notes (BERT tagging)"


def decode_bio(tags: list[str], offsets: list[tuple[int, int]]) -> list[tuple[str, int, int]]:
    """(type, start, end) spans from BIO tags; an I- after O or another type starts a span."""
    spans: list[list] = []
    current = None
    for tag, (start, end) in zip(tags, offsets):
        if tag == "O":
            current = None
            continue
        prefix, etype = tag.split("-", 1)
        if prefix == "B" or current is None or current[0] != etype:
            current = [etype, start, end]
            spans.append(current)
        else:
            current[2] = end
    return [tuple(s) for s in spans]


def _gap(a: tuple[int, int], b: tuple[int, int]) -> int:
    return max(0, max(a[0], b[0]) - min(a[1], b[1]))


def nearest_main(modifier: tuple[int, int], mains: list[tuple[tuple[int, int], str]]) -> str | None:
    """The id of the main entity closest to `modifier` (character gap; earlier on a tie)."""
    best = min(mains, key=lambda m: (_gap(modifier, m[0]), m[0][0]), default=None)
    return best[1] if best else None


@torch.no_grad()
def predict_documents_bert(
    model, tokenizer, docs: list[Document], *, max_length: int = ENCODER_WINDOW, batch_size: int = TAGGING_BATCH, progress: bool = False
) -> list[Document]:
    """Predicted entities (both layers) and nearest-main hasAttr relations, note offsets."""
    from tqdm.auto import tqdm

    from fedmed_components.model.inference import _add_entity

    device = next(model.parameters()).device
    windows = list(_windows(docs, tokenizer, max_length))
    preds = [Document(id=doc.id, text=doc.text, site=doc.site) for doc in docs]
    found: dict[tuple[int, int], dict[str, list]] = {}  # (doc, sentence) -> layer -> spans
    model.eval()
    for start in tqdm(range(0, len(windows), batch_size), disable=not progress, desc="BERT predict", mininterval=2.0):
        chunk = windows[start : start + batch_size]
        input_ids, attention = _input_batch([ids for _, _, ids, _ in chunk], tokenizer)
        logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits.float().cpu()
        main_ids, mod_ids = logits[..., :NUM_MAIN].argmax(-1), logits[..., NUM_MAIN:].argmax(-1)
        for row, (d, s, ids, offsets) in enumerate(chunk):
            n = len(ids)
            layers = found.setdefault((d, s), {"main": [], "modifier": []})
            layers["main"] += decode_bio([MAIN_TAGS[i] for i in main_ids[row, 1 : n + 1].tolist()], offsets)
            layers["modifier"] += decode_bio([MODIFIER_TAGS[i] for i in mod_ids[row, 1 : n + 1].tolist()], offsets)
    for (d, _), layers in sorted(found.items()):
        mains = [((s, e), _add_entity(preds[d], t, s, e).id) for t, s, e in layers["main"] if e > s]
        for t, s, e in layers["modifier"]:
            if e <= s:
                continue
            tail = _add_entity(preds[d], t, s, e)
            head = nearest_main((s, e), mains)
            if head is not None:
                preds[d].relations.append(Relation(type="hasAttr", head=head, tail=tail.id))
    return preds
