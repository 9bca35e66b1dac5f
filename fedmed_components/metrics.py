"""n2c2-2018-style scoring of entities and relations, strict and lenient.

strict: same type and the same span(s). lenient: same type and any character overlap.
Each gold and each prediction is matched at most once (greedy, largest overlap first,
ties by position: deterministic). A relation is correct when its type matches and its
head and tail are each matched entities in the same mode. Documents are paired by id:
a gold document with no prediction counts all its gold as missed; a prediction for a
document not in gold is an error (scoring the wrong set silently is worse).
"""

from __future__ import annotations

from collections import Counter

from fedmed_components.document import Document

MODES = ("strict", "lenient")


def prf(tp: int, fp: int, fn: int) -> dict:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn}


def _overlap(a, b) -> int:
    return sum(max(0, min(e1, e2) - max(s1, s2)) for s1, e1 in a.spans for s2, e2 in b.spans)


def match_entities(gold: list, pred: list, mode: str) -> dict[str, str]:
    """pred entity id -> gold entity id, one-to-one."""
    candidates = []
    for gi, g in enumerate(gold):
        for pi, p in enumerate(pred):
            if g.type != p.type:
                continue
            if mode == "strict":
                if sorted(g.spans) == sorted(p.spans):
                    candidates.append((-(g.end - g.start), gi, pi))
            else:
                ov = _overlap(g, p)
                if ov > 0:
                    candidates.append((-ov, gi, pi))
    pairs, used_g, used_p = {}, set(), set()
    for _, gi, pi in sorted(candidates):
        if gi not in used_g and pi not in used_p:
            used_g.add(gi)
            used_p.add(pi)
            pairs[pred[pi].id] = gold[gi].id
    return pairs


def _restrict(doc: Document, types: set[str] | None):
    ents = [e for e in doc.entities if types is None or e.type in types]
    kept = {e.id for e in ents}
    rels = [r for r in doc.relations if r.head in kept and r.tail in kept]
    return ents, rels


def score_documents(gold: list[Document], pred: list[Document], types: set[str] | None = None, parse_failures: int = 0) -> dict:
    """The `fedmed eval --json` object of DESIGN.md."""
    pred_by_id = {d.id: d for d in pred}
    unknown = sorted(set(pred_by_id) - {d.id for d in gold})
    if unknown:
        raise ValueError(f"predictions for documents not in gold: {unknown[:5]}")
    types = set(types) if types else None
    ent = {m: Counter() for m in MODES}
    per_type = {m: {} for m in MODES}
    rel = {m: Counter() for m in MODES}
    for g_doc in gold:
        p_doc = pred_by_id.get(g_doc.id, Document(id=g_doc.id, text=g_doc.text))
        g_ents, g_rels = _restrict(g_doc, types)
        p_ents, p_rels = _restrict(p_doc, types)
        g_type = {e.id: e.type for e in g_ents}
        p_type = {e.id: e.type for e in p_ents}
        for mode in MODES:
            pairs = match_entities(g_ents, p_ents, mode)
            ent[mode].update(tp=len(pairs), fp=len(p_ents) - len(pairs), fn=len(g_ents) - len(pairs))
            matched_types = Counter(p_type[p] for p in pairs)
            for t, n in Counter(g_type.values()).items():
                per_type[mode].setdefault(t, Counter()).update(fn=n - matched_types[t])
            for t, n in Counter(p_type.values()).items():
                per_type[mode].setdefault(t, Counter()).update(fp=n - matched_types[t])
            for t, n in matched_types.items():
                per_type[mode].setdefault(t, Counter()).update(tp=n)
            gold_rels = Counter((r.type, r.head, r.tail) for r in g_rels)
            tp = 0
            for r in p_rels:
                key = (r.type, pairs.get(r.head), pairs.get(r.tail))
                if gold_rels[key] > 0:
                    gold_rels[key] -= 1
                    tp += 1
            rel[mode].update(tp=tp, fp=len(p_rels) - tp, fn=len(g_rels) - tp)
    all_types = sorted(set(per_type["strict"]) | set(per_type["lenient"]))
    return {
        "documents": len(gold),
        "entities": {
            **{m: prf(ent[m]["tp"], ent[m]["fp"], ent[m]["fn"]) for m in MODES},
            "per_type": {t: {m: prf(**{k: per_type[m].get(t, Counter())[k] for k in ("tp", "fp", "fn")}) for m in MODES} for t in all_types},
        },
        "relations": {m: prf(rel[m]["tp"], rel[m]["fp"], rel[m]["fn"]) for m in MODES},
        "parse_failures": int(parse_failures),
    }


def format_table(result: dict) -> str:
    lines = [f"{result['documents']} documents, {result['parse_failures']} parse failures", ""]
    header = f"{'':18s} {'P':>6s} {'R':>6s} {'F1':>6s} {'tp':>6s} {'fp':>6s} {'fn':>6s}   (strict | lenient F1)"
    lines.append(header)

    def row(label: str, scores: dict) -> str:
        s, l = scores["strict"], scores["lenient"]
        return f"{label:18s} {s['precision']:6.3f} {s['recall']:6.3f} {s['f1']:6.3f} {s['tp']:6d} {s['fp']:6d} {s['fn']:6d}   | {l['f1']:.3f}"

    lines.append(row("entities (micro)", result["entities"]))
    for t, scores in result["entities"]["per_type"].items():
        lines.append(row(f"  {t}", scores))
    lines.append(row("relations", result["relations"]))
    return "\n".join(lines)


def bio_tags(doc: Document, token_offsets: list[tuple[int, int]], types: set[str] | None = None) -> list[str]:
    """BIO label per token (first matching entity wins; covering span of each entity)."""
    tags = ["O"] * len(token_offsets)
    for ent in sorted(doc.entities, key=lambda e: (e.start, -e.end)):
        if types is not None and ent.type not in types:
            continue
        inside = [i for i, (s, e) in enumerate(token_offsets) if e > s and s >= ent.start and e <= ent.end]
        if not inside or any(tags[i] != "O" for i in inside):
            continue
        tags[inside[0]] = f"B-{ent.type}"
        for i in inside[1:]:
            tags[i] = f"I-{ent.type}"
    return tags


def seqeval_scores(true_seqs: list[list[str]], pred_seqs: list[list[str]]) -> dict:
    from seqeval.metrics import f1_score, precision_score, recall_score

    return {
        "precision": precision_score(true_seqs, pred_seqs),
        "recall": recall_score(true_seqs, pred_seqs),
        "f1": f1_score(true_seqs, pred_seqs),
    }
