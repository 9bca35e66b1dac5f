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
