"""How far the global adapter moves each round: the norm of global_r - global_(r-1), for
the LoRA A and B matrices apart, read from federated runs' persistor stores.

A server optimiser changes the step the server takes from the sites' mean update. FedAvg's
step shrinks as the sites' own learning rate decays (schedule "run": one cosine across
the rounds); FedAdam's coordinate-wise normalisation gives every coordinate a step of
about its server lr whatever the update's size, so its steps stay the same size, and A
(small updates) moves as far as B. This prints those norms for any runs, side by side.
B starts at zero, so round 0's B step is the norm of B itself; A starts from a seeded
random draw the store does not keep, so A's steps start at round 1.

    python bench/bench_global_steps.py /tmp/exp_work/runs/fed_adam_lr0p01/store \\
        /tmp/exp_bf16_work/runs/fed_medlora/store --json bench/results/global_steps.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _step(state: dict, before: dict | None, part: str) -> float | None:
    """Norm of the change of the LoRA `part` (A or B) matrices since `before` (None: round 0)."""
    keys = [k for k in state if f"lora_{part}" in k]
    if before is None:
        return None if part == "A" else sum(float((state[k] ** 2).sum()) for k in keys) ** 0.5
    return sum(float(((state[k] - before[k]) ** 2).sum()) for k in keys) ** 0.5


def global_steps(store: Path) -> list[dict]:
    """[{round, a_step, b_step}] over the store's round_NNN folders (a_step None at round 0)."""
    from fedmed_components.data.document import InputError
    from fedmed_components.model.modeling import load_adapter_folder

    rounds = sorted(store.glob("round_[0-9][0-9][0-9]"))
    if not rounds:
        raise InputError(store, None, "no round_NNN adapter folders here: is it a federated run's store?")
    rows, previous = [], None
    for folder in rounds:
        state, _, _ = load_adapter_folder(folder)
        state = {k: v.float() for k, v in state.items()}
        rows.append({"round": int(folder.name.split("_")[1]), "a_step": _step(state, previous, "A"), "b_step": _step(state, previous, "B")})
        previous = state
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stores", nargs="+", type=Path, help="persistor store folders (<run work folder>/store)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    out = {str(store): global_steps(store) for store in args.stores}
    for store, rows in out.items():
        cells = [f"r{r['round']}: B {r['b_step']:.3f}" + (f", A {r['a_step']:.3f}" if r["a_step"] is not None else "") for r in rows]
        print(f"{store}: " + "; ".join(cells))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
