"""Screening of site updates: every kind of poisoned update is caught, the rest aggregate.

A whole round goes through the FLARE aggregator, which calls ``validate_update`` on each
update as it arrives and ``norm_outliers`` once the round is complete."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from fedmed_components.federation.aggregation import fed_medlora
from fedmed_components.federation.update_validation import (
    Rejection,
    norm_outliers,
    update_norm,
    validate_update,
)
from fedmed_components.flare.aggregators import FedMedLoRAAggregator

PREFIX = "base_model.model.model.layers.{i}.self_attn.{m}"
SHAPES = {"q_proj": (16, 16), "v_proj": (16, 4)}  # (in, out)
RANK = 4


def reference_adapter() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    adapter = {}
    for i in range(2):
        for module, (n_in, n_out) in SHAPES.items():
            name = PREFIX.format(i=i, m=module)
            adapter[f"{name}.lora_A.weight"] = torch.randn(RANK, n_in, generator=gen) * 0.1
            adapter[f"{name}.lora_B.weight"] = torch.zeros(n_out, RANK)
    return adapter


def trained(reference, seed: int, scale: float = 0.01) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + seed)
    return {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in reference.items()}


A_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B_KEY = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"


def _nan(u):
    u[A_KEY][1, 2] = float("nan")
    return u


def _inf(u):
    u[B_KEY][0, 0] = float("-inf")
    return u


def _base_weight(u):
    u["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"] = torch.zeros(16, 16)
    return u


def _embeddings(u):
    u["model.embed_tokens.weight"] = torch.zeros(50, 16)
    return u


def _missing(u):
    del u[B_KEY]
    return u


def _wrong_shape(u):
    u[A_KEY] = torch.zeros(RANK, 17)
    return u


def _wrong_rank(u):
    u[A_KEY] = torch.zeros(RANK * 2, 16)
    return u


def _wrong_dtype(u):
    u[A_KEY] = u[A_KEY].to(torch.float16)
    return u


def _empty(u):
    return {}


def _not_a_tensor(u):
    u[A_KEY] = u[A_KEY].tolist()
    return u


def _unexpected_lora(u):
    u["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"] = torch.zeros(RANK, 16)
    return u


def _scaled_100x(u):
    return {k: 100 * v for k, v in u.items()}


def screen_round(updates: dict, reference: dict, *, round: int, weights: dict | None = None, max_norm_ratio: float = 10.0):
    """One round through the aggregator's screening: (valid updates by site, rejections, result)."""
    agg = FedMedLoRAAggregator(max_norm_ratio=max_norm_ratio)
    agg.begin_round(reference, round)
    for site, params in updates.items():
        meta = {"client_name": site, "num_supervised_tokens": (weights or {}).get(site, 1.0)}
        agg.accept_model(FLModel(params=params, params_type=ParamsType.FULL, meta=meta))
    result = agg.aggregate_model()
    return {site: updates[site] for site in agg.accepted_sites}, agg.rejections, result


POISONS = {
    "nan": (_nan, "NaN"),
    "inf": (_inf, "Inf"),
    "base-model weight": (_base_weight, "base_layer.weight"),
    "embedding weight": (_embeddings, "model.embed_tokens.weight"),
    "missing key": (_missing, "missing"),
    "wrong shape": (_wrong_shape, "shape"),
    "wrong rank": (_wrong_rank, "shape"),
    "wrong dtype": (_wrong_dtype, "dtype"),
    "empty payload": (_empty, "empty"),
    "not a tensor": (_not_a_tensor, "not a tensor"),
    "unexpected LoRA key": (_unexpected_lora, "unexpected"),
    "100x norm": (_scaled_100x, "norm"),
}


@pytest.mark.parametrize("kind", list(POISONS))
def test_poisoned_update_is_rejected_and_the_others_aggregate(kind, caplog):
    poison, reason_word = POISONS[kind]
    reference = reference_adapter()
    updates = {f"site-{i}": trained(reference, i) for i in range(4)}
    updates["site-bad"] = poison(trained(reference, 99))
    weights = [1.0, 2.0, 3.0, 4.0]
    with caplog.at_level(logging.WARNING):
        valid, rejections, aggregated = screen_round(
            updates, reference, round=3, weights={f"site-{i}": w for i, w in enumerate(weights)}, max_norm_ratio=10.0
        )
    assert [r.site for r in rejections] == ["site-bad"]
    assert rejections[0].round == 3
    assert reason_word in rejections[0].reason, rejections[0].reason
    assert sorted(valid) == [f"site-{i}" for i in range(4)]
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("fedmed_components.flare.aggregators")]
    assert len(messages) == 1 and "site-bad" in messages[0] and "round 3" in messages[0]

    result = fed_medlora([valid[f"site-{i}"] for i in range(4)], weights)
    assert all(torch.allclose(aggregated.params[k], result[k], atol=1e-7) for k in result)
    for key, value in result.items():
        expected = sum(w * updates[f"site-{i}"][key].double().numpy() for i, w in enumerate(weights)) / sum(weights)
        np.testing.assert_allclose(value.numpy(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", [k for k in POISONS if k != "100x norm"])
def test_validate_update_alone_catches_each_malformed_update(kind):
    poison, reason_word = POISONS[kind]
    reference = reference_adapter()
    rejection = validate_update(poison(trained(reference, 7)), reference, site="site-x", round=1)
    assert rejection is not None and reason_word in rejection.reason
    assert (rejection.site, rejection.round) == ("site-x", 1)
    assert validate_update(trained(reference, 7), reference, site="site-x", round=1) is None


def test_all_poisons_at_once():
    reference = reference_adapter()
    updates = {f"good-{i}": trained(reference, i) for i in range(3)}
    for i, (kind, (poison, _)) in enumerate(POISONS.items()):
        updates[f"bad-{kind}"] = poison(trained(reference, 50 + i))
    valid, rejections, _ = screen_round(updates, reference, round=0)
    assert sorted(valid) == ["good-0", "good-1", "good-2"]
    assert sorted(r.site for r in rejections) == sorted(f"bad-{k}" for k in POISONS)


def test_clean_update_passes_and_spec_reference_works():
    reference = reference_adapter()
    spec = {k: (tuple(v.shape), v.dtype) for k, v in reference.items()}
    assert validate_update(trained(reference, 1), reference, site="a") is None
    assert validate_update(trained(reference, 1), spec, site="a") is None
    string_spec = {k: (list(v.shape), "torch.float32") for k, v in reference.items()}
    assert validate_update(trained(reference, 1), string_spec, site="a") is None
    rejection = validate_update(_wrong_dtype(trained(reference, 1)), spec, site="a", round=2)
    assert isinstance(rejection, Rejection) and rejection.site == "a" and rejection.round == 2
    assert "dtype" in rejection.reason and A_KEY in rejection.reason
    assert "empty" in validate_update(None, spec, site="a").reason
    assert "not a dict" in validate_update([1, 2], spec, site="a").reason


def test_base_weight_is_rejected_even_if_the_reference_lists_it():
    reference = reference_adapter()
    key = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"
    reference[key] = torch.zeros(16, 16)
    update = trained(reference, 1)
    rejection = validate_update(update, reference, site="a")
    assert rejection is not None and key in rejection.reason


def test_declared_modules_to_save_head_is_allowed():
    reference = reference_adapter()
    reference["base_model.model.classifier.modules_to_save.weight"] = torch.zeros(5, 16)
    assert validate_update(trained(reference, 1), reference, site="a") is None
    rejection = validate_update(trained(reference, 1), reference_adapter(), site="a")
    assert rejection is not None and "modules_to_save" in rejection.reason


def test_rank_change_is_allowed_only_when_asked_and_consistent():
    reference = reference_adapter()
    bigger = {}
    for key, value in reference.items():
        if key.endswith("lora_A.weight"):
            bigger[key] = torch.randn(8, value.shape[1])
        else:
            bigger[key] = torch.randn(value.shape[0], 8)
    assert validate_update(bigger, reference, site="a") is not None
    assert validate_update(bigger, reference, site="a", allow_rank_change=True) is None
    bigger[A_KEY] = torch.randn(6, 16)
    rejection = validate_update(bigger, reference, site="a", allow_rank_change=True)
    assert rejection is not None and "rank" in rejection.reason
    wrong_in = dict(bigger, **{A_KEY: torch.randn(8, 15)})
    assert validate_update(wrong_in, reference, site="a", allow_rank_change=True) is not None


def test_update_norm_matches_numpy():
    reference = reference_adapter()
    update = trained(reference, 1)
    full = math.sqrt(sum(float(np.sum(v.double().numpy() ** 2)) for v in update.values()))
    delta = math.sqrt(sum(float(np.sum((update[k].double() - reference[k].double()).numpy() ** 2)) for k in update))
    assert update_norm(update) == pytest.approx(full, rel=1e-12)
    assert update_norm(update, reference) == pytest.approx(delta, rel=1e-12)


def test_norm_outliers():
    assert norm_outliers({"a": 1.0, "b": 100.0}).keys() == {"b"}
    assert norm_outliers({"a": 1.0, "b": 5.0}) == {}
    flagged = norm_outliers({"a": 1.0, "b": 1.2, "c": 0.9, "d": 50.0, "e": 1.1})
    assert flagged.keys() == {"d"} and "median" in flagged["d"]
    # two colluding scaled updates among five are still caught
    assert norm_outliers({"a": 1.0, "b": 1.1, "c": 0.9, "d": 40.0, "e": 45.0}).keys() == {"d", "e"}
    assert norm_outliers({"a": 1.0, "b": 1.1, "c": 0.001}) == {}
    assert norm_outliers({"a": 1.0, "b": 1.1, "c": 0.001}, flag_small=True).keys() == {"c"}
    assert norm_outliers({"a": float("nan"), "b": 1.0, "c": 1.0}).keys() == {"a"}
    assert norm_outliers({"a": 3.0}) == {}
    assert norm_outliers({"a": 1.0, "b": 11.0}, max_ratio=20).keys() == set()
    with pytest.raises(ValueError):
        norm_outliers({"a": 1.0}, max_ratio=1.0)
