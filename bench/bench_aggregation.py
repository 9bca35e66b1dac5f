"""Server-side aggregation cost for Llama-3.1-8B-shaped LoRA adapters.

Builds K random adapters shaped like the paper's setting (32 layers, hidden 4096,
intermediate 14336, 8 KV heads x 128 = 1024 for k/v, r = 16 on q,k,v,o,gate,up,down:
~42M parameters, ~168 MB in fp32) and measures

* time: the streaming ``WeightedAverager`` adding K adapters versus one
  ``Tensor.copy_`` pass over the same bytes into a preallocated buffer (the floor any
  aggregation must pay to read its inputs), as a ratio (target <= 2x). "warm" is a
  later round, whose accumulator reuses the previous round's buffers like the copy
  does; "cold" is the first round, which also pays for allocating (page-faulting)
  one adapter's worth of accumulator; "prepared" is the first round as the FLARE
  aggregators run it: ``prepare(global adapter)`` allocates and touches the accumulator
  at round start, while the sites train (timed apart, not in the ratio), and the
  updates are then summed into it; ``result()`` (one division pass into new tensors)
  is timed apart;
* memory: peak RSS (VmHWM) of a fresh subprocess per K that generates each update on the fly,
  adds it and drops it, then takes the result: flat in K, about 2-3 adapters.

``--json`` writes the suite's table rows (``rows``, format in bench/report.py) and the
per-K measurements (``measurements``).

Usage: ``python bench/bench_aggregation.py [--sites 2 5 10] [--dtype fp32|bf16]
[--exact] [--json out.json]``. It takes about (K + 1) adapters of memory for the timing
part; ``--exact`` also times ``exact_lora`` (QR/SVD per layer, float64).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedmed_components.federation.aggregation import WeightedAverager, exact_lora  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def llama8b_lora_shapes(
    layers: int = 32, hidden: int = 4096, intermediate: int = 14336, kv: int = 1024, rank: int = 16
) -> dict[str, tuple[int, int]]:
    """PEFT key -> shape for LoRA on q,k,v,o,gate,up,down of a Llama-3.1-8B."""
    modules = {
        "self_attn.q_proj": (hidden, hidden),
        "self_attn.k_proj": (hidden, kv),
        "self_attn.v_proj": (hidden, kv),
        "self_attn.o_proj": (hidden, hidden),
        "mlp.gate_proj": (hidden, intermediate),
        "mlp.up_proj": (hidden, intermediate),
        "mlp.down_proj": (intermediate, hidden),
    }
    shapes = {}
    for i in range(layers):
        for module, (n_in, n_out) in modules.items():
            name = f"base_model.model.model.layers.{i}.{module}"
            shapes[f"{name}.lora_A.weight"] = (rank, n_in)
            shapes[f"{name}.lora_B.weight"] = (n_out, rank)
    return shapes


def make_adapter(shapes, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=gen, dtype=dtype) for k, shape in shapes.items()}


def adapter_bytes(shapes, dtype) -> int:
    item = torch.empty((), dtype=dtype).element_size()
    return sum(a * b for a, b in shapes.values()) * item


def _peak_rss_bytes() -> int:
    """Peak resident set of this process.

    VmHWM belongs to the address space, which execve replaces; ``ru_maxrss`` would
    carry the parent's peak over into the child on Linux, so it is only the fallback.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


# ---------------------------------------------------------------------------- timing
def time_aggregation(shapes, k: int, dtype, repeats: int, exact: bool) -> dict:
    updates = [make_adapter(shapes, seed, dtype) for seed in range(k)]
    weights = [1000.0 + 37 * i for i in range(k)]
    buffer = {key: torch.empty(shape, dtype=dtype) for key, shape in shapes.items()}
    for tensor in buffer.values():
        tensor.zero_()  # touch the pages: the copy floor pays no page faults

    copy_times, add_times, result_times = [], [], []
    averager = WeightedAverager()  # repeat 0 allocates its buffers (cold); later rounds reuse them
    for _ in range(max(repeats, 2)):
        start = time.perf_counter()
        for update in updates:
            for key, tensor in update.items():
                buffer[key].copy_(tensor)
        copy_times.append(time.perf_counter() - start)

        averager.reset()
        start = time.perf_counter()
        for update, weight in zip(updates, weights):
            averager.add(update, weight)
        add_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        result = averager.result()
        result_times.append(time.perf_counter() - start)
        del result
    # the first round as the FLARE aggregator runs it: a fresh averager, prepared at round start
    prepared = WeightedAverager()
    start = time.perf_counter()
    prepared.prepare(updates[0])
    prepare_s = time.perf_counter() - start
    start = time.perf_counter()
    for update, weight in zip(updates, weights):
        prepared.add(update, weight)
    add_prepared_s = time.perf_counter() - start
    del prepared
    row = {
        "copy_s": min(copy_times),
        "prepare_s": prepare_s,
        "add_prepared_s": add_prepared_s,
        "add_cold_s": add_times[0],
        "add_s": min(add_times[1:]),
        "result_s": min(result_times),
    }
    row["ratio_add"] = row["add_s"] / row["copy_s"]
    row["ratio_add_cold"] = row["add_cold_s"] / row["copy_s"]
    row["ratio_add_prepared"] = row["add_prepared_s"] / row["copy_s"]
    row["ratio_add_result"] = (row["add_s"] + row["result_s"]) / row["copy_s"]
    if exact:
        start = time.perf_counter()
        _, report = exact_lora(updates, weights, rank=16)
        row["exact_s"] = time.perf_counter() - start
        row["exact_residual"] = report["total_residual"]
        row["naive_residual"] = report["naive_total_residual"]
    return row


# ---------------------------------------------------------------------------- memory
def memory_child(k: int, dtype_name: str) -> None:
    """Runs in a fresh process: stream K generated updates through the averager."""
    dtype = DTYPES[dtype_name]
    shapes = llama8b_lora_shapes()
    torch.randn(4, 4) @ torch.randn(4, 4)  # load kernels before the baseline
    baseline = _peak_rss_bytes()
    averager = WeightedAverager()
    for seed in range(k):
        update = make_adapter(shapes, seed, dtype)
        averager.add(update, 1000.0 + 37 * seed)
        del update
    result = averager.result()
    peak = _peak_rss_bytes()
    print(json.dumps({"baseline": baseline, "peak": peak, "tensors": len(result)}))


def measure_memory(k: int, dtype_name: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", str(k), "--dtype", dtype_name],
        check=True,
        capture_output=True,
        text=True,
    )
    data = json.loads(out.stdout.strip().splitlines()[-1])
    return {"baseline_rss_mb": data["baseline"] / 2**20, "peak_over_baseline_mb": (data["peak"] - data["baseline"]) / 2**20}


# ------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[2, 5, 10], help="numbers of sites K")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timing rounds (>= 2): the first is reported as cold (allocates the accumulator), the minimum of the rest as warm",
    )
    parser.add_argument("--exact", action="store_true", help="also time exact_lora (SVD re-projection)")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-K memory subprocesses")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child is not None:
        memory_child(args.memory_child, args.dtype)
        return 0

    dtype = DTYPES[args.dtype]
    shapes = llama8b_lora_shapes()
    size_mb = adapter_bytes(shapes, dtype) / 2**20
    n_params = sum(a * b for a, b in shapes.values())
    print(
        f"Llama-3.1-8B LoRA r=16 on q,k,v,o,gate,up,down: {len(shapes)} tensors, {n_params / 1e6:.1f}M params, "
        f"{size_mb:.0f} MiB per adapter ({args.dtype}); torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    rows = []
    for k in args.sites:
        row = {"sites": k, "adapter_mb": size_mb}
        row.update(time_aggregation(shapes, k, dtype, args.repeats, args.exact))
        if not args.no_memory:
            row.update(measure_memory(k, args.dtype))
            row["peak_in_adapters"] = row["peak_over_baseline_mb"] / size_mb
        rows.append(row)

    header = (
        f"{'K':>3} {'copy s':>8} {'stream s':>9} {'cold s':>8} {'result s':>9} "
        f"{'add/copy':>9} {'cold/copy':>10} {'prepared/copy':>14} {'(add+res)/copy':>15}"
    )
    if not args.no_memory:
        header += f" {'peak MiB':>9} {'peak/adapter':>13}"
    if args.exact:
        header += f" {'exact s':>8} {'exact res':>10} {'naive res':>10}"
    print(header)
    for row in rows:
        line = (
            f"{row['sites']:>3} {row['copy_s']:>8.3f} {row['add_s']:>9.3f} {row['add_cold_s']:>8.3f} "
            f"{row['result_s']:>9.3f} {row['ratio_add']:>8.2f}x {row['ratio_add_cold']:>9.2f}x {row['ratio_add_prepared']:>13.2f}x "
            f"{row['ratio_add_result']:>14.2f}x"
        )
        if not args.no_memory:
            line += f" {row['peak_over_baseline_mb']:>9.0f} {row['peak_in_adapters']:>12.2f}x"
        if args.exact:
            line += f" {row['exact_s']:>8.2f} {row['exact_residual']:>10.4f} {row['naive_residual']:>10.4f}"
        print(line)
    if not args.no_memory and len(rows) > 1:
        peaks = [r["peak_over_baseline_mb"] for r in rows]
        print(f"peak memory spread over K: {max(peaks) - min(peaks):.0f} MiB (median {statistics.median(peaks):.0f} MiB)")
    if args.json:
        meta = {"dtype": args.dtype, "threads": torch.get_num_threads(), "torch": torch.__version__, "params": n_params}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "rows": table_rows(rows, args.dtype), "measurements": rows}, indent=2))
        print(f"wrote {args.json}")
    return 0


def table_rows(rows: list[dict], dtype: str) -> list[dict]:
    """The suite table's rows (format: bench/report.py)."""
    ks = "/".join(str(r["sites"]) for r in rows)
    warm = [r["ratio_add"] for r in rows]
    cold = [r["ratio_add_cold"] for r in rows]
    prepared = [r["ratio_add_prepared"] for r in rows]
    table = [
        {
            "figure": f"aggregation: streaming Fed-MedLoRA average / one memory-copy pass, K={ks} Llama-3.1-8B-shaped adapters ({dtype})",
            "value": " / ".join(f"{x:.2f}x" for x in warm) + " (later rounds)",
            "target": "<= 2x",
            "met": max(warm) <= 2.0,
        },
        {
            "figure": f"aggregation: the same, first round, accumulator prepared at round start (as the FLARE aggregators do), K={ks}",
            "value": " / ".join(f"{x:.2f}x" for x in prepared),
            "target": "<= 2x",
            "met": max(prepared) <= 2.0,
        },
        {
            "figure": f"aggregation: the same, first round, accumulator allocated by the first update (not prepared), K={ks}",
            "value": " / ".join(f"{x:.2f}x" for x in cold),
            "target": "no target (report)",
            "met": None,
        },
    ]
    if all("peak_in_adapters" in r for r in rows):
        peaks = [r["peak_in_adapters"] for r in rows]
        table.append(
            {
                "figure": f"aggregation: server peak memory, K={ks}, in adapters ({rows[0]['adapter_mb']:.0f} MiB each)",
                "value": " / ".join(f"{x:.2f}" for x in peaks) + f" (spread {max(peaks) - min(peaks):.2f})",
                "target": "flat in K (spread <= 0.25 adapter)",
                "met": max(peaks) - min(peaks) <= 0.25,
            }
        )
    if all("exact_s" in r for r in rows):
        table.append(
            {
                "figure": f"aggregation: exact (SVD) LoRA aggregation, K={ks}",
                "value": " / ".join(f"{r['exact_s']:.1f} s" for r in rows),
                "target": "no target (report)",
                "met": None,
            }
        )
    return table


if __name__ == "__main__":
    sys.exit(main())
