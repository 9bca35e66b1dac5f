"""What every run kind works with: the `Experiment` (config, folders, prepared sites, base model, scorer).

Its validation scores (the sites' VALIDATION splits, never test) are the learning-curve
points a run adds to its rounds under `f1_every_round`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedmed_components.runs.experiment.config import ExperimentConfig
from fedmed_components.runs.experiment.data import PreparedSite
from fedmed_components.runs.experiment.scoring import Scorer, pool_scores, score_intervals


@dataclass
class Experiment:
    cfg: ExperimentConfig
    out: Path
    work: Path
    sites: list[PreparedSite]
    external: PreparedSite | None
    model_path: str
    scorer: Scorer

    def run_dir(self, run_id: str) -> Path:
        return self.work / "runs" / run_id

    def validation_scores(self, record: dict, state, cache: Path, label: str = "") -> None:
        """Pooled F1 of one round's adapter on the sites' VALIDATION splits (learning
        curves, and anything chosen from them: never the test split)."""
        pooled = pool_scores(list(self.scorer.score_sets(state, {s.name: s for s in self.sites}, cache, part="val").values()))
        record["val_entity_strict_f1"] = pooled["entities"]["strict"]["f1"]
        record["val_entity_lenient_f1"] = pooled["entities"]["lenient"]["f1"]
        if pooled.get("main_entities"):  # the headline figure (problem, treatment, test, drug)
            record["val_main_strict_f1"] = pooled["main_entities"]["strict"]["f1"]
        if pooled.get("relations"):
            record["val_relation_strict_f1"] = pooled["relations"]["strict"]["f1"]
            record["val_relation_lenient_f1"] = pooled["relations"]["lenient"]["f1"]
        print(
            f"    {label}validation: entity strict F1 {record['val_entity_strict_f1']:.3f}"
            + (f", main-entity strict F1 {record['val_main_strict_f1']:.3f}" if "val_main_strict_f1" in record else "")
            + (f", modifier strict F1 {record['val_relation_strict_f1']:.3f}" if "val_relation_strict_f1" in record else ""),
            flush=True,
        )

    def calibrated_modifiers(self, state, run_dir: Path, val_cache: Path) -> dict:
        """The final adapter's modifiers at the none bias chosen on validation.

        Each bias of `modifier_none_biases` asks the modifiers of the validation entities
        again (inference.predict_modifiers); the bias with the highest pooled validation
        modifier strict F1 (ties: the smaller) then scores the test notes, re-using the
        entities of the run's own test scoring. Sites that link no modifiers are left out.
        `val_cache`: where this adapter's validation scores are (or are to be) cached."""
        from fedmed_components.model.inference import choose_none_bias

        linked = {s.name: s for s in self.sites if s.relations}
        val = {}
        for bias in self.cfg.modifier_none_biases:
            if bias == 0:
                scores = self.scorer.score_sets(state, linked, val_cache, part="val")
            else:
                cache = run_dir / "calibration" / f"val_bias_{bias:g}"
                scores = self.scorer.score_modifiers_at(state, linked, cache, part="val", none_bias=bias, entities_from=val_cache)
            val[bias] = pool_scores(list(scores.values()))["relations"]["strict"]["f1"]
        chosen = choose_none_bias(val)
        print(
            f"    modifiers: validation chooses none bias {chosen:g} ({', '.join(f'{b:g}: {f:.3f}' for b, f in val.items())})", flush=True
        )
        if chosen == 0:
            per_site = self.scorer.score_sets(state, linked, run_dir / "scores")
        else:
            cache = run_dir / "calibration" / f"test_bias_{chosen:g}"
            per_site = self.scorer.score_modifiers_at(state, linked, cache, part="test", none_bias=chosen, entities_from=run_dir / "scores")
        scores = {"sites": per_site, "pooled": pool_scores(list(per_site.values()))}
        return {
            "validation_relation_strict_f1": {f"{b:g}": f for b, f in val.items()},
            "chosen_bias": chosen,
            "scores": scores,
            "intervals": score_intervals(scores),
        }

    def round_scores(self, history: list[dict], adapter_dir) -> None:
        """Validation F1 of every saved round's adapter (f1_every_round)."""
        from fedmed_components.model.modeling import load_adapter_folder

        for record in history:
            folder = adapter_dir(record["round"])
            if not folder.exists() or "val_entity_strict_f1" in record:
                continue
            state, _, _ = load_adapter_folder(folder)
            self.validation_scores(record, state, folder.parent / "round_scores" / f"round_{record['round']:03d}")

    def site_adapter_scores(self, history: list[dict], folder: Path) -> None:
        """Validation F1 of each site's own adapter of every round, kept before the mean
        (`site_adapter_f1`), into each round's record under "site_adapters"."""
        from fedmed_components.model.modeling import load_adapter_folder

        for record in history:
            name = f"round_{record['round']:03d}"
            scored = record.setdefault("site_adapters", {})
            for site in self.sites:
                adapter = folder / site.name / name
                if site.name in scored or not adapter.is_dir():
                    continue
                state, _, _ = load_adapter_folder(adapter)
                scored[site.name] = {}
                self.validation_scores(scored[site.name], state, folder / "scores" / site.name / name, label=f"{site.name}'s own adapter, ")
            if not scored:
                del record["site_adapters"]

    def personalised_scores(self, history: list[dict], folder: Path) -> dict:
        """Each site's own adapter (kept under `personalised`) scored on that site's own
        split: validation every round (into each round's record under "personalised": what
        a choice may use), test for the last round (returned with its intervals). The
        validation cache is the one `site_adapter_scores` fills, so each is made once."""
        from fedmed_components.data.document import InputError
        from fedmed_components.model.modeling import load_adapter_folder

        def own_scores(round_number: int, part: str, cache: str) -> dict:
            name = f"round_{round_number:03d}"
            scores = {}
            for site in self.sites:
                adapter = folder / site.name / name
                if not adapter.is_dir():
                    raise InputError(
                        adapter, None, f"personalised: {site.name}'s own adapter of {name} is not here (was the run trained with it kept?)"
                    )
                state, _, _ = load_adapter_folder(adapter)
                scores[site.name] = self.scorer.score_sets(state, {site.name: site}, folder / cache / site.name / name, part=part)[
                    site.name
                ]
            return scores

        for record in history:
            pooled = pool_scores(list(own_scores(record["round"], "val", "scores").values()))
            record["personalised"] = {
                "val_main_strict_f1": pooled["main_entities"]["strict"]["f1"] if pooled.get("main_entities") else None,
                "val_relation_strict_f1": pooled["relations"]["strict"]["f1"] if pooled.get("relations") else None,
            }
        print("    personalised: each site's own last adapter on its own test notes", flush=True)
        per_site = own_scores(history[-1]["round"], "test", "test_scores")
        scores = {"sites": per_site, "pooled": pool_scores(list(per_site.values()))}
        return {"round": history[-1]["round"], "scores": scores, "intervals": score_intervals(scores)}
