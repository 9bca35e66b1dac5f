"""Confidence intervals for span F1 by bootstrap over notes (pure core, numpy only).

Sentences of one note are not independent (one writer, one patient, one style), so the
resampling unit is the note: each note carries its summed (tp, fp, fn), a resample
draws notes with replacement, and F1 is recomputed from the summed counts (micro F1,
as the point estimate). Two runs scored on the same notes are compared PAIRED: every
resample takes the same notes for both, so the interval of the difference is not
widened by which notes happen to be hard. Pooled test sets are resampled within each
site (stratified), so every resample keeps each site's share of notes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 2000


def note_id(document_id: str) -> str:
    """The note a sentence-level document came from (`<note id>#s<NNN>`)."""
    return document_id.split("#", 1)[0]


def f1_from_counts(counts: np.ndarray) -> np.ndarray:
    """Micro F1 from (..., 3) arrays of summed tp, fp, fn; 0 where undefined."""
    tp, fp, fn = counts[..., 0], counts[..., 1], counts[..., 2]
    denominator = 2 * tp + fp + fn
    return np.divide(2 * tp, denominator, out=np.zeros(np.shape(tp), dtype=float), where=denominator > 0)


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float

    def as_dict(self) -> dict:
        return {"estimate": self.estimate, "low": self.low, "high": self.high}


def _resample_indices(strata: list[str], resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) note indices drawn with replacement within each stratum."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(strata)
    out = np.empty((resamples, len(labels)), dtype=np.int64)
    for label in dict.fromkeys(strata):  # first-seen order: deterministic in the input
        members = np.flatnonzero(labels == label)
        out[:, members] = members[rng.integers(0, len(members), size=(resamples, len(members)))]
    return out


def _interval(estimate: float, samples: np.ndarray, confidence: float) -> Interval:
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return Interval(float(estimate), float(low), float(high))


def bootstrap_f1(
    counts: np.ndarray, strata: list[str] | None = None, *, resamples: int = RESAMPLES, seed: int = 0, confidence: float = CONFIDENCE
) -> Interval:
    """F1 of the summed counts and its percentile interval; `counts` is (notes, 3)."""
    counts = np.asarray(counts, dtype=float).reshape(-1, 3)
    if len(counts) == 0:
        raise ValueError("no notes to resample")
    idx = _resample_indices(strata or ["all"] * len(counts), resamples, seed)
    samples = f1_from_counts(counts[idx].sum(axis=1))
    return _interval(float(f1_from_counts(counts.sum(axis=0))), samples, confidence)


def paired_difference(
    counts_a: np.ndarray,
    counts_b: np.ndarray,
    strata: list[str] | None = None,
    *,
    resamples: int = RESAMPLES,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> Interval:
    """F1(a) - F1(b) over the same notes (row i of both is note i), paired resampling."""
    a = np.asarray(counts_a, dtype=float).reshape(-1, 3)
    b = np.asarray(counts_b, dtype=float).reshape(-1, 3)
    if a.shape != b.shape:
        raise ValueError(f"paired runs need the same notes: {len(a)} against {len(b)}")
    idx = _resample_indices(strata or ["all"] * len(a), resamples, seed)
    samples = f1_from_counts(a[idx].sum(axis=1)) - f1_from_counts(b[idx].sum(axis=1))
    estimate = float(f1_from_counts(a.sum(axis=0)) - f1_from_counts(b.sum(axis=0)))
    return _interval(estimate, samples, confidence)


def aligned_counts(
    per_note: dict[str, dict[str, dict]], group: str, mode: str, notes: list[tuple[str, str]] | None = None
) -> tuple[np.ndarray, list[str], list[tuple[str, str]]]:
    """(counts, strata, notes) from a run's `per_note` block ({site: {note: {group: {mode:
    [tp, fp, fn]}}}); `notes` fixes the order (site, note) so two runs line up row by row."""
    if notes is None:
        notes = [(site, note) for site in per_note for note in sorted(per_note[site])]
    rows = []
    for site, note in notes:
        try:
            rows.append(per_note[site][note][group][mode])
        except KeyError:
            raise ValueError(f"note {site}/{note} has no {group} {mode} counts in this run") from None
    return np.asarray(rows, dtype=float).reshape(-1, 3), [site for site, _ in notes], notes
