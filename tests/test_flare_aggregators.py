"""The FLARE aggregators, driven directly with FLModels (no FLARE runtime needed)."""

import math

import pytest
import torch
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from fedmed_components.federation import aggregation
from fedmed_components.federation.lora_keys import is_lora_A
from fedmed_components.flare.aggregators import (
    ExactLoRAAggregator,
    FedMedLoRAAggregator,
    FedMedLoRAPlusAggregator,
    FedSALoRAAggregator,
)

LAYERS = ["base_model.model.model.layers.0.self_attn.q_proj", "base_model.model.model.layers.0.mlp.down_proj"]


def adapter(seed: int, r: int = 4, scale: float = 1.0) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in LAYERS:
        out[f"{layer}.lora_A.weight"] = torch.randn(r, 16, generator=g) * scale
        out[f"{layer}.lora_B.weight"] = torch.randn(24, r, generator=g) * scale
    return out


def update(site: str, params: dict, **meta) -> FLModel:
    meta = {"client_name": site, "num_supervised_tokens": 100, "num_examples": 10, "val_loss": 1.0, **meta}
    return FLModel(params=params, params_type=ParamsType.FULL, meta=meta)


def test_fed_medlora_weights_by_supervised_tokens():
    agg = FedMedLoRAAggregator()
    reference = adapter(0)
    agg.begin_round(reference, 0)
    a, b = adapter(1), adapter(2)
    assert agg.accept_model(update("site-1", a, num_supervised_tokens=300))
    assert agg.accept_model(update("site-2", b, num_supervised_tokens=100))
    result = agg.aggregate_model()
    expected = aggregation.fed_medlora([a, b], [0.75, 0.25])
    assert all(torch.allclose(result.params[k], expected[k], atol=1e-6) for k in expected)
    assert result.meta["weights"] == {"site-1": 0.75, "site-2": 0.25}


@pytest.mark.parametrize(
    "poison, reason",
    [
        (lambda p: {**p, LAYERS[0] + ".lora_A.weight": torch.full_like(p[LAYERS[0] + ".lora_A.weight"], float("nan"))}, "nan"),
        (lambda p: {**p, "base_model.model.model.embed_tokens.weight": torch.zeros(10, 16)}, "lora"),
        (lambda p: {**p, LAYERS[0] + ".lora_A.weight": torch.zeros(5, 16)}, "shape"),
        (lambda p: {}, "empty"),
        (lambda p: {k: v * 1000 for k, v in p.items()}, "norm"),
    ],
)
def test_poisoned_update_rejected_and_others_aggregated(poison, reason):
    agg = FedMedLoRAAggregator(max_norm_ratio=10.0)
    reference = adapter(0, scale=0.01)
    agg.begin_round(reference, 3)
    good = [adapter(i, scale=0.01) for i in (1, 2, 3)]
    for i, params in enumerate(good):
        agg.accept_model(update(f"site-{i + 1}", params))
    agg.accept_model(update("site-bad", poison(adapter(9, scale=0.01))))
    result = agg.aggregate_model()
    assert result.meta["sites"] == ["site-1", "site-2", "site-3"]
    assert [r["site"] for r in result.meta["rejected"]] == ["site-bad"]
    assert reason in result.meta["rejected"][0]["reason"].lower()
    expected = aggregation.fed_medlora(good, [1, 1, 1])
    assert all(torch.allclose(result.params[k], expected[k], atol=1e-6) for k in expected)
    assert all(torch.isfinite(v).all() for v in result.params.values())


def test_fed_medlora_plus_uses_supplied_losses():
    agg = FedMedLoRAPlusAggregator()
    agg.begin_round(adapter(0), 0)
    a, b = adapter(1), adapter(2)
    agg.accept_model(update("site-1", a))
    agg.accept_model(update("site-2", b))
    agg.set_losses({"site-1": 0.5, "site-2": 1.5})
    result = agg.aggregate_model()
    w1 = math.exp(0.5) / (math.exp(0.5) + math.exp(-0.5))
    assert result.meta["weights"]["site-1"] == pytest.approx(w1)
    expected = aggregation.fed_medlora([a, b], [w1, 1 - w1])
    assert all(torch.allclose(result.params[k], expected[k], atol=1e-6) for k in expected)


def test_fed_medlora_plus_without_any_finite_loss_falls_back_to_uniform():
    agg = FedMedLoRAPlusAggregator()
    agg.begin_round(adapter(0), 0)
    agg.accept_model(update("site-1", adapter(1), val_loss=float("nan")))
    agg.accept_model(update("site-2", adapter(2), val_loss=float("nan")))
    result = agg.aggregate_model()
    assert result.meta["weights"] == {"site-1": 0.5, "site-2": 0.5}


def test_fedsa_shares_only_A_until_the_final_round():
    reference = adapter(0)
    agg = FedSALoRAAggregator(num_rounds=3)
    agg.begin_round(reference, 1)
    assert agg.outgoing_meta() == {"load": "lora_A"}
    a, b = adapter(1), adapter(2)
    agg.accept_model(update("site-1", a))
    agg.accept_model(update("site-2", b))
    mid = agg.aggregate_model().params
    avg = aggregation.fed_medlora([a, b], [1, 1])
    for k in mid:
        assert torch.allclose(mid[k], avg[k] if is_lora_A(k) else reference[k], atol=1e-6)
    pure = aggregation.fedsa_lora([a, b], [1, 1], previous=reference)  # the rule the aggregator applies
    assert mid.keys() == pure.keys() and all(torch.allclose(mid[k], pure[k], atol=1e-6) for k in pure)
    agg.begin_round(reference, 2)
    agg.accept_model(update("site-1", a))
    agg.accept_model(update("site-2", b))
    final = agg.aggregate_model().params
    assert all(torch.allclose(final[k], avg[k], atol=1e-6) for k in avg)


def test_exact_aggregator_combines_mixed_ranks_keeping_scaled_products():
    alpha = 8.0
    agg = ExactLoRAAggregator(rank=4, alpha=alpha)
    agg.begin_round(adapter(0, r=4), 0)
    low, high = adapter(1, r=2), adapter(2, r=4)
    agg.accept_model(update("site-1", low))
    agg.accept_model(update("site-2", high))
    result = agg.aggregate_model().params
    for layer in LAYERS:
        a_key, b_key = f"{layer}.lora_A.weight", f"{layer}.lora_B.weight"
        target = 0.5 * (alpha / 2) * low[b_key] @ low[a_key] + 0.5 * (alpha / 4) * high[b_key] @ high[a_key]
        got = (alpha / 4) * result[b_key] @ result[a_key]
        assert result[a_key].shape == (4, 16)
        # rank-4 projection of a rank<=6 matrix: best approximation, residual below the target's norm
        assert torch.linalg.matrix_norm(got - target) < torch.linalg.matrix_norm(target)


@pytest.mark.parametrize("aggregator", [FedMedLoRAAggregator, FedMedLoRAPlusAggregator, ExactLoRAAggregator])
def test_prompt_settings_the_sites_agree_on_travel_with_the_global_adapter(aggregator):
    # predict reads them from the adapter's meta: a packed or paper-style federation
    # must not be prompted in the defaults
    agg = aggregator()
    agg.begin_round(adapter(0), 0)
    for site in ("site-1", "site-2"):
        agg.accept_model(update(site, adapter(1), prompt_style="paper", ner_sentences=2))
    meta = agg.aggregate_model().meta
    assert (meta["prompt_style"], meta["ner_sentences"]) == ("paper", 2)


def test_prompt_settings_sites_disagree_on_are_left_out():
    agg = FedMedLoRAAggregator()
    agg.begin_round(adapter(0), 0)
    agg.accept_model(update("site-1", adapter(1), prompt_style="paper", ner_sentences=2))
    agg.accept_model(update("site-2", adapter(2), prompt_style="compact", ner_sentences=2))
    meta = agg.aggregate_model().meta
    assert "prompt_style" not in meta and meta["ner_sentences"] == 2
