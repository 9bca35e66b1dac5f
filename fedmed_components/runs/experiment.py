"""A named evaluation experiment, end to end: config -> data -> runs -> results folder.

`ExperimentConfig` (read from YAML) names the sites, the external / new-site cohort,
the model and the training budget, and the runs to make. `run_experiment` cuts the
site folders once (test split held out before anything trains, see experiment_data),
then makes each run in order:

- zero_shot: the base model with the untrained adapter (LoRA B = 0);
- single: one adapter per site trained on that site alone (one run per site);
- centralised: one adapter trained on the pooled sites, as many steps as a federation;
- fed_medlora | fed_medlora_plus | fed_medlora_plus_server | fedsa_lora | fed_exact_lora:
  a FLARE simulator run of the exported job folder (the product's own job builder);
- bert: BERT token classification (token_classification.py) on the pooled sites, centralised budget;
- new_site: fine-tune on N sentences of the new cohort from the federated global adapter
  and from scratch (N in new_site_shots), scored on that cohort's test split.

Every trained model is scored with the same predictor and metrics on every site's test
split, their pool, and the external cohort. Each finished run writes `<run>.json`
(atomically) into the results folder; a run whose JSON exists is skipped, and an
interrupted run resumes from its last saved round. Bulky and text-bearing artefacts
(site data, adapters, predictions, simulator workspaces) live in the work folder.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from fedmed_components.data.document import InputError
from fedmed_components.runs.experiment_data import DataSource, PreparedSite, Sampling, prepare_site, shots

log = logging.getLogger("fedmed.experiment")

FEDERATED = {  # run name -> (job algorithm, Fed-MedLoRA+ loss source)
    "fed_medlora": ("fed_medlora", "sites"),
    "fed_medlora_plus": ("fed_medlora_plus", "sites"),
    "fed_medlora_plus_server": ("fed_medlora_plus", "server"),
    "fedsa_lora": ("fedsa_lora", "sites"),
    "fed_exact_lora": ("fed_exact_lora", "sites"),
}
RUN_KINDS = ("zero_shot", "single", "centralised", *FEDERATED, "bert", "new_site")


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    model: str = "smollm2-135m"
    quantize: str = "auto"  # auto: NF4 on CUDA (8B on GPUs), unquantised on CPU
    seed: int = 0
    rank: int = 16
    alpha: int = 64
    rounds: int = 3
    local_steps: int | None = 20  # per site per round; None: local_epochs
    local_epochs: float = 1.0
    batch_size: int = 4
    max_length: int = 800
    lr: float = 2e-4
    max_val_examples: int = 64
    generation_batch_size: int = 16
    max_new_tokens: int = 256  # cap on an answer (the input sentence with tags)
    # "run": one warm-up + cosine across all rounds, AdamW kept between rounds (at every
    # site); "round": the paper's restart of both every round
    schedule: str = "run"
    precision: str = "auto"  # training and generation: auto | fp32 | bf16 (precision.py)
    prompt_style: str = "paper"  # paper | compact (prompts.PROMPT_STYLES): training and scoring alike
    f1_every_round: bool = False  # score every round's adapter on the sites' pooled VALIDATION split (learning curves)
    checkpoints_per_round: int = 1  # centralised: a learning-curve point this many times per round
    simulator_timeout: float = 7200
    sampling: Sampling = field(default_factory=Sampling)
    sites: list[DataSource] = field(default_factory=list)
    external: DataSource | None = None  # a cohort no site trains on; also the new site
    new_site_shots: list[int] = field(default_factory=lambda: [8, 32])
    new_site_seeds: list[int] = field(default_factory=lambda: [0])  # which shots are drawn; mean and spread over these
    new_site_steps: int = 20
    new_site_from: str = "fed_medlora_plus"  # whose global adapter the new site starts from
    bert_model: str = "minilm"  # the BERT baseline's encoder (Bio_ClinicalBERT id on a GPU machine)
    bert_lr: float = 1e-3
    bert_local_steps: int | None = None  # per site per round, pooled like centralised; None: local_steps (an encoder step is ~100x cheaper)
    runs: list[str] = field(default_factory=lambda: list(RUN_KINDS))

    def run_ids(self) -> list[str]:
        """Run kinds expanded into concrete runs, in the order they are made."""
        ids = []
        for kind in self.runs:
            if kind == "single":
                ids += [f"single_{s.name}" for s in self.sites]
            elif kind == "new_site":
                if self.external is None:
                    raise ValueError("run new_site needs an external cohort")
                ids += [
                    new_site_id(start, n, seed, len(self.new_site_seeds) > 1)
                    for seed in self.new_site_seeds
                    for n in self.new_site_shots
                    for start in ("scratch", "federated")
                ]
            else:
                ids.append(kind)
        return ids

    def to_dict(self) -> dict:
        return asdict(self)


def new_site_id(start: str, shots: int, seed: int, with_seed: bool) -> str:
    return f"new_site_{start}_{shots}" + (f"_s{seed}" if with_seed else "")


def parse_new_site_id(run_id: str) -> tuple[str, int, int | None]:
    """(start, shots, seed or None) of a new-site run id."""
    parts = run_id[len("new_site_") :].split("_")
    seed = int(parts.pop()[1:]) if parts[-1].startswith("s") else None
    return parts[0], int(parts[1]), seed


def load_config(path: str | os.PathLike) -> ExperimentConfig:
    """Read a YAML experiment config; relative data paths are relative to the file."""
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        raise InputError(path, None if line is None else line + 1, f"not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise InputError(path, None, "an experiment config is a mapping of settings")

    def build(cls, data, where: str):
        if not isinstance(data, dict):
            raise InputError(path, None, f"{where}: expected a mapping")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(path, _line_of(path, unknown[0]), f"{where}: unknown setting(s) {unknown}; known: {sorted(known)}")
        return data

    def source(data, where):
        src = DataSource(**build(DataSource, data, where))
        for attr in ("path", "test_path"):
            value = getattr(src, attr)
            if value and not Path(value).is_absolute():
                setattr(src, attr, str((path.parent / value).resolve()))
        return src

    top = dict(build(ExperimentConfig, raw, "experiment"))
    top["sampling"] = Sampling(**build(Sampling, top.get("sampling", {}), "sampling"))
    top["sites"] = [source(s, f"sites[{i}]") for i, s in enumerate(top.get("sites") or [])]
    if top.get("external"):
        top["external"] = source(top["external"], "external")
    cfg = ExperimentConfig(**top)
    if not cfg.sites:
        raise InputError(path, None, "an experiment needs at least one site")
    if cfg.schedule not in ("run", "round"):
        raise InputError(path, _line_of(path, "schedule"), f"schedule must be run or round, not {cfg.schedule!r}")
    from fedmed_components.task.prompts import PROMPT_STYLES

    if cfg.prompt_style not in PROMPT_STYLES:
        raise InputError(
            path, _line_of(path, "prompt_style"), f"prompt_style must be one of {sorted(PROMPT_STYLES)}, not {cfg.prompt_style!r}"
        )
    bad = [r for r in cfg.runs if r not in RUN_KINDS]
    if bad:
        raise InputError(path, _line_of(path, bad[0]), f"unknown run(s) {bad}; known: {list(RUN_KINDS)}")
    return cfg


def _line_of(path: Path, word: str) -> int | None:
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if word in line:
            return number
    return None


# ---------------------------------------------------------------- results


def write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


def read_results(out: str | os.PathLike, run_ids: list[str] | None = None) -> dict[str, dict]:
    """The finished runs' JSON, by run id (in the given order when given)."""
    out = Path(out)
    if run_ids is None:
        run_ids = sorted(p.stem for p in out.glob("*.json") if p.name != "experiment.json")
    return {r: json.loads((out / f"{r}.json").read_text()) for r in run_ids if (out / f"{r}.json").exists()}


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


# ---------------------------------------------------------------- scoring


class Scorer:
    """One base model in memory; any adapter is scored on the prepared test sets."""

    def __init__(self, cfg: ExperimentConfig, model_path: str, work: Path):
        self.cfg, self.model_path, self.work = cfg, model_path, work
        self._model = None
        self._tokenizer = None

    def _load(self):
        if self._model is None:
            from fedmed_components.model.modeling import LoraSettings, attach_lora, load_base_model, load_tokenizer

            self._tokenizer = load_tokenizer(self.model_path)
            self._model = attach_lora(
                load_base_model(self.model_path, quantize=self.cfg.quantize), LoraSettings(r=self.cfg.rank, alpha=self.cfg.alpha)
            )
        return self._model, self._tokenizer

    def release(self) -> None:
        self._model = self._tokenizer = None
        gc.collect()

    def _predict_llm(self, adapter_state, docs, tasks=("ner", "modifier")):
        from fedmed_components.model.inference import GenerationSettings, predict_documents
        from fedmed_components.model.modeling import initial_adapter_from_config, set_adapter_state

        model, tokenizer = self._load()
        if adapter_state is None:
            adapter_state = initial_adapter_from_config(self.model_path, _lora(self.cfg), seed=self.cfg.seed)
        set_adapter_state(model, adapter_state)
        settings = GenerationSettings(
            batch_size=self.cfg.generation_batch_size, max_new_tokens=self.cfg.max_new_tokens, precision=self.cfg.precision
        )
        preds, report = predict_documents(
            model, tokenizer, docs, tasks=tasks, settings=settings, progress=True, prompt_style=self.cfg.prompt_style
        )
        return preds, report.parse_failures

    def score_sets(
        self, adapter_state, sets: dict[str, PreparedSite], cache_dir: Path, predict=None, part: str = "test"
    ) -> dict[str, dict]:
        """Scores of one adapter on each named split (`part`; cached per split: a resumed
        run skips them). The splits not yet scored are predicted in one call per task set
        (a cohort that links no modifiers gets no modifier prompts), so generation
        batches stay full. `predict(docs) -> (predictions, parse failures)` replaces the
        LLM (the BERT baseline). Parse failures are counted per call, not per split.
        Each score carries `per_note` counts, the units of the bootstrap intervals."""
        from fedmed_components.data.document import write_jsonl
        from fedmed_components.task.metrics import MODES, prf, score_documents

        caches = {name: cache_dir / f"{name}.json" for name in sets}
        todo = [name for name in sets if not caches[name].exists()]
        for with_links in (True, False):
            group = [name for name in todo if bool(sets[name].relations) == with_links]
            if not group:
                continue
            golds = {name: sets[name].read(part) for name in group}
            every = [d for name in group for d in golds[name]]
            tasks = ("ner", "modifier") if with_links else ("ner",)
            preds, parse_failures = predict(every) if predict else self._predict_llm(adapter_state, every, tasks)
            start = 0
            for name in group:
                site, gold = sets[name], golds[name]
                mine, start = preds[start : start + len(gold)], start + len(gold)
                if not site.relations:  # a cohort that links no modifiers is not scored on links
                    for doc in mine:
                        doc.relations = []
                write_jsonl(mine, caches[name].with_suffix(".predictions.jsonl"))  # note text: work folder only
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
                write_json_atomic(caches[name], result)
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


def _lora(cfg: ExperimentConfig):
    from fedmed_components.model.modeling import LoraSettings

    return LoraSettings(r=cfg.rank, alpha=cfg.alpha)


# ---------------------------------------------------------------- communication


def full_model_parameters(model_path: str) -> int:
    """Parameters of the base model, counted on the meta device (no weights loaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def communication(adapter_state, model_path: str, rounds: int, sites: int) -> dict:
    """What travels per round per site: the fp32 adapter, versus full-model FedAvg in fp32."""
    from fedmed_components.model.modeling import adapter_num_bytes

    adapter = adapter_num_bytes(adapter_state)
    full = full_model_parameters(model_path) * 4
    return {
        "rounds": rounds,
        "sites": sites,
        "adapter_bytes_per_round_per_site": adapter,
        "full_model_bytes_per_round_per_site": full,
        "adapter_over_full": adapter / full,
        "total_adapter_bytes": adapter * rounds * sites,
        "total_full_model_bytes": full * rounds * sites,
    }


# ---------------------------------------------------------------- training runs


def _site_config(
    cfg: ExperimentConfig,
    steps: int | None,
    tasks=("ner", "modifier"),
    batch_size: int | None = None,
    model: str | None = None,
    lr: float | None = None,
    schedule_rounds: int | None = None,
):
    from fedmed_components.model.site import SiteConfig
    from fedmed_components.model.training import TrainSettings
    from fedmed_components.task.examples import SFTConfig

    return SiteConfig(
        model=model or cfg.model,
        quantize=cfg.quantize,
        lora=_lora(cfg),
        train=TrainSettings(
            learning_rate=lr or cfg.lr,
            batch_size=batch_size or cfg.batch_size,
            max_length=cfg.max_length,
            local_epochs=cfg.local_epochs,
            max_steps=steps,
            seed=cfg.seed,
            schedule_rounds=schedule_rounds if cfg.schedule == "run" else None,
            keep_optimizer_state=cfg.schedule == "run",
            precision=cfg.precision,
        ),
        sft=SFTConfig(tasks=tuple(tasks), prompt_style=cfg.prompt_style),
        val_fraction=0.0,
        max_val_examples=cfg.max_val_examples,
        seed=cfg.seed,
    )


def train_locally(
    cfg: ExperimentConfig,
    folders: list[Path],
    run_dir: Path,
    *,
    rounds: int,
    steps: int | None,
    initial_state=None,
    tasks=("ner", "modifier"),
    batch_size: int | None = None,
    model: str | None = None,
    lr: float | None = None,
    after_round=None,
) -> list[dict]:
    """Rounds of the sites' own trainer on one folder or several pooled; every round's
    adapter is saved, so an interrupted run resumes after its last saved round (AdamW's
    moments, kept between rounds under schedule "run", restart on a resume).
    `after_round(record, state)` may add to a round's record (validation F1)."""
    from fedmed_components.model.modeling import load_adapter_folder, save_adapter_folder
    from fedmed_components.model.site import SiteRuntime

    log_file = run_dir / "rounds.json"
    history = json.loads(log_file.read_text()) if log_file.exists() else []
    done = len(history)
    if done >= rounds:
        return history
    runtime = SiteRuntime(_site_config(cfg, steps, tasks, batch_size, model, lr, schedule_rounds=rounds), site_name=run_dir.name)
    runtime.load_data(*folders)
    state = initial_state
    if done:
        state, _, _ = load_adapter_folder(run_dir / f"round_{done - 1:03d}")
    runtime.trainer.rounds_done = done  # batch order and schedule segment of round k do not depend on restarts
    for rnd in range(done, rounds):
        state, stats = runtime.train(state, progress=True)
        val_loss, _ = runtime.validation_loss()
        save_adapter_folder(state, runtime.config.lora, runtime.model_path, run_dir / f"round_{rnd:03d}")
        record = {
            "round": rnd,
            "steps": stats.steps,
            "examples": (rnd + 1) * stats.steps * runtime.config.train.batch_size,
            "train_loss": stats.train_loss,
            "val_loss": None if math.isnan(val_loss) else val_loss,
            "num_supervised_tokens": stats.num_supervised_tokens,
            "seconds": round(stats.seconds, 1),
        }
        print(
            f"  {run_dir.name} round {rnd + 1}/{rounds}: {stats.steps} steps in {stats.seconds:.0f} s, "
            f"train loss {stats.train_loss:.4f}, val loss {val_loss:.4f}",
            flush=True,
        )
        if after_round is not None:
            after_round(record, state)
        history.append(record)
        write_json_atomic(log_file, history)
        state = {k: v.clone() for k, v in state.items()}
    del runtime
    gc.collect()
    return history


def train_federated(cfg: ExperimentConfig, run_id: str, sites: list[PreparedSite], data_root: Path, run_dir: Path) -> list[dict]:
    """The exported FLARE job in the simulator; the persistor's store resumes a cut run."""
    from fedmed_components.flare.job import JobSpec, export_job, run_simulator

    algorithm, loss_source = FEDERATED[run_id]
    store = run_dir / "store"
    state_file = store / "state.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    if state.get("last_round") is None or int(state["last_round"]) < cfg.rounds - 1:
        spec = JobSpec(
            name=run_id,
            algorithm=algorithm,
            model=cfg.model,
            sites=[s.name for s in sites],
            num_rounds=cfg.rounds,
            min_clients=len(sites),
            local_steps=cfg.local_steps,
            local_epochs=cfg.local_epochs,
            batch_size=cfg.batch_size,
            max_length=cfg.max_length,
            learning_rate=cfg.lr,
            rank=cfg.rank,
            alpha=cfg.alpha,
            data=str(data_root),
            quantize=cfg.quantize,
            loss_source=loss_source,
            server_val_data=str(data_root / "server_val.jsonl") if loss_source == "server" else None,
            output_dir=str(store),
            train_timeout=int(cfg.simulator_timeout),
            eval_timeout=int(cfg.simulator_timeout),
            extra_site_args=f"--val-fraction 0 --max-val-examples {cfg.max_val_examples} --seed {cfg.seed}"
            + (f" --keep-optimizer-state --schedule-rounds {cfg.rounds}" if cfg.schedule == "run" else "")
            + (f" --precision {cfg.precision}" if cfg.precision != "auto" else "")
            + (f" --prompt-style {cfg.prompt_style}" if cfg.prompt_style != "paper" else ""),
        )
        job_dir = export_job(spec, run_dir / "job")
        print(f"  {run_id}: FLARE simulator, {len(sites)} sites x {cfg.rounds} rounds (log: {run_dir / 'simulator.log'})", flush=True)
        run_simulator(job_dir, run_dir / "simulator", spec.sites, timeout=cfg.simulator_timeout, log_file=run_dir / "simulator.log")
        state = json.loads(state_file.read_text())
    history = []
    for record in state.get("history", []):
        rnd = record.get("current_round")
        history.append(
            {
                "round": rnd,
                "train_loss": record.get("train_loss"),
                "examples": None if rnd is None or not cfg.local_steps else (rnd + 1) * cfg.local_steps * cfg.batch_size * len(sites),
                "val_loss": record.get("val_loss"),
                "weights": record.get("weights"),
                "num_supervised_tokens": record.get("num_supervised_tokens"),
            }
        )
    return history


# ---------------------------------------------------------------- the experiment


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

    def validation_scores(self, record: dict, state, cache: Path) -> None:
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
            f"    validation: entity strict F1 {record['val_entity_strict_f1']:.3f}"
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

    def make_run(self, run_id: str) -> dict:
        from fedmed_components.model.modeling import default_device, load_adapter_folder
        from fedmed_components.model.precision import resolve_precision

        cfg, run_dir = self.cfg, self.run_dir(run_id)
        _start_over_if_changed(run_id, cfg, run_dir)
        folders = [s.folder for s in self.sites]
        # precision "auto" is bf16 on a CPU with AVX512-BF16 and fp32 on one without: say which ran
        result: dict = {"run": run_id, "status": "done", "resolved_precision": resolve_precision(cfg.precision, default_device())}

        def after_round(record, state):
            if cfg.f1_every_round:
                self.validation_scores(record, state, run_dir / "round_scores" / f"round_{record['round']:03d}")

        if run_id == "zero_shot":
            scores = self.scorer.score_all(None, self.sites, self.external, run_dir / "scores")
            result.update(kind="zero_shot", rounds=[], scores=scores, intervals=score_intervals(scores))
            return result
        if run_id == "bert":
            return {**result, **bert_baseline(self)}
        if run_id.startswith("new_site_"):
            return {**result, **self.new_site_run(run_id, run_dir)}
        if run_id.startswith("single_"):
            site = next(s for s in self.sites if f"single_{s.name}" == run_id)
            history = train_locally(cfg, [site.folder], run_dir, rounds=cfg.rounds, steps=cfg.local_steps, after_round=after_round)
            kind, trained_on, n_sites, last = "single_site", [site.name], 1, cfg.rounds - 1
            adapter_dir = lambda r: run_dir / f"round_{r:03d}"  # noqa: E731
        elif run_id == "centralised":
            # the federation's total budget; checkpoints_per_round pieces a round (learning-curve points)
            pieces = cfg.rounds * cfg.checkpoints_per_round
            steps = cfg.local_steps * len(self.sites) // cfg.checkpoints_per_round if cfg.local_steps else None
            history = train_locally(cfg, folders, run_dir, rounds=pieces, steps=steps, after_round=after_round)
            kind, trained_on, n_sites, last = "centralised", [s.name for s in self.sites], 1, pieces - 1
            adapter_dir = lambda r: run_dir / f"round_{r:03d}"  # noqa: E731
        elif run_id in FEDERATED:
            history = train_federated(cfg, run_id, self.sites, self.work / "data", run_dir)
            kind, trained_on, n_sites, last = "federated", [s.name for s in self.sites], len(self.sites), cfg.rounds - 1
            adapter_dir = lambda r: run_dir / "store" / f"round_{r:03d}"  # noqa: E731
            if cfg.f1_every_round:
                self.round_scores(history, adapter_dir)
        else:
            raise ValueError(f"unknown run {run_id!r}")
        state, _, _ = load_adapter_folder(adapter_dir(last))
        print(f"  {run_id}: scoring every test note", flush=True)
        scores = self.scorer.score_all(state, self.sites, self.external, run_dir / "scores")
        result.update(kind=kind, trained_on=trained_on, rounds=history, scores=scores, intervals=score_intervals(scores))
        if kind == "federated":
            result["communication"] = communication(state, self.model_path, cfg.rounds, n_sites)
        return result

    def new_site_run(self, run_id: str, run_dir: Path) -> dict:
        """Fine-tune on N sentences of the new cohort, from scratch or from the federated global adapter."""
        from fedmed_components.data.document import write_jsonl
        from fedmed_components.model.modeling import load_adapter_folder

        cfg, site = self.cfg, self.external
        start, n, seed = parse_new_site_id(run_id)
        seed = cfg.new_site_seeds[0] if seed is None else seed
        initial = None
        if start == "federated":
            if cfg.new_site_from not in FEDERATED:
                raise InputError(None, None, f"new_site_from: {cfg.new_site_from!r} is not a federated run ({sorted(FEDERATED)})")
            source = self.run_dir(cfg.new_site_from)
            global_dir = source / "store" / "global"
            if not global_dir.exists():
                # Adapters are never committed: a results folder resumed on a fresh machine holds
                # the source run's JSON but not its weights, so its training (not its scoring) is re-made.
                print(f"  {run_id}: the global adapter of {cfg.new_site_from} is not in {source}; training it again", flush=True)
                train_federated(cfg, cfg.new_site_from, self.sites, self.work / "data", source)
            initial, _, _ = load_adapter_folder(global_dir)
        data = run_dir / "data"
        if not (data / "train.jsonl").exists():
            write_jsonl(shots(site, n, seed), data / "train.jsonl")
            write_jsonl(site.read("val"), data / "val.jsonl")
            (data / "manifest.json").write_text(json.dumps({"annotated_types": sorted(site.types)}))
        # A cohort that links no modifiers to entities cannot teach the modifier task.
        tasks = ("ner", "modifier") if site.relations else ("ner",)
        history = train_locally(
            cfg, [data], run_dir, rounds=1, steps=cfg.new_site_steps, initial_state=initial, tasks=tasks, batch_size=min(cfg.batch_size, n)
        )
        state, _, _ = load_adapter_folder(run_dir / "round_000")
        score = self.scorer.score_sets(state, {f"external_{site.name}": site}, run_dir / "scores")[f"external_{site.name}"]
        return {
            "kind": "new_site",
            "start": start,
            "shots": n,
            "shot_seed": seed,
            "tasks": list(tasks),
            "started_from": cfg.new_site_from if start == "federated" else None,
            "rounds": history,
            "scores": {"external": score},
            "intervals": {"external": interval_block(score)},
        }


def bert_baseline(exp: Experiment) -> dict:
    """BERT token classification (LoRA + tagging head) trained on the pooled sites with the
    centralised budget by the sites' own runtime, scored with the same metrics."""
    from fedmed_components.model import token_classification as tc
    from fedmed_components.model.modeling import resolve_model

    cfg, run_dir = exp.cfg, exp.run_dir("bert")
    try:
        model_path = resolve_model(cfg.bert_model)
    except Exception as exc:  # the offline encoder package may be absent
        return {"kind": "bert", "status": f"not available: {cfg.bert_model}: {exc}"}
    per_site = cfg.bert_local_steps or cfg.local_steps
    steps = per_site * len(exp.sites) if per_site else None
    history = train_locally(
        cfg, [s.folder for s in exp.sites], run_dir, rounds=cfg.rounds, steps=steps, model=cfg.bert_model, lr=cfg.bert_lr
    )
    tokenizer = tc.load_tokenizer(model_path)
    model = tc.load_model(model_path, _lora(cfg), adapter=str(run_dir / f"round_{cfg.rounds - 1:03d}"))

    def predict(docs):
        return tc.predict_documents_bert(
            model, tokenizer, docs, max_length=cfg.max_length, batch_size=cfg.generation_batch_size, progress=True
        ), 0

    scores = exp.scorer.score_all(None, exp.sites, exp.external, run_dir / "scores", predict=predict)
    return {
        "kind": "bert",
        "model": cfg.bert_model,
        "trained_on": [s.name for s in exp.sites],
        "rounds": history,
        "scores": scores,
        "intervals": score_intervals(scores),
    }


def prepare(cfg: ExperimentConfig, work: Path) -> tuple[list[PreparedSite], PreparedSite | None]:
    """Cut every site folder (test held out first), and the server's validation file."""
    from fedmed_components.data.document import write_jsonl

    data = work / "data"
    sites = [prepare_site(s, cfg.sampling, data) for s in cfg.sites]
    external = prepare_site(cfg.external, cfg.sampling, work / "external") if cfg.external else None
    server_val = data / "server_val.jsonl"
    if not server_val.exists():  # Fed-MedLoRA+ (server): the pooled validation splits, held by the server
        write_jsonl([d for s in sites for d in s.read("val")], server_val)
    return sites, external


def run_experiment(
    cfg: ExperimentConfig, out: str | os.PathLike, *, work: str | os.PathLike | None = None, only: list[str] | None = None
) -> dict[str, dict]:
    from fedmed_components.model.modeling import resolve_model
    from fedmed_components.runs.experiment_report import write_report

    out = Path(out).resolve()
    work = Path(work).resolve() if work else out / "work"
    out.mkdir(parents=True, exist_ok=True)
    run_ids = cfg.run_ids()
    if only:
        unknown = sorted(set(only) - set(run_ids))
        if unknown:
            raise InputError(None, None, f"--only: unknown run(s) {unknown}; this experiment has {run_ids}")
        run_ids = [r for r in run_ids if r in only]
    started = time.perf_counter()
    _refuse_other_config(cfg, out, run_ids)
    sites, external = prepare(cfg, work)
    write_json_atomic(
        out / "experiment.json",
        {
            "config": cfg.to_dict(),
            "runs": cfg.run_ids(),
            "data": {s.name: s.counts for s in sites + ([external] if external else [])},
        },
    )
    print(
        f"{cfg.name}: {len(sites)} sites ({', '.join(s.name for s in sites)})"
        + (f", external {external.name}" if external else "")
        + f"; data in {work / 'data'}",
        flush=True,
    )
    exp = Experiment(cfg, out, work, sites, external, resolve_model(cfg.model), None)
    exp.scorer = Scorer(cfg, exp.model_path, work)
    failed: list[str] = []
    for i, run_id in enumerate(run_ids, start=1):
        target = out / f"{run_id}.json"
        if target.exists():
            print(f"[{i}/{len(run_ids)}] {run_id}: finished earlier, skipped", flush=True)
            continue
        lock = _claim(exp.run_dir(run_id))
        if lock is None:
            print(f"[{i}/{len(run_ids)}] {run_id}: being made by another live process, skipped", flush=True)
            continue
        print(f"[{i}/{len(run_ids)}] {run_id}", flush=True)
        run_started = time.perf_counter()
        try:
            result = exp.make_run(run_id)
        except Exception as exc:  # one failed run must not cost the others; no JSON: a re-run retries it
            log.exception("run %s failed", run_id)
            print(f"[{i}/{len(run_ids)}] {run_id}: FAILED ({type(exc).__name__}: {exc}); continuing", flush=True)
            failed.append(run_id)
            continue
        finally:
            lock.unlink(missing_ok=True)
        result["seconds"] = round(time.perf_counter() - run_started, 1)
        result["config"] = {k: v for k, v in cfg.to_dict().items() if k not in ("sites", "external", "runs")}
        write_json_atomic(target, result)
        print(f"[{i}/{len(run_ids)}] {run_id}: {result['status']} in {result['seconds']:.0f} s{_headline(result)}", flush=True)
        write_report(cfg, read_results(out, cfg.run_ids()), out)  # partial results are readable at any time
    results = read_results(out, cfg.run_ids())
    write_report(cfg, results, out)
    print(
        f"results: {out} ({len(results)} runs, this call {time.perf_counter() - started:.0f} s)"
        + (f"; FAILED: {', '.join(failed)} (re-run to retry)" if failed else ""),
        flush=True,
    )
    if failed:
        raise RuntimeError(f"{len(failed)} run(s) failed: {', '.join(failed)}")
    return results


# Settings that change no number in a result: a folder made with other values of these
# may be resumed (greedy batched generation equals one-at-a-time: tests/test_inference.py).
OPERATIONAL_SETTINGS = ("name", "runs", "sites", "external", "simulator_timeout", "generation_batch_size")
# Settings only some runs depend on: changing them re-makes just those runs once their JSON is deleted.
RUN_SETTINGS = {
    "bert": ("bert_model", "bert_lr", "bert_local_steps"),
    "centralised": ("checkpoints_per_round",),
    "new_site": ("new_site_shots", "new_site_seeds", "new_site_steps", "new_site_from"),
}


def _settings_of(run_id: str, config: dict) -> dict:
    """The settings a run's numbers depend on (where the data lies is not compared: a
    results folder moved to another machine is the same experiment)."""
    own = next((keys for kind, keys in RUN_SETTINGS.items() if run_id.startswith(kind)), ())
    others = {k for keys in RUN_SETTINGS.values() for k in keys} - set(own)
    return {k: v for k, v in config.items() if k not in OPERATIONAL_SETTINGS and k not in others}


def _differing(made_with: dict, wanted: dict) -> list[str]:
    """Settings that differ; one a run was made without (a setting added since) counts as
    its default, so adding a setting does not invalidate finished runs."""
    defaults = ExperimentConfig().to_dict()
    return sorted(k for k in set(made_with) | set(wanted) if made_with.get(k, defaults.get(k)) != wanted.get(k, defaults.get(k)))


def _start_over_if_changed(run_id: str, cfg: ExperimentConfig, run_dir: Path) -> None:
    """A run resumes from its saved rounds and scores only if they were made with the
    settings it has now; otherwise its work folder (no result yet) is cleared first,
    all but this process's claim on it (running.pid)."""
    wanted = _settings_of(run_id, cfg.to_dict())
    marker = run_dir / "settings.json"
    differ = _differing(json.loads(marker.read_text()), wanted) if marker.exists() else []
    if differ:
        print(f"  {run_id}: its saved rounds were made with other settings ({', '.join(differ)}): starting it over", flush=True)
        for item in run_dir.iterdir():
            if item.is_dir():
                shutil.rmtree(item)
            elif item.name != "running.pid":
                item.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(marker, wanted)


def _refuse_other_config(cfg: ExperimentConfig, out: Path, run_ids: list[str]) -> None:
    """A results folder holds one experiment: resuming it with changed settings would mix
    runs made under different configs in one table. Refuse before anything runs, naming the
    runs and settings; a run whose JSON was deleted is simply made again."""
    current = cfg.to_dict()
    stale = {}
    for run_id in run_ids:
        finished = out / f"{run_id}.json"
        if not finished.exists():
            continue
        differ = _differing(_settings_of(run_id, json.loads(finished.read_text()).get("config") or {}), _settings_of(run_id, current))
        if differ:
            stale[run_id] = differ
    if stale:
        what = "; ".join(f"{run}: {', '.join(keys)}" for run, keys in stale.items())
        raise InputError(
            out,
            None,
            f"{len(stale)} finished run(s) here were made with other settings ({what}); "
            "delete their JSON to re-make them, or use another --out",
        )


def _claim(run_dir: Path) -> Path | None:
    """Mark a run as being made by this process; None when another live process holds it
    (several `fedmed experiment --only ...` may share one results folder). A lock left by
    a dead process is taken over: its run resumes."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / "running.pid"
    if lock.exists():
        try:
            pid = int(lock.read_text().strip() or 0)
            if pid and pid != os.getpid():
                os.kill(pid, 0)
                return None
        except (ValueError, ProcessLookupError):
            pass
        except PermissionError:
            return None
    lock.write_text(str(os.getpid()))
    return lock


def _headline(result: dict) -> str:
    pooled = result.get("scores", {}).get("pooled") or result.get("scores", {}).get("external")
    if not pooled:
        return ""
    ent = pooled["entities"]
    return f"; entities strict F1 {ent['strict']['f1']:.3f}, lenient {ent['lenient']['f1']:.3f}"
