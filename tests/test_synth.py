from collections import Counter

from fedmed_components.schema import MAIN_TYPES
from fedmed_components.synth import demo_corpus


def test_synthetic_corpus_is_exact_complete_deterministic_and_skewed():
    corpus = demo_corpus(n_sites=3, docs_per_site=6, seed=5)
    assert demo_corpus(n_sites=3, docs_per_site=6, seed=5) == corpus
    assert demo_corpus(n_sites=3, docs_per_site=6, seed=6) != corpus
    totals = {}
    for site, docs in corpus.items():
        counts = Counter()
        for doc in docs:
            ids = {e.id for e in doc.entities}
            for e in doc.entities:
                assert all(doc.text[s:t] == e.text for s, t in e.spans)
                counts[e.type] += 1
            assert all(r.head in ids and r.tail in ids for r in doc.relations)
        totals[site] = counts
    all_types = set().union(*totals.values())
    assert set(MAIN_TYPES) <= all_types
    assert {"negation", "bodyloc", "labvalue", "strength", "route", "frequency"} <= all_types
    # label skew: discharge summaries carry more drugs than general medicine notes
    assert totals["discharge_summary"]["drug"] > totals["general_medicine"]["drug"]
