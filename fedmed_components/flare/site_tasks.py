"""What a site answers to each FLARE task: FLModel in, FLModel out (testable without FLARE running)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from fedmed_components.federation.lora_keys import is_lora_A
from fedmed_components.flare.wire import CANDIDATES_TASK, EVAL_RESULT, EVALUATE_TASK, TRAIN_TASK, unpack_candidates
from fedmed_components.model.modeling import adapter_num_bytes

log = logging.getLogger("fedmed.site")


def add_site_script_arguments(parser) -> None:
    """The FLARE site script's own options (beside `add_site_arguments`), declared once for
    the script and for the job's per-site option check (job.site_parser)."""
    parser.add_argument("--send", choices=["full", "diff"], default="full", help="send the adapter or its change")
    parser.add_argument("--no-tensorboard", action="store_true", help="do not send TensorBoard scalars to the server")
    parser.add_argument(
        "--keep-local-adapters",
        metavar="DIR",
        default=None,
        help="also save this site's own trained adapter every round in DIR/<site>/round_NNN (a diagnostic: "
        "score it against the global mean); it stays on this site's disk",
    )


def train(runtime, incoming: FLModel, send: str = "full", tracker=None, keep_adapters: str | None = None) -> FLModel:
    """`keep_adapters`: a folder where this site also saves its own trained adapter every
    round (`<folder>/<site>/round_NNN`), before the server's mean: a diagnostic of what the
    mean keeps of each site's skills. It stays on the site's disk; nothing more is sent."""
    global_state = incoming.params or None
    if global_state and (incoming.meta or {}).get("load") == "lora_A":  # FedSA-LoRA: B stays local
        global_state = {**runtime.adapter_state(), **{k: v for k, v in global_state.items() if is_lora_A(k)}}
    if incoming.current_round is not None:  # a schedule across rounds follows the server's round
        runtime.trainer.rounds_done = int(incoming.current_round)
    if incoming.total_rounds:  # a DP-SGD epsilon budget is spread over the job's rounds
        runtime.trainer.planned_rounds = int(incoming.total_rounds)
    started = time.perf_counter()
    state, stats = runtime.train(global_state, progress=True, on_step=tracker.on_step if tracker else None)
    if keep_adapters:
        keep_local_adapter(runtime, state, incoming.current_round, keep_adapters)
    val_loss, val_tokens = runtime.validation_loss()
    val_f1 = runtime.validation_f1()
    if tracker is not None:
        tracker.end_round(incoming.current_round, stats, val_loss, val_f1)
    params, ptype = state, ParamsType.FULL
    if send == "diff" and global_state:
        if all(k in global_state and global_state[k].shape == v.shape for k, v in state.items()):
            params = {k: state[k] - global_state[k].to(state[k].dtype) for k in state}
            ptype = ParamsType.DIFF
        else:  # another rank than the global (FlexLoRA): a change has no meaning across shapes
            log.warning(
                "%s round %s: its adapter's shapes differ from the global one's; sending it whole, not the change",
                runtime.site_name,
                incoming.current_round,
            )
    meta = {
        "site": runtime.site_name,
        "num_supervised_tokens": stats.num_supervised_tokens,
        "num_examples": stats.num_examples,
        "train_loss": stats.train_loss,
        "val_loss": val_loss,
        "val_tokens": val_tokens,
        "steps": stats.steps,
        "rank": runtime.config.lora.r,
        "NUM_STEPS_CURRENT_ROUND": stats.steps,
        # how prediction must prompt the adapter: recorded with the global adapter
        "prompt_style": runtime.config.sft.prompt_style,
        "ner_sentences": runtime.config.sft.ner_sentences,
    }
    if val_f1 is not None:
        meta["val_f1"] = val_f1
    if stats.privacy is not None:  # record-level DP-SGD: epsilon over every step so far
        meta["dp_sgd"] = stats.privacy
        log.info(
            "%s round %s: DP-SGD epsilon %.3f at delta %g after %d steps (record: %s)",
            runtime.site_name,
            incoming.current_round,
            stats.privacy["epsilon"],
            stats.privacy["delta"],
            stats.privacy["steps"],
            stats.privacy["record"],
        )
    if runtime.input_skipped:
        meta["input_skipped"] = runtime.input_skipped
    truncation = stats.truncation
    if truncation:  # FlexLoRA: the global adapter cut to this site's rank
        meta["truncation"] = truncation
        log.info(
            "%s round %s: global adapter rank %d truncated to rank %d by SVD, relative residual %.4f",
            runtime.site_name,
            incoming.current_round,
            truncation["global_rank"],
            truncation["rank"],
            truncation["residual"],
        )
    log.info(
        "%s round %s: %d steps, %d supervised tokens, train loss %.4f, val loss %.4f, %.0f tok/s, payload %.2f MB, %.1f s",
        runtime.site_name,
        incoming.current_round,
        stats.steps,
        stats.num_supervised_tokens,
        stats.train_loss,
        val_loss,
        stats.tokens_per_second,
        adapter_num_bytes(params) / 1e6,
        time.perf_counter() - started,
    )
    return FLModel(params=params, params_type=ptype, meta=meta, metrics={"val_loss": val_loss})


def keep_local_adapter(runtime, state: dict, current_round: int | None, folder: str) -> Path:
    from fedmed_components.model.modeling import save_adapter_folder

    name = f"round_{int(current_round or 0):03d}"
    meta = {"site": runtime.site_name, "round": current_round, "prompt_style": runtime.config.sft.prompt_style}
    saved = save_adapter_folder(state, runtime.config.lora, runtime.model_path, Path(folder) / runtime.site_name / name, extra_meta=meta)
    log.info("%s round %s: kept its own adapter in %s", runtime.site_name, current_round, saved)
    return saved


def score_candidates(runtime, incoming: FLModel) -> FLModel:
    names, candidates = unpack_candidates(incoming.params)
    losses = runtime.score_candidates(candidates)
    log.info("%s round %s: candidate losses %s", runtime.site_name, incoming.current_round, dict(zip(names, [round(x, 4) for x in losses])))
    return FLModel(
        metrics={f"loss/{name}": loss for name, loss in zip(names, losses)},  # FLARE needs params or metrics
        meta={"site": runtime.site_name, "candidates": names, "losses": losses, "val_tokens": runtime.val_supervised_tokens},
    )


def evaluate(runtime, incoming: FLModel) -> FLModel:
    """Cross-site evaluation: the final global adapter scored on this site's test notes
    (`SiteRuntime.evaluate_adapter`); metrics only, never an adapter. The score object
    goes in meta[EVAL_RESULT]; `metrics` holds its F1s flat (FLARE needs params or metrics).
    A failure here is answered, not raised: the server lists the site as missing."""
    started = time.perf_counter()
    try:
        entry = runtime.evaluate_adapter(incoming.params or None)
    except Exception as exc:  # the job has finished training: one site's failure must not end it
        log.exception("%s: cross-site evaluation failed", runtime.site_name)
        return failed(runtime.site_name, RuntimeError(f"evaluation failed: {type(exc).__name__}: {exc}"))
    metrics = {"num_docs": float(entry["num_docs"])}
    for group in ("entities", "modifiers"):
        for mode, scores in (entry.get(group) or {}).items():
            if mode in ("strict", "lenient"):
                metrics.update({f"{group}/{mode}/{k}": float(scores[k]) for k in ("precision", "recall", "f1")})
    if entry.get("error"):
        log.warning("%s cross-site evaluation: %s", runtime.site_name, entry["error"])
    else:
        log.info(
            "%s cross-site evaluation of round %s on %d %s docs: entity F1 strict %.3f lenient %.3f, %.1f s",
            runtime.site_name,
            incoming.current_round,
            entry["num_docs"],
            entry["split"],
            entry["entities"]["strict"]["f1"],
            entry["entities"]["lenient"]["f1"],
            time.perf_counter() - started,
        )
    return FLModel(metrics=metrics, meta={"site": runtime.site_name, EVAL_RESULT: entry})


def failed(site_name: str, error: Exception) -> FLModel:
    """The answer of a site that cannot take part (bad data): the reason, no adapter.
    The server rejects it at once, naming site and reason, instead of waiting out a timeout."""
    return FLModel(params={}, metrics={"failed": 1.0}, meta={"site": site_name, "site_error": str(error)})


def handle(runtime, task: str, incoming: FLModel, send: str = "full", tracker=None, keep_adapters: str | None = None) -> FLModel:
    """`tracker`: a flare.tracking.SiteTracker for TensorBoard scalars (None: none);
    `keep_adapters`: see `train`."""
    if task == TRAIN_TASK:
        return train(runtime, incoming, send, tracker, keep_adapters)
    if task == CANDIDATES_TASK:
        return score_candidates(runtime, incoming)
    if task == EVALUATE_TASK:
        return evaluate(runtime, incoming)
    raise ValueError(f"{runtime.site_name}: unknown task {task!r}")
