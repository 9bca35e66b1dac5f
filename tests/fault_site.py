"""TEST-ONLY FedMed site script: the real site (custom/fedmed_site.py, copied beside this
file as fedmed_site_real.py), except that the site named by --fault-site corrupts its
training answer, the corruption for round r being --faults[r] (cycling).

Used by tests/test_faults_poison.py, which puts this file in an exported job as
app/custom/fedmed_site.py. Never part of a real job.
"""

import argparse
import os
import sys

import torch
from nvflare.app_common.abstract.fl_model import FLModel

from fedmed_components.aggregation import is_lora_A
from fedmed_components.flare import site_tasks

BASE_WEIGHT = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"


def corrupt(kind: str, answer: FLModel, global_state: dict) -> FLModel:
    params = dict(answer.params)
    first_a = next(k for k in sorted(params) if is_lora_A(k))
    if kind == "nan":
        params[first_a] = torch.full_like(params[first_a], float("nan"))
    elif kind == "base_weight":  # a base-model weight must never leave a site
        params[BASE_WEIGHT] = torch.zeros(8, 8)
    elif kind == "shape":
        params[first_a] = params[first_a][:-1]
    elif kind == "norm":  # the trained change, scaled up 100x
        params = {k: global_state[k] + 100.0 * (v - global_state[k]) for k, v in params.items()}
    elif kind == "empty":
        params = {}
    else:
        raise ValueError(f"unknown fault {kind!r}")
    return FLModel(params=params, params_type=answer.params_type, meta=answer.meta, metrics=answer.metrics)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--fault-site", required=True)
    parser.add_argument("--faults", required=True, help="comma list, one per round: nan,base_weight,shape,norm,empty")
    ours, rest = parser.parse_known_args()
    faults = ours.faults.split(",")
    sys.argv = [sys.argv[0], *rest]
    real_train = site_tasks.train

    def train(runtime, incoming, *args, **kwargs):
        answer = real_train(runtime, incoming, *args, **kwargs)
        if runtime.site_name != ours.fault_site:
            return answer
        kind = faults[int(incoming.current_round or 0) % len(faults)]
        site_tasks.log.warning("%s round %s: sending a %s update (fault injection)", runtime.site_name, incoming.current_round, kind)
        return corrupt(kind, answer, incoming.params)

    site_tasks.train = train  # site_tasks.handle looks train up at call time
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import fedmed_site_real

    fedmed_site_real.main()


if __name__ == "__main__":
    main()
