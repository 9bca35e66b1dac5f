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


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def main_rows(results: dict[str, dict], site_names: list[str], external: str | None) -> tuple[list[str], list[list[str]]]:
    """In-domain and external scores of every scored run except the new-site ones."""
    header = ["run", "kind", "pooled ent strict F1", "pooled ent lenient F1", "pooled rel strict F1", "pooled rel lenient F1"]
    header += [f"{s} ent strict F1" for s in site_names]
    if external:
        header += [f"external {external} ent strict F1", f"external {external} ent lenient F1"]
    rows = []
    for run_id, r in results.items():
        scores = r.get("scores") or {}
        if r.get("kind") == "new_site" or "pooled" not in scores:
            continue
        pooled = scores["pooled"]
        row = [run_id, r["kind"], fmt(f1(pooled, "entities", "strict")), fmt(f1(pooled, "entities", "lenient")),
               fmt(f1(pooled, "relations", "strict")), fmt(f1(pooled, "relations", "lenient"))]
        row += [fmt(f1(scores["sites"].get(s), "entities", "strict")) for s in site_names]
        if external:
            ext = scores.get("external")
            row += [fmt(f1(ext, "entities", "strict")), fmt(f1(ext, "entities", "lenient"))]
        rows.append(row)
    return header, rows


def relation_rows(results: dict[str, dict], site_names: list[str]) -> tuple[list[str], list[list[str]]]:
    """Per-site modifier (relation) F1, strict / lenient."""
    header = ["run"] + [f"{s} rel strict / lenient F1" for s in site_names]
    rows = []
    for run_id, r in results.items():
        scores = r.get("scores") or {}
        if "sites" not in scores:
            continue
        rows.append([run_id] + [f"{fmt(f1(scores['sites'].get(s), 'relations', 'strict'))} / {fmt(f1(scores['sites'].get(s), 'relations', 'lenient'))}" for s in site_names])
    return header, rows


def communication_rows(results: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    header = ["run", "rounds", "sites", "adapter MB / round / site", "full-model FedAvg MB / round / site", "adapter / full", "total adapter MB", "total full-model MB"]
    rows = []
    for run_id, r in results.items():
        c = r.get("communication")
        if not c:
            continue
        rows.append([run_id, str(c["rounds"]), str(c["sites"]), f"{c['adapter_bytes_per_round_per_site'] / 1e6:.3f}",
                     f"{c['full_model_bytes_per_round_per_site'] / 1e6:.3f}", f"{c['adapter_over_full']:.4f}",
                     f"{c['total_adapter_bytes'] / 1e6:.3f}", f"{c['total_full_model_bytes'] / 1e6:.3f}"])
    return header, rows


def new_site_rows(results: dict[str, dict], cfg) -> tuple[list[str], list[list[str]]]:
    """Entity F1 on the new cohort's test: zero-shot, the federated adapter as is, then N shots."""
    header = ["start", "shots", "ent strict F1", "ent lenient F1"]
    rows = []
    zero = (results.get("zero_shot") or {}).get("scores", {}).get("external")
    if zero:
        rows.append(["zero-shot base model", "0", fmt(f1(zero, "entities", "strict")), fmt(f1(zero, "entities", "lenient"))])
    glob = (results.get(cfg.new_site_from) or {}).get("scores", {}).get("external")
    if glob:
        rows.append([f"{cfg.new_site_from} global adapter, no fine-tuning", "0", fmt(f1(glob, "entities", "strict")), fmt(f1(glob, "entities", "lenient"))])
    for run_id, r in results.items():
        if r.get("kind") != "new_site":
            continue
        ext = (r.get("scores") or {}).get("external")
        label = f"from scratch ({run_id})" if r.get("start") == "scratch" else f"from {cfg.new_site_from} ({run_id})"
        rows.append([label, str(r.get("shots", "")), fmt(f1(ext, "entities", "strict")), fmt(f1(ext, "entities", "lenient")) if ext else r["status"]])
    return header, rows


def goals(results: dict[str, dict]) -> list[str]:
    """The issue's goals, measured (not judged kindly)."""
    def pooled(run_id):
        return f1((results.get(run_id) or {}).get("scores", {}).get("pooled"), "entities", "strict")

    lines = []
    plus, central = pooled("fed_medlora_plus"), pooled("centralised")
    if plus is not None and central:
        lines.append(f"- Fed-MedLoRA+ / centralised pooled strict entity F1: {plus:.3f} / {central:.3f} = {plus / central:.3f}x "
                     f"(goal >= 0.95x: {'met' if plus / central >= 0.95 else 'missed'})")
    fed = {r: pooled(r) for r, v in results.items() if v.get("kind") == "federated" and pooled(r) is not None}
    single = {r: pooled(r) for r, v in results.items() if v.get("kind") == "single_site" and pooled(r) is not None}
    if fed and single:
        worst_fed, best_single = min(fed, key=fed.get), max(single, key=single.get)
        met = fed[worst_fed] > single[best_single]
        lines.append(f"- every federated model above every single-site model (pooled strict entity F1): lowest federated "
                     f"{worst_fed} {fed[worst_fed]:.3f} vs highest single-site {best_single} {single[best_single]:.3f}: {'met' if met else 'missed'}")
    zero = pooled("zero_shot")
    trained = {r: pooled(r) for r, v in results.items() if v.get("kind") in ("federated", "centralised", "single_site") and pooled(r) is not None}
    if zero is not None and trained:
        low = min(trained, key=trained.get)
        lines.append(f"- fine-tuned vs zero-shot (pooled strict entity F1): zero-shot {zero:.3f}, lowest fine-tuned {low} {trained[low]:.3f}")
    return lines


def summary_markdown(cfg, results: dict[str, dict]) -> str:
    site_names = [s.name for s in cfg.sites]
    external = cfg.external.name if cfg.external else None
    s = cfg.sampling
    lines = [
        f"# Experiment `{cfg.name}`", "",
        f"Model `{cfg.model}` (quantize {cfg.quantize}), LoRA r={cfg.rank} alpha={cfg.alpha}; {cfg.rounds} rounds x "
        f"{cfg.local_steps} local steps per site, batch {cfg.batch_size}, max length {cfg.max_length}, lr {cfg.lr}; seed {s.seed}.",
        f"Sites: {', '.join(site_names)}" + (f"; external / new site: {external}" if external else "") + ".",
        f"Data: per site, documents split {1 - s.test_fraction:.0%} train / {s.test_fraction:.0%} test (seed {s.seed}) before anything "
        f"trains, {s.val_fraction:.0%} of train for validation; then sentences subsampled: at most {s.max_train_sentences} train, "
        f"{s.max_val_sentences} val, {s.max_test_sentences} test sentences per site.",
        "Scores: n2c2 strict / lenient micro F1; a partial-schema site is scored only on the types it annotates; "
        "`pooled` = the sites' test splits together (micro); relations (modifier links) n/a where a cohort annotates none.", "",
        "## In-domain and external test", "",
    ]
    lines += _table(*main_rows(results, site_names, external))
    lines += ["", "## Modifier (relation) F1 per site", ""]
    lines += _table(*relation_rows(results, site_names))
    comm = communication_rows(results)
    if comm[1]:
        lines += ["", "## Communication (fp32 adapter vs full-model FedAvg in fp32, upload per site)", ""]
        lines += _table(*comm)
    if external:
        lines += ["", f"## New-site adaptation ({external} test split)", ""]
        lines += _table(*new_site_rows(results, cfg))
    lines += ["", "## Goals", ""] + (goals(results) or ["- not enough runs finished to measure"])
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
        ax.set(xlabel="training examples seen (all sites)", ylabel=f"validation strict {what} F1",
               title=f"Learning curves: {what}s (pooled validation split)")
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
    scored = {r: v for r, v in results.items() if "pooled" in (v.get("scores") or {})}
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(groups)), 4))
    width = 0.8 / max(1, len(scored))
    for i, (run_id, r) in enumerate(scored.items()):
        sc = r["scores"]
        values = [f1(sc["sites"].get(g), "entities", "strict") for g in groups[: len(cfg.sites)]]
        values.append(f1(sc["pooled"], "entities", "strict"))
        if cfg.external:
            values.append(f1(sc.get("external"), "entities", "strict"))
        ax.bar([g + i * width for g in range(len(groups))], [v or 0 for v in values], width, label=run_id)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups, fontsize=8)
    ax.set(ylabel="strict entity F1", title="Strict entity F1 per test set")
    ax.legend(fontsize=6, ncol=2)
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
