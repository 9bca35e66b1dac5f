"""RobustAggregator (flare/aggregators.py) driven directly with FLModels: the robust rules
run on the screened updates x_k - x_global and the result is added back to the global."""

import pytest
import torch
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from fedmed_components.federation import aggregation, robust_aggregation
from fedmed_components.federation.update_validation import update_norm
from fedmed_components.flare.aggregators import RobustAggregator

LAYERS = ["base_model.model.model.layers.0.self_attn.q_proj", "base_model.model.model.layers.0.mlp.down_proj"]
SITES = [f"site-{i}" for i in range(1, 6)]


def adapter(seed: int, scale: float = 1.0) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in LAYERS:
        out[f"{layer}.lora_A.weight"] = torch.randn(4, 16, generator=g) * scale
        out[f"{layer}.lora_B.weight"] = torch.randn(24, 4, generator=g) * scale
    return out


def model(site: str, params: dict, tokens: int = 100, ptype=ParamsType.FULL) -> FLModel:
    meta = {"client_name": site, "num_supervised_tokens": tokens, "num_examples": 10, "val_loss": 1.0, "train_loss": 1.0}
    return FLModel(params=params, params_type=ptype, meta=meta)


def round_of(reference: dict, attack_factor: float = 3.0):
    """Five sites: four honest (global + a common step + noise), site-5 sends 3x its step."""
    step = adapter(100, scale=0.1)
    states = {}
    for i, site in enumerate(SITES):
        noise = adapter(200 + i, scale=0.03)
        states[site] = {k: reference[k] + step[k] + noise[k] for k in reference}
    states["site-5"] = {k: reference[k] + attack_factor * (v - reference[k]) for k, v in states["site-5"].items()}
    return states


def run(agg: RobustAggregator, reference: dict, states: dict, tokens: dict | None = None, rnd: int = 0) -> FLModel:
    agg.begin_round(reference, rnd)
    for site in reversed(SITES):  # arrival order must not matter
        assert agg.accept_model(model(site, states[site], (tokens or {}).get(site, 100)))
    return agg.aggregate_model()


def expected(reference: dict, states: dict, rule: str, weights=None, **options) -> dict:
    updates = [aggregation.adapter_difference(states[s], reference) for s in SITES]
    return robust_aggregation.state_from_update(reference, robust_aggregation.robust_aggregate(updates, rule, weights=weights, **options))


def assert_close(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for key in b:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0)


def test_median_runs_on_the_updates_and_gives_each_site_one_vote():
    reference = adapter(0)
    states = round_of(reference)
    tokens = {"site-1": 500, "site-5": 10_000}  # an inflated count buys the attacker nothing
    result = run(RobustAggregator(robust_rule="median"), reference, states, tokens)
    assert result.params_type == ParamsType.FULL
    assert_close(result.params, expected(reference, states, "median"))
    assert result.meta["weights"] == {s: 0.2 for s in SITES}
    report = result.meta["robust"]
    assert report["rule"] == "median" and report["sites"] == 5 and report["tolerated_attackers"] == 2
    assert report["update_norm"] == pytest.approx(update_norm(result.params, reference), rel=1e-5)
    # the plain token-weighted mean is pulled far further by site-5
    honest = aggregation.fed_medlora([states[s] for s in SITES[:4]], [1.0] * 4)
    plain = aggregation.fed_medlora([states[s] for s in SITES], [500, 100, 100, 100, 10_000])
    assert update_norm(result.params, honest) < 0.5 * update_norm(plain, honest)


def test_trimmed_mean_uses_trim_beta():
    reference = adapter(0)
    states = round_of(reference)
    result = run(RobustAggregator(robust_rule="trimmed_mean", trim_beta=0.2), reference, states)
    assert_close(result.params, expected(reference, states, "trimmed_mean", beta=0.2))
    assert result.meta["robust"]["trim_beta"] == 0.2 and result.meta["robust"]["tolerated_attackers"] == 1


def test_trimmed_mean_that_trims_nothing_warns():
    reference = adapter(0)
    agg = RobustAggregator(robust_rule="trimmed_mean", trim_beta=0.1)  # floor(0.5) = 0
    warnings = []
    agg.warning = warnings.append
    result = run(agg, reference, round_of(reference))
    assert result.meta["robust"]["tolerated_attackers"] == 0
    assert any("tolerates no attacker" in w for w in warnings)


def test_norm_bounded_clips_to_the_median_norm_and_keeps_the_weights():
    reference = adapter(0)
    states = round_of(reference, attack_factor=3.0)
    tokens = {"site-1": 300}
    result = run(RobustAggregator(robust_rule="norm_bounded"), reference, states, tokens)
    weights = [300, 100, 100, 100, 100]
    assert_close(result.params, expected(reference, states, "norm_bounded", weights=weights))
    assert result.meta["weights"]["site-1"] == pytest.approx(300 / 700)
    report = result.meta["robust"]
    # norm / clip of every site above the median norm: site-5 by about 3, honest ones barely
    assert 2.5 < report["clipped"].pop("site-5") < 3.5
    assert all(1 < ratio < 1.2 for ratio in report["clipped"].values())
    norms = sorted(update_norm(states[s], reference) for s in SITES)
    assert report["clip"] == pytest.approx(norms[2], rel=1e-6)


def test_norm_bounded_with_a_fixed_clip():
    reference = adapter(0)
    states = round_of(reference)
    result = run(RobustAggregator(robust_rule="norm_bounded", clip=0.5), reference, states)
    assert_close(result.params, expected(reference, states, "norm_bounded", weights=[1.0] * 5, clip=0.5))
    assert result.meta["robust"]["clip"] == 0.5


def test_screening_runs_before_the_robust_rule():
    reference = adapter(0, scale=0.1)
    states = round_of(reference)
    agg = RobustAggregator(robust_rule="median")
    agg.begin_round(reference, 2)
    for site in SITES[:4]:
        assert agg.accept_model(model(site, states[site]))
    bad = dict(states["site-5"])
    bad[next(iter(bad))] = torch.full((4, 16), float("nan"))
    assert not agg.accept_model(model("site-5", bad))
    assert agg.accept_model(model("site-6", {k: reference[k] + 100 * (v - reference[k]) for k, v in states["site-1"].items()}))
    result = agg.aggregate_model()
    assert result.meta["sites"] == SITES[:4]
    assert sorted(r["site"] for r in result.meta["rejected"]) == ["site-5", "site-6"]
    updates = [aggregation.adapter_difference(states[s], reference) for s in SITES[:4]]
    assert_close(result.params, robust_aggregation.state_from_update(reference, robust_aggregation.coordinate_median(updates)))


def test_diff_updates_are_taken_relative_to_the_global():
    reference = adapter(0)
    states = round_of(reference)
    agg = RobustAggregator(robust_rule="median")
    agg.begin_round(reference, 0)
    for site in SITES:
        assert agg.accept_model(model(site, aggregation.adapter_difference(states[site], reference), ptype=ParamsType.DIFF))
    assert_close(agg.aggregate_model().params, expected(reference, states, "median"))


def test_a_new_round_starts_clean():
    reference = adapter(0)
    agg = RobustAggregator(robust_rule="median")
    first = run(agg, reference, round_of(reference))
    second = run(agg, first.params, round_of(first.params), rnd=1)
    assert second.meta["sites"] == SITES and second.meta["rejected"] == []
    assert_close(second.params, expected(first.params, round_of(first.params), "median"))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"robust_rule": "krum"}, "unknown robust_rule"),
        ({"robust_rule": "trimmed_mean", "trim_beta": 0.5}, "trim_beta"),
        ({"robust_rule": "trimmed_mean", "trim_beta": -0.1}, "trim_beta"),
        ({"robust_rule": "norm_bounded", "clip": 0.0}, "clip"),
        ({"robust_rule": "norm_bounded", "clip": float("nan")}, "clip"),
    ],
)
def test_bad_options_fail_when_the_job_starts(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RobustAggregator(**kwargs)


def test_constructor_arguments_are_kept_by_name_for_flare_export():
    agg = RobustAggregator(robust_rule="trimmed_mean", trim_beta=0.3, clip=None, weighting="uniform", max_norm_ratio=5.0)
    assert (agg.robust_rule, agg.trim_beta, agg.clip, agg.weighting, agg.max_norm_ratio) == ("trimmed_mean", 0.3, None, "uniform", 5.0)
