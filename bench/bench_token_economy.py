"""Token economy of the training examples: how much of each is the fixed prompt.

For each site of an experiment config (default: experiments/default.yaml, the real
corpora) and each prompt style (prompts.PROMPT_STYLES), builds the training examples
of the site's train split exactly as the site trainer does (chat template of the
model, the site's own types, cut at the config's max_length) and counts per example:

* fixed: the chat template, system prompt and instruction (the prompt minus the
  sentence, which for the modifier task carries the <main> marker);
* sentence: the input sentence's own tokens;
* answer: the supervised tokens (what the loss is computed on).

A training step's cost follows its tokens (batches are grouped by length, so padding
is small), so tokens per example, compact / paper, is the step-cost ratio the style
buys at a fixed number of examples; `--time-steps N` also times N real training steps
per style, alternating, in one process (a quiet machine only). What the style costs in
F1 is measured on validation by the experiment (bench/RESULTS.md, "Token economy").

Usage: ``python bench/bench_token_economy.py [--config experiments/default.yaml]
[--time-steps 0] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def site_documents(cfg):
    """(site, its train sentences, its annotated types) for every site of the config."""
    from fedmed_components.runs.experiment.data import split_source

    for source in cfg.sites:
        yield source.name, split_source(source, cfg.sampling)["train"], set(source.annotated_types())


def count_tokens(tokenizer, docs, types, style: str, max_length: int) -> dict:
    from fedmed_components.task.prompts import _ids, document_examples, prompt_style, render_chat

    system = prompt_style(style).system
    totals = {"ner": [0, 0, 0, 0], "modifier": [0, 0, 0, 0]}  # examples, fixed, sentence, answer
    for doc in docs:
        for ex in document_examples(doc, types=types, style=style):
            prompt_text, full_text = render_chat(tokenizer, ex.prompt, ex.answer, system=system)
            prompt, full = len(_ids(tokenizer, prompt_text)), min(len(_ids(tokenizer, full_text)), max_length)
            sentence = len(_ids(tokenizer, ex.sentence))
            row = totals[ex.task]
            row[0] += 1
            row[1] += min(prompt, max_length) - min(sentence, prompt)
            row[2] += min(sentence, prompt)
            row[3] += max(full - prompt, 0)
    out = {}
    for task, (n, fixed, sentence, answer) in totals.items():
        every = fixed + sentence + answer
        out[task] = {
            "examples": n,
            "tokens_per_example": every / max(n, 1),
            "fixed_share": fixed / max(every, 1),
            "sentence_share": sentence / max(every, 1),
            "answer_share": answer / max(every, 1),
        }
    n_all = sum(t[0] for t in totals.values())
    out["all"] = {
        "examples": n_all,
        "tokens_per_example": sum(sum(t[1:]) for t in totals.values()) / max(n_all, 1),
        "fixed_share": sum(t[1] for t in totals.values()) / max(sum(sum(t[1:]) for t in totals.values()), 1),
    }
    return out


def packed_ner_counts(tokenizer, cfg, sizes=(1, 2, 3, 4)) -> dict[int, dict]:
    """NER training tokens per sentence, compact style, with `size` consecutive sentences
    in one example (--ner-sentences), over every site's train notes; and the share of
    examples longer than max_length (the trainer cuts them, losing answer tokens)."""
    from fedmed_components.data.segmentation import split_sentences
    from fedmed_components.runs.experiment.data import split_source
    from fedmed_components.task.prompts import _ids, document_examples, prompt_style, render_chat

    system = prompt_style("compact").system
    out = {}
    for size in sizes:
        sentences = examples = tokens = cut = 0
        for source in cfg.sites:
            types = set(source.annotated_types())
            for doc in split_source(source, cfg.sampling, size)["train"]:
                for ex in document_examples(doc, tasks=("ner",), types=types, style="compact", ner_sentences=size):
                    full = len(_ids(tokenizer, render_chat(tokenizer, ex.prompt, ex.answer, system=system)[1]))
                    examples += 1
                    tokens += min(full, cfg.max_length)
                    cut += full > cfg.max_length
                sentences += len(split_sentences(doc.text))
        out[size] = {
            "examples": examples,
            "sentences": sentences,
            "tokens_per_sentence": tokens / max(sentences, 1),
            "cut_share": cut / max(examples, 1),
        }
    return out


def time_steps(cfg, model_path: str, docs_by_site, steps: int) -> dict[str, float]:
    """Median seconds of a training step per style, the styles alternating in one process."""
    from fedmed_components.model.modeling import LoraSettings, attach_lora, load_base_model, load_tokenizer
    from fedmed_components.model.training import LocalTrainer, TrainSettings, length_grouped_batches
    from fedmed_components.task.examples import SFTConfig, build_sft_dataset

    tokenizer = load_tokenizer(model_path)
    model = attach_lora(load_base_model(model_path, quantize="none"), LoraSettings(r=cfg.rank, alpha=cfg.alpha))
    settings = TrainSettings(
        learning_rate=cfg.lr, batch_size=cfg.batch_size, max_length=cfg.max_length, max_steps=1, precision=cfg.precision
    )
    trainer = LocalTrainer(model, tokenizer.pad_token_id, settings)
    batches = {}
    for style in ("paper", "compact"):
        examples = [
            ex
            for docs, types in docs_by_site
            for ex in build_sft_dataset(docs, tokenizer, SFTConfig(prompt_style=style, max_length=cfg.max_length), types)
        ]
        batches[style] = length_grouped_batches(examples, cfg.batch_size, random.Random(0))
    seconds = {style: [] for style in batches}
    for step in range(steps + 1):  # step 0 warms up both
        for style in batches:
            batch = batches[style][step % len(batches[style])]  # one step: max_steps=1 over one batch
            start = time.perf_counter()
            trainer.train_round(batch, progress=False)
            if step:
                seconds[style].append(time.perf_counter() - start)
    return {style: statistics.median(s) for style, s in seconds.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "experiments" / "default.yaml"), help="experiment config whose sites are counted")
    parser.add_argument("--time-steps", type=int, default=0, help="also time this many training steps per style (needs a quiet machine)")
    parser.add_argument("--json", type=Path, help="write the suite's rows and the counts here")
    args = parser.parse_args(argv)

    from fedmed_components.model.modeling import load_tokenizer, resolve_model
    from fedmed_components.runs.experiment import load_config

    cfg = load_config(args.config)
    model_path = resolve_model(cfg.model)
    tokenizer = load_tokenizer(model_path)
    sites = list(site_documents(cfg))
    counts = {
        style: {name: count_tokens(tokenizer, docs, types, style, cfg.max_length) for name, docs, types in sites}
        for style in ("paper", "compact")
    }
    print(f"{'style':<8} {'site':<18} {'task':<9} {'examples':>8} {'tokens/ex':>9} {'fixed':>6} {'sentence':>8} {'answer':>7}")
    for style, by_site in counts.items():
        for name, tasks in by_site.items():
            for task in ("ner", "modifier"):
                t = tasks[task]
                print(
                    f"{style:<8} {name:<18} {task:<9} {t['examples']:>8} {t['tokens_per_example']:>9.1f} "
                    f"{t['fixed_share']:>6.2f} {t['sentence_share']:>8.2f} {t['answer_share']:>7.2f}"
                )

    def pooled(style):  # tokens per example over all sites' examples
        n = sum(t["all"]["examples"] for t in counts[style].values())
        return sum(t["all"]["tokens_per_example"] * t["all"]["examples"] for t in counts[style].values()) / n

    paper, compact = pooled("paper"), pooled("compact")
    shares = {style: " / ".join(f"{t['all']['fixed_share']:.2f}" for t in counts[style].values()) for style in counts}
    names = "/".join(counts["paper"])
    rows = [
        {
            "figure": f"token economy: fixed prompt share of a training example's tokens, paper style ({names})",
            "value": shares["paper"],
            "target": "no target (report)",
            "met": None,
        },
        {
            "figure": f"token economy: the same, compact style ({names})",
            "value": shares["compact"],
            "target": "no target (report)",
            "met": None,
        },
        {
            "figure": "token economy: training tokens per example, compact / paper (all sites, both tasks; a step's cost follows its tokens)",
            "value": f"{compact / paper:.2f}x ({compact:.0f} vs {paper:.0f})",
            "target": "<= 0.7x",
            "met": compact / paper <= 0.7,
        },
    ]
    print(f"tokens per example: paper {paper:.1f}, compact {compact:.1f} ({compact / paper:.2f}x)")
    packed = packed_ner_counts(tokenizer, cfg)
    for size, c in packed.items():
        print(
            f"NER, {size} sentence(s) an example: {c['tokens_per_sentence']:.1f} tokens a sentence, {c['cut_share']:.1%} of examples cut at {cfg.max_length}"
        )
    rows.append(
        {
            "figure": f"token economy: NER training tokens per sentence, K sentences an example / one (compact; K = {', '.join(map(str, list(packed)[1:]))}; examples cut at {cfg.max_length} tokens)",
            "value": "; ".join(
                f"K={k}: {c['tokens_per_sentence'] / packed[1]['tokens_per_sentence']:.2f}x ({c['cut_share']:.1%} cut)"
                for k, c in list(packed.items())[1:]
            ),
            "target": "no target (report)",
            "met": None,
        }
    )
    timed = None
    if args.time_steps:
        timed = time_steps(cfg, model_path, [(docs, types) for _, docs, types in sites], args.time_steps)
        rows.append(
            {
                "figure": f"token economy: training step time, compact / paper ({cfg.model}, batch {cfg.batch_size}, median of {args.time_steps})",
                "value": f"{timed['compact'] / timed['paper']:.2f}x ({timed['compact']:.2f} s vs {timed['paper']:.2f} s)",
                "target": "<= 0.7x",
                "met": timed["compact"] / timed["paper"] <= 0.7,
            }
        )
        print(f"step time: paper {timed['paper']:.2f} s, compact {timed['compact']:.2f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"rows": rows, "counts": counts, "packed_ner": packed, "step_seconds": timed, "config": args.config}, indent=2)
            + "\n"
        )
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
