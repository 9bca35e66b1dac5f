"""The FedMed round on the server: send, screen and sum, (score), aggregate, persist.

FLARE's FedAvg waits forever for a sampled site and has no step for Fed-MedLoRA+'s
candidate scoring, so this controller runs the round itself, with a timeout on every
task: a site that does not answer in time is dropped for that round, not awaited.
Optionally each round trains a seeded sample of the sites (`sampling.sample_sites`);
the others get no task that round. After the last round every connected site scores the
final global adapter on its own test notes (cross-site evaluation); the server writes the
table beside the global adapter (docs/cross_site_evaluation.md).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.workflows.model_controller import ModelController

from fedmed_components.data.files import atomic_write_text
from fedmed_components.federation import aggregation, sampling
from fedmed_components.flare.wire import (
    CANDIDATES_TASK,
    CROSS_SITE_EVAL_FILE,
    EVAL_RESULT,
    EVALUATE_TASK,
    TRAIN_TASK,
    pack_candidates,
)

LOSS_SOURCES = ("none", "server", "sites")


class FedMedController(ModelController):
    def __init__(
        self,
        num_rounds: int = 3,
        min_clients: int = 1,
        aggregator_id: str = "aggregator",
        persistor_id: str = "persistor",
        loss_source: str = "none",
        evaluator_id: str | None = None,
        train_timeout: int = 3600,
        eval_timeout: int = 1800,
        task_check_period: float = 0.2,
        sample_fraction: float | None = None,
        sample_clients: int | None = None,
        sample_seed: int = 0,
        cross_site_eval: bool = True,
    ):
        super().__init__(
            persistor_id=persistor_id, task_check_period=task_check_period
        )  # FLARE polls its tasks at this period too (its default: 0.5 s)
        if loss_source not in LOSS_SOURCES:
            raise ValueError(f"loss_source must be one of {LOSS_SOURCES}, not {loss_source!r}")
        self.num_rounds = num_rounds
        self.min_clients = min_clients
        self.aggregator_id = aggregator_id
        self.loss_source = loss_source
        self.evaluator_id = evaluator_id
        self.train_timeout = train_timeout
        self.eval_timeout = eval_timeout
        self.task_check_period = task_check_period
        sampling.check_sampling(sample_fraction, sample_clients)
        self.sample_fraction = sample_fraction
        self._sample_clients = sample_clients  # underscore: ModelController has a sample_clients method
        self.sample_seed = sample_seed
        self.cross_site_eval = cross_site_eval  # after the last round, each site scores the final global adapter
        self.aggregator = None
        self.evaluator = None
        self._silent: dict[str, int] = {}  # site -> the round it was sent a task and never answered

    def run(self) -> None:
        self.aggregator = self.get_component(self.aggregator_id)
        if self.loss_source == "server":
            self.evaluator = self.get_component(self.evaluator_id or "evaluator")
        model = self.load_model()
        start = int((model.meta or {}).get("next_round", 0))
        if start >= self.num_rounds:
            self.info(f"all {self.num_rounds} rounds already done; nothing to train")
            # a job that finished its rounds but not its table (cut during it, or run
            # before cross-site evaluation existed) evaluates its final adapter now
            if self.cross_site_eval and not self._table_exists(start - 1):
                self.evaluate_global(model.params, start - 1)
            return
        if start:
            self.info(f"resuming at round {start} of {self.num_rounds}")
        # State the aggregator keeps between rounds (server optimiser moments) comes back with the adapter.
        resumed = self.aggregator.resume_state(model.meta or {}, start)
        if resumed:
            self.info(resumed)
        global_params = model.params
        for rnd in range(start, self.num_rounds):
            if self.abort_signal.triggered:
                return
            global_params = self.run_round(rnd, global_params)
            if global_params is None:
                return
        self.info(f"finished {self.num_rounds} rounds")
        if self.cross_site_eval and not self.abort_signal.triggered:
            self.evaluate_global(global_params, self.num_rounds - 1)

    def run_round(self, rnd: int, global_params: dict):
        started = time.perf_counter()
        self.info(f"round {rnd} started")
        self.aggregator.fl_ctx = self.fl_ctx
        self.aggregator.begin_round(global_params, rnd)
        try:
            clients, available = self.round_sites(rnd)
        except ValueError as exc:
            self.panic(f"round {rnd}: {exc}")
            return None
        outgoing = FLModel(
            params=global_params,
            params_type=ParamsType.FULL,
            current_round=rnd,
            total_rounds=self.num_rounds,
            meta=self.aggregator.outgoing_meta(),
        )
        # A failed or silent site must not stop the round while min_clients can still answer.
        self.broadcast_model(
            task_name=TRAIN_TASK,
            data=outgoing,
            targets=clients,
            min_responses=self.min_clients,
            timeout=self.train_timeout,
            wait_time_after_min_received=self.train_timeout,
            blocking=False,
            callback=self.aggregator.accept_model,
        )
        while self.get_num_standing_tasks():
            if self.abort_signal.triggered:
                return None
            time.sleep(self.task_check_period)
        answered = self.aggregator.accepted_sites
        missing = sorted(set(clients) - answered_set(answered, self.aggregator.rejections))
        self._silent = {site: r for site, r in self._silent.items() if site not in clients} | {site: rnd for site in missing}
        if missing:
            self.warning(f"round {rnd}: no update from {missing} (timed out or failed); continuing without them")
        if len(answered) < self.min_clients:
            reasons = "; ".join(f"{r.site}: {r.reason}" for r in self.aggregator.rejections)
            self.panic(
                f"round {rnd}: only {len(answered)} valid updates ({answered}), fewer than min_clients={self.min_clients}; "
                f"rejected: {reasons or 'none'}; silent: {missing or 'none'}"
            )
            return None
        if self.loss_source != "none":
            self.aggregator.set_losses(self.candidate_losses(rnd, answered))
        result = self.aggregator.aggregate_model()
        result.meta.update(current_round=rnd, sampled=clients, available=available, round_seconds=round(time.perf_counter() - started, 3))
        self.save_model(FLModel(params=result.params, params_type=ParamsType.FULL, meta=result.meta, current_round=rnd))
        self.info(f"round {rnd} done in {result.meta['round_seconds']:.1f} s with {answered}")
        return result.params

    def round_sites(self, rnd: int) -> tuple[list[str], list[str]]:
        """(the sites that train this round, the connected sites they were drawn from)."""
        available = sorted(client.name for client in self.engine.get_clients())
        chosen = sampling.sample_sites(
            available, rnd, fraction=self.sample_fraction, count=self._sample_clients, seed=self.sample_seed, min_sites=self.min_clients
        )
        self.info(f"round {rnd}: sampled {chosen} of {available}")
        return chosen, available

    def candidate_losses(self, rnd: int, sites: list[str]) -> dict[str, float]:
        """Each candidate adapter's validation loss, from the server or from the sites."""
        candidates = self.aggregator.candidates()
        if self.loss_source == "server":
            return {site: self.evaluator.loss(state) for site, state in candidates.items()}
        results = self.broadcast_model(
            task_name=CANDIDATES_TASK,
            data=FLModel(params=pack_candidates(candidates), params_type=ParamsType.FULL, current_round=rnd),
            targets=sites,
            min_responses=min(self.min_clients, len(sites)),
            timeout=self.eval_timeout,
            wait_time_after_min_received=self.eval_timeout,
        )
        names, matrix, sizes = None, [], []
        for res in results:
            meta = res.meta or {}
            if not meta.get("losses"):
                continue
            names = names or list(meta["candidates"])
            matrix.append([float(x) for x in meta["losses"]])
            sizes.append(int(meta.get("val_tokens", 1)) or 1)
        if not matrix:
            self.warning(f"round {rnd}: no site scored the candidates; using site-reported losses")
            return {}
        losses = aggregation.combine_site_losses(matrix, sizes)
        self.info(f"round {rnd}: candidate losses from {len(matrix)} sites: " + ", ".join(f"{n}={v:.4f}" for n, v in zip(names, losses)))
        return dict(zip(names, losses))

    # ------------------------------------------------------------------ cross-site evaluation

    def evaluate_global(self, global_params: dict, rnd: int) -> dict | None:
        """Send the final global adapter to every connected site (sampled or not) to score
        on its own test notes; write the table. A site silent the last time it was sent a
        task is not asked (presumed gone: waiting out eval_timeout on it helps nobody); a
        site that fails, has no notes or does not answer within eval_timeout is listed
        under "missing" with the reason. Never fatal: the adapter is already saved."""
        connected = sorted(client.name for client in self.engine.get_clients())
        gone = {site: f"no answer to round {r}'s task; not asked" for site, r in self._silent.items() if site in connected}
        targets = [site for site in connected if site not in gone]
        answers: dict[str, dict] = {}
        if targets:
            self.info(f"cross-site evaluation of round {rnd}'s global adapter at {targets}")
            outgoing = FLModel(params=global_params, params_type=ParamsType.FULL, current_round=rnd, total_rounds=self.num_rounds)
            # A site's error reply must not end the job: FLARE's dynamic policy would panic
            # once too few sites are left; here each is only listed as missing.
            policy, self._ignore_result_error = getattr(self, "_ignore_result_error", None), True
            try:
                results = self.broadcast_model(
                    task_name=EVALUATE_TASK, data=outgoing, targets=targets, timeout=self.eval_timeout, blocking=True
                )
            finally:
                self._ignore_result_error = policy
            for res in results or []:
                meta = res.meta or {}
                answers[meta.get("client_name") or meta.get("site")] = meta
        else:
            self.warning(f"cross-site evaluation: no site to ask ({gone or 'none connected'})")
        adapter = None
        root = self._store_root()
        if root is not None:
            adapter = str(root / "global")
        table = cross_site_table(rnd, adapter, targets, answers, gone, self.eval_timeout)
        for line in table_lines(table):
            self.info(line)
        if root is None:
            self.warning("cross-site evaluation: the persistor has no output folder; table not written")
            return table
        path = atomic_write_text(root / CROSS_SITE_EVAL_FILE, json.dumps(table, indent=2, sort_keys=True), sync_dir=True)
        self.info(f"cross-site evaluation table written to {path}")
        return table

    def _store_root(self) -> Path | None:
        """The persistor's output folder (AdapterPersistor.root: where global/ lives)."""
        persistor = self.persistor or self.get_component(self._persistor_id)
        root = getattr(persistor, "root", None)
        return Path(root(self.fl_ctx)) if callable(root) else None

    def _table_exists(self, rnd: int) -> bool:
        root = self._store_root()
        path = root / CROSS_SITE_EVAL_FILE if root is not None else None
        if path is None or not path.exists():
            return False
        try:
            return json.loads(path.read_text()).get("round") == rnd
        except (OSError, ValueError):
            return False


def cross_site_table(
    rnd: int, adapter: str | None, asked: list[str], answers: dict[str, dict], not_asked: dict[str, str], timeout: int
) -> dict:
    """The table the server writes: one entry per site that scored the adapter (the site's
    `SiteRuntime.evaluate_adapter` object), and every other site with its reason."""
    sites, missing = {}, dict(not_asked)
    for site in asked:
        meta = answers.get(site)
        entry = (meta or {}).get(EVAL_RESULT)
        if meta is None:
            missing[site] = f"no scores within eval_timeout ({timeout} s): timed out or failed"
        elif meta.get("site_error"):
            missing[site] = str(meta["site_error"])
        elif not entry or entry.get("error") or not entry.get("entities"):
            missing[site] = str((entry or {}).get("error") or "answer without scores")
        else:
            sites[site] = entry
    return {"round": rnd, "adapter": adapter, "sites": sites, "missing": dict(sorted(missing.items()))}


def table_lines(table: dict) -> list[str]:
    """One log line per site: what scored and how, or why not."""

    def f1(entry: dict, group: str) -> str:
        scores = entry.get(group)
        return f"strict {scores['strict']['f1']:.3f} lenient {scores['lenient']['f1']:.3f}" if scores else "-"

    lines = [
        f"cross-site eval {site}: {e['num_docs']} {e['split']} docs, entity F1 {f1(e, 'entities')}, modifier F1 {f1(e, 'modifiers')}"
        for site, e in sorted(table["sites"].items())
    ]
    return lines + [f"cross-site eval {site}: missing ({why})" for site, why in table["missing"].items()]


def answered_set(accepted: list[str], rejections) -> set[str]:
    return set(accepted) | {r.site for r in rejections}
