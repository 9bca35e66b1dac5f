"""The site side with the tiny model on CPU: train / validate / score / submit tasks."""

import math

import pytest
import torch
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from fedmed_components.data.document import InputError, write_jsonl
from fedmed_components.federation.lora_keys import is_lora_A, is_lora_key
from fedmed_components.flare import site_tasks
from fedmed_components.flare.wire import pack_candidates
from fedmed_components.model.modeling import LoraSettings
from fedmed_components.model.site import SiteConfig, SiteRuntime, load_site_data, site_data_folder
from fedmed_components.model.training import TrainSettings

META_FIELDS = {"num_supervised_tokens", "num_examples", "train_loss", "val_loss", "steps", "rank", "site"}


@pytest.fixture(scope="module")
def site_folder(tmp_path_factory):
    from fedmed_components.data.synth import generate_site_corpus

    root = tmp_path_factory.mktemp("site")
    docs = generate_site_corpus("site-a", 4, seed=3, style="general_medicine")
    write_jsonl(docs[:3], root / "train.jsonl")
    write_jsonl(docs[3:], root / "val.jsonl")
    return root


def make_runtime(site_folder, rank=4, **train) -> SiteRuntime:
    config = SiteConfig(
        model="tiny",
        quantize="none",
        device="cpu",
        lora=LoraSettings(r=rank, alpha=8),
        train=TrainSettings(max_steps=2, batch_size=4, max_length=160, learning_rate=1e-2, **train),
        max_val_examples=6,
    )
    runtime = SiteRuntime(config, site_name="site-a")
    runtime.load_data(site_folder)
    return runtime


@pytest.fixture(scope="module")
def runtime(site_folder, tiny_model_path):
    return make_runtime(site_folder)


def test_train_task_sends_only_the_adapter_with_metadata(runtime):
    from peft import get_peft_model_state_dict

    global_state = runtime.adapter_state()
    out = site_tasks.handle(runtime, "train", FLModel(params=global_state, current_round=0))
    assert out.params.keys() == get_peft_model_state_dict(runtime.model).keys()
    assert all(is_lora_key(k) for k in out.params)
    assert META_FIELDS <= set(out.meta)
    assert out.meta["steps"] == 2 and out.meta["num_supervised_tokens"] > 0 and math.isfinite(out.meta["val_loss"])
    assert any(not torch.equal(out.params[k], global_state[k]) for k in global_state)


def test_a_dp_sgd_epsilon_budget_is_spread_over_the_servers_rounds(site_folder, tiny_model_path):
    private = make_runtime(site_folder, dp_sgd="epsilon=6,clip=1")
    epsilons = []
    for rnd in range(3):
        out = site_tasks.handle(private, "train", FLModel(params=private.adapter_state(), current_round=rnd, total_rounds=3))
        epsilons.append(out.meta["dp_sgd"]["epsilon"])
    assert private.trainer.planned_rounds == 3
    assert epsilons[0] < epsilons[1] < epsilons[2] and 5.98 <= epsilons[2] <= 6.0


def test_diff_mode_sends_the_change(runtime):
    global_state = runtime.adapter_state()
    out = site_tasks.handle(runtime, "train", FLModel(params=global_state, current_round=1), send="diff")
    assert out.params_type == ParamsType.DIFF
    now = runtime.adapter_state()
    assert all(torch.allclose(global_state[k] + out.params[k], now[k], atol=1e-6) for k in now)


def test_a_site_keeps_its_own_adapter_of_each_round_when_asked(runtime, tmp_path):
    from fedmed_components.model.modeling import load_adapter_folder

    global_state = runtime.adapter_state()
    sent = site_tasks.handle(runtime, "train", FLModel(params=global_state, current_round=4), send="diff", keep_adapters=str(tmp_path))
    kept, settings, _ = load_adapter_folder(tmp_path / "site-a" / "round_004")
    # what it trained (the global adapter plus the change it sent), not the change alone
    assert kept.keys() == sent.params.keys() and settings.r == runtime.config.lora.r
    assert all(torch.allclose(kept[k], global_state[k] + sent.params[k], atol=1e-6) for k in kept)
    assert [p.name for p in tmp_path.iterdir()] == ["site-a"]  # nothing half-written beside it
    # not asked: nothing is written
    site_tasks.handle(runtime, "train", FLModel(params=global_state, current_round=5))
    assert not (tmp_path / "site-a" / "round_005").exists()


def test_score_candidates_returns_losses_and_restores_own_adapter(runtime):
    own = runtime.adapter_state()
    zeros = {k: torch.zeros_like(v) for k, v in own.items()}
    out = site_tasks.handle(runtime, "score_candidates", FLModel(params=pack_candidates({"site-a": own, "site-b": zeros})))
    assert out.meta["candidates"] == ["site-a", "site-b"]
    own_loss, _ = runtime.validation_loss()
    assert out.meta["losses"][0] == pytest.approx(own_loss, rel=1e-5)
    assert out.meta["losses"][0] != pytest.approx(out.meta["losses"][1])
    assert all(torch.equal(runtime.adapter_state()[k], own[k]) for k in own)


def test_fedsa_keeps_local_B(runtime):
    own = runtime.adapter_state()
    incoming = {k: v + 1 for k, v in own.items()}
    runtime.trainer.settings.learning_rate = 0.0  # isolate what was loaded
    try:
        out = site_tasks.handle(runtime, "train", FLModel(params=incoming, meta={"load": "lora_A"}))
    finally:
        runtime.trainer.settings.learning_rate = 1e-2
    for k in own:
        expected = incoming[k] if is_lora_A(k) else own[k]
        assert torch.allclose(out.params[k], expected), k


def test_a_site_with_another_rank_takes_the_global_adapter(site_folder, runtime):
    other = make_runtime(site_folder, rank=2)
    global_state = runtime.adapter_state()  # rank 4
    out = site_tasks.handle(other, "train", FLModel(params=global_state))
    assert all(v.shape[0] == 2 for k, v in out.params.items() if is_lora_A(k))
    assert out.meta["rank"] == 2
    # asked to send the change: across ranks there is none, so it sends its adapter whole
    out = site_tasks.handle(other, "train", FLModel(params=global_state), send="diff")
    assert out.params_type == ParamsType.FULL
    assert all(torch.equal(out.params[k], v) for k, v in other.adapter_state().items())


def test_missing_or_empty_site_data_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDMED_DATA", raising=False)
    with pytest.raises(InputError, match="does not exist"):
        load_site_data(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "train.jsonl").write_text("")
    with pytest.raises(InputError, match="no training documents"):
        load_site_data(tmp_path / "empty")
    with pytest.raises(InputError, match="FEDMED_DATA"):
        site_data_folder("", "site-x")
