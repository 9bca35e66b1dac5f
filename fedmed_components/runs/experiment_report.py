"""The results folder's summary: Markdown tables and PNG plots, from the per-run JSON only.

Everything here reads the run JSON written by `experiment.run_experiment`, so the
report can be rebuilt (`fedmed experiment CONFIG --report-only`) and checked against
the JSON: every number in summary.md is a JSON value printed with 3 decimals.
"""

from __future__ import annotations

from pathlib import Path

PLOTS = ("f1_per_round.png", "val_loss_per_round.png", "per_site_f1.png", "communication.png")


def f1(score: dict | None, group: str, mode: str) -> float | None:
    """One F1 from a score object; None where the group is not scored (no relations)."""
    if not score or not score.get(group) or not score[group].get(mode):
        return None
    return score[group][mode]["f1"]


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def interval(result: dict, where: str, group: str, mode: str) -> dict | None:
    """The run's bootstrap interval of one F1 (`where`: pooled | external | a site name)."""
    block = result.get("intervals") or {}
    block = block["sites"].get(where) if where in (block.get("sites") or {}) else block.get(where)
    return ((block or {}).get(group) or {}).get(mode)


def fmt_ci(result: dict, where: str, group: str, mode: str) -> str:
    """'F1 [low, high]' (the 95% interval over notes), or the F1 alone where none was made."""
    score = (result.get("scores") or {}).get(where)
    if score is None:
        score = (result.get("scores") or {}).get("sites", {}).get(where)
    value = f1(score, group, mode)
    ci = interval(result, where, group, mode)
    if value is None:
        return "n/a"
    return f"{value:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]" if ci else f"{value:.3f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _scored(results: dict[str, dict]) -> dict[str, dict]:
    return {r: v for r, v in results.items() if v.get("kind") != "new_site" and "pooled" in (v.get("scores") or {})}


def main_rows(results: dict[str, dict], site_names: list[str], external: str | None) -> tuple[list[str], list[list[str]]]:
    """The headline: pooled in-domain F1 with 95% intervals, per-site main-entity F1, external."""
    header = [
        "run",
        "kind",
        "pooled main-entity strict F1",
        "pooled main-entity lenient F1",
        "pooled all-type entity strict F1",
        "pooled modifier strict F1",
        "pooled modifier lenient F1",
    ]
    header += [f"{s} main strict F1" for s in site_names]
    if external:
        header += [f"external {external} main strict F1", f"external {external} main lenient F1"]
    rows = []
    for run_id, r in _scored(results).items():
        row = [
            run_id,
            r["kind"],
            fmt_ci(r, "pooled", "main_entities", "strict"),
            fmt_ci(r, "pooled", "main_entities", "lenient"),
            fmt_ci(r, "pooled", "entities", "strict"),
            fmt_ci(r, "pooled", "relations", "strict"),
            fmt_ci(r, "pooled", "relations", "lenient"),
        ]
        row += [fmt(f1(r["scores"]["sites"].get(s), "main_entities", "strict")) for s in site_names]
        if external:
            ext = r["scores"].get("external")
            row += [fmt_ci(r, "external", "main_entities", "strict"), fmt(f1(ext, "main_entities", "lenient"))]
        rows.append(row)
    return header, rows


def per_type_rows(results: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    """Pooled in-domain strict F1 per entity type (summed over the sites that annotate it)."""
    from fedmed_components.data.schema import ENTITY_TYPES
    from fedmed_components.task.metrics import prf

    scored = _scored(results)
    present = [
        t
        for t in ENTITY_TYPES
        if any(t in s["entities"].get("per_type", {}) for r in scored.values() for s in r["scores"]["sites"].values())
    ]
    rows = []
    for run_id, r in scored.items():
        row = [run_id]
        for t in present:
            parts = [
                s["entities"]["per_type"][t]["strict"] for s in r["scores"]["sites"].values() if t in s["entities"].get("per_type", {})
            ]
            row.append(fmt(prf(*(sum(p[k] for p in parts) for k in ("tp", "fp", "fn")))["f1"]))
        rows.append(row)
    return ["run"] + present, rows


def relation_rows(results: dict[str, dict], site_names: list[str]) -> tuple[list[str], list[list[str]]]:
    """Per-site modifier (relation) F1, strict / lenient."""
    header = ["run"] + [f"{s} rel strict / lenient F1" for s in site_names]
    rows = []
    for run_id, r in results.items():
        scores = r.get("scores") or {}
        if "sites" not in scores:
            continue
        rows.append(
            [run_id]
            + [
                f"{fmt(f1(scores['sites'].get(s), 'relations', 'strict'))} / {fmt(f1(scores['sites'].get(s), 'relations', 'lenient'))}"
                for s in site_names
            ]
        )
    return header, rows


def _pooled_counts(result: dict, group: str, mode: str, notes=None):
    from fedmed_components.task.bootstrap import aligned_counts

    per_note = {site: s.get("per_note") or {} for site, s in result["scores"]["sites"].items()}
    return aligned_counts(per_note, group, mode, notes)


def paired(a: dict, b: dict, group: str = "main_entities", mode: str = "strict"):
    """Paired bootstrap interval of pooled F1(a) - F1(b) over the same test notes."""
    from fedmed_components.task.bootstrap import paired_difference

    counts_a, strata, notes = _pooled_counts(a, group, mode)
    counts_b, _, _ = _pooled_counts(b, group, mode, notes)
    return paired_difference(counts_a, counts_b, strata)


def _pooled_f1(results: dict, run_id: str, group: str = "main_entities") -> float | None:
    return f1(((results.get(run_id) or {}).get("scores") or {}).get("pooled"), group, "strict")


def comparisons(results: dict[str, dict]) -> list[tuple[str, str, str]]:
    """The differences the evaluation is about: (label, run a, run b), both finished."""
    singles = {
        r: _pooled_f1(results, r) for r, v in results.items() if v.get("kind") == "single_site" and _pooled_f1(results, r) is not None
    }
    best_single = max(singles, key=singles.get) if singles else None
    wanted = [
        ("Fed-MedLoRA+ - centralised", "fed_medlora_plus", "centralised"),
        (f"Fed-MedLoRA+ - best single site ({best_single})", "fed_medlora_plus", best_single),
        ("Fed-MedLoRA+ - Fed-MedLoRA", "fed_medlora_plus", "fed_medlora"),
        ("Fed-MedLoRA+ (LLM) - BERT", "fed_medlora_plus", "bert"),
        ("centralised (LLM) - BERT", "centralised", "bert"),
        ("Fed-MedLoRA - centralised", "fed_medlora", "centralised"),
    ]
    return [
        (label, a, b)
        for label, a, b in wanted
        if a in results and b in results and "pooled" in results[a].get("scores", {}) and "pooled" in results[b].get("scores", {})
    ]


def difference_rows(results: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    header = ["difference", "main-entity strict F1: a - b [95% CI]", "modifier strict F1: a - b [95% CI]"]
    rows = []
    for label, a, b in comparisons(results):
        ent = paired(results[a], results[b])
        cells = [label, f"{ent.estimate:+.3f} [{ent.low:+.3f}, {ent.high:+.3f}]"]
        if results[a]["scores"]["pooled"].get("relations") and results[b]["scores"]["pooled"].get("relations"):
            rel = paired(results[a], results[b], "relations")
            cells.append(f"{rel.estimate:+.3f} [{rel.low:+.3f}, {rel.high:+.3f}]")
        else:
            cells.append("n/a")
        rows.append(cells)
    return header, rows


def communication_rows(results: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    header = [
        "run",
        "rounds",
        "sites",
        "adapter MB / round / site",
        "full-model FedAvg MB / round / site",
        "adapter / full",
        "total adapter MB",
        "total full-model MB",
    ]
    rows = []
    for run_id, r in results.items():
        c = r.get("communication")
        if not c:
            continue
        rows.append(
            [
                run_id,
                str(c["rounds"]),
                str(c["sites"]),
                f"{c['adapter_bytes_per_round_per_site'] / 1e6:.3f}",
                f"{c['full_model_bytes_per_round_per_site'] / 1e6:.3f}",
                f"{c['adapter_over_full']:.4f}",
                f"{c['total_adapter_bytes'] / 1e6:.3f}",
                f"{c['total_full_model_bytes'] / 1e6:.3f}",
            ]
        )
    return header, rows


def weight_rows(results: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    """The aggregation weights each federated run actually used, per round."""
    rows = []
    for run_id, r in results.items():
        if r.get("kind") != "federated":
            continue
        for h in r.get("rounds") or []:
            weights = h.get("weights")
            if weights:
                text = (
                    ", ".join(f"{site} {w:.3f}" for site, w in weights.items())
                    if isinstance(weights, dict)
                    else ", ".join(f"{w:.3f}" for w in weights)
                )
                rows.append([run_id, str(h["round"]), text])
    return ["run", "round", "weights"], rows


def new_site_rows(results: dict[str, dict], cfg) -> tuple[list[str], list[list[str]]]:
    """Main-entity F1 on the new cohort's test: zero-shot, the federated adapter as is, then
    N notes from scratch / from the federated adapter (mean, standard deviation and range
    over the seeds that draw the notes)."""
    import statistics

    header = ["start", "notes", "seeds", "main strict F1 mean", "sd", "min", "max", "main lenient F1 mean"]
    rows = []
    zero = (results.get("zero_shot") or {}).get("scores", {}).get("external")
    if zero:
        rows.append(
            [
                "zero-shot base model",
                "0",
                "-",
                fmt(f1(zero, "main_entities", "strict")),
                "-",
                "-",
                "-",
                fmt(f1(zero, "main_entities", "lenient")),
            ]
        )
    glob = (results.get(cfg.new_site_from) or {}).get("scores", {}).get("external")
    if glob:
        rows.append(
            [
                f"{cfg.new_site_from} global adapter, no fine-tuning",
                "0",
                "-",
                fmt(f1(glob, "main_entities", "strict")),
                "-",
                "-",
                "-",
                fmt(f1(glob, "main_entities", "lenient")),
            ]
        )
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in results.values():
        if r.get("kind") == "new_site" and r.get("status") == "done":
            groups.setdefault((r["start"], r["shots"]), []).append(r["scores"]["external"])
    for (start, shots), scores in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0] != "scratch")):
        strict = [f1(s, "main_entities", "strict") or 0.0 for s in scores]
        lenient = [f1(s, "main_entities", "lenient") or 0.0 for s in scores]
        label = "from scratch" if start == "scratch" else f"from {cfg.new_site_from}"
        rows.append(
            [
                label,
                str(shots),
                str(len(scores)),
                fmt(statistics.mean(strict)),
                fmt(statistics.stdev(strict)) if len(strict) > 1 else "-",
                fmt(min(strict)),
                fmt(max(strict)),
                fmt(statistics.mean(lenient)),
            ]
        )
    return header, rows


def goals(results: dict[str, dict], cfg=None) -> list[str]:
    """The evaluation issue's goals, measured (not judged kindly)."""
    lines = []
    central, plus = _pooled_f1(results, "centralised"), _pooled_f1(results, "fed_medlora_plus")
    if central is not None:
        lines.append(f"- centralised >= 0.70 pooled strict main-entity F1: {central:.3f} ({'met' if central >= 0.70 else 'missed'})")
    if plus is not None and central:
        lines.append(
            f"- Fed-MedLoRA+ >= 0.95x centralised: {plus:.3f} / {central:.3f} = {plus / central:.3f}x "
            f"({'met' if plus / central >= 0.95 else 'missed'})"
        )
    fed = {r: _pooled_f1(results, r) for r, v in results.items() if v.get("kind") == "federated" and _pooled_f1(results, r) is not None}
    single = {
        r: _pooled_f1(results, r) for r, v in results.items() if v.get("kind") == "single_site" and _pooled_f1(results, r) is not None
    }
    if fed and single:
        worst_fed, best_single = min(fed, key=fed.get), max(single, key=single.get)
        gap = paired(results[worst_fed], results[best_single])
        met = gap.low > 0
        lines.append(
            f"- every federated run above every single site, intervals showing it: lowest federated {worst_fed} {fed[worst_fed]:.3f} "
            f"vs best single {best_single} {single[best_single]:.3f}, difference {gap.estimate:+.3f} [{gap.low:+.3f}, {gap.high:+.3f}] "
            f"({'met' if met else 'missed'})"
        )
    bert = _pooled_f1(results, "bert")
    if fed and bert is not None:
        for run_id in fed:
            gap = paired(results[run_id], results["bert"])
            lines.append(
                f"- {run_id} above BERT: {fed[run_id]:.3f} vs {bert:.3f}, difference {gap.estimate:+.3f} [{gap.low:+.3f}, {gap.high:+.3f}] "
                f"({'met' if gap.estimate > 0 else 'missed'}{'' if gap.low > 0 or gap.high < 0 else ', within noise'})"
            )
    rel = _pooled_f1(results, "centralised", "relations")
    if rel is not None:
        lines.append(f"- centralised modifier strict F1 >= 0.5: {rel:.3f} ({'met' if rel >= 0.5 else 'missed'})")
    if cfg is not None:
        scores = {
            start: [
                f1(r["scores"]["external"], "main_entities", "strict") or 0.0
                for r in results.values()
                if r.get("kind") == "new_site"
                and r.get("status") == "done"
                and r.get("shots") == max(cfg.new_site_shots)
                and r.get("start") == start
            ]
            for start in ("federated", "scratch")
        }
        if scores["federated"] and scores["scratch"]:
            fed_mean, scratch_mean = (sum(v) / len(v) for v in (scores["federated"], scores["scratch"]))
            lines.append(
                f"- new site, {max(cfg.new_site_shots)} notes: from the federated adapter {fed_mean:.3f} vs from scratch {scratch_mean:.3f} "
                f"(mean of {len(scores['federated'])} / {len(scores['scratch'])} seeds; {'met' if fed_mean >= scratch_mean else 'missed'})"
            )
    return lines


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
    lines += _table(*main_rows(results, site_names, external))
    diff = difference_rows(results)
    if diff[1]:
        lines += ["", "## Differences (paired bootstrap over the same test notes)", ""]
        lines += _table(*diff)
    lines += ["", "## Pooled strict F1 per type", ""]
    lines += _table(*per_type_rows(results))
    lines += ["", "## Modifier (relation) F1 per site", ""]
    lines += _table(*relation_rows(results, site_names))
    weights = weight_rows(results)
    if weights[1]:
        lines += ["", "## Aggregation weights used", ""]
        lines += _table(*weights)
    comm = communication_rows(results)
    if comm[1]:
        lines += ["", "## Communication (fp32 adapter vs full-model FedAvg in fp32, upload per site)", ""]
        lines += _table(*comm)
    if external:
        lines += ["", f"## New-site adaptation ({external} test split)", ""]
        lines += _table(*new_site_rows(results, cfg))
    lines += ["", "## Goals", ""] + (goals(results, cfg) or ["- not enough runs finished to measure"])
    missing = [f"- `{r}`: {v['status']}" for r, v in results.items() if v.get("status") != "done"]
    not_run = [f"- `{r}`: not run yet" for r in cfg.run_ids() if r not in results]
    if missing or not_run:
        lines += ["", "## Not available", ""] + missing + not_run
    lines += ["", "## Wall time per run (s)", ""]
    lines += _table(["run", "seconds"], [[r, f"{v.get('seconds', 0):.0f}"] for r, v in results.items()])
    return "\n".join(lines) + "\n"


def write_plots(cfg, results: dict[str, dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)

    trained = {r: v for r, v in results.items() if v.get("rounds") and v.get("kind") != "new_site"}
    # Learning curves: validation F1 (never test) against training examples seen, summed over sites.
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, key, what in ((axes[0], "val_entity_strict_f1", "entity"), (axes[1], "val_relation_strict_f1", "modifier")):
        ax.set_prop_cycle(color=plt.cm.tab10.colors, marker=["o", "s", "^", "D", "v", "P", "X", "*", "<", ">"])
        for run_id, r in trained.items():
            pts = [(h["examples"], h[key]) for h in r["rounds"] if h.get(key) is not None and h.get("examples")]
            if pts:
                ax.plot(*zip(*pts), label=run_id)
        ax.set(
            xlabel="training examples seen (all sites)",
            ylabel=f"validation strict {what} F1",
            title=f"Learning curves: {what}s (pooled validation split)",
        )
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    save(fig, "f1_per_round.png")

    # The BERT baseline's tagging loss is on another scale than the LLMs' answer-token loss: own panel.
    llm_runs = {k: v for k, v in trained.items() if v.get("kind") != "bert"}
    bert_runs = {k: v for k, v in trained.items() if v.get("kind") == "bert"}
    panels = [(runs, what) for runs, what in ((llm_runs, "answer-token loss"), (bert_runs, "BIO tagging loss (BERT)")) if runs]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(7 + 4 * (len(panels) > 1), 4), squeeze=False)
    for ax, (runs, what) in zip(axes[0], panels):
        ax.set_prop_cycle(color=plt.cm.tab10.colors, marker=["o", "s", "^", "D", "v", "P", "X", "*", "<", ">"])
        for run_id, r in runs.items():
            pts = [(h["round"] + 1, h["val_loss"]) for h in r["rounds"] if h.get("val_loss") is not None]
            if pts:
                ax.plot(*zip(*pts), label=run_id)
        ax.set(xlabel="round", ylabel=f"validation {what}", title="Validation loss per round (sites' val splits)")
        ax.set_xticks(range(1, cfg.rounds + 1))
        ax.set_xlim(0.5, cfg.rounds + 0.5)
        ax.legend(fontsize=7)
    save(fig, "val_loss_per_round.png")

    groups = [s.name for s in cfg.sites] + ["pooled"] + ([f"external:{cfg.external.name}"] if cfg.external else [])
    keys = [s.name for s in cfg.sites] + ["pooled"] + (["external"] if cfg.external else [])
    scored = _scored(results)
    fig, ax = plt.subplots(figsize=(max(7, 1.8 * len(groups)), 4.5))
    ax.set_prop_cycle(color=plt.cm.tab20.colors)
    width = 0.8 / max(1, len(scored))
    for i, (run_id, r) in enumerate(scored.items()):
        sc = r["scores"]
        values, low, high = [], [], []
        for key in keys:
            score = sc.get(key) if key in ("pooled", "external") else sc["sites"].get(key)
            value = f1(score, "main_entities", "strict") or 0.0
            ci = interval(r, key, "main_entities", "strict") or {"low": value, "high": value}
            values.append(value)
            low.append(max(0.0, value - ci["low"]))
            high.append(max(0.0, ci["high"] - value))
        ax.bar([g + i * width for g in range(len(groups))], values, width, yerr=[low, high], capsize=2, label=run_id)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups, fontsize=8)
    ax.set(ylabel="strict main-entity F1", title="Strict main-entity F1 per test set (95% intervals over notes)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=6, ncol=3)
    save(fig, "per_site_f1.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    comm = {r: v["communication"] for r, v in results.items() if v.get("communication")}
    if comm:
        c = next(iter(comm.values()))
        rounds = list(range(1, c["rounds"] + 1))
        ax.plot(rounds, [c["full_model_bytes_per_round_per_site"] * k / 1e6 for k in rounds], marker="s", label="full-model FedAvg (fp32)")
        for run_id, cr in comm.items():
            ax.plot(rounds, [cr["adapter_bytes_per_round_per_site"] * k / 1e6 for k in rounds], marker="o", label=f"{run_id} adapter")
        ax.set_yscale("log")
    ax.set(xlabel="round", ylabel="cumulative MB sent per site (log)", title="Communication per site")
    ax.legend(fontsize=7)
    save(fig, "communication.png")
    return written


def write_report(cfg, results: dict[str, dict], out: Path) -> None:
    out = Path(out)
    (out / "summary.md").write_text(summary_markdown(cfg, results))
    write_plots(cfg, results, out)
