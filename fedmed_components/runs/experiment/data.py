"""The data of an experiment: site folders cut once, before anything trains.

Each source (a real corpus with its mapping, optionally one MTSamples note type; or
synthetic notes) is split into train / val / test DOCUMENTS with a fixed seed first, so
no test note is ever seen in training; then each part is cut into sentence-level
documents (the task is sentence-level anyway) and subsampled to the configured number
of sentences. The result is what `site.load_site_data` reads, one folder per site:
`train.jsonl`, `val.jsonl`, `test.jsonl`, `manifest.json` (annotated types and
relations, counts, the seed and sizes that made it).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fedmed_components.data.document import Document, Entity, InputError, Relation, read_jsonl, write_jsonl
from fedmed_components.data.files import atomic_write_text
from fedmed_components.data.schema import ENTITY_TYPES, RELATION_TYPES, get_mapping
from fedmed_components.data.segmentation import sentence_windows, split_sentences

PARTS = ("train", "val", "test")


@dataclass
class DataSource:
    """Where one cohort's notes come from."""

    name: str
    path: str | None = None  # BRAT / BioC / JSONL corpus
    mapping: str = "kiwi"
    note_type: str | None = None  # MTSamples only: general_medicine | discharge_summary
    test_path: str | None = None  # a corpus's own test split (else cut by test_fraction)
    synthetic_style: str | None = None  # synthetic notes instead of a corpus
    synthetic_docs: int = 0
    max_test_sentences: int | None = None  # this cohort's own cap (else the sampling's)

    def annotated_types(self) -> list[str]:
        mapping = get_mapping(self.mapping)
        return [t for t in ENTITY_TYPES if t in mapping.annotated_types]

    def annotated_relations(self) -> list[str]:
        mapping = get_mapping(self.mapping)
        return [r for r in RELATION_TYPES if r in mapping.annotated_relations]


@dataclass
class Sampling:
    """How much of each cohort an experiment uses (sentences, after the document split)."""

    seed: int = 0
    test_fraction: float = 0.2
    val_fraction: float = 0.1
    max_train_sentences: int | None = None
    max_val_sentences: int | None = 32
    max_test_sentences: int | None = None


@dataclass
class PreparedSite:
    name: str
    folder: Path
    types: set[str]
    relations: set[str]
    counts: dict = field(default_factory=dict)

    def read(self, part: str) -> list[Document]:
        file = self.folder / f"{part}.jsonl"
        return read_jsonl(file) if file.exists() else []


def load_source(source: DataSource, seed: int) -> tuple[list[Document], list[Document] | None]:
    """All documents of a source (and its own test documents, if it has a test split)."""
    if source.synthetic_style:
        from fedmed_components.data.synth import generate_site_corpus

        return generate_site_corpus(source.name, source.synthetic_docs, seed, source.synthetic_style), None
    if not source.path:
        raise InputError(None, None, f"data source {source.name!r}: give a path or synthetic_style")
    from fedmed_components.data.corpora import mtsamples_note_type

    docs = _load_quietly(source.path, source.mapping, source.name)
    if source.note_type:
        docs = [d for d in docs if mtsamples_note_type(d) == source.note_type]
        if not docs:
            raise InputError(source.path, None, f"no note of type {source.note_type!r} (data source {source.name!r})")
    test = _load_quietly(source.test_path, source.mapping, source.name) if source.test_path else None
    return docs, test


def _load_quietly(path: str, mapping: str, site: str) -> list[Document]:
    """Real corpora carry a few known defects; skip them leniently, as `data convert --lenient-input` does."""
    import warnings

    from fedmed_components.data.corpora import load_corpus

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_corpus(path, mapping, lenient=True, site=site)


def sentence_documents(doc: Document, size: int = 1) -> list[Document]:
    """One document per sentence (or per run of `size` consecutive sentences: the unit a
    packed NER example holds, see prompts.document_examples); entities wholly inside it
    move along with their relations (offsets shifted); ids are `<note id>#s<NNN>`
    (`#w<NNN>` for runs of several sentences)."""
    out = []
    spans = split_sentences(doc.text) if size == 1 else sentence_windows(doc.text, size)
    tag = "s" if size == 1 else "w"
    for index, (start, end) in enumerate(spans):
        inside = [e for e in doc.entities if all(start <= s and e_ <= end for s, e_ in e.spans)]
        kept = {e.id for e in inside}
        entities = [Entity(e.id, e.type, [(s - start, e_ - start) for s, e_ in e.spans], e.text, e.negated) for e in inside]
        relations = [Relation(r.type, r.head, r.tail) for r in doc.relations if r.head in kept and r.tail in kept]
        out.append(
            Document(id=f"{doc.id}#{tag}{index:03d}", text=doc.text[start:end], site=doc.site, entities=entities, relations=relations)
        )
    return out


def _sample(items: list, limit: int | None, rng: random.Random) -> list:
    if limit is None or len(items) <= limit:
        return items
    return sorted(rng.sample(items, limit), key=lambda d: d.id)


def split_source(source: DataSource, sampling: Sampling, sentences_per_document: int = 1) -> dict[str, list[Document]]:
    """train / val / test sentence documents of one source (runs of `sentences_per_document`
    sentences, the limits then counting sentences approximately: a limit / size of runs);
    deterministic in the seed."""
    from fedmed_components.data.partition import train_test_split

    docs, own_test = load_source(source, sampling.seed)
    if own_test is not None:
        train_docs, test_docs = docs, own_test
    else:
        train_docs, test_docs = train_test_split(docs, sampling.test_fraction, sampling.seed)
    train_docs, val_docs = train_test_split(train_docs, sampling.val_fraction, sampling.seed) if sampling.val_fraction else (train_docs, [])
    limits = {
        "train": sampling.max_train_sentences,
        "val": sampling.max_val_sentences,
        "test": source.max_test_sentences or sampling.max_test_sentences,
    }
    size = sentences_per_document
    parts = {}
    for part, part_docs in (("train", train_docs), ("val", val_docs), ("test", test_docs)):
        units = [s for d in part_docs for s in sentence_documents(d, size)]
        limit = limits[part] if limits[part] is None else max(1, -(-limits[part] // size))
        parts[part] = _sample(units, limit, random.Random(f"{sampling.seed}-{source.name}-{part}"))
    return parts


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted names of the settings that differ between two recipes (e.g. source.path)."""
    changed = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return changed


def prepare_site(source: DataSource, sampling: Sampling, root: str | os.PathLike, sentences_per_document: int = 1) -> PreparedSite:
    """Write (or reuse) the site folder; a folder made with other settings is an error."""
    folder = Path(root) / source.name
    recipe = {"source": asdict(source), "sampling": asdict(sampling)}
    if sentences_per_document != 1:  # absent at 1: folders cut before the setting existed still match
        recipe["sentences_per_document"] = sentences_per_document
    manifest_file = folder / "manifest.json"
    if manifest_file.exists():
        manifest = json.loads(manifest_file.read_text())
        if manifest.get("recipe") != recipe:
            before = manifest.get("recipe") or {}
            changed = _changed_keys(before, recipe)
            raise InputError(
                manifest_file,
                None,
                f"site folder was prepared with other settings ({', '.join(changed)}); use another work folder or delete this one",
            )
    else:
        parts = split_source(source, sampling, sentences_per_document)
        for part, docs in parts.items():
            write_jsonl(docs, folder / f"{part}.jsonl")
        manifest = {
            "site": source.name,
            "annotated_types": source.annotated_types(),
            "annotated_relations": source.annotated_relations(),
            "counts": {
                part: {
                    "sentences": len(docs),
                    "spans": sum(len(d.entities) for d in docs),
                    "relations": sum(len(d.relations) for d in docs),
                    "notes": len({d.id.split("#")[0] for d in docs}),
                }
                for part, docs in parts.items()
            },
            "recipe": recipe,
        }
        # written last: a folder with a manifest is complete
        atomic_write_text(manifest_file, json.dumps(manifest, indent=2) + "\n")
    return PreparedSite(source.name, folder, set(manifest["annotated_types"]), set(manifest["annotated_relations"]), manifest["counts"])


def shots(site: PreparedSite, n: int, seed: int) -> list[Document]:
    """The first n sentences of a fixed shuffle of the site's train split (nested: 8 of 32 are the first 8)."""
    train = sorted(site.read("train"), key=lambda d: d.id)
    random.Random(f"{seed}-shots-{site.name}").shuffle(train)
    if n > len(train):
        raise InputError(site.folder / "train.jsonl", None, f"{n} shots asked, the split has {len(train)} sentences")
    return train[:n]
