"""`fedmed merge`: fold a LoRA adapter into the base weights for serving."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "merge",
        help="merge an adapter into the base model and save a plain HF model folder",
        description=(
            "Load the base model unquantised, apply the PEFT adapter, merge it into the "
            "weights and save model + tokenizer. For LoRA serving (e.g. vLLM --enable-lora) "
            "no merge is needed: the adapter folder itself is what the server loads."
        ),
    )
    p.add_argument("--model", required=True, help="tiny | smollm2-135m | HF id | folder")
    p.add_argument("--adapter", required=True, help="PEFT adapter folder")
    p.add_argument("--out", required=True, help="output folder for the merged model")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from fedmed_components.model.modeling import apply_adapter, load_adapter_folder, load_base_model, load_tokenizer, resolve_model

    load_adapter_folder(args.adapter)  # a broken adapter fails before the base model loads
    path = resolve_model(args.model)
    model, _ = apply_adapter(load_base_model(path, quantize="none"), args.adapter, args.model)
    merged = model.merge_and_unload()
    merged.save_pretrained(args.out)
    load_tokenizer(path).save_pretrained(args.out)
    print(f"merged model: {args.out}")
    return 0
