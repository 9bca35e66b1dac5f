"""Server optimisers (Reddi et al. 2021, Alg. 2, no bias correction) against hand arithmetic."""

from __future__ import annotations

import json
import math

import pytest
import torch
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.abstract.model import ModelLearnableKey, make_model_learnable
from safetensors.torch import load_file

from fedmed_components.federation import aggregation
from fedmed_components.federation.aggregation import adapter_difference, pseudo_gradient, server_optimizer_step
from fedmed_components.flare.aggregators import (
    FedMedLoRAAggregator,
    ServerOptimizerAggregator,
    ServerOptimizerPlusAggregator,
)
from fedmed_components.flare.persistor import SERVER_OPTIMIZER_FILE, AdapterPersistor
from fedmed_components.flare.wire import SERVER_OPTIMIZER_STATE

A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def one(value: float) -> dict[str, torch.Tensor]:
    return {A: torch.tensor([value])}


def value(state: dict, key: str = A) -> float:
    return float(state[key].item())


# ------------------------------------------------------------------ literal hand steps
def test_fedavgm_two_steps_by_hand():
    # m = 0.5*0 + 2 = 2, x = 1 + 0.4*2 = 1.8; then m = 0.5*2 - 1 = 0, x stays 1.8
    x1, s1 = server_optimizer_step(one(1.0), one(2.0), {}, "fedavgm", lr=0.4, beta1=0.5)
    assert value(x1) == pytest.approx(1.8) and value(s1, f"m/{A}") == pytest.approx(2.0)
    assert set(s1) == {f"m/{A}"}
    x2, s2 = server_optimizer_step(x1, one(-1.0), s1, "fedavgm", lr=0.4, beta1=0.5)
    assert value(x2) == pytest.approx(1.8) and value(s2, f"m/{A}") == pytest.approx(0.0)


def test_fedadam_two_steps_by_hand():
    kw = dict(lr=0.4, beta1=0.5, beta2=0.75, tau=2.0)
    # v starts at tau^2 = 4: v = 0.75*4 + 0.25*2^2 = 4, m = 0.5*2 = 1, x = 1 + 0.4*1/(2+2) = 1.1
    x1, s1 = server_optimizer_step(one(1.0), one(2.0), {}, "fedadam", **kw)
    assert value(s1, f"m/{A}") == pytest.approx(1.0) and value(s1, f"v/{A}") == pytest.approx(4.0)
    assert value(x1) == pytest.approx(1.1)
    # delta 0: m = 0.5, v = 0.75*4 = 3, x = 1.1 + 0.4*0.5/(sqrt(3)+2)
    x2, s2 = server_optimizer_step(x1, one(0.0), s1, "fedadam", **kw)
    assert value(s2, f"m/{A}") == pytest.approx(0.5) and value(s2, f"v/{A}") == pytest.approx(3.0)
    assert value(x2) == pytest.approx(1.1 + 0.2 / (math.sqrt(3) + 2))


@pytest.mark.parametrize(
    "delta2, v_adam, v_yogi",
    [
        (0.0, 0.75 * 4, 4 - 0.25 * 0 * 1),  # delta^2 < v: adam decays v, yogi barely moves it
        (4.0, 0.75 * 4 + 0.25 * 16, 4 + 0.25 * 16),  # delta^2 > v: yogi adds (1-b2) delta^2 to v itself
    ],
)
def test_fedyogi_differs_from_fedadam_where_the_sign_matters(delta2, v_adam, v_yogi):
    kw = dict(lr=0.4, beta1=0.5, beta2=0.75, tau=2.0)
    results = {}
    for rule in ("fedadam", "fedyogi"):
        x1, s1 = server_optimizer_step(one(1.0), one(2.0), {}, rule, **kw)
        # step 1: v = 4 for both (yogi: 4 - 0.25*4*sign(4 - 4) = 4)
        assert value(s1, f"v/{A}") == pytest.approx(4.0) and value(x1) == pytest.approx(1.1)
        results[rule] = server_optimizer_step(x1, one(delta2), s1, rule, **kw)
    m = 0.5 * 1.0 + 0.5 * delta2
    for rule, v in (("fedadam", v_adam), ("fedyogi", v_yogi)):
        x2, s2 = results[rule]
        assert value(s2, f"v/{A}") == pytest.approx(v)
        assert value(x2) == pytest.approx(1.1 + 0.4 * m / (math.sqrt(v) + 2.0))
    assert value(results["fedadam"][0]) != pytest.approx(value(results["fedyogi"][0]))


def test_moments_start_at_zero_and_tau_squared():
    # zero delta from an empty state: m stays 0, x stays put, v shows its start tau^2 = 0.01
    _, avgm = server_optimizer_step(one(3.0), one(0.0), {}, "fedavgm", lr=1.0)
    assert value(avgm, f"m/{A}") == 0.0
    x, adam = server_optimizer_step(one(3.0), one(0.0), {}, "fedadam", lr=1.0, beta2=0.5, tau=0.1)
    assert value(x) == 3.0 and value(adam, f"m/{A}") == 0.0
    assert value(adam, f"v/{A}") == pytest.approx(0.5 * 0.01)  # b2 * tau^2 + (1 - b2) * 0
    x, yogi = server_optimizer_step(one(3.0), one(0.0), {}, "fedyogi", lr=1.0, beta2=0.5, tau=0.1)
    assert value(x) == 3.0 and value(yogi, f"v/{A}") == pytest.approx(0.01)  # tau^2 - 0.5 * 0 * sign(.)


# ---------------------------------------------------- elementwise arithmetic, two steps
GLOBAL = {A: [[0.5, -1.0, 2.0], [0.0, 0.25, -0.75]], B: [[1.5], [-0.5]]}
DELTAS = [
    {A: [[0.1, -0.2, 0.003], [0.0, 1.0, -0.5]], B: [[0.02], [-0.3]]},
    {A: [[-0.05, -0.2, 0.4], [0.001, 0.0, 0.6]], B: [[0.0], [0.7]]},
]


def _scalar_steps(rule, lr, b1, b2, tau):
    """Two steps element by element in Python floats."""
    x = {k: [v for row in rows for v in row] for k, rows in GLOBAL.items()}
    m = {k: [0.0] * len(v) for k, v in x.items()}
    v = {k: [tau * tau] * len(vals) for k, vals in x.items()}
    for delta in DELTAS:
        for k in x:
            d = [e for row in delta[k] for e in row]
            for i, di in enumerate(d):
                if rule == "fedavgm":
                    m[k][i] = b1 * m[k][i] + di
                    x[k][i] = x[k][i] + lr * m[k][i]
                    continue
                m[k][i] = b1 * m[k][i] + (1 - b1) * di
                if rule == "fedadam":
                    v[k][i] = b2 * v[k][i] + (1 - b2) * di * di
                else:
                    gap = v[k][i] - di * di
                    sign = (gap > 0) - (gap < 0)
                    v[k][i] = v[k][i] - (1 - b2) * di * di * sign
                x[k][i] = x[k][i] + lr * m[k][i] / (math.sqrt(v[k][i]) + tau)
    return x, m, v


@pytest.mark.parametrize("rule", aggregation.SERVER_RULES)
def test_two_steps_match_elementwise_arithmetic(rule):
    hp = dict(lr=0.05, beta1=0.8, beta2=0.9, tau=0.01)
    x = {k: torch.tensor(v) for k, v in GLOBAL.items()}
    state = {}
    for delta in DELTAS:
        x, state = server_optimizer_step(x, {k: torch.tensor(v) for k, v in delta.items()}, state, rule, **hp)
    ex, em, ev = _scalar_steps(rule, hp["lr"], hp["beta1"], hp["beta2"], hp["tau"])
    for k in GLOBAL:
        assert x[k].flatten().tolist() == pytest.approx(ex[k], rel=1e-5, abs=1e-6)
        assert state[f"m/{k}"].flatten().tolist() == pytest.approx(em[k], rel=1e-5, abs=1e-7)
        if rule != "fedavgm":
            assert state[f"v/{k}"].flatten().tolist() == pytest.approx(ev[k], rel=1e-5, abs=1e-9)
    assert set(state) == {f"{p}/{k}" for k in GLOBAL for p in (("m",) if rule == "fedavgm" else ("m", "v"))}


def test_fedavgm_without_momentum_at_lr_one_is_fedavg():
    x = {A: torch.tensor([[1.0, 2.0]]), B: torch.tensor([[0.0], [4.0]])}
    sites = [
        {A: torch.tensor([[3.0, 2.0]]), B: torch.tensor([[1.0], [0.0]])},
        {A: torch.tensor([[0.0, 6.0]]), B: torch.tensor([[5.0], [8.0]])},
    ]
    delta = pseudo_gradient(x, sites, [3, 1])
    # 0.75 * site1 + 0.25 * site2 - x
    assert delta[A].flatten().tolist() == pytest.approx([0.75 * 3 + 0.25 * 0 - 1, 0.75 * 2 + 0.25 * 6 - 2])
    assert delta[B].flatten().tolist() == pytest.approx([0.75 * 1 + 0.25 * 5 - 0, 0.75 * 0 + 0.25 * 8 - 4])
    new, _ = server_optimizer_step(x, delta, {}, "fedavgm", lr=1.0, beta1=0.0)
    average = aggregation.fed_medlora(sites, [3, 1])
    assert all(torch.allclose(new[k], average[k]) for k in x)


# ------------------------------------------------------------ state, inputs, dtypes
@pytest.mark.parametrize("rule", aggregation.SERVER_RULES)
def test_second_step_from_a_saved_state_equals_running_both(rule, tmp_path):
    from safetensors.torch import load_file, save_file

    x0 = {k: torch.tensor(v) for k, v in GLOBAL.items()}
    d1, d2 = ({k: torch.tensor(v) for k, v in d.items()} for d in DELTAS)
    x1, s1 = server_optimizer_step(x0, d1, {}, rule, lr=0.1)
    x2, s2 = server_optimizer_step(x1, d2, s1, rule, lr=0.1)
    save_file(s1, str(tmp_path / "state.safetensors"))  # "m/<name>" keys are valid safetensors names
    resumed_x, resumed_s = server_optimizer_step(x1, d2, load_file(str(tmp_path / "state.safetensors")), rule, lr=0.1)
    assert all(torch.equal(resumed_x[k], x2[k]) for k in x2)
    assert resumed_s.keys() == s2.keys() and all(torch.equal(resumed_s[k], s2[k]) for k in s2)


def test_inputs_are_not_modified_and_dtypes_kept():
    x = {A: torch.tensor([[1.0, -2.0]], dtype=torch.bfloat16), B: torch.tensor([[0.5]], dtype=torch.float16)}
    delta = {A: torch.tensor([[0.5, 0.25]]), B: torch.tensor([[-1.0]])}
    _, state = server_optimizer_step(x, delta, {}, "fedadam", lr=0.1)
    copies = [{k: t.clone() for k, t in d.items()} for d in (x, delta, state)]
    new, new_state = server_optimizer_step(x, delta, state, "fedyogi", lr=0.1)
    for before, after in zip(copies, (x, delta, state)):
        assert all(torch.equal(before[k], after[k]) for k in before)
    assert new[A].dtype == torch.bfloat16 and new[B].dtype == torch.float16
    assert all(t.dtype == torch.float32 for t in new_state.values())
    assert not torch.equal(new[A], x[A])


def test_errors_name_the_problem():
    x, d = one(1.0), one(0.5)
    with pytest.raises(ValueError, match="fedavgm, fedadam, fedyogi"):
        server_optimizer_step(x, d, {}, "sgd", lr=0.1)
    with pytest.raises(ValueError, match="lora_B"):
        server_optimizer_step(x, {**d, B: torch.zeros(1)}, {}, "fedadam", lr=0.1)
    with pytest.raises(ValueError, match="lora_A"):
        server_optimizer_step({**x, B: torch.zeros(1)}, {B: torch.zeros(1)}, {}, "fedadam", lr=0.1)
    with pytest.raises(ValueError, match="shape"):
        server_optimizer_step(x, {A: torch.zeros(2)}, {}, "fedadam", lr=0.1)
    _, avgm_state = server_optimizer_step(x, d, {}, "fedavgm", lr=0.1)
    with pytest.raises(ValueError, match=f"missing \\['v/{A}'\\]"):
        server_optimizer_step(x, d, avgm_state, "fedadam", lr=0.1)
    with pytest.raises(ValueError, match="shape"):
        server_optimizer_step(x, d, {f"m/{A}": torch.zeros(3)}, "fedavgm", lr=0.1)
    for bad in (dict(lr=0.0), dict(lr=float("nan")), dict(lr=0.1, beta1=1.0), dict(lr=0.1, beta2=-0.1), dict(lr=0.1, tau=0.0)):
        with pytest.raises(ValueError):
            server_optimizer_step(x, d, {}, "fedadam", **bad)
    with pytest.raises(ValueError, match="different keys"):
        adapter_difference({A: torch.zeros(1)}, {B: torch.zeros(1)})


# --------------------------------------------------------------- the FLARE aggregator
def adapter(seed: int, scale: float = 0.1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {A: torch.randn(4, 16, generator=g) * scale, B: torch.randn(24, 4, generator=g) * scale}


def update(site: str, params: dict, **meta) -> FLModel:
    meta = {"client_name": site, "num_supervised_tokens": 100, "num_examples": 10, "val_loss": 1.0, **meta}
    return FLModel(params=params, params_type=ParamsType.FULL, meta=meta)


def run_round(agg, global_params, rnd, sites):
    agg.begin_round(global_params, rnd)
    for name, params, tokens in sites:
        assert agg.accept_model(update(name, params, num_supervised_tokens=tokens))
    return agg.aggregate_model()


def test_aggregator_steps_the_optimiser_over_rounds_and_exposes_its_state():
    hp = dict(rule="fedyogi", lr=0.05, beta1=0.9, beta2=0.99, tau=1e-3)
    agg = ServerOptimizerAggregator(**hp)
    x0 = adapter(0)
    rounds = [[("site-1", adapter(1), 300), ("site-2", adapter(2), 100)], [("site-1", adapter(3), 100), ("site-2", adapter(4), 100)]]
    x, state = x0, {}
    for rnd, sites in enumerate(rounds):
        result = run_round(agg, x, rnd, sites)
        delta = pseudo_gradient(x, [p for _, p, _ in sites], [t for _, _, t in sites])
        x, state = server_optimizer_step(x, delta, state, hp["rule"], hp["lr"], hp["beta1"], hp["beta2"], hp["tau"])
        assert all(torch.allclose(result.params[k], x[k], atol=1e-6) for k in x)
        assert result.meta["server_optimizer"]["rule"] == "fedyogi"
        assert result.meta["server_optimizer"]["step_norm"] > 0
    saved = agg.optimizer_state()
    assert saved.keys() == state.keys() and all(torch.allclose(saved[k], state[k]) for k in state)

    # a fresh aggregator given the saved state continues exactly where the first one is
    fresh = ServerOptimizerAggregator(**hp)
    fresh.load_optimizer_state(saved)
    third = [("site-1", adapter(5), 50), ("site-2", adapter(6), 150)]
    a = run_round(agg, x, 2, third).params
    b = run_round(fresh, x, 2, third).params
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_aggregating_a_round_twice_steps_once():
    agg = ServerOptimizerAggregator(rule="fedadam", lr=0.1)
    first = run_round(agg, adapter(0), 0, [("site-1", adapter(1), 100)]).params
    state = agg.optimizer_state()
    again = agg.aggregate_model().params
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert all(torch.equal(state[k], agg.optimizer_state()[k]) for k in state)


def test_fedavgm_at_lr_one_without_momentum_matches_the_fed_medlora_aggregator():
    sites = [("site-1", adapter(1), 300), ("site-2", adapter(2), 100)]
    plain = run_round(FedMedLoRAAggregator(), adapter(0), 0, sites).params
    stepped = run_round(ServerOptimizerAggregator(rule="fedavgm", lr=1.0, beta1=0.0), adapter(0), 0, sites).params
    assert all(torch.allclose(plain[k], stepped[k], atol=1e-6) for k in plain)


def test_plus_variant_uses_loss_weights_for_the_pseudo_gradient():
    agg = ServerOptimizerPlusAggregator(rule="fedadam", lr=0.01)
    x0, a, b = adapter(0), adapter(1), adapter(2)
    agg.begin_round(x0, 0)
    agg.accept_model(update("site-1", a))
    agg.accept_model(update("site-2", b))
    agg.set_losses({"site-1": 0.5, "site-2": 1.5})
    result = agg.aggregate_model()
    w1 = math.exp(0.5) / (math.exp(0.5) + math.exp(-0.5))
    assert result.meta["weights"]["site-1"] == pytest.approx(w1)
    expected, _ = server_optimizer_step(x0, pseudo_gradient(x0, [a, b], [w1, 1 - w1]), {}, "fedadam", 0.01)
    assert all(torch.allclose(result.params[k], expected[k], atol=1e-6) for k in expected)


def test_aggregator_rejects_bad_settings_at_construction():
    with pytest.raises(ValueError, match="fedavgm, fedadam, fedyogi"):
        ServerOptimizerAggregator(rule="adam")
    with pytest.raises(ValueError, match="lr"):
        ServerOptimizerPlusAggregator(lr=-1.0)


# ------------------------------------------------- the state survives a server restart
def _persistor(store):
    return AdapterPersistor(model="tiny", lora={"r": 4, "alpha": 8}, output_dir=str(store))


def _site_updates(x: dict, rnd: int) -> list:
    g = torch.Generator().manual_seed(100 + rnd)
    return [
        (site, {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in x.items()}, tokens)
        for site, tokens in (("site-1", 300), ("site-2", 100))
    ]


def _persisted_round(agg, persistor, x: dict, rnd: int) -> dict:
    """What the controller does with a round: aggregate, then persist the result and its meta."""
    result = run_round(agg, x, rnd, _site_updates(x, rnd))
    persistor.save_model(make_model_learnable(result.params, {**result.meta, "current_round": rnd}), FLContext())
    return result.params


@pytest.mark.parametrize("rule", aggregation.SERVER_RULES)
def test_a_restarted_server_steps_exactly_as_an_uninterrupted_one(tmp_path, tiny_model_path, rule):
    hp = dict(rule=rule, lr=0.05)
    # uninterrupted: rounds 0, 1, 2 with one aggregator
    store, uninterrupted = tmp_path / "uninterrupted", ServerOptimizerAggregator(**hp)
    x = _persistor(store).load_model(FLContext())[ModelLearnableKey.WEIGHTS]
    for rnd in range(3):
        x = _persisted_round(uninterrupted, _persistor(store), x, rnd)

    # interrupted after round 1: a new persistor and a new aggregator on the same store
    store, before_restart = tmp_path / "restarted", ServerOptimizerAggregator(**hp)
    y = _persistor(store).load_model(FLContext())[ModelLearnableKey.WEIGHTS]
    for rnd in range(2):
        y = _persisted_round(before_restart, _persistor(store), y, rnd)
    learnable = _persistor(store).load_model(FLContext())
    meta = learnable[ModelLearnableKey.META]
    assert meta["next_round"] == 2
    resumed = ServerOptimizerAggregator(**hp)
    assert f"{rule} state resumed" in resumed.resume_state(meta, 2)
    y = _persisted_round(resumed, _persistor(store), learnable[ModelLearnableKey.WEIGHTS], 2)

    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    expected_state = uninterrupted.optimizer_state()
    assert expected_state.keys() == resumed.optimizer_state().keys()
    assert all(torch.equal(expected_state[k], resumed.optimizer_state()[k]) for k in expected_state)
    # without the saved moments the step would differ: the test can tell
    start = learnable[ModelLearnableKey.WEIGHTS]
    from_zero = run_round(ServerOptimizerAggregator(**hp), start, 2, _site_updates(start, 2)).params
    assert not all(torch.equal(from_zero[k], y[k]) for k in y)

    # each round's folder (and global/) holds its moments; state.json holds none
    for folder in ("round_000", "round_001", "round_002", "global"):
        saved = load_file(str(store / folder / SERVER_OPTIMIZER_FILE))
        assert {k.split("/", 1)[0] for k in saved} == ({"m"} if rule == "fedavgm" else {"m", "v"})
    global_moments = load_file(str(store / "global" / SERVER_OPTIMIZER_FILE))
    assert all(torch.equal(global_moments[k], v) for k, v in resumed.optimizer_state().items())
    history = json.loads((store / "state.json").read_text())["history"]
    assert [h["server_optimizer"]["rule"] for h in history] == [rule] * 3
    assert all(SERVER_OPTIMIZER_STATE not in h for h in history)
    assert not [p.name for p in store.iterdir() if p.name.startswith(".")], "temp files left in the store"


def test_resuming_checks_the_saved_moments_fit_the_rule():
    avgm = ServerOptimizerAggregator(rule="fedavgm", lr=1.0)
    run_round(avgm, adapter(0), 0, [("site-1", adapter(1), 100)])
    meta = {SERVER_OPTIMIZER_STATE: avgm.optimizer_state()}
    with pytest.raises(ValueError, match="fedadam keeps \\['m', 'v'\\]"):
        ServerOptimizerAggregator(rule="fedadam").resume_state(meta, 1)
    # nothing saved (a round folder from before the optimiser): moments start at zero
    assert ServerOptimizerAggregator(rule="fedadam").resume_state({}, 1) is None
    # plain averaging keeps nothing and hands nothing to the persistor
    plain = FedMedLoRAAggregator()
    assert plain.resume_state(meta, 1) is None
    assert SERVER_OPTIMIZER_STATE not in run_round(plain, adapter(0), 0, [("site-1", adapter(1), 100)]).meta


def test_a_crash_while_writing_the_moments_resumes_from_the_round_before(tmp_path, tiny_model_path, monkeypatch):
    import fedmed_components.flare.persistor as persistor_module

    store, agg = tmp_path / "store", ServerOptimizerAggregator(rule="fedadam", lr=0.05)
    x = _persistor(store).load_model(FLContext())[ModelLearnableKey.WEIGHTS]
    x = _persisted_round(agg, _persistor(store), x, 0)
    moments_after_round0 = agg.optimizer_state()

    def power_cut(tensors, filename, metadata=None):
        open(filename, "wb").write(b"half a file")
        raise OSError("disk gone")

    monkeypatch.setattr(persistor_module, "save_file", power_cut)
    with pytest.raises(OSError):
        _persisted_round(agg, _persistor(store), x, 1)
    monkeypatch.undo()
    meta = _persistor(store).load_model(FLContext())[ModelLearnableKey.META]  # the restart also clears the temp file
    assert meta["next_round"] == 1
    resumed = ServerOptimizerAggregator(rule="fedadam", lr=0.05)
    resumed.resume_state(meta, 1)
    assert all(torch.equal(resumed.optimizer_state()[k], v) for k, v in moments_after_round0.items())
    assert not [p.name for p in store.iterdir() if p.name.startswith(".")]
