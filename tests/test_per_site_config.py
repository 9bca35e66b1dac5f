"""Per-site configuration: `fedmed job export --site NAME:key=value,...` (issue #16, item 2).

Each hospital its own data, batch size, LoRA rank, device, quantisation: the job then has
one client app per site (FLARE names them app_<site>, meta.json deploys each to its site).
"""

import json
import re
import shlex
from pathlib import Path

import pytest

from fedmed_components.cli import main
from fedmed_components.flare.job import SITE_SCRIPT, JobSpec, run_simulator, site_options, with_site_overrides
from fedmed_components.flare.recipe import export_job

SITES = ["site-1", "site-2"]


def _export_spec(argv: list[str]) -> JobSpec:
    import argparse

    from fedmed_components.cli import build_parser
    from fedmed_components.commands.job import spec_from_args

    parser = build_parser()
    for name in ("job", "export"):
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    return spec_from_args(parser.parse_args(argv))


def _client_args(job: Path, app: str) -> list[str]:
    config = json.loads((job / app / "config" / "config_fed_client.json").read_text())
    return shlex.split(config["executors"][0]["executor"]["args"]["task_script_args"])


def _value(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def test_site_options_parse_into_the_spec():
    spec = _export_spec(
        [
            "--site",
            "site-1:batch_size=2,rank=4,device=cpu",
            "--site",
            "site-2:data=/data/b,quantize=none",
            "--site",
            "site-1:tasks=ner,modifier,dp_sgd=noise=1.0,clip=1.0,gradient_checkpointing=true",
        ]
    )
    assert spec.site_overrides == {
        "site-1": {
            "batch_size": "2",
            "rank": "4",
            "device": "cpu",
            "tasks": "ner,modifier",
            "dp_sgd": "noise=1.0,clip=1.0",
            "gradient_checkpointing": "true",
        },
        "site-2": {"data": "/data/b", "quantize": "none"},
    }
    one, two, common = (shlex.split(spec.site_args(site)) for site in (*SITES, None))
    assert (_value(one, "--batch-size"), _value(one, "--rank"), _value(one, "--device")) == ("2", "4", "cpu")
    assert _value(one, "--dp-sgd") == "noise=1.0,clip=1.0" and "--gradient-checkpointing" in one
    assert (_value(two, "--data"), _value(two, "--quantize"), _value(two, "--rank")) == ("/data/b", "none", str(spec.rank))
    assert one.count("--rank") == 1 and "--device" not in common and "--data" not in common
    assert _export_spec([]).site_overrides == {}


def test_overrides_replace_the_same_option_once():
    args = ["--rank", "16", "--data", "/a", "--max-val-examples", "8", "--data=/b", "--gradient-checkpointing"]
    out = with_site_overrides(args, {"data": "/c", "gradient_checkpointing": "false", "device": "cuda:1"})
    assert out == ["--rank", "16", "--data", "/c", "--max-val-examples", "8", "--device", "cuda:1"]
    # an option's value is never taken for an option: a path named like a flag stays a value
    assert with_site_overrides(["--data", "--rank", "--rank", "4"], {"rank": "8"}) == ["--data", "--rank", "--rank", "8"]


@pytest.mark.parametrize(
    "option, what",
    [
        ("site-3:rank=4", "site 'site-3' is not in --sites (site-1,site-2)"),
        ("site-1:rnak=4", "unknown key 'rnak'"),
        ("site-1:batch_size=2,rnak=4", "unknown key 'rnak'"),
        ("site-1:rank=four", "argument --rank: invalid int value: 'four'"),
        ("site-1:quantize=16bit", "argument --quantize: invalid choice: '16bit'"),
        ("site-1:lr=fast", "argument --lr: invalid float value: 'fast'"),
        ("site-1:model=gpt2", "model is the same at every site"),
        ("site-1:gradient_checkpointing=maybe", "gradient_checkpointing is a switch"),
        ("site-1", "expected NAME:key=value"),
        ("site-1:rank", "'rank' is not key=value"),
    ],
)
def test_bad_site_options_are_refused_naming_the_option(tmp_path, capsys, option, what):
    out = tmp_path / "out"
    assert main(["job", "export", "--site", "site-2:batch_size=2", "--site", option, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fedmed job export: error: --site {option}: ") and what in err, err
    assert "Traceback" not in err
    assert not out.exists(), "nothing is written"


def test_the_checking_parser_knows_every_option_of_the_site_script():
    """The per-site check must accept every option the site script itself takes: its --help."""
    import subprocess
    import sys

    shown = subprocess.run([sys.executable, str(SITE_SCRIPT), "--help"], capture_output=True, text=True, timeout=120, check=True).stdout
    script_options = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", shown)) - {"--help"}
    known = {opt for action in site_options().values() for opt in action.option_strings}
    assert {"--send", "--keep-local-adapters", "--dp-sgd", "--rank"} <= script_options
    assert script_options <= known, script_options - known


def test_a_per_site_job_has_one_client_app_per_site(tmp_path, capsys):
    from fedmed_components.flare.job_check import check_job_folder

    argv = ["job", "export", "--algorithm", "fed_exact_lora", "--name", "per_site", "--out", str(tmp_path)]
    argv += ["--site", "site-1:batch_size=2,rank=4,device=cpu", "--site", "site-2:data=/data/b,quantize=none"]
    assert main(argv) == 0
    job = tmp_path / "per_site"
    meta = json.loads((job / "meta.json").read_text())
    assert meta["deploy_map"] == {"app_server": ["server"], "app_site-1": ["site-1"], "app_site-2": ["site-2"]}
    assert meta["scope"] == "clinical"
    assert sorted(p.name for p in job.iterdir()) == ["app_server", "app_site-1", "app_site-2", "job.py", "meta.json"]
    one, two = _client_args(job, "app_site-1"), _client_args(job, "app_site-2")
    assert one != two
    assert (_value(one, "--batch-size"), _value(one, "--rank"), _value(one, "--device")) == ("2", "4", "cpu")
    assert (_value(two, "--batch-size"), _value(two, "--rank"), _value(two, "--data"), _value(two, "--quantize")) == (
        "4",
        "16",
        "/data/b",
        "none",
    )
    for app in ("app_site-1", "app_site-2"):  # each app is complete: the site script, the TensorBoard relay
        assert (job / app / "custom" / "fedmed_site.py").is_file()
        config = json.loads((job / app / "config" / "config_fed_client.json").read_text())
        assert [c["id"] for c in config["components"]] == ["event_to_fed"]
    assert not list(job.rglob("fedmed_components"))
    server = json.loads((job / "app_server" / "config" / "config_fed_server.json").read_text())
    assert {c["id"] for c in server["components"]} >= {"persistor", "aggregator"}
    check_job_folder(job)
    assert "warning" not in capsys.readouterr().err  # fed_exact_lora takes mixed ranks

    # with another algorithm a site rank other than the job's is exported, with a warning
    assert main(["job", "export", "--site", "site-1:rank=4", "--out", str(tmp_path / "medlora")]) == 0
    assert "site-1 trains rank 4, the job 16: fed_medlora's screening rejects" in capsys.readouterr().err


def test_site_overrides_outside_the_sites_are_refused_by_the_builder(tmp_path):
    with pytest.raises(ValueError, match="site 'site-9' is not one of the job's sites"):
        export_job(JobSpec(site_overrides={"site-9": {"rank": "4"}}), tmp_path)
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_two_sites_train_with_their_own_settings(tmp_path, write_site_data, tiny_model_path, no_leftovers):
    """2 sites x 1 round, fed_exact_lora: site-1 rank 4 / batch 2 on the CPU, site-2 rank 8 /
    batch 4 on its own data folder; each site logs what it got, the server aggregates both."""
    from fedmed_components.model.modeling import load_adapter_folder

    data = write_site_data(SITES)
    spec = JobSpec(
        name="per_site",
        algorithm="fed_exact_lora",
        model="tiny",
        sites=SITES,
        num_rounds=1,
        min_clients=2,
        local_steps=2,
        batch_size=4,
        max_length=192,
        learning_rate=5e-3,
        rank=8,
        alpha=16,
        data=str(data),
        quantize="none",
        output_dir=str(tmp_path / "store"),
        extra_site_args="--max-val-examples 4",
        site_overrides={
            "site-1": {"batch_size": "2", "rank": "4", "device": "cpu"},
            "site-2": {"batch_size": "4", "rank": "8", "data": str(data / "site-2")},
        },
    )
    job = export_job(spec, tmp_path / "jobs")
    workspace = run_simulator(job, tmp_path / "ws", SITES, timeout=360)

    site_log = {site: (workspace / site / "log.txt").read_text(errors="replace") for site in SITES}
    settings_line = {site: re.search(rf"{site} settings: (.*)$", site_log[site], re.M) for site in SITES}
    assert all(settings_line.values()), "a site did not log its settings"
    got = {site: dict(item.split(" ", 1) for item in match[1].split(", ")) for site, match in settings_line.items()}
    shared = {"model": "tiny", "alpha": "16", "lr": "0.005", "max_length": "192", "local_steps": "2", "quantize": "none"}
    assert got["site-1"].items() >= {**shared, "rank": "4", "batch_size": "2", "data": str(data)}.items()
    assert got["site-2"].items() >= {**shared, "rank": "8", "batch_size": "4", "data": str(data / "site-2")}.items()
    assert got["site-1"]["device"] == "cpu"

    server_log = "\n".join(p.read_text(errors="replace") for p in workspace.rglob("log.txt"))
    assert "exact aggregation: residual" in server_log
    assert all(f"accepted update from {site}" in server_log for site in SITES)
    state, settings, meta = load_adapter_folder(tmp_path / "store" / "global")
    assert sorted(meta["sites"]) == SITES and meta["current_round"] == 0
    assert {v.shape[0] for k, v in state.items() if "lora_A" in k} == {8}  # the job's rank, from ranks 4 and 8
