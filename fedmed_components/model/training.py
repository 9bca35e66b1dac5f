"""Local supervised fine-tuning of a LoRA adapter: the loop each site runs every round.

A plain PyTorch loop over pre-tokenised examples (no Trainer): the site executor must be
as fast as a bare peft loop, and every step is visible. The paper's defaults: lr 2e-4,
cosine schedule with 5% warm-up, batch 4, max length 800, 1-2 local epochs per round,
optimiser and schedule restarted each round. A federation of many short rounds pays
for that restart: every round re-warms and decays the learning rate to zero, and AdamW
forgets its moments. ``schedule_rounds`` stretches one warm-up + cosine over that many
rounds (the round index picks the segment) and ``keep_optimizer_state`` keeps AdamW's
moments between rounds (they are the site's own; nothing of them travels).
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field, replace

import torch

from fedmed_components.federation.privacy import RdpAccountant, noise_for_epsilon
from fedmed_components.model.dp_sgd import gradients_by_record, noisy_clipped_gradient, parse_dp_sgd, poisson_sample, record_ids
from fedmed_components.model.precision import autocast, resolve_precision
from fedmed_components.settings import BUDGET

log = logging.getLogger("fedmed.training")

IGNORE_INDEX = -100


@dataclass
class TrainSettings:
    learning_rate: float = BUDGET.lr
    batch_size: int = BUDGET.batch_size
    max_length: int = BUDGET.max_length
    local_epochs: float = BUDGET.local_epochs
    max_steps: int | None = BUDGET.local_steps  # when set, overrides local_epochs
    warmup_ratio: float = BUDGET.warmup_ratio
    scheduler: str = "cosine"  # cosine | constant
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    train_on_prompt: bool = False  # the reference code trains on prompt+answer
    keep_optimizer_state: bool = False
    schedule_rounds: int | None = None  # one schedule across this many rounds; None: restart every round
    precision: str = BUDGET.precision  # auto | fp32 | bf16 (autocast; LoRA weights and AdamW state stay fp32), see precision.py
    prox_mu: float = 0.0  # FedProx: + mu/2 ||theta - theta_global||^2 over the trainable (LoRA) parameters
    dp_sgd: str = ""  # record-level DP-SGD, "noise=..,clip=..[,delta=..][,record=example|note]" (dp_sgd.py)
    seed: int = 0

    @classmethod
    def from_dict(cls, d: dict) -> TrainSettings:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class RoundStats:
    steps: int = 0
    num_examples: int = 0
    num_supervised_tokens: int = 0
    num_tokens: int = 0
    train_loss: float = float("nan")
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    privacy: dict | None = None  # DP-SGD: epsilon at delta over every step so far, and its settings
    truncation: dict | None = None  # FlexLoRA: the global adapter cut to this site's rank (SiteRuntime.set_adapter)

    @property
    def tokens_per_second(self) -> float:
        return self.num_tokens / self.seconds if self.seconds > 0 else 0.0


def collate(batch: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch for training; padded positions carry no loss."""
    width = max(len(ex["input_ids"]) for ex in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ex in enumerate(batch):
        n = len(ex["input_ids"])
        input_ids[row, :n] = torch.tensor(ex["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.tensor(ex["labels"], dtype=torch.long)
        attention[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def length_grouped_batches(examples: list[dict], batch_size: int, rng: random.Random) -> list[list[dict]]:
    """Shuffle, then sort within windows by length so batches carry little padding."""
    order = list(range(len(examples)))
    rng.shuffle(order)
    window = batch_size * 32
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: len(examples[i]["input_ids"]))
        batches += [[examples[i] for i in chunk[j : j + batch_size]] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def lr_lambda(total_steps: int, warmup_ratio: float, scheduler: str, offset: int = 0):
    """LR factor of step `offset + step` of a warm-up + cosine (or constant) over total_steps."""
    warmup = max(1, math.ceil(total_steps * warmup_ratio)) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        step += offset
        if warmup and step < warmup:
            return (step + 1) / warmup
        if scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _answer_token_losses(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token losses (rows x kept positions) and the mask of supervised ones.

    The vocabulary projection runs only at positions where some row has a target (the
    answer, not the prompt): on a small model it is a fifth of the compute per token.
    """
    targets = batch["labels"][:, 1:]  # the logit at position t predicts token t + 1
    keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep)
    logits = outputs.logits.float()
    kept = targets[:, keep]
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), kept, ignore_index=IGNORE_INDEX, reduction="none")
    return losses, kept != IGNORE_INDEX


def supervised_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Mean next-token loss over the batch's supervised tokens, and how many there were."""
    losses, supervised = _answer_token_losses(model, batch)
    n = int(supervised.sum())
    return losses.sum() / max(n, 1), n


def per_example_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Each row's own mean loss over its supervised tokens (DP-SGD's per-record loss)."""
    losses, supervised = _answer_token_losses(model, batch)
    counts = supervised.sum(dim=1)
    return losses.sum(dim=1) / counts.clamp(min=1), int(counts.sum())


def proximal_term(params: list[torch.nn.Parameter], anchors: list[torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx (Li et al. 2020): ``mu/2 * ||theta - theta_global||^2``; gradient ``mu (theta - theta_global)``."""
    return 0.5 * mu * sum(((p.float() - a.float()) ** 2).sum() for p, a in zip(params, anchors))


class LocalTrainer:
    """Trains the LoRA parameters of one PEFT model; the base stays frozen and loaded.

    What it trains on comes from the task model (``task_model.TaskModel.trainer``): its
    batches (`collate_fn`), its loss (`loss_fn`) and, for DP-SGD, its per-record loss
    (`per_example_loss_fn`). The defaults are the causal LM's; a custom `loss_fn`
    without a per-record loss cannot be trained with DP-SGD.
    """

    def __init__(
        self,
        model,
        pad_token_id: int,
        settings: TrainSettings,
        device: str | None = None,
        *,
        loss_fn=None,
        collate_fn=None,
        per_example_loss_fn=None,
    ):
        self.model = model
        self.loss_fn = loss_fn or supervised_loss
        self.collate_fn = collate_fn or collate
        self.per_example_loss_fn = per_example_loss_fn or (per_example_loss if loss_fn is None else None)
        self.pad_token_id = pad_token_id
        self.settings = settings
        self.device = device or next(model.parameters()).device
        self.precision = resolve_precision(settings.precision, self.device)
        self._optimizer: torch.optim.Optimizer | None = None
        self.rounds_done = 0  # the round index; a federation sets it from the server's round
        # rounds this site will train in all (a federation sets it from the server's plan):
        # what a DP-SGD epsilon budget is spread over
        self.planned_rounds: int | None = None
        self.dp = parse_dp_sgd(settings.dp_sgd)
        if self.dp is not None and self.per_example_loss_fn is None:
            raise ValueError("dp-sgd needs a per-record loss: the causal LM's loss has one, the BERT baseline's tagging loss does not")
        self.accountant = RdpAccountant()  # DP-SGD steps of every round at this site
        self._grad_sample_model = None

    def _trainable(self):
        return [p for p in self.model.parameters() if p.requires_grad]

    def _new_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self._trainable(), lr=self.settings.learning_rate, weight_decay=self.settings.weight_decay)

    def planned_steps(self, num_examples: int) -> int:
        if self.settings.max_steps:
            return int(self.settings.max_steps)
        per_epoch = math.ceil(num_examples / self.settings.batch_size)
        return max(1, math.ceil(per_epoch * self.settings.local_epochs))

    def _to_device(self, batch):
        return {k: v.to(self.device) for k, v in batch.items()}

    def train_round(self, examples: list[dict], *, progress: bool = False, on_step=None) -> RoundStats:
        if not examples:
            raise ValueError("no training examples at this site")
        s = self.settings
        total = self.planned_steps(len(examples))
        if self._optimizer is None or not s.keep_optimizer_state:
            self._optimizer = self._new_optimizer()  # the paper restarts the optimiser each round
        for group in self._optimizer.param_groups:
            group["lr"] = s.learning_rate
        if s.schedule_rounds:  # this round is one segment of a schedule over all rounds
            factor = lr_lambda(
                total * s.schedule_rounds, s.warmup_ratio, s.scheduler, offset=total * min(self.rounds_done, s.schedule_rounds - 1)
            )
        else:
            factor = lr_lambda(total, s.warmup_ratio, s.scheduler)
        schedule = torch.optim.lr_scheduler.LambdaLR(self._optimizer, factor)
        rng = random.Random(s.seed * 1000 + self.rounds_done)
        self.rounds_done += 1
        stats = RoundStats()
        seen: set[int] = set()
        # FedProx's anchor: the parameters this round starts from (the global adapter)
        anchors = [p.detach().clone() for p in self._trainable()] if s.prox_mu else None
        private = self._dp_plan(examples, total) if self.dp is not None else None
        bar = _progress(total, progress, "local training")
        self.model.train()
        started = time.perf_counter()
        batches: list[list[dict]] = []
        while stats.steps < total:
            if not batches:
                batches = length_grouped_batches(examples, s.batch_size, rng)
            if self.dp is None:
                batch_examples = batches.pop()
                loss, n_sup, n_tok = self._step(batch_examples, anchors)
            else:
                batch_examples, loss, n_sup, n_tok = self._dp_step(examples, private, rng)
            seen.update(id(ex) for ex in batch_examples)
            self._optimizer.step()
            schedule.step()
            self._optimizer.zero_grad(set_to_none=True)
            stats.steps += 1
            stats.num_supervised_tokens += n_sup
            stats.num_tokens += n_tok
            stats.losses.append(loss)
            if on_step:
                on_step(stats.steps, stats.losses[-1], schedule.get_last_lr()[0])
            bar.update(1)
            bar.set_postfix(loss=f"{stats.losses[-1]:.3f}")
        bar.close()
        stats.seconds = time.perf_counter() - started
        stats.num_examples = len(seen)
        sampled = [x for x in stats.losses if not math.isnan(x)]  # a DP-SGD step may sample no record
        stats.train_loss = sum(sampled) / len(sampled) if sampled else float("nan")
        if self.dp is not None:
            stats.privacy = {
                "epsilon": self.accountant.epsilon(self.dp.delta),
                "delta": self.dp.delta,
                "noise_multiplier": self.dp.noise_multiplier,
                "target_epsilon": self.dp.target_epsilon,
                "clip": self.dp.clip,
                "record": self.dp.record,
                "sample_rate": private.rate,
                "steps": self.accountant.releases,
            }
        return stats

    def _step(self, batch_examples: list[dict], anchors: list[torch.Tensor] | None) -> tuple[float, int, int]:
        """Forward and backward of one batch (gradients left on the parameters)."""
        batch = self._to_device(self.collate_fn(batch_examples, self.pad_token_id))
        with autocast(self.precision, self.device):
            loss, n_sup = self.loss_fn(self.model, batch)
        objective = loss + proximal_term(self._trainable(), anchors, self.settings.prox_mu) if anchors else loss
        objective.backward()
        if self.settings.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self._trainable(), self.settings.max_grad_norm)
        return float(loss.detach()), n_sup, int(batch["attention_mask"].sum())

    def _dp_plan(self, examples: list[dict], total: int) -> _PrivatePlan:
        """Records, and the sampling rate that puts batch_size records in a step on average
        (a note-level step trains every example of its notes, in batches of batch_size)."""
        if self.settings.prox_mu:
            raise ValueError("dp-sgd and FedProx together are not supported (the proximal term is not per record)")
        if self._grad_sample_model is None:
            from opacus import GradSampleModule

            self._grad_sample_model = GradSampleModule(self.model, loss_reduction="sum", strict=False)
        ids = record_ids(examples, self.dp.record)
        members: dict = {}
        for row, rec in enumerate(ids):
            members.setdefault(rec, []).append(row)
        rate = min(1.0, self.settings.batch_size / len(members))
        if self.dp.noise_multiplier is None:
            self.dp = self._noise_for_budget(rate, total)
        # A site restarted mid-federation has not counted the rounds it trained before: count
        # them as trained at these settings, so epsilon is never understated.
        missing = self.rounds_done * total - total - self.accountant.releases
        if missing > 0:
            self.accountant.step(self.dp.noise_multiplier, count=missing, sample_rate=rate)
        groups = list(members.values())
        record_of = {row: g for g, group in enumerate(groups) for row in group}
        return _PrivatePlan(groups=groups, record_of=record_of, rate=rate)

    def _noise_for_budget(self, rate: float, steps_per_round: int):
        """The DP settings with the noise that spends the epsilon budget over every planned
        step (rounds x this round's steps), chosen once, at the first round."""
        rounds = self.planned_rounds or self.settings.schedule_rounds or 1
        noise = noise_for_epsilon(self.dp.target_epsilon, self.dp.delta, rate, rounds * steps_per_round)
        log.info(
            "dp-sgd: noise multiplier %.4f spends epsilon %g (delta %g) over %d rounds x %d steps at sampling rate %.5f",
            noise,
            self.dp.target_epsilon,
            self.dp.delta,
            rounds,
            steps_per_round,
            rate,
        )
        return replace(self.dp, noise_multiplier=noise)

    def _dp_step(self, examples: list[dict], plan: _PrivatePlan, rng: random.Random) -> tuple[list[dict], float, int, int]:
        """One DP-SGD step: Poisson-sampled records, per-record clipped gradients plus noise."""
        params, size = self._trainable(), self.settings.batch_size
        rows = [row for g in poisson_sample(len(plan.groups), plan.rate, rng) for row in plan.groups[g]]
        per_record: dict[int, list[torch.Tensor]] = {}
        loss_sum, n_sup, n_tok = 0.0, 0, 0
        for start in range(0, len(rows), size):
            chunk = rows[start : start + size]
            batch = self._to_device(self.collate_fn([examples[r] for r in chunk], self.pad_token_id))
            with autocast(self.precision, self.device):
                losses, n = self.per_example_loss_fn(self._grad_sample_model, batch)
            losses.sum().backward()
            for rec, grads in gradients_by_record(params, [plan.record_of[r] for r in chunk]).items():
                per_record[rec] = grads if rec not in per_record else [a + b for a, b in zip(per_record[rec], grads)]
            for p in params:
                p.grad_sample, p.grad = None, None
            loss_sum += float(losses.detach().sum())
            n_sup, n_tok = n_sup + n, n_tok + int(batch["attention_mask"].sum())
        noisy_clipped_gradient(params, list(per_record.values()), self.dp, expected_records=plan.rate * len(plan.groups))
        self.accountant.step(self.dp.noise_multiplier, sample_rate=plan.rate)
        loss = loss_sum / len(rows) if rows else float("nan")
        return [examples[r] for r in rows], loss, n_sup, n_tok

    @torch.no_grad()
    def evaluate_loss(self, examples: list[dict], batch_size: int | None = None) -> tuple[float, int]:
        """Token-weighted mean loss on supervised tokens: (loss, number of tokens)."""
        if not examples:
            return float("nan"), 0
        self.model.eval()
        total_loss, total_tokens = 0.0, 0
        size = batch_size or self.settings.batch_size
        ordered = sorted(examples, key=lambda ex: len(ex["input_ids"]))
        for start in range(0, len(ordered), size):
            batch = self._to_device(self.collate_fn(ordered[start : start + size], self.pad_token_id))
            with autocast(self.precision, self.device):
                loss, n = self.loss_fn(self.model, batch)
            total_loss += float(loss) * n
            total_tokens += n
        self.model.train()
        return total_loss / max(total_tokens, 1), total_tokens


@dataclass
class _PrivatePlan:
    groups: list[list[int]]  # the example rows of each record
    record_of: dict[int, int]  # example row -> index of its record in groups
    rate: float  # Poisson sampling rate of a record per step


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, leave=False, mininterval=2.0)
