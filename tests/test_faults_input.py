"""Bad data at a site: malformed BRAT, an empty data folder, a missing path, non-UTF-8
text. Strict (default): the site fails with a message naming file (and line); it tells
the server so with every answer, the server logs site and reason and the job goes on
with the other sites, or ends with the reasons. --lenient-input: bad items are skipped,
counted, and the count reaches the server's log."""

import json
import os
import re

import pytest
import torch
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from fedmed_components.data.brat import write_brat_dir
from fedmed_components.data.document import InputError, write_jsonl
from fedmed_components.flare import site_tasks
from fedmed_components.flare.aggregators import FedMedLoRAAggregator
from fedmed_components.model.site import load_site_data, site_data_folder


def _docs(n=5, seed=1):
    from fedmed_components.data.synth import demo_corpus

    return sorted(demo_corpus(n_sites=1, docs_per_site=n, seed=seed).values())[0]


def make_sites(root, good=("site-1",)):
    """One folder per fault under root; returns {site: fault}. Good sites get JSONL notes."""
    docs = _docs()
    for site in good:
        write_jsonl(docs[:4], root / site / "train.jsonl")
        write_jsonl(docs[4:], root / site / "val.jsonl")
    # malformed BRAT: a valid note whose .ann has a line that is not BRAT
    brat = write_brat_dir(docs[:3], root / "site-brat")
    ann = sorted(brat.glob("*.ann"))[1]
    ann.write_text(ann.read_text() + "this is not brat\n")
    (root / "site-empty").mkdir(parents=True)
    os.symlink(root / "mount-that-is-gone", root / "site-missing")  # the site's data mount is gone
    # non-UTF-8: a Latin-1 byte in the second note's line
    write_jsonl(docs[:3], root / "site-latin1" / "train.jsonl")
    lines = (root / "site-latin1" / "train.jsonl").read_bytes().split(b"\n")
    lines[1] = lines[1].replace(b'"text": "', b'"text": "caf\xe9 ', 1)
    (root / "site-latin1" / "train.jsonl").write_bytes(b"\n".join(lines))
    return {"site-brat": str(ann), "site-empty": "site-empty", "site-missing": "site-missing", "site-latin1": "train.jsonl:2"}


@pytest.fixture
def sites(tmp_path):
    return tmp_path / "data", make_sites(tmp_path / "data")


@pytest.mark.parametrize(
    "site, message",
    [
        ("site-brat", r"\.ann:\d+: malformed line"),
        ("site-empty", r"site-empty: site has no training documents"),
        ("site-missing", r"site-missing: site data folder does not exist"),
        ("site-latin1", r"train\.jsonl:2: not UTF-8 text"),
    ],
)
def test_strict_site_fails_naming_the_file(sites, site, message):
    root, _ = sites
    with pytest.raises(InputError, match=message):
        load_site_data(site_data_folder(str(root), site))


@pytest.mark.parametrize("site", ["site-brat", "site-latin1"])
def test_lenient_site_skips_bad_items_with_a_count(sites, site):
    root, _ = sites
    data = load_site_data(site_data_folder(str(root), site), lenient=True)
    assert len(data.train) + len(data.val) == (3 if site == "site-brat" else 2)
    assert "skipped 1 item(s)" in data.skipped and ("malformed line" in data.skipped or "not UTF-8" in data.skipped)
    assert str(root / site) in data.skipped


def test_server_rejects_a_failed_site_naming_site_and_file(sites):
    root, faults = sites
    with pytest.raises(InputError) as err:
        load_site_data(site_data_folder(str(root), "site-brat"))
    answer = site_tasks.failed("site-brat", err.value)
    reference = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 4)}
    agg = FedMedLoRAAggregator()
    agg.begin_round(reference, 0)
    assert (
        agg.accept_model(FLModel(params=answer.params, params_type=ParamsType.FULL, meta={**answer.meta, "client_name": "site-brat"}))
        is False
    )
    (rejection,) = agg.rejections
    assert rejection.site == "site-brat" and faults["site-brat"] in rejection.reason and "malformed line" in rejection.reason


def _job(tmp_path, root, sites, **spec):
    from fedmed_components.flare.job import JobSpec
    from fedmed_components.flare.recipe import export_job

    spec = JobSpec(
        **{
            "name": "bad_data",
            "model": "tiny",
            "sites": sites,
            "num_rounds": 2,
            "min_clients": 1,
            "local_steps": 2,
            "batch_size": 4,
            "max_length": 128,
            "rank": 4,
            "alpha": 8,
            "quantize": "none",
            "data": str(root),
            "output_dir": str(tmp_path / "store"),
            "train_timeout": 240,
            "extra_site_args": "--max-val-examples 4",
            **spec,
        }
    )
    return export_job(spec, tmp_path / "jobs")


def _server_log(workspace) -> str:
    return next(workspace.rglob("server/**/log.txt")).read_text(errors="replace")


@pytest.mark.slow
def test_live_job_goes_on_without_the_sites_with_bad_data(tmp_path, sites, tiny_model_path, no_leftovers):
    from fedmed_components.flare.job import run_simulator

    root, faults = sites
    names = ["site-1", *faults]
    workspace = run_simulator(_job(tmp_path, root, names), tmp_path / "ws", names, timeout=420)
    log = _server_log(workspace)
    history = json.loads((tmp_path / "store" / "state.json").read_text())["history"]
    assert [h["sites"] for h in history] == [["site-1"], ["site-1"]]
    for rnd in range(2):
        for site, where in faults.items():
            (reason,) = [r["reason"] for r in history[rnd]["rejected"] if r["site"] == site]
            assert reason.startswith("site failed its task: ") and where in reason, (site, reason)
            assert f"rejected update from {site} in round {rnd}: site failed its task: " in log
    assert "finished 2 rounds" in log


@pytest.mark.slow
def test_live_job_with_only_bad_sites_ends_with_the_reasons(tmp_path, sites, tiny_model_path, no_leftovers):
    from fedmed_components.flare.job import run_simulator

    root, faults = sites
    names = ["site-brat", "site-latin1"]
    try:
        workspace = run_simulator(_job(tmp_path, root, names, num_rounds=1), tmp_path / "ws", names, timeout=300)
    except RuntimeError:  # the simulator may report the aborted run with its exit status
        workspace = tmp_path / "ws"
    log = _server_log(workspace)
    (explanation,) = re.findall(r"round 0: only 0 valid updates.*", log)
    assert "fewer than min_clients=1" in explanation
    assert faults["site-brat"] in explanation and "malformed line" in explanation and "not UTF-8" in explanation
    assert not (tmp_path / "store" / "state.json").exists()


@pytest.mark.slow
def test_lenient_site_trains_and_its_skip_count_reaches_the_server_log(sites, tiny_model_path, caplog):
    """A real site runtime (tiny model) with --lenient-input on the malformed BRAT folder:
    it trains on the good notes, its answer carries the count, the aggregator logs it."""
    import logging

    from fedmed_components.model.site import SiteConfig, SiteRuntime
    from fedmed_components.model.training import TrainSettings

    root, faults = sites
    config = SiteConfig(
        model="tiny",
        quantize="none",
        lenient_input=True,
        max_val_examples=2,
        train=TrainSettings(max_steps=1, batch_size=2, max_length=128),
    )
    runtime = SiteRuntime(config, site_name="site-brat")
    runtime.load_data(site_data_folder(str(root), "site-brat"))
    answer = site_tasks.train(runtime, FLModel(params=None, current_round=0))
    assert "skipped 1 item(s)" in answer.meta["input_skipped"] and faults["site-brat"] in answer.meta["input_skipped"]
    agg = FedMedLoRAAggregator()
    agg.begin_round(runtime.adapter_state(), 0)
    with caplog.at_level(logging.WARNING):
        assert agg.accept_model(
            FLModel(params=answer.params, params_type=ParamsType.FULL, meta={**answer.meta, "client_name": "site-brat"})
        )
    assert any("site-brat skipped bad input (lenient): " in r.getMessage() and "malformed line" in r.getMessage() for r in caplog.records)
