"""Aggregation rules against independent numpy computations on random adapters."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedmed_components.federation.aggregation import (
    WeightedAverager,
    combine_site_losses,
    exact_lora,
    fed_medlora,
    fed_medlora_plus_weights,
    fedsa_final,
    fedsa_global,
    fedsa_lora,
    site_weights,
)
from fedmed_components.federation.lora_keys import is_factor_weight, is_lora_A, is_lora_B, is_lora_key, layer_name, lora_partner

# (module path, in_features, out_features): a small Llama-like block, k/v narrower.
LAYERS = [
    ("base_model.model.model.layers.0.self_attn.q_proj", 24, 24),
    ("base_model.model.model.layers.0.self_attn.v_proj", 24, 8),
    ("base_model.model.model.layers.0.mlp.down_proj", 40, 24),
    ("base_model.model.model.layers.1.mlp.gate_proj", 24, 40),
]


def make_adapter(seed: int, rank: int = 4, layers=LAYERS, dtype=torch.float32) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    adapter = {}
    for name, n_in, n_out in layers:
        adapter[f"{name}.lora_A.weight"] = torch.from_numpy(rng.standard_normal((rank, n_in))).to(dtype)
        adapter[f"{name}.lora_B.weight"] = torch.from_numpy(rng.standard_normal((n_out, rank))).to(dtype)
    return adapter


def np_average(updates, weights) -> dict[str, np.ndarray]:
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    return {k: sum(wk * u[k].to(torch.float64).numpy() for wk, u in zip(w, updates)) for k in updates[0]}


def np_product_average(updates, weights, scalings=None) -> dict[str, np.ndarray]:
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    s = np.ones(len(updates)) if scalings is None else np.asarray(scalings, dtype=np.float64)
    out = {}
    for name, _, _ in LAYERS:
        out[name] = sum(
            wk * sk * (u[f"{name}.lora_B.weight"].double().numpy() @ u[f"{name}.lora_A.weight"].double().numpy())
            for wk, sk, u in zip(w, s, updates)
        )
    return out


def product(adapter, name) -> np.ndarray:
    return adapter[f"{name}.lora_B.weight"].double().numpy() @ adapter[f"{name}.lora_A.weight"].double().numpy()


WEIGHTS = [120.0, 35.0, 800.0, 7.0]


# ------------------------------------------------------------------------ Fed-MedLoRA
def test_fed_medlora_matches_numpy_weighted_average():
    updates = [make_adapter(seed) for seed in range(4)]
    result = fed_medlora(updates, WEIGHTS)
    expected = np_average(updates, WEIGHTS)
    assert result.keys() == expected.keys()
    for key, value in result.items():
        assert value.dtype == torch.float32
        np.testing.assert_allclose(value.numpy(), expected[key], rtol=1e-5, atol=1e-6)


def test_fed_medlora_averages_A_and_B_separately_not_the_product():
    updates = [make_adapter(seed) for seed in range(2)]
    result = fed_medlora(updates, [1, 1])
    name = LAYERS[0][0]
    separate = product(result, name)
    exact = np_product_average(updates, [1, 1])[name]
    assert not np.allclose(separate, exact)  # the known bias of separate averaging


def test_fed_medlora_keeps_input_dtype_and_accumulates_in_float32():
    updates = [make_adapter(seed, dtype=torch.bfloat16) for seed in range(3)]
    result = fed_medlora(updates, [1, 2, 3])
    expected = np_average(updates, [1, 2, 3])
    for key, value in result.items():
        assert value.dtype == torch.bfloat16
        np.testing.assert_allclose(value.double().numpy(), expected[key], rtol=1e-2, atol=1e-2)


def test_bf16_inputs_are_summed_in_float32_and_rounded_once():
    updates = [make_adapter(seed, dtype=torch.bfloat16) for seed in range(6)]
    weights = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0]
    result = fed_medlora(updates, weights)
    expected = np_average(updates, weights)
    for key, value in result.items():
        # one rounding to bf16 (8 significant bits) at the end, none on the way
        np.testing.assert_allclose(value.double().numpy(), expected[key], rtol=2**-8, atol=0)


def test_fed_medlora_float64_accumulation_option():
    updates = [make_adapter(seed, dtype=torch.float64) for seed in range(3)]
    result = fed_medlora(updates, [0.1, 0.2, 0.7], accumulate_dtype=torch.float64)
    expected = np_average(updates, [0.1, 0.2, 0.7])
    for key, value in result.items():
        assert value.dtype == torch.float64
        np.testing.assert_allclose(value.numpy(), expected[key], rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize(
    "weights",
    [[1.0, -1.0], [0.0, 0.0], [1.0, float("nan")], [1.0, float("inf")], [1.0], []],
)
def test_fed_medlora_rejects_bad_weights(weights):
    updates = [make_adapter(0), make_adapter(1)]
    with pytest.raises(ValueError):
        fed_medlora(updates, weights)


def test_fed_medlora_rejects_mismatched_updates():
    a, b = make_adapter(0), make_adapter(1)
    b.pop(next(iter(b)))
    with pytest.raises(ValueError, match="keys"):
        fed_medlora([a, b], [1, 1])
    with pytest.raises(ValueError, match="shape"):
        fed_medlora([make_adapter(0, rank=4), make_adapter(1, rank=2)], [1, 1])


def test_zero_weight_site_contributes_nothing():
    updates = [make_adapter(seed) for seed in range(3)]
    result = fed_medlora(updates, [2.0, 0.0, 1.0])
    expected = np_average([updates[0], updates[2]], [2.0, 1.0])
    for key, value in result.items():
        np.testing.assert_allclose(value.numpy(), expected[key], rtol=1e-5, atol=1e-6)


def test_site_weights_read_meta():
    metas = [{"num_supervised_tokens": 1200, "num_examples": 40}, {"num_supervised_tokens": 300, "num_examples": 60}]
    assert site_weights(metas) == [1200.0, 300.0]
    assert site_weights(metas, by="examples") == [40.0, 60.0]
    assert site_weights(metas, by="uniform") == [1.0, 1.0]
    assert site_weights([metas[0]]) == [1200.0]  # raw: usable one update at a time
    with pytest.raises(ValueError, match="num_supervised_tokens"):
        site_weights([{"num_examples": 3}])
    with pytest.raises(ValueError):
        site_weights([{"num_supervised_tokens": -5}])
    with pytest.raises(ValueError):
        site_weights([{"num_supervised_tokens": "many"}])
    with pytest.raises(ValueError):
        site_weights(metas, by="loss")


# ---------------------------------------------------------------------- Fed-MedLoRA+
def test_plus_weights_by_hand():
    # exp(1-0.5)=1.648721, exp(1-1)=1, exp(1-2)=0.367879; sum 3.016601
    assert fed_medlora_plus_weights([0.5, 1.0, 2.0]) == pytest.approx([0.546549, 0.331499, 0.121952], abs=1e-6)


def test_plus_equal_losses_is_uniform_averaging():
    weights = fed_medlora_plus_weights([0.8, 0.8, 0.8, 0.8])
    assert weights == pytest.approx([0.25] * 4, abs=1e-15)
    updates = [make_adapter(seed) for seed in range(4)]
    result = fed_medlora(updates, weights)
    expected = np_average(updates, [1, 1, 1, 1])
    for key, value in result.items():
        np.testing.assert_allclose(value.numpy(), expected[key], rtol=1e-5, atol=1e-6)


def test_plus_temperature():
    losses = [0.5, 1.0, 2.0]
    # softmax(-L/2): exp(-0.25), exp(-0.5), exp(-1) normalised
    assert fed_medlora_plus_weights(losses, temperature=2.0) == pytest.approx([0.444214, 0.345954, 0.209832], abs=1e-6)
    hot = fed_medlora_plus_weights(losses, temperature=1e6)
    assert hot == pytest.approx([1 / 3] * 3, abs=1e-6)
    cold = fed_medlora_plus_weights(losses, temperature=1e-3)
    assert cold[0] == pytest.approx(1.0) and cold[2] == 0.0
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError):
            fed_medlora_plus_weights(losses, temperature=bad)


def test_plus_sizes_multiply_and_renormalise():
    assert fed_medlora_plus_weights([1.0, 1.0, 1.0], sizes=[10, 30, 60]) == pytest.approx([0.1, 0.3, 0.6])
    base = fed_medlora_plus_weights([0.5, 1.0])
    sized = fed_medlora_plus_weights([0.5, 1.0], sizes=[1, 3])
    expected = np.array(base) * np.array([1, 3])
    assert sized == pytest.approx(list(expected / expected.sum()))
    with pytest.raises(ValueError):
        fed_medlora_plus_weights([0.5, 1.0], sizes=[1])
    with pytest.raises(ValueError):
        fed_medlora_plus_weights([0.5, 1.0], sizes=[1, -1])


def test_plus_non_finite_losses():
    weights = fed_medlora_plus_weights([1.0, float("nan"), 2.0, float("inf")])
    assert weights[1] == 0.0 and weights[3] == 0.0
    assert weights[0] + weights[2] == pytest.approx(1.0)
    assert weights[0] / weights[2] == pytest.approx(math.e)
    with pytest.raises(ValueError, match="finite"):
        fed_medlora_plus_weights([float("nan"), float("inf")])


def test_plus_is_numerically_stable_for_large_losses():
    weights = fed_medlora_plus_weights([1000.0, 1001.0])
    assert weights == pytest.approx([1 / (1 + math.exp(-1)), math.exp(-1) / (1 + math.exp(-1))])
    assert fed_medlora_plus_weights([-800.0, -799.0])[0] == pytest.approx(math.e / (1 + math.e))


def test_combine_site_losses():
    # rows: evaluating sites (val sizes 100, 300); columns: candidates
    matrix = [[1.0, 2.0, 4.0], [3.0, 2.0, float("nan")]]
    combined = combine_site_losses(matrix, [100, 300])
    assert combined[0] == pytest.approx((100 * 1.0 + 300 * 3.0) / 400)
    assert combined[1] == pytest.approx(2.0)
    assert combined[2] == pytest.approx(4.0)  # the failed score is skipped
    square = [[1.0, 5.0], [7.0, 2.0]]
    assert combine_site_losses(square, [1, 1], exclude_self=True) == [7.0, 5.0]
    assert math.isnan(combine_site_losses([[float("nan")]], [10])[0])
    with pytest.raises(ValueError):
        combine_site_losses([[1.0, 2.0], [1.0]], [1, 1])
    with pytest.raises(ValueError):
        combine_site_losses(matrix, [1])
    with pytest.raises(ValueError):
        combine_site_losses(matrix, [1, 1], exclude_self=True)


# ------------------------------------------------------------------------- FedSA-LoRA
def test_key_helpers():
    assert is_lora_A("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
    assert is_lora_A("x.q_proj.lora_A.default.weight")
    assert is_lora_A("model.embed_tokens.lora_embedding_A")
    assert not is_lora_A("x.q_proj.lora_B.weight")
    assert is_lora_B("x.q_proj.lora_B.weight") and is_lora_B("model.embed_tokens.lora_embedding_B")
    assert not is_lora_B("x.q_proj.base_layer.weight") and not is_lora_A("model.embed_tokens.weight")
    assert not is_lora_A("x.my_lora_A_thing.weight")
    assert is_lora_key("x.q_proj.lora_magnitude_vector.default") and not is_lora_key("x.q_proj.base_layer.weight")
    assert lora_partner("x.q_proj.lora_A.weight") == "x.q_proj.lora_B.weight"
    assert lora_partner("m.embed_tokens.lora_embedding_B") == "m.embed_tokens.lora_embedding_A"
    assert lora_partner("x.q_proj.base_layer.weight") is None
    assert layer_name("x.q_proj.lora_B.weight") == "x.q_proj" and layer_name("x.q_proj.weight") == "x.q_proj.weight"
    assert is_factor_weight("x.q_proj.lora_B.weight") and not is_factor_weight("x.q_proj.lora_B.bias")


def test_fedsa_lora_averages_only_A():
    updates = [make_adapter(seed) for seed in range(3)]
    result = fedsa_lora(updates, [5, 1, 2])
    expected = np_average(updates, [5, 1, 2])
    assert set(result) == {k for k in updates[0] if k.endswith("lora_A.weight")}
    for key, value in result.items():
        np.testing.assert_allclose(value.numpy(), expected[key], rtol=1e-5, atol=1e-6)
    final = fedsa_final(updates, [5, 1, 2])
    assert final.keys() == updates[0].keys()
    for key, value in final.items():
        np.testing.assert_allclose(value.numpy(), expected[key], rtol=1e-5, atol=1e-6)


def test_fedsa_lora_with_the_previous_global_keeps_its_B():
    updates = [make_adapter(seed) for seed in range(3)]
    previous = make_adapter(99)
    result = fedsa_lora(updates, [5, 1, 2], previous=previous)
    shared = fedsa_lora(updates, [5, 1, 2])
    assert result.keys() == previous.keys()
    for key, value in result.items():
        assert torch.equal(value, shared[key] if is_lora_A(key) else previous[key]), key
    # the same global from a whole-adapter average, as the streaming aggregator sums it
    from_full = fedsa_global(fed_medlora(updates, [5, 1, 2]), previous)
    assert from_full.keys() == result.keys()
    assert all(torch.equal(from_full[k], result[k]) for k in result)


# ------------------------------------------------------------------ streaming average
def test_weighted_averager_equals_fed_medlora_bit_for_bit():
    updates = [make_adapter(seed) for seed in range(4)]
    averager = WeightedAverager()
    for update, weight in zip(updates, WEIGHTS):
        averager.add(update, weight)
    assert averager.count == 4
    assert averager.total_weight == pytest.approx(sum(WEIGHTS))
    streamed = averager.result()
    batch = fed_medlora(updates, WEIGHTS)
    for key in batch:
        assert torch.equal(streamed[key], batch[key])
    expected = np_average(updates, WEIGHTS)
    for key in batch:
        np.testing.assert_allclose(streamed[key].numpy(), expected[key], rtol=1e-5, atol=1e-6)


def test_weighted_averager_keeps_no_reference_to_updates():
    updates = [make_adapter(seed) for seed in range(2)]
    averager = WeightedAverager()
    for update in updates:
        averager.add(update, 1.0)
    before = averager.result()
    for update in updates:
        for tensor in update.values():
            tensor.fill_(1e6)
    after = averager.result()
    for key in before:
        assert torch.equal(before[key], after[key])


def test_weighted_averager_reuses_its_buffers_across_rounds():
    round1 = [make_adapter(seed) for seed in range(3)]
    round2 = [make_adapter(seed) for seed in range(3, 5)]
    averager = WeightedAverager()
    for update, weight in zip(round1, [1.0, 2.0, 3.0]):
        averager.add(update, weight)
    first = averager.result()
    first_copy = {k: v.clone() for k, v in first.items()}
    buffers = {k: v.data_ptr() for k, v in averager._sums.items()}
    averager.reset()
    for update, weight in zip(round2, [5.0, 1.0]):
        averager.add(update, weight)
    assert {k: v.data_ptr() for k, v in averager._sums.items()} == buffers
    second = averager.result()
    fresh = fed_medlora(round2, [5.0, 1.0])
    for key in fresh:
        assert torch.equal(second[key], fresh[key])
        assert torch.equal(first[key], first_copy[key])  # results never alias the buffers
    averager.reset(release=True)
    assert averager._sums == {}
    averager.add(make_adapter(7, rank=2), 1.0)  # another shape after release or reset
    assert averager.result()[next(iter(averager.result()))].shape[0] == 2


def test_weighted_averager_prepared_ahead_sums_into_the_prepared_buffers():
    updates = [make_adapter(seed) for seed in range(3)]
    averager = WeightedAverager()
    averager.prepare(make_adapter(9))  # the global adapter: same names and shapes
    buffers = {k: v.data_ptr() for k, v in averager._sums.items()}
    for update, weight in zip(updates, WEIGHTS):
        averager.add(update, weight)
    assert {k: v.data_ptr() for k, v in averager._sums.items()} == buffers  # no allocation in the round
    batch = fed_medlora(updates, WEIGHTS[:3])
    for key, value in averager.result().items():
        assert torch.equal(value, batch[key])
    with pytest.raises(ValueError, match="before the first add"):
        averager.prepare(updates[0])
    averager.reset()
    averager.prepare(make_adapter(9, rank=2))  # another shape: new buffers
    averager.add(make_adapter(1, rank=2), 1.0)
    assert averager.result()[next(iter(averager.result()))].shape[0] == 2


def test_weighted_averager_bad_add_leaves_state_and_reset():
    updates = [make_adapter(seed) for seed in range(2)]
    averager = WeightedAverager()
    averager.add(updates[0], 2.0)
    snapshot = averager.result()
    with pytest.raises(ValueError):
        averager.add(make_adapter(5, rank=2), 1.0)
    with pytest.raises(ValueError):
        averager.add(updates[1], float("nan"))
    with pytest.raises(ValueError):
        averager.add({}, 1.0)
    assert averager.count == 1
    for key, value in averager.result().items():
        assert torch.equal(value, snapshot[key])
    averager.reset()
    assert averager.count == 0
    with pytest.raises(ValueError):
        averager.result()


# -------------------------------------------------------------------- exact aggregation
def ranked_updates(ranks, dtype=torch.float64):
    return [make_adapter(10 + i, rank=r, dtype=dtype) for i, r in enumerate(ranks)]


def test_exact_reproduces_product_average_when_rank_covers_all_sites():
    ranks, weights = [4, 8, 2], [3.0, 1.0, 2.0]
    updates = ranked_updates(ranks)
    adapter, report = exact_lora(updates, weights, rank=sum(ranks))
    expected = np_product_average(updates, weights)
    for name, _, _ in LAYERS:
        assert adapter[f"{name}.lora_A.weight"].shape[0] == 14
        assert adapter[f"{name}.lora_B.weight"].shape[1] == 14
        np.testing.assert_allclose(product(adapter, name), expected[name], rtol=1e-10, atol=1e-10)
        assert report["layers"][name]["residual"] < 1e-12
        assert report["layers"][name]["naive_residual"] is None  # ranks differ
    assert report["total_residual"] < 1e-12
    assert report["naive_total_residual"] is None


def test_exact_pads_to_requested_rank_beyond_sum_of_ranks():
    updates = ranked_updates([2, 3])
    adapter, report = exact_lora(updates, [1, 1], rank=9)
    expected = np_product_average(updates, [1, 1])
    name = LAYERS[1][0]  # out = 8 < 9: at most 5 non-zero directions
    assert adapter[f"{name}.lora_A.weight"].shape == (9, 24)
    assert torch.all(adapter[f"{name}.lora_A.weight"][5:] == 0)
    np.testing.assert_allclose(product(adapter, name), expected[name], rtol=1e-10, atol=1e-10)
    assert report["total_residual"] < 1e-12


def test_exact_truncation_is_the_best_rank_r_approximation():
    ranks, weights = [4, 8, 2], [3.0, 1.0, 2.0]
    updates = ranked_updates(ranks)
    adapter, report = exact_lora(updates, weights)  # default rank: the largest, 8
    expected = np_product_average(updates, weights)
    total_sq = total_res_sq = 0.0
    for name, _, _ in LAYERS:
        m = expected[name]
        u, s, vh = np.linalg.svd(m)
        best = (u[:, :8] * s[:8]) @ vh[:8]
        got = product(adapter, name)
        np.testing.assert_allclose(got, best, rtol=1e-8, atol=1e-9)
        residual = np.linalg.norm(m - got) / np.linalg.norm(m)
        assert report["layers"][name]["residual"] == pytest.approx(residual, rel=1e-8)
        assert residual == pytest.approx(np.sqrt((s[8:] ** 2).sum() / (s**2).sum()), rel=1e-8)
        total_sq += np.linalg.norm(m) ** 2
        total_res_sq += np.linalg.norm(m - got) ** 2
        # balanced split: B = U sqrt(S), A = sqrt(S) V^T
        b = adapter[f"{name}.lora_B.weight"].numpy()
        a = adapter[f"{name}.lora_A.weight"].numpy()
        np.testing.assert_allclose(np.linalg.norm(b, axis=0), np.linalg.norm(a, axis=1), rtol=1e-8)
    assert report["total_residual"] == pytest.approx(math.sqrt(total_res_sq / total_sq), rel=1e-8)


def test_exact_residual_is_at_most_naive_residual():
    weights = [3.0, 1.0, 2.0, 0.5]
    updates = ranked_updates([4, 4, 4, 4])
    adapter, report = exact_lora(updates, weights)
    naive = fed_medlora(updates, weights, accumulate_dtype=torch.float64)
    expected = np_product_average(updates, weights)
    for name, _, _ in LAYERS:
        layer = report["layers"][name]
        m = expected[name]
        naive_residual = np.linalg.norm(m - product(naive, name)) / np.linalg.norm(m)
        assert layer["naive_residual"] == pytest.approx(naive_residual, rel=1e-8)
        assert layer["residual"] <= layer["naive_residual"]
        assert layer["residual"] > 0  # rank 4 cannot hold a sum of four rank-4 products
    assert report["total_residual"] <= report["naive_total_residual"]


def test_exact_with_scalings():
    ranks = [4, 8]
    updates = ranked_updates(ranks)
    scalings = [64 / 4, 64 / 8]
    adapter, _ = exact_lora(updates, [1, 1], rank=12, scalings=scalings, target_scaling=64 / 12)
    expected = np_product_average(updates, [1, 1], scalings)
    for name, _, _ in LAYERS:
        np.testing.assert_allclose((64 / 12) * product(adapter, name), expected[name], rtol=1e-10, atol=1e-9)
    with pytest.raises(ValueError, match="target_scaling"):
        exact_lora(updates, [1, 1], scalings=scalings)


def test_exact_keeps_dtype_and_float32_inputs():
    updates = ranked_updates([4, 4, 2], dtype=torch.float32)
    adapter, report = exact_lora(updates, [1, 2, 3], rank=10)
    expected = np_product_average(updates, [1, 2, 3])
    for name, _, _ in LAYERS:
        assert adapter[f"{name}.lora_A.weight"].dtype == torch.float32
        np.testing.assert_allclose(product(adapter, name), expected[name], rtol=1e-4, atol=1e-4)


def test_exact_averages_non_factor_tensors_and_embeddings():
    layers = [("base_model.model.model.embed_tokens", 30, 12)]
    ups = []
    for seed in range(2):
        rng = np.random.default_rng(seed)
        ups.append(
            {
                "base_model.model.model.embed_tokens.lora_embedding_A": torch.from_numpy(rng.standard_normal((3, 30))),
                "base_model.model.model.embed_tokens.lora_embedding_B": torch.from_numpy(rng.standard_normal((12, 3))),
                "base_model.model.model.layers.0.q_proj.lora_magnitude_vector": torch.from_numpy(rng.standard_normal(12)),
            }
        )
    adapter, report = exact_lora(ups, [1, 3], rank=6)
    assert list(adapter) == list(ups[0])
    mag = "base_model.model.model.layers.0.q_proj.lora_magnitude_vector"
    np.testing.assert_allclose(adapter[mag].numpy(), 0.25 * ups[0][mag].numpy() + 0.75 * ups[1][mag].numpy(), rtol=1e-6)
    a, b = (adapter[f"{layers[0][0]}.lora_embedding_{x}"].numpy() for x in "AB")
    m = sum(
        w * u[f"{layers[0][0]}.lora_embedding_B"].numpy() @ u[f"{layers[0][0]}.lora_embedding_A"].numpy() for w, u in zip([0.25, 0.75], ups)
    )
    np.testing.assert_allclose(b @ a, m, rtol=1e-10, atol=1e-10)


def test_exact_rejects_unpaired_or_inconsistent_factors():
    update = make_adapter(0)
    update.pop(f"{LAYERS[0][0]}.lora_B.weight")
    with pytest.raises(ValueError, match="lora_B"):
        exact_lora([update], [1.0])
    bad = make_adapter(0)
    bad[f"{LAYERS[0][0]}.lora_B.weight"] = torch.zeros(24, 3)
    with pytest.raises(ValueError, match="rank"):
        exact_lora([bad], [1.0])
    with pytest.raises(ValueError):
        exact_lora([make_adapter(0)], [1.0], rank=0)


def test_exact_zero_update_has_zero_residual():
    zero = {k: torch.zeros_like(v) for k, v in make_adapter(0).items()}
    adapter, report = exact_lora([zero, zero], [1, 1])
    assert report["total_residual"] == 0.0
    assert all(torch.all(v == 0) for v in adapter.values())


# ----------------------------------------------------------------------- determinism
def test_same_inputs_give_bit_identical_outputs():
    updates = ranked_updates([4, 8, 2], dtype=torch.float32)
    weights = [0.3, 0.5, 0.2]
    first, first_report = exact_lora(updates, weights, rank=6)
    second, second_report = exact_lora([{k: v.clone() for k, v in u.items()} for u in updates], weights, rank=6)
    assert first_report == second_report
    for key in first:
        assert torch.equal(first[key], second[key])
    same_rank = [make_adapter(seed) for seed in range(3)]
    one = fed_medlora(same_rank, weights)
    two = fed_medlora([{k: v.clone() for k, v in u.items()} for u in same_rank], weights)
    for key in one:
        assert torch.equal(one[key], two[key])
