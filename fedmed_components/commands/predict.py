"""`fedmed predict`: extract entities and modifiers from raw notes with a trained adapter."""

from __future__ import annotations

from pathlib import Path

from fedmed_components.settings import BUDGET, PROMPT_STYLES, add_budget_arguments


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "predict",
        help="run a base model + adapter over raw .txt notes (or JSONL) and write BRAT + JSONL",
        description=(
            "Split each note into sentences, predict main entities, then each entity's "
            "modifiers (batched greedy decoding, left padding, KV cache), and reassemble "
            "the spans at note offsets. Writes <out>/brat/*.ann|*.txt and <out>/predictions.jsonl."
        ),
    )
    add_budget_arguments(p, names=("model", "quantize", "precision", "tasks"))
    p.add_argument("--adapter", default=None, help="PEFT adapter folder (omit for zero-shot)")
    p.add_argument("--input", required=True, help="folder of .txt notes, or a JSONL documents file")
    p.add_argument("--out", required=True, help="output folder")
    # inference.GenerationSettings.batch_size (a literal: importing inference loads torch)
    p.add_argument("--batch-size", type=int, default=32, help="sentences generated at once (default: %(default)s)")
    p.add_argument(
        "--prompt-style",
        default=None,
        choices=PROMPT_STYLES,
        help="the prompt style the adapter was trained with (default: the one its metadata records, else paper)",
    )
    p.add_argument(
        "--ner-sentences",
        type=int,
        default=None,
        help="consecutive sentences per NER prompt, as the adapter was trained (default: its metadata's, else 1)",
    )
    p.add_argument(
        "--modifier-none-bias",
        type=float,
        default=0.0,
        help="lower the log-odds of answering 'no modifier' by this much at the token that decides it (compact prompts; "
        "pick it on validation: `fedmed experiment` with modifier_none_biases, or bench/bench_modifier_decision.py); "
        "default 0: plain greedy decoding",
    )
    p.set_defaults(func=_run)


def read_notes(path: Path):
    from fedmed_components.data.document import Document, InputError, read_jsonl

    if path.is_file():
        return [Document(id=d.id, text=d.text, site=d.site) for d in read_jsonl(path)]
    notes = []
    for txt in sorted(path.glob("*.txt")):
        try:
            with open(txt, encoding="utf-8", newline="") as fh:  # keep CRLF: offsets count it
                notes.append(Document(id=txt.stem, text=fh.read()))
        except UnicodeDecodeError as exc:
            raise InputError(txt, None, f"not UTF-8 text ({exc.reason})") from exc
    if not notes:
        raise InputError(path, None, "no .txt notes found")
    return notes


def _run(args) -> int:
    from fedmed_components.data.brat import check_file_names

    # Everything a user can get wrong fails here, before the model loads and generates.
    notes = read_notes(Path(args.input))
    check_file_names(notes, Path(args.out) / "brat", source=args.input)

    from fedmed_components.data.document import InputError
    from fedmed_components.model.inference import GenerationSettings
    from fedmed_components.model.modeling import load_adapter_folder, resolve_model
    from fedmed_components.model.task_model import CAUSAL_LM, task_model_for
    from fedmed_components.task.prompts import PROMPT_STYLES as PROMPT_STYLES_BY_NAME

    if args.adapter:
        load_adapter_folder(args.adapter)
    model_path = resolve_model(args.model)
    task = task_model_for(model_path)  # an encoder runs the BERT baseline: tagging, no generation
    model, tokenizer, meta = task.load_predictor(model_path, args.adapter, quantize=args.quantize, model_name=args.model)
    style = args.prompt_style or meta.get("prompt_style") or BUDGET.prompt_style
    if args.modifier_none_bias and (task.kind != CAUSAL_LM or not PROMPT_STYLES_BY_NAME[style].compact):
        raise InputError(
            Path(args.adapter or args.model),
            None,
            f"--modifier-none-bias needs an LLM adapter with JSON modifier answers (compact prompts), not {style} prompts",
        )
    preds, report = task.predict(
        model,
        tokenizer,
        notes,
        tasks=args.tasks,
        settings=GenerationSettings(batch_size=args.batch_size, precision=args.precision),
        progress=True,
        prompt_style=style,
        modifier_none_bias=args.modifier_none_bias,
        ner_sentences=args.ner_sentences or meta.get("ner_sentences") or BUDGET.ner_sentences,
    )
    return _write(preds, Path(args.out), report.summary(len(notes)))


def _write(preds, out: Path, summary: str) -> int:
    from fedmed_components.data.brat import write_brat_dir
    from fedmed_components.data.document import write_jsonl

    write_jsonl(preds, out / "predictions.jsonl")
    write_brat_dir(preds, out / "brat")  # ids were checked when the notes were read
    n_ent = sum(len(d.entities) for d in preds)
    print(f"{summary}, {n_ent} spans -> {out}")
    return 0
