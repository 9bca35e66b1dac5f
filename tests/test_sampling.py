"""Per-round client sampling: seeded, bounded, floored at min_clients, strict about its settings."""

import pytest

from fedmed_components.federation.sampling import check_sampling, sample_sites, sample_size

SITES = [f"site-{i}" for i in range(1, 11)]


def test_no_sampling_setting_trains_every_site():
    assert sample_sites(list(reversed(SITES)), 0) == sorted(SITES)


def test_same_seed_and_round_give_the_same_sample_whatever_the_listing_order():
    first = sample_sites(SITES, 3, count=4, seed=7)
    assert sample_sites(list(reversed(SITES)), 3, count=4, seed=7) == first
    assert first == sorted(first) and len(set(first)) == 4 and set(first) <= set(SITES)


def test_rounds_and_seeds_draw_anew():
    by_round = {tuple(sample_sites(SITES, r, count=3, seed=0)) for r in range(10)}
    by_seed = {tuple(sample_sites(SITES, 0, count=3, seed=s)) for s in range(10)}
    assert len(by_round) > 1 and len(by_seed) > 1


def test_the_draw_is_stable_across_interpreter_runs():
    import subprocess
    import sys

    code = "from fedmed_components.federation.sampling import sample_sites; print(sample_sites([f'site-{i}' for i in range(1, 11)], 2, count=3, seed=5))"
    outs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env={"PYTHONHASHSEED": h}).stdout
        for h in ("1", "2")
    }
    assert outs == {f"{sample_sites(SITES, 2, count=3, seed=5)}\n"}


@pytest.mark.parametrize("fraction, expected", [(0.1, 1), (0.25, 3), (0.3, 3), (0.5, 5), (0.99, 10), (1.0, 10)])
def test_fraction_rounds_up(fraction, expected):
    assert sample_size(10, fraction=fraction) == expected
    assert len(sample_sites(SITES, 1, fraction=fraction)) == expected


def test_count_is_capped_at_the_connected_sites():
    assert sample_sites(SITES[:3], 0, count=5) == SITES[:3]


def test_never_fewer_than_min_clients():
    assert len(sample_sites(SITES, 0, count=1, min_sites=4)) == 4
    assert len(sample_sites(SITES, 0, fraction=0.1, min_sites=3)) == 3
    assert sample_size(10, count=6, min_sites=2) == 6


def test_fewer_sites_than_min_clients_is_an_error():
    with pytest.raises(ValueError, match="fewer than min_clients=3"):
        sample_sites(SITES[:2], 0, count=1, min_sites=3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(fraction=0.0), "sample_fraction"),
        (dict(fraction=1.5), "sample_fraction"),
        (dict(fraction=-0.2), "sample_fraction"),
        (dict(fraction=True), "sample_fraction"),
        (dict(count=0), "sample_clients"),
        (dict(count=2.5), "sample_clients"),
        (dict(count=True), "sample_clients"),
        (dict(fraction=0.5, count=2), "not both"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        check_sampling(**kwargs)
    with pytest.raises(ValueError, match=message):
        sample_sites(SITES, 0, **kwargs)


def test_bad_rounds_and_names_are_refused():
    with pytest.raises(ValueError, match="round_number"):
        sample_sites(SITES, -1, count=2)
    with pytest.raises(ValueError, match="duplicate"):
        sample_sites(["a", "a", "b"], 0, count=2)
