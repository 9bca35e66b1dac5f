"""The results folder's summary: summary.md and the PNG plots, from the per-run JSON only.

Everything here reads the run JSON written by `runner.run_experiment`, so the report can
be rebuilt (`fedmed experiment CONFIG --report-only`) and checked against the JSON: every
number in summary.md is a JSON value printed with 3 decimals.
"""

from __future__ import annotations

from pathlib import Path

from fedmed_components.runs.experiment.comparisons import (
    ablation_rows,
    calibrated_rows,
    difference_rows,
    goals,
    new_site_difference_rows,
    personalised_rows,
)
from fedmed_components.runs.experiment.plots import write_plots
from fedmed_components.runs.experiment.tables import (
    communication_rows,
    equal_steps_rows,
    main_rows,
    markdown_table,
    new_site_rows,
    per_type_rows,
    relation_rows,
    site_adapter_rows,
    weight_rows,
)


def summary_markdown(cfg, results: dict[str, dict]) -> str:
    site_names = [s.name for s in cfg.sites]
    external = cfg.external.name if cfg.external else None
    s = cfg.sampling
    lines = [
        f"# Experiment `{cfg.name}`",
        "",
        f"Model `{cfg.model}` (quantize {cfg.quantize}), LoRA r={cfg.rank} alpha={cfg.alpha}; {cfg.rounds} rounds x "
        f"{cfg.local_steps} local steps per site, batch {cfg.batch_size}, max length {cfg.max_length}, lr {cfg.lr}, schedule {cfg.schedule}; seed {s.seed}.",
        f"Sites: {', '.join(site_names)}" + (f"; external / new site: {external}" if external else "") + ".",
        f"Data: per site, notes split {1 - s.test_fraction:.0%} train / {s.test_fraction:.0%} test (seed {s.seed}) before anything "
        f"trains, {s.val_fraction:.0%} of train for validation; sentences used: at most {s.max_train_sentences or 'all'} train, "
        f"{s.max_val_sentences or 'all'} val, {s.max_test_sentences or 'all'} test per site"
        + (f" ({external}: {cfg.external.max_test_sentences} test notes)" if external and cfg.external.max_test_sentences else "")
        + ".",
        "Scores: n2c2 strict / lenient micro F1; main entities = problem, treatment, test, drug; all-type = main entities and "
        "modifier spans; modifier F1 = hasAttr links (head and tail both matched); a partial-schema site is scored only on the "
        "types it annotates; `pooled` = the sites' test notes together. [a, b] = 95% bootstrap interval over test notes "
        "(pooled: resampled within each site).",
        "",
        "## In-domain and external test",
        "",
    ]
    lines += markdown_table(*main_rows(results, site_names, external))
    diff = difference_rows(results)
    if diff[1]:
        lines += ["", "## Differences (paired bootstrap over the same test notes)", ""]
        lines += markdown_table(*diff)
    ablations = ablation_rows(results)
    if ablations[1]:
        lines += ["", "## Federated runs and ablations (each ablation against the paper method it changes)", ""]
        lines += markdown_table(*ablations)
    own = personalised_rows(results)
    if own[1]:
        lines += ["", "## Personalised: each site's own last adapter on its own notes (paired over the same test notes)", ""]
        lines += markdown_table(*own)
    calibrated = calibrated_rows(results)
    if calibrated[1]:
        lines += ["", "## Modifiers at the none bias chosen on validation (paired over the same test notes)", ""]
        lines += markdown_table(*calibrated)
    lines += ["", "## Pooled strict F1 per type", ""]
    lines += markdown_table(*per_type_rows(results))
    lines += ["", "## Modifier (relation) F1 per site", ""]
    lines += markdown_table(*relation_rows(results, site_names))
    steps = equal_steps_rows(results, cfg.local_steps)
    if steps[1]:
        lines += ["", "## Validation F1 at equal steps along the adapter's path (strict main entities / modifiers)", ""]
        lines += markdown_table(*steps)
    own = site_adapter_rows(results, site_names)
    if own[1]:
        lines += ["", "## Validation F1 of each site's own adapter before the mean (strict main entities / modifiers)", ""]
        lines += markdown_table(*own)
    weights = weight_rows(results)
    if weights[1]:
        lines += ["", "## Aggregation weights used", ""]
        lines += markdown_table(*weights)
    comm = communication_rows(results)
    if comm[1]:
        lines += ["", "## Communication (fp32 adapter vs full-model FedAvg in fp32, upload per site)", ""]
        lines += markdown_table(*comm)
    if external:
        lines += ["", f"## New-site adaptation ({external} test split)", ""]
        lines += markdown_table(*new_site_rows(results, cfg))
        gaps = new_site_difference_rows(results)
        if gaps[1]:
            lines += ["", "Paired over the same test notes, each seed drawing the same notes for both starts:", ""]
            lines += markdown_table(*gaps)
    lines += ["", "## Goals", ""] + (goals(results, cfg) or ["- not enough runs finished to measure"])
    missing = [f"- `{r}`: {v['status']}" for r, v in results.items() if v.get("status") != "done"]
    not_run = [f"- `{r}`: not run yet" for r in cfg.run_ids() if r not in results]
    if missing or not_run:
        lines += ["", "## Not available", ""] + missing + not_run
    lines += ["", "## Wall time per run (s)", ""]
    lines += markdown_table(["run", "seconds"], [[r, f"{v.get('seconds', 0):.0f}"] for r, v in results.items()])
    return "\n".join(lines) + "\n"


def write_report(cfg, results: dict[str, dict], out: Path) -> None:
    out = Path(out)
    (out / "summary.md").write_text(summary_markdown(cfg, results))
    write_plots(cfg, results, out)
