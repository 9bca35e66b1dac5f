"""Record-level DP-SGD's training cost at a site: seconds per step with and without it.

Same model, same examples, same batch size, one process. Without DP-SGD a step is one
batch's forward and backward. With it (`--dp-sgd noise=1,clip=1`, records = examples)
a step Poisson-samples records at rate batch / records (batch_size records on average),
takes each one's gradient through Opacus's GradSampleModule, clips each and adds noise.
The figure is the ratio of seconds per step and of training tokens per second (a DP
step's sample size varies, so tokens/s is the fairer of the two). The two runs
alternate (plain, DP, plain, DP, ...) so a shared machine's noise hits both.

    python bench/bench_dp_sgd.py --model smollm2-135m --json bench/results/dp_sgd.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_site_throughput import make_examples  # noqa: E402


def site_trainer(model, batch: int, steps: int, dp_sgd: str):
    from fedmed_components.model.training import LocalTrainer, TrainSettings

    settings = TrainSettings(max_steps=steps, batch_size=batch, learning_rate=1e-4, dp_sgd=dp_sgd)
    return LocalTrainer(model, pad_token_id=0, settings=settings, device="cpu")


def timed_round(trainer, examples) -> tuple[float, float]:
    """(seconds per step, tokens per second) of one site-trainer round."""
    stats = trainer.train_round(examples)
    return stats.seconds / stats.steps, stats.num_tokens / stats.seconds


def measure(model_name: str, batch: int, seq: int, steps: int, repeats: int, rank: int, records: int) -> dict:
    from fedmed_components.model.modeling import LoraSettings, attach_lora, load_base_model, resolve_model

    def lora_model():
        torch.manual_seed(0)
        return attach_lora(load_base_model(resolve_model(model_name), quantize="none", device="cpu"), LoraSettings(r=rank, alpha=2 * rank))

    # two copies of the model: Opacus's hooks on the DP one would also run (and cost) in
    # plain steps on a shared model, and a model is hooked once
    plain_trainer, dp_trainer = site_trainer(lora_model(), batch, steps, ""), site_trainer(lora_model(), batch, steps, "noise=1.0,clip=1.0")
    examples = make_examples(records, seq, plain_trainer.model.get_input_embeddings().weight.shape[0])
    timed_round(plain_trainer, examples[: 2 * batch])  # warm-up of both paths
    timed_round(dp_trainer, examples[: 2 * batch])
    plain, private = [], []
    for _ in range(repeats):
        plain.append(timed_round(plain_trainer, examples))
        private.append(timed_round(dp_trainer, examples))
    median = lambda runs, i: statistics.median(r[i] for r in runs)  # noqa: E731
    return {
        "model": model_name,
        "batch": batch,
        "seq": seq,
        "rank": rank,
        "steps": steps,
        "repeats": repeats,
        "records": records,
        "plain_s_per_step": round(median(plain, 0), 3),
        "dp_s_per_step": round(median(private, 0), 3),
        "plain_tokens_per_s": round(median(plain, 1), 1),
        "dp_tokens_per_s": round(median(private, 1), 1),
        "step_time_ratio": round(median(private, 0) / median(plain, 0), 3),
        "tokens_per_s_ratio": round(median(private, 1) / median(plain, 1), 3),
    }


def table_rows(results: list[dict]) -> list[dict]:
    """The suite table's rows (format: bench/report.py); no target: a cost to know, not to meet."""
    return [
        {
            "figure": f"DP-SGD / plain site training tokens/s, {r['model']} (batch {r['batch']} x {r['seq']}, r={r['rank']})",
            "value": f"{r['tokens_per_s_ratio']:.3f}x ({r['dp_tokens_per_s']:.0f} vs {r['plain_tokens_per_s']:.0f} tok/s; "
            f"{r['dp_s_per_step']:.2f} vs {r['plain_s_per_step']:.2f} s a step)",
            "target": "none (the cost of per-example gradients)",
            "met": None,
        }
        for r in results
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="tiny | smollm2-135m (repeatable; default both)")
    parser.add_argument("--steps", type=int, default=4, help="steps a round (default 4)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds of each (default 3)")
    parser.add_argument("--json", default=None, help="write {'rows': [...], 'results': [...]} here (rows: bench/report.py format)")
    args = parser.parse_args()
    # the experiment's batch 8; sentences of ~128 tokens as in the compact-prompt examples
    settings = {"tiny": dict(batch=8, seq=128, rank=8, records=400), "smollm2-135m": dict(batch=8, seq=128, rank=16, records=400)}
    results = [
        measure(m, steps=args.steps, repeats=args.repeats, **settings.get(m, settings["smollm2-135m"]))
        for m in (args.model or ["tiny", "smollm2-135m"])
    ]
    print(f"{'model':14s} {'plain s/step':>12s} {'DP s/step':>10s} {'tok/s ratio':>12s}")
    for r in results:
        print(f"{r['model']:14s} {r['plain_s_per_step']:12.3f} {r['dp_s_per_step']:10.3f} {r['tokens_per_s_ratio']:12.3f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": table_rows(results), "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
