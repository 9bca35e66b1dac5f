"""FLARE aggregators: short classes that say *when* the pure rules in `aggregation` run.

Every update is screened (`update_validation`) before it can touch the global adapter.
Accepted updates are summed as they arrive (memory: one accumulator + one update) and
also spilled to a per-round folder, so that a norm outlier found once the round is
complete can be removed exactly, and so Fed-MedLoRA+ can weight candidates once their
losses are known without holding K adapters in memory.
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from nvflare.apis.event_type import EventType
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.aggregators.model_aggregator import ModelAggregator
from safetensors.torch import load_file, save_file

from fedmed_components.federation import aggregation, robust_aggregation
from fedmed_components.federation.lora_keys import is_lora_A
from fedmed_components.federation.update_validation import Rejection, norm_outliers, update_norm, validate_update
from fedmed_components.flare.wire import SERVER_OPTIMIZER_STATE
from fedmed_components.settings import BUDGET

# Site meta keys that say how the adapter must be prompted (recorded with the global adapter).
PROMPT_SETTINGS = ("prompt_style", "ner_sentences")


@dataclass
class _Accepted:
    site: str
    weight: float
    norm: float
    path: Path
    meta: dict


class AdapterAggregator(ModelAggregator):
    """Base: screening, spilling, streaming sum; subclasses choose the weights."""

    # Sum updates as they arrive; rules that need every update first read the spill.
    streaming = True

    def __init__(
        self,
        weighting: str = "supervised_tokens",
        max_norm_ratio: float = 10.0,
        allow_rank_change: bool = False,
        head_modules: list[str] | None = None,
    ):
        super().__init__()
        # Trained heads that travel with the adapter (the BERT baseline's classifier).
        self.head_modules = head_modules  # kept as given: FLARE exports constructor args by name
        self.weighting = weighting
        self.max_norm_ratio = max_norm_ratio
        self.allow_rank_change = allow_rank_change
        self.reference: dict[str, torch.Tensor] = {}
        self.round: int | None = None
        self.rejections: list[Rejection] = []
        self.last_weights: dict[str, float] = {}
        self._accepted: dict[str, _Accepted] = {}
        self._spill: Path | None = None
        self._averager = aggregation.WeightedAverager()

    # ------------------------------------------------------------ round bookkeeping
    def begin_round(self, reference: dict[str, torch.Tensor], round_number: int) -> None:
        self.reset_stats()
        self.reference = reference
        self.round = round_number
        if self.streaming and reference:
            self._averager.prepare(reference)  # while the sites train, not when their updates arrive

    def handle_event(self, event_type: str, fl_ctx):
        super().handle_event(event_type, fl_ctx)
        if event_type == EventType.END_RUN:
            self._drop_spill()

    def _drop_spill(self) -> None:
        if self._spill is not None:
            shutil.rmtree(self._spill, ignore_errors=True)
            self._spill = None

    def reset_stats(self):
        self._averager.reset()
        self._accepted = {}
        self.rejections = []
        self._drop_spill()
        self._spill = Path(tempfile.mkdtemp(prefix="fedmed-round-"))

    def outgoing_meta(self) -> dict:
        """Instructions that travel with the global adapter to the sites."""
        return {}

    def resume_state(self, meta: dict, next_round: int) -> str | None:
        """Take back what `round_meta` handed the persistor (the model's meta on load);
        returns a line for the log. Plain averaging keeps nothing between rounds."""
        return None

    @property
    def accepted_sites(self) -> list[str]:
        return sorted(self._accepted)

    # ---------------------------------------------------------------- accepting
    def site_weight(self, meta: dict) -> float:
        return aggregation.site_weights([meta], by=self.weighting)[0]

    def accept_model(self, model: FLModel) -> bool:
        meta = dict(model.meta or {})
        site = str(meta.get("client_name") or meta.get("site") or f"site{len(self._accepted)}")
        params = model.params or {}
        if meta.get("input_skipped"):
            self.warning(f"{site} skipped bad input (lenient): {meta['input_skipped']}")
        if model.params_type == ParamsType.DIFF and params and self.reference:
            params = {k: self.reference[k] + v.to(self.reference[k].dtype) if k in self.reference else v for k, v in params.items()}
        if meta.get("site_error"):
            rejection = Rejection(site=site, round=self.round, reason=f"site failed its task: {meta['site_error']}")
        else:
            rejection = (
                validate_update(
                    params,
                    self.reference,
                    site=site,
                    round=self.round,
                    allow_rank_change=self.allow_rank_change,
                    head_modules=self.head_modules or (),
                )
                if self.reference
                else None
            )
        if rejection is None and site in self._accepted:
            rejection = Rejection(site=site, round=self.round, reason="second update in the same round")
        if rejection is None:
            try:
                weight = self.site_weight(meta)
            except (KeyError, TypeError, ValueError) as exc:
                rejection = Rejection(site=site, round=self.round, reason=f"bad aggregation metadata: {exc}")
            else:
                if not weight > 0:  # e.g. no supervised token this round: it would count for nothing, or zero the sum
                    rejection = Rejection(
                        site=site, round=self.round, reason=f"aggregation weight {weight:g} (nothing to count it by this round)"
                    )
        if rejection is not None:
            self.rejections.append(rejection)
            self.warning(f"rejected update from {site} in round {self.round}: {rejection.reason}")
            return False
        path = self._spill / f"{len(self._accepted)}.safetensors"
        save_file({k: v.contiguous() for k, v in params.items()}, str(path))
        norm = update_norm(params, self.reference or None)
        self._accepted[site] = _Accepted(site, weight, norm, path, meta)
        if self.streaming:
            self._averager.add(params, weight)
        self.info(f"accepted update from {site}: {len(params)} LoRA tensors, weight {weight:g}, update norm {norm:.4g}")
        if isinstance(meta.get("dp_sgd"), dict):  # the site's record-level privacy spent so far
            dp = meta["dp_sgd"]
            self.info(
                f"{site} DP-SGD: epsilon {dp.get('epsilon', float('nan')):.3f} at delta {dp.get('delta')} "
                f"after {dp.get('steps')} steps (record: {dp.get('record')}, noise {dp.get('noise_multiplier')}, clip {dp.get('clip')})"
            )
        return True

    def drop_norm_outliers(self) -> None:
        if len(self._accepted) < 2:
            return
        flagged = norm_outliers({s: a.norm for s, a in self._accepted.items()}, max_ratio=self.max_norm_ratio)
        if not flagged:
            return
        for site, reason in flagged.items():
            self.rejections.append(Rejection(site=site, round=self.round, reason=reason))
            self.warning(f"rejected update from {site} in round {self.round}: {reason}")
            del self._accepted[site]
        if self.streaming:
            self._resum_in_site_order()

    def _resum_in_site_order(self) -> None:
        self._averager.reset()
        for site in sorted(self._accepted):
            self._averager.add(load_file(str(self._accepted[site].path)), self._accepted[site].weight)

    def averaged(self) -> dict[str, torch.Tensor]:
        """The weighted average, summed in site-name order: float sums depend on the
        order, and arrival order changes from run to run (bit-for-bit determinism)."""
        if list(self._accepted) != sorted(self._accepted) and self._averager.count == len(self._accepted):
            self._resum_in_site_order()
            self._accepted = dict(sorted(self._accepted.items()))
        return self._averager.result()

    # --------------------------------------------------------------- aggregating
    def aggregate_model(self) -> FLModel:
        self.drop_norm_outliers()
        if not self._accepted:
            raise RuntimeError(f"round {self.round}: no valid update to aggregate")
        params = self.combine()
        total = sum(a.weight for a in self._accepted.values())
        self.last_weights = {s: a.weight / total for s, a in sorted(self._accepted.items())}
        self.info(f"round {self.round} weights: " + ", ".join(f"{s}={w:.3f}" for s, w in self.last_weights.items()))
        return FLModel(params=params, params_type=ParamsType.FULL, meta=self.round_meta())

    def combine(self) -> dict[str, torch.Tensor]:
        return self.averaged()

    def round_meta(self) -> dict:
        entries = self._accepted.values()
        mean = lambda key: _weighted_mean([(a.meta.get(key), a.weight) for a in entries])  # noqa: E731
        return {
            "sites": sorted(self._accepted),
            "weights": dict(self.last_weights),
            "rejected": [{"site": r.site, "reason": r.reason} for r in self.rejections],
            "train_loss": mean("train_loss"),
            "val_loss": mean("val_loss"),
            "num_supervised_tokens": sum(int(a.meta.get("num_supervised_tokens", 0)) for a in entries),
            **({"dp_sgd": dp} if (dp := {a.site: a.meta["dp_sgd"] for a in entries if isinstance(a.meta.get("dp_sgd"), dict)}) else {}),
            **self.prompt_settings(),
        }

    def prompt_settings(self) -> dict:
        """The prompt style and NER packing the sites trained with, recorded with the global
        adapter so `fedmed predict` prompts it the same way; left out where sites differ."""
        settings = {}
        for key in PROMPT_SETTINGS:
            values = {json.dumps(a.meta[key]) for a in self._accepted.values() if key in a.meta}
            if len(values) == 1:
                settings[key] = json.loads(values.pop())
            elif values:
                self.warning(f"round {self.round}: sites trained with different {key} ({sorted(values)}); not recorded with the adapter")
        return settings

    def candidates(self) -> dict[str, dict[str, torch.Tensor]]:
        """Each accepted site's adapter of this round, read back from the spill folder."""
        return {site: load_file(str(a.path)) for site, a in sorted(self._accepted.items())}

    def sizes(self) -> dict[str, float]:
        return {site: float(a.meta.get("num_examples", 1)) for site, a in sorted(self._accepted.items())}


class FedMedLoRAAggregator(AdapterAggregator):
    """Fed-MedLoRA: A and B averaged separately, weighted by supervised tokens."""


class FedMedLoRAPlusAggregator(AdapterAggregator):
    """Fed-MedLoRA+: weights exp(1 - L_k), normalised, from each adapter's validation loss.

    The controller supplies the losses (a server-side evaluator, or the sites scoring
    each other's candidates) through `set_losses` before `aggregate_model`.
    """

    streaming = False  # weights are known only once every candidate has been scored

    def __init__(
        self,
        temperature: float = aggregation.FED_PLUS_TEMPERATURE,
        use_sizes: bool = False,
        max_norm_ratio: float = 10.0,
        allow_rank_change: bool = False,
        head_modules: list[str] | None = None,
    ):
        super().__init__(weighting="uniform", max_norm_ratio=max_norm_ratio, allow_rank_change=allow_rank_change, head_modules=head_modules)
        self.temperature = temperature
        self.use_sizes = use_sizes
        self._losses: dict[str, float] = {}

    def reset_stats(self):
        super().reset_stats()
        self._losses = {}

    def set_losses(self, losses: dict[str, float]) -> None:
        self._losses = dict(losses)

    def combine(self) -> dict[str, torch.Tensor]:
        sites = sorted(self._accepted)
        if set(self._losses) >= set(sites):
            losses = [self._losses[s] for s in sites]
            source = "validation losses"
        else:  # no evaluator answered: fall back to the sites' own validation losses
            losses = [float(self._accepted[s].meta.get("val_loss", float("nan"))) for s in sites]
            source = "site-reported validation losses (fallback)"
        sizes = [self.sizes()[s] for s in sites] if self.use_sizes else None
        try:
            weights = aggregation.fed_medlora_plus_weights(losses, sizes=sizes, temperature=self.temperature)
        except ValueError as exc:  # no finite loss at all: do not lose the round
            self.warning(f"round {self.round}: {exc}; falling back to uniform weights")
            weights = [1.0 / len(sites)] * len(sites)
        self.info(
            f"round {self.round} Fed-MedLoRA+ from {source}: "
            + ", ".join(f"{s}: L={loss:.4f} w={w:.3f}" for s, loss, w in zip(sites, losses, weights))
        )
        for site, weight in zip(sites, weights):
            self._accepted[site].weight = weight
        averager = aggregation.WeightedAverager()
        for site, weight in zip(sites, weights):
            if weight > 0:
                averager.add(load_file(str(self._accepted[site].path)), weight)
        return averager.result()


class FedSALoRAAggregator(AdapterAggregator):
    """FedSA-LoRA baseline: only A is shared; B stays local until the final round.

    The streaming sum is Fed-MedLoRA's (``aggregation.fedsa_final`` in the last round);
    before it, ``aggregation.fedsa_global`` keeps its A and the reference's B, which is
    ``aggregation.fedsa_lora(updates, weights, previous=reference)``.
    """

    def __init__(self, num_rounds: int, weighting: str = "supervised_tokens", max_norm_ratio: float = 10.0):
        super().__init__(weighting=weighting, max_norm_ratio=max_norm_ratio)
        self.num_rounds = num_rounds

    def outgoing_meta(self) -> dict:
        # After round 0 each site keeps its own B and takes only the shared A.
        return {"load": "lora_A"} if self.round else {}

    def combine(self) -> dict[str, torch.Tensor]:
        full = self.averaged()
        if self.round is not None and self.round >= self.num_rounds - 1:
            return full
        # Sites keep their own B: the global carries the averaged A and the previous B.
        return aggregation.fedsa_global(full, self.reference)


class ExactLoRAAggregator(AdapterAggregator):
    """Average B·A per layer and project back to rank r by SVD (handles mixed ranks)."""

    streaming = False  # the SVD needs every site's factors

    def __init__(
        self, rank: int | None = None, alpha: float = BUDGET.alpha, weighting: str = "supervised_tokens", max_norm_ratio: float = 10.0
    ):
        super().__init__(weighting=weighting, max_norm_ratio=max_norm_ratio, allow_rank_change=True)
        self.rank = rank
        self.alpha = alpha  # every site uses the job's alpha; its scaling is alpha / own rank

    def combine(self) -> dict[str, torch.Tensor]:
        sites = sorted(self._accepted)
        updates = [load_file(str(self._accepted[s].path)) for s in sites]
        rank = self.rank or max(v.shape[0] for k, v in self.reference.items() if is_lora_A(k))
        site_ranks = [next(v.shape[0] for k, v in u.items() if is_lora_A(k)) for u in updates]
        adapter, report = aggregation.exact_lora(
            updates,
            [self._accepted[s].weight for s in sites],
            rank=rank,
            scalings=[self.alpha / r for r in site_ranks],
            target_scaling=self.alpha / rank,
        )
        self.info(f"round {self.round} exact aggregation: residual {report.get('total_residual', float('nan')):.3e}")
        return adapter


class _ServerOptimizerStep:
    """Mixin: the round's weighted average ``x_bar`` gives the pseudo-gradient
    ``x_bar - x`` for a server optimiser (``aggregation.server_optimizer_step``) that
    moves the global ``x`` (the adapter sent this round, ``reference``). The moments
    persist between rounds; across a restart they travel in the round's meta
    (``SERVER_OPTIMIZER_STATE``): ``round_meta`` hands them to the persistor, which
    returns them with the adapter on load, and ``resume_state`` takes them back."""

    _always_serialize_args = ("rule", "lr")  # a job folder names its optimiser even at the defaults

    def _init_optimizer(self, rule: str, lr: float, beta1: float, beta2: float, tau: float) -> None:
        aggregation.check_server_optimizer(rule, lr, beta1, beta2, tau)
        self.rule, self.lr, self.beta1, self.beta2, self.tau = rule, lr, beta1, beta2, tau
        self._opt_state: dict[str, torch.Tensor] = {}
        self._round_start_state: dict[str, torch.Tensor] = {}
        self._step_norms: dict[str, float] = {}

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        """The moments (``"m/<name>"``, ``"v/<name>"``, float32) after the last aggregation."""
        return dict(self._opt_state)

    def load_optimizer_state(self, state: dict[str, torch.Tensor]) -> None:
        moments = {key.split("/", 1)[0] for key in state}
        expected = {"m"} if self.rule == "fedavgm" else {"m", "v"}
        if state and moments != expected:
            raise ValueError(f"the saved server optimiser state holds moments {sorted(moments)}, {self.rule} keeps {sorted(expected)}")
        self._opt_state = self._round_start_state = {k: v.float() for k, v in state.items()}

    def resume_state(self, meta: dict, next_round: int) -> str | None:
        state = meta.get(SERVER_OPTIMIZER_STATE)
        if state:
            self.load_optimizer_state(state)
            return f"{self.rule} state resumed: {len(state)} moment tensors from round {next_round - 1}"
        if next_round:
            self.warning(f"resuming at round {next_round} without a saved {self.rule} state: its moments start again from zero")
        return None

    def begin_round(self, reference: dict[str, torch.Tensor], round_number: int) -> None:
        super().begin_round(reference, round_number)
        self._round_start_state = self._opt_state  # aggregating a round twice still steps once
        self._step_norms = {}

    def combine(self) -> dict[str, torch.Tensor]:
        average = super().combine()
        if not self.reference:
            self.warning(f"round {self.round}: no global adapter to step from; using the weighted average")
            return average
        delta = aggregation.adapter_difference(average, self.reference)
        new, self._opt_state = aggregation.server_optimizer_step(
            self.reference, delta, self._round_start_state, self.rule, self.lr, self.beta1, self.beta2, self.tau
        )
        self._step_norms = {"pseudo_gradient_norm": update_norm(average, self.reference), "step_norm": update_norm(new, self.reference)}
        self.info(f"round {self.round} {self.rule} (lr {self.lr:g}): " + ", ".join(f"{k} {v:.4g}" for k, v in self._step_norms.items()))
        return new

    def round_meta(self) -> dict:
        return {
            **super().round_meta(),
            "server_optimizer": {"rule": self.rule, "lr": self.lr, **self._step_norms},
            SERVER_OPTIMIZER_STATE: self.optimizer_state(),  # for the persistor, kept with the round's adapter
        }


class ServerOptimizerAggregator(_ServerOptimizerStep, FedMedLoRAAggregator):
    """Fed-MedLoRA's token-weighted average as pseudo-gradient for FedAvgM/FedAdam/FedYogi."""

    def __init__(
        self,
        rule: str = "fedadam",
        lr: float = 1e-2,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        weighting: str = "supervised_tokens",
        max_norm_ratio: float = 10.0,
        head_modules: list[str] | None = None,
    ):
        super().__init__(weighting=weighting, max_norm_ratio=max_norm_ratio, head_modules=head_modules)
        self._init_optimizer(rule, lr, beta1, beta2, tau)


class ServerOptimizerPlusAggregator(_ServerOptimizerStep, FedMedLoRAPlusAggregator):
    """Fed-MedLoRA+'s loss-weighted average as pseudo-gradient for FedAvgM/FedAdam/FedYogi."""

    def __init__(
        self,
        rule: str = "fedadam",
        lr: float = 1e-2,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        temperature: float = aggregation.FED_PLUS_TEMPERATURE,
        use_sizes: bool = False,
        max_norm_ratio: float = 10.0,
        head_modules: list[str] | None = None,
    ):
        super().__init__(temperature=temperature, use_sizes=use_sizes, max_norm_ratio=max_norm_ratio, head_modules=head_modules)
        self._init_optimizer(rule, lr, beta1, beta2, tau)


class RobustAggregator(AdapterAggregator):
    """Byzantine-robust aggregation (``robust_aggregation``) of the sites' updates
    ``x_k - x_global`` after the usual screening, added back to the global adapter.

    ``robust_rule``: ``median`` (coordinate-wise; tolerates f < K/2 sites sending
    anything), ``trimmed_mean`` (drops the ``floor(trim_beta * K)`` largest and smallest
    values per coordinate; tolerates that many per side) or ``norm_bounded`` (each
    update scaled down to at most ``clip``, default the median of the round's update
    norms, then the ``weighting`` mean: it bounds a scaled update's pull but lets a
    wrong direction at an honest norm through). Median and trimmed mean give each site
    one vote, so the reported weights are uniform; ``norm_bounded`` keeps ``weighting``.
    See docs/robust_aggregation.md for which rule to choose.
    """

    streaming = False  # the coordinate rules need every update of the round

    def __init__(
        self,
        robust_rule: str = "median",
        trim_beta: float = 0.2,
        clip: float | None = None,
        weighting: str = "supervised_tokens",
        max_norm_ratio: float = 10.0,
        head_modules: list[str] | None = None,
    ):
        super().__init__(weighting=weighting, max_norm_ratio=max_norm_ratio, head_modules=head_modules)
        if robust_rule not in robust_aggregation.ROBUST_RULES:
            raise ValueError(f"unknown robust_rule {robust_rule!r}: use one of {', '.join(robust_aggregation.ROBUST_RULES)}")
        if not (0 <= float(trim_beta) < 0.5):
            raise ValueError(f"trim_beta must be in [0, 0.5), got {trim_beta}")
        if clip is not None and not (float(clip) > 0 and float(clip) != float("inf")):
            raise ValueError(f"clip must be a positive number or None (the median update norm), got {clip}")
        # kept as given: FLARE exports constructor args by name
        self.robust_rule = robust_rule
        self.trim_beta = trim_beta
        self.clip = clip
        self._robust_report: dict = {}

    def reset_stats(self):
        super().reset_stats()
        self._robust_report = {}

    def _options(self) -> dict:
        if self.robust_rule == "trimmed_mean":
            return {"beta": float(self.trim_beta)}
        if self.robust_rule == "norm_bounded" and self.clip is not None:
            return {"clip": float(self.clip)}
        return {}

    def combine(self) -> dict[str, torch.Tensor]:
        sites = sorted(self._accepted)
        rule, k = self.robust_rule, len(sites)
        if not self.reference:
            self.warning(f"round {self.round}: no global adapter to take updates from; using the weighted average")
            return self.averaged()
        updates = [aggregation.adapter_difference(load_file(str(self._accepted[s].path)), self.reference) for s in sites]
        weights = [self._accepted[s].weight for s in sites]
        aggregate = robust_aggregation.robust_aggregate(updates, rule, weights=weights, **self._options())
        tolerated = robust_aggregation.tolerated_attackers(rule, k, self.trim_beta if rule == "trimmed_mean" else None)
        report = {"rule": rule, "sites": k, "tolerated_attackers": tolerated, "update_norm": update_norm(aggregate)}
        if rule == "trimmed_mean":
            report["trim_beta"] = float(self.trim_beta)
        if rule == "norm_bounded":
            norms = {s: self._accepted[s].norm for s in sites}
            clip = float(self.clip) if self.clip is not None else statistics.median(norms.values())
            report["clip"] = clip
            report["clipped"] = {s: round(n / clip, 4) for s, n in norms.items() if clip > 0 and n > clip}
        else:
            for site in sites:  # one site, one vote: what the round's weights report
                self._accepted[site].weight = 1.0
        if tolerated == 0:
            self.warning(f"round {self.round}: {rule} over {k} site(s) tolerates no attacker (see docs/robust_aggregation.md)")
        self._robust_report = report
        details = ", ".join(
            f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}" for key, value in report.items() if key != "rule"
        )
        self.info(f"round {self.round} robust aggregation {rule}: {details}")
        return robust_aggregation.state_from_update(self.reference, aggregate)

    def round_meta(self) -> dict:
        return {**super().round_meta(), "robust": dict(self._robust_report)}


def _weighted_mean(pairs) -> float:
    pairs = [(float(v), w) for v, w in pairs if v is not None]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else float("nan")
