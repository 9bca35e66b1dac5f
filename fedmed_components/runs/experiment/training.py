"""Training for the run kinds: the sites' own trainer on local folders, or the FLARE job in the simulator.

Both save every round (adapter folders; the persistor's store for a federation), so an
interrupted run resumes after its last saved round.
"""

from __future__ import annotations

import gc
import json
import math
import shlex
from pathlib import Path

from fedmed_components.runs.experiment.config import ExperimentConfig, dp_sgd_of, job_settings, lora_settings
from fedmed_components.runs.experiment.data import PreparedSite
from fedmed_components.runs.experiment.resume import write_json_atomic
from fedmed_components.settings import BUDGET


def _site_config(
    cfg: ExperimentConfig,
    steps: int | None,
    tasks=BUDGET.tasks,
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
        lora=lora_settings(cfg),
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
        sft=SFTConfig(tasks=tuple(tasks), prompt_style=cfg.prompt_style, ner_sentences=cfg.ner_sentences),
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
    tasks=BUDGET.tasks,
    batch_size: int | None = None,
    model: str | None = None,
    lr: float | None = None,
    after_round=None,
) -> list[dict]:
    """Rounds of the sites' own trainer on one folder or several pooled; every round's
    adapter is saved, so an interrupted run resumes after its last saved round (AdamW's
    moments, kept between rounds under schedule "run", restart on a resume).
    `after_round(record, state)` may add to a round's record (validation F1); a true
    return ends the training after that round (a target reached)."""
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
        stop = after_round is not None and after_round(record, state)
        history.append(record)
        write_json_atomic(log_file, history)
        if stop:
            break
        state = {k: v.clone() for k, v in state.items()}
    del runtime
    gc.collect()
    return history


def federation_finished(run_dir: Path, rounds: int) -> bool:
    """Whether the persistor's store holds the global adapter of the last round. A cut run
    leaves `store/global` too (the adapter of its last finished round), so the folder
    alone does not say the training is complete."""
    state_file = run_dir / "store" / "state.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    return state.get("last_round") is not None and int(state["last_round"]) >= rounds - 1 and (run_dir / "store" / "global").is_dir()


def site_adapters_dir(run_dir: Path) -> Path:
    """Where a federated run's sites keep their own adapters (`site_adapter_f1`, `personalised`)."""
    return run_dir / "site_adapters"


def keeps_site_adapters(cfg: ExperimentConfig) -> bool:
    return cfg.site_adapter_f1 or cfg.personalised


def train_federated(cfg: ExperimentConfig, run_id: str, sites: list[PreparedSite], data_root: Path, run_dir: Path) -> list[dict]:
    """The exported FLARE job in the simulator; the persistor's store resumes a cut run."""
    from fedmed_components.flare.job import JobSpec, run_simulator
    from fedmed_components.flare.recipe import export_job

    changes = job_settings(cfg, run_id)
    store = run_dir / "store"
    state_file = store / "state.json"
    if not federation_finished(run_dir, cfg.rounds):
        budget = dict(
            name=run_id,
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
            precision=cfg.precision,
            prompt_style=cfg.prompt_style,
            ner_sentences=cfg.ner_sentences,
            temperature=cfg.temperature,
            use_sizes=cfg.use_sizes,
            server_val_data=str(data_root / "server_val.jsonl") if changes.get("loss_source") == "server" else None,
            output_dir=str(store),
            train_timeout=int(cfg.simulator_timeout),
            eval_timeout=int(cfg.simulator_timeout),
            cross_site_eval=False,  # the experiment scores every run's test notes itself (scoring.py)
            extra_site_args=f"--val-fraction 0 --max-val-examples {cfg.max_val_examples} --seed {cfg.seed}"
            + (f" --keep-optimizer-state --schedule-rounds {cfg.rounds}" if cfg.schedule == "run" else "")
            + (f" --dp-sgd {dp}" if (dp := dp_sgd_of(cfg, run_id)) else "")
            + (f" --keep-local-adapters {shlex.quote(str(site_adapters_dir(run_dir)))}" if keeps_site_adapters(cfg) else ""),
        )
        spec = JobSpec(**{**budget, **changes})  # what the run changes replaces the config's value
        job_dir = export_job(spec, run_dir / "job")
        print(f"  {run_id}: FLARE simulator, {len(sites)} sites x {cfg.rounds} rounds (log: {run_dir / 'simulator.log'})", flush=True)
        run_simulator(job_dir, run_dir / "simulator", spec.sites, timeout=cfg.simulator_timeout, log_file=run_dir / "simulator.log")
    state = json.loads(state_file.read_text())
    steps, batch = changes.get("local_steps", cfg.local_steps), changes.get("batch_size", cfg.batch_size)
    history = []
    for record in state.get("history", []):
        rnd = record.get("current_round")
        history.append(
            {
                "round": rnd,
                "train_loss": record.get("train_loss"),
                "examples": None if rnd is None or not steps else (rnd + 1) * steps * batch * len(sites),
                "val_loss": record.get("val_loss"),
                "weights": record.get("weights"),
                "num_supervised_tokens": record.get("num_supervised_tokens"),
                **({"dp_sgd": record["dp_sgd"]} if record.get("dp_sgd") else {}),
            }
        )
    return history
