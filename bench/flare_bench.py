"""Shared by the FLARE benchmarks: metered jobs, simulator/POC runs, and reading their records.

A metered job is the product's own job (``fedmed_components.flare.job.build_job``) with a
``WireMeter`` added on the server (and, for 8-bit transfer, the ``Int8Quantizer`` /
``Int8Dequantizer`` result filters the ``clinical_dp`` privacy scope uses). After a run,
``RunRecord`` joins three sources measured in that run:

* the meter's JSON: bytes each site sent per result, task dispatch times, server memory;
* the persistor's ``state.json``: the controller's ``round_seconds`` per round;
* the site logs: each site's own train + validation seconds per round
  (``site_tasks.train`` logs ``"<site> round <n>: ... <seconds> s"``).
"""

from __future__ import annotations

import json
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedmed_components.flare.job import JobSpec, run_simulator  # noqa: E402
from fedmed_components.flare.recipe import export_job  # noqa: E402

SITE_ROUND_LINE = re.compile(r"(\S+) round (\d+): \d+ steps, .* payload [\d.]+ MB, ([\d.]+) s")


def metered_job(spec: JobSpec, job_root: Path, meter_file: Path, *, int8: bool = False) -> Path:
    """Export the product job with a wire meter (and optionally int8 transfer) added."""
    from nvflare.job_config.defs import FilterType

    from fedmed_components.flare.filters import Int8Dequantizer, Int8Quantizer
    from fedmed_components.flare.wire_meter import WireMeter

    def customize(job):
        job.to_server(WireMeter(out_file=str(meter_file)), id="wire_meter")
        if int8:
            # Name the task: FLARE 2.9 files a job filter under "<task>/<direction>" and
            # looks it up by the real task name, so its default tasks=["*"] never applies.
            job.to_clients(Int8Quantizer(tasks=["train"]), filter_type=FilterType.TASK_RESULT, tasks=["train"])
            job.to_server(Int8Dequantizer(), filter_type=FilterType.TASK_RESULT, tasks=["train"])

    return export_job(spec, job_root, customize=customize)


def site_seconds(log_roots: list[Path]) -> dict[tuple[str, int], float]:
    """(site, round) -> the site's own compute seconds, from every log under the roots."""
    found: dict[tuple[str, int], float] = {}
    for root in log_roots:
        files = [root] if root.is_file() else sorted(root.rglob("log.txt")) + sorted(root.rglob("*.log"))
        for file in files:
            for line in file.read_text(errors="replace").splitlines():
                match = SITE_ROUND_LINE.search(line)
                if match:
                    found[(match.group(1), int(match.group(2)))] = float(match.group(3))
    return found


@dataclass
class RunRecord:
    """What one metered run measured."""

    launched: float  # time.time() when the run was started or the job submitted
    finished: float
    meter: dict
    state: dict
    site_seconds: dict = field(default_factory=dict)

    @classmethod
    def read(cls, launched: float, finished: float, meter_file: Path, adapter_store: Path, log_roots: list[Path]) -> RunRecord:
        return cls(
            launched=launched,
            finished=finished,
            meter=json.loads(Path(meter_file).read_text()),
            state=json.loads((Path(adapter_store) / "state.json").read_text()),
            site_seconds=site_seconds(log_roots),
        )

    # ------------------------------------------------------------- derived figures
    def train_results(self, sites=None) -> list[dict]:
        return [r for r in self.meter["results"] if r.get("task") == "train" and (sites is None or r["site"] in sites)]

    def rounds(self) -> list[dict]:
        """Per round: controller seconds, slowest site's own seconds, their difference."""
        rows = []
        for entry in self.state.get("history", []):
            rnd = int(entry["current_round"])
            sites = {s: sec for (s, r), sec in self.site_seconds.items() if r == rnd}
            slowest = max(sites.values()) if sites else float("nan")
            rows.append(
                {
                    "round": rnd,
                    "round_seconds": float(entry["round_seconds"]),
                    "site_seconds": sites,
                    "slowest_site_seconds": slowest,
                    "overhead_seconds": float(entry["round_seconds"]) - slowest,
                }
            )
        return rows

    def median_overhead(self) -> float:
        return statistics.median(r["overhead_seconds"] for r in self.rounds())

    def median_round_seconds(self) -> float:
        return statistics.median(r["round_seconds"] for r in self.rounds())

    def startup_seconds(self) -> float:
        """Launch/submit to the first training task leaving the server."""
        first = min(d["time"] for d in self.meter["dispatches"] if d.get("task") == "train")
        return first - self.launched

    def server_peak_rss_bytes(self) -> int:
        samples = [r.get("peak_rss_bytes", 0) for r in self.meter["results"]]
        samples.append((self.meter.get("memory_at_end") or {}).get("peak_rss_bytes", 0))
        return max(samples)

    def bytes_per_site_round(self, key: str = "frame_bytes", sites=None) -> float:
        return statistics.median(r[key] for r in self.train_results(sites))

    def raw_tensor_bytes(self, sites=None) -> int:
        """The adapter tensors as the site's trainer produced them (after any server-side restore)."""
        return statistics.median(r.get("tensor_bytes_restored", r["tensor_bytes_received"]) for r in self.train_results(sites))


def run_metered_simulation(spec: JobSpec, work: Path, sites: list[str], *, int8: bool = False, timeout: float = 600) -> RunRecord:
    """Export a metered job into `work`, run it in the simulator (own workspace, bounded,
    every process stopped), and read what it measured."""
    work = Path(work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    meter_file = work / "wire_meter.json"
    spec.output_dir = str(work / "adapters")
    job_dir = metered_job(spec, work / "jobs", meter_file, int8=int8)
    launched = time.time()
    workspace = run_simulator(job_dir, work / "simulator", sites, timeout=timeout, log_file=work / "simulator.log")
    return RunRecord.read(launched, time.time(), meter_file, work / "adapters", [work / "simulator.log", workspace])


def tiny_spec(name: str, sites: list[str], data: Path, *, rounds: int, local_steps: int, **overrides) -> JobSpec:
    """A small tiny-model job: the framework's cost, not training, dominates its rounds."""
    settings = dict(
        name=name,
        algorithm="fed_medlora",
        model="tiny",
        sites=sites,
        num_rounds=rounds,
        min_clients=len(sites),
        local_steps=local_steps,
        batch_size=2,
        max_length=128,
        rank=8,
        alpha=16,
        quantize="none",
        data=str(data),
        extra_site_args="--val-fraction 0 --max-val-examples 4",
        train_timeout=600,
        eval_timeout=600,
        cross_site_eval=False,  # the benchmarks time and meter the rounds, not the final scoring
    )
    settings.update(overrides)
    return JobSpec(**settings)


def write_site_data(root: Path, n_sites: int, docs_per_site: int = 4, seed: int = 0) -> list[str]:
    """Synthetic notes for sites site-1..site-n (train.jsonl + val.jsonl each)."""
    from fedmed_components.data.document import write_jsonl
    from fedmed_components.data.synth import demo_corpus

    sites = []
    for i, (_, docs) in enumerate(sorted(demo_corpus(n_sites=n_sites, docs_per_site=docs_per_site, seed=seed).items())):
        site = f"site-{i + 1}"
        write_jsonl(docs[:-1], root / site / "train.jsonl")
        write_jsonl(docs[-1:], root / site / "val.jsonl")
        sites.append(site)
    return sites


def row(figure: str, value: str, target: str, met: bool | None, **extra) -> dict:
    """One line of the suite's table (see bench/report.py for the format)."""
    return {"figure": figure, "value": value, "target": target, "met": met, **extra}
