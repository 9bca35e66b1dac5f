"""The task-model seam: what differs between the causal LM (generative IE) and the BERT tagger.

A site trains one of two kinds of model on the same notes: a causal LM that rewrites
each sentence with its entities marked (the paper's method; ``task.examples``,
``training.supervised_loss``, ``inference.predict_documents``) or an encoder that tags
every token with BIO labels (the BERT baseline; ``token_classification``). Everything
that depends on the kind is a member of `TaskModel`:

- examples: `build_examples` (documents -> tokenised training examples), with the
  tokenizer `load_tokenizer` gives;
- training: `loss`, `collate`, `per_example_loss` (DP-SGD; None where the loss has no
  per-record form), bundled into a ``training.LocalTrainer`` by `trainer`;
- weights: `lora_settings` (the LoRA target modules this kind trains), `head_modules`
  (what travels with the adapter besides LoRA), `peft_task_type` and `auto_model_class`
  (what the base loads as), `load_trainable` (base + fresh LoRA, for a site) and
  `load_predictor` (base + a saved adapter folder, for prediction);
- prediction: `predict` (documents in, documents with entities out, and a report);
  `validates_f1`: whether a site scores span F1 on its validation notes every round.

`task_model_for` resolves a kind, "auto" (from the model's config) or a model path to
one of the two implementations; the site runtime, ``fedmed train-local``, ``fedmed
predict`` and the server-side evaluator use only this seam and never test the kind.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import ClassVar

from fedmed_components.data.document import Document
from fedmed_components.model import token_classification as tc
from fedmed_components.model.inference import GenerationSettings, PredictionReport
from fedmed_components.model.modeling import PEFT_TASKS, LoraSettings, PeftTask
from fedmed_components.model.training import LocalTrainer, TrainSettings, collate, per_example_loss, supervised_loss
from fedmed_components.settings import BUDGET
from fedmed_components.task.examples import SFTConfig

log = logging.getLogger("fedmed.task_model")

CAUSAL_LM = tc.CAUSAL_LM
TOKEN_CLASSIFICATION = tc.TOKEN_CLASSIFICATION
TASK_MODELS = tc.TASK_MODELS  # the --task-model choices: auto, causal-lm, token-classification


class TaskModel(ABC):
    """What a kind of model does differently; one stateless instance per kind."""

    kind: ClassVar[str]  # CAUSAL_LM | TOKEN_CLASSIFICATION, as --task-model names it
    peft_task_type: ClassVar[str]  # the PEFT task type its adapters are saved with (a key of PEFT_TASKS)
    validates_f1: ClassVar[bool] = False  # a site scores span F1 on its validation notes every round
    # The training objective (see training.LocalTrainer): batches, loss, DP-SGD's per-record loss.
    collate: ClassVar[Callable]
    loss: ClassVar[Callable]
    per_example_loss: ClassVar[Callable | None] = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    # ---------------------------------------------------------------- weights

    @property
    def peft_task(self) -> PeftTask:
        return PEFT_TASKS[self.peft_task_type]

    @property
    def head_modules(self) -> tuple[str, ...]:
        """Modules trained whole and sent with the LoRA tensors (PEFT's modules_to_save)."""
        return self.peft_task.heads

    @property
    def auto_model_class(self):
        """The transformers auto class the base model loads with."""
        return self.peft_task.auto_model_class()

    @property
    def num_labels(self) -> int | None:
        """The label count of the head the base is built with (None: no classification head)."""
        return self.peft_task.num_labels

    def lora_settings(self, settings: LoraSettings) -> LoraSettings:
        """The LoRA settings this kind trains (its target modules and PEFT task type)."""
        return settings

    @abstractmethod
    def load_tokenizer(self, model_path: str): ...

    @abstractmethod
    def load_trainable(
        self,
        model_path: str,
        settings: LoraSettings,
        *,
        quantize: str = BUDGET.quantize,
        device: str | None = None,
        gradient_checkpointing: bool = False,
        name: str = "site",
    ):
        """The base model with fresh LoRA (`settings`, already through `lora_settings`) attached."""

    @abstractmethod
    def load_predictor(
        self, model_path: str, adapter: str | None = None, *, quantize: str = BUDGET.quantize, model_name: str | None = None
    ) -> tuple[object, object, dict]:
        """(model, tokenizer, adapter metadata) for prediction, with a saved adapter folder
        loaded when one is given; `model_name` is how error messages name the base."""

    # --------------------------------------------------------------- training

    @abstractmethod
    def build_examples(
        self, docs: list[Document], tokenizer, *, max_length: int, types: set[str] | None = None, sft: SFTConfig | None = None
    ) -> list[dict]:
        """Tokenised training examples of the documents; `types`: the types they annotate;
        `sft`: the prompt settings (causal LM only)."""

    def trainer(self, model, tokenizer, settings: TrainSettings, *, device=None) -> LocalTrainer:
        return LocalTrainer(
            model,
            tokenizer.pad_token_id,
            settings,
            device=device,
            loss_fn=self.loss,
            collate_fn=self.collate,
            per_example_loss_fn=self.per_example_loss,
        )

    # ------------------------------------------------------------- prediction

    @abstractmethod
    def predict(
        self,
        model,
        tokenizer,
        docs: list[Document],
        *,
        settings: GenerationSettings | None = None,
        max_length: int = tc.ENCODER_WINDOW,
        tasks: tuple[str, ...] = BUDGET.tasks,
        prompt_style: str = BUDGET.prompt_style,
        ner_sentences: int = BUDGET.ner_sentences,
        progress: bool = False,
        modifier_none_bias: float = 0.0,
    ) -> tuple[list[Document], PredictionReport | tc.TaggingReport]:
        """Predicted documents (entities, hasAttr relations, note offsets) and a report
        (``parse_failures``, ``summary(notes)``). `settings`: batch size (and, for the
        LLM, generation budget and precision); `max_length`: the tagger's window;
        `modifier_none_bias`: the LLM's threshold on "this entity has no modifier"
        (inference.predict_modifiers)."""


class CausalLMTask(TaskModel):
    """Generative IE (the paper's method): SFT prompts, answer-token loss, greedy generation."""

    kind = CAUSAL_LM
    peft_task_type = "CAUSAL_LM"
    collate = staticmethod(collate)
    loss = staticmethod(supervised_loss)
    per_example_loss = staticmethod(per_example_loss)

    def load_tokenizer(self, model_path: str):
        from fedmed_components.model.modeling import load_tokenizer

        return load_tokenizer(model_path)

    def load_trainable(self, model_path, settings, *, quantize=BUDGET.quantize, device=None, gradient_checkpointing=False, name="site"):
        from fedmed_components.model.modeling import attach_lora, load_base_model

        base = load_base_model(model_path, quantize=quantize, device=device, gradient_checkpointing=gradient_checkpointing)
        return attach_lora(base, settings)

    def load_predictor(self, model_path, adapter=None, *, quantize=BUDGET.quantize, model_name=None):
        from fedmed_components.model.modeling import apply_adapter, load_base_model

        tokenizer = self.load_tokenizer(model_path)
        model, meta = load_base_model(model_path, quantize=quantize), {}
        if adapter:
            model, meta = apply_adapter(model, adapter, model_name or model_path)
        return model, tokenizer, meta

    def build_examples(self, docs, tokenizer, *, max_length, types=None, sft=None):
        from dataclasses import replace

        from fedmed_components.task.examples import build_sft_dataset

        return build_sft_dataset(docs, tokenizer, replace(sft or SFTConfig(), max_length=max_length), types)

    def predict(
        self,
        model,
        tokenizer,
        docs,
        *,
        settings=None,
        max_length=tc.ENCODER_WINDOW,
        tasks=BUDGET.tasks,
        prompt_style=BUDGET.prompt_style,
        ner_sentences=BUDGET.ner_sentences,
        progress=False,
        modifier_none_bias=0.0,
    ):
        from fedmed_components.model.inference import predict_documents

        return predict_documents(
            model,
            tokenizer,
            docs,
            tasks=tasks,
            settings=settings,
            progress=progress,
            prompt_style=prompt_style,
            ner_sentences=ner_sentences,
            modifier_none_bias=modifier_none_bias,
        )


class TokenClassificationTask(TaskModel):
    """The BERT baseline: two-layer BIO tagging with LoRA and a trained head (token_classification)."""

    kind = TOKEN_CLASSIFICATION
    peft_task_type = tc.PEFT_TASK_TYPE
    validates_f1 = True  # tagging is cheap: span F1 every round
    collate = staticmethod(tc.collate_tagged)
    loss = staticmethod(tc.tagging_loss)
    per_example_loss = None  # no DP-SGD for the tagging loss

    def lora_settings(self, settings: LoraSettings) -> LoraSettings:
        return tc.encoder_lora(settings)

    def load_tokenizer(self, model_path: str):
        return tc.load_tokenizer(model_path)

    def load_trainable(self, model_path, settings, *, quantize=BUDGET.quantize, device=None, gradient_checkpointing=False, name="site"):
        """An unquantised encoder tagger (small); its LoRA and head train."""
        if quantize not in ("auto", "none"):
            log.warning("%s: --quantize %s ignored: the BERT baseline trains an unquantised encoder", name, quantize)
        return tc.load_model(model_path, settings, device=device)

    def load_predictor(self, model_path, adapter=None, *, quantize=BUDGET.quantize, model_name=None):
        # Without an adapter: fresh LoRA and an untrained head (as `load_model` gives).
        return tc.load_model(model_path, LoraSettings(), adapter=adapter), self.load_tokenizer(model_path), {}

    def build_examples(self, docs, tokenizer, *, max_length, types=None, sft=None):
        return tc.build_examples(docs, tokenizer, max_length, types)

    def predict(
        self,
        model,
        tokenizer,
        docs,
        *,
        settings=None,
        max_length=tc.ENCODER_WINDOW,
        tasks=BUDGET.tasks,
        prompt_style=BUDGET.prompt_style,
        ner_sentences=BUDGET.ner_sentences,
        progress=False,
        modifier_none_bias=0.0,
    ):
        # Both layers are always tagged; `tasks`, `prompt_style`, `ner_sentences` and the none bias are the LLM's.
        if modifier_none_bias:
            raise ValueError("the BERT baseline tags modifiers: a none bias is for the LLM's JSON modifier answers")
        batch = {"batch_size": settings.batch_size} if settings is not None else {}
        preds = tc.predict_documents_bert(model, tokenizer, docs, max_length=max_length, progress=progress, **batch)
        return preds, tc.TaggingReport()


_KINDS: dict[str, type[TaskModel]] = {CAUSAL_LM: CausalLMTask, TOKEN_CLASSIFICATION: TokenClassificationTask}


def task_model_for(kind_or_model_path: str, model_path: str | None = None) -> TaskModel:
    """The task model of a kind (causal-lm, token-classification), or of a model: "auto"
    with `model_path`, or a model path alone, is token classification for an encoder
    (BERT, RoBERTa, ...) and the causal LM otherwise (``token_classification.is_encoder_model``)."""
    if kind_or_model_path in _KINDS:
        return _KINDS[kind_or_model_path]()
    if kind_or_model_path == "auto":
        if model_path is None:
            raise ValueError("task model auto needs the model path to choose by")
        path = model_path
    elif model_path is None:
        path = kind_or_model_path
    else:
        raise ValueError(f"unknown task model {kind_or_model_path!r}: one of {', '.join(TASK_MODELS)}")
    return _KINDS[TOKEN_CLASSIFICATION if tc.is_encoder_model(path) else CAUSAL_LM]()
