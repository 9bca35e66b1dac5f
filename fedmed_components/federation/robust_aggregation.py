"""Byzantine-robust aggregation rules, as pure functions over ``dict[str, Tensor]``.

No FLARE import, like ``aggregation.py``: each rule takes one dict of tensors per site
(PEFT adapter names, the same keys and shapes at every site) and returns one dict.

What the rules are applied to
-----------------------------
The rules are meant for *updates*, ``u_k = x_k - x_global``: what site k sent minus the
global adapter of the round (``aggregation.adapter_difference(x_k, x_global)`` makes
them, ``state_from_update`` adds the aggregate back; ``flare/aggregators.RobustAggregator``
does both in a FLARE job, after the screening in ``update_validation``). For the
coordinate-wise rules the choice does not matter: median and trimmed mean commute
with adding the same ``x_global`` to every site (``rule(x_k) = x_global + rule(x_k -
x_global)``), so they can be run on full adapters too. Norm bounding does *not*
commute with that shift: the norm of a full adapter is mostly the norm of the global
adapter, not of what the site changed, so ``norm_bounded_mean`` must be given updates.

Like Fed-MedLoRA, every tensor (each ``lora_A`` and ``lora_B``) is treated on its own;
the rules do not look at the layer product ``B @ A``.

Rules (K sites, f of them attackers)
------------------------------------
``coordinate_median``
    Per tensor and per coordinate, the median over sites; for an even K the mean of the
    two middle values. Needs no parameter and tolerates any f < K/2 sites sending
    anything: every coordinate stays within the range of the honest values. It ignores
    the sites' weights (one site, one vote: supervised-token counts are reported by the
    sites themselves, so an attacker could inflate them), and it is noisier than the
    mean when every site is honest (it uses the middle of the honest values, not their
    average), the more so for small K or sites whose data differ (non-IID).
``trimmed_mean``
    Per coordinate, drop the ``floor(beta * K)`` largest and smallest values and average
    the rest. Tolerates f attackers when ``floor(beta * K) >= f``, i.e. beta >= f/K
    (e.g. K = 6, f = 1: beta >= 1/6; K = 7, f = 2: beta >= 2/7). Between the mean
    (beta = 0) and the median (beta close to 1/2): less noisy than the median when the
    number of attackers is known to be small. Unweighted, like the median. With
    ``beta * K < 1`` nothing is trimmed (a warning is logged): for few sites beta
    must be large to do anything.
``norm_bounded_mean``
    Scale each site's whole update (the L2 norm over all its tensors together) down to
    at most ``clip`` (default: the median of the sites' norms), then take the weighted
    mean. Keeps the weights and the mean's efficiency, and limits how far one site can
    pull the aggregate to ``w_k * clip``: it defeats a *scaled* update (an honest or
    crafted direction sent with a large norm), but not an update that points the wrong
    way at an honest norm (sign flip, random or crafted direction), which it leaves
    untouched. With the default clip, f < K/2 attackers cannot raise the clip beyond
    the honest norms.

Which rule: with few sites and no attacker expected, ``aggregation.fed_medlora`` (the
screening in ``update_validation`` catches malformed and grossly scaled updates);
against scaled updates that pass the screening (ratio below ``max_norm_ratio``),
``norm_bounded``; against direction attacks with f known, ``trimmed_mean`` with beta >=
f/K; with f unknown but below K/2, ``median``. No rule helps once f >= K/2, and none
separates an attacker from an honest site whose data are just different.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fedmed_components.federation.aggregation import fed_medlora, normalize_weights
from fedmed_components.federation.update_validation import update_norm

log = logging.getLogger("fedmed.aggregation")

__all__ = [
    "ROBUST_RULES",
    "coordinate_median",
    "norm_bounded_mean",
    "robust_aggregate",
    "state_from_update",
    "tolerated_attackers",
    "trimmed_mean",
]

ROBUST_RULES = ("median", "trimmed_mean", "norm_bounded")


# ----------------------------------------------------------------------------- checks
def _check_aligned(updates: Sequence[Mapping[str, Tensor]], labels: Sequence[str] | None = None) -> list[str]:
    """The tensor names of update 0; ValueError naming the site index and the key when
    another update lacks or adds a tensor, changes a shape, or holds non-finite values.

    ``labels`` name the entries in messages (default ``"update i"``)."""
    if not updates:
        raise ValueError("no updates to aggregate")
    names = list(labels) if labels is not None else [f"update {i}" for i in range(len(updates))]
    first = updates[0]
    if not isinstance(first, Mapping) or not first:
        raise ValueError(f"{names[0]}: empty or not a dict of tensors")
    keys = list(first)
    for name, update in zip(names, updates):
        if not isinstance(update, Mapping):
            raise ValueError(f"{name}: a {type(update).__name__}, not a dict of tensors")
        missing = [k for k in keys if k not in update]
        if missing:
            raise ValueError(f"{name}: missing tensor {missing[0]!r} (present in {names[0]})")
        extra = [k for k in update if k not in first]
        if extra:
            raise ValueError(f"{name}: unexpected tensor {extra[0]!r} (not in {names[0]})")
        for key in keys:
            value = update[key]
            if not isinstance(value, Tensor) or not value.is_floating_point():
                raise ValueError(f"{name}: {key!r} is not a floating-point tensor")
            if value.shape != first[key].shape:
                raise ValueError(f"{name}: {key!r} has shape {list(value.shape)}, {names[0]} has {list(first[key].shape)}")
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"{name}: {key!r} has non-finite values")
    return keys


def _stacked(updates: Sequence[Mapping[str, Tensor]], key: str) -> Tensor:
    """``[K, *shape]`` float64 stack of one tensor over the sites (on update 0's device)."""
    device = updates[0][key].device
    return torch.stack([u[key].to(device=device, dtype=torch.float64) for u in updates])


# ---------------------------------------------------------------------- state <-> update
def state_from_update(global_state: Mapping[str, Tensor], update: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``x_global + u`` in the global adapter's dtypes (the inverse of
    ``aggregation.adapter_difference``, which gives float32 updates ``x_k - x_global``)."""
    _check_aligned([global_state, update], ["global adapter", "update"])
    return {
        key: (base.to(torch.promote_types(base.dtype, update[key].dtype)) + update[key].to(base.device)).to(base.dtype)
        for key, base in global_state.items()
    }


# ------------------------------------------------------------------------------- rules
def coordinate_median(updates: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Per tensor, per coordinate median over the sites.

    For an even number of sites the median is the mean of the two middle values (so
    two sites give their mean). Computed in float64, returned in update 0's dtypes.
    """
    keys = _check_aligned(updates)
    k = len(updates)
    result = {}
    for key in keys:
        ordered = _stacked(updates, key).sort(dim=0).values
        middle = ordered[k // 2] if k % 2 else (ordered[k // 2 - 1] + ordered[k // 2]) / 2
        result[key] = middle.to(updates[0][key].dtype)
    return result


def _trim_count(beta: float, k: int) -> int:
    """``floor(beta * k)``, tolerant of float error (0.29 * 100 is 28.999999999999996)."""
    return math.floor(round(beta * k, 9))


def trimmed_mean(updates: Sequence[Mapping[str, Tensor]], beta: float) -> dict[str, Tensor]:
    """Per coordinate, the mean after dropping the ``floor(beta * K)`` largest and smallest values.

    ``beta`` must lie in ``[0, 0.5)``, which always leaves at least one value; beta = 0
    is the plain (unweighted) mean. Computed in float64, returned in update 0's dtypes.
    """
    beta = float(beta)
    if not (math.isfinite(beta) and 0 <= beta < 0.5):
        raise ValueError(f"beta must be in [0, 0.5), got {beta}")
    keys = _check_aligned(updates)
    k = len(updates)
    trim = _trim_count(beta, k)
    if k - 2 * trim < 1:  # cannot happen for beta < 0.5; kept as a guard
        raise ValueError(f"trimming {trim} values from each end of {k} leaves nothing to average")
    if beta > 0 and trim == 0:
        log.warning("trimmed_mean: beta=%g with %d sites trims nothing (floor(beta*K) = 0): plain mean", beta, k)
    result = {}
    for key in keys:
        ordered = _stacked(updates, key).sort(dim=0).values
        result[key] = ordered[trim : k - trim].mean(dim=0).to(updates[0][key].dtype)
    return result


def norm_bounded_mean(
    updates: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float] | None = None,
    clip: float | None = None,
) -> dict[str, Tensor]:
    """Weighted mean of the updates after scaling each down to L2 norm at most ``clip``.

    A site's norm is taken over all its tensors together (``update_norm``, float64), and
    the whole update is scaled by ``min(1, clip / norm)``. ``clip`` defaults to the
    median of the sites' norms (if that is 0, more than half the sites did not move and
    the result is zero). ``weights`` (default: equal) are normalised; the average is
    ``aggregation.fed_medlora`` accumulated in float64, returned in update 0's dtypes.
    """
    keys = _check_aligned(updates)
    if weights is None:
        weights = [1.0] * len(updates)
    if len(weights) != len(updates):
        raise ValueError(f"{len(weights)} weights for {len(updates)} updates")
    normalize_weights(weights)  # ValueError on negative, non-finite or zero-sum weights
    norms = [update_norm(u) for u in updates]
    if clip is None:
        clip = statistics.median(norms)
    else:
        clip = float(clip)
        if not (math.isfinite(clip) and clip > 0):
            raise ValueError(f"clip must be a positive number, got {clip}")
    clipped = []
    for update, norm in zip(updates, norms):
        factor = min(1.0, clip / norm) if norm > 0 else 1.0
        clipped.append({key: update[key].to(torch.float64) * factor for key in keys})
    mean = fed_medlora(clipped, weights, accumulate_dtype=torch.float64)
    return {key: mean[key].to(updates[0][key].dtype) for key in keys}


# ---------------------------------------------------------------------------- dispatch
_OPTIONS = {"median": (), "trimmed_mean": ("beta",), "norm_bounded": ("clip",)}


def tolerated_attackers(rule: str, k: int, beta: float | None = None) -> int | None:
    """How many of ``k`` sites may send anything while every coordinate of the result
    stays within the range of the honest sites' values (the rule's breakdown point).

    ``median``: ``(k - 1) // 2`` (any f < k/2). ``trimmed_mean``: ``floor(beta * k)``
    (``beta`` required). ``norm_bounded``: None: it rejects no one, it bounds each
    site's pull on the mean to ``w_k * clip`` (see the module docstring).
    """
    if rule not in _OPTIONS:
        raise ValueError(f"unknown robust rule {rule!r}: use one of {', '.join(repr(r) for r in ROBUST_RULES)}")
    if k < 1:
        raise ValueError(f"need at least one site, got {k}")
    if rule == "median":
        return (k - 1) // 2
    if rule == "trimmed_mean":
        if beta is None:
            raise ValueError("rule 'trimmed_mean' needs beta= (the fraction trimmed at each end)")
        return _trim_count(float(beta), k)
    return None


def robust_aggregate(
    updates: Sequence[Mapping[str, Tensor]],
    rule: str,
    weights: Sequence[float] | None = None,
    **options,
) -> dict[str, Tensor]:
    """Run one robust rule by name: ``"median"``, ``"trimmed_mean"`` (``beta=``) or
    ``"norm_bounded"`` (``clip=``).

    ``weights`` are checked (one per update, valid for ``normalize_weights``) for every
    rule, but only ``norm_bounded`` uses them: median and trimmed mean give each site
    one vote (see the module docstring). An unknown rule or option is a ValueError.
    """
    if rule not in _OPTIONS:
        raise ValueError(f"unknown robust rule {rule!r}: use one of {', '.join(repr(r) for r in ROBUST_RULES)}")
    unknown = sorted(set(options) - set(_OPTIONS[rule]))
    if unknown:
        allowed = ", ".join(_OPTIONS[rule]) or "none"
        raise ValueError(f"rule {rule!r} takes no option {', '.join(unknown)} (options: {allowed})")
    if weights is not None:
        if len(weights) != len(updates):
            raise ValueError(f"{len(weights)} weights for {len(updates)} updates")
        normalize_weights(weights)
    if rule == "median":
        return coordinate_median(updates)
    if rule == "trimmed_mean":
        if "beta" not in options:
            raise ValueError("rule 'trimmed_mean' needs beta= (the fraction trimmed at each end)")
        return trimmed_mean(updates, options["beta"])
    return norm_bounded_mean(updates, weights, clip=options.get("clip"))
