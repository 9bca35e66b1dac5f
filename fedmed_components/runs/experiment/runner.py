"""Running an experiment end to end: config -> data -> runs -> results folder.

`run_experiment` cuts the site folders once (test split held out before anything trains,
see data.py), then makes each run in order (kinds.py). Each finished run writes
`<run>.json` (atomically) into the results folder; a run whose JSON exists is skipped,
and an interrupted run resumes from its last saved round (resume.py). Bulky and
text-bearing artefacts (site data, adapters, predictions, simulator workspaces) live in
the work folder.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from fedmed_components.data.document import InputError
from fedmed_components.runs.experiment.config import ExperimentConfig
from fedmed_components.runs.experiment.context import Experiment
from fedmed_components.runs.experiment.data import PreparedSite, prepare_site
from fedmed_components.runs.experiment.kinds import make_run
from fedmed_components.runs.experiment.report import write_report
from fedmed_components.runs.experiment.resume import _claim, _refuse_other_config, read_results, write_json_atomic
from fedmed_components.runs.experiment.scoring import Scorer

log = logging.getLogger("fedmed.experiment")


def prepare(cfg: ExperimentConfig, work: Path) -> tuple[list[PreparedSite], PreparedSite | None]:
    """Cut every site folder (test held out first), and the server's validation file."""
    from fedmed_components.data.document import write_jsonl

    data = work / "data"
    sites = [prepare_site(s, cfg.sampling, data, cfg.ner_sentences) for s in cfg.sites]
    external = prepare_site(cfg.external, cfg.sampling, work / "external", cfg.ner_sentences) if cfg.external else None
    server_val = data / "server_val.jsonl"
    if not server_val.exists():  # Fed-MedLoRA+ (server): the pooled validation splits, held by the server
        write_jsonl([d for s in sites for d in s.read("val")], server_val)
    return sites, external


def run_experiment(
    cfg: ExperimentConfig, out: str | os.PathLike, *, work: str | os.PathLike | None = None, only: list[str] | None = None
) -> dict[str, dict]:
    from fedmed_components.model.modeling import resolve_model

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
            result = make_run(exp, run_id)
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


def _headline(result: dict) -> str:
    pooled = result.get("scores", {}).get("pooled") or result.get("scores", {}).get("external")
    if not pooled:
        return ""
    ent = pooled["entities"]
    return f"; entities strict F1 {ent['strict']['f1']:.3f}, lenient {ent['lenient']['f1']:.3f}"
