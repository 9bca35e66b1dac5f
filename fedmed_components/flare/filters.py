"""Site privacy filters: FLARE ``Filter`` classes over ``fedmed_components.federation.privacy``.

A hospital lists them in its ``local/privacy.json`` (``poc_setup/privacy.json`` is the
shipped policy); a job picks the scope with ``"scope"`` in its meta.json. At a site the
task-result filters run on everything the site sends back, after the site script and
before anything is put on the wire; at the server the ``"direction": "in"`` result
filters run on what arrives, before the controller sees it.

- ``AdapterOnlyGuard``    result filter: any tensor whose name is not a LoRA adapter
                          tensor stops the whole result (an error reply goes out instead).
- ``RememberGlobalAdapter`` task-data filter: keeps the adapter the server sent (when
                          the scope's DP is on), so the DP filter can form the update.
- ``GaussianDP``          result filter: clip the update to ``clip_norm``, add Gaussian
                          noise, account epsilon over rounds (RDP).
- ``Int8Quantizer`` / ``Int8Dequantizer``  8-bit adapter transfer: the first at the
                          site (result, out), the second at the server (result, in).
"""

from __future__ import annotations

import os
import threading

import numpy as np
import torch
from nvflare.apis.dxo import DataKind, from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import ReservedHeaderKey, Shareable, make_reply

from fedmed_components.federation import privacy

INT8_META_KEY = "fedmed_int8"  # {"scales": {key: [scale, dtype]}, "numpy": bool} on a quantised result
DP_META_KEY = "fedmed_dp"  # what the DP filter did, for the server's records
PARAM_KINDS = (DataKind.WEIGHTS, DataKind.WEIGHT_DIFF)


def _task(shareable: Shareable, fl_ctx: FLContext) -> tuple[str | None, str | None]:
    name = fl_ctx.get_prop(FLContextKey.TASK_NAME) or shareable.get_header(ReservedHeaderKey.TASK_NAME)
    task_id = fl_ctx.get_prop(FLContextKey.TASK_ID) or shareable.get_header(ReservedHeaderKey.TASK_ID)
    return name, task_id


def _param_dxo(shareable: Shareable):
    """The result's DXO if it carries adapter parameters, else None."""
    try:
        dxo = from_shareable(shareable)
    except ValueError:
        return None
    return dxo if dxo.data_kind in PARAM_KINDS and isinstance(dxo.data, dict) else None


def _as_torch(params: dict) -> tuple[dict, bool]:
    """Tensors as torch (numpy arrays converted); True if they were numpy."""
    was_numpy = any(isinstance(v, np.ndarray) for v in params.values())
    return {k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v for k, v in params.items()}, was_numpy


def _back(params: dict, to_numpy: bool) -> dict:
    return {k: v.numpy() for k, v in params.items()} if to_numpy else params


def tensor_paths(obj, path: str = "", key: str = "") -> list[tuple[str, str]]:
    """``(path, key)`` of every tensor/array anywhere in a nested payload; ``key`` is
    the dict key the tensor sits under (what ``is_lora_key`` judges)."""
    found = []
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        found.append((path or key, key))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            found += tensor_paths(v, f"{path}.{k}" if path else str(k), str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            found += tensor_paths(v, f"{path}[{i}]", key)
    return found


class AdapterOnlyGuard(Filter):
    """Stop any result that carries a tensor other than a LoRA adapter tensor
    (or a task head the policy names in ``allowed_modules``, e.g. ``["classifier"]``)."""

    def __init__(self, tasks: list[str] | None = None, allowed_modules: list[str] | None = None):
        super().__init__()
        self.tasks = list(tasks) if tasks else None  # None: every task
        self.allowed_modules = list(allowed_modules or [])

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        task_name, _ = _task(shareable, fl_ctx)
        if self.tasks is not None and task_name not in self.tasks:
            return shareable
        found = tensor_paths(dict(shareable))
        bad = set(privacy.adapter_only_violations([key for _, key in found], self.allowed_modules))
        if not bad:
            if found:
                self.log_info(fl_ctx, f"privacy policy: result of task {task_name!r}: {len(found)} tensors, all LoRA adapter tensors")
            return shareable
        paths = [path for path, key in found if key in bad]
        self.log_error(
            fl_ctx,
            f"privacy policy: result of task {task_name!r} stopped: {len(bad)} tensor(s) are not LoRA adapter "
            f"tensors, e.g. {paths[0]!r}" + (f" (+{len(paths) - 1} more)" if len(paths) > 1 else ""),
            fire_event=False,
        )
        return make_reply(ReturnCode.EXECUTION_EXCEPTION)


# The adapter received with the current training task, per job: (task id, tensors).
# Written by RememberGlobalAdapter, read once by GaussianDP; both filters live in the
# same job process at a site. One entry per job bounds the memory to one adapter.
_RECEIVED: dict = {}
_RECEIVED_LOCK = threading.Lock()


class RememberGlobalAdapter(Filter):
    """Task-data filter: remember the adapter the server sent with a training task, for
    GaussianDP. Only when the job's scope has DP switched on (or the scope is unknown),
    so a site without DP keeps no copy."""

    def __init__(self, tasks: list[str] | None = None):
        super().__init__()
        self.tasks = list(tasks or ["train"])

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        task_name, task_id = _task(shareable, fl_ctx)
        if task_name not in self.tasks or not _scope_wants_dp(fl_ctx):
            return shareable
        dxo = _param_dxo(shareable)
        if dxo is not None and dxo.data_kind == DataKind.WEIGHTS:
            params, _ = _as_torch(dxo.data)
            with _RECEIVED_LOCK:
                _RECEIVED[fl_ctx.get_job_id()] = (task_id, {k: v.detach().clone() for k, v in params.items()})
        return shareable


def _scope_wants_dp(fl_ctx: FLContext) -> bool:
    scope = fl_ctx.get_prop(FLContextKey.SCOPE_OBJECT)
    chains = getattr(scope, "task_result_filters", None)
    if not chains:
        return True
    return any(isinstance(f, GaussianDP) and f.enabled for chain in chains.values() for f in chain)


def take_received(job_id, task_id) -> dict | None:
    """The adapter remembered for this job's task (forgotten once taken)."""
    with _RECEIVED_LOCK:
        entry = _RECEIVED.get(job_id)
        if entry is None or entry[0] != task_id:
            return None
        del _RECEIVED[job_id]
        return entry[1]


class GaussianDP(Filter):
    """Site-level Gaussian DP on the round's adapter update.

    The update (result minus the adapter received with the task, or the result itself
    when the site sends a difference) is clipped to ``clip_norm`` and
    ``N(0, (noise_multiplier * clip_norm)^2)`` is added to every element. Epsilon at
    ``delta`` is logged after every round (RDP accountant) together with the epsilon
    the configured ``num_rounds`` will spend. A result whose update cannot be formed
    (no remembered adapter) is stopped rather than sent without noise.
    """

    def __init__(
        self,
        noise_multiplier: float = 1.0,
        clip_norm: float = 1.0,
        delta: float = 1e-5,
        num_rounds: int = 3,
        tasks: list[str] | None = None,
        enabled: bool = True,
        seed: int | None = None,
    ):
        super().__init__()
        if noise_multiplier < 0 or clip_norm <= 0 or not 0 < delta < 1:
            raise ValueError("need noise_multiplier >= 0, clip_norm > 0 and 0 < delta < 1")
        self.noise_multiplier = float(noise_multiplier)
        self.clip_norm = float(clip_norm)
        self.delta = float(delta)
        self.num_rounds = int(num_rounds)
        self.tasks = list(tasks or ["train"])
        self.enabled = bool(enabled)
        self.accountant = privacy.RdpAccountant()
        self.generator = torch.Generator()
        self.generator.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        task_name, task_id = _task(shareable, fl_ctx)
        if not self.enabled or task_name not in self.tasks:
            return shareable
        dxo = _param_dxo(shareable)
        if dxo is None:
            return shareable
        params, was_numpy = _as_torch(dxo.data)
        if dxo.data_kind == DataKind.WEIGHT_DIFF:
            reference = None
            update = params
        else:
            reference = take_received(fl_ctx.get_job_id(), task_id)
            if reference is None or any(k not in reference or reference[k].shape != v.shape for k, v in params.items()):
                self.log_error(
                    fl_ctx,
                    f"privacy policy: DP needs the adapter received with task {task_name!r} "
                    "(add RememberGlobalAdapter to task_data_filters); result stopped",
                    fire_event=False,
                )
                return make_reply(ReturnCode.EXECUTION_EXCEPTION)
            update = {k: v - reference[k].to(v.dtype) for k, v in params.items()}
        noisy, report = privacy.privatize_update(update, self.clip_norm, self.noise_multiplier, self.generator)
        out = noisy if reference is None else {k: reference[k].to(v.dtype) + v for k, v in noisy.items()}
        self.accountant.step(self.noise_multiplier)
        epsilon = self.accountant.epsilon(self.delta)
        planned = privacy.gaussian_epsilon(self.noise_multiplier, self.num_rounds, self.delta)
        dxo.data = _back(out, was_numpy)
        dxo.set_meta_prop(DP_META_KEY, {**report.as_dict(), "epsilon": epsilon, "delta": self.delta, "releases": self.accountant.releases})
        self.log_info(
            fl_ctx,
            f"privacy policy: DP on task {task_name!r}: update norm {report.update_norm:.4g}"
            f"{' clipped' if report.clipped else ''} to <= {self.clip_norm:g}, noise std {report.noise_std:.4g} "
            f"on {report.num_elements} values; epsilon {epsilon:.3f} at delta {self.delta:g} after "
            f"{self.accountant.releases} round(s) ({planned:.3f} after the planned {self.num_rounds})",
        )
        return dxo.update_shareable(shareable)


class Int8Quantizer(Filter):
    """Send the adapter as per-tensor absmax int8 (the server's Int8Dequantizer restores it)."""

    def __init__(self, tasks: list[str] | None = None, enabled: bool = True):
        super().__init__()
        self.tasks = list(tasks) if tasks else None
        self.enabled = bool(enabled)

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        task_name, _ = _task(shareable, fl_ctx)
        if not self.enabled or (self.tasks is not None and task_name not in self.tasks):
            return shareable
        dxo = _param_dxo(shareable)
        if dxo is None or dxo.get_meta_prop(INT8_META_KEY):
            return shareable
        params, was_numpy = _as_torch(dxo.data)
        before = privacy.state_num_bytes(params)
        quantized, scales = privacy.quantize_state(params)
        if not scales:
            return shareable
        after = privacy.state_num_bytes(quantized, scales)
        dxo.data = _back(quantized, was_numpy)
        dxo.set_meta_prop(INT8_META_KEY, {"scales": scales, "numpy": was_numpy})
        self.log_info(
            fl_ctx,
            f"8-bit transfer of task {task_name!r}: {before / 1e6:.3f} MB -> {after / 1e6:.3f} MB "
            f"({before / max(after, 1):.2f}x, {(before - after) / 1e6:.3f} MB saved)",
        )
        return dxo.update_shareable(shareable)


class Int8Dequantizer(Filter):
    """Server side: restore an Int8Quantizer result to its original dtypes; anything
    not quantised passes unchanged."""

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        dxo = _param_dxo(shareable)
        info = dxo.get_meta_prop(INT8_META_KEY) if dxo is not None else None
        if not info:
            return shareable
        params, _ = _as_torch(dxo.data)
        restored = privacy.dequantize_state(params, info["scales"])
        dxo.data = _back(restored, bool(info.get("numpy")))
        dxo.remove_meta_props([INT8_META_KEY])
        return dxo.update_shareable(shareable)
