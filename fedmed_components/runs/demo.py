"""The first federated run, end to end, on the embedded synthetic corpus.

synthetic notes for 3 sites -> score the untrained model -> Fed-MedLoRA in the FLARE
simulator -> score the global adapter -> before/after table (and demo_result.json).
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

from fedmed_components.data.document import Document, write_jsonl
from fedmed_components.settings import BUDGET

log = logging.getLogger("fedmed.demo")

# Settings measured to finish in time on a 2-core CPU (see README).
PRESETS = {
    "tiny": dict(rounds=2, local_steps=12, batch_size=8, lr=3e-3, rank=8, alpha=16, max_length=256, docs_per_site=8, test_docs=2),
    "smollm2-135m": dict(rounds=3, local_steps=10, batch_size=4, lr=1e-3, rank=8, alpha=16, max_length=256, docs_per_site=10, test_docs=1),
}


@dataclass
class DemoConfig:
    """A demo run: a model's preset (PRESETS) and the run's own options."""

    model: str
    rounds: int
    local_steps: int
    batch_size: int
    lr: float
    rank: int
    alpha: int
    max_length: int
    docs_per_site: int
    test_docs: int
    out: str = "demo_output"
    algorithm: str = "fed_medlora"
    sites: int = 3
    seed: int = 0
    timeout: float = 900

    def job_spec(self, sites: list[str], data: Path, output_dir: Path, name: str | None = None):
        """The demo's FLARE job: every site trains the preset's budget, unquantised."""
        from fedmed_components.flare.job import JobSpec

        return JobSpec(
            name=name or f"demo_{self.algorithm}",
            algorithm=self.algorithm,
            model=self.model,
            sites=sites,
            num_rounds=self.rounds,
            min_clients=len(sites),
            local_steps=self.local_steps,
            batch_size=self.batch_size,
            max_length=self.max_length,
            learning_rate=self.lr,
            rank=self.rank,
            alpha=self.alpha,
            data=str(data),
            quantize="none",
            output_dir=str(output_dir),
            extra_site_args="--val-fraction 0 --max-val-examples 16",
            cross_site_eval=False,  # the demo scores the global adapter itself, on the held-out notes
        )

    @classmethod
    def for_model(cls, model: str, **overrides) -> DemoConfig:
        preset = dict(PRESETS.get(model, PRESETS[BUDGET.model]))
        preset.update({k: v for k, v in overrides.items() if v is not None})
        return cls(model=model, **preset)


def write_demo_data(cfg: DemoConfig, data_dir: Path) -> tuple[list[str], list[Document]]:
    """Per-site train/val JSONL and one pooled held-out test file."""
    from fedmed_components.data.synth import demo_corpus

    corpus = demo_corpus(n_sites=cfg.sites, docs_per_site=cfg.docs_per_site + cfg.test_docs + 2, seed=cfg.seed)
    sites, test = [], []
    for i, (_style, docs) in enumerate(sorted(corpus.items()), start=1):
        site = f"site-{i}"
        docs = list(docs)
        random.Random(cfg.seed + i).shuffle(docs)
        test += docs[: cfg.test_docs]
        write_jsonl(docs[cfg.test_docs : cfg.test_docs + 2], data_dir / site / "val.jsonl")
        write_jsonl(docs[cfg.test_docs + 2 :], data_dir / site / "train.jsonl")
        sites.append(site)
    write_jsonl(test, data_dir / "test.jsonl")
    return sites, test


def evaluate_adapter(model_path: str, adapter_state, test: list[Document], lora, *, progress: bool = True) -> dict:
    """Strict/lenient F1 of base + adapter (None: the untrained starting adapter)."""
    from fedmed_components.model.inference import predict_documents
    from fedmed_components.model.modeling import (
        attach_lora,
        initial_adapter_from_config,
        load_base_model,
        load_tokenizer,
        set_adapter_state,
    )
    from fedmed_components.task.metrics import score_documents

    tokenizer = load_tokenizer(model_path)
    model = attach_lora(load_base_model(model_path, quantize="none"), lora)
    set_adapter_state(model, adapter_state if adapter_state is not None else initial_adapter_from_config(model_path, lora))
    preds, report = predict_documents(model, tokenizer, test, progress=progress)
    return score_documents(test, preds, parse_failures=report.parse_failures)


def run_demo(cfg: DemoConfig) -> dict:
    from fedmed_components.flare.job import round_progress, run_simulator
    from fedmed_components.flare.recipe import export_job
    from fedmed_components.model.modeling import LoraSettings, load_adapter_folder, resolve_model

    started = time.perf_counter()
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    model_path = resolve_model(cfg.model)
    sites, test = write_demo_data(cfg, out / "data")
    lora = LoraSettings(r=cfg.rank, alpha=cfg.alpha)
    print(f"[1/4] synthetic corpus: {len(sites)} sites, {len(test)} held-out notes -> {out / 'data'}")

    before = evaluate_adapter(model_path, None, test, lora)
    print(
        f"[2/4] untrained model: strict F1 {before['entities']['strict']['f1']:.3f}, lenient F1 {before['entities']['lenient']['f1']:.3f}"
    )

    spec = cfg.job_spec(sites, out / "data", out / "global_adapter_store")
    _reset_store(out / "global_adapter_store")
    job_dir = export_job(spec, out / "jobs")
    print(
        f"[3/4] FLARE simulator: {cfg.algorithm}, {cfg.rounds} rounds x {cfg.local_steps} local steps, {len(sites)} sites (log: {out / 'simulator.log'})"
    )
    sim_started = time.perf_counter()
    run_simulator(job_dir, out / "simulator", sites, timeout=cfg.timeout, progress=round_progress(cfg.rounds))
    sim_seconds = time.perf_counter() - sim_started
    adapter_dir = out / "global_adapter_store" / "global"
    state, _, meta = load_adapter_folder(adapter_dir)

    after = evaluate_adapter(model_path, state, test, lora)
    result = {
        "model": cfg.model,
        "algorithm": cfg.algorithm,
        "sites": sites,
        "rounds": cfg.rounds,
        "before": before,
        "after": after,
        "global_adapter": str(adapter_dir),
        "simulator_seconds": round(sim_seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "last_round": meta,
    }
    (out / "demo_result.json").write_text(json.dumps(result, indent=2))
    print("[4/4] held-out synthetic notes, entities (strict / lenient F1) and relations:")
    print(_before_after_table(before, after))
    print(f"global adapter (PEFT folder): {adapter_dir}\ntotal {result['total_seconds']:.0f} s (simulator {sim_seconds:.0f} s)")
    return result


def _reset_store(store: Path) -> None:
    import shutil

    shutil.rmtree(store, ignore_errors=True)  # a fresh demo must not resume an old run


def _before_after_table(before: dict, after: dict) -> str:
    rows = [
        ("entities strict", ("entities", "strict")),
        ("entities lenient", ("entities", "lenient")),
        ("relations strict", ("relations", "strict")),
        ("relations lenient", ("relations", "lenient")),
    ]
    lines = [f"{'':20s} {'untrained':>10s} {'federated':>10s}"]
    for label, (group, mode) in rows:
        lines.append(f"{label:20s} {before[group][mode]['f1']:10.3f} {after[group][mode]['f1']:10.3f}")
    lines.append(f"{'parse failures':20s} {before['parse_failures']:10d} {after['parse_failures']:10d}")
    return "\n".join(lines)
