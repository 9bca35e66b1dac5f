"""MLflow beside TensorBoard: FLARE's MLflowReceiver on the server gets every site's scalars."""

import json
from pathlib import Path

import pytest

from fedmed_components.cli import main
from fedmed_components.flare.job import JobSpec, run_simulator
from fedmed_components.flare.recipe import export_job

REPO = Path(__file__).resolve().parents[1]
SITES = ["site-1", "site-2"]
RECEIVER = "nvflare.app_opt.tracking.mlflow.mlflow_receiver.MLflowReceiver"


def _server_components(job: Path) -> dict:
    config = json.loads((job / "app" / "config" / "config_fed_server.json").read_text())
    return {c["id"]: c for c in config["components"]}


def test_export_with_mlflow_uri_adds_the_receiver(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    argv = ["job", "export", "--algorithm", "fed_prox", "--mlflow-uri", uri, "--mlflow-experiment", "trial", "--out", str(tmp_path)]
    assert main(argv) == 0
    components = _server_components(tmp_path / "fed_prox")
    receiver = components["mlflow_receiver"]
    assert receiver["path"] == RECEIVER
    assert receiver["args"]["tracking_uri"] == uri
    kw = receiver["args"]["kw_args"]
    assert (kw["experiment_name"], kw["run_name"]) == ("trial", "fed_prox")
    assert kw["run_tags"] == {"algorithm": "fed_prox", "model": JobSpec().model}
    assert receiver["args"]["events"] == ["fed.analytix_log_stats"]  # what the sites forward (ConvertToFedEvent)
    assert components["tb_receiver"]["path"].endswith("TBAnalyticsReceiver")  # TensorBoard stays


def test_no_receiver_without_mlflow_uri(tmp_path):
    assert main(["job", "export", "--out", str(tmp_path)]) == 0
    assert "mlflow_receiver" not in _server_components(tmp_path / "fed_medlora")
    for job in (REPO / "jobs").iterdir():
        (server_config,) = job.glob("app*/config/config_fed_server.json")  # app/ or, per-site jobs, app_server/
        assert "mlflow" not in server_config.read_text(), job.name


def test_mlflow_uri_must_be_a_uri_and_needs_the_sites_scalars(tmp_path, capsys):
    assert main(["job", "export", "--mlflow-uri", "mlruns", "--out", str(tmp_path)]) == 2
    assert "is not a URI" in capsys.readouterr().err
    with pytest.raises(ValueError, match="keep tensorboard on"):
        export_job(JobSpec(tensorboard=False, mlflow_uri=f"sqlite:///{tmp_path}/m.db"), tmp_path)


@pytest.mark.slow
def test_simulated_job_logs_every_sites_scalars_to_mlflow(tmp_path, write_site_data, tiny_model_path, no_leftovers):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec = JobSpec(
        name="tracked",
        model="tiny",
        sites=SITES,
        num_rounds=2,
        min_clients=2,
        local_steps=3,
        batch_size=4,
        max_length=192,
        learning_rate=5e-3,
        rank=4,
        alpha=8,
        data=str(write_site_data(SITES)),
        quantize="none",
        output_dir=str(tmp_path / "store"),
        extra_site_args="--max-val-examples 8 --dp-sgd noise=1.0,clip=1.0,record=note",
        mlflow_uri=uri,
        mlflow_experiment="fedmed-test",
    )
    workspace = run_simulator(export_job(spec, tmp_path / "jobs"), tmp_path / "ws", SITES, timeout=420)

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("fedmed-test")
    runs = {}
    for run in client.search_runs([experiment.experiment_id]):
        site = next(s for s in SITES if run.info.run_name.startswith(f"{s}-"))
        runs[site] = run
    assert sorted(runs) == SITES  # one run per site, named <site>-<job id>-<job name>-<run name>
    per_round = ["round/train_loss", "round/val_loss", "round/tokens_per_s", "round/supervised_tokens", "round/dp_epsilon"]
    for site, run in runs.items():
        assert run.info.status == "FINISHED", site
        assert run.info.run_name.endswith("-tracked-tracked"), run.info.run_name
        assert {"algorithm": "fed_medlora", "model": "tiny", "run_name": run.info.run_name}.items() <= run.data.tags.items()
        assert set(run.data.metrics) == {"train/loss", "train/lr", *per_round}, site
        for key in per_round:  # one value per round, step = round
            assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0, 1], (site, key)
        # per step across rounds: 2 rounds x 3 local steps
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == list(range(1, 7)), site
        epsilon = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "round/dp_epsilon"), key=lambda m: m.step)]
        assert 0 < epsilon[0] < epsilon[1], site
    # TensorBoard as before
    assert sorted(p.name for p in workspace.glob("server/*/tb_events/*") if p.is_dir()) == SITES
