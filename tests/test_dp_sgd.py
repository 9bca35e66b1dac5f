"""Record-level DP-SGD at a site: Opacus per-example gradients, per-record clipping and
noise, Poisson sampling, and an accountant that agrees with Google's dp-accounting."""

import math
import random

import pytest
import torch

from fedmed_components.federation import privacy
from fedmed_components.model.dp_sgd import (
    DPSGDSettings,
    gradients_by_record,
    noisy_clipped_gradient,
    parse_dp_sgd,
    poisson_sample,
    record_ids,
)
from fedmed_components.model.training import IGNORE_INDEX, LocalTrainer, TrainSettings, collate, per_example_loss


# ------------------------------------------------------------------------------ settings
def test_parse_dp_sgd_reads_every_field_and_defaults():
    assert parse_dp_sgd("") is None
    assert parse_dp_sgd("noise=1.1,clip=0.5") == DPSGDSettings(1.1, 0.5, 1e-5, "example")
    assert parse_dp_sgd(" noise=2 , clip=1, delta=1e-6, record=note") == DPSGDSettings(2.0, 1.0, 1e-6, "note")
    assert parse_dp_sgd("epsilon=8,clip=1") == DPSGDSettings(None, 1.0, 1e-5, "example", target_epsilon=8.0)


@pytest.mark.parametrize(
    "text,says",
    [
        ("noise=1", "needs clip= and one of noise= or epsilon="),
        ("clip=1", "one of noise= or epsilon="),
        ("noise=1,epsilon=3,clip=1", "one of noise= or epsilon="),
        ("epsilon=0,clip=1", "epsilon must be > 0"),
        ("noise=1,clip=1,eps=3", "needs"),
        ("noise=0,clip=1", "noise must be > 0"),
        ("noise=1,clip=-1", "clip must be > 0"),
        ("noise=1,clip=1,delta=2", "delta"),
        ("noise=1,clip=1,record=patient", "record"),
        ("noise=x,clip=1", "dp-sgd"),
        ("noise1,clip=1", "key=value"),
    ],
)
def test_bad_dp_sgd_settings_are_clear_errors(text, says):
    with pytest.raises(ValueError, match=says):
        parse_dp_sgd(text)


def test_records_are_examples_or_notes_and_poisson_sampling_has_the_rate():
    examples = [{"note": "a"}, {"note": "a"}, {"note": "b"}]
    assert record_ids(examples, "example") == [0, 1, 2]
    assert record_ids(examples, "note") == ["a", "a", "b"]
    with pytest.raises(ValueError, match="note id"):
        record_ids([{}], "note")
    rng = random.Random(0)
    sizes = [len(poisson_sample(1000, 0.05, rng)) for _ in range(200)]
    assert sum(sizes) / len(sizes) == pytest.approx(50, rel=0.05)
    assert len(set(sizes)) > 5  # the batch size varies: Poisson, not fixed-size sampling


# --------------------------------------------------------------------- clipping and noise
def _params(*shapes):
    return [torch.nn.Parameter(torch.zeros(s)) for s in shapes]


def test_clipped_gradient_equals_opacus_dp_optimizer_with_one_row_per_record():
    from opacus.optimizers import DPOptimizer

    gen = torch.Generator().manual_seed(1)
    rows = [[torch.randn(3, 4, generator=gen) * s, torch.randn(5, generator=gen) * s] for s in (0.1, 1.0, 7.0, 0.5)]
    ours = _params((3, 4), (5,))
    noisy_clipped_gradient(ours, rows, DPSGDSettings(1e-12, clip=1.0), expected_records=4.0)
    theirs = _params((3, 4), (5,))
    for i, p in enumerate(theirs):
        p.grad_sample = torch.stack([r[i] for r in rows])
    opt = DPOptimizer(torch.optim.SGD(theirs, lr=0.0), noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=4)
    opt.pre_step()
    for a, b in zip(ours, theirs):
        assert torch.allclose(a.grad, b.grad, atol=1e-6)


def test_a_note_is_clipped_as_one_record():
    params = _params((2,))
    params[0].grad_sample = torch.tensor([[3.0, 0.0], [0.0, 4.0], [0.3, 0.0]])  # rows 0, 1 are one note
    grouped = gradients_by_record(params, ["n1", "n1", "n2"])
    assert torch.equal(grouped["n1"][0], torch.tensor([3.0, 4.0]))
    norms = noisy_clipped_gradient(params, list(grouped.values()), DPSGDSettings(1e-12, clip=1.0), expected_records=2.0)
    assert norms == pytest.approx([5.0, 0.3])
    # the note (norm 5) is scaled to norm 1 as a whole: (0.6, 0.8); the short one is kept
    assert torch.allclose(params[0].grad, (torch.tensor([0.6, 0.8]) + torch.tensor([0.3, 0.0])) / 2.0, atol=1e-6)


def test_noise_std_is_sigma_clip_over_expected_records():
    params = _params((200, 200))
    noisy_clipped_gradient(params, [], DPSGDSettings(1.5, clip=0.4), expected_records=8.0, generator=torch.Generator().manual_seed(0))
    assert float(params[0].grad.std()) == pytest.approx(1.5 * 0.4 / 8.0, rel=0.02)


# ------------------------------------------------------------------------------ accountant
# Integer orders: there both compute the sampled Gaussian's RDP exactly; at fractional
# orders dp-accounting's series does not converge for sigma < 1 at q = 0.1 and it drops
# those orders (a looser epsilon), which is not a disagreement about the mechanism.
INTEGER_ORDERS = [2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64, 96, 128, 256]


@pytest.mark.parametrize("sigma", [0.8, 1.1, 2.0])
@pytest.mark.parametrize("rate", [0.004, 0.02, 0.1])
@pytest.mark.parametrize("steps", [50, 1000])
@pytest.mark.parametrize("delta", [1e-5, 1e-6])
def test_epsilon_agrees_with_google_dp_accounting_within_one_percent(sigma, rate, steps, delta):
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant as GoogleRdp

    ours = privacy.RdpAccountant(orders=INTEGER_ORDERS)
    ours.step(sigma, count=steps, sample_rate=rate)
    google = GoogleRdp(orders=INTEGER_ORDERS)
    google.compose(
        dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(sigma)), steps)
    )
    assert ours.epsilon(delta) == pytest.approx(google.get_epsilon(delta), rel=0.01)


@pytest.mark.parametrize("target,rate,steps", [(8.0, 0.004, 405), (3.0, 0.004, 405), (8.0, 0.05, 135), (3.0, 0.2, 20)])
def test_noise_for_an_epsilon_budget_spends_it_and_no_less_noise_would_do(target, rate, steps):
    sigma = privacy.noise_for_epsilon(target, 1e-5, rate, steps)
    spent = privacy.gaussian_epsilon(sigma, steps, 1e-5, sample_rate=rate)
    assert target - 0.011 <= spent <= target
    assert privacy.gaussian_epsilon(0.98 * sigma, steps, 1e-5, sample_rate=rate) > target
    assert privacy.noise_for_epsilon(target / 2, 1e-5, rate, steps) > sigma  # a tighter budget needs more noise
    with pytest.raises(ValueError, match="epsilon"):
        privacy.noise_for_epsilon(0, 1e-5, rate, steps)


# ------------------------------------------------------------------- the site's trainer
def _examples(n_notes=6, per_note=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for note in range(n_notes):
        for _ in range(per_note):
            ids = torch.randint(10, 1000, (14,), generator=gen).tolist()
            out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * 6 + ids[6:], "num_supervised_tokens": 8, "note": f"n{note}"})
    return out


def _lora(tiny_model_path):
    from fedmed_components.model.modeling import LoraSettings, attach_lora, load_base_model

    torch.manual_seed(0)
    return attach_lora(load_base_model(tiny_model_path, quantize="none", device="cpu"), LoraSettings(r=4, alpha=8))


def test_per_example_loss_is_each_rows_own_loss(tiny_model_path):
    from fedmed_components.model.training import supervised_loss

    model, examples = _lora(tiny_model_path), _examples(2, 2)
    losses, n = per_example_loss(model, collate(examples, 0))
    assert n == 4 * 8
    for row, ex in enumerate(examples):
        alone, _ = supervised_loss(model, collate([ex], 0))
        assert float(losses[row]) == pytest.approx(float(alone), rel=1e-5)


@pytest.mark.parametrize("record", ["example", "note"])
def test_dp_sgd_round_trains_every_lora_tensor_and_accounts_every_step(tiny_model_path, record):
    from fedmed_components.model.modeling import get_adapter_state

    model, examples = _lora(tiny_model_path), _examples()
    settings = TrainSettings(
        learning_rate=1e-2, batch_size=4, max_steps=5, warmup_ratio=0.0, dp_sgd=f"noise=1.0,clip=0.5,delta=1e-5,record={record}"
    )
    trainer = LocalTrainer(model, 0, settings, device="cpu")
    before = get_adapter_state(model)
    stats = trainer.train_round(examples)
    after = get_adapter_state(model)
    assert all(not torch.equal(before[k], after[k]) for k in before), "every LoRA tensor moves (noise reaches all)"
    rate = 4 / (len(examples) if record == "example" else 6)  # batch_size records of 18 examples in 6 notes
    assert stats.privacy["steps"] == 5 and stats.privacy["sample_rate"] == pytest.approx(rate)
    assert stats.privacy["epsilon"] == pytest.approx(privacy.gaussian_epsilon(1.0, 5, 1e-5, sample_rate=rate))
    again = trainer.train_round(examples)  # epsilon composes over rounds
    assert again.privacy["steps"] == 10 and again.privacy["epsilon"] > stats.privacy["epsilon"]
    assert math.isfinite(again.train_loss)


def test_an_epsilon_budget_is_spent_over_the_planned_rounds(tiny_model_path):
    settings = TrainSettings(batch_size=4, max_steps=5, dp_sgd="epsilon=4,clip=0.5")
    trainer = LocalTrainer(_lora(tiny_model_path), 0, settings, device="cpu")
    trainer.planned_rounds = 3
    examples = _examples()
    rate = 4 / len(examples)
    first = trainer.train_round(examples)
    assert first.privacy["target_epsilon"] == 4
    assert first.privacy["noise_multiplier"] == pytest.approx(privacy.noise_for_epsilon(4, 1e-5, rate, 15))
    assert first.privacy["epsilon"] < 3.0  # a third of the steps spend less than the budget
    for _ in range(2):
        last = trainer.train_round(examples)
    assert last.privacy["noise_multiplier"] == first.privacy["noise_multiplier"]  # chosen once
    assert last.privacy["steps"] == 15 and 3.98 <= last.privacy["epsilon"] <= 4.0


def test_a_restarted_site_counts_the_rounds_it_trained_before(tiny_model_path):
    settings = TrainSettings(batch_size=4, max_steps=3, dp_sgd="noise=1.0,clip=0.5")
    trainer = LocalTrainer(_lora(tiny_model_path), 0, settings, device="cpu")
    trainer.rounds_done = 2  # the server's round: rounds 0 and 1 were trained by the process that died
    stats = trainer.train_round(_examples())
    assert stats.privacy["steps"] == 9


def test_dp_sgd_refuses_what_it_cannot_make_private(tiny_model_path):
    model = _lora(tiny_model_path)
    with pytest.raises(ValueError, match="BERT"):
        LocalTrainer(model, 0, TrainSettings(dp_sgd="noise=1,clip=1"), device="cpu", loss_fn=lambda m, b: (0, 0))
    trainer = LocalTrainer(model, 0, TrainSettings(max_steps=1, prox_mu=0.1, dp_sgd="noise=1,clip=1"), device="cpu")
    with pytest.raises(ValueError, match="FedProx"):
        trainer.train_round(_examples(1, 1))
