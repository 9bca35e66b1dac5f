"""What the evaluation compares: paired bootstrap differences between runs, and its goals, measured."""

from __future__ import annotations

from fedmed_components.runs.experiment.tables import f1, fmt, fmt_ci

# The paper's two federated methods: the goals are about them. Every other federated run
# (server optimiser candidates, FedSA, exact aggregation, server-held loss) changes one of
# them and is read against it in the ablation table, not counted as "a federated run".
PAPER_METHODS = ("fed_medlora", "fed_medlora_plus")
SERVER_OPTIMIZER_NAMES = {"fed_avgm": "FedAvgM", "fed_adam": "FedAdam", "fed_yogi": "FedYogi"}


def _pooled_counts(result: dict, group: str, mode: str, notes=None):
    from fedmed_components.task.bootstrap import aligned_counts

    per_note = {site: s.get("per_note") or {} for site, s in result["scores"]["sites"].items()}
    return aligned_counts(per_note, group, mode, notes)


def _external_counts(result: dict, group: str, mode: str, notes=None):
    from fedmed_components.task.bootstrap import aligned_counts

    return aligned_counts({"external": result["scores"]["external"].get("per_note") or {}}, group, mode, notes)


def paired(a: dict, b: dict, group: str = "main_entities", mode: str = "strict", where: str = "pooled"):
    """Paired bootstrap interval of F1(a) - F1(b) over the same test notes: the sites'
    pooled test (resampled within each site) or the external cohort's (`where`)."""
    from fedmed_components.task.bootstrap import paired_difference

    counts = _pooled_counts if where == "pooled" else _external_counts
    counts_a, strata, notes = counts(a, group, mode)
    counts_b, _, _ = counts(b, group, mode, notes)
    return paired_difference(counts_a, counts_b, strata)


def new_site_difference_rows(results: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    """From the federated adapter - from scratch, per shot count and seed (the same notes
    drawn for both), paired over the new cohort's test notes."""
    header = ["notes", "seed", "main strict F1: from federated - from scratch [95% CI]"]
    rows = []
    done = {r: v for r, v in results.items() if v.get("kind") == "new_site" and v.get("status") == "done"}
    pairs = sorted(
        (v["shots"], v.get("shot_seed"), run_id)
        for run_id, v in done.items()
        if v["start"] == "federated" and run_id.replace("_federated_", "_scratch_") in done
    )
    for shots, seed, run_id in pairs:
        gap = paired(done[run_id], done[run_id.replace("_federated_", "_scratch_")], where="external")
        rows.append([str(shots), str(seed), f"{gap.estimate:+.3f} [{gap.low:+.3f}, {gap.high:+.3f}]"])
    return header, rows


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
        # the federated gap's candidate fix: the sites' batch cut, their steps multiplied (same examples)
        *((f"{r} - centralised", r, "centralised") for r in results if r.startswith("fed_medlora_plus_site_batch_")),
    ]
    return [
        (label, a, b)
        for label, a, b in wanted
        if a in results and b in results and "pooled" in results[a].get("scores", {}) and "pooled" in results[b].get("scores", {})
    ]


def ablation_base(run_id: str) -> str:
    """The paper method an ablation changes: the server-held loss changes Fed-MedLoRA+;
    the rest (server lr, FedSA, exact aggregation) weight by tokens, as Fed-MedLoRA does."""
    return "fed_medlora_plus" if run_id.startswith("fed_medlora_plus_") else "fed_medlora"


def _last_round(result: dict) -> dict:
    return (result.get("rounds") or [{}])[-1]


def _rounds_to(result: dict, target: float | None) -> str:
    """The first round whose validation main-entity strict F1 reaches `target`."""
    if target is None:
        return "n/a"
    rounds = result.get("rounds") or []
    reached = next((i + 1 for i, r in enumerate(rounds) if (r.get("val_main_strict_f1") or 0) >= target), None)
    return str(reached) if reached else f"not in {len(rounds)}"


def _what_it_changes(result: dict) -> str:
    """The ablation's change to its paper method, from its job settings: 'FedAdam, server
    lr 0.01', 'FedProx mu 0.01', 'exact aggregation, site ranks a 8, b 4', ..."""
    job = result.get("job") or {}
    algorithm = job.get("algorithm")
    parts = []
    if algorithm in SERVER_OPTIMIZER_NAMES or result.get("server_lr") is not None:
        # fed_avgm runs made before the job was recorded keep their lr and momentum beside it
        name = SERVER_OPTIMIZER_NAMES.get(algorithm, "FedAvgM")
        server = f"{name}, server lr {job.get('server_lr', result.get('server_lr')):g}"
        momentum = job.get("server_beta1", result.get("server_momentum"))
        parts.append(server + (f", momentum {momentum:g}" if name == "FedAvgM" and momentum is not None else ""))
    if job.get("prox_mu") is not None:
        parts.append(f"FedProx mu {job['prox_mu']:g}")
    if algorithm == "fedsa_lora":
        parts.append("FedSA-LoRA (A shared, B local until the last round)")
    if algorithm == "fed_exact_lora":
        parts.append("exact aggregation of B A")
    if job.get("site_overrides"):
        ranks = {site: o["rank"] for site, o in job["site_overrides"].items() if "rank" in o}
        parts.append("site ranks " + ", ".join(f"{site} {rank}" for site, rank in ranks.items()))
    if job.get("loss_source") == "server":
        parts.append("losses on the server's validation set")
    if job.get("temperature") is not None:
        parts.append(f"temperature {job['temperature']:g}")
    if "batch_size" in job:
        parts.append(f"site batch {job['batch_size']} x {job['local_steps']} local steps")
    spent = [site["epsilon"] for site in (_last_round(result).get("dp_sgd") or {}).values() if "epsilon" in site]
    if spent:
        parts.append(f"DP-SGD, epsilon spent <= {max(spent):.2f} (delta {result['config'].get('dp_delta')})")
    return ", ".join(parts)


def chosen_on_validation(results: dict[str, dict]) -> dict[str, bool]:
    """Of every swept kind made at several values (server lrs, mu, T), which run a user
    should take: the highest last-round validation main-entity strict F1, ties to the lower
    validation loss. Validation only: the test figures of the other values are reported,
    never used to choose. {run id: chosen?} for the runs of a sweep of 2 or more. A DP-SGD
    epsilon is a privacy budget the hospitals set, not a setting to tune: never chosen."""
    from fedmed_components.runs.experiment.config import DP_KIND, SWEPT, kind_of

    sweeps: dict[str, list[str]] = {}
    for run_id, result in results.items():
        kind = None if run_id in PAPER_METHODS else kind_of(run_id)
        if result.get("kind") == "federated" and kind in SWEPT and kind != DP_KIND:
            sweeps.setdefault(kind, []).append(run_id)
    chosen = {}
    for runs in sweeps.values():
        if len(runs) < 2:
            continue

        def rank(run_id):
            last = _last_round(results[run_id])
            loss = last.get("val_loss")
            return (last.get("val_main_strict_f1") or 0.0, -(loss if loss is not None else float("inf")))

        best = max(runs, key=rank)
        chosen |= {run_id: run_id == best for run_id in runs}
    return chosen


def ablation_rows(results: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    """The paper's two methods and each finished federated run that changes one of them:
    the last round's validation figures (what a choice between candidates may use, and the
    choice made where a setting was swept), the round validation F1 first came within 5% of
    centralised's last, the test F1s (strict and lenient, main entities and modifiers) and
    the paired test difference against the method the run changes. The precision column
    says which runs may be compared directly: bf16 and fp32 runs differ by about a point
    (bench/RESULTS.md, the precision section)."""
    central = results.get("centralised")
    target = 0.95 * _last_round(central)["val_main_strict_f1"] if central and _last_round(central).get("val_main_strict_f1") else None
    chosen = chosen_on_validation(results)
    header = [
        "run",
        "changes",
        "precision",
        "val loss (last round)",
        "val main strict F1 (last round)",
        "chosen on validation",
        "rounds to 0.95x centralised val F1",
        "test pooled main strict F1 [95% CI]",
        "main lenient",
        "test modifier strict F1 [95% CI]",
        "modifier lenient",
        "test main strict: run - base [95% CI]",
    ]
    rows = []
    for run_id, result in results.items():
        if result.get("kind") != "federated" or _pooled_f1(results, run_id) is None:
            continue
        base = None if run_id in PAPER_METHODS else ablation_base(run_id)
        if base is not None and _pooled_f1(results, base) is None:
            continue
        change = _what_it_changes(result)
        gap = paired(result, results[base]) if base else None
        rows.append(
            [
                run_id,
                "-" if base is None else base + (f" + {change}" if change else ""),
                result.get("resolved_precision") or "not recorded",
                fmt(_last_round(result).get("val_loss")),
                fmt(_last_round(result).get("val_main_strict_f1")),
                {True: "yes", False: "no"}.get(chosen.get(run_id), "-"),
                _rounds_to(result, target),
                fmt_ci(result, "pooled", "main_entities", "strict"),
                fmt_ci(result, "pooled", "main_entities", "lenient"),
                fmt_ci(result, "pooled", "relations", "strict"),
                fmt_ci(result, "pooled", "relations", "lenient"),
                f"{gap.estimate:+.3f} [{gap.low:+.3f}, {gap.high:+.3f}]" if gap else "-",
            ]
        )
    return header, rows


def _gap(a: dict, b: dict, group: str) -> str:
    """'F1(a) - F1(b) [95% CI]' paired over the same test notes; n/a where either lacks the group."""
    if not (a["scores"]["pooled"].get(group) and b["scores"]["pooled"].get(group)):
        return "n/a"
    gap = paired(a, b, group)
    return f"{gap.estimate:+.3f} [{gap.low:+.3f}, {gap.high:+.3f}]"


def personalised_rows(results: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    """Federated runs scored `personalised`: each site's own last adapter on its own notes
    against the global adapter on the same notes (paired), and against centralised."""
    central = results.get("centralised") if "pooled" in ((results.get("centralised") or {}).get("scores") or {}) else None
    header = [
        "run",
        "val main / modifier strict F1, last round: global -> own",
        "test main strict F1, own adapters [95% CI]",
        "own - global",
        "own - centralised",
        "test modifier strict F1, own adapters [95% CI]",
        "own - global",
        "own - centralised",
    ]
    rows = []
    for run_id, result in results.items():
        own = result.get("personalised")
        if result.get("kind") != "federated" or not own or "pooled" not in (result.get("scores") or {}):
            continue
        last = _last_round(result)
        mine = last.get("personalised") or {}
        val = f"{fmt(last.get('val_main_strict_f1'))} / {fmt(last.get('val_relation_strict_f1'))} -> "
        val += f"{fmt(mine.get('val_main_strict_f1'))} / {fmt(mine.get('val_relation_strict_f1'))}"
        rows.append(
            [
                run_id,
                val,
                fmt_ci(own, "pooled", "main_entities", "strict"),
                _gap(own, result, "main_entities"),
                _gap(own, central, "main_entities") if central else "n/a",
                fmt_ci(own, "pooled", "relations", "strict"),
                _gap(own, result, "relations"),
                _gap(own, central, "relations") if central else "n/a",
            ]
        )
    return header, rows


def calibrated_rows(results: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    """Runs scored with `modifier_none_biases`: validation modifier F1 per none bias, the
    bias it chose, and test modifier F1 at bias 0 and at that bias, paired over the same notes
    (the entities are the same: only the modifiers were asked again)."""
    header = [
        "run",
        "val modifier strict F1 per none bias",
        "chosen",
        "test modifier strict F1, bias 0 [95% CI]",
        "at the chosen bias [95% CI]",
        "chosen - 0",
        "lenient, chosen bias [95% CI]",
    ]
    rows = []
    for run_id, result in results.items():
        calibrated = result.get("calibrated_modifiers")
        if not calibrated or "pooled" not in (result.get("scores") or {}):
            continue
        val = ", ".join(f"{bias}: {fmt(f)}" for bias, f in calibrated["validation_relation_strict_f1"].items())
        rows.append(
            [
                run_id,
                val,
                f"{calibrated['chosen_bias']:g}",
                fmt_ci(result, "pooled", "relations", "strict"),
                fmt_ci(calibrated, "pooled", "relations", "strict"),
                _gap(calibrated, result, "relations"),
                fmt_ci(calibrated, "pooled", "relations", "lenient"),
            ]
        )
    return header, rows


def difference_rows(results: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    header = ["difference", "main-entity strict F1: a - b [95% CI]", "modifier strict F1: a - b [95% CI]"]
    rows = []
    for label, a, b in comparisons(results):
        rows.append([label, _gap(results[a], results[b], "main_entities"), _gap(results[a], results[b], "relations")])
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
    fed = {r: _pooled_f1(results, r) for r in PAPER_METHODS if r in results and _pooled_f1(results, r) is not None}
    single = {
        r: _pooled_f1(results, r) for r, v in results.items() if v.get("kind") == "single_site" and _pooled_f1(results, r) is not None
    }
    if fed and single:
        worst_fed, best_single = min(fed, key=fed.get), max(single, key=single.get)
        gap = paired(results[worst_fed], results[best_single])
        met = gap.low > 0
        lines.append(
            f"- every federated run ({', '.join(fed)}) above every single site, intervals showing it: lowest {worst_fed} {fed[worst_fed]:.3f} "
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
        calibrated = (results["centralised"].get("calibrated_modifiers") or {}).get("scores")
        best = f1(calibrated["pooled"], "relations", "strict") if calibrated else None
        at_bias = f"; at the none bias validation chose, {best:.3f}" if best is not None else ""
        met = max(rel, best or 0.0) >= 0.5
        lines.append(f"- centralised modifier strict F1 >= 0.5: {rel:.3f}{at_bias} ({'met' if met else 'missed'})")
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
