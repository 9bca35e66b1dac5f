import json

import pytest
import torch

from fedmed_components.federation.lora_keys import is_lora_key
from fedmed_components.model import modeling
from fedmed_components.model.modeling import LoraSettings


def test_tiny_model_builds_offline_and_deterministically(tiny_model_path, tmp_path):
    again = modeling.build_tiny_model(tmp_path / "tiny2")
    from safetensors.torch import load_file

    a = load_file(f"{tiny_model_path}/model.safetensors")
    b = load_file(f"{again}/model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    tok = modeling.load_tokenizer(tiny_model_path)
    text = tok.apply_chat_template([{"role": "user", "content": "Denies chest pain."}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    ids = tok("Denies chest pain.")["input_ids"]
    assert tok.decode(ids) == "Denies chest pain."


def test_paper_lora_defaults():
    cfg = LoraSettings().to_peft()
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (16, 64, 0.0)
    assert set(cfg.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_initial_adapter_from_config_matches_peft_shapes(tiny_model_path):
    settings = LoraSettings(r=4, alpha=8)
    model = modeling.attach_lora(modeling.load_base_model(tiny_model_path, quantize="none", device="cpu"), settings)
    peft_state = modeling.get_adapter_state(model)
    init = modeling.initial_adapter_from_config(tiny_model_path, settings)
    assert {k: tuple(v.shape) for k, v in init.items()} == {k: tuple(v.shape) for k, v in peft_state.items()}
    assert all(is_lora_key(k) for k in init)
    assert all(torch.count_nonzero(v) == 0 for k, v in init.items() if ".lora_B." in k)
    assert all(torch.count_nonzero(v) > 0 for k, v in init.items() if ".lora_A." in k)
    modeling.set_adapter_state(model, init)  # loads by PEFT names without complaint


def test_set_adapter_state_rejects_mismatched_keys(tiny_model_path):
    model = modeling.attach_lora(modeling.load_base_model(tiny_model_path, quantize="none", device="cpu"), LoraSettings(r=2))
    state = modeling.get_adapter_state(model)
    bad = dict(state)
    bad.pop(next(iter(bad)))
    with pytest.raises(KeyError):
        modeling.set_adapter_state(model, bad)
    wrong_shape = {k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) for k, v in state.items()}
    with pytest.raises(ValueError):
        modeling.set_adapter_state(model, wrong_shape)


def test_adapter_folder_loads_with_peft(tiny_model_path, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    settings = LoraSettings(r=4, alpha=8)
    state = modeling.initial_adapter_from_config(tiny_model_path, settings, seed=3)
    state = {k: v + 0.01 for k, v in state.items()}
    folder = modeling.save_adapter_folder(state, settings, tiny_model_path, tmp_path / "adapter", extra_meta={"round": 2})
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 4
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    peft_model = PeftModel.from_pretrained(base, str(folder))
    loaded = modeling.get_adapter_state(peft_model)
    assert loaded.keys() == state.keys()
    assert all(torch.allclose(loaded[k], state[k]) for k in state)
    again, again_settings, meta = modeling.load_adapter_folder(folder)
    assert meta == {"round": 2} and again_settings.r == 4
    # overwrite is atomic: the folder is replaced whole, no leftovers beside it
    modeling.save_adapter_folder(state, settings, tiny_model_path, folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_4bit_nf4_path_trains_on_cpu(tiny_model_path):
    pytest.importorskip("bitsandbytes")
    from fedmed_components.model.training import LocalTrainer, TrainSettings

    base = modeling.load_base_model(tiny_model_path, quantize="4bit", device="cpu")
    assert any("Linear4bit" in type(m).__name__ for m in base.modules())
    model = modeling.attach_lora(base, LoraSettings(r=4, alpha=8))
    before = modeling.get_adapter_state(model)
    examples = [{"input_ids": list(range(5, 25)), "labels": [-100] * 10 + list(range(15, 25)), "num_supervised_tokens": 10}] * 4
    trainer = LocalTrainer(model, pad_token_id=0, settings=TrainSettings(max_steps=3, batch_size=2, learning_rate=1e-2))
    stats = trainer.train_round(examples)
    after = modeling.get_adapter_state(model)
    assert stats.steps == 3 and stats.num_supervised_tokens == 3 * 2 * 10
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_smollm2_default_loads_offline(fedmed_cache):
    pytest.importorskip("gguf")
    path = modeling.resolve_model("smollm2-135m")
    tok = modeling.load_tokenizer(path)
    model = modeling.load_base_model(path, quantize="none", device="cpu")
    assert model.config.num_hidden_layers == 30
    ids = tok("The patient denies chest pain.", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert torch.isfinite(logits).all()
