"""Which sites train in a round: a seeded sample, never fewer than ``min_sites``.

Pure (no FLARE import): the controller asks it once per round. The draw depends only on
the seed, the round number and the set of sites, not on the order the server lists
them, so a restarted server samples the same sites for the same round.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence


def check_sampling(fraction: float | None = None, count: int | None = None) -> None:
    """ValueError unless at most one of ``fraction`` (0 < f <= 1) and ``count`` (int >= 1) is set."""
    if fraction is not None and count is not None:
        raise ValueError("give sample_fraction or sample_clients, not both")
    if fraction is not None and not (isinstance(fraction, (int, float)) and not isinstance(fraction, bool) and 0 < fraction <= 1):
        raise ValueError(f"sample_fraction must be in (0, 1], got {fraction!r}")
    if count is not None and not (isinstance(count, int) and not isinstance(count, bool) and count >= 1):
        raise ValueError(f"sample_clients must be an integer >= 1, got {count!r}")


def sample_size(n_sites: int, fraction: float | None = None, count: int | None = None, min_sites: int = 1) -> int:
    """How many of ``n_sites`` train: ``ceil(fraction * n)`` or ``count``, raised to
    ``min_sites`` and capped at ``n_sites`` (all of them when neither is given)."""
    check_sampling(fraction, count)
    if min_sites > n_sites:
        raise ValueError(f"only {n_sites} sites available, fewer than min_clients={min_sites}")
    if fraction is not None:
        wanted = math.ceil(fraction * n_sites - 1e-9)  # 0.3 * 10 is 3.0000000000000004 in floats
    else:
        wanted = count if count is not None else n_sites
    return min(max(wanted, min_sites), n_sites)


def sample_sites(
    sites: Sequence[str],
    round_number: int,
    *,
    fraction: float | None = None,
    count: int | None = None,
    seed: int = 0,
    min_sites: int = 1,
) -> list[str]:
    """The sites that train in ``round_number``, sorted; every site when no sampling is set.

    The same (seed, round, sites) always gives the same sample; each round draws anew.
    ValueError on bad settings, a negative round, duplicate names, or fewer sites than
    ``min_sites``.
    """
    names = sorted(sites)
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate site names in {names}")
    if round_number < 0:
        raise ValueError(f"round_number must be >= 0, got {round_number}")
    size = sample_size(len(names), fraction, count, min_sites)
    if size == len(names):
        return names
    rng = random.Random(f"fedmed-sampling:{int(seed)}:{int(round_number)}")  # str seeds hash stably across runs
    return sorted(rng.sample(names, size))
