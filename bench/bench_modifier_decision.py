"""Where a modifier answer is decided: the adapter's probability of answering "none".

A compact-style modifier answer is a JSON list, so "[]" (no modifier) and '[{"type": ...'
share their first token and part at the next one. Under greedy decoding that one token
decides whether an entity gets any modifier at all. This bench teacher-forces each
modifier example of a site up to that token and reads the adapter's probability of the
empty answer, apart for examples whose gold answer is empty and not:

- `p_empty` by gold class: how far the adapter leans to "none";
- `answers_nonempty` by gold class: how often greedy decoding leaves "none" (p < 0.5);
- `auc`: how well p separates the two classes (0.5: not at all), i.e. whether a
  prior (training share of empty answers, or a threshold) is what hides the modifiers
  rather than the adapter knowing nothing of them;
- `train_nonempty_share`: the share of the site's training modifier examples with an answer.

With `--biases`, it then tests the threshold that follows from this: the whole pipeline
(entities, then modifiers of the predicted entities) with the empty answer's logit
lowered by each bias (`predict_modifiers(none_bias=...)`). Runs that share a NAME are one
model over several sites (a global adapter) or one site's own adapters (personalised):
one bias is chosen per NAME on its pooled validation modifier strict F1 (ties: the
smaller bias), and only then are the test notes scored, at bias 0 and at the chosen one,
with 95% bootstrap intervals over notes (stratified by site) and the paired difference.

    python bench/bench_modifier_decision.py \\
        --run maccrobat <work>/runs/fed_medlora_plus/site_adapters/maccrobat/round_002 <work>/data/maccrobat \\
        --run general_medicine <...>/general_medicine/round_002 <work>/data/general_medicine \\
        --biases 0 0.5 1 1.5 2 3 --json bench/results/modifier_decision.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def auc(positives: list[float], negatives: list[float]) -> float | None:
    """P(a positive scores above a negative), ties counted half; None without both classes."""
    if not positives or not negatives:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def empty_probabilities(model, tokenizer, examples, system: str) -> list[float]:
    """Per modifier example, the model's probability of "[]" at the deciding token."""
    import torch

    from fedmed_components.model.inference import empty_answer_decision
    from fedmed_components.task.prompts import render_chat

    prefix, empty_id = empty_answer_decision(tokenizer)
    out = []
    model.eval()
    with torch.no_grad():
        for example in examples:
            prompt = render_chat(tokenizer, example.prompt, system=system)[0]
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] + list(prefix)
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            out.append(float(logits.softmax(-1)[empty_id]))
    return out


def modifier_examples(docs, types, style: str):
    from fedmed_components.task.prompts import document_examples

    return [e for doc in docs for e in document_examples(doc, tasks=("modifier",), output_format="json", types=types, style=style)]


def site_decision(model, tokenizer, site_folder: Path, data, *, split: str, max_examples: int, style: str) -> dict:
    """`data`: the site folder's `load_site_data` (read once by the caller, the sweep uses it too)."""
    from fedmed_components.data.document import InputError
    from fedmed_components.task.prompts import prompt_style

    docs = {"train": data.train, "val": data.val, "test": data.test}[split]
    if not docs:
        raise InputError(site_folder, None, f"no {split} notes here (a prepared site folder holds {split}.jsonl)")
    examples = modifier_examples(docs, data.types, style)[:max_examples]
    if not examples:
        raise InputError(site_folder, None, f"its {split} notes give no modifier example (no main entity)")
    train = modifier_examples(data.train, data.types, style)
    p = empty_probabilities(model, tokenizer, examples, prompt_style(style).system)
    gold = [bool(e.spans) for e in examples]
    by_class = {name: [q for q, g in zip(p, gold) if g == want] for name, want in (("gold_nonempty", True), ("gold_empty", False))}

    def block(values):
        return {
            "examples": len(values),
            "p_empty_mean": statistics.fmean(values) if values else None,
            "p_empty_median": statistics.median(values) if values else None,
            "answers_nonempty": sum(q < 0.5 for q in values),
        }

    return {
        "split": split,
        "examples": len(examples),
        "train_nonempty_share": sum(bool(e.spans) for e in train) / len(train) if train else None,
        **{name: block(values) for name, values in by_class.items()},
        # a higher score for "has modifiers" is a lower p_empty
        "auc": auc([-q for q in by_class["gold_nonempty"]], [-q for q in by_class["gold_empty"]]),
    }


def _pooled_f1(per_note_by_site: dict, group: str, mode: str) -> float:
    from fedmed_components.task.bootstrap import aligned_counts, f1_from_counts

    counts, _, _ = aligned_counts(per_note_by_site, group, mode)
    return float(f1_from_counts(counts.sum(axis=0)))


def _with_modifiers(model, tokenizer, ner_preds, bias: float, settings, style: str) -> list:
    """A copy of `ner_preds` (entities only) with the modifiers asked at `bias`."""
    from copy import deepcopy

    from fedmed_components.model.inference import predict_modifiers

    preds = deepcopy(ner_preds)
    predict_modifiers(model, tokenizer, preds, settings=settings, prompt_style=style, none_bias=bias)
    return preds


def bias_sweep(model, tokenizer, items, biases: list[float], *, settings, style: str, log=print) -> dict:
    """`items`: [(site name, adapter state, SiteData, stored test predictions or None)] of
    one model. The bias is chosen on validation before any test note is scored. Stored
    predictions (the same adapter's, from a run's cache) are the bias-0 arm as they were
    scored, and their entities are reused: only the modifiers are generated again."""
    from fedmed_components.model.inference import choose_none_bias, entities_only, predict_documents
    from fedmed_components.model.modeling import set_adapter_state
    from fedmed_components.runs.experiment.scoring import per_note_counts
    from fedmed_components.task.bootstrap import aligned_counts, bootstrap_f1, paired_difference

    def scored(part: str, wanted: list[float]) -> dict:
        out = {b: {} for b in wanted}
        for site, state, data, stored in items:
            set_adapter_state(model, state)
            docs = getattr(data, part)
            stored = stored if part == "test" else None
            if stored is not None:
                ner = entities_only(stored)
            else:
                ner, _ = predict_documents(model, tokenizer, docs, tasks=("ner",), settings=settings, prompt_style=style)
            for b in wanted:
                preds = stored if stored is not None and b == 0 else _with_modifiers(model, tokenizer, ner, b, settings, style)
                out[b][site] = per_note_counts(docs, preds, data.types)
                log(f"  {part} {site} bias {b:g}: modifier strict F1 {_pooled_f1({site: out[b][site]}, 'relations', 'strict'):.3f}")
        return out

    val = scored("val", biases)
    val_f1 = {b: _pooled_f1(val[b], "relations", "strict") for b in biases}
    chosen = choose_none_bias(val_f1)
    arms = sorted({0.0, chosen})
    test = scored("test", arms)
    row = {"validation_modifier_strict_f1": {f"{b:g}": val_f1[b] for b in biases}, "chosen_bias": chosen, "test": {}}
    for b in arms:
        row["test"][f"{b:g}"] = {
            group: {mode: bootstrap_f1(*aligned_counts(test[b], group, mode)[:2]).as_dict() for mode in ("strict", "lenient")}
            for group in ("relations", "main_entities")
        }
    row["test_chosen_minus_0"] = {}
    for mode in ("strict", "lenient"):
        a, strata, notes = aligned_counts(test[chosen], "relations", mode)
        b, _, _ = aligned_counts(test[0.0], "relations", mode, notes)
        row["test_chosen_minus_0"][mode] = paired_difference(a, b, strata).as_dict()
    row["test_per_site_modifier_strict_f1"] = {
        f"{b:g}": {site: _pooled_f1({site: test[b][site]}, "relations", "strict") for site in test[b]} for b in arms
    }
    return row


def _line(row: dict) -> str:
    def f(x):
        return "-" if x is None else f"{x:.3f}"

    ne, em = row["gold_nonempty"], row["gold_empty"]
    return (
        f"{row['examples']} {row['split']} examples (train share with modifiers {f(row['train_nonempty_share'])}); "
        f"p(none) mean {f(ne['p_empty_mean'])} where gold has modifiers, {f(em['p_empty_mean'])} where not; "
        f"greedy answers some modifier for {ne['answers_nonempty']}/{ne['examples']} and {em['answers_nonempty']}/{em['examples']}; "
        f"AUC {f(row['auc'])}"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--run",
        nargs="+",
        action="append",
        required=True,
        metavar="NAME ADAPTER SITE [PREDICTIONS]",
        help="a name, an adapter folder (adapter_config.json + weights), a prepared site folder (train/val/test.jsonl) and, "
        "optionally, that adapter's scored test predictions (<site>.predictions.jsonl of a run's cache): the sweep then "
        "reuses its entities and takes it as the bias-0 arm",
    )
    parser.add_argument("--model", default="smollm2-135m", help="base model the adapters were trained on (default smollm2-135m)")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"), help="notes whose examples are probed")
    parser.add_argument("--max-examples", type=int, default=300, help="modifier examples per run, in note order (default 300)")
    parser.add_argument("--prompt-style", default="compact", help="the adapters' prompt style; its modifier answers must be JSON")
    parser.add_argument(
        "--biases", type=float, nargs="+", help="none biases to sweep on validation (include 0); then test at 0 and the chosen one"
    )
    parser.add_argument("--precision", default="auto", help="generation precision: auto | fp32 | bf16 (as the runs scored)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.biases and (0.0 not in args.biases or min(args.biases) < 0):
        parser.error("--biases: give 0 (plain greedy decoding, the baseline) and non-negative values")

    from fedmed_components.data.document import read_jsonl
    from fedmed_components.model.inference import GenerationSettings
    from fedmed_components.model.modeling import load_adapter_folder, resolve_model, set_adapter_state
    from fedmed_components.model.site import load_site_data
    from fedmed_components.model.task_model import task_model_for
    from fedmed_components.task.prompts import prompt_style

    if not prompt_style(args.prompt_style).compact:
        parser.error(
            f"--prompt-style {args.prompt_style}: its modifier answers re-write the sentence; only a JSON answer has one deciding token"
        )
    path = resolve_model(args.model)
    task = task_model_for(path)
    tokenizer = task.load_tokenizer(path)
    model, loaded_rank = None, None
    out = {"decision": {}, "bias_sweep": {}}
    groups: dict[str, list] = {}
    for run in args.run:
        if len(run) not in (3, 4):
            parser.error(f"--run {' '.join(run)}: give NAME ADAPTER SITE and, optionally, PREDICTIONS")
        name, adapter, site, predictions = (*run, None)[:4]
        state, lora, _ = load_adapter_folder(adapter)
        if model is None or loaded_rank != (lora.r, lora.alpha):
            model, loaded_rank = task.load_trainable(path, task.lora_settings(lora), quantize="auto"), (lora.r, lora.alpha)
        set_adapter_state(model, state)
        data = load_site_data(site, val_fraction=0)
        row = site_decision(model, tokenizer, Path(site), data, split=args.split, max_examples=args.max_examples, style=args.prompt_style)
        key = f"{name}/{Path(site).name}"
        out["decision"][key] = {"adapter": str(adapter), "site": str(site), **row}
        print(f"{key}: {_line(row)}", flush=True)
        stored = read_jsonl(predictions) if predictions else None
        groups.setdefault(name, []).append((Path(site).name, state, data, stored))
    settings = GenerationSettings(batch_size=32, max_new_tokens=160, precision=args.precision)
    for name, items in groups.items() if args.biases else ():
        print(f"{name}: none-bias sweep over {', '.join(item[0] for item in items)}", flush=True)
        row = bias_sweep(
            model, tokenizer, items, args.biases, settings=settings, style=args.prompt_style, log=lambda m: print(m, flush=True)
        )
        out["bias_sweep"][name] = row
        t0, tc = row["test"]["0"]["relations"]["strict"], row["test"][f"{row['chosen_bias']:g}"]["relations"]["strict"]
        d = row["test_chosen_minus_0"]["strict"]
        print(
            f"{name}: validation chooses bias {row['chosen_bias']:g}; test modifier strict F1 {t0['estimate']:.3f} -> {tc['estimate']:.3f} "
            f"[{tc['low']:.3f}, {tc['high']:.3f}], difference {d['estimate']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
