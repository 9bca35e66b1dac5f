"""Per-site TensorBoard scalars through FLARE's tracking, and the server side that collects them.

A site writes with ``nvflare.client.tracking.SummaryWriter`` (wrapped by `SiteTracker`);
the Client API fires each record as an analytics event, `ConvertToFedEvent` on the
client forwards it to the server, and `TBAnalyticsReceiver` writes one TensorBoard run
per site under ``<server run dir>/tb_events/<site>/``: ``tensorboard --logdir`` on that
folder shows every site side by side. The trainer only sees a plain ``on_step``
callback, so the pure core stays free of FLARE.

With ``JobSpec(mlflow_uri=...)`` the server also gets FLARE's `MLflowReceiver` on the
same forwarded events: FLARE turns each TensorBoard scalar into an MLflow metric (same
key, same step) and keeps one MLflow run per site, named ``<site>-<job id[:6]>-<job
name>-<job name>``, in one experiment.
"""

from __future__ import annotations

TB_FOLDER = "tb_events"


class SiteTracker:
    """Scalars of one site: per step train loss and lr, per round losses, throughput
    and (BERT baseline) validation F1.

    `writer` is anything with ``add_scalar(tag, value, global_step)`` (FLARE's
    SummaryWriter at a site, torch's in a test). Steps count across rounds.
    """

    def __init__(self, writer):
        self.writer = writer
        self.steps_before = 0  # steps of the finished rounds

    def on_step(self, step: int, loss: float, lr: float) -> None:
        self.writer.add_scalar("train/loss", loss, global_step=self.steps_before + step)
        self.writer.add_scalar("train/lr", lr, global_step=self.steps_before + step)

    def end_round(self, round_number: int | None, stats, val_loss: float, val_f1: float | None = None) -> None:
        self.steps_before += stats.steps
        rnd = int(round_number or 0)
        self.writer.add_scalar("round/train_loss", stats.train_loss, global_step=rnd)
        self.writer.add_scalar("round/val_loss", val_loss, global_step=rnd)
        self.writer.add_scalar("round/tokens_per_s", stats.tokens_per_second, global_step=rnd)
        self.writer.add_scalar("round/supervised_tokens", stats.num_supervised_tokens, global_step=rnd)
        if val_f1 is not None:  # the BERT baseline's lenient entity F1 on the validation notes
            self.writer.add_scalar("round/val_f1", val_f1, global_step=rnd)
        if getattr(stats, "privacy", None):  # record-level DP-SGD
            self.writer.add_scalar("round/dp_epsilon", stats.privacy["epsilon"], global_step=rnd)


def add_tensorboard(job) -> None:
    """Relay the sites' analytics events to the server and write them as TensorBoard runs."""
    from nvflare.apis.analytix import ANALYTIC_EVENT_TYPE
    from nvflare.app_common.widgets.convert_to_fed_event import ConvertToFedEvent
    from nvflare.app_opt.tracking.tb.tb_receiver import TBAnalyticsReceiver

    job.to_server(TBAnalyticsReceiver(tb_folder=TB_FOLDER), id="tb_receiver")
    job.to_clients(ConvertToFedEvent(events_to_convert=[ANALYTIC_EVENT_TYPE]), id="event_to_fed")


def add_mlflow(job, spec) -> None:
    """Give the server FLARE's MLflowReceiver on the sites' forwarded analytics events
    (the ones the TensorBoard receiver gets): every site scalar lands in MLflow too.

    ``spec.mlflow_uri``: any MLflow tracking URI the server can reach, e.g.
    ``sqlite:////abs/path/mlflow.db`` (a local store), ``http://host:5000``, or
    ``file:///abs/path/mlruns`` (MLflow 3 keeps the file store in maintenance mode and
    refuses it unless the server runs with ``MLFLOW_ALLOW_FILE_STORE=true``).
    """
    from urllib.parse import urlparse

    from nvflare.apis.analytix import ANALYTIC_EVENT_TYPE

    if not spec.tensorboard:
        raise ValueError("MLflow receives the sites' TensorBoard scalars: keep tensorboard on to use mlflow_uri")
    if not urlparse(spec.mlflow_uri).scheme:
        raise ValueError(
            f"mlflow_uri {spec.mlflow_uri!r} is not a URI: give e.g. sqlite:////abs/path/mlflow.db, http://host:5000 or file:///abs/path/mlruns"
        )
    try:
        from nvflare.app_opt.tracking.mlflow.mlflow_receiver import MLflowReceiver
    except ImportError as exc:  # the server needs it as well
        raise ValueError(f"mlflow_uri needs MLflow here and on the server: pip install 'fedmed_components[mlflow]' ({exc})") from None

    kw_args = {
        "experiment_name": spec.mlflow_experiment,
        "run_name": spec.name,
        "experiment_tags": {"mlflow.note.content": "FedMed federated LoRA jobs: one run per site and job"},
        "run_tags": {"algorithm": spec.algorithm, "model": spec.model},
    }
    # Only the forwarded site events: the receiver keeps one run per site and has none for the server.
    receiver = MLflowReceiver(tracking_uri=spec.mlflow_uri, kw_args=kw_args, events=[f"fed.{ANALYTIC_EVENT_TYPE}"])
    job.to_server(receiver, id="mlflow_receiver")
