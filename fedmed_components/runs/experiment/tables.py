"""The summary's tables: F1 look-ups, formatting, and one row builder per table of summary.md.

Every number is a value of the run JSON printed with 3 decimals (`fmt`), with its 95%
bootstrap interval where the run made one (`fmt_ci`).
"""

from __future__ import annotations


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


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def scored_runs(results: dict[str, dict]) -> dict[str, dict]:
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
    for run_id, r in scored_runs(results).items():
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

    scored = scored_runs(results)
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


def path_steps(result: dict, local_steps: int | None) -> list[tuple[int, dict]]:
    """(steps along the adapter's path, round record) for each round: the optimiser steps
    taken one after another from the start to that round's adapter. Centralised and a
    single site: every step; a federation: one site's local steps a round (its sites train
    side by side, and averaging moves the global adapter about one site's way)."""
    points, total = [], 0
    local_steps = (result.get("job") or {}).get("local_steps", local_steps)  # a run's own (site batch runs)
    for h in result.get("rounds") or []:
        if result.get("kind") == "federated":
            if not local_steps or h.get("round") is None:
                continue
            total = (h["round"] + 1) * local_steps
        elif h.get("steps"):
            total += h["steps"]
        else:
            continue
        points.append((total, h))
    return points


def equal_steps_rows(results: dict[str, dict], local_steps: int | None) -> tuple[list[str], list[list[str]]]:
    """Validation strict main-entity / modifier F1 of each run's adapter by the steps along
    its path: a federation against centralised after as many sequential steps (its sites'
    examples summed are 3x more, its global adapter's path is not)."""
    curves = {
        run_id: {steps: h for steps, h in path_steps(r, local_steps) if h.get("val_main_strict_f1") is not None}
        for run_id, r in results.items()
        if r.get("kind") in ("federated", "centralised", "single_site")
    }
    curves = {k: v for k, v in curves.items() if v}
    fed_steps = sorted({s for k, v in curves.items() if results[k]["kind"] == "federated" for s in v})
    if not fed_steps:
        return ["run"], []
    header = ["run", *(f"{s} steps: main / modifier" for s in fed_steps)]
    rows = []
    for run_id, curve in curves.items():
        cells = [
            f"{fmt(curve[s]['val_main_strict_f1'])} / {fmt(curve[s].get('val_relation_strict_f1'))}" if s in curve else "-"
            for s in fed_steps
        ]
        rows.append([run_id, *cells])
    return header, rows


def site_adapter_rows(results: dict[str, dict], site_names: list[str]) -> tuple[list[str], list[list[str]]]:
    """Validation strict main-entity / modifier F1 of each round's global adapter beside each
    site's own adapter of that round before the mean (`site_adapter_f1`): a skill a site has
    and the mean lacks is what averaging lost."""

    def cell(scores: dict | None) -> str:
        if not scores or scores.get("val_main_strict_f1") is None:
            return "-"
        return f"{fmt(scores['val_main_strict_f1'])} / {fmt(scores.get('val_relation_strict_f1'))}"

    rows = [
        [run_id, str(h["round"]), cell(h), *(cell(h["site_adapters"].get(site)) for site in site_names)]
        for run_id, r in results.items()
        if r.get("kind") == "federated"
        for h in r.get("rounds") or []
        if h.get("site_adapters")
    ]
    return ["run", "round", "global (the mean)", *(f"{site}'s own" for site in site_names)], rows


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
