"""Site privacy filters on real FLARE Shareables, called as FLARE's filter chain calls them."""

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from nvflare.apis.fl_constant import FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.utils.fl_model_utils import FLModelUtils

from fedmed_components.flare.filters import (
    DP_META_KEY,
    INT8_META_KEY,
    AdapterOnlyGuard,
    GaussianDP,
    Int8Dequantizer,
    Int8Quantizer,
    RememberGlobalAdapter,
)

LAYER = "base_model.model.model.layers.{}.self_attn.q_proj"
POLICY = Path(__file__).resolve().parents[1] / "poc_setup" / "privacy.json"


def _ctx(task="train", task_id="task-1"):
    ctx = FLContext()
    ctx.set_prop(FLContextKey.TASK_NAME, task, private=True, sticky=False)
    ctx.set_prop(FLContextKey.TASK_ID, task_id, private=True, sticky=False)
    return ctx


def _adapter(width=64, r=4, layers=1, fill=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(layers):
        for part, shape in (("A", (r, width)), ("B", (width, r))):
            key = f"{LAYER.format(i)}.lora_{part}.weight"
            out[key] = torch.full(shape, fill) if fill is not None else torch.randn(shape, generator=g)
    return out


def _result(params, meta=None, params_type=ParamsType.FULL):
    return FLModelUtils.to_shareable(FLModel(params=params, params_type=params_type, meta=dict(meta or {"num_supervised_tokens": 10})))


def _params(shareable):
    return FLModelUtils.from_shareable(shareable).params


# --------------------------------------------------------------------------------- guard
def test_guard_stops_a_result_with_a_base_model_weight(caplog):
    base_key = f"{LAYER.format(0)}.base_layer.weight"
    result = _result({**_adapter(), base_key: torch.zeros(64, 64)})
    with caplog.at_level(logging.ERROR):
        out = AdapterOnlyGuard().process(result, _ctx())
    assert out.get_return_code() == ReturnCode.EXECUTION_EXCEPTION
    assert "DXO" not in out  # nothing of the payload goes out
    assert base_key in caplog.text


def test_guard_passes_a_lora_only_result_unchanged():
    params = _adapter()
    result = _result(params)
    out = AdapterOnlyGuard().process(result, _ctx())
    assert out is result
    assert out.get_return_code() == ReturnCode.OK
    assert all(torch.equal(_params(out)[k], params[k]) for k in params)


def test_guard_finds_a_tensor_hidden_in_the_metadata(caplog):
    result = _result(_adapter(), meta={"extra": {"model.embed_tokens.weight": torch.zeros(10, 8)}})
    with caplog.at_level(logging.ERROR):
        out = AdapterOnlyGuard().process(result, _ctx())
    assert out.get_return_code() == ReturnCode.EXECUTION_EXCEPTION
    assert "model.embed_tokens.weight" in caplog.text


def test_guard_passes_metrics_only_results():
    result = FLModelUtils.to_shareable(FLModel(metrics={"val_loss": 1.0}, meta={"losses": [1.0, 2.0]}))
    assert AdapterOnlyGuard().process(result, _ctx("score_candidates")) is result


# ------------------------------------------------------------------------------------ DP
def test_dp_changes_the_adapter_by_the_configured_noise_scale():
    sigma, clip = 0.5, 2.0
    global_adapter = _adapter(width=2048, r=16, layers=2, seed=1)  # 131k values
    update = {k: torch.full_like(v, 1e-4) for k, v in global_adapter.items()}  # norm 0.036 < clip
    ctx = _ctx(task_id="round-0")
    RememberGlobalAdapter().process(_result(global_adapter), ctx)
    trained = {k: global_adapter[k] + update[k] for k in global_adapter}
    dp = GaussianDP(noise_multiplier=sigma, clip_norm=clip, delta=1e-5, num_rounds=3, seed=0)
    out = dp.process(_result(trained), ctx)
    sent = _params(out)
    noise = torch.cat([(sent[k] - trained[k]).flatten() for k in trained]).double()
    assert noise.std().item() == pytest.approx(sigma * clip, rel=0.02)
    assert abs(noise.mean().item()) < 0.01
    report = FLModelUtils.from_shareable(out).meta[DP_META_KEY]
    assert report["releases"] == 1 and report["epsilon"] > 0 and not report["clipped"]
    assert FLModelUtils.from_shareable(out).meta["num_supervised_tokens"] == 10


def test_dp_clips_a_large_update_before_adding_noise():
    global_adapter = _adapter(width=1024, r=8, seed=2)
    ctx = _ctx(task_id="round-1")
    RememberGlobalAdapter().process(_result(global_adapter), ctx)
    trained = {k: v + 5.0 for k, v in global_adapter.items()}  # norm ~ 640
    out = GaussianDP(noise_multiplier=1e-6, clip_norm=1.0, seed=0).process(_result(trained), ctx)
    sent = _params(out)
    change = torch.cat([(sent[k] - global_adapter[k]).flatten() for k in sent]).double()
    assert change.norm().item() == pytest.approx(1.0, rel=1e-3)
    assert FLModelUtils.from_shareable(out).meta[DP_META_KEY]["clipped"]


def test_dp_accounts_epsilon_over_rounds():
    dp = GaussianDP(noise_multiplier=1.0, clip_norm=1.0, seed=0)
    epsilons = []
    for rnd in range(3):
        ctx = _ctx(task_id=f"r{rnd}")
        g = _adapter(seed=rnd)
        RememberGlobalAdapter().process(_result(g), ctx)
        out = dp.process(_result({k: v + 0.1 for k, v in g.items()}), ctx)
        epsilons.append(FLModelUtils.from_shareable(out).meta[DP_META_KEY]["epsilon"])
    assert epsilons[0] < epsilons[1] < epsilons[2]


def test_dp_on_a_difference_needs_no_remembered_adapter():
    diff = _adapter(width=1024, r=8, fill=0.0)
    out = GaussianDP(noise_multiplier=1.0, clip_norm=0.1, seed=0).process(_result(diff, params_type=ParamsType.DIFF), _ctx(task_id="d"))
    noise = torch.cat([v.flatten() for v in _params(out).values()]).double()
    assert noise.std().item() == pytest.approx(0.1, rel=0.05)


def test_dp_without_the_received_adapter_stops_the_result():
    out = GaussianDP().process(_result(_adapter()), _ctx(task_id="never-seen"))
    assert out.get_return_code() == ReturnCode.EXECUTION_EXCEPTION


@pytest.mark.parametrize("dp_enabled", [True, False])
def test_the_received_adapter_is_kept_only_when_the_scope_has_dp_on(dp_enabled):
    from nvflare.private.privacy_manager import Scope

    from fedmed_components.flare import filters

    scope = Scope()
    scope.add_task_result_filter(GaussianDP(enabled=dp_enabled), "out")
    ctx = _ctx(task_id=f"scoped-{dp_enabled}")
    ctx.set_prop(FLContextKey.SCOPE_OBJECT, scope, private=True, sticky=False)
    RememberGlobalAdapter().process(_result(_adapter()), ctx)
    kept = filters.take_received(ctx.get_job_id(), f"scoped-{dp_enabled}")
    assert (kept is not None) == dp_enabled


def test_dp_switched_off_or_other_task_passes_unchanged():
    result = _result(_adapter())
    assert GaussianDP(enabled=False).process(result, _ctx()) is result
    assert GaussianDP().process(result, _ctx("validate")) is result


# ---------------------------------------------------------------------------------- int8
def test_int8_quantizer_at_the_site_and_dequantizer_at_the_server(caplog):
    params = _adapter(width=512, r=8, seed=3)
    with caplog.at_level(logging.INFO):
        wire = Int8Quantizer().process(_result(params), _ctx())
    ratio = float(re.search(r"\(([0-9.]+)x, [0-9.]+ MB saved\)", caplog.text).group(1))
    assert 3.9 <= ratio <= 4.0  # bytes saved are logged
    on_wire = _params(wire)
    assert all(v.dtype == torch.int8 for v in on_wire.values())
    assert INT8_META_KEY in FLModelUtils.from_shareable(wire).meta
    restored = Int8Dequantizer().process(wire, FLContext())
    back = _params(restored)
    for key, value in params.items():
        assert back[key].dtype == value.dtype
        assert (back[key] - value).abs().max().item() <= value.abs().max().item() / 254 + 1e-6
    assert INT8_META_KEY not in FLModelUtils.from_shareable(restored).meta


def test_dequantizer_leaves_full_precision_results_alone():
    result = _result(_adapter())
    assert Int8Dequantizer().process(result, FLContext()) is result


# --------------------------------------------------------------------------- the policy
def test_shipped_policy_builds_with_flare(tmp_path):
    """poc_setup/privacy.json as FLARE loads it, at a site and at the server."""
    from nvflare.apis.workspace import Workspace
    from nvflare.private.fed.app.fl_conf import create_privacy_manager

    for sub in ("local", "startup"):
        (tmp_path / sub).mkdir()
    (tmp_path / "local" / "privacy.json").write_text(POLICY.read_text())
    workspace = Workspace(str(tmp_path), "hospital-a")
    policy = json.loads(POLICY.read_text())
    assert policy["default_scope"] == "clinical"
    for is_server in (False, True):
        manager = create_privacy_manager(workspace, names_only=False, is_server=is_server)
        scope = manager.get_scope("clinical")
        # what a site applies (results out) and what the server applies (results in)
        assert [type(f).__name__ for f in scope.task_result_filters["out"]] == ["AdapterOnlyGuard", "GaussianDP", "Int8Quantizer"]
        assert [type(f).__name__ for f in scope.task_result_filters["in"]] == ["Int8Dequantizer"]
        assert [type(f).__name__ for f in scope.task_data_filters["in"]] == ["RememberGlobalAdapter"]
        assert manager.get_scope(None).name == "clinical"
        dp = manager.get_scope("clinical_dp").task_result_filters["out"][1]
        assert dp.enabled and not scope.task_result_filters["out"][1].enabled
