"""Bootstrap intervals over notes, checked on cases small enough to work out by hand."""

import numpy as np
import pytest

from fedmed_components.data.document import Document, Entity
from fedmed_components.task.bootstrap import aligned_counts, bootstrap_f1, f1_from_counts, note_id, paired_difference
from fedmed_components.task.metrics import document_counts, score_documents


def test_f1_from_counts_matches_the_definition():
    assert f1_from_counts(np.array([3, 1, 2])) == pytest.approx(2 * 3 / (2 * 3 + 1 + 2))
    assert f1_from_counts(np.array([0, 0, 0])) == 0.0


def test_two_notes_interval_spans_the_single_note_f1s():
    # Resampling two notes gives {A,A}, {A,B}, {B,B} with probability 1/4, 1/2, 1/4: the
    # 2.5% and 97.5% percentiles are the F1 of note A alone and of note B alone.
    a, b = [9, 1, 0], [1, 3, 4]  # F1 0.947 and 0.222
    got = bootstrap_f1(np.array([a, b]), resamples=4000, seed=1)
    assert got.estimate == pytest.approx(f1_from_counts(np.array([10, 4, 4])))
    assert got.low == pytest.approx(f1_from_counts(np.array(b)))
    assert got.high == pytest.approx(f1_from_counts(np.array(a)))


def test_identical_notes_give_a_point_interval():
    got = bootstrap_f1(np.array([[2, 1, 1]] * 5))
    assert got.low == got.high == got.estimate == pytest.approx(2 / 3)


def test_paired_difference_of_a_run_with_itself_is_zero_and_of_a_uniform_gain_is_positive():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 10, size=(30, 3))
    same = paired_difference(base, base)
    assert same.low == same.high == same.estimate == 0.0
    better = base.copy()
    better[:, 0] += 3  # three more true positives in every note ...
    better[:, 2] = np.maximum(better[:, 2] - 3, 0)  # ... taken from the misses
    gain = paired_difference(better, base)
    assert 0 < gain.low <= gain.estimate <= gain.high


def test_paired_is_tighter_than_unpaired_when_runs_share_hard_notes():
    # Notes vary a lot in difficulty; run a is uniformly a bit better. Pairing removes the
    # note-difficulty variance, so the difference's interval is narrower than the
    # spread of either run's own F1.
    rng = np.random.default_rng(3)
    tp = rng.integers(1, 30, size=40)
    b = np.stack([tp, 30 - tp, 30 - tp], axis=1)
    a = np.stack([tp + 1, 29 - tp, 29 - tp], axis=1)
    diff = paired_difference(a, b)
    own = bootstrap_f1(b)
    assert diff.high - diff.low < (own.high - own.low) / 3


def test_stratified_resampling_keeps_each_sites_notes():
    # Site x always scores 1.0, site y always 0.0 with equal totals: with strata every
    # resample keeps one note of each, so F1 never moves; without strata it does.
    counts = np.array([[5, 0, 0], [0, 5, 0]])
    fixed = bootstrap_f1(counts, strata=["x", "y"])
    assert fixed.low == fixed.high == pytest.approx(f1_from_counts(np.array([5, 5, 0])))
    free = bootstrap_f1(counts)
    assert free.low < free.high


def test_matches_scipy_percentile_bootstrap():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(7)
    counts = rng.integers(0, 20, size=(25, 3))
    ours = bootstrap_f1(counts, resamples=20000, seed=2)
    theirs = scipy_stats.bootstrap(
        (np.arange(len(counts)),),
        lambda i: f1_from_counts(counts[i.astype(int)].sum(axis=0)),
        n_resamples=20000,
        method="percentile",
        random_state=3,
        vectorized=False,
    )
    assert ours.low == pytest.approx(theirs.confidence_interval.low, abs=0.01)
    assert ours.high == pytest.approx(theirs.confidence_interval.high, abs=0.01)


def test_document_counts_sum_to_the_micro_scores_and_group_by_note():
    def doc(i, spans):
        text = "fever and cough today"
        return Document(id=i, text=text, entities=[Entity(f"T{k}", "problem", [s], text[s[0] : s[1]]) for k, s in enumerate(spans)])

    gold = [doc("n1#s000", [(0, 5), (10, 15)]), doc("n1#s001", [(0, 5)]), doc("n2#s000", [(10, 15)])]
    pred = [doc("n1#s000", [(0, 5)]), doc("n1#s001", [(0, 9)]), doc("n2#s000", [(6, 9)])]
    per_doc = document_counts(gold, pred)
    total = np.sum([c["entities"]["strict"] for c in per_doc.values()], axis=0)
    micro = score_documents(gold, pred)["entities"]["strict"]
    assert list(total) == [micro["tp"], micro["fp"], micro["fn"]]
    assert sorted({note_id(d) for d in per_doc}) == ["n1", "n2"]
    per_note = {"site": {"n1": {"entities": {"strict": [1, 1, 2]}}, "n2": {"entities": {"strict": [0, 1, 1]}}}}
    counts, strata, notes = aligned_counts(per_note, "entities", "strict")
    assert counts.tolist() == [[1, 1, 2], [0, 1, 1]] and strata == ["site", "site"] and notes == [("site", "n1"), ("site", "n2")]
    with pytest.raises(ValueError, match="n3"):
        aligned_counts(per_note, "entities", "strict", notes=[("site", "n3")])
