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
from dataclasses import dataclass, field

import torch

from fedmed_components.precision import autocast, resolve_precision

log = logging.getLogger("fedmed.training")

IGNORE_INDEX = -100


@dataclass
class TrainSettings:
    learning_rate: float = 2e-4
    batch_size: int = 4
    max_length: int = 800
    local_epochs: float = 1.0
    max_steps: int | None = None  # when set, overrides local_epochs
    warmup_ratio: float = 0.05
    scheduler: str = "cosine"  # cosine | constant
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    train_on_prompt: bool = False  # the reference code trains on prompt+answer
    keep_optimizer_state: bool = False
    schedule_rounds: int | None = None  # one schedule across this many rounds; None: restart every round
    precision: str = "auto"  # auto | fp32 | bf16 (autocast; LoRA weights and AdamW state stay fp32), see precision.py
    seed: int = 0

    @classmethod
    def from_dict(cls, d: dict) -> "TrainSettings":
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


def supervised_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Mean next-token loss over supervised tokens, and how many there were.

    The vocabulary projection runs only at positions where some row has a target (the
    answer, not the prompt): on a small model it is a fifth of the compute per token.
    """
    targets = batch["labels"][:, 1:]  # the logit at position t predicts token t + 1
    supervised = targets != IGNORE_INDEX
    n = int(supervised.sum())
    keep = supervised.any(dim=0).nonzero().squeeze(-1)
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep)
    logits = outputs.logits.float()
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets[:, keep].reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss / max(n, 1), n


class LocalTrainer:
    """Trains the LoRA parameters of one PEFT model; the base stays frozen and loaded."""

    def __init__(self, model, pad_token_id: int, settings: TrainSettings, device: str | None = None, *, loss_fn=None, collate_fn=None):
        self.model = model
        # The BERT baseline plugs in its tagging loss and batches (token_classification).
        self.loss_fn = loss_fn or supervised_loss
        self.collate_fn = collate_fn or collate
        self.pad_token_id = pad_token_id
        self.settings = settings
        self.device = device or next(model.parameters()).device
        self.precision = resolve_precision(settings.precision, self.device)
        self._optimizer: torch.optim.Optimizer | None = None
        self.rounds_done = 0  # the round index; a federation sets it from the server's round

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
            factor = lr_lambda(total * s.schedule_rounds, s.warmup_ratio, s.scheduler, offset=total * min(self.rounds_done, s.schedule_rounds - 1))
        else:
            factor = lr_lambda(total, s.warmup_ratio, s.scheduler)
        schedule = torch.optim.lr_scheduler.LambdaLR(self._optimizer, factor)
        rng = random.Random(s.seed * 1000 + self.rounds_done)
        self.rounds_done += 1
        stats = RoundStats()
        seen: set[int] = set()
        bar = _progress(total, progress, "local training")
        self.model.train()
        started = time.perf_counter()
        batches: list[list[dict]] = []
        while stats.steps < total:
            if not batches:
                batches = length_grouped_batches(examples, s.batch_size, rng)
            batch_examples = batches.pop()
            seen.update(id(ex) for ex in batch_examples)
            batch = self._to_device(self.collate_fn(batch_examples, self.pad_token_id))
            with autocast(self.precision, self.device):
                loss, n_sup = self.loss_fn(self.model, batch)
            loss.backward()
            if s.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(self._trainable(), s.max_grad_norm)
            self._optimizer.step()
            schedule.step()
            self._optimizer.zero_grad(set_to_none=True)
            stats.steps += 1
            stats.num_supervised_tokens += n_sup
            stats.num_tokens += int(batch["attention_mask"].sum())
            stats.losses.append(float(loss.detach()))
            if on_step:
                on_step(stats.steps, stats.losses[-1], schedule.get_last_lr()[0])
            bar.update(1)
            bar.set_postfix(loss=f"{stats.losses[-1]:.3f}")
        bar.close()
        stats.seconds = time.perf_counter() - started
        stats.num_examples = len(seen)
        stats.train_loss = sum(stats.losses) / len(stats.losses)
        return stats

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


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, leave=False, mininterval=2.0)
