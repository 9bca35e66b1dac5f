"""Scoring an adapter: the `Scorer` over the prepared test sets, pooling, intervals, per-note counts.

Every trained model is scored with the same predictor and metrics on every site's test
split, their pool, and the external cohort; per-note counts are the units of the 95%
bootstrap intervals (over notes; stratified by site when pooled).
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

from fedmed_components.runs.experiment.config import ExperimentConfig, lora_settings
from fedmed_components.runs.experiment.data import PreparedSite
from fedmed_components.runs.experiment.resume import write_json_atomic
from fedmed_components.settings import BUDGET

# ---------------------------------------------------------------- pooling and intervals


def pool_scores(scores: list[dict]) -> dict:
    """Micro-average several score objects (each already restricted to its site's types)."""
    from fedmed_components.task.metrics import MODES, prf

    def summed(group: str, mode: str):
        parts = [s[group][mode] for s in scores if s.get(group)]
        if not parts:
            return None
        return prf(*(sum(p[k] for p in parts) for k in ("tp", "fp", "fn")))

    relations = {m: summed("relations", m) for m in MODES}
    mains = {m: summed("main_entities", m) for m in MODES}
    return {
        "documents": sum(s["documents"] for s in scores),
        "notes": sum(len(s.get("per_note") or {}) for s in scores),
        "entities": {m: summed("entities", m) for m in MODES},
        "main_entities": mains if mains["strict"] else None,
        "relations": relations if relations["strict"] else None,
        "parse_failures": sum(s.get("parse_failures") or 0 for s in scores),
    }


def interval_block(score: dict, per_note_by_site: dict | None = None) -> dict:
    """95% bootstrap intervals (over notes; stratified by site when pooled) of entity and
    relation strict / lenient F1 of one score object."""
    from fedmed_components.task.bootstrap import aligned_counts, bootstrap_f1

    per_note = per_note_by_site or {"all": score.get("per_note") or {}}
    out = {}
    for group in ("entities", "main_entities", "relations"):
        if not score.get(group) or not any(per_note.values()):
            continue
        out[group] = {}
        for mode in ("strict", "lenient"):
            counts, strata, _ = aligned_counts(per_note, group, mode)
            out[group][mode] = bootstrap_f1(counts, strata).as_dict()
    return out


def score_intervals(scores: dict) -> dict:
    """Intervals of each site, the pool (stratified by site) and the external cohort."""
    out = {"sites": {name: interval_block(s) for name, s in scores["sites"].items()}}
    by_site = {name: s.get("per_note") or {} for name, s in scores["sites"].items()}
    out["pooled"] = interval_block(scores["pooled"], by_site)
    if scores.get("external"):
        out["external"] = interval_block(scores["external"])
    return out


# ---------------------------------------------------------------- the scorer


class Scorer:
    """One base model in memory; any adapter is scored on the prepared test sets."""

    def __init__(self, cfg: ExperimentConfig, model_path: str, work: Path):
        from fedmed_components.model.task_model import task_model_for

        self.cfg, self.model_path, self.work = cfg, model_path, work
        self.task = task_model_for(model_path)
        self._model = None
        self._tokenizer = None

    def _load(self):
        if self._model is None:
            self._tokenizer = self.task.load_tokenizer(self.model_path)
            lora = self.task.lora_settings(lora_settings(self.cfg))
            self._model = self.task.load_trainable(self.model_path, lora, quantize=self.cfg.quantize)
        return self._model, self._tokenizer

    def release(self) -> None:
        self._model = self._tokenizer = None
        gc.collect()

    def _generation_settings(self):
        from fedmed_components.model.inference import GenerationSettings

        return GenerationSettings(
            batch_size=self.cfg.generation_batch_size, max_new_tokens=self.cfg.max_new_tokens, precision=self.cfg.precision
        )

    def _predict(self, adapter_state, docs, tasks=BUDGET.tasks):
        from fedmed_components.model.modeling import initial_adapter_from_config, set_adapter_state

        model, tokenizer = self._load()
        if adapter_state is None:
            adapter_state = initial_adapter_from_config(self.model_path, lora_settings(self.cfg), seed=self.cfg.seed)
        set_adapter_state(model, adapter_state)
        settings = self._generation_settings()
        preds, report = self.task.predict(
            model,
            tokenizer,
            docs,
            settings=settings,
            max_length=self.cfg.max_length,
            tasks=tasks,
            progress=True,
            prompt_style=self.cfg.prompt_style,
            ner_sentences=self.cfg.ner_sentences,
        )
        return preds, report.parse_failures

    def score_sets(
        self, adapter_state, sets: dict[str, PreparedSite], cache_dir: Path, predict=None, part: str = "test"
    ) -> dict[str, dict]:
        """Scores of one adapter on each named split (`part`; cached per split: a resumed
        run skips them). The splits not yet scored are predicted in one call per task set
        (a cohort that links no modifiers gets no modifier prompts), so generation
        batches stay full. `predict(docs) -> (predictions, parse failures)` replaces the
        base model's own prediction (the BERT baseline scores its own model). Parse failures are counted per call, not per split.
        Each score carries `per_note` counts, the units of the bootstrap intervals."""
        caches = {name: cache_dir / f"{name}.json" for name in sets}
        todo = [name for name in sets if not caches[name].exists()]
        for with_links in (True, False):
            group = [name for name in todo if bool(sets[name].relations) == with_links]
            if not group:
                continue
            golds = {name: sets[name].read(part) for name in group}
            every = [d for name in group for d in golds[name]]
            tasks = ("ner", "modifier") if with_links else ("ner",)
            preds, parse_failures = predict(every) if predict else self._predict(adapter_state, every, tasks)
            start = 0
            for name in group:
                gold = golds[name]
                mine, start = preds[start : start + len(gold)], start + len(gold)
                _write_score(caches[name], sets[name], gold, mine, parse_failures)
        return {name: json.loads(caches[name].read_text()) for name in sets}

    def score_modifiers_at(
        self, adapter_state, sets: dict[str, PreparedSite], cache_dir: Path, *, part: str, none_bias: float, entities_from: Path
    ) -> dict[str, dict]:
        """Scores with each entity's modifiers asked again at `none_bias`
        (inference.predict_modifiers), for the entities this adapter predicted when
        `score_sets` scored `part` into `entities_from` (greedy decoding is deterministic:
        in fp32 they are what a fresh prediction gives; in bf16 a call of other prompts may
        flip a near tie). Cached per split like score_sets."""
        from fedmed_components.data.document import InputError, read_jsonl
        from fedmed_components.model.inference import entities_only, predict_modifiers
        from fedmed_components.model.modeling import set_adapter_state

        caches = {name: cache_dir / f"{name}.json" for name in sets}
        todo = [name for name in sets if not caches[name].exists()]
        if todo:
            stored = {}
            for name in todo:
                path = entities_from / f"{name}.predictions.jsonl"
                if not path.is_file():
                    raise InputError(
                        path, None, f"the {part} predictions these modifiers re-use are not here (scored by score_sets first?)"
                    )
                stored[name] = entities_only(read_jsonl(path))
            every = [d for name in todo for d in stored[name]]
            model, tokenizer = self._load()
            set_adapter_state(model, adapter_state)
            settings = self._generation_settings()
            failures = predict_modifiers(
                model,
                tokenizer,
                every,
                settings=settings,
                progress=True,
                prompt_style=self.cfg.prompt_style,
                ner_sentences=self.cfg.ner_sentences,
                none_bias=none_bias,
            )
            for name in todo:
                _write_score(caches[name], sets[name], sets[name].read(part), stored[name], failures)
        return {name: json.loads(caches[name].read_text()) for name in sets}

    def score_all(self, adapter_state, sites: list[PreparedSite], external: PreparedSite | None, cache_dir: Path, predict=None) -> dict:
        sets = {s.name: s for s in sites}
        if external is not None:
            sets[f"external_{external.name}"] = external
        scored = self.score_sets(adapter_state, sets, cache_dir, predict)
        per_site = {s.name: scored[s.name] for s in sites}
        out = {"sites": per_site, "pooled": pool_scores(list(per_site.values()))}
        out["parse_failures"] = next(iter(scored.values()))["parse_failures_in_call"]
        if external is not None:
            out["external"] = scored[f"external_{external.name}"]
        return out


def _write_score(cache: Path, site: PreparedSite, gold, mine, parse_failures: int) -> None:
    """Score one split's predictions and cache them (predictions: work folder only, they hold note text)."""
    from fedmed_components.data.document import write_jsonl
    from fedmed_components.task.metrics import MODES, prf, score_documents

    if not site.relations:  # a cohort that links no modifiers is not scored on links
        for doc in mine:
            doc.relations = []
    write_jsonl(mine, cache.with_suffix(".predictions.jsonl"))
    result = score_documents(gold, mine, types=site.types)
    result["parse_failures"] = None  # counted for the whole call, below
    result["parse_failures_in_call"] = parse_failures
    result["per_note"] = per_note_counts(gold, mine, site.types)
    # main entities alone (problem, treatment, test, drug): the paper's NER figure,
    # summed from the per-note counts rather than matched a second time
    result["main_entities"] = {
        m: prf(*(sum(n["main_entities"][m][i] for n in result["per_note"].values()) for i in range(3))) for m in MODES
    }
    if not site.relations:
        result["relations"] = None
    write_json_atomic(cache, result)


def main_types(types) -> set[str]:
    from fedmed_components.data.schema import MAIN_TYPES

    return {t for t in MAIN_TYPES if not types or t in types}


def per_note_counts(gold, pred, types) -> dict[str, dict]:
    """[tp, fp, fn] per note (its sentence documents summed), per group and mode; groups:
    entities (all types), main_entities (problem, treatment, test, drug), relations."""
    from fedmed_components.task.bootstrap import note_id
    from fedmed_components.task.metrics import document_counts

    notes: dict[str, dict] = {}
    mains = document_counts(gold, pred, main_types(types))
    for doc_id, counts in document_counts(gold, pred, types).items():
        counts = {**counts, "main_entities": mains[doc_id]["entities"]}
        mine = notes.setdefault(note_id(doc_id), {g: {m: [0, 0, 0] for m in c} for g, c in counts.items()})
        for group, modes in counts.items():
            for mode, values in modes.items():
                mine[group][mode] = [a + b for a, b in zip(mine[group][mode], values)]
    return notes
