"""The BERT baseline: BIO tagging over the Kiwi schema on MiniLM (CPU), federated like the LLM."""

import math

import pytest
import torch
from nvflare.app_common.abstract.fl_model import FLModel

from fedmed_components.data.document import Document, Entity, Relation, write_jsonl
from fedmed_components.federation.update_validation import validate_update
from fedmed_components.flare import site_tasks
from fedmed_components.flare.tracking import SiteTracker
from fedmed_components.model import token_classification as tc
from fedmed_components.model.modeling import LoraSettings, initial_adapter_from_config, resolve_model, save_adapter_folder
from fedmed_components.model.site import SiteConfig, SiteRuntime
from fedmed_components.model.training import TrainSettings
from fedmed_components.task.metrics import score_documents

META_FIELDS = {"num_supervised_tokens", "num_examples", "train_loss", "val_loss", "steps", "rank", "site"}


@pytest.fixture(scope="module")
def minilm():
    return resolve_model("minilm")


@pytest.fixture(scope="module")
def tokenizer(minilm):
    return tc.load_tokenizer(minilm)


def _note() -> Document:
    text = "Severe left knee pain since yesterday. Started aspirin 81 mg daily.\nNo fever."

    def ent(i, etype, phrase, nth=0):
        start = text.index(phrase)
        return Entity(id=f"T{i}", type=etype, spans=[(start, start + len(phrase))], text=phrase)

    ents = [
        ent(1, "problem", "left knee pain"),
        ent(2, "severity", "Severe"),
        ent(3, "bodyloc", "left knee"),
        ent(4, "temporal", "since yesterday"),
        ent(5, "drug", "aspirin"),
        ent(6, "strength", "81 mg"),
        ent(7, "frequency", "daily"),
        ent(8, "problem", "fever"),
        ent(9, "negation", "No"),
    ]
    rels = (
        [Relation("hasAttr", "T1", t) for t in ("T2", "T3", "T4")]
        + [Relation("hasAttr", "T5", t) for t in ("T6", "T7")]
        + [Relation("hasAttr", "T8", "T9")]
    )
    return Document(id="n1", text=text, entities=ents, relations=rels)


def _decode_gold(examples, docs, tokenizer):
    """Turn the training labels back into spans, as prediction decodes logits."""
    spans = {"main": [], "modifier": []}
    for ex, (_, _, _ids, offsets) in zip(examples, tc._windows(docs, tokenizer, 256)):
        spans["main"] += tc.decode_bio([tc.MAIN_TAGS[i] for i in ex["main_labels"][1:-1]], offsets)
        spans["modifier"] += tc.decode_bio([tc.MODIFIER_TAGS[i] for i in ex["modifier_labels"][1:-1]], offsets)
    return spans


def test_two_label_layers_keep_modifiers_inside_main_entities(tokenizer):
    doc = _note()
    examples = tc.build_examples([doc], tokenizer, max_length=256)
    assert len(examples) == 3  # one window per sentence / line
    spans = _decode_gold(examples, [doc], tokenizer)
    gold = {(e.type, e.start, e.end) for e in doc.entities}
    # The bodyloc inside the problem survives: each layer is flat, the two overlap.
    assert set(spans["main"]) | set(spans["modifier"]) == gold
    assert all(t in ("problem", "drug") for t, _, _ in spans["main"])
    assert sum(ex["num_supervised_tokens"] for ex in examples) == sum(len(ex["input_ids"]) - 2 for ex in examples)


def test_long_sentences_become_windows_without_losing_tokens(tokenizer):
    doc = Document(id="long", text=" ".join(["fever"] * 300) + ".", entities=[])
    examples = tc.build_examples([doc], tokenizer, max_length=64)
    assert all(len(ex["input_ids"]) <= 64 for ex in examples)
    assert sum(ex["num_supervised_tokens"] for ex in examples) == len(tokenizer(doc.text, add_special_tokens=False)["input_ids"])


def test_partial_schema_masks_unannotated_types(tokenizer):
    examples = tc.build_examples([_note()], tokenizer, types={"drug", "strength"})
    allowed = examples[0]["allowed_labels"]
    names = tc.MAIN_TAGS + tc.MODIFIER_TAGS
    assert {names[i] for i, ok in enumerate(allowed) if ok} == {"O", "B-drug", "I-drug", "B-strength", "I-strength"}
    spans = _decode_gold(examples, [_note()], tokenizer)
    assert {t for t, _, _ in spans["main"] + spans["modifier"]} == {"drug", "strength"}


def test_modifiers_link_to_the_nearest_main_entity_of_their_sentence():
    mains = [((10, 20), "A"), ((40, 50), "B")]
    assert tc.nearest_main((0, 5), mains) == "A"
    assert tc.nearest_main((52, 55), mains) == "B"
    assert tc.nearest_main((12, 15), mains) == "A"  # inside: gap 0
    assert tc.nearest_main((25, 35), mains) == "A"  # equal gaps: the earlier one
    assert tc.nearest_main((0, 5), []) is None


def test_tracker_sends_step_and_round_scalars():
    class Writer:
        def __init__(self):
            self.records = []

        def add_scalar(self, tag, value, global_step=None):
            self.records.append((tag, global_step))

    from fedmed_components.model.training import RoundStats

    writer = Writer()
    tracker = SiteTracker(writer)
    for rnd in range(2):
        for step in (1, 2):
            tracker.on_step(step, 1.0, 1e-3)
        tracker.end_round(rnd, RoundStats(steps=2, train_loss=1.0, seconds=1.0, num_tokens=10), 0.5, val_f1=0.25 if rnd else None)
    steps = [s for tag, s in writer.records if tag == "train/loss"]
    assert steps == [1, 2, 3, 4]  # steps count across rounds
    assert [s for tag, s in writer.records if tag == "round/val_loss"] == [0, 1]
    assert {tag for tag, _ in writer.records} >= {"train/lr", "round/train_loss", "round/tokens_per_s"}
    assert [s for tag, s in writer.records if tag == "round/val_f1"] == [1]  # only when measured


def test_site_policy_lets_the_head_leave_only_in_the_bert_scope():
    """poc_setup/privacy.json: clinical_bert's guard passes the classifier head, clinical's stops it."""
    import json
    from pathlib import Path

    from nvflare.apis.fl_constant import FLContextKey, ReturnCode
    from nvflare.apis.fl_context import FLContext
    from nvflare.app_common.utils.fl_model_utils import FLModelUtils

    from fedmed_components.flare.filters import AdapterOnlyGuard

    policy = json.loads((Path(__file__).resolve().parents[1] / "poc_setup" / "privacy.json").read_text())
    guards = {
        s["name"]: next(f["args"] for f in s["task_result_filters"] if f["path"].endswith("AdapterOnlyGuard")) for s in policy["scopes"]
    }
    payload = {
        "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight": torch.zeros(2, 8),
        "base_model.model.classifier.weight": torch.zeros(tc.NUM_LABELS, 8),
    }
    codes = {}
    for scope in ("clinical", "clinical_bert"):
        ctx = FLContext()
        ctx.set_prop(FLContextKey.TASK_NAME, "train", private=True, sticky=False)
        out = AdapterOnlyGuard(**guards[scope]).process(FLModelUtils.to_shareable(FLModel(params=payload, meta={})), ctx)
        codes[scope] = out.get_return_code()
    assert codes == {"clinical": ReturnCode.EXECUTION_EXCEPTION, "clinical_bert": ReturnCode.OK}
    # A base weight of the encoder still never leaves, whatever the head allowance.
    base = {**payload, "base_model.model.bert.encoder.layer.0.attention.self.query.base_layer.weight": torch.zeros(8, 8)}
    ctx = FLContext()
    ctx.set_prop(FLContextKey.TASK_NAME, "train", private=True, sticky=False)
    out = AdapterOnlyGuard(**guards["clinical_bert"]).process(FLModelUtils.to_shareable(FLModel(params=base, meta={})), ctx)
    assert out.get_return_code() == ReturnCode.EXECUTION_EXCEPTION


# ----------------------------------------------------------- MiniLM site (~1 min)


@pytest.fixture(scope="module")
def site_folder(tmp_path_factory):
    from fedmed_components.data.synth import generate_site_corpus

    root = tmp_path_factory.mktemp("bert_site")
    docs = generate_site_corpus("site-a", 6, seed=3, style="general_medicine")
    write_jsonl(docs[:5], root / "train.jsonl")
    write_jsonl(docs[5:], root / "val.jsonl")
    return root


@pytest.fixture(scope="module")
def runtime(site_folder, minilm):
    config = SiteConfig(
        model="minilm",
        device="cpu",
        lora=LoraSettings(r=4, alpha=8),
        train=TrainSettings(max_steps=8, batch_size=8, max_length=64, learning_rate=3e-3, warmup_ratio=0),
        max_val_examples=32,
    )
    runtime = SiteRuntime(config, site_name="site-a")
    runtime.load_data(site_folder)
    return runtime


@pytest.mark.slow
def test_encoder_models_are_detected(runtime, tiny_model_path):
    assert runtime.task_model == tc.TOKEN_CLASSIFICATION
    assert runtime.config.lora.task_type == "TOKEN_CLS" and set(runtime.config.lora.target_modules) == set(tc.ENCODER_TARGET_MODULES)
    assert not tc.is_encoder_model(tiny_model_path)


@pytest.mark.slow
def test_bert_round_trains_and_sends_exactly_the_adapter_keys(runtime, minilm):
    from peft import get_peft_model_state_dict

    initial = initial_adapter_from_config(minilm, runtime.config.lora)  # what the server starts from
    val_before, _ = runtime.validation_loss()
    out = site_tasks.handle(runtime, "train", FLModel(params=initial, current_round=0))
    out2 = site_tasks.handle(runtime, "train", FLModel(params=out.params, current_round=1))
    assert out.params.keys() == get_peft_model_state_dict(runtime.model).keys() == initial.keys()
    assert all(tuple(out.params[k].shape) == tuple(initial[k].shape) for k in initial)
    heads = sorted(k for k in out.params if ".lora_" not in k)
    assert heads == ["base_model.model.classifier.bias", "base_model.model.classifier.weight"]
    assert META_FIELDS <= set(out.meta) and out.meta["steps"] == 8 and out.meta["num_supervised_tokens"] > 0
    assert out2.meta["train_loss"] < out.meta["train_loss"]
    assert out2.meta["val_loss"] < val_before
    assert 0.0 <= out2.meta["val_f1"] <= 1.0  # span F1 on the validation notes, every round
    # The server accepts exactly these keys when the job declares the head, and only then.
    assert validate_update(out.params, initial, site="site-a", head_modules=["classifier"]) is None
    assert "non-LoRA" in validate_update(out.params, initial, site="site-a").reason


@pytest.mark.slow
def test_saved_adapter_loads_with_peft_and_predicts_scoreable_documents(runtime, minilm, site_folder, tmp_path, tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForTokenClassification

    from fedmed_components.data.document import read_jsonl

    for _ in range(3):  # enough steps that tagging beats the untrained model by a margin
        runtime.train(None)
    folder = save_adapter_folder(runtime.adapter_state(), runtime.config.lora, minilm, tmp_path / "adapter")
    base = AutoModelForTokenClassification.from_pretrained(minilm, num_labels=tc.NUM_LABELS)
    loaded = PeftModel.from_pretrained(base, str(folder)).eval()
    runtime.model.eval()
    batch = tokenizer(["Started aspirin 81 mg daily."], return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).logits, runtime.model(**batch).logits, atol=1e-5)
    docs = read_jsonl(site_folder / "train.jsonl")
    untrained = tc.load_model(minilm, runtime.config.lora, device="cpu")
    scores = [score_documents(docs, tc.predict_documents_bert(m, tokenizer, docs, max_length=64)) for m in (untrained, loaded)]
    assert scores[1]["entities"]["lenient"]["f1"] > scores[0]["entities"]["lenient"]["f1"] + 0.2, [s["entities"]["lenient"] for s in scores]
    assert math.isfinite(scores[1]["relations"]["lenient"]["f1"])
    assert scores[1]["relations"]["lenient"]["tp"] > 0  # nearest-main links find gold relations


@pytest.mark.slow
def test_train_local_then_predict_and_eval_with_bert(tmp_path, site_folder, capsys):
    """The CLI route of the baseline: `train-local` on an encoder, `predict`, `eval` (~40 s)."""
    import json

    from fedmed_components.cli import main
    from fedmed_components.model.modeling import load_adapter_folder

    out = tmp_path / "bert"
    assert (
        main(
            [
                "train-local",
                "--model",
                "minilm",
                "--data",
                str(site_folder),
                "--rank",
                "4",
                "--alpha",
                "8",
                "--local-steps",
                "4",
                "--batch-size",
                "8",
                "--max-length",
                "64",
                "--lr",
                "3e-3",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    state, settings, _ = load_adapter_folder(out)
    assert settings.task_type == "TOKEN_CLS" and "base_model.model.classifier.weight" in state
    assert (
        main(
            [
                "predict",
                "--model",
                "minilm",
                "--adapter",
                str(out),
                "--input",
                str(site_folder / "val.jsonl"),
                "--out",
                str(tmp_path / "pred"),
            ]
        )
        == 0
    )
    assert (tmp_path / "pred" / "brat").is_dir()
    capsys.readouterr()
    assert main(["eval", "--gold", str(site_folder / "val.jsonl"), "--pred", str(tmp_path / "pred" / "predictions.jsonl"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["documents"] == 1 and set(result["entities"]["strict"]) >= {"precision", "recall", "f1"}
