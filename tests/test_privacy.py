"""The pure privacy core: clipping, Gaussian noise, the RDP accountant, int8 transfer."""

import math

import pytest
import torch

from fedmed_components.federation import privacy
from fedmed_components.federation.update_validation import update_norm

KEY = "base_model.model.model.layers.{}.self_attn.q_proj.lora_{}.weight"


def _adapter(n_layers=2, r=8, width=4096, fill=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i in range(n_layers):
        for part, shape in (("A", (r, width)), ("B", (width, r))):
            state[KEY.format(i, part)] = torch.full(shape, fill) if fill is not None else torch.randn(shape, generator=g)
    return state


# ------------------------------------------------------------------------ adapter-only
def test_adapter_only_violations_name_the_non_lora_keys():
    keys = [
        KEY.format(0, "A"),
        KEY.format(0, "B"),
        "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight",
        "model.embed_tokens.weight",
    ]
    assert privacy.adapter_only_violations(keys) == keys[2:]
    assert privacy.adapter_only_violations(keys[:2]) == []


# ------------------------------------------------------------------------- clip + noise
def test_clip_scales_a_large_update_to_the_clip_norm_and_keeps_a_small_one():
    update = _adapter(fill=0.01)
    norm = update_norm(update)
    clipped, before, factor = privacy.clip_update(update, max_norm=norm / 4)
    assert before == pytest.approx(norm)
    assert update_norm(clipped) <= norm / 4 * (1 + 1e-6)
    assert update_norm(clipped) == pytest.approx(norm / 4, rel=1e-6)
    same, _, factor = privacy.clip_update(update, max_norm=norm * 2)
    assert factor == 1.0 and all(torch.equal(same[k], update[k]) for k in update)


def test_noise_has_the_configured_std_on_a_large_adapter():
    sigma, clip = 0.8, 0.5
    update = _adapter(fill=0.0)  # 131k elements
    noisy, report = privacy.privatize_update(update, clip, sigma, torch.Generator().manual_seed(1))
    values = torch.cat([v.flatten() for v in noisy.values()]).double()
    assert report.noise_std == pytest.approx(sigma * clip)
    assert values.std().item() == pytest.approx(sigma * clip, rel=0.02)
    assert abs(values.mean().item()) < 0.01 * sigma * clip
    assert report.num_elements == values.numel() and not report.clipped


def test_privatized_update_is_clipped_update_plus_noise():
    sigma, clip = 0.5, 1.0
    update = _adapter(seed=3)  # norm ~ 360: clipped
    noisy, report = privacy.privatize_update(update, clip, sigma, torch.Generator().manual_seed(2))
    clipped, _, _ = privacy.clip_update(update, clip)
    noise = torch.cat([(noisy[k].double() - clipped[k].double()).flatten() for k in update])
    assert report.clipped and report.update_norm > clip
    assert update_norm(clipped) <= clip * (1 + 1e-6)
    assert noise.std().item() == pytest.approx(sigma * clip, rel=0.02)
    assert all(noisy[k].dtype == update[k].dtype and noisy[k].shape == update[k].shape for k in update)


def test_noise_keeps_bf16_dtype():
    update = {KEY.format(0, "A"): torch.zeros(8, 64, dtype=torch.bfloat16)}
    noisy, _ = privacy.privatize_update(update, 1.0, 1.0)
    assert noisy[KEY.format(0, "A")].dtype == torch.bfloat16


# ---------------------------------------------------------------------------- accountant
def _closed_form_mironov(sigma, rounds, delta):
    """Minimum over real orders of T*a/(2 s^2) + log(1/d)/(a-1), at a* = 1 + s*sqrt(2 log(1/d)/T)."""
    return rounds / (2 * sigma**2) + math.sqrt(2 * rounds * math.log(1 / delta)) / sigma


def _exact_gaussian_epsilon(sigma, rounds, delta):
    """Tight epsilon of T composed Gaussian mechanisms = one with mu = sqrt(T)/sigma
    (Balle & Wang 2018): delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)."""
    mu = math.sqrt(rounds) / sigma
    phi = lambda x: 0.5 * math.erfc(-x / math.sqrt(2))  # noqa: E731
    d = lambda e: phi(-e / mu + mu / 2) - math.exp(e) * phi(-e / mu - mu / 2)  # noqa: E731
    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if d(mid) > delta else (lo, mid)
    return hi


@pytest.mark.parametrize("sigma,rounds,delta", [(1.0, 1, 1e-5), (1.0, 3, 1e-5), (2.0, 10, 1e-6), (0.7, 2, 1e-3), (5.0, 50, 1e-5)])
def test_mironov_conversion_matches_the_closed_form(sigma, rounds, delta):
    eps = privacy.gaussian_epsilon(sigma, rounds, delta, conversion="mironov")
    assert eps == pytest.approx(_closed_form_mironov(sigma, rounds, delta), rel=1e-3)


def test_known_reference_value():
    # sigma=1, one release, delta=1e-5: 0.5 + sqrt(2 ln 1e5) = 5.2985 (Mironov's conversion)
    assert privacy.gaussian_epsilon(1.0, 1, 1e-5, conversion="mironov") == pytest.approx(5.2985, abs=1e-3)


@pytest.mark.parametrize("sigma,rounds,delta", [(1.0, 1, 1e-5), (1.0, 3, 1e-5), (2.0, 10, 1e-6), (0.7, 2, 1e-3)])
def test_improved_conversion_is_between_exact_and_mironov(sigma, rounds, delta):
    improved = privacy.gaussian_epsilon(sigma, rounds, delta)
    exact = _exact_gaussian_epsilon(sigma, rounds, delta)
    assert exact <= improved <= privacy.gaussian_epsilon(sigma, rounds, delta, conversion="mironov")
    assert improved < 1.5 * exact  # RDP is an upper bound, but not a loose one here


def test_epsilon_grows_with_rounds_and_shrinks_with_noise():
    by_rounds = [privacy.gaussian_epsilon(1.0, t, 1e-5) for t in range(1, 11)]
    assert all(a < b for a, b in zip(by_rounds, by_rounds[1:]))
    by_sigma = [privacy.gaussian_epsilon(s, 3, 1e-5) for s in (0.5, 0.8, 1.0, 2.0, 4.0, 8.0)]
    assert all(a > b for a, b in zip(by_sigma, by_sigma[1:]))
    assert privacy.gaussian_epsilon(0.0, 3, 1e-5) == math.inf
    assert privacy.gaussian_epsilon(1.0, 0, 1e-5) == 0.0


def test_accountant_composes_rounds():
    acc = privacy.RdpAccountant()
    assert acc.epsilon(1e-5) == 0.0
    seen = []
    for _ in range(3):
        acc.step(1.2)
        seen.append(acc.epsilon(1e-5))
    assert seen == sorted(seen)
    assert seen[-1] == pytest.approx(privacy.gaussian_epsilon(1.2, 3, 1e-5))


def test_bad_delta_is_an_error():
    with pytest.raises(ValueError):
        privacy.gaussian_epsilon(1.0, 1, 0.0)


# --------------------------------------------------------------------------------- int8
def test_int8_round_trip_error_is_at_most_half_a_step():
    state = _adapter(seed=4)
    quantized, scales = privacy.quantize_state(state)
    restored = privacy.dequantize_state(quantized, scales)
    for key, value in state.items():
        assert quantized[key].dtype == torch.int8
        step = value.abs().max().item() / 127
        assert scales[key][0] == pytest.approx(step)
        assert (restored[key] - value).abs().max().item() <= step / 2 + 1e-6
        assert restored[key].dtype == value.dtype


def test_int8_payload_is_about_a_quarter_of_fp32():
    state = _adapter(seed=5)
    quantized, scales = privacy.quantize_state(state)
    ratio = privacy.state_num_bytes(state) / privacy.state_num_bytes(quantized, scales)
    assert 3.99 < ratio <= 4.0


def test_int8_keeps_bf16_and_zeros_and_non_float_tensors():
    state = {"a.lora_A.weight": torch.randn(4, 8).to(torch.bfloat16), "b.lora_B.weight": torch.zeros(8, 4), "steps": torch.tensor([3])}
    quantized, scales = privacy.quantize_state(state)
    restored = privacy.dequantize_state(quantized, scales)
    assert restored["a.lora_A.weight"].dtype == torch.bfloat16
    assert torch.equal(restored["b.lora_B.weight"], state["b.lora_B.weight"])
    assert "steps" not in scales and torch.equal(restored["steps"], state["steps"])
