"""Resuming a results folder: run JSON I/O, settings fingerprints, start-over and claim locks.

Each finished run writes `<run>.json` (atomically) into the results folder; a run whose
JSON exists is skipped, and an interrupted run resumes from its last saved round, but
only if that round was made with the settings the run has now. A results folder holds
one experiment: a finished run made with other settings is refused, not mixed in.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from fedmed_components.data.document import InputError
from fedmed_components.data.files import atomic_write_text
from fedmed_components.runs.experiment.config import SWEPT, ExperimentConfig

# ---------------------------------------------------------------- results


def write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def read_results(out: str | os.PathLike, run_ids: list[str] | None = None) -> dict[str, dict]:
    """The finished runs' JSON, by run id (in the given order when given)."""
    out = Path(out)
    if run_ids is None:
        run_ids = sorted(p.stem for p in out.glob("*.json") if p.name != "experiment.json")
    return {r: json.loads((out / f"{r}.json").read_text()) for r in run_ids if (out / f"{r}.json").exists()}


# ---------------------------------------------------------------- settings


# Settings that change no number in a result: a folder made with other values of these
# may be resumed (greedy batched generation equals one-at-a-time: tests/test_inference.py).
# The swept lists (server_lrs, prox_mus, dp_epsilons, ...) name which runs exist (each
# run's value is in its id), like runs.
OPERATIONAL_SETTINGS = (
    "name",
    "runs",
    *(name for name, *_ in SWEPT.values()),
    "sites",
    "external",
    "simulator_timeout",
    "generation_batch_size",
    "site_adapter_f1",  # adds the site adapters' validation F1, changes no other number
    "personalised",  # adds the site adapters' scores on their own splits, changes no other number
    "modifier_none_biases",  # adds the calibrated modifier scores, changes no other number
)
# Settings only some runs depend on: changing them re-makes just those runs once their JSON is deleted.
RUN_SETTINGS = {
    "bert": ("bert_model", "bert_lr", "bert_local_steps"),
    "centralised": ("checkpoints_per_round",),
    "fed_avgm": ("server_momentum",),
    "fed_medlora_dp": ("dp_clip", "dp_delta", "dp_record"),
    "fed_flexlora": ("site_ranks",),
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


# ---------------------------------------------------------------- claims


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
