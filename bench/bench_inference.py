"""Batched versus one-sentence-at-a-time greedy generation, same inputs, one process.

Both sides call `fedmed_components.model.inference.generate` on the same NER prompts (sentences
of synthetic notes, plus real MTSamples sentences when ../shared/data is present): once
with the default batch size, once with batch_size=1. Runs alternate (one at a time,
batched, one at a time, ...) so the noise of a shared machine hits both; each side's
figure is the median. Reported: output tokens/s of each side, the speed-up (target
>= 4x), and how many outputs differ between the two (greedy decoding: target 0).

    python bench/bench_inference.py --model tiny --model smollm2-135m --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

MTSAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "mtsamples_kiwi" / "train"


def synthetic_sentences(n: int) -> list[str]:
    from fedmed_components.data.segmentation import split_sentences
    from fedmed_components.data.synth import demo_corpus

    docs = [doc for site_docs in demo_corpus(n_sites=3, docs_per_site=4, seed=7).values() for doc in site_docs]
    return [doc.text[s:e] for doc in docs for s, e in split_sentences(doc.text)][:n]


def mtsamples_sentences(n: int, tokenizer, max_tokens: int = 40) -> list[str]:
    """The first n sentences of MTSamples notes (read as-is), short enough to be a
    typical input; empty when the shared data is absent."""
    from fedmed_components.data.segmentation import split_sentences

    out: list[str] = []
    for txt in sorted(MTSAMPLES.glob("*.txt")) if MTSAMPLES.is_dir() else []:
        text = txt.read_text(encoding="utf-8")
        for s, e in split_sentences(text):
            sentence = text[s:e]
            if 3 <= len(tokenizer(sentence, add_special_tokens=False)["input_ids"]) <= max_tokens:
                out.append(sentence)
            if len(out) == n:
                return out
    return out


def timed_generate(model, tokenizer, prompts, lengths, batch_size: int) -> tuple[list[str], float, int]:
    """(outputs, seconds, generated tokens)."""
    from fedmed_components.model.inference import GenerationSettings, generate

    stats: dict = {}
    start = time.perf_counter()
    outputs = generate(model, tokenizer, prompts, GenerationSettings(batch_size=batch_size), answer_lengths=lengths, stats=stats)
    return outputs, time.perf_counter() - start, stats["new_tokens"]


def measure(model_name: str, n_synthetic: int, n_real: int, repeats: int, batch_size: int | None) -> dict:
    import torch

    from fedmed_components.model.inference import GenerationSettings
    from fedmed_components.model.modeling import LoraSettings, attach_lora, load_base_model, load_tokenizer, resolve_model
    from fedmed_components.task.prompts import ner_prompt, render_chat

    torch.manual_seed(0)
    path = resolve_model(model_name)
    tokenizer = load_tokenizer(path)
    # A fresh LoRA adapter (B = 0) as at a site: the PEFT forward path, base model's outputs.
    model = attach_lora(load_base_model(path, quantize="none", device="cpu"), LoraSettings(r=8, alpha=16))
    synthetic = synthetic_sentences(n_synthetic)
    real = mtsamples_sentences(n_real, tokenizer) if n_real else []
    sentences = synthetic + real
    prompts = [render_chat(tokenizer, ner_prompt(s))[0] for s in sentences]
    lengths = [len(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in sentences]
    batch = batch_size or GenerationSettings().batch_size
    timed_generate(model, tokenizer, prompts[:2], lengths[:2], batch)  # warm-up
    one_at_a_time, batched = [], []
    for _ in range(repeats):
        seq_out, seq_s, seq_tokens = timed_generate(model, tokenizer, prompts, lengths, 1)
        bat_out, bat_s, new_tokens = timed_generate(model, tokenizer, prompts, lengths, batch)
        one_at_a_time.append(seq_s)
        batched.append(bat_s)
    differing = sum(a != b for a, b in zip(seq_out, bat_out))
    seq_s, bat_s = statistics.median(one_at_a_time), statistics.median(batched)
    return {
        "model": model_name,
        "prompts": len(prompts),
        "synthetic": len(synthetic),
        "mtsamples": len(real),
        "batch_size": batch,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "output_tokens": {"batched": new_tokens, "one_at_a_time": seq_tokens},
        "one_at_a_time_s": round(seq_s, 2),
        "batched_s": round(bat_s, 2),
        "one_at_a_time_tokens_per_s": round(seq_tokens / seq_s, 1),
        "batched_tokens_per_s": round(new_tokens / bat_s, 1),
        "speedup": round(seq_s / bat_s, 2),
        "differing_outputs": differing,
        "runs_s": {"one_at_a_time": [round(x, 2) for x in one_at_a_time], "batched": [round(x, 2) for x in batched]},
    }


def table_rows(results: list[dict]) -> list[dict]:
    """The suite table's rows (format: bench/report.py)."""
    rows = []
    for r in results:
        rows.append(
            {
                "figure": f"inference: batched (batch {r['batch_size']}) / one-sentence-at-a-time greedy generation, {r['model']}, {r['prompts']} prompts",
                "value": f"{r['speedup']:.2f}x ({r['batched_tokens_per_s']:.1f} vs {r['one_at_a_time_tokens_per_s']:.1f} output tok/s)",
                "target": ">= 4x",
                "met": r["speedup"] >= 4,
            }
        )
        rows.append(
            {
                "figure": f"inference: outputs differing, batched vs one at a time, {r['model']}",
                "value": f"{r['differing_outputs']} of {r['prompts']}",
                "target": "0",
                "met": r["differing_outputs"] == 0,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="tiny | smollm2-135m | HF folder (repeatable; default both built-ins)")
    parser.add_argument("--synthetic", type=int, default=24, help="synthetic sentences per model (default 24)")
    parser.add_argument(
        "--mtsamples", type=int, default=8, help="real MTSamples sentences when ../shared/data is present (default 8; 0: none)"
    )
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each side; the median is reported")
    parser.add_argument("--batch-size", type=int, default=None, help="batched side's batch size (default: GenerationSettings' default)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads for both sides (default 1: on the shared 2-core VM, 2 threads made each small matmul wait for the busy other core, tiny model 30x slower)",
    )
    parser.add_argument("--json", default=None, help="write {'rows': [...], 'results': [...]} here (rows: bench/report.py format)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    results = []
    for name in args.model or ["tiny", "smollm2-135m"]:
        results.append(measure(name, args.synthetic, args.mtsamples, args.repeats, args.batch_size))
    print(f"{'model':14s} {'prompts':>7s} {'batch':>5s} {'1-at-a-time tok/s':>18s} {'batched tok/s':>14s} {'speed-up':>9s} {'differ':>7s}")
    for r in results:
        print(
            f"{r['model']:14s} {r['prompts']:7d} {r['batch_size']:5d} {r['one_at_a_time_tokens_per_s']:18.1f} {r['batched_tokens_per_s']:14.1f} {r['speedup']:8.2f}x {r['differing_outputs']:7d}"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump({"rows": table_rows(results), "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
