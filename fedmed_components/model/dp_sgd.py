"""Record-level DP-SGD for a site's LoRA parameters (Abadi et al. 2016), pure PyTorch + Opacus.

A record is one training example (one sentence's task) or one note (every example built
from it): what a privacy officer calls one patient's contribution. Each step samples
records by Poisson sampling at rate ``q = batch_size / records``, takes every record's
gradient, clips it to L2 norm ``C`` (``clip``), sums, adds ``N(0, (sigma C)^2)`` per
coordinate and divides by the expected ``q * records``; the local optimiser then steps
on that gradient (post-processing). Privacy loss: the sampled Gaussian's RDP per step,
composed over every step of every round (``privacy.RdpAccountant``, Opacus's analysis).

Opacus's ``GradSampleModule`` computes the per-example gradients (its hooks on the LoRA
``Linear`` layers; the frozen base needs none). Its ``DPOptimizer`` clips one batch row
at a time, so it cannot make a note (several rows) the record; the few lines that group
rows by record, clip and add noise are here, and tests check them against DPOptimizer
where both apply (one row per record).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

RECORDS = ("example", "note")


@dataclass(frozen=True)
class DPSGDSettings:
    """``noise_multiplier`` given, or ``target_epsilon``: then the site picks the noise that
    spends exactly that epsilon over the run's planned steps at its own sampling rate (a
    privacy officer states the budget; the site knows its record count). Once chosen, both
    are set: the noise used and the budget it was chosen for."""

    noise_multiplier: float | None
    clip: float
    delta: float = 1e-5
    record: str = "example"
    target_epsilon: float | None = None

    def __post_init__(self):
        if self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError("dp-sgd needs noise= or epsilon=")
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            raise ValueError(f"dp-sgd noise must be > 0, not {self.noise_multiplier}")
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            raise ValueError(f"dp-sgd epsilon must be > 0, not {self.target_epsilon}")
        if not self.clip > 0:
            raise ValueError(f"dp-sgd clip must be > 0, not {self.clip}")
        if not 0 < self.delta < 1:
            raise ValueError(f"dp-sgd delta must be in (0, 1), not {self.delta}")
        if self.record not in RECORDS:
            raise ValueError(f"dp-sgd record must be one of {RECORDS}, not {self.record!r}")


def parse_dp_sgd(text: str) -> DPSGDSettings | None:
    """``noise=1.1,clip=1.0,delta=1e-5,record=note`` or ``epsilon=8,clip=1.0,...`` (``""``: no DP-SGD)."""
    if not text:
        return None
    fields = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or not value.strip():
            raise ValueError(f"dp-sgd: expected key=value, got {part!r} in {text!r}")
        fields[key.strip()] = value.strip()
    known = {"noise", "epsilon", "clip", "delta", "record"}
    if set(fields) - known or "clip" not in fields or ("noise" in fields) == ("epsilon" in fields):
        raise ValueError(f"dp-sgd: needs clip= and one of noise= or epsilon= (optional delta=, record=example|note), got {text!r}")
    try:
        return DPSGDSettings(
            noise_multiplier=float(fields["noise"]) if "noise" in fields else None,
            target_epsilon=float(fields["epsilon"]) if "epsilon" in fields else None,
            clip=float(fields["clip"]),
            delta=float(fields.get("delta", 1e-5)),
            record=fields.get("record", "example"),
        )
    except ValueError as exc:
        raise ValueError(f"dp-sgd {text!r}: {exc}") from None


def record_ids(examples: list[dict], record: str) -> list:
    """The record each example belongs to: itself, or its note (``example["note"]``)."""
    if record == "example":
        return list(range(len(examples)))
    missing = [i for i, ex in enumerate(examples) if ex.get("note") is None]
    if missing:
        raise ValueError(f"dp-sgd record=note: {len(missing)} examples carry no note id (built without sft_data?)")
    return [ex["note"] for ex in examples]


def poisson_sample(num_records: int, rate: float, rng: random.Random) -> list[int]:
    """Indices of the records in this step's sample: each independently with probability ``rate``."""
    return [i for i in range(num_records) if rng.random() < rate]


def noisy_clipped_gradient(
    params: list[torch.nn.Parameter],
    per_record: list[list[torch.Tensor]],
    settings: DPSGDSettings,
    expected_records: float,
    generator: torch.Generator | None = None,
) -> list[float]:
    """Set ``p.grad`` to the DP-SGD gradient from each sampled record's gradient
    (``per_record[r][i]`` for parameter i); returns the records' norms before clipping."""
    norms = [math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads)) for grads in per_record]
    for i, p in enumerate(params):
        total = torch.zeros_like(p, dtype=torch.float32)
        for grads, norm in zip(per_record, norms):
            total.add_(grads[i].float(), alpha=min(1.0, settings.clip / (norm + 1e-6)))
        noise = torch.normal(0.0, settings.noise_multiplier * settings.clip, size=p.shape, generator=generator, device=p.device)
        p.grad = ((total + noise) / expected_records).to(p.dtype)
    return norms


def gradients_by_record(params: list[torch.nn.Parameter], rows_record: list[int]) -> dict[int, list[torch.Tensor]]:
    """Sum the rows of each parameter's ``grad_sample`` (Opacus) that belong to the same record."""
    out: dict[int, list[torch.Tensor]] = {}
    for i, p in enumerate(params):
        sample = p.grad_sample
        for row, rec in enumerate(rows_record):
            grads = out.setdefault(rec, [None] * len(params))
            grads[i] = sample[row].detach().clone() if grads[i] is None else grads[i] + sample[row]
    return out
