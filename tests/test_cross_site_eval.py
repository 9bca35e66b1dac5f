"""Cross-site evaluation: each site scores the final global adapter on its own test notes,
the server writes one table beside the adapter, `fedmed results` prints it."""

import copy
import json

import pytest
import torch
from nvflare.app_common.abstract.fl_model import FLModel

from fedmed_components.cli import main
from fedmed_components.data.document import read_jsonl, write_jsonl
from fedmed_components.flare import site_tasks
from fedmed_components.flare.controller import cross_site_table, table_lines
from fedmed_components.flare.wire import CROSS_SITE_EVAL_FILE, EVAL_RESULT, EVALUATE_TASK
from fedmed_components.model.modeling import LoraSettings
from fedmed_components.model.site import SiteConfig, SiteRuntime
from fedmed_components.model.training import TrainSettings
from fedmed_components.task.metrics import score_documents


@pytest.fixture(scope="module")
def site_folders(tmp_path_factory):
    """Three folders of one site's notes: train/val/test, train/val, train alone. The test
    notes are three sentences with linked modifiers (generation with the tiny model is slow)."""
    from fedmed_components.data.synth import generate_site_corpus
    from fedmed_components.runs.experiment.data import sentence_documents

    root = tmp_path_factory.mktemp("eval_site")
    docs = generate_site_corpus("site-a", 5, seed=3, style="general_medicine")
    test = [s for s in sentence_documents(docs[4]) if s.relations][:3]
    for name in ("full", "no_test", "train_only"):
        write_jsonl(docs[:3], root / name / "train.jsonl")
        if name != "train_only":
            write_jsonl(docs[3:4], root / name / "val.jsonl")
        if name == "full":
            write_jsonl(test, root / name / "test.jsonl")
    return root


@pytest.fixture(scope="module")
def runtime(site_folders, tiny_model_path):
    config = SiteConfig(
        model="tiny",
        quantize="none",
        device="cpu",
        lora=LoraSettings(r=4, alpha=8),
        train=TrainSettings(max_steps=1, batch_size=4, max_length=160, learning_rate=1e-2),
        max_val_examples=6,
    )
    runtime = SiteRuntime(config, site_name="site-a")
    runtime.load_data(site_folders / "full")
    runtime.train(None)  # the site's own adapter: trained, so it differs from the global one
    return runtime


def _other_adapter(state: dict, seed: int = 7) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in state.items()}


def test_evaluate_task_scores_the_global_adapter_and_restores_the_sites_own(runtime, site_folders, monkeypatch):
    own = runtime.adapter_state()
    global_state = _other_adapter(own)
    seen = {}
    real_predict = runtime.task.predict

    def spy(model, tokenizer, docs, **kw):
        seen["adapter"] = runtime.adapter_state()  # what the model holds while it predicts
        seen["docs"] = list(docs)
        seen["preds"], seen["report"] = real_predict(model, tokenizer, docs, **kw)
        return seen["preds"], seen["report"]

    monkeypatch.setattr(runtime.task, "predict", spy)
    was_training = runtime.model.training
    out = site_tasks.handle(runtime, EVALUATE_TASK, FLModel(params=global_state, current_round=2))

    assert all(torch.equal(seen["adapter"][k], global_state[k]) for k in global_state), "predicted with another adapter"
    test_docs = read_jsonl(site_folders / "full" / "test.jsonl")
    assert [d.id for d in seen["docs"]] == [d.id for d in test_docs]
    expected = score_documents(test_docs, seen["preds"], parse_failures=seen["report"].parse_failures)
    entry = out.meta[EVAL_RESULT]
    assert entry["split"] == "test" and entry["num_docs"] == len(test_docs) == 3
    assert entry["entities"] == expected["entities"]
    assert entry["modifiers"] == expected["relations"]  # the synthetic notes link modifiers
    assert entry["parse_failures"] == expected["parse_failures"]
    assert out.metrics["entities/strict/f1"] == expected["entities"]["strict"]["f1"]
    assert out.metrics["modifiers/lenient/recall"] == expected["relations"]["lenient"]["recall"]
    assert out.metrics["num_docs"] == 3.0
    assert not out.params, "an evaluation answer carries no adapter"
    after = runtime.adapter_state()
    assert after.keys() == own.keys() and all(torch.equal(after[k], own[k]) for k in own), "own adapter not restored bit for bit"
    assert runtime.model.training == was_training


def test_scores_are_those_of_the_predictions(runtime, monkeypatch):
    """Predictions = gold less one entity: precision 1, recall (n-1)/n, whatever the model."""
    gold = runtime.test_docs
    preds = copy.deepcopy(gold)
    dropped = next(d for d in preds if d.entities)
    gone = dropped.entities.pop()
    dropped.relations = [r for r in dropped.relations if gone.id not in (r.head, r.tail)]
    n = sum(len(d.entities) for d in gold)
    monkeypatch.setattr(runtime.task, "predict", lambda *a, **kw: (copy.deepcopy(preds), type("R", (), {"parse_failures": 3})()))
    entry = site_tasks.evaluate(runtime, FLModel(params=None, current_round=0)).meta[EVAL_RESULT]
    strict = entry["entities"]["strict"]
    assert (strict["precision"], strict["recall"], strict["tp"], strict["fn"]) == (1.0, pytest.approx((n - 1) / n), n - 1, 1)
    assert entry["parse_failures"] == 3


def test_without_test_notes_the_validation_notes_are_scored_and_without_any_a_clear_entry(runtime, site_folders, monkeypatch):
    monkeypatch.setattr(
        runtime.task,
        "predict",
        lambda m, t, docs, **kw: ([type(d)(id=d.id, text=d.text) for d in docs], type("R", (), {"parse_failures": 0})()),
    )
    try:
        runtime.load_data(site_folders / "no_test")
        entry = site_tasks.evaluate(runtime, FLModel(params=None)).meta[EVAL_RESULT]
        val = read_jsonl(site_folders / "no_test" / "val.jsonl")
        assert entry["split"] == "val" and entry["num_docs"] == len(val) == 1
        assert entry["entities"]["strict"]["fn"] == sum(len(d.entities) for d in val)

        monkeypatch.setattr(runtime.config, "val_fraction", 0.0)
        runtime.load_data(site_folders / "train_only")
        out = site_tasks.evaluate(runtime, FLModel(params=None))
        assert out.meta[EVAL_RESULT] == {"split": None, "num_docs": 0, "error": "no test documents (no test.jsonl and no validation notes)"}
        assert out.metrics == {"num_docs": 0.0}
    finally:
        runtime.load_data(site_folders / "full")


def test_a_failing_evaluation_is_answered_not_raised(runtime, monkeypatch):
    own = runtime.adapter_state()

    def broken(*a, **kw):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(runtime.task, "predict", broken)
    out = site_tasks.handle(runtime, EVALUATE_TASK, FLModel(params=_other_adapter(own)))
    assert "evaluation failed: RuntimeError: CUDA out of memory" in out.meta["site_error"]
    assert all(torch.equal(runtime.adapter_state()[k], own[k]) for k in own)


# ------------------------------------------------------------------ the server's table


def _entry(f1: float, split: str = "test", docs: int = 3) -> dict:
    scores = {"precision": f1, "recall": f1, "f1": f1, "tp": 1, "fp": 1, "fn": 1}
    return {"split": split, "num_docs": docs, "entities": {"strict": scores, "lenient": scores}, "modifiers": None, "parse_failures": 0}


def test_table_lists_every_site_scored_or_missing_with_its_reason():
    answers = {
        "site-1": {"site": "site-1", EVAL_RESULT: _entry(0.5)},
        "site-2": {"site": "site-2", "site_error": "site has no training documents"},
        "site-3": {"site": "site-3", EVAL_RESULT: {"split": None, "num_docs": 0, "error": "no test documents (...)"}},
    }
    table = cross_site_table(4, "/store/global", ["site-1", "site-2", "site-3", "site-4"], answers, {"site-5": "gone"}, 60)
    assert table["round"] == 4 and table["adapter"] == "/store/global"
    assert table["sites"] == {"site-1": _entry(0.5)}
    assert table["missing"] == {
        "site-2": "site has no training documents",
        "site-3": "no test documents (...)",
        "site-4": "no scores within eval_timeout (60 s): timed out or failed",
        "site-5": "gone",
    }
    lines = table_lines(table)
    assert lines[0] == "cross-site eval site-1: 3 test docs, entity F1 strict 0.500 lenient 0.500, modifier F1 -"
    assert len(lines) == 5 and lines[-1] == "cross-site eval site-5: missing (gone)"


def test_controller_asks_every_connected_site_but_a_gone_one_and_writes_the_table_beside_the_adapter(tmp_path):
    """evaluate_global with FLARE's engine, persistor and broadcast stood in for."""
    from types import SimpleNamespace

    from nvflare.apis.fl_context import FLContext

    from fedmed_components.flare.controller import FedMedController

    ctrl = FedMedController(num_rounds=3, eval_timeout=5)
    ctrl.fl_ctx = FLContext()
    ctrl.engine = SimpleNamespace(get_clients=lambda: [SimpleNamespace(name=f"site-{i}") for i in (3, 1, 4, 2)])
    store = tmp_path / "store"
    store.mkdir()
    ctrl.persistor = SimpleNamespace(root=lambda fl_ctx: store)
    ctrl._silent = {"site-4": 2}  # sent round 2's task, never answered
    params = {"a": torch.ones(2)}
    sent = {}

    def broadcast_model(**kw):
        sent.update(kw, policy=ctrl._ignore_result_error)
        return [
            FLModel(metrics={"num_docs": 3.0}, meta={"client_name": "site-1", "site": "site-1", EVAL_RESULT: _entry(0.5)}),
            FLModel(params={}, metrics={"failed": 1.0}, meta={"client_name": "site-2", "site_error": "bad data"}),
        ]

    ctrl.broadcast_model = broadcast_model
    table = ctrl.evaluate_global(params, 2)
    assert sent["task_name"] == EVALUATE_TASK and sent["targets"] == ["site-1", "site-2", "site-3"]
    assert sent["data"].params is params and sent["data"].current_round == 2 and sent["timeout"] == 5
    assert sent["policy"] is True and ctrl._ignore_result_error is None, "error replies tolerated during, policy restored after"
    assert json.loads((store / CROSS_SITE_EVAL_FILE).read_text()) == table
    assert table["adapter"] == str(store / "global") and table["sites"] == {"site-1": _entry(0.5)}
    assert table["missing"] == {
        "site-2": "bad data",
        "site-3": "no scores within eval_timeout (5 s): timed out or failed",
        "site-4": "no answer to round 2's task; not asked",
    }


# ------------------------------------------------------------------ fedmed results


def test_results_prints_the_table_from_a_file_or_a_folder_above_it(tmp_path, capsys):
    table = {
        "round": 2,
        "adapter": "/x/global",
        "sites": {"site-b": _entry(0.25, split="val", docs=7), "site-a": {**_entry(0.5), "modifiers": _entry(0.125)["entities"]}},
        "missing": {"site-c": "no scores within eval_timeout (60 s): timed out or failed"},
    }
    store = tmp_path / "ws" / "server" / "simulate_job" / "fedmed_adapters"
    store.mkdir(parents=True)
    (store / CROSS_SITE_EVAL_FILE).write_text(json.dumps(table))
    for path in (store / CROSS_SITE_EVAL_FILE, tmp_path / "ws"):
        assert main(["results", str(path)]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[0] == "cross-site evaluation of round 2's global adapter (/x/global)"
        rows = {line.split()[0]: line.split() for line in lines[3:]}
        assert rows["site-a"] == ["site-a", "test", "3", "0.500", "0.500", "0.125", "0.125"]
        assert rows["site-b"] == ["site-b", "val", "7", "0.250", "0.250", "-", "-"]
        assert rows["site-c"][:2] == ["site-c", "missing:"]
        assert [line.split()[0] for line in lines[3:]] == ["site-a", "site-b", "site-c"]
    assert main(["results", str(tmp_path / "ws"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == table


def test_results_errors_in_one_line_where_there_is_no_table(tmp_path, capsys):
    (tmp_path / "empty" / "global").mkdir(parents=True)
    assert main(["results", str(tmp_path / "empty")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and f"no {CROSS_SITE_EVAL_FILE} here or below" in captured.err
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    assert main(["results", str(bad)]) == 2
    assert "not a cross-site evaluation table" in capsys.readouterr().err
    assert main(["results", str(tmp_path / "nope")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


# ------------------------------------------------------------------ a FLARE job, end to end


@pytest.mark.slow
def test_simulator_job_ends_with_a_table_of_every_site(tmp_path, tiny_model_path, capsys, no_leftovers):
    """Two sites score the final adapter on their test.jsonl; a third, whose data folder
    is empty, answers every task with its reason and is listed as missing."""
    from fedmed_components.data.synth import demo_corpus
    from fedmed_components.flare.job import JobSpec, run_simulator
    from fedmed_components.flare.recipe import export_job

    sites = ["site-1", "site-2"]
    data = tmp_path / "data"
    test_counts = {}
    for (site, (_, docs)), n_test in zip(zip(sites, sorted(demo_corpus(n_sites=2, docs_per_site=6, seed=1).items())), (1, 2)):
        write_jsonl(docs[:3], data / site / "train.jsonl")
        write_jsonl(docs[3:4], data / site / "val.jsonl")
        write_jsonl(docs[4 : 4 + n_test], data / site / "test.jsonl")
        test_counts[site] = n_test
    (data / "site-3").mkdir()
    spec = JobSpec(
        name="xsite",
        model="tiny",
        sites=[*sites, "site-3"],
        num_rounds=1,
        min_clients=2,
        local_steps=2,
        batch_size=4,
        max_length=160,
        rank=4,
        alpha=8,
        quantize="none",
        data=str(data),
        train_timeout=240,
        eval_timeout=240,
        tensorboard=False,
        extra_site_args="--max-val-examples 4",
    )  # output_dir: the default, relative, so the store lies inside the workspace
    workspace = run_simulator(export_job(spec, tmp_path / "jobs"), tmp_path / "ws", spec.sites, timeout=420)

    found = list(workspace.rglob(CROSS_SITE_EVAL_FILE))
    assert len(found) == 1
    store = found[0].parent
    assert (store / "global" / "adapter_config.json").exists(), "the table lies beside the global adapter"
    table = json.loads(found[0].read_text())
    assert table["round"] == 0 and table["adapter"] == str(store / "global")
    assert list(table["missing"]) == ["site-3"] and "site has no training documents" in table["missing"]["site-3"]
    assert sorted(table["sites"]) == sites
    for site, entry in table["sites"].items():
        assert entry["split"] == "test" and entry["num_docs"] == test_counts[site]
        for group in ("entities", "modifiers"):
            for mode in ("strict", "lenient"):
                assert all(0.0 <= entry[group][mode][k] <= 1.0 for k in ("precision", "recall", "f1"))
        assert entry["entities"]["strict"]["fn"] + entry["entities"]["strict"]["tp"] == sum(
            len(d.entities) for d in read_jsonl(data / site / "test.jsonl")
        )
    log = "\n".join(p.read_text(errors="replace") for p in workspace.rglob("log.txt"))
    assert all(f"cross-site eval {site}: {test_counts[site]} test docs" in log for site in sites)

    capsys.readouterr()
    assert main(["results", str(workspace)]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("site-")]
    assert [(r[0], r[1], r[2]) for r in rows[:2]] == [(s, "test", str(test_counts[s])) for s in sites]
    assert rows[2][:2] == ["site-3", "missing:"]
