"""`fedmed train-local`: single-site and centralised baselines with the sites' trainer."""

import json

import torch

from fedmed_components.cli import main
from fedmed_components.data.document import write_jsonl
from fedmed_components.data.synth import demo_corpus
from fedmed_components.model.modeling import LoraSettings, initial_adapter_from_config, load_adapter_folder


def test_pooled_baseline_writes_a_trained_peft_adapter(tmp_path, tiny_model_path):
    folders = []
    for site, docs in demo_corpus(n_sites=2, docs_per_site=3, seed=2).items():
        write_jsonl(docs[:2], tmp_path / site / "train.jsonl")
        write_jsonl(docs[2:], tmp_path / site / "val.jsonl")
        folders.append(str(tmp_path / site))
    out = tmp_path / "central"
    args = [
        "train-local",
        "--model",
        "tiny",
        "--quantize",
        "none",
        "--data",
        ",".join(folders),
        "--rank",
        "4",
        "--alpha",
        "8",
        "--local-steps",
        "2",
        "--rounds",
        "2",
        "--max-length",
        "160",
        "--lr",
        "1e-2",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    state, settings, meta = load_adapter_folder(out)
    assert settings.r == 4 and meta["data"] == folders
    initial = initial_adapter_from_config(tiny_model_path, LoraSettings(r=4, alpha=8))
    assert state.keys() == initial.keys()
    assert any(not torch.equal(state[k], initial[k]) for k in state)
    log = json.loads((out / "train_log.json").read_text())
    assert [r["round"] for r in log] == [0, 1] and all(r["steps"] == 2 for r in log)
