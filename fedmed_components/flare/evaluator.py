"""Server-held validation set for Fed-MedLoRA+ (the paper's reference setting).

This is the one place the server loads base weights: only when the federation chose
loss_source="server" and gave the server a validation set. Hospitals that cannot give
the server notes use loss_source="sites" instead (see README, security posture).
"""

from __future__ import annotations

import os

from nvflare.apis.fl_component import FLComponent

from fedmed_components.settings import BUDGET


class ServerLossEvaluator(FLComponent):
    def __init__(
        self,
        model: str = BUDGET.model,
        data: str = "",
        max_length: int = BUDGET.max_length,
        batch_size: int = BUDGET.batch_size,
        max_examples: int = 64,
        quantize: str = BUDGET.quantize,
    ):
        super().__init__()
        self.model = model
        self.data = data
        self.max_length = max_length
        self.batch_size = batch_size
        self.max_examples = max_examples
        self.quantize = quantize
        self._runtime = None

    def _load(self):
        from fedmed_components.model.site import SiteConfig, SiteRuntime
        from fedmed_components.model.training import TrainSettings

        config = SiteConfig(
            model=self.model,
            quantize=self.quantize,
            train=TrainSettings(max_length=self.max_length, batch_size=self.batch_size),
            val_fraction=1.0,
            max_val_examples=self.max_examples,
        )
        data = self.data or os.environ.get("FEDMED_SERVER_VAL_DATA", "")
        if not data:
            raise ValueError(
                "Fed-MedLoRA+ with loss_source=server needs the server's validation data: set the job's server_val_data or $FEDMED_SERVER_VAL_DATA"
            )
        runtime = SiteRuntime(config, site_name="server")
        runtime.load_validation(data)
        return runtime

    def loss(self, adapter_state) -> float:
        if self._runtime is None:
            self._runtime = self._load()
        return self._runtime.score_candidates([adapter_state])[0]
