"""Scaling: round time and server memory from 2 to 10 simulated sites (tiny model).

One Fed-MedLoRA simulator job per site count (each site its own process, 1 local step
a round, 3 rounds). Per run: the median round time after the first round (the
controller's ``round_seconds``), the slowest site's own compute in those rounds, and
the server's peak resident memory (VmHWM of the process the server runs in, read by
``WireMeter`` inside it: in the simulator that is a child of the process the user
starts). On a 2-core machine the sites' processes share the cores, so round time
grows with the site count through the sites' compute as well: both are plotted.

Writes a PNG (matplotlib) with both curves and the JSON rows.

Usage: ``python bench/bench_scaling.py [--sites 2 4 6 8 10] [--plot bench/results/scaling.png] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from flare_bench import row, run_metered_simulation, tiny_spec, write_site_data  # noqa: E402


def measure(n_sites: int, work: Path, rounds: int, timeout: float) -> dict:
    sites = write_site_data(work / "data", n_sites, docs_per_site=2)
    spec = tiny_spec(f"scaling_{n_sites}", sites, work / "data", rounds=rounds, local_steps=1)
    record = run_metered_simulation(spec, work / "run", sites, timeout=timeout)
    later = record.rounds()[1:] or record.rounds()
    result = {
        "sites": n_sites,
        "round_s": statistics.median(r["round_seconds"] for r in later),
        "site_s": statistics.median(r["slowest_site_seconds"] for r in later),
        "overhead_s": statistics.median(r["overhead_seconds"] for r in later),
        "server_peak_rss_mb": record.server_peak_rss_bytes() / 2**20,
        "server_rss_at_start_mb": (record.meter.get("memory_at_start") or {}).get("rss_bytes", 0) / 2**20,
        "adapter_mb": record.raw_tensor_bytes() / 2**20,
        "startup_s": record.startup_seconds(),
    }
    print(
        f"{n_sites:>2} sites: round {result['round_s']:.2f} s (slowest site {result['site_s']:.2f} s), "
        f"server peak RSS {result['server_peak_rss_mb']:.0f} MiB, start-up {result['startup_s']:.1f} s"
    )
    return result


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites = [r["sites"] for r in results]
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(10, 4))
    ax_time.plot(sites, [r["round_s"] for r in results], "o-", label="round (controller)")
    ax_time.plot(sites, [r["site_s"] for r in results], "s--", label="slowest site's own compute")
    ax_time.plot(sites, [r["overhead_s"] for r in results], "^:", label="difference (framework)")
    ax_time.set(xlabel="simulated sites", ylabel="seconds per round (median)", title="Round time, tiny model, 2-core CPU")
    ax_time.legend()
    ax_mem.plot(sites, [r["server_peak_rss_mb"] for r in results], "o-", label="server peak RSS")
    ax_mem.plot(sites, [r["server_rss_at_start_mb"] for r in results], "s--", label="server RSS at start of run")
    ax_mem.set(xlabel="simulated sites", ylabel="MiB", title="Server memory")
    ax_mem.set_ylim(bottom=0)
    ax_mem.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_rows(results: list[dict], plot_path: Path) -> list[dict]:
    first, last = results[0], results[-1]
    n0, n1 = first["sites"], last["sites"]
    per_site_mb = (last["server_peak_rss_mb"] - first["server_peak_rss_mb"]) / max(1, n1 - n0)
    return [
        row(
            f"scaling: round time, {n0} -> {n1} simulated sites (tiny; plot {plot_path.name})",
            f"{first['round_s']:.2f} s -> {last['round_s']:.2f} s ({last['round_s'] / first['round_s']:.2f}x); "
            f"framework part {first['overhead_s']:.2f} s -> {last['overhead_s']:.2f} s",
            "no target (report)",
            None,
        ),
        row(
            f"scaling: server peak RSS, {n0} -> {n1} simulated sites",
            f"{first['server_peak_rss_mb']:.0f} -> {last['server_peak_rss_mb']:.0f} MiB ({per_site_mb:+.1f} MiB per added site; "
            f"adapter {last['adapter_mb']:.2f} MiB)",
            "no target (report)",
            None,
        ),
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1]
    )
    parser.add_argument("--sites", type=int, nargs="+", default=[2, 4, 6, 8, 10], help="site counts")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed per simulator run")
    parser.add_argument("--plot", type=Path, default=Path(__file__).resolve().parent / "results" / "scaling.png")
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one, removed afterwards)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    work = Path(args.work or tempfile.mkdtemp(prefix="fedmed-bench-scaling-")).resolve()
    try:
        results = [measure(n, work / f"sites_{n}", args.rounds, args.timeout) for n in sorted(args.sites)]
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    plot(results, args.plot)
    print(f"wrote {args.plot}")
    rows = build_rows(results, args.plot)
    for r in rows:
        print(f"{r['figure']}: {r['value']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": rows, "runs": results, "plot": str(args.plot)}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
