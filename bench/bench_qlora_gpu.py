"""QLoRA on an 8B-shaped Llama on one GPU: peak memory and tokens/s of the site trainer.

No pretrained weights are needed: a Llama-3.1-8B-shaped model is random-initialised in
bf16 on the GPU, its decoder projections are quantised to NF4 with bitsandbytes (what
`load_base_model(..., quantize="4bit")` does at load time), then the site's own
`LocalTrainer` runs the paper's setting: r=16 on all 7 projections, batch 4 x 800
tokens, gradient checkpointing. Peak memory is counted from the start of training.

    PYTHONPATH=. python bench/bench_qlora_gpu.py --json qlora_gpu.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def llama31_8b_config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
    )


def quantize_decoder_to_nf4(model, compute_dtype=torch.bfloat16) -> None:
    """Swap every decoder nn.Linear for a bitsandbytes NF4 Linear4bit, layer by layer."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if not isinstance(child, torch.nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(
                    child.in_features, child.out_features, bias=False, compute_dtype=compute_dtype, quant_type="nf4", device="meta"
                )
                q.weight = bnb.nn.Params4bit(child.weight.data.to("cpu"), requires_grad=False, quant_type="nf4").to("cuda")
                setattr(parent, name, q)
                del child
        torch.cuda.empty_cache()
    model.is_loaded_in_4bit = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--seq", type=int, default=800)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8, help="timed steps (after 2 warm-up steps)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    from fedmed_components.model.modeling import LoraSettings, attach_lora
    from fedmed_components.model.training import LocalTrainer, TrainSettings

    torch.manual_seed(0)
    started = time.perf_counter()
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(llama31_8b_config(args.layers), dtype=torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    quantize_decoder_to_nf4(model)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    model = attach_lora(model, LoraSettings(r=args.rank, alpha=64))
    lora_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    build_s = time.perf_counter() - started

    gen = torch.Generator().manual_seed(0)
    half = args.seq // 2
    examples = []
    for _ in range(args.batch * (args.steps + 2)):
        ids = torch.randint(0, 128000, (args.seq,), generator=gen).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * half + ids[half:], "num_supervised_tokens": args.seq - half})
    settings = TrainSettings(batch_size=args.batch, max_steps=2, max_length=args.seq)
    trainer = LocalTrainer(model, pad_token_id=0, settings=settings, device="cuda")
    trainer.train_round(examples[: args.batch * 2])  # warm-up: kernels, allocator
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    settings.max_steps = args.steps
    t0 = time.perf_counter()
    stats = trainer.train_round(examples)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    result = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "base_params": n_params,
        "lora_params": lora_params,
        "layers": args.layers,
        "seq": args.seq,
        "batch": args.batch,
        "rank": args.rank,
        "steps": stats.steps,
        "tokens_per_s": round(stats.num_tokens / seconds, 1),
        "seconds_per_step": round(seconds / stats.steps, 3),
        "peak_train_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
        "build_seconds": round(build_s, 1),
        "final_loss": round(stats.losses[-1], 4),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
