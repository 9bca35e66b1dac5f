"""One warm-up + cosine across rounds, and AdamW's moments kept between rounds."""

import pytest
import torch

from fedmed_components.model.modeling import LoraSettings, attach_lora, load_base_model
from fedmed_components.model.training import LocalTrainer, TrainSettings, lr_lambda


def _examples(n=4, width=16):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 200, (width,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * 8 + ids[8:], "num_supervised_tokens": width - 8})
    return out


def _lrs(tiny_model_path, rounds, **settings):
    model = attach_lora(load_base_model(tiny_model_path, quantize="none", device="cpu"), LoraSettings(r=4, alpha=8))
    trainer = LocalTrainer(model, 0, TrainSettings(max_steps=5, batch_size=2, learning_rate=1e-3, warmup_ratio=0.1, **settings))
    seen = []
    for _ in range(rounds):
        trainer.train_round(_examples(), on_step=lambda step, loss, lr: seen.append(lr))
    return seen, trainer


def test_schedule_across_rounds_is_one_cosine_over_all_steps(tiny_model_path):
    seen, _ = _lrs(tiny_model_path, 3, schedule_rounds=3)
    # LambdaLR reports the lr after its step: the factor of the next step
    whole = lr_lambda(15, 0.1, "cosine")
    assert seen == pytest.approx([1e-3 * whole(i + 1) for i in range(15)])
    assert seen[-1] == pytest.approx(0.0, abs=1e-12) and max(seen[5:]) < max(seen[:5])  # decays once, to 0 at the end


def test_restarting_schedule_rewarms_every_round(tiny_model_path):
    seen, _ = _lrs(tiny_model_path, 2)
    assert seen[:5] == pytest.approx(seen[5:])


def test_rounds_done_picks_the_schedule_segment(tiny_model_path):
    """A federated site is told the round by the server (a restarted site resumes there)."""
    model = attach_lora(load_base_model(tiny_model_path, quantize="none", device="cpu"), LoraSettings(r=4, alpha=8))
    trainer = LocalTrainer(model, 0, TrainSettings(max_steps=5, batch_size=2, learning_rate=1e-3, warmup_ratio=0.1, schedule_rounds=3))
    trainer.rounds_done = 2
    seen = []
    trainer.train_round(_examples(), on_step=lambda step, loss, lr: seen.append(lr))
    whole = lr_lambda(15, 0.1, "cosine")
    assert seen == pytest.approx([1e-3 * whole(10 + i + 1) for i in range(5)])


def test_kept_optimizer_state_carries_adamw_moments(tiny_model_path):
    _, kept = _lrs(tiny_model_path, 2, keep_optimizer_state=True)
    _, fresh = _lrs(tiny_model_path, 2)
    p_kept = next(p for p in kept.model.parameters() if p.requires_grad)
    p_fresh = next(p for p in fresh.model.parameters() if p.requires_grad)
    assert int(kept._optimizer.state[p_kept]["step"]) == 10
    assert int(fresh._optimizer.state[p_fresh]["step"]) == 5
