"""Adapter persistor: the server's global LoRA adapter, kept as PEFT folders.

The server never loads base weights: the first adapter is built from the model's config
on the meta device (or read from a given PEFT folder). Every round is written atomically
as ``round_NNN/``, the latest as ``global/`` and the best so far as ``best/``;
``state.json`` records the last finished round so a restarted job resumes after it.
A server optimiser's moments (round meta ``SERVER_OPTIMIZER_STATE``) are kept as
``server_optimizer.safetensors`` in ``round_NNN/`` and ``global/`` and come back with
the adapter on resume.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import ModelLearnable, ModelLearnableKey, make_model_learnable
from nvflare.app_common.abstract.model_persistor import ModelPersistor
from nvflare.app_common.app_constant import AppConstants
from safetensors.torch import load_file, save_file

from fedmed_components.data.files import atomic_write_text, fsync_path, temp_path
from fedmed_components.flare.wire import SERVER_OPTIMIZER_STATE
from fedmed_components.model.modeling import (
    LoraSettings,
    initial_adapter_from_config,
    load_adapter_folder,
    resolve_model,
    save_adapter_folder,
)
from fedmed_components.settings import BUDGET

STATE_FILE = "state.json"
SERVER_OPTIMIZER_FILE = "server_optimizer.safetensors"


class AdapterPersistor(ModelPersistor):
    def __init__(
        self,
        model: str = BUDGET.model,
        lora: dict | None = None,
        output_dir: str = "fedmed_adapters",
        initial_adapter: str | None = None,
        best_metric: str = "val_loss",
        best_mode: str = "min",
        keep_rounds: bool = True,
        resume: bool = True,
        seed: int = 0,
    ):
        super().__init__()
        self.model = model
        self.lora = dict(lora or {})  # kept as given: FLARE exports constructor args by name
        self.lora_settings = LoraSettings.from_dict(self.lora)
        self.output_dir = output_dir
        self.initial_adapter = initial_adapter
        self.best_metric = best_metric
        self.best_mode = best_mode
        self.keep_rounds = keep_rounds
        self.resume = resume
        self.seed = seed
        self._root: Path | None = None
        # The server must serialise torch tensors as tensors: without this FOBS falls
        # back to a generic decomposer and the sites cannot rebuild the adapter.
        from nvflare.app_opt.pt.decomposers import TensorDecomposer
        from nvflare.fuel.utils import fobs

        fobs.register(TensorDecomposer)

    def root(self, fl_ctx: FLContext) -> Path:
        """output_dir as given if absolute (survives job restarts), else inside the run dir."""
        if self._root is None:
            path = Path(self.output_dir)
            if not path.is_absolute():
                run_dir = fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())
                path = Path(run_dir) / path
            path.mkdir(parents=True, exist_ok=True)
            _remove_unfinished_writes(path)
            self._root = path
        return self._root

    def _state(self, fl_ctx) -> dict:
        file = self.root(fl_ctx) / STATE_FILE
        return json.loads(file.read_text()) if file.exists() else {}

    def load_model(self, fl_ctx: FLContext) -> ModelLearnable:
        state = self._state(fl_ctx) if self.resume else {}
        folder = self._last_round_folder(fl_ctx, state)
        if folder is not None:
            tensors, _, _ = load_adapter_folder(folder)
            next_round = int(state["last_round"]) + 1
            self.log_info(fl_ctx, f"resuming from {folder}: next round {next_round}")
            meta = {"next_round": next_round, "resumed": True}
            if (folder / SERVER_OPTIMIZER_FILE).exists():
                meta[SERVER_OPTIMIZER_STATE] = load_file(str(folder / SERVER_OPTIMIZER_FILE))
            return make_model_learnable(tensors, meta)
        if self.initial_adapter:
            tensors, _, _ = load_adapter_folder(self.initial_adapter)
            self.log_info(fl_ctx, f"initial adapter from {self.initial_adapter}")
        else:
            tensors = initial_adapter_from_config(resolve_model(self.model), self.lora_settings, seed=self.seed)
            self.log_info(fl_ctx, f"initial adapter built from the config of {self.model} ({len(tensors)} tensors)")
        return make_model_learnable(tensors, {"next_round": 0})

    def save_model(self, learnable: ModelLearnable, fl_ctx: FLContext):
        meta = dict(learnable.get(ModelLearnableKey.META) or {})
        optimizer_state = meta.pop(SERVER_OPTIMIZER_STATE, None)  # tensors: a file, not part of the record
        weights = learnable[ModelLearnableKey.WEIGHTS]
        rnd = meta.get("current_round", fl_ctx.get_prop(AppConstants.CURRENT_ROUND))
        root = self.root(fl_ctx)
        record = {k: v for k, v in meta.items() if isinstance(v, (int, float, str, list, dict, bool)) or v is None}
        base = resolve_model(self.model)
        # The optimiser file goes in after its folder (which the rename replaces whole);
        # state.json, written last, names only rounds whose folder holds both.
        if self.keep_rounds and rnd is not None:
            folder = save_adapter_folder(weights, self.lora_settings, base, root / f"round_{int(rnd):03d}", extra_meta=record)
            _save_optimizer_state(optimizer_state, folder)
        _save_optimizer_state(optimizer_state, save_adapter_folder(weights, self.lora_settings, base, root / "global", extra_meta=record))
        state = self._state(fl_ctx)
        metric = meta.get(self.best_metric)
        if _is_better(metric, state.get("best_value"), self.best_mode):
            save_adapter_folder(weights, self.lora_settings, base, root / "best", extra_meta=record)
            state.update(best_round=rnd, best_value=metric, best_metric=self.best_metric)
        state.update(last_round=rnd, history=state.get("history", []) + [record])
        _write_json_atomic(root / STATE_FILE, state)
        self.log_info(fl_ctx, f"saved global adapter of round {rnd} to {root / 'global'}")

    def _last_round_folder(self, fl_ctx, state: dict) -> Path | None:
        """The adapter of the round state.json names as finished. state.json is written
        last, so its round folder is complete; `global/` is only briefly absent while
        it is replaced (a crash there leaves `global.old`)."""
        if state.get("last_round") is None:
            return None
        root = self.root(fl_ctx)
        for folder in (root / f"round_{int(state['last_round']):03d}", root / "global", root / "global.old"):
            if (folder / "adapter_config.json").exists():
                return folder
        raise RuntimeError(f"{root / STATE_FILE} says round {state['last_round']} finished, but no adapter folder holds it")

    def get_model_inventory(self, fl_ctx: FLContext):
        return {}

    def get_model(self, model_file: str, fl_ctx: FLContext):
        return None


def _is_better(value, best, mode: str) -> bool:
    if value is None or not isinstance(value, (int, float)) or math.isnan(value):
        return False
    if best is None:
        return True
    return value < best if mode == "min" else value > best


def _save_optimizer_state(state: dict | None, folder: Path) -> None:
    """Temp file in the store root (a name a restart clears), fsync, rename into folder."""
    if not state:
        return
    tmp = folder.parent / f".{SERVER_OPTIMIZER_FILE}-{folder.name}"
    save_file({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, str(tmp))
    fsync_path(tmp)
    os.replace(tmp, folder / SERVER_OPTIMIZER_FILE)
    fsync_path(folder)


def _write_json_atomic(path: Path, data: dict) -> None:
    """Temp file in the same folder, fsync, rename, fsync the folder (``data.files``)."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str), sync_dir=True)


def _remove_unfinished_writes(root: Path) -> None:
    """Temp files and folders a crash left behind (never under a real round's name)."""
    import shutil

    for leftover in [*root.glob(".*-*"), temp_path(root / STATE_FILE)]:
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        elif leftover.exists():
            leftover.unlink()
