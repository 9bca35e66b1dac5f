"""FedMed site script: what FLARE runs at each hospital (FLARE Client API).

The round, top to bottom: receive the global adapter, train QLoRA on local notes,
measure validation loss, send back only the adapter with the metadata the server's
aggregation rule needs. The base model is loaded once and kept across rounds.
"""

import argparse
import logging
import time

import nvflare.client as flare
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from fedmed_components.flare.wire import (
    CANDIDATES_TASK,
    SUBMIT_MODEL_TASK,
    TRAIN_TASK,
    VALIDATE_TASK,
    unpack_candidates,
)
from fedmed_components.modeling import adapter_num_bytes
from fedmed_components.site import SiteRuntime, add_site_arguments, site_config_from_args, site_data_folder

log = logging.getLogger("fedmed.site")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    add_site_arguments(parser)
    parser.add_argument("--send", choices=["full", "diff"], default="full", help="send the adapter or its change")
    args = parser.parse_args()

    flare.init()
    site = flare.get_site_name()
    runtime = SiteRuntime(site_config_from_args(args), site_name=site)
    runtime.load_data(site_data_folder(args.data, site))

    while flare.is_running():
        incoming = flare.receive()
        if incoming is None:
            break
        task = flare.get_task_name()
        rnd = incoming.current_round
        if task == TRAIN_TASK:
            global_state = incoming.params or None
            if global_state and (incoming.meta or {}).get("load") == "lora_A":  # FedSA-LoRA: B stays local
                global_state = {**runtime.adapter_state(), **{k: v for k, v in global_state.items() if ".lora_A." in k}}
            started = time.perf_counter()
            state, stats = runtime.train(global_state)
            val_loss, val_tokens = runtime.validation_loss()
            params, ptype = state, ParamsType.FULL
            if args.send == "diff" and global_state:
                params = {k: state[k] - global_state[k].to(state[k].dtype) for k in state}
                ptype = ParamsType.DIFF
            meta = {
                "site": site,
                "num_supervised_tokens": stats.num_supervised_tokens,
                "num_examples": stats.num_examples,
                "train_loss": stats.train_loss,
                "val_loss": val_loss,
                "val_tokens": val_tokens,
                "steps": stats.steps,
                "rank": runtime.config.lora.r,
                "NUM_STEPS_CURRENT_ROUND": stats.steps,
            }
            log.info(
                "%s round %s: %d steps, %d supervised tokens, train loss %.4f, val loss %.4f, "
                "%.0f tok/s, payload %.2f MB, %.1f s",
                site, rnd, stats.steps, stats.num_supervised_tokens, stats.train_loss, val_loss,
                stats.tokens_per_second, adapter_num_bytes(params) / 1e6, time.perf_counter() - started,
            )
            flare.send(FLModel(params=params, params_type=ptype, meta=meta, metrics={"val_loss": val_loss}))
        elif task == VALIDATE_TASK:
            if incoming.params:
                runtime.set_adapter(incoming.params)
            val_loss, val_tokens = runtime.validation_loss()
            flare.send(FLModel(metrics={"val_loss": val_loss}, meta={"site": site, "val_tokens": val_tokens}))
        elif task == CANDIDATES_TASK:
            names, candidates = unpack_candidates(incoming.params)
            losses = runtime.score_candidates(candidates)
            log.info("%s round %s: candidate losses %s", site, rnd, dict(zip(names, [round(x, 4) for x in losses])))
            flare.send(FLModel(
                metrics={f"loss/{name}": loss for name, loss in zip(names, losses)},
                meta={"site": site, "candidates": names, "losses": losses, "val_tokens": runtime.val_supervised_tokens},
            ))
        elif task == SUBMIT_MODEL_TASK:
            flare.send(FLModel(params=runtime.adapter_state(), params_type=ParamsType.FULL, meta={"site": site}))
        else:
            raise RuntimeError(f"{site}: unknown task {task!r}")


if __name__ == "__main__":
    main()
