"""Split a corpus into federated sites, the way a benchmark simulates hospitals.

Natural splits: by source corpus (`Document.site`) and by MTSamples note type. Synthetic
non-IID splits: Dirichlet label skew (each label's documents are spread over sites in
Dirichlet(alpha) proportions; small alpha = strong skew) and quantity skew (site sizes
in Dirichlet(alpha) proportions). Every split is deterministic given its seed and does
not depend on the order of the input documents.

`write_partition` writes what `site.load_site_data` reads: `<out>/<site>/train.jsonl`
(+ `val.jsonl`, `test.jsonl`), a per-site `manifest.json` (with `annotated_types` for
partial-schema sites) and a top-level `manifest.json` with counts per type.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from fedmed_components.data.corpora import corpus_stats, mtsamples_note_type
from fedmed_components.data.document import Document, InputError, write_jsonl
from fedmed_components.data.files import atomic_write_text
from fedmed_components.data.schema import ENTITY_TYPES, MAIN_TYPES

SiteDocs = dict[str, list[Document]]


def site_names(n_sites: int) -> list[str]:
    return [f"site-{i}" for i in range(1, n_sites + 1)]


def _by_id(docs: Iterable[Document]) -> list[Document]:
    return sorted(docs, key=lambda d: d.id)


def _group(docs: Iterable[Document], key: Callable[[Document], str]) -> SiteDocs:
    groups: SiteDocs = {}
    for doc in _by_id(docs):
        groups.setdefault(key(doc), []).append(doc)
    return dict(sorted(groups.items()))


# ---------------------------------------------------------------- natural splits


def split_by_corpus(docs: Iterable[Document], *, unknown: str = "unknown") -> SiteDocs:
    """One site per source corpus, named by `Document.site`."""
    return _group(docs, lambda d: d.site or unknown)


def split_by_note_type(docs: Iterable[Document]) -> SiteDocs:
    """MTSamples: general_medicine / discharge_summary (/ other) sites."""
    return _group(docs, mtsamples_note_type)


# ---------------------------------------------------------------- synthetic skews


def dominant_type(doc: Document) -> str:
    """A document's label for label skew: its most frequent main entity type."""
    counts = Counter(e.type for e in doc.entities if e.type in MAIN_TYPES)
    if not counts:
        return "none"
    best = max(counts.values())
    return next(t for t in MAIN_TYPES if counts[t] == best)  # ties: schema order


def _check_sites(docs: list, n_sites: int) -> None:
    if n_sites < 1:
        raise ValueError("need at least one site")
    if len(docs) < n_sites:
        raise ValueError(f"{len(docs)} document(s) cannot fill {n_sites} sites")


def _cut(items: list, proportions: np.ndarray) -> list[list]:
    """Consecutive chunks whose sizes follow the proportions (rounded down cumulatively)."""
    bounds = np.floor(np.cumsum(proportions) * len(items) + 1e-9).astype(int)
    bounds[-1] = len(items)
    starts = np.concatenate([[0], bounds[:-1]])
    return [items[s:e] for s, e in zip(starts, bounds)]


def _fill_empty_sites(parts: list[list]) -> None:
    """Move one document from the largest site to each empty one: no site is idle."""
    for empty in [p for p in parts if not p]:
        largest = max(parts, key=len)
        empty.append(largest.pop())


def _named(parts: list[list[Document]]) -> SiteDocs:
    return {name: _by_id(part) for name, part in zip(site_names(len(parts)), parts)}


def split_dirichlet(
    docs: Iterable[Document],
    n_sites: int,
    alpha: float,
    seed: int = 0,
    label: Callable[[Document], str] = dominant_type,
) -> SiteDocs:
    """Label skew: each label's documents go to sites in Dirichlet(alpha) proportions."""
    docs = _by_id(docs)
    _check_sites(docs, n_sites)
    rng = np.random.default_rng(seed)
    parts: list[list[Document]] = [[] for _ in range(n_sites)]
    for _, group in sorted(_group(docs, label).items()):
        order = rng.permutation(len(group))
        chunks = _cut([group[i] for i in order], rng.dirichlet([alpha] * n_sites))
        for part, chunk in zip(parts, chunks):
            part.extend(chunk)
    _fill_empty_sites(parts)
    return _named(parts)


def split_quantity(docs: Iterable[Document], n_sites: int, alpha: float, seed: int = 0) -> SiteDocs:
    """Quantity skew: site sizes in Dirichlet(alpha) proportions, documents at random."""
    docs = _by_id(docs)
    _check_sites(docs, n_sites)
    rng = np.random.default_rng(seed)
    shuffled = [docs[i] for i in rng.permutation(len(docs))]
    parts = _cut(shuffled, rng.dirichlet([alpha] * n_sites))
    _fill_empty_sites(parts)
    return _named(parts)


def split_iid(docs: Iterable[Document], n_sites: int, seed: int = 0) -> SiteDocs:
    """Equal-sized random sites (the IID baseline)."""
    docs = _by_id(docs)
    _check_sites(docs, n_sites)
    rng = np.random.default_rng(seed)
    shuffled = [docs[i] for i in rng.permutation(len(docs))]
    return _named([shuffled[i::n_sites] for i in range(n_sites)])


def label_distribution(docs: Iterable[Document], label: Callable[[Document], str] = dominant_type) -> dict[str, float]:
    counts = Counter(label(d) for d in docs)
    total = sum(counts.values()) or 1
    return {k: v / total for k, v in sorted(counts.items())}


# ---------------------------------------------------------------- train / test


def train_test_split(docs: Iterable[Document], test_fraction: float, seed: int = 0) -> tuple[list[Document], list[Document]]:
    """Deterministic split; at least one test document when the fraction is above 0."""
    if not 0 <= test_fraction < 1:
        raise ValueError("test_fraction must be in [0, 1)")
    shuffled = _by_id(docs)
    random.Random(seed).shuffle(shuffled)
    n_test = int(round(len(shuffled) * test_fraction))
    if test_fraction > 0 and len(shuffled) > 1:
        n_test = min(max(n_test, 1), len(shuffled) - 1)
    return _by_id(shuffled[n_test:]), _by_id(shuffled[:n_test])


# ---------------------------------------------------------------- writing


def _file_counts(docs: list[Document]) -> dict:
    stats = corpus_stats(docs)
    return {k: stats[k] for k in ("documents", "spans", "spans_per_type", "relations", "relations_per_type")}


def _site_files(docs: list[Document], test_fraction: float, val_fraction: float, seed: int) -> dict[str, list[Document]]:
    train, test = train_test_split(docs, test_fraction, seed) if test_fraction else (docs, [])
    train, val = train_test_split(train, val_fraction, seed) if val_fraction else (train, [])
    files = {"train.jsonl": train, "val.jsonl": val, "test.jsonl": test}
    return {name: part for name, part in files.items() if part or name == "train.jsonl"}


def _check_site_name(name: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise InputError(None, None, f"site name {name!r} cannot be a folder name (letters, digits, _ . -)")


def _write_json(path: Path, obj: dict) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_partition(
    site_docs: SiteDocs,
    out_dir: str | os.PathLike,
    *,
    test_fraction: float = 0.0,
    val_fraction: float = 0.0,
    seed: int = 0,
    annotated_types: dict[str, Iterable[str]] | None = None,
    info: dict | None = None,
) -> Path:
    """Write one folder per site plus manifest.json; returns the manifest path.

    Each document's `site` is set to its site's name. `annotated_types` (per site)
    marks partial-schema sites, so that training and scoring leave the rest alone.
    """
    out_dir = Path(out_dir)
    sites = {}
    for site, docs in sorted(site_docs.items()):
        _check_site_name(site)
        docs = [Document(d.id, d.text, site, d.entities, d.relations) for d in docs]
        files = _site_files(docs, test_fraction, val_fraction, seed)
        for name, part in files.items():
            write_jsonl(part, out_dir / site / name)
        entry = {"documents": len(docs), "files": {name: _file_counts(part) for name, part in files.items()}}
        if annotated_types and site in annotated_types:
            entry["annotated_types"] = [t for t in ENTITY_TYPES if t in set(annotated_types[site])]
        _write_json(out_dir / site / "manifest.json", {"site": site, **entry})
        sites[site] = entry
    manifest = {
        **(info or {}),
        "seed": seed,
        "test_fraction": test_fraction,
        "val_fraction": val_fraction,
        "sites": sites,
        "total": _file_counts([d for docs in site_docs.values() for d in docs]),
    }
    _write_json(out_dir / "manifest.json", manifest)
    return out_dir / "manifest.json"
