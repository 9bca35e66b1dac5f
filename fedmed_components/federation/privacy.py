"""What may leave a site, as pure functions: the adapter-only rule, Gaussian DP on the
adapter update with an RDP accountant, and 8-bit transfer of the adapter.

No FLARE import. ``flare/filters.py`` wraps these in FLARE ``Filter`` classes that a
site lists in its ``local/privacy.json`` (see ``poc_setup/privacy.json``).

Adapter-only
    Every tensor in an outgoing result must be a LoRA adapter tensor
    (``lora_keys.is_lora_key``); anything else (a base-model weight, an embedding, a
    tensor hidden in the metadata) stops the result.

Gaussian differential privacy (site level, one release per round)
    The round's update ``u = adapter_after - adapter_received`` is clipped to L2 norm
    ``C`` and ``N(0, (sigma*C)^2)`` noise is added to every coordinate: the Gaussian
    mechanism with sensitivity ``C`` (the whole site's contribution to the round is one
    record: "site-level" DP, no sampling). Privacy loss is tracked with Renyi DP
    (Mironov 2017): one release has ``RDP(alpha) = alpha / (2 sigma^2)``, RDP adds up
    over rounds, and ``(epsilon, delta)`` is the minimum over orders of the conversion
    (``"improved"``, Canonne, Kamath & Steinke 2020 / Balle et al. 2020; or Mironov's
    original ``rdp + log(1/delta)/(alpha-1)``). The RDP of the (sampled) Gaussian and
    the improved conversion are Opacus's (``opacus.accountants.analysis.rdp``); record-
    level DP-SGD (``dp_sgd.py``) composes its steps in the same accountant.

8-bit transfer
    Per-tensor absmax int8: ``scale = max|x| / 127``, ``q = round(x / scale)``; the
    receiver multiplies back and restores the dtype. Error per element <= scale/2; a
    float32 adapter shrinks ~4x (plus 4 bytes of scale per tensor).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fedmed_components.federation.lora_keys import is_lora_key
from fedmed_components.federation.update_validation import update_norm

__all__ = [
    "DEFAULT_ORDERS",
    "DPReport",
    "RdpAccountant",
    "adapter_only_violations",
    "clip_update",
    "dequantize_int8",
    "dequantize_state",
    "gaussian_epsilon",
    "gaussian_rdp",
    "noise_for_epsilon",
    "privatize_update",
    "quantize_int8",
    "quantize_state",
    "rdp_to_epsilon",
    "state_num_bytes",
]


# --------------------------------------------------------------------- adapter-only rule
def adapter_only_violations(tensor_keys: Iterable[str], allowed_modules: Iterable[str] = ()) -> list[str]:
    """The keys that are not LoRA adapter tensors (empty: the payload may leave).

    ``allowed_modules`` names trained task heads a site's policy lets travel too (the
    BERT baseline's ``classifier``, new and trained like the LoRA factors): a key with
    that module name in its path is allowed."""
    allowed = set(allowed_modules)
    return [key for key in tensor_keys if not is_lora_key(key) and not (allowed & set(key.split(".")))]


# ------------------------------------------------------------------- Gaussian mechanism
def clip_update(update: Mapping[str, Tensor], max_norm: float) -> tuple[dict[str, Tensor], float, float]:
    """Scale the whole update so its global L2 norm is at most ``max_norm``.

    Returns ``(clipped, norm_before, factor)``; computed in float64, returned in each
    tensor's own dtype.
    """
    if max_norm <= 0:
        raise ValueError(f"clip norm must be positive, not {max_norm}")
    norm = update_norm(update)
    factor = min(1.0, max_norm / norm) if norm > 0 else 1.0
    clipped = {k: (v.to(torch.float64) * factor).to(v.dtype) for k, v in update.items()}
    return clipped, norm, factor


@dataclass
class DPReport:
    """What one privatised release did (logged by the site, sent in the result's meta)."""

    noise_multiplier: float
    clip_norm: float
    noise_std: float
    update_norm: float
    clipped: bool
    num_elements: int

    def as_dict(self) -> dict:
        return {
            "noise_multiplier": self.noise_multiplier,
            "clip_norm": self.clip_norm,
            "noise_std": self.noise_std,
            "clipped": self.clipped,
            "num_elements": self.num_elements,
        }


def privatize_update(
    update: Mapping[str, Tensor],
    clip_norm: float,
    noise_multiplier: float,
    generator: torch.Generator | None = None,
) -> tuple[dict[str, Tensor], DPReport]:
    """Clip the update to ``clip_norm`` and add ``N(0, (noise_multiplier*clip_norm)^2)``
    to every element (noise drawn in float64, result in each tensor's dtype)."""
    if noise_multiplier < 0:
        raise ValueError(f"noise multiplier must be >= 0, not {noise_multiplier}")
    clipped, norm, factor = clip_update(update, clip_norm)
    std = noise_multiplier * clip_norm
    noisy = {}
    for key, value in clipped.items():
        noise = torch.randn(value.shape, dtype=torch.float64, generator=generator) * std
        noisy[key] = (value.to(torch.float64) + noise.to(value.device)).to(value.dtype)
    report = DPReport(
        noise_multiplier=noise_multiplier,
        clip_norm=clip_norm,
        noise_std=std,
        update_norm=norm,
        clipped=factor < 1.0,
        num_elements=sum(v.numel() for v in update.values()),
    )
    return noisy, report


# ----------------------------------------------------------------------- RDP accountant
# Fine steps where the optimum sits for useful noise levels, then integers, then a tail.
DEFAULT_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 50 for x in range(1, 500)] + list(range(11, 257)) + [320, 384, 512, 768, 1024, 2048, 4096]
)


def gaussian_rdp(noise_multiplier: float, orders: Sequence[float] = DEFAULT_ORDERS, sample_rate: float = 1.0) -> list[float]:
    """RDP of one Gaussian release with sensitivity C and noise std ``sigma*C``, on a
    Poisson sample of the records at ``sample_rate`` (1: every record, ``alpha / (2
    sigma^2)``; infinite without noise). Opacus's analysis of the sampled Gaussian."""
    if noise_multiplier <= 0:
        return [math.inf for _ in orders]
    return list(_sampled_gaussian_rdp(float(noise_multiplier), float(sample_rate), tuple(orders)))


@functools.lru_cache(maxsize=64)
def _sampled_gaussian_rdp(noise_multiplier: float, sample_rate: float, orders: tuple[float, ...]) -> tuple[float, ...]:
    # fractional orders of the sampled Gaussian are series: ~0.1 s; a DP-SGD step must not pay it again
    from opacus.accountants.analysis.rdp import compute_rdp

    return tuple(float(x) for x in compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=list(orders)))


def rdp_to_epsilon(rdp: Sequence[float], orders: Sequence[float], delta: float, conversion: str = "improved") -> tuple[float, float]:
    """``(epsilon, best_order)`` for the given ``delta`` from RDP values at ``orders``:
    Opacus's conversion (``improved``), or Mironov's ``rdp + log(1/delta)/(alpha-1)``."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), not {delta}")
    if conversion not in ("improved", "mironov"):
        raise ValueError(f"conversion must be 'improved' or 'mironov', not {conversion!r}")
    usable = [(a, r) for a, r in zip(orders, rdp) if a > 1 and math.isfinite(r)]
    if not usable:
        return math.inf, float("nan")
    if conversion == "mironov":
        eps, order = min((r + math.log(1 / delta) / (a - 1), a) for a, r in usable)
    else:
        import warnings

        from opacus.accountants.analysis.rdp import get_privacy_spent

        with warnings.catch_warnings():  # "optimal order is the largest alpha": the orders reach 4096
            warnings.simplefilter("ignore")
            eps, order = get_privacy_spent(orders=[a for a, _ in usable], rdp=[r for _, r in usable], delta=delta)
    return max(float(eps), 0.0), float(order)


def gaussian_epsilon(
    noise_multiplier: float,
    rounds: int,
    delta: float,
    orders: Sequence[float] = DEFAULT_ORDERS,
    conversion: str = "improved",
    sample_rate: float = 1.0,
) -> float:
    """epsilon after ``rounds`` Gaussian releases (each on a Poisson sample at
    ``sample_rate``; 1: no sampling) at this ``delta``."""
    if rounds <= 0:
        return 0.0
    rdp = [rounds * r for r in gaussian_rdp(noise_multiplier, orders, sample_rate)]
    return rdp_to_epsilon(rdp, orders, delta, conversion)[0]


def noise_for_epsilon(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, orders: Sequence[float] = DEFAULT_ORDERS
) -> float:
    """The smallest noise multiplier (to Opacus's search tolerance, 0.01 in epsilon) whose
    ``steps`` sampled Gaussian releases at ``sample_rate`` stay within ``target_epsilon``
    at ``delta``, with the orders and conversion `RdpAccountant` reports epsilon with."""
    if not target_epsilon > 0:
        raise ValueError(f"target epsilon must be > 0, not {target_epsilon}")
    if steps <= 0 or not 0 < sample_rate <= 1:
        raise ValueError(f"need steps > 0 and a sample rate in (0, 1], not {steps} and {sample_rate}")
    import warnings

    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():  # "optimal order is the largest alpha", as in rdp_to_epsilon
        warnings.simplefilter("ignore")
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate, steps=steps, alphas=list(orders)
            )
        )


@dataclass
class RdpAccountant:
    """Composition of (sampled) Gaussian releases; ``epsilon(delta)`` at any point.
    The site-level filter counts one release a round; DP-SGD one a step."""

    orders: Sequence[float] = DEFAULT_ORDERS
    conversion: str = "improved"
    rdp: list[float] = field(default_factory=list)
    releases: int = 0

    def step(self, noise_multiplier: float, count: int = 1, sample_rate: float = 1.0) -> None:
        add = gaussian_rdp(noise_multiplier, self.orders, sample_rate)
        if not self.rdp:
            self.rdp = [0.0] * len(self.orders)
        self.rdp = [r + count * a for r, a in zip(self.rdp, add)]
        self.releases += count

    def epsilon(self, delta: float) -> float:
        if not self.releases:
            return 0.0
        return rdp_to_epsilon(self.rdp, self.orders, delta, self.conversion)[0]


# ------------------------------------------------------------------------ 8-bit transfer
def quantize_int8(tensor: Tensor) -> tuple[Tensor, float]:
    """Per-tensor absmax int8: ``(q, scale)`` with ``tensor ~= q * scale``."""
    values = tensor.detach().to(torch.float32)
    absmax = float(values.abs().max()) if values.numel() else 0.0
    scale = absmax / 127.0 if absmax > 0 else 1.0
    q = torch.round(values / scale).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: Tensor, scale: float, dtype: torch.dtype = torch.float32) -> Tensor:
    return (q.to(torch.float32) * scale).to(dtype)


def quantize_state(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, list]]:
    """Quantise every floating tensor; returns the int8 tensors (other tensors as they
    are) and ``{key: [scale, dtype name]}`` for the receiver."""
    out, scales = {}, {}
    for key, value in state.items():
        if isinstance(value, Tensor) and value.is_floating_point():
            q, scale = quantize_int8(value)
            out[key] = q
            scales[key] = [scale, str(value.dtype).removeprefix("torch.")]
        else:
            out[key] = value
    return out, scales


def dequantize_state(state: Mapping[str, Tensor], scales: Mapping[str, Sequence]) -> dict[str, Tensor]:
    """Inverse of ``quantize_state`` (tensors without a scale pass through)."""
    out = {}
    for key, value in state.items():
        if key in scales:
            scale, dtype_name = scales[key]
            out[key] = dequantize_int8(value, float(scale), getattr(torch, dtype_name))
        else:
            out[key] = value
    return out


def state_num_bytes(state: Mapping[str, Tensor], scales: Mapping | None = None) -> int:
    """Bytes of tensor payload (each scale counts 4 bytes)."""
    total = sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, Tensor))
    return total + 4 * len(scales or {})
