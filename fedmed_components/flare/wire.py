"""Task names and payload layouts shared by the server components and the site script."""

from __future__ import annotations

TRAIN_TASK = "train"
CANDIDATES_TASK = "score_candidates"  # Fed-MedLoRA+ with losses measured at the sites
# After the last round: each site scores the final global adapter on its own test notes
# and answers metrics only (docs/cross_site_evaluation.md). Its score object travels in
# the answer's meta under EVAL_RESULT; the server's table of them is CROSS_SITE_EVAL_FILE,
# beside the persistor's global/ adapter.
EVALUATE_TASK = "evaluate_global"
EVAL_RESULT = "cross_site_eval"
CROSS_SITE_EVAL_FILE = "cross_site_eval.json"

# Round-meta key for the server optimiser's moments (tensors): the aggregator puts them in
# the round's result, the persistor writes them beside the adapter and returns them with
# it on resume, the controller gives them back to the aggregator. Never sent to sites.
SERVER_OPTIMIZER_STATE = "server_optimizer_state"

_SEP = "::"


def pack_candidates(candidates: dict[str, dict]) -> dict:
    """One flat params dict holding every site's round adapter, prefixed by site name."""
    return {f"{site}{_SEP}{key}": tensor for site, state in candidates.items() for key, tensor in state.items()}


def unpack_candidates(params: dict) -> tuple[list[str], list[dict]]:
    grouped: dict[str, dict] = {}
    for flat_key, tensor in params.items():
        site, key = flat_key.split(_SEP, 1)
        grouped.setdefault(site, {})[key] = tensor
    names = sorted(grouped)
    return names, [grouped[name] for name in names]
