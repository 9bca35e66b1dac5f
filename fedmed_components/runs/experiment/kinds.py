"""The run kinds as a table: `KINDS` maps each kind a config may name to the function that makes one run of it.

- zero_shot: the base model with the untrained adapter (LoRA B = 0);
- single: one adapter per site trained on that site alone (one run per site);
- centralised: one adapter trained on the pooled sites, as many steps as a federation;
- fed_medlora | fed_medlora_plus | fed_medlora_plus_server | fedsa_lora | fed_exact_lora:
  a FLARE simulator run of the exported job folder (the product's own job builder);
- fed_avgm | fed_adam | fed_yogi | fed_prox | fed_medlora_dp: the same, one run per value
  of a config list (server lr, FedProx mu, DP-SGD epsilon; config.SWEPT), e.g. fed_avgm_lr2;
- fed_flexlora: exact aggregation with each site at its own rank (`site_ranks`);
- bert: BERT token classification (token_classification.py) on the pooled sites, centralised budget;
- new_site: fine-tune on N sentences of the new cohort from the federated global adapter
  and from scratch (N in new_site_shots), scored on that cohort's test split.

Each maker returns the run's result fields (kind, rounds, scores, intervals, ...);
`make_run` puts them after the fields every run has (run, status, resolved precision).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from fedmed_components.data.document import InputError
from fedmed_components.runs.experiment.communication import communication
from fedmed_components.runs.experiment.config import (
    FEDERATED,
    FLEXLORA_KIND,
    RUN_KINDS,
    SERVER_LR_KIND,
    SWEPT,
    dp_sgd_of,
    job_settings,
    kind_of,
    parse_new_site_id,
)
from fedmed_components.runs.experiment.context import Experiment
from fedmed_components.runs.experiment.data import shots
from fedmed_components.runs.experiment.resume import _start_over_if_changed
from fedmed_components.runs.experiment.scoring import interval_block, score_intervals
from fedmed_components.runs.experiment.training import federation_finished, site_adapters_dir, train_federated, train_locally


def make_run(exp: Experiment, run_id: str) -> dict:
    """Make one run (resuming its saved rounds if they were made with today's settings)."""
    from fedmed_components.model.modeling import default_device
    from fedmed_components.model.precision import resolve_precision

    cfg, run_dir = exp.cfg, exp.run_dir(run_id)
    _start_over_if_changed(run_id, cfg, run_dir)
    # precision "auto" is bf16 on a CPU with AVX512-BF16 and fp32 on one without: say which ran
    result: dict = {"run": run_id, "status": "done", "resolved_precision": resolve_precision(cfg.precision, default_device())}
    return {**result, **KINDS[kind_of(run_id)](exp, run_id, run_dir)}


def _after_round(exp: Experiment, run_dir: Path):
    """train_locally's hook: validation F1 of every round's adapter under f1_every_round."""

    def after_round(record, state):
        if exp.cfg.f1_every_round:
            exp.validation_scores(record, state, run_dir / "round_scores" / f"round_{record['round']:03d}")

    return after_round


def _test_scores(exp: Experiment, run_id: str, run_dir: Path, state, val_cache: Path) -> dict:
    """A trained adapter's scores on every test split, and their intervals; with
    `modifier_none_biases`, also its modifiers at the bias validation chooses
    (`val_cache`: where the final adapter's validation scores are cached)."""
    print(f"  {run_id}: scoring every test note", flush=True)
    scores = exp.scorer.score_all(state, exp.sites, exp.external, run_dir / "scores")
    tested = {"scores": scores, "intervals": score_intervals(scores)}
    if exp.cfg.modifier_none_biases and any(s.relations for s in exp.sites):
        tested["calibrated_modifiers"] = exp.calibrated_modifiers(state, run_dir, val_cache)
    return tested


def _adapter(folder: Path):
    from fedmed_components.model.modeling import load_adapter_folder

    state, _, _ = load_adapter_folder(folder)
    return state


def zero_shot(exp: Experiment, run_id: str, run_dir: Path) -> dict:
    scores = exp.scorer.score_all(None, exp.sites, exp.external, run_dir / "scores")
    return {"kind": "zero_shot", "rounds": [], "scores": scores, "intervals": score_intervals(scores)}


def single_site(exp: Experiment, run_id: str, run_dir: Path) -> dict:
    cfg = exp.cfg
    site = next(s for s in exp.sites if f"single_{s.name}" == run_id)
    history = train_locally(cfg, [site.folder], run_dir, rounds=cfg.rounds, steps=cfg.local_steps, after_round=_after_round(exp, run_dir))
    state = _adapter(run_dir / f"round_{cfg.rounds - 1:03d}")
    tested = _test_scores(exp, run_id, run_dir, state, run_dir / "round_scores" / f"round_{cfg.rounds - 1:03d}")
    return {"kind": "single_site", "trained_on": [site.name], "rounds": history, **tested}


def centralised(exp: Experiment, run_id: str, run_dir: Path) -> dict:
    cfg = exp.cfg
    # the federation's total budget; checkpoints_per_round pieces a round (learning-curve points)
    pieces = cfg.rounds * cfg.checkpoints_per_round
    steps = cfg.local_steps * len(exp.sites) // cfg.checkpoints_per_round if cfg.local_steps else None
    folders = [s.folder for s in exp.sites]
    history = train_locally(cfg, folders, run_dir, rounds=pieces, steps=steps, after_round=_after_round(exp, run_dir))
    state = _adapter(run_dir / f"round_{pieces - 1:03d}")
    trained_on = [s.name for s in exp.sites]
    tested = _test_scores(exp, run_id, run_dir, state, run_dir / "round_scores" / f"round_{pieces - 1:03d}")
    return {"kind": "centralised", "trained_on": trained_on, "rounds": history, **tested}


def federated(exp: Experiment, run_id: str, run_dir: Path) -> dict:
    cfg = exp.cfg
    history = train_federated(cfg, run_id, exp.sites, exp.work / "data", run_dir)
    adapter_dir = lambda r: run_dir / "store" / f"round_{r:03d}"  # noqa: E731
    if cfg.f1_every_round:
        exp.round_scores(history, adapter_dir)
    if cfg.site_adapter_f1:
        exp.site_adapter_scores(history, site_adapters_dir(run_dir))
    state = _adapter(adapter_dir(cfg.rounds - 1))
    job = job_settings(cfg, run_id)
    tested = _test_scores(exp, run_id, run_dir, state, run_dir / "store" / "round_scores" / f"round_{cfg.rounds - 1:03d}")
    # each site's own last adapter on its own notes (adds each round's own-validation figures to history)
    own = {"personalised": exp.personalised_scores(history, site_adapters_dir(run_dir))} if cfg.personalised else {}
    return {
        "kind": "federated",
        "trained_on": [s.name for s in exp.sites],
        "job": job,
        **({"server_lr": job["server_lr"], "server_momentum": cfg.server_momentum} if kind_of(run_id) == SERVER_LR_KIND else {}),
        **({"dp_sgd": dp} if (dp := dp_sgd_of(cfg, run_id)) else {}),
        "rounds": history,
        **tested,
        **own,
        "communication": communication(state, exp.model_path, cfg.rounds, len(exp.sites)),
    }


def new_site_run(exp: Experiment, run_id: str, run_dir: Path) -> dict:
    """Fine-tune on N sentences of the new cohort, from scratch or from the federated global adapter."""
    from fedmed_components.data.document import write_jsonl
    from fedmed_components.model.modeling import load_adapter_folder

    cfg, site = exp.cfg, exp.external
    start, n, seed = parse_new_site_id(run_id)
    seed = cfg.new_site_seeds[0] if seed is None else seed
    initial = None
    if start == "federated":
        if cfg.new_site_from not in FEDERATED:
            raise InputError(None, None, f"new_site_from: {cfg.new_site_from!r} is not a federated run ({sorted(FEDERATED)})")
        source = exp.run_dir(cfg.new_site_from)
        if not federation_finished(source, cfg.rounds):
            # Adapters are never committed: a results folder resumed on a fresh machine holds
            # the source run's JSON but not its weights, so its training (not its scoring) is
            # re-made, and a cut re-training resumes from its last saved round.
            print(f"  {run_id}: the final global adapter of {cfg.new_site_from} is not in {source}; training it (again)", flush=True)
            train_federated(cfg, cfg.new_site_from, exp.sites, exp.work / "data", source)
        initial, _, _ = load_adapter_folder(source / "store" / "global")
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
    score = exp.scorer.score_sets(state, {f"external_{site.name}": site}, run_dir / "scores")[f"external_{site.name}"]
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
    from fedmed_components.model.inference import GenerationSettings
    from fedmed_components.model.modeling import resolve_model
    from fedmed_components.model.task_model import task_model_for

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
    task = task_model_for(model_path)
    model, tokenizer, _ = task.load_predictor(model_path, str(run_dir / f"round_{cfg.rounds - 1:03d}"))
    settings = GenerationSettings(batch_size=cfg.generation_batch_size)

    def predict(docs):
        preds, report = task.predict(model, tokenizer, docs, settings=settings, max_length=cfg.max_length, progress=True)
        return preds, report.parse_failures

    scores = exp.scorer.score_all(None, exp.sites, exp.external, run_dir / "scores", predict=predict)
    return {
        "kind": "bert",
        "model": cfg.bert_model,
        "trained_on": [s.name for s in exp.sites],
        "rounds": history,
        "scores": scores,
        "intervals": score_intervals(scores),
    }


Maker = Callable[[Experiment, str, Path], dict]  # (experiment, run id, its work folder) -> the run's result fields

KINDS: dict[str, Maker] = {
    "zero_shot": zero_shot,
    "single": single_site,
    "centralised": centralised,
    **dict.fromkeys(FEDERATED, federated),
    **dict.fromkeys(SWEPT, federated),
    FLEXLORA_KIND: federated,
    "bert": lambda exp, run_id, run_dir: bert_baseline(exp),
    "new_site": new_site_run,
}
if tuple(KINDS) != RUN_KINDS:  # a kind a config may name without a maker (or the other way round)
    raise RuntimeError(f"run kinds {list(RUN_KINDS)} and their makers {list(KINDS)} differ")
