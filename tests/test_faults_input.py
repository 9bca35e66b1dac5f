"""Bad data at a site: malformed BRAT, an empty data folder, a missing path, non-UTF-8
text. Strict (default): the site fails with a message naming file (and line); it tells
the server so with every answer, the server logs site and reason and the job goes on
with the other sites, or ends with the reasons. --lenient-input: bad items are skipped,
counted, and the count reaches the server's log."""

import json
import os

import pytest
import torch
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from fedmed_components.brat import write_brat_dir
from fedmed_components.document import InputError, write_jsonl
from fedmed_components.flare import site_tasks
from fedmed_components.flare.aggregators import FedMedLoRAAggregator
from fedmed_components.site import load_site_data, site_data_folder


def _docs(n=5, seed=1):
    from fedmed_components.synth import demo_corpus

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


@pytest.mark.parametrize("site, message", [
    ("site-brat", r"\.ann:\d+: malformed line"),
    ("site-empty", r"site-empty: site has no training documents"),
    ("site-missing", r"site-missing: site data folder does not exist"),
    ("site-latin1", r"train\.jsonl:2: not UTF-8 text"),
])
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
    assert agg.accept_model(FLModel(params=answer.params, params_type=ParamsType.FULL, meta={**answer.meta, "client_name": "site-brat"})) is False
    (rejection,) = agg.rejections
    assert rejection.site == "site-brat" and faults["site-brat"] in rejection.reason and "malformed line" in rejection.reason
