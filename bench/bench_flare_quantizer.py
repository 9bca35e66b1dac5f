"""FLARE 2.9's own ``ModelQuantizer`` / ``ModelDequantizer`` filters against FedMed's
``Int8Quantizer`` / ``Int8Dequantizer`` on one LoRA adapter, on the CPU.

What it measures, per method, on a SmolLM2-135M-shaped adapter (r=16 on the 7
projections x 30 layers = 420 tensors, 4.88M float32 values, as ``bench_communication.py``
sends it):

- **bytes ratio vs fp32**: the result Shareable (a WEIGHTS DXO of torch tensors, as the
  site script sends with ``params_exchange_format: pytorch``) after the site's quantising
  filter, serialised with FLARE's own ``fobs.dumps`` (``TensorDecomposer``: one safetensors
  blob per tensor, the filter's metadata in msgpack), over the same for the fp32 result.
  ``payload`` is FLARE's own accounting: tensor nbytes plus the tensors/arrays the filter
  puts in the DXO meta.
- **max abs error / max relative error / relative L2** of what the server's dequantising
  filter gives back (after ``fobs.loads``) against the fp32 adapter; the relative error is
  per tensor, ``max|x - x'| / max|x|``, the worst tensor (element-wise relative error is
  unbounded near zero for every method).
- **seconds**: quantise + dequantise filter calls (no serialisation), one run, on
  ``--threads`` torch threads (default 1: on a busy machine a 2-thread elementwise op
  waits for its second thread's time slice, ~8 ms per op, which would swamp every
  figure; FedMed's ``torch.round`` on 420 tensors showed 3.3 s that way, 0.05 s on 1).

Both filter pairs run through their real ``Filter.process`` on a Shareable. FLARE's
``blockwise8`` / ``float4`` / ``normfloat4`` call ``tensor.cuda()`` unconditionally; on a
machine without CUDA they fail (the script records the error) and are then re-run with
``torch.Tensor.cuda`` patched to a no-op for the call, so that bitsandbytes' own CPU kernels
(bitsandbytes 0.50 has them) produce the figures: those rows are marked ``*`` and show what
the filter would send, not something it can run on a CPU as shipped.

The adapter: ``initial_adapter_from_config`` (LoRA tensors on a meta skeleton, no base
weights) gives the shapes and PEFT's A; B (zero at the start) is filled with
N(0, 0.007^2), the spread of B in a trained FedMed SmolLM2 adapter (so B is not trivially
exact). ``--adapter FILE`` measures a real adapter_model.safetensors instead.

    python bench/bench_flare_quantizer.py [--model smollm2-135m] [--adapter FILE] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch

B_STD = 0.007  # std of lora_B in a trained FedMed SmolLM2-135M adapter (r16, 3 rounds)
FLARE_TYPES = ("float16", "blockwise8", "float4", "normfloat4", "adaquant")


def build_adapter(model: str, adapter: str | None, seed: int = 0) -> dict[str, torch.Tensor]:
    if adapter:
        from safetensors.torch import load_file

        return {k: v.float().contiguous() for k, v in load_file(adapter).items()}
    from fedmed_components.federation.lora_keys import is_lora_B
    from fedmed_components.model.modeling import LoraSettings, initial_adapter_from_config, resolve_model

    state = initial_adapter_from_config(resolve_model(model), LoraSettings(), seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    for key, value in state.items():
        if is_lora_B(key):
            state[key] = torch.randn(value.shape, generator=generator) * B_STD
    return state


def shareable_of(state: dict[str, torch.Tensor]):
    from nvflare.apis.dxo import DXO, DataKind

    return DXO(DataKind.WEIGHTS, {k: v.clone() for k, v in state.items()}).to_shareable()


def meta_nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if hasattr(obj, "nbytes") and hasattr(obj, "dtype"):  # numpy
        return int(obj.nbytes)
    if isinstance(obj, dict):
        return sum(meta_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(meta_nbytes(v) for v in obj)
    return 0


def payload_bytes(shareable) -> int:
    from nvflare.apis.dxo import from_shareable

    dxo = from_shareable(shareable)
    return sum(v.numel() * v.element_size() for v in dxo.data.values()) + meta_nbytes(dxo.meta)


@contextlib.contextmanager
def cuda_is_noop(active: bool):
    """``tensor.cuda()`` returns the tensor itself (bitsandbytes then runs its CPU kernels)."""
    if not active:
        yield
        return
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def errors(reference: dict[str, torch.Tensor], restored: dict[str, torch.Tensor]) -> dict:
    max_abs = max_rel = 0.0
    diff_sq = ref_sq = 0.0
    for key, x in reference.items():
        y = torch.as_tensor(restored[key])
        if y.dtype != x.dtype or y.shape != x.shape:
            raise AssertionError(f"{key}: restored as {y.dtype} {tuple(y.shape)}, sent {x.dtype} {tuple(x.shape)}")
        d = (y.double() - x.double()).abs()
        max_abs = max(max_abs, float(d.max()))
        max_rel = max(max_rel, float(d.max()) / max(float(x.abs().max()), 1e-30))
        diff_sq += float((d * d).sum())
        ref_sq += float((x.double() ** 2).sum())
    return {"max_abs_error": max_abs, "max_rel_error": max_rel, "rel_l2_error": (diff_sq / max(ref_sq, 1e-300)) ** 0.5}


def run_pair(name: str, quantizer, dequantizer, state, fp32_wire: int, fp32_payload: int, patch_cuda: bool = False) -> dict:
    from nvflare.apis.dxo import from_shareable
    from nvflare.apis.fl_context import FLContext
    from nvflare.fuel.utils import fobs

    shareable = shareable_of(state)
    started = time.perf_counter()
    with cuda_is_noop(patch_cuda):
        sent = quantizer.process(shareable, FLContext())
    quantise_s = time.perf_counter() - started
    payload = payload_bytes(sent)
    wire = fobs.dumps(sent)
    received = fobs.loads(wire)
    started = time.perf_counter()
    with cuda_is_noop(patch_cuda):
        restored = dequantizer.process(received, FLContext())
    seconds = quantise_s + time.perf_counter() - started
    dxo = from_shareable(restored)
    leftover = sorted(k for k in dxo.meta if k in ("quant_state", "source_datatype", "quantized_flag", "fedmed_int8"))
    return {
        "method": name,
        "bytes": len(wire),
        "bytes_ratio": len(wire) / fp32_wire,
        "payload_ratio": payload / fp32_payload,
        **errors(state, dxo.data),
        "seconds": seconds,
        "cpu_as_shipped": not patch_cuda,
        "meta_left_after_dequantise": leftover,
    }


def measure(model: str, adapter: str | None) -> dict:
    from nvflare.apis.fl_context import FLContext
    from nvflare.app_opt.pt.decomposers import TensorDecomposer
    from nvflare.app_opt.pt.quantization.dequantizer import ModelDequantizer
    from nvflare.app_opt.pt.quantization.quantizer import ModelQuantizer
    from nvflare.fuel.utils import fobs

    from fedmed_components.flare.filters import Int8Dequantizer, Int8Quantizer

    fobs.register(TensorDecomposer)
    with contextlib.suppress(Exception):
        from nvflare.app_common.decomposers import common_decomposers

        common_decomposers.register()  # numpy arrays in adaquant's meta
    state = build_adapter(model, adapter)
    fp32 = shareable_of(state)
    fp32_wire, fp32_payload = len(fobs.dumps(fp32)), payload_bytes(fp32)
    rows = [
        {
            "method": "fp32 (no filter)",
            "bytes": fp32_wire,
            "bytes_ratio": 1.0,
            "payload_ratio": 1.0,
            "max_abs_error": 0.0,
            "max_rel_error": 0.0,
            "rel_l2_error": 0.0,
            "seconds": 0.0,
            "cpu_as_shipped": True,
        },
        run_pair("FedMed Int8Quantizer", Int8Quantizer(), Int8Dequantizer(), state, fp32_wire, fp32_payload),
    ]
    failures = {}
    for qtype in FLARE_TYPES:
        name = f"FLARE ModelQuantizer {qtype}"
        try:
            rows.append(run_pair(name, ModelQuantizer(qtype), ModelDequantizer(), state, fp32_wire, fp32_payload))
        except Exception as exc:  # recorded, then re-run on bitsandbytes' CPU kernels
            failures[qtype] = f"{type(exc).__name__}: {exc}"
            if torch.cuda.is_available():
                continue
            row = run_pair(name + " *", ModelQuantizer(qtype), ModelDequantizer(), state, fp32_wire, fp32_payload, patch_cuda=True)
            rows.append(row)

    # Fit: a result that was not quantised (a site whose scope sends fp32) reaching the
    # server's dequantiser, as every scope in poc_setup/privacy.json lists one.
    fit = {}
    for name, dequantizer in (("FedMed Int8Dequantizer", Int8Dequantizer()), ("FLARE ModelDequantizer", ModelDequantizer())):
        try:
            out = dequantizer.process(shareable_of(state), FLContext())
            fit[name] = "passes an unquantised result unchanged" if out is not None else "returned None"
        except Exception as exc:
            fit[name] = f"fails on an unquantised result: {type(exc).__name__}: {exc}"
    return {
        "adapter": adapter or f"{model}, initial_adapter_from_config, lora_B ~ N(0, {B_STD}^2)",
        "tensors": len(state),
        "values": sum(v.numel() for v in state.values()),
        "fp32_wire_bytes": fp32_wire,
        "cuda": torch.cuda.is_available(),
        "rows": rows,
        "failures_as_shipped": failures,
        "unquantised_result_at_server": fit,
    }


def print_table(result: dict) -> None:
    size = f"{result['tensors']} tensors, {result['values']:,} values, fp32 on the wire {result['fp32_wire_bytes']:,} B"
    print(f"adapter: {result['adapter']}: {size}")
    header = f"{'method':<36} {'bytes vs fp32':>13} {'payload':>8} {'max abs err':>12} {'max rel err':>12} {'rel L2':>9} {'seconds':>8}"
    print(header)
    print("-" * len(header))
    for r in result["rows"]:
        print(
            f"{r['method']:<36} {r['bytes_ratio']:>12.4f}x {r['payload_ratio']:>7.4f}x {r['max_abs_error']:>12.3e} "
            f"{r['max_rel_error']:>12.3e} {r['rel_l2_error']:>9.2e} {r['seconds']:>8.2f}"
        )
    for qtype, error in result["failures_as_shipped"].items():
        print(f"as shipped, on this machine (CUDA {result['cuda']}): {qtype}: {error}")
    if any(not r["cpu_as_shipped"] for r in result["rows"]):
        print("* filter code run with tensor.cuda() patched to a no-op (bitsandbytes CPU kernels); it cannot run on a CPU as shipped")
    for name, outcome in result["unquantised_result_at_server"].items():
        print(f"{name}: {outcome}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="model whose LoRA shapes to use (default smollm2-135m)")
    parser.add_argument("--adapter", help="an adapter_model.safetensors to measure instead")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = measure(args.model, args.adapter)
    print_table(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
