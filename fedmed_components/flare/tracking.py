"""Per-site TensorBoard scalars through FLARE's tracking, and the server side that collects them.

A site writes with ``nvflare.client.tracking.SummaryWriter`` (wrapped by `SiteTracker`);
the Client API fires each record as an analytics event, `ConvertToFedEvent` on the
client forwards it to the server, and `TBAnalyticsReceiver` writes one TensorBoard run
per site under ``<server run dir>/tb_events/<site>/``: ``tensorboard --logdir`` on that
folder shows every site side by side. The trainer only sees a plain ``on_step``
callback, so the pure core stays free of FLARE.
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
