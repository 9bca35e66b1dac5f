"""n2c2-2018-style scoring of entities and relations, strict and lenient.

- strict: same type and the same span(s) (every fragment of a discontinuous entity);
- lenient: same type and at least one character of overlap.
Each gold and each predicted entity is matched at most once: candidate pairs are taken
greedily, exact matches first, then largest overlap first, ties by gold then
prediction order, so the result is deterministic and every strict match is also a
lenient one. A relation is correct when its type matches
and its head and tail are each matched, in the same mode, to the gold relation's head
and tail; a duplicated prediction is one true positive and one false positive.

Documents are paired by id. A gold document with no prediction counts all its gold as
missed. A prediction for a document that is not in gold, duplicate ids, or the same id
with a different text raise `ScoringError`: scoring the wrong set silently is worse.
`types` restricts scoring to the types a (partial-schema) site annotates; relations
count only when both arguments are of those types.
"""

from __future__ import annotations

from collections import Counter

from fedmed_components.data.document import Document, Entity, Relation

MODES = ("strict", "lenient")


class ScoringError(ValueError):
    """Gold and predictions cannot be paired up."""


def prf(tp: int, fp: int, fn: int) -> dict:
    """Precision, recall, F1 (0.0 where undefined) with the counts."""
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn}


# ------------------------------------------------------------------ matching


def _fragments(ent: Entity) -> tuple[tuple[int, int], ...]:
    return tuple(sorted((int(s), int(e)) for s, e in ent.spans))


def _overlap(a: Entity, b: Entity) -> int:
    return sum(max(0, min(e1, e2) - max(s1, s2)) for s1, e1 in a.spans for s2, e2 in b.spans)


def _candidates(gold: list[Entity], pred: list[Entity], mode: str) -> list[tuple[bool, int, int, int]]:
    """(not exact, -overlap, gold index, pred index) of every pair that may match in `mode`.

    Exact pairs sort first in both modes, so the lenient matching contains the strict
    one and a relation correct in strict mode stays correct in lenient mode.
    """
    pairs = []
    for gi, g in enumerate(gold):
        g_frags = _fragments(g)
        for pi, p in enumerate(pred):
            if g.type != p.type:
                continue
            exact = g_frags == _fragments(p)
            overlap = _overlap(g, p) if exact or mode == "lenient" else 0
            if exact or overlap > 0:
                pairs.append((not exact, -overlap, gi, pi))
    return sorted(pairs)


def match_entities(gold: list[Entity], pred: list[Entity], mode: str) -> dict[str, str]:
    """pred entity id -> gold entity id, one-to-one, greedy best overlap first."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    pairs, used_gold, used_pred = {}, set(), set()
    for *_, gi, pi in _candidates(gold, pred, mode):
        if gi not in used_gold and pi not in used_pred:
            used_gold.add(gi)
            used_pred.add(pi)
            pairs[pred[pi].id] = gold[gi].id
    return pairs


def _count_relations(gold: list[Relation], pred: list[Relation], pairs: dict[str, str]) -> Counter:
    remaining = Counter((r.type, r.head, r.tail) for r in gold)
    tp = 0
    for r in pred:
        key = (r.type, pairs.get(r.head), pairs.get(r.tail))
        if remaining[key] > 0:
            remaining[key] -= 1
            tp += 1
    return Counter(tp=tp, fp=len(pred) - tp, fn=len(gold) - tp)


# ------------------------------------------------------------------ documents


def _restrict(doc: Document, types: set[str] | None) -> tuple[list[Entity], list[Relation]]:
    ents = [e for e in doc.entities if types is None or e.type in types]
    kept = {e.id for e in ents}
    return ents, [r for r in doc.relations if r.head in kept and r.tail in kept]


def _by_id(docs: list[Document], which: str) -> dict[str, Document]:
    out: dict[str, Document] = {}
    for doc in docs:
        if doc.id in out:
            raise ScoringError(f"{which}: document id {doc.id!r} appears twice")
        out[doc.id] = doc
    return out


def _pair_documents(gold: list[Document], pred: list[Document]) -> list[tuple[Document, Document]]:
    gold_by_id, pred_by_id = _by_id(gold, "gold"), _by_id(pred, "predictions")
    unknown = sorted(set(pred_by_id) - set(gold_by_id))
    if unknown:
        raise ScoringError(f"predictions for {len(unknown)} document(s) not in gold, e.g. {unknown[:5]}")
    pairs = []
    for doc_id, g in gold_by_id.items():
        p = pred_by_id.get(doc_id) or Document(id=doc_id, text=g.text)
        if p.text and g.text and p.text != g.text:
            raise ScoringError(f"document {doc_id!r}: predicted text differs from the gold text (offsets would not agree)")
        pairs.append((g, p))
    return pairs


def _score_pair(g_doc: Document, p_doc: Document, types, ent: dict, per_type: dict, rel: dict) -> None:
    g_ents, g_rels = _restrict(g_doc, types)
    p_ents, p_rels = _restrict(p_doc, types)
    for mode in MODES:
        pairs = match_entities(g_ents, p_ents, mode)
        ent[mode].update(tp=len(pairs), fp=len(p_ents) - len(pairs), fn=len(g_ents) - len(pairs))
        matched = Counter(e.type for e in p_ents if e.id in pairs)
        gold_n, pred_n = Counter(e.type for e in g_ents), Counter(e.type for e in p_ents)
        for t in set(gold_n) | set(pred_n):
            per_type[mode].setdefault(t, Counter()).update(tp=matched[t], fp=pred_n[t] - matched[t], fn=gold_n[t] - matched[t])
        rel[mode].update(_count_relations(g_rels, p_rels, pairs))


def score_documents(gold: list[Document], pred: list[Document], types: set[str] | None = None, parse_failures: int = 0) -> dict:
    """The `fedmed eval --json` object (micro-averaged over documents; `fedmed eval` in README.md)."""
    types = set(types) if types else None
    ent = {m: Counter() for m in MODES}
    rel = {m: Counter() for m in MODES}
    per_type: dict[str, dict[str, Counter]] = {m: {} for m in MODES}
    pairs = _pair_documents(gold, pred)
    for g_doc, p_doc in pairs:
        _score_pair(g_doc, p_doc, types, ent, per_type, rel)

    def as_prf(counts: Counter) -> dict:
        return prf(counts["tp"], counts["fp"], counts["fn"])

    return {
        "documents": len(pairs),
        "entities": {
            **{m: as_prf(ent[m]) for m in MODES},
            "per_type": {t: {m: as_prf(per_type[m][t]) for m in MODES} for t in sorted(per_type["strict"])},
        },
        "relations": {m: as_prf(rel[m]) for m in MODES},
        "parse_failures": int(parse_failures),
    }


def document_counts(gold: list[Document], pred: list[Document], types: set[str] | None = None) -> dict[str, dict]:
    """Per gold document: {"entities"|"relations": {mode: [tp, fp, fn]}}, the units a
    bootstrap over notes resamples (summed over documents they equal `score_documents`)."""
    types = set(types) if types else None
    out = {}
    for g_doc, p_doc in _pair_documents(gold, pred):
        ent = {m: Counter() for m in MODES}
        rel = {m: Counter() for m in MODES}
        _score_pair(g_doc, p_doc, types, ent, {m: {} for m in MODES}, rel)
        out[g_doc.id] = {
            group: {m: [counts[m]["tp"], counts[m]["fp"], counts[m]["fn"]] for m in MODES}
            for group, counts in (("entities", ent), ("relations", rel))
        }
    return out


# ------------------------------------------------------------------ display


def format_table(result: dict) -> str:
    """The score object as an aligned text table (strict and lenient side by side)."""
    head = f"{'':22s} {'strict P':>8s} {'R':>6s} {'F1':>6s} {'tp':>6s} {'fp':>6s} {'fn':>6s}   {'lenient P':>9s} {'R':>6s} {'F1':>6s}"
    lines = [f"{result['documents']} documents, {result['parse_failures']} parse failures", "", head]

    def row(label: str, scores: dict) -> str:
        s, le = scores["strict"], scores["lenient"]
        return (
            f"{label:22s} {s['precision']:8.3f} {s['recall']:6.3f} {s['f1']:6.3f} {s['tp']:6d} {s['fp']:6d} {s['fn']:6d}"
            f"   {le['precision']:9.3f} {le['recall']:6.3f} {le['f1']:6.3f}"
        )

    lines.append(row("entities (micro)", result["entities"]))
    lines += [row(f"  {t}", scores) for t, scores in result["entities"]["per_type"].items()]
    lines.append(row("relations", result["relations"]))
    return "\n".join(lines)


# ------------------------------------------------------------------ BERT baseline


def bio_tags(doc: Document, token_offsets: list[tuple[int, int]], types: set[str] | None = None) -> list[str]:
    """BIO label per token: a token overlapping an entity's covering span belongs to it.

    Entities are taken in text order, longer first; one that would share a token with
    an entity already tagged is left out (BIO is flat). Empty offsets (special tokens)
    stay "O".
    """
    tags = ["O"] * len(token_offsets)
    for ent in sorted(doc.entities, key=lambda e: (e.start, -e.end, e.type)):
        if types is not None and ent.type not in types:
            continue
        inside = [i for i, (s, e) in enumerate(token_offsets) if e > s and s < ent.end and e > ent.start]
        if not inside or any(tags[i] != "O" for i in inside):
            continue
        tags[inside[0]] = f"B-{ent.type}"
        for i in inside[1:]:
            tags[i] = f"I-{ent.type}"
    return tags


def seqeval_scores(true_seqs: list[list[str]], pred_seqs: list[list[str]]) -> dict:
    """Entity-level micro P/R/F1 of BIO sequences (seqeval, conlleval rules) and per type."""
    from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

    report = classification_report(true_seqs, pred_seqs, output_dict=True, zero_division=0)
    per_type = {
        t: {"precision": v["precision"], "recall": v["recall"], "f1": v["f1-score"], "support": int(v["support"])}
        for t, v in report.items()
        if not t.endswith(" avg")
    }
    return {
        "precision": precision_score(true_seqs, pred_seqs, zero_division=0),
        "recall": recall_score(true_seqs, pred_seqs, zero_division=0),
        "f1": f1_score(true_seqs, pred_seqs, zero_division=0),
        "per_type": per_type,
    }
