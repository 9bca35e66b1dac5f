"""bench/bench_global_steps.py: the global adapter's step each round, A and B apart."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import bench_global_steps  # noqa: E402


def test_steps_are_the_norms_of_the_round_to_round_changes(tmp_path, tiny_model_path):
    import torch

    from fedmed_components.data.document import InputError
    from fedmed_components.model.modeling import LoraSettings, initial_adapter_from_config, save_adapter_folder

    settings = LoraSettings(r=4, alpha=8)
    state = initial_adapter_from_config(tiny_model_path, settings)
    b_keys = [k for k in state if "lora_B" in k]
    a_key = next(k for k in state if "lora_A" in k)
    store = tmp_path / "store"
    # round 0: B gets 3 at one entry and 4 at another (norm 5); A unchanged
    r0 = {k: v.clone() for k, v in state.items()}
    r0[b_keys[0]].view(-1)[0], r0[b_keys[1]].view(-1)[0] = 3.0, 4.0
    # round 1: A moves by 2 at one entry, B by 1
    r1 = {k: v.clone() for k, v in r0.items()}
    r1[a_key].view(-1)[0] += 2.0
    r1[b_keys[0]].view(-1)[1] += 1.0
    for i, s in enumerate((r0, r1)):
        save_adapter_folder(s, settings, tiny_model_path, store / f"round_{i:03d}")
    (store / "global").mkdir()  # the persistor's other folders are not rounds

    rows = bench_global_steps.global_steps(store)
    assert [r["round"] for r in rows] == [0, 1]
    assert rows[0]["a_step"] is None and rows[0]["b_step"] == pytest.approx(5.0)
    assert rows[1]["a_step"] == pytest.approx(2.0) and rows[1]["b_step"] == pytest.approx(1.0)
    assert torch.equal(r0[a_key], state[a_key])

    out = tmp_path / "steps.json"
    assert bench_global_steps.main([str(store), "--json", str(out)]) == 0 and str(store) in out.read_text()
    with pytest.raises(InputError, match="no round_NNN"):
        bench_global_steps.global_steps(tmp_path)
