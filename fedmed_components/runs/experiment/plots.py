"""The summary's PNG plots: learning curves, validation loss, per-site F1, communication."""

from __future__ import annotations

from pathlib import Path

from fedmed_components.runs.experiment.tables import f1, interval, path_steps, scored_runs

PLOTS = ("f1_per_round.png", "f1_per_step.png", "val_loss_per_round.png", "per_site_f1.png", "communication.png")


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
    # main entities: the headline figure (problem, treatment, test, drug); modifiers: hasAttr links
    for ax, key, what in ((axes[0], "val_main_strict_f1", "main-entity"), (axes[1], "val_relation_strict_f1", "modifier")):
        ax.set_prop_cycle(color=plt.cm.tab10.colors, marker=["o", "s", "^", "D", "v", "P", "X", "*", "<", ">"])
        for run_id, r in trained.items():
            pts = [(h["examples"], h[key]) for h in r["rounds"] if h.get(key) is not None and h.get("examples")]
            if pts:
                ax.plot(*zip(*pts), label=run_id)
        ax.set(
            xlabel="training examples seen (all sites)",
            ylabel=f"validation strict {what} F1",
            title=f"Learning curves: {what} F1 (pooled validation split)",
        )
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    save(fig, "f1_per_round.png")

    # The same curves by sequential steps: a federation's global adapter moves one site's
    # local steps a round, so this is where it meets centralised at equal steps.
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.set_prop_cycle(color=plt.cm.tab10.colors, marker=["o", "s", "^", "D", "v", "P", "X", "*", "<", ">"])
    for run_id, r in trained.items():
        if r.get("kind") == "bert":
            continue
        pts = [(s, h["val_main_strict_f1"]) for s, h in path_steps(r, cfg.local_steps) if h.get("val_main_strict_f1") is not None]
        if pts:
            ax.plot(*zip(*pts), label=run_id)
    ax.set(
        xlabel="optimiser steps along the adapter's path (federated: local steps x rounds)",
        ylabel="validation strict main-entity F1",
        title="Learning curves at equal sequential steps",
    )
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    save(fig, "f1_per_step.png")

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
    scored = scored_runs(results)
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
