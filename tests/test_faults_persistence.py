"""A server that dies while it persists a round never leaves a half-written round folder
or state.json: every write goes to a temp name in the same folder, is fsynced, then
renamed; a restarted persistor resumes after the last round state.json names."""

import json
import os

import pytest
import torch
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import ModelLearnableKey, make_model_learnable

from fedmed_components.flare.persistor import AdapterPersistor
from fedmed_components.model.modeling import load_adapter_folder


class Crash(RuntimeError):
    pass


def _persistor(store):
    return AdapterPersistor(model="tiny", lora={"r": 4, "alpha": 8}, output_dir=str(store))


def _save(persistor, weights, rnd):
    persistor.save_model(make_model_learnable(weights, {"current_round": rnd, "val_loss": 1.0}), FLContext())


def _two_rounds(tmp_path):
    """A store with round 0 finished; the weights round 0 and round 1 would write."""
    store = tmp_path / "store"
    p = _persistor(store)
    start = p.load_model(FLContext())[ModelLearnableKey.WEIGHTS]
    round0 = {k: v + 1 for k, v in start.items()}
    round1 = {k: v + 2 for k, v in start.items()}
    _save(p, round0, 0)
    return store, p, round0, round1


def _assert_resumes_after_round0(store, round0):
    learnable = _persistor(store).load_model(FLContext())
    assert learnable[ModelLearnableKey.META]["next_round"] == 1
    weights = learnable[ModelLearnableKey.WEIGHTS]
    assert all(torch.equal(weights[k], round0[k]) for k in round0)
    # every adapter folder there is complete, and no temp leftover survives the restart
    for folder in store.iterdir():
        assert not folder.name.startswith("."), f"unfinished write left behind: {folder}"
        if folder.is_dir():
            load_adapter_folder(folder)
    assert json.loads((store / "state.json").read_text())["last_round"] == 0


def test_crash_while_writing_the_adapter_file_leaves_no_round_folder(tmp_path, tiny_model_path, monkeypatch):
    store, p, round0, round1 = _two_rounds(tmp_path)
    import safetensors.torch

    real_save = safetensors.torch.save_file

    def half_write(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as fh:  # the power goes off halfway through the file
            fh.truncate(os.path.getsize(filename) // 2)
        raise Crash("disk gone")

    monkeypatch.setattr(safetensors.torch, "save_file", half_write)
    with pytest.raises(Crash):
        _save(p, round1, 1)
    monkeypatch.undo()
    assert not (store / "round_001").exists()
    assert [f.name for f in store.iterdir() if f.name.startswith(".round_001")], "the write did go to a temp folder"
    _assert_resumes_after_round0(store, round0)


def test_crash_while_replacing_global_resumes_from_the_round_folder(tmp_path, tiny_model_path, monkeypatch):
    store, p, round0, round1 = _two_rounds(tmp_path)
    real_replace = os.replace

    def crash_after_moving_global_away(src, dst):
        real_replace(src, dst)
        if str(dst).endswith("global.old"):
            raise Crash("killed between the two renames")

    monkeypatch.setattr(os, "replace", crash_after_moving_global_away)
    with pytest.raises(Crash):
        _save(p, round1, 1)
    monkeypatch.undo()
    assert not (store / "global").exists() and (store / "global.old").exists()
    # round_001 is complete (renamed whole) but state.json still says round 0 finished
    _assert_resumes_after_round0(store, round0)


def test_crash_while_writing_state_json_keeps_the_previous_one(tmp_path, tiny_model_path, monkeypatch):
    store, p, round0, round1 = _two_rounds(tmp_path)
    real_fsync = os.fsync
    crashed_on = []

    def crash_on_state(fd):
        name = os.readlink(f"/proc/self/fd/{fd}")
        if name.endswith("state.json.tmp"):
            crashed_on.append(name)
            raise Crash("killed before the rename")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", crash_on_state)
    with pytest.raises(Crash):
        _save(p, round1, 1)
    monkeypatch.undo()
    assert crashed_on == [str(store / "state.json.tmp")], "the write did go to a temp file in the same folder"
    assert not (store / "state.json.tmp").exists()  # the failed write took its temp file away
    # a process killed at that point leaves the temp file behind: a restart clears it
    (store / "state.json.tmp").write_text('{"last_round": 1, "half')
    _assert_resumes_after_round0(store, round0)
    assert not (store / "state.json.tmp").exists()
    # and the job carries on: round 1 saved again, state moves on
    p2 = _persistor(store)
    p2.load_model(FLContext())
    _save(p2, round1, 1)
    assert json.loads((store / "state.json").read_text())["last_round"] == 1
