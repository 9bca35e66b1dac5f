"""Site trainer throughput versus a bare peft loop, same model, same batches, one process.

The bare loop is what a careful engineer would write by hand: HF's built-in loss,
AdamW, no schedule, no clipping, no bookkeeping. The ratio (site / bare tokens per
second, target >= 0.95) is the cost of everything the site trainer adds. The two runs
alternate (bare, site, bare, site, ...) so the noise of a shared machine hits both.

    python bench/bench_site_throughput.py --model tiny --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def make_examples(n: int, seq: int, vocab: int, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    half = seq // 2
    out = []
    for _ in range(n):
        ids = torch.randint(10, vocab, (seq,), generator=gen).tolist()
        out.append({"input_ids": ids, "labels": [-100] * half + ids[half:], "num_supervised_tokens": seq - half})
    return out


def bare_peft_loop(model, batches, lr: float) -> float:
    """tokens/s of the plain loop over pre-collated batches."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    tokens = 0
    start = time.perf_counter()
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum())
    return tokens / (time.perf_counter() - start)


def site_trainer(model, examples, batch_size: int, steps: int, lr: float) -> float:
    from fedmed_components.model.training import LocalTrainer, TrainSettings

    trainer = LocalTrainer(model, pad_token_id=0, settings=TrainSettings(max_steps=steps, batch_size=batch_size, learning_rate=lr))
    stats = trainer.train_round(examples)
    return stats.num_tokens / stats.seconds


def measure(model_name: str, batch: int, seq: int, steps: int, repeats: int, rank: int) -> dict:
    from fedmed_components.model.modeling import LoraSettings, attach_lora, load_base_model, resolve_model
    from fedmed_components.model.training import collate

    torch.manual_seed(0)
    path = resolve_model(model_name)
    model = attach_lora(load_base_model(path, quantize="none", device="cpu"), LoraSettings(r=rank, alpha=2 * rank))
    vocab = model.get_input_embeddings().weight.shape[0]
    examples = make_examples(batch * steps, seq, vocab)
    batches = [collate(examples[i : i + batch], 0) for i in range(0, len(examples), batch)]
    site_trainer(model, examples[: batch * 2], batch, 2, 1e-4)  # warm-up
    bare, site = [], []
    for _ in range(repeats):
        bare.append(bare_peft_loop(model, batches, 1e-4))
        site.append(site_trainer(model, examples, batch, steps, 1e-4))
    return {
        "model": model_name,
        "batch": batch,
        "seq": seq,
        "steps": steps,
        "repeats": repeats,
        "rank": rank,
        "bare_tokens_per_s": round(statistics.median(bare), 1),
        "site_tokens_per_s": round(statistics.median(site), 1),
        "ratio": round(statistics.median(site) / statistics.median(bare), 3),
    }


def table_rows(results: list[dict]) -> list[dict]:
    """The suite table's rows (format: bench/report.py)."""
    return [
        {
            "figure": f"site trainer / bare peft loop training tokens/s, {r['model']} (batch {r['batch']} x {r['seq']}, r={r['rank']})",
            "value": f"{r['ratio']:.3f}x ({r['site_tokens_per_s']:.0f} vs {r['bare_tokens_per_s']:.0f} tok/s)",
            "target": ">= 0.95x",
            "met": r["ratio"] >= 0.95,
        }
        for r in results
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="tiny | smollm2-135m (repeatable; default both)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="write {'rows': [...], 'results': [...]} here (rows: bench/report.py format)")
    args = parser.parse_args()
    settings = {"tiny": dict(batch=8, seq=256, rank=8), "smollm2-135m": dict(batch=2, seq=128, rank=8)}
    results = [
        measure(m, steps=args.steps, repeats=args.repeats, **settings.get(m, settings["smollm2-135m"]))
        for m in (args.model or ["tiny", "smollm2-135m"])
    ]
    print(f"{'model':14s} {'bare tok/s':>11s} {'site tok/s':>11s} {'ratio':>7s}")
    for r in results:
        print(f"{r['model']:14s} {r['bare_tokens_per_s']:11.1f} {r['site_tokens_per_s']:11.1f} {r['ratio']:7.3f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": table_rows(results), "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
