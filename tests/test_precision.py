"""bf16 autocast: close to fp32, gradients everywhere, LoRA weights and optimiser in fp32."""

import pytest
import torch

from fedmed_components.model import precision
from fedmed_components.model.modeling import LoraSettings, attach_lora, load_base_model
from fedmed_components.model.training import LocalTrainer, TrainSettings, supervised_loss


def _batch(vocab: int, rows: int = 4, width: int = 48):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (rows, width), generator=g)
    labels = ids.clone()
    labels[:, : width // 2] = -100  # the prompt half carries no loss
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def test_auto_picks_bf16_only_with_native_support(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert precision.resolve_precision("auto", "cpu") == "fp32"
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert precision.resolve_precision("auto", "cpu") == "bf16"
    assert precision.resolve_precision("fp32", "cpu") == "fp32"
    with pytest.raises(ValueError, match="precision"):
        precision.resolve_precision("fp16", "cpu")


def test_bf16_loss_is_close_to_fp32_and_every_lora_tensor_gets_a_gradient(tiny_model_path):
    torch.manual_seed(0)
    model = attach_lora(load_base_model(tiny_model_path, quantize="none", device="cpu"), LoraSettings(r=4, alpha=8))
    for name, p in model.named_parameters():  # B starts at 0: make the adapter non-trivial
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    batch = _batch(model.config.vocab_size)
    losses, grads = {}, {}
    for mode in ("fp32", "bf16"):
        model.zero_grad(set_to_none=True)
        with precision.autocast(mode, "cpu"):
            loss, _ = supervised_loss(model, batch)
        loss.backward()
        losses[mode] = float(loss)
        grads[mode] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.02)
    lora = [n for n in grads["bf16"] if "lora_" in n]
    assert lora and all(grads["bf16"][n] is not None and grads["bf16"][n].abs().sum() > 0 for n in lora)
    assert all(grads["bf16"][n].dtype == torch.float32 for n in lora)
    cos = torch.nn.functional.cosine_similarity(
        torch.cat([grads["fp32"][n].flatten() for n in lora]), torch.cat([grads["bf16"][n].flatten() for n in lora]), dim=0
    )
    assert cos > 0.95


def test_bf16_training_keeps_lora_weights_and_adamw_state_in_fp32(tiny_model_path):
    model = attach_lora(load_base_model(tiny_model_path, quantize="none", device="cpu"), LoraSettings(r=4, alpha=8))
    trainer = LocalTrainer(model, 0, TrainSettings(max_steps=2, batch_size=2, precision="bf16", keep_optimizer_state=True))
    assert trainer.precision == "bf16"
    batch = _batch(model.config.vocab_size, rows=2)
    example = {"input_ids": batch["input_ids"][0].tolist(), "labels": batch["labels"][0].tolist(), "num_supervised_tokens": 24}
    stats = trainer.train_round([example, dict(example)])
    assert stats.steps == 2 and stats.train_loss == stats.train_loss  # finite, not NaN
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in trainable)
    state = trainer._optimizer.state[trainable[0]]
    assert state["exp_avg"].dtype == torch.float32 and state["exp_avg_sq"].dtype == torch.float32
