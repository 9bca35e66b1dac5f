"""TEST-ONLY FedMed site script: the real site (custom/fedmed_site.py, copied beside this
file as fedmed_site_real.py), except that the site named by --fault-site corrupts its
training answer, the corruption for round r being --faults[r] (cycling).

Malformed updates (tests/test_faults_poison.py): nan, base_weight, shape, norm (x100),
empty. Attacks that pass the server's screening (tests/test_faults_robust.py), all made
from the attacker's own honestly trained update ``u = x - x_global``:

- ``scale3``: ``x_global + 3 u`` (under the 10x norm bound);
- ``sign_flip``: ``x_global - u``;
- ``random``: a random direction (seeded by round and site) at the norm of ``u``;
- ``collude``: every site in --colluders (not --fault-site) sends the same crafted
  update ``x_global - 2 mean(u_c)`` over the colluders' honest updates, which they pool
  through a folder under --record (their side channel);
- ``none``: an honest round.

With --record DIR every site writes, each round, ``DIR/round_NNN/<site>.safetensors``
(``global/<name>``: the adapter it received, ``honest/<name>``: what it trained,
``sent/<name>``: what it sent) and ``<site>.json`` (kind, attacker, supervised tokens),
so a test can compute the honest-only aggregate and what plain averaging would give.

Used by the tests above, which put this file in an exported job as
app/custom/fedmed_site.py. Never part of a real job.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from nvflare.app_common.abstract.fl_model import FLModel

from fedmed_components.federation.lora_keys import is_lora_A
from fedmed_components.flare import site_tasks

BASE_WEIGHT = "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"
ATTACKS = ("scale3", "sign_flip", "random", "collude")


def _norm(update: dict) -> float:
    return sum(float(v.double().pow(2).sum()) for v in update.values()) ** 0.5


def _write_safetensors(tensors: dict, path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.detach().clone().contiguous() for k, v in tensors.items()}, str(tmp))  # clones: honest and sent may share memory
    os.replace(tmp, path)  # a reader never sees half a file


def _pooled_honest_updates(share: Path, site: str, colluders: list[str], update: dict, timeout: float) -> list[dict]:
    """Put this colluder's honest update in the shared folder, wait for the others'."""
    from safetensors.torch import load_file

    share.mkdir(parents=True, exist_ok=True)
    _write_safetensors(update, share / f"{site}.safetensors")
    deadline = time.monotonic() + timeout
    paths = [share / f"{name}.safetensors" for name in colluders]
    while not all(p.exists() for p in paths):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{site}: colluders {colluders} did not all share an update within {timeout:.0f} s")
        time.sleep(0.2)
    return [load_file(str(p)) for p in paths]


def corrupt(
    kind: str,
    answer: FLModel,
    global_state: dict,
    *,
    site: str = "",
    round_number: int = 0,
    colluders: list[str] = (),
    share: Path | None = None,
    collude_timeout: float = 120.0,
) -> FLModel:
    params = dict(answer.params)
    first_a = next(k for k in sorted(params) if is_lora_A(k))
    update = {k: v - global_state[k].to(v.dtype) for k, v in params.items()} if kind in ATTACKS else None
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
    elif kind == "scale3":
        params = {k: global_state[k] + 3.0 * u for k, u in update.items()}
    elif kind == "sign_flip":
        params = {k: global_state[k] - u for k, u in update.items()}
    elif kind == "random":
        gen = torch.Generator().manual_seed(1000 * round_number + sum(map(ord, site)))
        direction = {k: torch.randn(u.shape, generator=gen, dtype=torch.float64) for k, u in sorted(update.items())}
        scale = _norm(update) / _norm(direction)
        params = {k: global_state[k] + (scale * direction[k]).to(u.dtype) for k, u in update.items()}
    elif kind == "collude":
        pooled = _pooled_honest_updates(share, site, list(colluders), update, collude_timeout)
        params = {k: global_state[k] - 2.0 * sum(p[k] for p in pooled) / len(pooled) for k in update}
    else:
        raise ValueError(f"unknown fault {kind!r}")
    return FLModel(params=params, params_type=answer.params_type, meta=answer.meta, metrics=answer.metrics)


def record(folder: Path, site: str, kind: str, attacker: bool, global_state: dict, honest: FLModel, sent: FLModel) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"global/{k}": v for k, v in global_state.items()}
    tensors.update({f"honest/{k}": v for k, v in honest.params.items()})
    tensors.update({f"sent/{k}": v for k, v in (sent.params or {}).items()})
    _write_safetensors(tensors, folder / f"{site}.safetensors")
    meta = {"site": site, "kind": kind, "attacker": attacker, "num_supervised_tokens": int(honest.meta["num_supervised_tokens"])}
    (folder / f"{site}.json").write_text(json.dumps(meta))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--fault-site", required=True)
    parser.add_argument(
        "--faults", required=True, help="comma list, one per round: nan,base_weight,shape,norm,empty,scale3,sign_flip,random,collude,none"
    )
    parser.add_argument("--colluders", default="", help="comma list of the sites that send the crafted update in a 'collude' round")
    parser.add_argument("--record", default="", help="folder for every site's received, trained and sent adapters per round")
    parser.add_argument("--collude-timeout", type=float, default=120.0)
    ours, rest = parser.parse_known_args()
    faults = ours.faults.split(",")
    colluders = [s for s in ours.colluders.split(",") if s] or [ours.fault_site]
    if "collude" in faults and not ours.record:
        parser.error("'collude' needs --record (the colluders share their updates there)")
    sys.argv = [sys.argv[0], *rest]
    real_train = site_tasks.train

    def train(runtime, incoming, *args, **kwargs):
        global_state = dict(incoming.params or {})
        answer = real_train(runtime, incoming, *args, **kwargs)
        site, rnd = runtime.site_name, int(incoming.current_round or 0)
        kind = faults[rnd % len(faults)]
        attacker = site in colluders if kind == "collude" else (site == ours.fault_site and kind != "none")
        sent = answer
        if attacker:
            site_tasks.log.warning("%s round %s: sending a %s update (fault injection)", site, rnd, kind)
            share = Path(ours.record) / f"round_{rnd:03d}" / "collusion" if ours.record else None
            sent = corrupt(
                kind,
                answer,
                global_state,
                site=site,
                round_number=rnd,
                colluders=colluders,
                share=share,
                collude_timeout=ours.collude_timeout,
            )
        if ours.record:
            record(Path(ours.record) / f"round_{rnd:03d}", site, kind, attacker, global_state, answer, sent)
        return sent

    site_tasks.train = train  # site_tasks.handle looks train up at call time
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import fedmed_site_real

    fedmed_site_real.main()


if __name__ == "__main__":
    main()
