"""The adapter persistor: initial adapter without base weights, per-round folders, resume."""

import json

import torch
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import ModelLearnableKey, make_model_learnable

from fedmed_components.flare.persistor import AdapterPersistor
from fedmed_components.model.modeling import LoraSettings, initial_adapter_from_config, load_adapter_folder


def _persistor(tmp_path, **kw):
    return AdapterPersistor(model="tiny", lora={"r": 4, "alpha": 8}, output_dir=str(tmp_path / "store"), **kw)


def test_fresh_start_builds_adapter_from_config(tmp_path, tiny_model_path):
    learnable = _persistor(tmp_path).load_model(FLContext())
    weights = learnable[ModelLearnableKey.WEIGHTS]
    expected = initial_adapter_from_config(tiny_model_path, LoraSettings(r=4, alpha=8))
    assert weights.keys() == expected.keys()
    assert learnable[ModelLearnableKey.META]["next_round"] == 0


def test_saves_every_round_tracks_best_and_resumes(tmp_path, tiny_model_path):
    ctx = FLContext()
    p = _persistor(tmp_path)
    start = p.load_model(ctx)[ModelLearnableKey.WEIGHTS]
    rounds = []
    for rnd, val_loss in enumerate([2.0, 1.5, 1.8]):
        weights = {k: v + rnd + 1 for k, v in start.items()}
        rounds.append(weights)
        meta = {"current_round": rnd, "val_loss": val_loss, "prompt_style": "paper", "ner_sentences": 2}
        p.save_model(make_model_learnable(weights, meta), ctx)
    store = tmp_path / "store"
    assert sorted(x.name for x in store.iterdir()) == ["best", "global", "round_000", "round_001", "round_002", "state.json"]
    state = json.loads((store / "state.json").read_text())
    assert state["last_round"] == 2 and state["best_round"] == 1 and state["best_value"] == 1.5
    best, _, best_meta = load_adapter_folder(store / "best")
    assert best_meta["current_round"] == 1 and all(torch.equal(best[k], rounds[1][k]) for k in best)
    # the sites' prompt settings reach the folder `fedmed predict` reads them from
    assert {k: load_adapter_folder(store / "global")[2][k] for k in ("prompt_style", "ner_sentences")} == {
        "prompt_style": "paper",
        "ner_sentences": 2,
    }

    # A restarted server (new persistor, same output_dir) resumes after the last round.
    resumed = _persistor(tmp_path).load_model(FLContext())
    assert resumed[ModelLearnableKey.META]["next_round"] == 3
    weights = resumed[ModelLearnableKey.WEIGHTS]
    assert all(torch.equal(weights[k], rounds[2][k]) for k in weights)
    # and resume=False starts over
    fresh = _persistor(tmp_path, resume=False).load_model(FLContext())
    assert fresh[ModelLearnableKey.META]["next_round"] == 0


def test_initial_adapter_folder_is_used(tmp_path, tiny_model_path):
    from fedmed_components.model.modeling import save_adapter_folder

    settings = LoraSettings(r=4, alpha=8)
    given = {k: v + 7 for k, v in initial_adapter_from_config(tiny_model_path, settings).items()}
    folder = save_adapter_folder(given, settings, tiny_model_path, tmp_path / "given")
    weights = _persistor(tmp_path, initial_adapter=str(folder)).load_model(FLContext())[ModelLearnableKey.WEIGHTS]
    assert all(torch.equal(weights[k], given[k]) for k in given)
