"""An experiment's config: `ExperimentConfig` read from YAML, its run kinds and run ids.

The config names the sites, the external / new-site cohort, the model and the training
budget, and the run kinds to make; `ExperimentConfig.run_ids` expands the kinds into
concrete runs (one per site for `single`, shots x seeds x start for `new_site`).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from fedmed_components.data.document import InputError
from fedmed_components.federation.aggregation import FED_PLUS_TEMPERATURE
from fedmed_components.runs.experiment.data import DataSource, Sampling
from fedmed_components.settings import BUDGET

FEDERATED = {  # run name -> (job algorithm, Fed-MedLoRA+ loss source)
    "fed_medlora": ("fed_medlora", "sites"),
    "fed_medlora_plus": ("fed_medlora_plus", "sites"),
    "fed_medlora_plus_server": ("fed_medlora_plus", "server"),
    "fedsa_lora": ("fedsa_lora", "sites"),
    "fed_exact_lora": ("fed_exact_lora", "sites"),
}
# Swept kinds: one federated run per value of a config list, the value in the run id
# (fed_avgm_lr2, fed_prox_mu0p01, fed_medlora_dp_eps8). kind -> (the config list, the id's
# tag, the job algorithm, the JobSpec field the value sets; None: it goes to --dp-sgd).
# - fed_avgm / fed_adam / fed_yogi: server optimisers over Fed-MedLoRA's token-weighted
#   mean update (federation/server_optimizer.py), one run per server lr. A federation of K
#   sites moves its adapter about one site's steps a round; a server lr is how it can go
#   further. fed_avgm lr 1 without momentum is Fed-MedLoRA itself.
# - fed_prox: Fed-MedLoRA with the sites' proximal term, one run per mu.
# - fed_medlora_dp: Fed-MedLoRA with record-level DP-SGD at every site, one run per epsilon
#   budget: each site picks the noise that spends it at its own sampling rate (dp_sgd.py).
# - fed_medlora_plus_temperature: Fed-MedLoRA+ with weights exp((1 - L_k) / T), a run per T:
#   at losses of 0.2-0.4, T = 1 is nearly plain averaging; a small T makes the weights differ.
# - fed_medlora_plus_site_batch: Fed-MedLoRA+ with a smaller batch at each site and as many
#   more local steps, so every site trains the same examples a round: a federation's global
#   adapter moves about one site's steps a round, and K sites at batch B/K take K times the
#   steps, the path centralised takes at batch B (config.site_local_steps).
SWEPT = {
    "fed_avgm": ("server_lrs", "lr", "fed_avgm", "server_lr"),
    "fed_adam": ("fed_adam_lrs", "lr", "fed_adam", "server_lr"),
    "fed_yogi": ("fed_yogi_lrs", "lr", "fed_yogi", "server_lr"),
    "fed_prox": ("prox_mus", "mu", "fed_prox", "prox_mu"),
    "fed_medlora_dp": ("dp_epsilons", "eps", "fed_medlora", None),
    "fed_medlora_plus_temperature": ("temperatures", "t", "fed_medlora_plus", "temperature"),
    "fed_medlora_plus_site_batch": ("site_batch_sizes", "b", "fed_medlora_plus", "batch_size"),
}
SERVER_LR_KIND = "fed_avgm"
DP_KIND = "fed_medlora_dp"
SITE_BATCH_KIND = "fed_medlora_plus_site_batch"
# FlexLoRA-style per-site ranks (`site_ranks`): exact aggregation of the products B_k A_k,
# each site sent the global update truncated by SVD to its own rank.
FLEXLORA_KIND = "fed_flexlora"
# The kinds a config may name, in the order they are made; kinds.KINDS makes each one.
RUN_KINDS = ("zero_shot", "single", "centralised", *FEDERATED, *SWEPT, FLEXLORA_KIND, "bert", "new_site")


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    model: str = BUDGET.model
    quantize: str = BUDGET.quantize  # auto: NF4 on CUDA (8B on GPUs), unquantised on CPU
    seed: int = 0
    rank: int = BUDGET.rank
    alpha: int = BUDGET.alpha
    rounds: int = 3
    local_steps: int | None = BUDGET.local_steps  # per site per round; None: local_epochs
    local_epochs: float = BUDGET.local_epochs
    batch_size: int = BUDGET.batch_size
    max_length: int = BUDGET.max_length
    lr: float = BUDGET.lr
    max_val_examples: int = 64
    generation_batch_size: int = 16
    max_new_tokens: int = 256  # cap on an answer (the input sentence with tags)
    # "run": one warm-up + cosine across all rounds, AdamW kept between rounds (at every
    # site); "round": the paper's restart of both every round
    schedule: str = "run"
    # Fed-MedLoRA+'s weights exp((1 - L_k) / temperature), times each site's supervised
    # tokens when use_sizes (the federated Fed-MedLoRA+ runs; nothing else reads them)
    temperature: float = FED_PLUS_TEMPERATURE
    use_sizes: bool = False
    server_lrs: list[float] = field(default_factory=lambda: [1.0])  # fed_avgm: a run per server lr
    server_momentum: float = 0.0  # fed_avgm's beta1 (0: the mean update scaled by lr)
    # fed_adam / fed_yogi: a run per server lr (beta1 0.9, beta2 0.99, tau 1e-3: the job's
    # defaults). With tau >> the update, lr 1e-2 makes the first server step the mean update.
    fed_adam_lrs: list[float] = field(default_factory=lambda: [1e-2])
    fed_yogi_lrs: list[float] = field(default_factory=lambda: [1e-2])
    prox_mus: list[float] = field(default_factory=lambda: [0.01])  # fed_prox: a run per mu
    temperatures: list[float] = field(default_factory=lambda: [0.1])  # fed_medlora_plus_temperature: a run per T
    # fed_medlora_plus_site_batch: a run per site batch size, each dividing local_steps x batch_size
    site_batch_sizes: list[int] = field(default_factory=lambda: [4])
    site_ranks: dict[str, int] = field(default_factory=dict)  # fed_flexlora: site name -> its LoRA rank (others: rank)
    dp_epsilons: list[float] = field(default_factory=lambda: [8.0])  # fed_medlora_dp: a run per epsilon (at dp_delta)
    dp_clip: float = 1.0  # fed_medlora_dp: per-record gradient clip
    dp_delta: float = 1e-5
    dp_record: str = "example"  # example | note: what one record is (a note's examples are clipped together)
    precision: str = BUDGET.precision  # training and generation: auto | fp32 | bf16 (precision.py)
    prompt_style: str = BUDGET.prompt_style  # paper | compact (prompts.PROMPT_STYLES): training and scoring alike
    # consecutive sentences in one NER example and prediction; the site folders then hold runs
    # of this many sentences as their documents (data.sentence_documents)
    ner_sentences: int = BUDGET.ner_sentences
    f1_every_round: bool = False  # score every round's adapter on the sites' pooled VALIDATION split (learning curves)
    # federated runs: each site also keeps its own trained adapter every round, and each is
    # scored like the global one (what the mean keeps of each site's skills; a diagnostic)
    site_adapter_f1: bool = False
    # federated runs: each site's own last-round adapter (kept at the site, never sent)
    # scored on that site's own validation (every round) and test split: the personalised
    # model a hospital that deploys its own adapter gets, beside the global one
    personalised: bool = False
    # LLM runs: the final adapter's modifiers asked again with the empty answer's logit
    # lowered by each bias (inference.predict_modifiers); the one validation F1 picks scores
    # test as "calibrated_modifiers" beside the plain scores. [] = off; else include 0.
    modifier_none_biases: list[float] = field(default_factory=list)
    checkpoints_per_round: int = 1  # centralised: a learning-curve point this many times per round
    simulator_timeout: float = 7200
    sampling: Sampling = field(default_factory=Sampling)
    sites: list[DataSource] = field(default_factory=list)
    external: DataSource | None = None  # a cohort no site trains on; also the new site
    new_site_shots: list[int] = field(default_factory=lambda: [8, 32])
    new_site_seeds: list[int] = field(default_factory=lambda: [0])  # which shots are drawn; mean and spread over these
    new_site_steps: int = 20
    new_site_from: str = "fed_medlora_plus"  # whose global adapter the new site starts from
    bert_model: str = "minilm"  # the BERT baseline's encoder (Bio_ClinicalBERT id on a GPU machine)
    bert_lr: float = 1e-3
    bert_local_steps: int | None = None  # per site per round, pooled like centralised; None: local_steps (an encoder step is ~100x cheaper)
    # every kind but fed_flexlora (it needs site_ranks for the config's own sites) and the
    # site-batch runs (they need local_steps: a round's examples are counted in steps)
    runs: list[str] = field(default_factory=lambda: [k for k in RUN_KINDS if k not in (FLEXLORA_KIND, SITE_BATCH_KIND)])

    def run_ids(self) -> list[str]:
        """Run kinds expanded into concrete runs, in the order they are made."""
        ids = []
        for kind in self.runs:
            if kind == "single":
                ids += [f"single_{s.name}" for s in self.sites]
            elif kind in SWEPT:
                ids += [swept_id(kind, value) for value in getattr(self, SWEPT[kind][0])]
            elif kind == "new_site":
                if self.external is None:
                    raise ValueError("run new_site needs an external cohort")
                ids += [
                    new_site_id(start, n, seed, len(self.new_site_seeds) > 1)
                    for seed in self.new_site_seeds
                    for n in self.new_site_shots
                    for start in ("scratch", "federated")
                ]
            else:
                ids.append(kind)
        return ids

    def to_dict(self) -> dict:
        return asdict(self)


def kind_of(run_id: str) -> str:
    """The run kind a run id was expanded from (the inverse of `run_ids`)."""
    expanded = ("new_site", "single", *SWEPT)  # their ids are `<kind>_...`, never the bare kind
    if run_id in RUN_KINDS and run_id not in expanded:
        return run_id
    for kind in sorted(expanded, key=len, reverse=True):  # fed_medlora_dp_... before any shorter prefix
        if run_id.startswith(f"{kind}_"):
            return kind
    raise ValueError(f"unknown run {run_id!r}")


def swept_id(kind: str, value: float) -> str:
    """fed_avgm_lr2, fed_adam_lr0p01, fed_prox_mu0p01, fed_medlora_dp_eps8: one value's run."""
    return f"{kind}_{SWEPT[kind][1]}" + f"{value:g}".replace(".", "p")


def swept_value(cfg: ExperimentConfig, run_id: str) -> float:
    """The value of a swept run (its server lr, mu or epsilon), which must be in the config's list."""
    kind = kind_of(run_id)
    values = getattr(cfg, SWEPT[kind][0])
    value = next((v for v in values if swept_id(kind, v) == run_id), None)
    if value is None:
        raise ValueError(f"{run_id!r} is not a run of this config ({SWEPT[kind][0]}: {values})")
    return value


def dp_sgd_of(cfg: ExperimentConfig, run_id: str) -> str:
    """The sites' --dp-sgd setting of a run ("" for a run without DP-SGD)."""
    if kind_of(run_id) != DP_KIND:
        return ""
    return f"epsilon={swept_value(cfg, run_id):g},clip={cfg.dp_clip:g},delta={cfg.dp_delta:g},record={cfg.dp_record}"


def job_settings(cfg: ExperimentConfig, run_id: str) -> dict:
    """The JobSpec fields a federated run sets: its algorithm and what it changes (server
    lr and momentum, mu, per-site ranks); the rest of the job is the config's budget."""
    if run_id in FEDERATED:
        algorithm, loss_source = FEDERATED[run_id]
        return {"algorithm": algorithm, "loss_source": loss_source}
    kind = kind_of(run_id)
    if kind == FLEXLORA_KIND:
        return {"algorithm": "fed_exact_lora", "site_overrides": {site: {"rank": str(r)} for site, r in cfg.site_ranks.items()}}
    if kind not in SWEPT:
        raise ValueError(f"{run_id!r} is not a federated run")
    _, _, algorithm, job_field = SWEPT[kind]
    settings = {"algorithm": algorithm}
    if job_field:
        settings[job_field] = swept_value(cfg, run_id)
    else:
        swept_value(cfg, run_id)  # refuses a value the config does not list
    if kind == SERVER_LR_KIND:
        settings["server_beta1"] = cfg.server_momentum
    if kind == SITE_BATCH_KIND:
        settings["local_steps"] = site_local_steps(cfg, settings["batch_size"])
    return settings


def site_local_steps(cfg: ExperimentConfig, site_batch: int) -> int:
    """Local steps a round at `site_batch` that train the examples `local_steps` x `batch_size` do."""
    if not cfg.local_steps:
        raise ValueError("a site batch needs local_steps (a round's examples are local_steps x batch_size)")
    examples = cfg.local_steps * cfg.batch_size
    if examples % site_batch:
        raise ValueError(f"site batch {site_batch} does not divide a round's {examples} examples (local_steps x batch_size)")
    return examples // site_batch


def new_site_id(start: str, shots: int, seed: int, with_seed: bool) -> str:
    return f"new_site_{start}_{shots}" + (f"_s{seed}" if with_seed else "")


def parse_new_site_id(run_id: str) -> tuple[str, int, int | None]:
    """(start, shots, seed or None) of a new-site run id."""
    parts = run_id[len("new_site_") :].split("_")
    seed = int(parts.pop()[1:]) if parts[-1].startswith("s") else None
    return parts[0], int(parts[1]), seed


def lora_settings(cfg: ExperimentConfig):
    """The adapter shape every run of the experiment trains and scores."""
    from fedmed_components.model.modeling import LoraSettings

    return LoraSettings(r=cfg.rank, alpha=cfg.alpha)


def load_config(path: str | os.PathLike) -> ExperimentConfig:
    """Read a YAML experiment config; relative data paths are relative to the file."""
    import yaml

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        raise InputError(path, None if line is None else line + 1, f"not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise InputError(path, None, "an experiment config is a mapping of settings")

    def build(cls, data, where: str):
        if not isinstance(data, dict):
            raise InputError(path, None, f"{where}: expected a mapping")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(path, _line_of(path, unknown[0]), f"{where}: unknown setting(s) {unknown}; known: {sorted(known)}")
        types = {f.name: str(f.type) for f in fields(cls)}
        return {key: _typed(value, types[key], path, key) for key, value in data.items()}

    def source(data, where):
        src = DataSource(**build(DataSource, data, where))
        from fedmed_components.data.schema import is_mapping_file

        for attr in ("path", "test_path", "mapping"):
            value = getattr(src, attr)
            if attr == "mapping" and not (isinstance(value, str) and is_mapping_file(value)):
                continue  # a built-in mapping's name, not a file
            if value and not Path(value).is_absolute():
                setattr(src, attr, str((path.parent / value).resolve()))
        return src

    top = dict(build(ExperimentConfig, raw, "experiment"))
    top["sampling"] = Sampling(**build(Sampling, top.get("sampling", {}), "sampling"))
    top["sites"] = [source(s, f"sites[{i}]") for i, s in enumerate(top.get("sites") or [])]
    if top.get("external"):
        top["external"] = source(top["external"], "external")
    cfg = ExperimentConfig(**top)
    if not cfg.sites:
        raise InputError(path, None, "an experiment needs at least one site")
    if cfg.schedule not in ("run", "round"):
        raise InputError(path, _line_of(path, "schedule"), f"schedule must be run or round, not {cfg.schedule!r}")
    from fedmed_components.task.prompts import PROMPT_STYLES

    if cfg.prompt_style not in PROMPT_STYLES:
        raise InputError(
            path, _line_of(path, "prompt_style"), f"prompt_style must be one of {sorted(PROMPT_STYLES)}, not {cfg.prompt_style!r}"
        )
    if not isinstance(cfg.ner_sentences, int) or cfg.ner_sentences < 1:
        raise InputError(path, _line_of(path, "ner_sentences"), f"ner_sentences must be a positive integer, not {cfg.ner_sentences!r}")
    for name, *_ in SWEPT.values():
        values = getattr(cfg, name)
        if not values or any(v <= 0 for v in values):
            raise InputError(path, _line_of(path, name), f"{name} must be a list of positive numbers, not {values!r}")
    biases = cfg.modifier_none_biases
    if biases and (not isinstance(biases, list) or 0 not in biases or any(not isinstance(b, (int, float)) or b < 0 for b in biases)):
        raise InputError(
            path,
            _line_of(path, "modifier_none_biases"),
            f"modifier_none_biases must list 0 (plain greedy decoding) and other non-negative numbers, not {biases!r}",
        )
    if biases and not PROMPT_STYLES[cfg.prompt_style].compact:
        raise InputError(
            path, _line_of(path, "modifier_none_biases"), "modifier_none_biases needs JSON modifier answers: prompt_style compact"
        )
    if SITE_BATCH_KIND in cfg.runs:
        for b in cfg.site_batch_sizes:
            try:
                site_local_steps(cfg, b)
            except ValueError as exc:
                raise InputError(path, _line_of(path, "site_batch_sizes"), f"site_batch_sizes: {exc}") from None
    site_names = {s.name for s in cfg.sites}
    if not isinstance(cfg.site_ranks, dict) or any(
        site not in site_names or not isinstance(r, int) or isinstance(r, bool) or r <= 0 for site, r in cfg.site_ranks.items()
    ):
        raise InputError(
            path,
            _line_of(path, "site_ranks"),
            f"site_ranks must map site names {sorted(site_names)} to positive ranks, not {cfg.site_ranks!r}",
        )
    if FLEXLORA_KIND in cfg.runs and not cfg.site_ranks:
        raise InputError(path, _line_of(path, FLEXLORA_KIND), f"run {FLEXLORA_KIND} needs site_ranks (site name -> LoRA rank)")
    try:
        from fedmed_components.model.dp_sgd import DPSGDSettings

        DPSGDSettings(None, clip=cfg.dp_clip, delta=cfg.dp_delta, record=cfg.dp_record, target_epsilon=cfg.dp_epsilons[0])
    except (TypeError, ValueError) as exc:
        word = next((w for w in ("dp_clip", "dp_delta", "dp_record") if w[3:] in str(exc)), "dp_")
        raise InputError(path, _line_of(path, word), str(exc)) from None
    bad = [r for r in cfg.runs if r not in RUN_KINDS]
    if bad:
        raise InputError(path, _line_of(path, bad[0]), f"unknown run(s) {bad}; known: {list(RUN_KINDS)}")
    return cfg


def _number(value, kind: str, path: Path, key: str):
    # PyYAML reads 1e-5 (no dot) as a string: YAML 1.1 floats need one. Take it as a number.
    if kind == "float" and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    ok = (
        isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind == "float"
        else isinstance(value, int) and not isinstance(value, bool)
    )
    if not ok:
        raise InputError(path, _line_of(path, key), f"{key}: expected {'a number' if kind == 'float' else 'an integer'}, not {value!r}")
    return value


def _typed(value, annotation: str, path: Path, key: str):
    """A setting's value checked against its field's type: numbers (and lists of numbers)
    where a number is wanted, a clear error naming the line otherwise."""
    optional = annotation.endswith("| None")
    kind = annotation.removesuffix(" | None")
    if value is None and optional:
        return None
    if kind in ("float", "int"):
        return _number(value, kind, path, key)
    if kind in ("list[float]", "list[int]"):
        if not isinstance(value, list):
            raise InputError(path, _line_of(path, key), f"{key}: expected a list, not {value!r}")
        return [_number(v, kind[5:-1], path, key) for v in value]
    if kind == "bool" and not isinstance(value, bool):
        raise InputError(path, _line_of(path, key), f"{key}: expected true or false, not {value!r}")
    return value


def _line_of(path: Path, word: str) -> int | None:
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if word in line:
            return number
    return None
