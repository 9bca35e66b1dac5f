"""The task-model seam: both kinds implement TaskModel, and the site runtime picks the kind
from the model (a tiny BERT-shaped encoder, the tiny Llama) and trains through it alone."""

import inspect

import pytest
import torch

from fedmed_components.data.document import Document, Entity, write_jsonl
from fedmed_components.federation.lora_keys import is_lora_key
from fedmed_components.model import token_classification as tc
from fedmed_components.model.inference import GenerationSettings
from fedmed_components.model.modeling import PEFT_TASKS, LoraSettings, initial_adapter_from_config, resolve_model
from fedmed_components.model.site import SiteConfig, SiteRuntime
from fedmed_components.model.task_model import (
    CAUSAL_LM,
    TASK_MODELS,
    TOKEN_CLASSIFICATION,
    CausalLMTask,
    TaskModel,
    TokenClassificationTask,
    task_model_for,
)
from fedmed_components.model.training import TrainSettings, collate, per_example_loss, supervised_loss
from fedmed_components.settings import PAPER_TARGET_MODULES
from fedmed_components.task.bio_labels import NUM_LABELS

IMPLEMENTATIONS = [CausalLMTask, TokenClassificationTask]


@pytest.fixture(scope="module")
def tiny_bert_path(tmp_path_factory):
    """A 1-layer, 32-wide BertModel (random weights) with MiniLM's fast WordPiece tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny_bert")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("minilm"))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def site_folder(tmp_path_factory):
    from fedmed_components.data.synth import generate_site_corpus

    root = tmp_path_factory.mktemp("task_model_site")
    docs = generate_site_corpus("site-a", 3, seed=5, style="general_medicine")
    write_jsonl(docs[:2], root / "train.jsonl")
    write_jsonl(docs[2:], root / "val.jsonl")
    return root


def _runtime(model_path, site_folder, task_model="auto") -> SiteRuntime:
    config = SiteConfig(
        model=model_path,
        quantize="none",
        device="cpu",
        lora=LoraSettings(r=2, alpha=4),
        train=TrainSettings(max_steps=1, batch_size=4, max_length=96, learning_rate=1e-3),
        max_val_examples=4,
        task_model=task_model,
    )
    runtime = SiteRuntime(config, site_name="site-a")
    runtime.load_data(site_folder)
    return runtime


# ------------------------------------------------------------------ the protocol


@pytest.mark.parametrize("cls", IMPLEMENTATIONS, ids=lambda c: c.__name__)
def test_each_implementation_satisfies_the_protocol(cls):
    task = cls()  # an ABC: an abstract member left out would refuse to instantiate
    assert isinstance(task, TaskModel)
    assert task.kind in TASK_MODELS and task.kind != "auto"
    assert task.peft_task_type in PEFT_TASKS and task.peft_task is PEFT_TASKS[task.peft_task_type]
    assert callable(task.loss) and callable(task.collate)
    assert task.per_example_loss is None or callable(task.per_example_loss)
    assert isinstance(task.validates_f1, bool)
    assert isinstance(task.head_modules, tuple) and all(isinstance(h, str) for h in task.head_modules)
    for name in ("load_tokenizer", "load_trainable", "load_predictor", "build_examples", "predict"):
        # the same parameters as the protocol declares: callers never need to know the kind
        assert list(inspect.signature(getattr(cls, name)).parameters) == list(inspect.signature(getattr(TaskModel, name)).parameters), name
    # what the LoRA settings of this kind save: its PEFT task type and its heads
    settings = task.lora_settings(LoraSettings(r=4, alpha=8))
    assert settings.task_type == task.peft_task_type
    assert settings.to_peft().modules_to_save == (list(task.head_modules) or None)


def test_the_two_kinds_differ_where_the_seam_says():
    causal, tagger = CausalLMTask(), TokenClassificationTask()
    assert (causal.kind, tagger.kind) == (CAUSAL_LM, TOKEN_CLASSIFICATION)
    assert causal.auto_model_class.__name__ == "AutoModelForCausalLM" and causal.num_labels is None
    assert tagger.auto_model_class.__name__ == "AutoModelForTokenClassification" and tagger.num_labels == NUM_LABELS
    assert causal.head_modules == () and tagger.head_modules == tc.HEAD_MODULES == ("classifier",)
    assert (causal.loss, causal.collate, causal.per_example_loss) == (supervised_loss, collate, per_example_loss)
    assert (tagger.loss, tagger.collate, tagger.per_example_loss) == (tc.tagging_loss, tc.collate_tagged, None)
    assert not causal.validates_f1 and tagger.validates_f1
    paper = LoraSettings()
    assert causal.lora_settings(paper) is paper  # the causal LM trains the settings as given
    assert sorted(tagger.lora_settings(paper).target_modules) == sorted(tc.ENCODER_TARGET_MODULES)
    explicit = LoraSettings(target_modules=["query", "value"])
    assert tagger.lora_settings(explicit).target_modules == ["query", "value"]
    assert sorted(PAPER_TARGET_MODULES) == sorted(paper.target_modules)


def test_task_model_for_names_kinds_and_refuses_what_it_cannot_resolve():
    assert isinstance(task_model_for(CAUSAL_LM), CausalLMTask)
    assert isinstance(task_model_for(TOKEN_CLASSIFICATION, "ignored/path"), TokenClassificationTask)
    with pytest.raises(ValueError, match="model path"):
        task_model_for("auto")
    with pytest.raises(ValueError, match="unknown task model"):
        task_model_for("tagging", "some/model")


# ------------------------------------------------- the site picks by the model


def test_task_model_for_a_model_path_reads_its_config(tiny_bert_path, tiny_model_path):
    assert isinstance(task_model_for(tiny_bert_path), TokenClassificationTask)
    assert isinstance(task_model_for("auto", tiny_bert_path), TokenClassificationTask)
    assert isinstance(task_model_for(tiny_model_path), CausalLMTask)
    assert isinstance(task_model_for("auto", tiny_model_path), CausalLMTask)


def test_site_runtime_on_a_tiny_bert_uses_the_token_classification_task(tiny_bert_path, site_folder):
    runtime = _runtime(tiny_bert_path, site_folder)
    assert isinstance(runtime.task, TokenClassificationTask) and runtime.task_model == TOKEN_CLASSIFICATION
    assert runtime.config.lora.task_type == "TOKEN_CLS" and sorted(runtime.config.lora.target_modules) == sorted(tc.ENCODER_TARGET_MODULES)
    assert runtime.trainer.loss_fn is tc.tagging_loss and runtime.trainer.collate_fn is tc.collate_tagged
    assert runtime.trainer.per_example_loss_fn is None
    assert {"main_labels", "modifier_labels", "allowed_labels"} <= set(runtime.train_examples[0])
    state, stats = runtime.train(None)
    assert stats.steps == 1
    heads = sorted(k for k in state if not is_lora_key(k))
    assert heads == ["base_model.model.classifier.bias", "base_model.model.classifier.weight"]
    assert state.keys() == initial_adapter_from_config(tiny_bert_path, runtime.config.lora).keys()
    f1 = runtime.validation_f1()
    assert f1 is not None and 0.0 <= f1 <= 1.0
    preds, report = runtime.task.predict(runtime.model, runtime.tokenizer, runtime.val_docs, settings=GenerationSettings(batch_size=2))
    assert [d.id for d in preds] == [d.id for d in runtime.val_docs] and report.parse_failures == 0
    assert report.summary(len(preds)) == f"{len(preds)} notes (BERT tagging)"


def test_site_runtime_on_the_tiny_llama_uses_the_causal_lm_task(tiny_model_path, site_folder):
    runtime = _runtime(tiny_model_path, site_folder)
    assert isinstance(runtime.task, CausalLMTask) and runtime.task_model == CAUSAL_LM
    assert runtime.config.lora.task_type == "CAUSAL_LM" and runtime.config.lora.to_peft().modules_to_save is None
    assert runtime.trainer.loss_fn is supervised_loss and runtime.trainer.per_example_loss_fn is per_example_loss
    assert "labels" in runtime.train_examples[0] and "main_labels" not in runtime.train_examples[0]
    state, _ = runtime.train(None)
    assert all(is_lora_key(k) for k in state)
    assert state.keys() == initial_adapter_from_config(tiny_model_path, runtime.config.lora).keys()
    assert runtime.validation_f1() is None  # the LLM's F1 needs generation: `fedmed eval` scores it
    text = "Patient reports chest pain."
    note = Document(id="n1", text=text, entities=[Entity(id="T1", type="problem", spans=[(16, 26)], text="chest pain")])
    preds, report = runtime.task.predict(
        runtime.model, runtime.tokenizer, [note], settings=GenerationSettings(batch_size=2, max_new_tokens=4), tasks=("ner",)
    )
    assert [d.id for d in preds] == ["n1"] and report.sentences == 1
    assert report.summary(1) == f"1 notes, 1 sentences, {report.parse_failures} parse failures"


def test_site_runtime_refuses_an_unknown_task_model(tiny_model_path, site_folder):
    with pytest.raises(ValueError, match="unknown task model"):
        _runtime(tiny_model_path, site_folder, task_model="bert")
