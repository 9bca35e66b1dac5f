"""Compute precision for training and generation: fp32, or bf16 autocast where it pays.

bf16 runs through `torch.autocast`: matrix products run in bf16 while the LoRA weights,
their gradients and AdamW's state stay fp32 (autocast casts per operation, it does not
convert parameters). On CUDA the paper's setting is bf16 compute over the NF4 base.
On a CPU bf16 is only fast with native bf16 instructions (AVX512-BF16 or AMX); without
them PyTorch emulates it, measured >10x slower than fp32 on an AVX2-only EPYC, so
`auto` picks bf16 only where the hardware has it.

Autocast casts a weight to bf16 at every operation and caches the cast only for
weights that require grad, so the frozen base was cast again at every decoding step
(and every training step). `bf16_frozen_linears` holds bf16 copies of the frozen
linear weights for the duration instead: the same bf16 values autocast would make
(round to nearest), so the same results, without the per-step cast.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from fedmed_components.settings import PRECISIONS


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16 in the CPU flags (Linux); False where they cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """ "fp32" or "bf16" for a setting (auto | fp32 | bf16) on a device."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    if precision != "auto":
        return precision
    if str(device).startswith("cuda"):
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def autocast(precision: str, device: str | torch.device):
    """A context in which forward passes run at `precision` (already resolved)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    device_type = "cuda" if str(device).startswith("cuda") else "cpu"
    return torch.autocast(device_type, dtype=torch.bfloat16)


@contextlib.contextmanager
def bf16_frozen_linears(model, precision: str):
    """While inside, every plain `nn.Linear` whose weight does not require grad computes
    with a bf16 copy of its weight (and bias); the fp32 parameters are put back on exit.

    For use under bf16 `autocast` only (outside it a bf16 weight meets fp32 inputs). A
    no-op for fp32. Quantised layers (bitsandbytes subclasses) are left alone. A weight
    tied to an embedding (the LM head) gets its own copy: the embedding stays fp32, as
    autocast leaves it.
    """
    if precision != "bf16":
        yield model
        return
    swapped = []
    with torch.no_grad():
        for module in model.modules():
            if type(module) is not torch.nn.Linear or module.weight.requires_grad or module.weight.dtype != torch.float32:
                continue
            originals = {name: getattr(module, name) for name in ("weight", "bias") if getattr(module, name) is not None}
            for name, param in originals.items():
                setattr(module, name, torch.nn.Parameter(param.to(torch.bfloat16), requires_grad=False))
            swapped.append((module, originals))
    try:
        yield model
    finally:
        for module, originals in swapped:
            for name, param in originals.items():
                setattr(module, name, param)
