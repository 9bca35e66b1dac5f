"""Screening of site updates before they can touch the global adapter.

A site's update must be exactly the LoRA adapter the server sent out, trained: the same
tensor names, shapes and dtypes, finite values, and nothing else. In particular any
tensor that is not part of a LoRA adapter (a base-model weight such as
``...q_proj.base_layer.weight`` or ``model.embed_tokens.weight``) is a hard reject: base
weights must never leave a site, and a server must not merge them. Once a round's
updates are in, updates whose norm is far above the others' (a scaled or poisoned
update) are rejected as well.

Pure core, no FLARE import; ``flare/aggregators.py`` calls ``validate_update`` per
update as it arrives and ``norm_outliers`` once the round is complete (from the norms it
took on arrival, so a round is never held in memory), and logs every rejection with
site, round and reason.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from fedmed_components.federation.lora_keys import is_lora_A, is_lora_B, is_lora_key, lora_partner

__all__ = [
    "Rejection",
    "norm_outliers",
    "update_norm",
    "validate_update",
]

_MAX_LISTED = 3


@dataclass
class Rejection:
    """Why one site's update was left out of a round."""

    site: str
    round: int | None
    reason: str

    def __str__(self) -> str:
        where = f"round {self.round}" if self.round is not None else "this round"
        return f"update from {self.site} rejected in {where}: {self.reason}"


def _listed(keys) -> str:
    keys = sorted(keys)
    shown = ", ".join(repr(k) for k in keys[:_MAX_LISTED])
    return shown + (f" and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else "")


def _spec(reference: Mapping) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``{name: (shape, dtype)}`` from a dict of tensors or of ``(shape, dtype)`` pairs."""
    spec = {}
    for key, value in reference.items():
        if isinstance(value, Tensor):
            spec[key] = (tuple(value.shape), value.dtype)
        else:
            shape, dtype = value
            if isinstance(dtype, str):
                dtype = getattr(torch, dtype.removeprefix("torch."))
            spec[key] = (tuple(int(d) for d in shape), dtype)
    return spec


def _rank_dim(key: str) -> int | None:
    if is_lora_A(key):
        return 0
    if is_lora_B(key) and not key.endswith(".bias"):
        return 1
    return None


def _shape_ok(key: str, shape: tuple[int, ...], expected: tuple[int, ...], allow_rank_change: bool) -> bool:
    if shape == expected:
        return True
    dim = _rank_dim(key) if allow_rank_change else None
    if dim is None or len(shape) != len(expected) or shape[dim] < 1:
        return False
    return all(a == b for i, (a, b) in enumerate(zip(shape, expected)) if i != dim)


def validate_update(
    update,
    reference: Mapping,
    *,
    site: str,
    round: int | None = None,
    allow_rank_change: bool = False,
    head_modules: tuple[str, ...] | list[str] = (),
) -> Rejection | None:
    """None if ``update`` is a well-formed adapter matching ``reference``, else a Rejection.

    ``reference`` is the global adapter (``{name: Tensor}``) or its spec
    (``{name: (shape, dtype)}``). Rejected: a payload that is not a non-empty dict;
    any tensor that is not part of a LoRA adapter (base-model weights), even when the
    reference lists it (except a ``modules_to_save`` head the job declared, by that name
    in the key or by module name in ``head_modules``, e.g. the BERT baseline's
    ``classifier``, which PEFT saves as ``...classifier.weight``); missing or
    unexpected names; non-tensors; wrong dtype; wrong shape (with
    ``allow_rank_change`` the rank dimension of A/B may differ, consistently within a
    layer); NaN or Inf values. The reason names the offending tensor(s).
    """

    def reject(reason: str) -> Rejection:
        return Rejection(site=site, round=round, reason=reason)

    if update is None or (isinstance(update, Mapping) and len(update) == 0):
        return reject("empty payload: no adapter tensor received")
    if not isinstance(update, Mapping):
        return reject(f"payload is a {type(update).__name__}, not a dict of tensors")
    spec = _spec(reference)
    keys = set(update)
    non_string = [k for k in keys if not isinstance(k, str)]
    if non_string:
        return reject(f"non-string tensor name(s): {non_string[:_MAX_LISTED]!r}")
    declared_extra = {k for k in spec if "modules_to_save" in k.split(".") or set(k.split(".")) & set(head_modules)}
    foreign = {k for k in keys if not is_lora_key(k) and k not in declared_extra}
    if foreign:
        return reject(f"non-LoRA tensor(s) in the update (base-model weights must never leave a site): {_listed(foreign)}")
    unexpected = keys - spec.keys()
    if unexpected:
        return reject(f"unexpected tensor(s) not in the global adapter: {_listed(unexpected)}")
    missing = spec.keys() - keys
    if missing:
        return reject(f"missing tensor(s): {_listed(missing)}")

    problems = []
    for key in sorted(keys):
        value = update[key]
        expected_shape, expected_dtype = spec[key]
        if not isinstance(value, Tensor):
            problems.append(f"{key!r} is a {type(value).__name__}, not a tensor")
            continue
        if value.dtype != expected_dtype:
            problems.append(f"{key!r} has dtype {value.dtype}, expected {expected_dtype}")
            continue
        shape = tuple(value.shape)
        if not _shape_ok(key, shape, expected_shape, allow_rank_change):
            problems.append(f"{key!r} has shape {list(shape)}, expected {list(expected_shape)}")
            continue
        if value.numel() == 0:
            problems.append(f"{key!r} is empty")
            continue
        if value.is_floating_point() or value.is_complex():
            finite = torch.isfinite(value)
            if not bool(finite.all()):
                n_nan = int(torch.isnan(value).sum())
                n_inf = int((~finite).sum()) - n_nan
                problems.append(f"{key!r} has non-finite values ({n_nan} NaN, {n_inf} Inf)")
    if not problems and allow_rank_change:
        for key in sorted(k for k in keys if _rank_dim(k) == 0):
            partner = lora_partner(key)
            if partner in update and update[key].shape[0] != update[partner].shape[1]:
                problems.append(f"{key!r} has rank {update[key].shape[0]} but {partner!r} has rank {update[partner].shape[1]}")
    if problems:
        more = f" (and {len(problems) - _MAX_LISTED} more problems)" if len(problems) > _MAX_LISTED else ""
        return reject("; ".join(problems[:_MAX_LISTED]) + more)
    return None


def update_norm(update: Mapping[str, Tensor], reference: Mapping[str, Tensor] | None = None) -> float:
    """Global L2 norm of an adapter, or of its change from ``reference`` when given.

    Accumulated in float64. A tensor whose shape differs from the reference's (a site
    of another rank) counts with its own norm.
    """
    total = 0.0
    for key, value in update.items():
        base = reference.get(key) if reference is not None else None
        if isinstance(base, Tensor) and base.shape == value.shape:
            diff = value.to(torch.float64) - base.to(device=value.device, dtype=torch.float64)
        else:
            diff = value.to(torch.float64)
        total += float(torch.linalg.vector_norm(diff)) ** 2
    return math.sqrt(total)


def norm_outliers(norms: Mapping[str, float], max_ratio: float = 10.0, *, flag_small: bool = False) -> dict[str, str]:
    """Sites whose update norm is more than ``max_ratio`` times the median of the others'.

    Leave-one-out median: robust to a minority of bad updates, and with two sites each is
    compared with the other. A non-finite norm is always flagged. With ``flag_small``,
    norms below ``median / max_ratio`` are flagged too (an update that barely moved).
    Returns ``{site: reason}``; with a single site nothing can be compared.
    """
    if not (max_ratio > 1):
        raise ValueError(f"max_ratio must be > 1, got {max_ratio}")
    flagged = {}
    for site, norm in norms.items():
        if not math.isfinite(norm):
            flagged[site] = f"update norm is not finite ({norm})"
    finite = {s: n for s, n in norms.items() if s not in flagged}
    if len(finite) < 2:
        return flagged
    for site, norm in finite.items():
        median = statistics.median(n for s, n in finite.items() if s != site)
        if median <= 0:
            continue
        if norm > max_ratio * median:
            flagged[site] = (
                f"update norm {norm:.4g} is {norm / median:.1f}x the median {median:.4g} of the other sites (limit {max_ratio:g}x)"
            )
        elif flag_small and norm < median / max_ratio:
            flagged[site] = f"update norm {norm:.4g} is below 1/{max_ratio:g} of the median {median:.4g} of the other sites"
    return flagged
