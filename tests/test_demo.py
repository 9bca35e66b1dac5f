"""`fedmed demo` end to end: synthetic sites -> FLARE simulator -> scored global adapter."""

import json

import pytest

from fedmed_components.cli import main

pytestmark = pytest.mark.slow


def _run_demo(tmp_path, *args):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *args]) == 0
    result = json.loads((out / "demo_result.json").read_text())
    assert (out / "global_adapter_store" / "global" / "adapter_model.safetensors").is_file()
    assert (out / "global_adapter_store" / "global" / "adapter_config.json").is_file()
    return result


def test_tiny_demo_runs_end_to_end(tmp_path, capsys):
    result = _run_demo(tmp_path, "--model", "tiny")
    assert result["sites"] == ["site-1", "site-2", "site-3"]
    assert result["last_round"]["current_round"] == result["rounds"] - 1
    for key in ("before", "after"):
        assert set(result[key]) == {"documents", "entities", "relations", "parse_failures"}
    # the simulator's progress as it runs: each round's start and each site's losses
    printed = capsys.readouterr().out
    for rnd in range(1, result["rounds"] + 1):
        assert f"round {rnd}/{result['rounds']} started" in printed, printed
        assert all(f"round {rnd}/{result['rounds']} {site}: train loss " in printed for site in result["sites"]), printed


def test_smollm2_demo_trained_adapter_beats_untrained(tmp_path):
    pytest.importorskip("gguf")
    result = _run_demo(tmp_path)
    before, after = result["before"]["entities"], result["after"]["entities"]
    assert after["strict"]["f1"] > before["strict"]["f1"]
    assert after["lenient"]["f1"] > before["lenient"]["f1"]
