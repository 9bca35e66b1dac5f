"""bf16 autocast against fp32 on the CPU: site-trainer tokens/s and greedy-generation
tokens/s (with the share of outputs that change), same model, same inputs, one process.

The two precisions alternate (fp32, bf16, fp32, bf16, ...) so the noise of a shared
machine hits both; the medians are compared. bf16 pays only with native bf16
instructions (AVX512-BF16 / AMX): the JSON records whether this CPU has them, and where
it does not the rows say so instead of claiming a speed-up.

The F1 cost of bf16 training needs a trained model and its scoring: `--f1-runs FP32 BF16`
reads two experiment run JSONs made with the same config but the precision (e.g.
default.yaml's fed_medlora_plus and experiments/precision_bf16.yaml's) and adds the
paired-bootstrap difference over the same test notes to the --json file's rows.

    python bench/bench_precision.py --json bench/results/precision.json
    python bench/bench_precision.py --json bench/results/precision.json --f1-runs \
        bench/results/experiment_default/fed_medlora_plus.json \
        bench/results/experiment_precision_bf16/fed_medlora_plus.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inference import mtsamples_sentences, synthetic_sentences  # noqa: E402
from bench_site_throughput import make_examples  # noqa: E402


def trainer_tokens_per_s(model, examples, batch: int, steps: int, precision: str) -> float:
    from fedmed_components.model.training import LocalTrainer, TrainSettings

    settings = TrainSettings(max_steps=steps, batch_size=batch, learning_rate=1e-4, precision=precision)
    return LocalTrainer(model, pad_token_id=0, settings=settings, device="cpu").train_round(examples).tokens_per_second


def generation(model, tokenizer, prompts, lengths, precision: str) -> tuple[list[str], float]:
    from fedmed_components.model.inference import GenerationSettings, generate

    stats: dict = {}
    start = time.perf_counter()
    outputs = generate(
        model,
        tokenizer,
        prompts,
        GenerationSettings(batch_size=16, max_new_tokens=64, precision=precision),
        answer_lengths=lengths,
        stats=stats,
    )
    return outputs, stats.get("new_tokens", 0) / (time.perf_counter() - start)


def measure(model_name: str, batch: int, seq: int, steps: int, repeats: int, sentences: int) -> dict:
    from fedmed_components.model.modeling import LoraSettings, attach_lora, load_base_model, load_tokenizer, resolve_model
    from fedmed_components.model.precision import cpu_has_native_bf16
    from fedmed_components.task.prompts import ner_prompt, render_chat

    torch.manual_seed(0)
    path = resolve_model(model_name)
    tokenizer = load_tokenizer(path)
    model = attach_lora(load_base_model(path, quantize="none", device="cpu"), LoraSettings(r=16, alpha=32))
    vocab = model.get_input_embeddings().weight.shape[0]
    examples = make_examples(batch * steps, seq, vocab)
    for precision in ("fp32", "bf16"):  # warm-up: first-call kernels and allocations
        trainer_tokens_per_s(model, examples[: batch * 2], batch, 2, precision)
    train = {"fp32": [], "bf16": []}
    for _ in range(repeats):
        for precision in train:
            train[precision].append(trainer_tokens_per_s(model, examples, batch, steps, precision))

    texts = mtsamples_sentences(sentences, tokenizer) or synthetic_sentences(sentences)
    prompts = [render_chat(tokenizer, ner_prompt(t))[0] for t in texts]
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    gen = {"fp32": [], "bf16": []}
    outputs = {}
    for _ in range(repeats):
        for precision in gen:
            outputs[precision], speed = generation(model, tokenizer, prompts, lengths, precision)
            gen[precision].append(speed)
    changed = sum(a != b for a, b in zip(outputs["fp32"], outputs["bf16"])) / len(prompts)
    median = {
        k: statistics.median(v)
        for k, v in {**{f"train_{p}": s for p, s in train.items()}, **{f"gen_{p}": s for p, s in gen.items()}}.items()
    }
    return {
        "model": model_name,
        "native_bf16": cpu_has_native_bf16(),
        "batch": batch,
        "seq": seq,
        "steps": steps,
        "repeats": repeats,
        "sentences": len(prompts),
        "lora": "r16, 7 projections",
        "train_tokens_per_s": {"fp32": round(median["train_fp32"], 1), "bf16": round(median["train_bf16"], 1)},
        "train_ratio": round(median["train_bf16"] / median["train_fp32"], 3),
        "generation_tokens_per_s": {"fp32": round(median["gen_fp32"], 1), "bf16": round(median["gen_bf16"], 1)},
        "generation_ratio": round(median["gen_bf16"] / median["gen_fp32"], 3),
        "outputs_changed": round(changed, 3),
    }


def table_rows(r: dict) -> list[dict]:
    cpu = "" if r["native_bf16"] else " (no native bf16 on this CPU: auto keeps fp32)"
    t, g = r["train_tokens_per_s"], r["generation_tokens_per_s"]
    return [
        {
            "figure": f"site trainer tokens/s bf16 / fp32 ({r['model']}, batch {r['batch']} x {r['seq']}){cpu}",
            "value": f"{r['train_ratio']:.2f}x ({t['bf16']:.0f} vs {t['fp32']:.0f} tok/s)",
            "target": ">= 1.5x",
            "met": r["train_ratio"] >= 1.5,
        },
        {
            "figure": f"generation tokens/s bf16 / fp32 ({r['model']}, {r['sentences']} sentences; outputs changed){cpu}",
            "value": f"{r['generation_ratio']:.2f}x ({g['bf16']:.0f} vs {g['fp32']:.0f} tok/s; {r['outputs_changed']:.0%} changed)",
            "target": "report",
            "met": None,
        },
    ]


F1_COST_FIGURE = "F1 cost of bf16 training at a fixed budget"


def f1_cost_row(fp32: dict, bf16: dict, fp32_unrecorded: str | None = None) -> dict:
    """Pooled main-entity strict F1 points lost by training in bf16 (fp32 - bf16), paired
    over the same test notes (95% bootstrap interval), from two experiment run JSONs.

    `fp32_unrecorded`: why the first run is known to be fp32 although its JSON predates
    `resolved_precision` (its config said auto); said in the row."""
    from fedmed_components.runs.experiment.comparisons import paired
    from fedmed_components.runs.experiment.tables import f1

    made = [r.get("resolved_precision") for r in (fp32, bf16)]
    if made[0] is None and fp32_unrecorded and (fp32.get("config") or {}).get("precision") in ("auto", "fp32"):
        made[0] = "fp32"
    if made != ["fp32", "bf16"]:
        raise ValueError(f"the runs were made in {made[0]} and {made[1]}, not fp32 and bf16")
    cost = paired(fp32, bf16)
    modifiers = paired(fp32, bf16, group="relations")
    points = lambda d: f"{100 * d.estimate:+.1f} [{100 * d.low:+.1f}, {100 * d.high:+.1f}]"  # noqa: E731
    a, b = (f1(r["scores"]["pooled"], "main_entities", "strict") for r in (fp32, bf16))
    return {
        "figure": f"{F1_COST_FIGURE} (pooled main-entity strict F1 points lost, fp32 - bf16, 95% CI; run {fp32.get('run')}"
        + (f"; fp32 run's precision unrecorded: {fp32_unrecorded}" if fp32_unrecorded and fp32.get("resolved_precision") is None else "")
        + ")",
        "value": f"{points(cost)} points (fp32 {a:.3f}, bf16 {b:.3f}; modifiers {points(modifiers)})",
        "target": "<= 0.5 points",
        "met": 100 * cost.estimate <= 0.5,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="tiny | smollm2-135m | HF folder (default smollm2-135m)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=150, help="tokens per training example")
    parser.add_argument("--steps", type=int, default=3, help="training steps per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each precision; medians compared")
    parser.add_argument("--sentences", type=int, default=16, help="MTSamples sentences generated (synthetic without ../shared)")
    parser.add_argument("--json", default=None, help="write {'rows': [...], 'results': [...]} here (rows: bench/report.py format)")
    parser.add_argument(
        "--f1-runs",
        nargs=2,
        metavar=("FP32_RUN", "BF16_RUN"),
        help="two experiment run JSONs, same config but the precision: add the F1-cost row to --json (no timing)",
    )
    parser.add_argument(
        "--fp32-unrecorded",
        metavar="WHY",
        default=None,
        help="the FP32_RUN predates the recorded precision (config 'auto'): why it is known to be fp32, said in the row",
    )
    args = parser.parse_args()
    if args.f1_runs:
        row = f1_cost_row(*(json.loads(Path(p).read_text()) for p in args.f1_runs), fp32_unrecorded=args.fp32_unrecorded)
        print(json.dumps(row, indent=2))
        if args.json:
            out = Path(args.json)
            data = json.loads(out.read_text()) if out.exists() else {"rows": []}
            data["rows"] = [r for r in data["rows"] if not r["figure"].startswith(F1_COST_FIGURE)] + [row]
            out.write_text(json.dumps(data, indent=2))
        return
    r = measure(args.model, args.batch, args.seq, args.steps, args.repeats, args.sentences)
    print(json.dumps(r, indent=2))
    if args.json:
        out = Path(args.json)
        kept = [
            row for row in (json.loads(out.read_text()).get("rows", []) if out.exists() else []) if row["figure"].startswith(F1_COST_FIGURE)
        ]
        out.write_text(json.dumps({"rows": table_rows(r) + kept, "results": [r]}, indent=2))  # the F1 row comes from --f1-runs


if __name__ == "__main__":
    main()
