"""What one hospital does each round, without FLARE: the pure site runtime.

`SiteRuntime` loads the base model once, keeps it across rounds, and answers what the
federation asks of a site: train from a global adapter, report a validation loss, score
candidate adapters on its own validation split (Fed-MedLoRA+ without central data), and,
after the last round, score the final global adapter on its own test notes (cross-site
evaluation, docs/cross_site_evaluation.md). The FLARE client script in ``custom/`` only
moves these in and out.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedmed_components.data.document import Document, InputError, read_jsonl
from fedmed_components.model.modeling import LoraSettings, get_adapter_state, resolve_model, set_adapter_state
from fedmed_components.model.task_model import CAUSAL_LM, TASK_MODELS, task_model_for
from fedmed_components.model.training import RoundStats, TrainSettings
from fedmed_components.settings import BUDGET, add_budget_arguments
from fedmed_components.task.examples import SFTConfig

log = logging.getLogger("fedmed.site")


@dataclass
class SiteConfig:
    model: str = BUDGET.model
    data: str = ""
    mapping: str | None = None  # kiwi | maccrobat | phee for non-JSONL corpora
    quantize: str = BUDGET.quantize  # auto (4bit on CUDA) | 4bit | 8bit | none
    device: str | None = None
    gradient_checkpointing: bool = False
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    sft: SFTConfig = field(default_factory=SFTConfig)
    val_fraction: float = 0.1
    max_train_examples: int | None = None
    max_val_examples: int | None = 64
    task_model: str = "auto"  # auto (from the model config) | causal-lm | token-classification (BERT baseline)
    seed: int = 0
    lenient_input: bool = False  # skip bad notes/lines (counted, logged) instead of failing


@dataclass
class SiteData:
    train: list[Document]
    val: list[Document]
    types: set[str] | None  # the types this site annotates (None: full schema)
    skipped: str = ""  # what a lenient read skipped ("" when nothing)
    test: list[Document] = field(default_factory=list)  # test.jsonl: the held-out notes cross-site evaluation scores


def load_site_data(
    folder: str | os.PathLike, *, mapping: str | None = None, val_fraction: float = 0.1, seed: int = 0, lenient: bool = False
) -> SiteData:
    """A site folder holds train.jsonl (+ val.jsonl, + test.jsonl) or a corpus that is split
    here (a corpus has no test part). Bad input raises InputError naming file and line;
    `lenient` skips it, counted."""
    from fedmed_components.data.corpora import load_corpus, read_jsonl_checked
    from fedmed_components.data.document import ReadReport

    folder = Path(folder)
    if not folder.exists():
        raise InputError(folder, None, "site data folder does not exist")
    report = ReadReport()
    read = (lambda f: read_jsonl_checked(f, lenient=True, report=report)) if lenient else read_jsonl
    train_file, val_file, test_file = folder / "train.jsonl", folder / "val.jsonl", folder / "test.jsonl"
    test = []
    if train_file.exists():
        train = read(train_file)
        val = read(val_file) if val_file.exists() else []
        test = read(test_file) if test_file.exists() else []
    else:
        train, val = load_corpus(folder, mapping=mapping, lenient=lenient, report=report), []
    if not train:
        raise InputError(folder, None, "site has no training documents")
    skipped = ""
    if report.skipped:
        path, line, why = report.problems[0]
        skipped = f"{folder}: {report.summary()}; first {path}:{line}: {why}"
        log.warning("lenient input: %s", skipped)
    if not val and val_fraction > 0 and len(train) > 1:
        shuffled = sorted(train, key=lambda d: d.id)
        random.Random(seed).shuffle(shuffled)
        n_val = max(1, int(round(len(shuffled) * val_fraction)))
        val, train = shuffled[:n_val], shuffled[n_val:]
    return SiteData(train=train, val=val, types=_annotated_types(folder, mapping), skipped=skipped, test=test)


def _annotated_types(folder: Path, mapping: str | None) -> set[str] | None:
    """Partial-schema sites declare their types (manifest.json or corpus mapping)."""
    import json

    manifest = folder / "manifest.json"
    if manifest.exists():
        types = json.loads(manifest.read_text()).get("annotated_types")
        if types:
            return set(types)
    if mapping:
        from fedmed_components.data.schema import get_mapping

        return set(get_mapping(mapping).annotated_types)
    return None


class SiteRuntime:
    """One site's model, data and trainer, loaded once and reused every round."""

    def __init__(self, config: SiteConfig, site_name: str = "site"):
        self.config = config
        self.site_name = site_name
        torch.manual_seed(config.seed)
        self.model_path = resolve_model(config.model)
        self.task = task_model_for(config.task_model, self.model_path)  # the causal LM or the BERT tagger
        self.task_model = self.task.kind
        config.lora = self.task.lora_settings(config.lora)  # what is saved and reported is what trains
        self.tokenizer = self.task.load_tokenizer(self.model_path)
        self.model = self.task.load_trainable(
            self.model_path,
            config.lora,
            quantize=config.quantize,
            device=config.device,
            gradient_checkpointing=config.gradient_checkpointing,
            name=site_name,
        )
        self.device = next(self.model.parameters()).device
        self.trainer = self.task.trainer(self.model, self.tokenizer, config.train, device=self.device)
        self.train_examples: list[dict] = []
        self.val_examples: list[dict] = []
        self.val_docs: list[Document] = []  # scored by span F1 each round where the task model does (BERT baseline)
        self.test_docs: list[Document] = []  # scored once, with the final global adapter (`evaluate_adapter`)
        self.test_types: set[str] | None = None  # the types the test notes annotate (None: full schema)
        self.input_skipped = ""
        log.info("%s", self.settings_line())

    def settings_line(self) -> str:
        """What this site trains with, after the defaults and `auto`s are resolved: the one
        line a site logs at start (a per-site job's overrides show here)."""
        cfg, train = self.config, self.config.train
        device = str(self.device)
        quantize = cfg.quantize
        if quantize == "auto":
            from fedmed_components.model.modeling import default_quantization

            quantize = f"auto ({'none' if self.task_model == 'token-classification' else default_quantization(device)})"
        precision = getattr(self.trainer, "precision", train.precision)
        if train.precision == "auto":
            precision = f"auto ({precision})"
        data = cfg.data or (f"$FEDMED_DATA ({os.environ['FEDMED_DATA']})" if os.environ.get("FEDMED_DATA") else "-")
        return (
            f"{self.site_name} settings: model {cfg.model}, rank {cfg.lora.r}, alpha {cfg.lora.alpha}, lr {train.learning_rate:g}, "
            f"batch_size {train.batch_size}, max_length {train.max_length}, local_steps {train.max_steps or '-'}, "
            f"local_epochs {train.local_epochs:g}, quantize {quantize}, precision {precision}, device {device}, data {data}"
        )

    def build_examples(self, docs: list[Document], types: set[str] | None = None) -> list[dict]:
        """Examples for the site's task model: SFT prompts (LLM) or BIO windows (BERT)."""
        return self.task.build_examples(docs, self.tokenizer, max_length=self.config.train.max_length, types=types, sft=self._sft_config())

    def _sft_config(self) -> SFTConfig:
        cfg = self.config
        return SFTConfig(**{**cfg.sft.__dict__, "train_on_prompt": cfg.train.train_on_prompt})

    def load_data(self, *folders: str | os.PathLike) -> list[SiteData]:
        """One site folder, or several pooled (the centralised baseline); each keeps its own types."""
        cfg = self.config
        loaded, train, val = [], [], []
        for folder in folders:
            data = load_site_data(folder, mapping=cfg.mapping, val_fraction=cfg.val_fraction, seed=cfg.seed, lenient=cfg.lenient_input)
            train += self.build_examples(data.train, data.types)
            val += self.build_examples(data.val, data.types)
            loaded.append(data)
        self.val_docs = _cap([doc for data in loaded for doc in data.val], cfg.max_val_examples, cfg.seed)
        self.test_docs = [doc for data in loaded for doc in data.test]
        # pooled folders (the centralised baseline) share a type restriction only when they agree
        kinds = {frozenset(d.types) if d.types else None for d in loaded}
        self.test_types = set(next(iter(kinds))) if len(kinds) == 1 and None not in kinds else None
        self.input_skipped = "; ".join(d.skipped for d in loaded if d.skipped)
        self.train_examples = _cap(train, cfg.max_train_examples, cfg.seed)
        self.val_examples = _cap(val, cfg.max_val_examples, cfg.seed)
        if not self.train_examples:
            raise InputError(folders[0], None, "no training example could be built from the site's documents")
        log.info(
            "%s: %d train docs -> %d examples, %d val docs -> %d examples, %d test docs",
            self.site_name,
            sum(len(d.train) for d in loaded),
            len(self.train_examples),
            sum(len(d.val) for d in loaded),
            len(self.val_examples),
            len(self.test_docs),
        )
        return loaded

    def load_validation(self, path: str | os.PathLike) -> None:
        """Validation-only data (the server's held-out set): a JSONL file or a site folder."""
        path = Path(path)
        docs = read_jsonl(path) if path.is_file() else load_site_data(path, mapping=self.config.mapping, val_fraction=0).train
        self.val_examples = _cap(self.build_examples(docs), self.config.max_val_examples, self.config.seed)
        if not self.val_examples:
            raise InputError(path, None, "no validation example could be built")

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return get_adapter_state(self.model)

    def set_adapter(self, state: dict[str, torch.Tensor]) -> dict | None:
        """Load a global adapter; a rank other than the site's is projected by SVD (the
        best rank-r approximation of each layer's B·A). Returns what that cut lost
        ({global_rank, rank, residual}), None when the ranks match."""
        own = self.adapter_state()
        truncation = None
        if any(tuple(state[k].shape) != tuple(own[k].shape) for k in own if k in state):
            from fedmed_components.federation.aggregation import exact_lora
            from fedmed_components.federation.lora_keys import is_lora_A

            # LoRA's scaling is alpha / r: keep the product B·A·scaling when changing rank.
            global_rank = next(v.shape[0] for k, v in state.items() if is_lora_A(k))
            alpha = self.config.lora.alpha
            state, report = exact_lora(
                [state], [1.0], rank=self.config.lora.r, scalings=[alpha / global_rank], target_scaling=alpha / self.config.lora.r
            )
            # FlexLoRA: what the site's rank cannot hold of the global update, ||M - B A|| / ||M||
            truncation = {"global_rank": int(global_rank), "rank": self.config.lora.r, "residual": report["total_residual"]}
        set_adapter_state(self.model, {k: v.to(own[k].dtype) for k, v in state.items()})
        return truncation

    def train(
        self, global_state: dict[str, torch.Tensor] | None, *, progress: bool = False, on_step=None
    ) -> tuple[dict[str, torch.Tensor], RoundStats]:
        truncation = self.set_adapter(global_state) if global_state else None
        stats = self.trainer.train_round(self.train_examples, progress=progress, on_step=on_step)
        stats.truncation = truncation
        return self.adapter_state(), stats

    @property
    def val_supervised_tokens(self) -> int:
        return sum(ex["num_supervised_tokens"] for ex in self.val_examples)

    def validation_loss(self) -> tuple[float, int]:
        return self.trainer.evaluate_loss(self.val_examples)

    def validation_f1(self) -> float | None:
        """Lenient entity F1 on the validation notes where the task model scores it every
        round (the BERT baseline: tagging is cheap); None for the LLM, whose F1 needs
        generation (`fedmed eval` scores it)."""
        if not self.task.validates_f1 or not self.val_docs:
            return None
        from fedmed_components.task.metrics import score_documents

        preds, _ = self.task.predict(self.model, self.tokenizer, self.val_docs, max_length=self.config.train.max_length)
        self.model.train()
        return score_documents(self.val_docs, preds)["entities"]["lenient"]["f1"]

    def evaluate_adapter(self, state: dict[str, torch.Tensor] | None) -> dict:
        """n2c2 strict/lenient scores of an adapter (the federation's final global one) on
        this site's test notes; the site's own adapter and train/eval mode are restored.

        The notes: test.jsonl, else the validation notes (``split`` "val", capped like
        every validation set by max_val_examples). No notes at all: an entry with
        ``num_docs`` 0 and ``error``, not an exception. ``entities`` and ``modifiers`` are
        `score_documents`' entities (all types, with per_type) and relations (a modifier
        linked to its main entity: right type and span, right head); ``modifiers`` is
        None when this site does not predict them or its notes link none. `state` None:
        the adapter the model holds."""
        docs, split = (self.test_docs, "test") if self.test_docs else (self.val_docs, "val")
        if not docs:
            return {"split": None, "num_docs": 0, "error": "no test documents (no test.jsonl and no validation notes)"}
        from fedmed_components.model.inference import GenerationSettings
        from fedmed_components.task.metrics import score_documents

        tasks = tuple(self.config.sft.tasks)
        own, was_training = self.adapter_state(), self.model.training
        try:
            if state:
                self.set_adapter(state)
            preds, report = self.task.predict(
                self.model,
                self.tokenizer,
                docs,
                settings=GenerationSettings(precision=self.config.train.precision),
                max_length=self.config.train.max_length,
                tasks=tasks,
                prompt_style=self.config.sft.prompt_style,
                ner_sentences=self.config.sft.ner_sentences,
            )
        finally:
            set_adapter_state(self.model, own)
            self.model.train(was_training)
        result = score_documents(docs, preds, types=self.test_types, parse_failures=report.parse_failures)
        links = "modifier" in tasks or self.task.kind != CAUSAL_LM  # the BERT tagger always tags both layers
        return {
            "split": split,
            "num_docs": len(docs),
            "entities": result["entities"],
            "modifiers": result["relations"] if links and any(doc.relations for doc in docs) else None,
            "parse_failures": result["parse_failures"],
            "types": sorted(self.test_types) if self.test_types else None,
        }

    def score_candidates(self, candidates: list[dict[str, torch.Tensor]]) -> list[float]:
        """Validation loss of each candidate adapter; the site's own adapter is restored."""
        own = self.adapter_state()
        losses = []
        try:
            for state in candidates:
                self.set_adapter(state)
                losses.append(self.validation_loss()[0])
        finally:
            set_adapter_state(self.model, own)
        return losses


def _cap(items: list, limit: int | None, seed: int) -> list:
    if not limit or len(items) <= limit:
        return items
    return random.Random(seed).sample(items, limit)


def add_site_arguments(parser) -> None:
    """Site options shared by the FLARE site script and `fedmed train-local`: the budget's
    (generated from settings.Budget) and the site's own."""
    d, t = SiteConfig(), TrainSettings()
    add_budget_arguments(parser)
    parser.add_argument(
        "--task-model",
        default=d.task_model,
        choices=TASK_MODELS,
        help="causal-lm (generative IE, the paper's method) or token-classification (the BERT BIO baseline); auto: token-classification for encoder models (BERT, RoBERTa, ...)",
    )
    parser.add_argument(
        "--data", default=d.data, help="site data folder (default: $FEDMED_DATA); <data>/<site name> is used when it exists"
    )
    parser.add_argument(
        "--mapping", default=None, help="corpus mapping for BRAT/BioC data: kiwi | maccrobat | phee, or a mapping file (YAML/JSON)"
    )
    parser.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda if available)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument(
        "--keep-optimizer-state", action="store_true", help="do not restart AdamW each round (its moments stay at the site)"
    )
    parser.add_argument(
        "--schedule-rounds",
        type=int,
        default=None,
        help="one warm-up + cosine schedule across this many rounds (the job's rounds) instead of a restart every round",
    )
    parser.add_argument(
        "--prox-mu",
        type=float,
        default=t.prox_mu,
        help="FedProx: add mu/2 ||theta - theta_global||^2 over the LoRA parameters to the local loss (0: off)",
    )
    parser.add_argument(
        "--dp-sgd",
        default=t.dp_sgd,
        metavar="noise=S|epsilon=E,clip=C[,delta=D][,record=example|note]",
        help="record-level DP-SGD (Opacus per-example gradients): each example or each note is a record, "
        "Poisson-sampled, clipped to C, Gaussian noise S*C; epsilon=E instead of noise=S: the site picks the "
        "noise that spends E over all the job's rounds at its own sampling rate; epsilon at delta is reported every round",
    )
    parser.add_argument("--train-on-prompt", action="store_true", help="loss on prompt+answer (reference code)")
    parser.add_argument("--val-fraction", type=float, default=d.val_fraction)
    parser.add_argument("--max-train-examples", type=int, default=None)
    parser.add_argument("--max-val-examples", type=int, default=d.max_val_examples)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument(
        "--lenient-input", action="store_true", help="skip malformed notes/lines (counted and logged) instead of failing on the first"
    )


def site_config_from_args(args) -> SiteConfig:
    return SiteConfig(
        model=args.model,
        data=args.data,
        mapping=args.mapping,
        quantize=args.quantize,
        device=args.device,
        gradient_checkpointing=args.gradient_checkpointing,
        lora=LoraSettings(r=args.rank, alpha=args.alpha, dropout=args.dropout, target_modules=list(args.target_modules)),
        train=TrainSettings(
            learning_rate=args.lr,
            batch_size=args.batch_size,
            max_length=args.max_length,
            local_epochs=args.local_epochs,
            max_steps=args.local_steps,
            warmup_ratio=args.warmup_ratio,
            keep_optimizer_state=args.keep_optimizer_state,
            schedule_rounds=args.schedule_rounds,
            precision=args.precision,
            prox_mu=args.prox_mu,
            dp_sgd=args.dp_sgd,
            train_on_prompt=args.train_on_prompt,
            seed=args.seed,
        ),
        sft=SFTConfig(tasks=args.tasks, prompt_style=args.prompt_style, ner_sentences=args.ner_sentences),
        val_fraction=args.val_fraction,
        max_train_examples=args.max_train_examples,
        max_val_examples=args.max_val_examples,
        task_model=args.task_model,
        seed=args.seed,
        lenient_input=args.lenient_input,
    )


def site_data_folder(data: str, site_name: str) -> Path:
    """--data, else $FEDMED_DATA (each hospital points it at its own notes);
    <root>/<site name> is used when it exists, so one root can serve a simulator run."""
    root = data or os.environ.get("FEDMED_DATA", "")
    if not root:
        raise InputError(None, None, f"{site_name}: no site data; pass --data or set FEDMED_DATA")
    per_site = Path(root) / site_name
    # a link whose target is gone is this site's folder, missing (not the shared root)
    return per_site if per_site.is_dir() or per_site.is_symlink() else Path(root)
