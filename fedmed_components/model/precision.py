"""Compute precision for training and generation: fp32, or bf16 autocast where it pays.

bf16 runs through `torch.autocast`: matrix products run in bf16 while the LoRA weights,
their gradients and AdamW's state stay fp32 (autocast casts per operation, it does not
convert parameters). On CUDA the paper's setting is bf16 compute over the NF4 base.
On a CPU bf16 is only fast with native bf16 instructions (AVX512-BF16 or AMX); without
them PyTorch emulates it, measured >10x slower than fp32 on an AVX2-only EPYC, so
`auto` picks bf16 only where the hardware has it.
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
