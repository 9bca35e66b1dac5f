"""Robust aggregation rules: hand-made cases, then attacks that pass today's screening."""

from __future__ import annotations

import logging

import pytest
import torch

from fedmed_components.federation.aggregation import adapter_difference, fed_medlora
from fedmed_components.federation.robust_aggregation import (
    ROBUST_RULES,
    coordinate_median,
    norm_bounded_mean,
    robust_aggregate,
    state_from_update,
    tolerated_attackers,
    trimmed_mean,
)
from fedmed_components.federation.update_validation import norm_outliers, update_norm

A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def t(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def assert_close(result: dict, expected: dict, atol: float = 1e-6) -> None:
    assert result.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(result[key], value, atol=atol, rtol=0)


# ----------------------------------------------------------------- coordinate median
def test_median_odd_number_of_sites_per_coordinate():
    updates = [
        {A: t(1.0, 5.0, -2.0), B: t([0.0, 1.0], [2.0, 3.0])},
        {A: t(3.0, 0.0, 4.0), B: t([9.0, -1.0], [2.5, 0.0])},
        {A: t(2.0, 9.0, 1.0), B: t([4.0, 7.0], [-8.0, 1.0])},
    ]
    assert_close(coordinate_median(updates), {A: t(2.0, 5.0, 1.0), B: t([4.0, 1.0], [2.0, 1.0])})


def test_median_even_number_of_sites_is_the_mean_of_the_two_middle_values():
    updates = [{A: t(1.0, -4.0)}, {A: t(10.0, 0.0)}, {A: t(2.0, 6.0)}, {A: t(3.0, -1.0)}]
    # sorted: (1, 2, 3, 10) -> (2 + 3) / 2; (-4, -1, 0, 6) -> (-1 + 0) / 2
    assert_close(coordinate_median(updates), {A: t(2.5, -0.5)})
    assert_close(coordinate_median(updates[:2]), {A: t(5.5, -2.0)})  # two sites: their mean


def test_median_of_one_site_is_that_site_and_keeps_the_dtype():
    update = {A: torch.tensor([1.5, -2.25], dtype=torch.bfloat16)}
    result = coordinate_median([update])
    assert result[A].dtype == torch.bfloat16
    assert torch.equal(result[A], update[A])


# ---------------------------------------------------------------------- trimmed mean
def test_trimmed_mean_drops_the_extremes_per_coordinate():
    updates = [{A: t(v, w)} for v, w in [(1.0, -50.0), (2.0, 0.0), (3.0, 1.0), (4.0, 2.0), (100.0, 3.0)]]
    # beta = 0.2, K = 5: one value dropped at each end, per coordinate
    assert_close(trimmed_mean(updates, 0.2), {A: t(3.0, 1.0)})  # (2+3+4)/3, (0+1+2)/3
    assert_close(trimmed_mean(updates, 0.0), {A: t(22.0, -8.8)})  # the plain mean
    assert_close(trimmed_mean(updates, 0.4), {A: t(3.0, 1.0)})  # two dropped at each end: the median


def test_trimmed_mean_floor_of_beta_times_k():
    updates = [{A: t(v)} for v in (0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 60.0, 70.0, 80.0)]
    # K = 10, floor(0.29 * 10) = 2: drop 0, 1 and 70, 80 -> mean(2, 3, 4, 5, 6, 60) = 80 / 6
    assert_close(trimmed_mean(updates, 0.29), {A: t(80.0 / 6)})
    # 0.29 * 100 is 28.999999999999996 in floats; the rule trims floor(29) = 29 per end:
    # mean(i^2 for i in 29..70) = 2597.1666..., not mean(28..71) = 2611.5
    squares = [{A: torch.tensor([float(i * i)], dtype=torch.float64)} for i in range(100)]
    assert trimmed_mean(squares, 0.29)[A].item() == pytest.approx(2597.1666666666665, abs=1e-9)


@pytest.mark.parametrize("beta", [-0.1, 0.5, 0.7, float("nan"), float("inf")])
def test_trimmed_mean_rejects_beta_outside_zero_half(beta):
    with pytest.raises(ValueError, match="beta"):
        trimmed_mean([{A: t(1.0)}, {A: t(2.0)}], beta)


def test_trimmed_mean_warns_when_nothing_is_trimmed(caplog):
    updates = [{A: t(float(v))} for v in range(5)]
    with caplog.at_level(logging.WARNING, logger="fedmed.aggregation"):
        result = trimmed_mean(updates, 0.1)  # floor(0.5) = 0
    assert_close(result, {A: t(2.0)})
    assert any("trims nothing" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- norm-bounded mean
NORM_UPDATES = [
    {A: t(3.0), B: t(4.0)},  # norm 5 (over both tensors)
    {A: t(1.0), B: t(0.0)},  # norm 1
    {A: t(0.0), B: t(2.0)},  # norm 2
]


def test_norm_bounded_default_clip_is_the_median_norm():
    # clip = median(5, 1, 2) = 2: site 0 scaled by 2/5 to (1.2, 1.6), the others untouched
    assert_close(norm_bounded_mean(NORM_UPDATES), {A: t(2.2 / 3), B: t(3.6 / 3)})


def test_norm_bounded_with_weights_and_explicit_clip():
    # weights (2, 1, 1) -> (0.5, 0.25, 0.25): A = 0.5*1.2 + 0.25*1 + 0 ; B = 0.5*1.6 + 0 + 0.25*2
    assert_close(norm_bounded_mean(NORM_UPDATES, weights=[2, 1, 1]), {A: t(0.85), B: t(1.3)})
    # clip = 1: (0.6, 0.8), (1, 0), (0, 1)
    assert_close(norm_bounded_mean(NORM_UPDATES, clip=1.0), {A: t(1.6 / 3), B: t(1.8 / 3)})
    # a clip above every norm: the plain weighted mean
    assert_close(norm_bounded_mean(NORM_UPDATES, weights=[2, 1, 1], clip=100.0), fed_medlora(NORM_UPDATES, [2, 1, 1]))


def test_norm_bounded_zero_median_gives_zero_and_bad_arguments_raise():
    updates = [{A: t(0.0, 0.0)}, {A: t(0.0, 0.0)}, {A: t(3.0, 4.0)}]
    assert_close(norm_bounded_mean(updates), {A: t(0.0, 0.0)})
    for clip in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="clip"):
            norm_bounded_mean(updates, clip=clip)
    with pytest.raises(ValueError, match="2 weights for 3 updates"):
        norm_bounded_mean(updates, weights=[1, 1])
    with pytest.raises(ValueError, match="negative"):
        norm_bounded_mean(updates, weights=[1, -1, 1])


# ------------------------------------------------------------------------ dispatcher
def test_dispatcher_runs_each_rule():
    updates = [{A: t(v, -v)} for v in (1.0, 2.0, 4.0, 8.0, 100.0)]
    assert_close(robust_aggregate(updates, "median"), {A: t(4.0, -4.0)})
    assert_close(robust_aggregate(updates, "trimmed_mean", beta=0.2), {A: t(14 / 3, -14 / 3)})
    assert_close(robust_aggregate(updates, "norm_bounded", weights=[1] * 5, clip=1.0), norm_bounded_mean(updates, clip=1.0))
    assert ROBUST_RULES == ("median", "trimmed_mean", "norm_bounded")


def test_dispatcher_rejects_unknown_rules_and_options():
    updates = [{A: t(1.0)}, {A: t(2.0)}]
    with pytest.raises(ValueError, match="'median', 'trimmed_mean', 'norm_bounded'"):
        robust_aggregate(updates, "krum")
    with pytest.raises(ValueError, match="beta"):
        robust_aggregate(updates, "median", beta=0.1)
    with pytest.raises(ValueError, match="needs beta"):
        robust_aggregate(updates, "trimmed_mean")
    with pytest.raises(ValueError, match="3 weights for 2 updates"):
        robust_aggregate(updates, "median", weights=[1, 1, 1])


@pytest.mark.parametrize("rule, options", [("median", {}), ("trimmed_mean", {"beta": 0.2}), ("norm_bounded", {})])
@pytest.mark.parametrize(
    "bad, message",
    [
        ({A: t(1.0, 2.0)}, rf"update 2: missing tensor '{B}'"),
        ({A: t(1.0, 2.0), B: t(0.0), "extra.lora_A.weight": t(0.0)}, "update 2: unexpected tensor 'extra.lora_A.weight'"),
        ({A: t(1.0, 2.0, 3.0), B: t(0.0)}, rf"update 2: '{A}' has shape \[3\], update 0 has \[2\]"),
        ({A: t(1.0, float("nan")), B: t(0.0)}, rf"update 2: '{A}' has non-finite values"),
        ({A: torch.tensor([1, 2]), B: t(0.0)}, rf"update 2: '{A}' is not a floating-point tensor"),
    ],
)
def test_mismatched_updates_name_the_site_and_the_key(rule, options, bad, message):
    good = {A: t(1.0, 2.0), B: t(0.0)}
    with pytest.raises(ValueError, match=message):
        robust_aggregate([good, dict(good), bad], rule, **options)


def test_no_updates_is_an_error():
    with pytest.raises(ValueError, match="no updates"):
        coordinate_median([])


# ------------------------------------------------------------ states <-> updates
def test_updates_from_adapter_difference_and_back():
    """The rules take ``aggregation.adapter_difference(x_k, x_global)``; ``state_from_update`` inverts it."""
    global_state = {A: torch.tensor([1.0, 2.0], dtype=torch.bfloat16), B: t(0.5)}
    states = [
        {A: torch.tensor([1.5, 2.0], dtype=torch.bfloat16), B: t(1.5)},
        {A: torch.tensor([0.0, 4.0], dtype=torch.bfloat16), B: t(0.0)},
    ]
    updates = [adapter_difference(state, global_state) for state in states]
    assert updates[0][A].dtype == torch.float32  # small differences are not rounded to bf16
    assert_close(updates[0], {A: t(0.5, 0.0), B: t(1.0)})
    assert_close(updates[1], {A: t(-1.0, 2.0), B: t(-0.5)})
    back = state_from_update(global_state, updates[1])
    assert back[A].dtype == torch.bfloat16 and torch.equal(back[A], states[1][A]) and torch.equal(back[B], states[1][B])
    with pytest.raises(ValueError, match="update: missing tensor"):
        state_from_update(global_state, {A: updates[0][A]})


def test_coordinate_rules_commute_with_the_global_shift():
    """median(x_k) = x_g + median(x_k - x_g), same for the trimmed mean (not for norm bounding)."""
    gen = torch.Generator().manual_seed(3)
    global_state = {A: torch.randn(4, 6, generator=gen)}
    states = [{A: global_state[A] + 0.1 * torch.randn(4, 6, generator=gen)} for _ in range(6)]
    updates = [adapter_difference(state, global_state) for state in states]
    for rule, options in [("median", {}), ("trimmed_mean", {"beta": 0.2})]:
        on_states = robust_aggregate(states, rule, **options)
        on_updates = state_from_update(global_state, robust_aggregate(updates, rule, **options))
        assert_close(on_states, on_updates, atol=1e-6)


def test_tolerated_attackers_is_each_rules_breakdown_point():
    assert [tolerated_attackers("median", k) for k in (1, 2, 3, 4, 5, 6, 7)] == [0, 0, 1, 1, 2, 2, 3]
    assert tolerated_attackers("trimmed_mean", 5, beta=0.2) == 1
    assert tolerated_attackers("trimmed_mean", 7, beta=0.3) == 2
    assert tolerated_attackers("trimmed_mean", 100, beta=0.29) == 29  # float error tolerated
    assert tolerated_attackers("trimmed_mean", 4, beta=0.2) == 0
    assert tolerated_attackers("norm_bounded", 5) is None
    with pytest.raises(ValueError, match="needs beta"):
        tolerated_attackers("trimmed_mean", 5)
    with pytest.raises(ValueError, match="unknown robust rule"):
        tolerated_attackers("krum", 5)


# ------------------------------------------------------------------------------ attacks
LAYERS = ["base_model.model.model.layers.0.self_attn.q_proj", "base_model.model.model.layers.0.mlp.down_proj"]
SHAPES = {}
for _layer in LAYERS:
    SHAPES[f"{_layer}.lora_A.weight"] = (4, 16)
    SHAPES[f"{_layer}.lora_B.weight"] = (24, 4)


def _scaled(update: dict, factor: float) -> dict:
    return {k: v * factor for k, v in update.items()}


def _random_at_norm(gen: torch.Generator, norm: float) -> dict:
    v = {k: torch.randn(shape, generator=gen, dtype=torch.float64) for k, shape in SHAPES.items()}
    return _scaled(v, norm / update_norm(v))


def _honest_round():
    """5 honest updates: one common direction of norm 1 plus site noise of norm 0.5."""
    gen = torch.Generator().manual_seed(18)
    direction = _random_at_norm(gen, 1.0)
    honest = []
    for _ in range(5):
        noise = _random_at_norm(gen, 0.5)
        honest.append({k: (direction[k] + noise[k]).float() for k in SHAPES})
    return gen, honest


def _attacks():
    gen, honest = _honest_round()
    honest_mean = fed_medlora(honest, [1.0] * 5)
    return (
        honest,
        honest_mean,
        {
            "scaled_x3": [_scaled(honest[0], 3.0)],
            "sign_flip": [_scaled(honest[0], -1.0)],
            "random_direction": [{k: v.float() for k, v in _random_at_norm(gen, update_norm(honest[0])).items()}],
            "two_colluding": [_scaled(honest_mean, -2.0)] * 2,  # the same crafted update from two sites
        },
    )


HONEST, HONEST_MEAN, ATTACKS = _attacks()
HONEST_NORM = update_norm(HONEST_MEAN)  # about 1.03
# (rule, options, bound on |robust - honest mean| / |honest mean|) per attack; the plain
# mean must be pulled farther than the robust rule *and* beyond its floor below.
SINGLE = 0.2
COLLUDING = 0.35
EXPECTED = {
    "scaled_x3": ([("median", {}, SINGLE), ("trimmed_mean", {"beta": 0.3}, SINGLE), ("norm_bounded", {}, 0.1)], 0.35),
    "sign_flip": ([("median", {}, SINGLE), ("trimmed_mean", {"beta": 0.3}, SINGLE)], 0.3),
    "random_direction": ([("median", {}, SINGLE), ("trimmed_mean", {"beta": 0.3}, SINGLE)], 0.24),
    "two_colluding": ([("median", {}, COLLUDING), ("trimmed_mean", {"beta": 0.3}, COLLUDING)], 0.8),
}


def _distance(aggregate: dict) -> float:
    """|aggregate - honest-only mean| relative to |honest-only mean| (L2 over all tensors)."""
    return update_norm(aggregate, HONEST_MEAN) / HONEST_NORM


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_attack_passes_todays_screening(attack):
    updates = HONEST + ATTACKS[attack]
    assert norm_outliers({f"site-{i}": update_norm(u) for i, u in enumerate(updates)}, max_ratio=10.0) == {}


@pytest.mark.parametrize("attack", list(EXPECTED))
def test_robust_rules_stay_near_the_honest_mean_under_attack(attack):
    updates = HONEST + ATTACKS[attack]
    rules, plain_floor = EXPECTED[attack]
    plain = _distance(fed_medlora(updates, [1.0] * len(updates)))
    assert plain > plain_floor
    for rule, options, bound in rules:
        robust = _distance(robust_aggregate(updates, rule, weights=[1.0] * len(updates), **options))
        assert robust < bound, (rule, robust)
        assert robust < plain, (rule, robust, plain)


@pytest.mark.parametrize("attack", ["sign_flip", "random_direction"])
def test_norm_bounding_does_not_stop_a_direction_attack_at_the_honest_norm(attack):
    """The documented limit: an update with an honest norm is not clipped, so it pulls as hard."""
    updates = HONEST + ATTACKS[attack]
    plain = _distance(fed_medlora(updates, [1.0] * len(updates)))
    bounded = _distance(norm_bounded_mean(updates))
    assert abs(bounded - plain) < 0.02


def test_without_attack_the_robust_rules_cost_some_accuracy():
    """Honest sites only: the price of robustness (median noisiest, norm bounding nearly free)."""
    median = _distance(coordinate_median(HONEST))
    trimmed = _distance(trimmed_mean(HONEST, 0.3))
    bounded = _distance(norm_bounded_mean(HONEST))
    assert bounded < 0.02 < trimmed < median < SINGLE
