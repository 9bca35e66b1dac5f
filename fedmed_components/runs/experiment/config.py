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
# FedAvgM over Fed-MedLoRA's token-weighted mean, one run per server lr (`server_lrs`):
# x += lr * m, m = momentum * m + mean update. A federation of K sites moves its global
# adapter about one site's steps a round; lr > 1 is how it can go as far as centralised.
SERVER_LR_KIND = "fed_avgm"
# Fed-MedLoRA with record-level DP-SGD at every site, one run per epsilon budget
# (`dp_epsilons`; runs fed_medlora_dp_eps<e>): each site picks the noise that spends that
# budget over all its steps at its own sampling rate (model/dp_sgd.py).
DP_KIND = "fed_medlora_dp"
# The kinds a config may name, in the order they are made; kinds.KINDS makes each one.
RUN_KINDS = ("zero_shot", "single", "centralised", *FEDERATED, SERVER_LR_KIND, DP_KIND, "bert", "new_site")


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
    dp_epsilons: list[float] = field(default_factory=lambda: [8.0])  # fed_medlora_dp: a run per epsilon (at dp_delta)
    dp_clip: float = 1.0  # fed_medlora_dp: per-record gradient clip
    dp_delta: float = 1e-5
    dp_record: str = "example"  # example | note: what one record is (a note's examples are clipped together)
    precision: str = BUDGET.precision  # training and generation: auto | fp32 | bf16 (precision.py)
    prompt_style: str = BUDGET.prompt_style  # paper | compact (prompts.PROMPT_STYLES): training and scoring alike
    f1_every_round: bool = False  # score every round's adapter on the sites' pooled VALIDATION split (learning curves)
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
    runs: list[str] = field(default_factory=lambda: list(RUN_KINDS))

    def run_ids(self) -> list[str]:
        """Run kinds expanded into concrete runs, in the order they are made."""
        ids = []
        for kind in self.runs:
            if kind == "single":
                ids += [f"single_{s.name}" for s in self.sites]
            elif kind == SERVER_LR_KIND:
                ids += [server_lr_id(lr) for lr in self.server_lrs]
            elif kind == DP_KIND:
                ids += [dp_id(eps) for eps in self.dp_epsilons]
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
    expanded = ("new_site", "single", SERVER_LR_KIND, DP_KIND)  # their ids are `<kind>_...`, never the bare kind
    if run_id in RUN_KINDS and run_id not in expanded:
        return run_id
    for kind in expanded:
        if run_id.startswith(f"{kind}_"):
            return kind
    raise ValueError(f"unknown run {run_id!r}")


def server_lr_id(lr: float) -> str:
    """fed_avgm_lr2, fed_avgm_lr0p5: the run of one server lr."""
    return f"{SERVER_LR_KIND}_lr" + f"{lr:g}".replace(".", "p")


def dp_id(epsilon: float) -> str:
    """fed_medlora_dp_eps8, fed_medlora_dp_eps0p5: the run of one epsilon budget."""
    return f"{DP_KIND}_eps" + f"{epsilon:g}".replace(".", "p")


def dp_sgd_of(cfg: ExperimentConfig, run_id: str) -> str:
    """The sites' --dp-sgd setting of a run ("" for a run without DP-SGD)."""
    if kind_of(run_id) != DP_KIND:
        return ""
    epsilon = next((e for e in cfg.dp_epsilons if dp_id(e) == run_id), None)
    if epsilon is None:
        raise ValueError(f"{run_id!r} is not a DP-SGD run of this config (dp_epsilons: {cfg.dp_epsilons})")
    return f"epsilon={epsilon:g},clip={cfg.dp_clip:g},delta={cfg.dp_delta:g},record={cfg.dp_record}"


def federated_job(cfg: ExperimentConfig, run_id: str) -> tuple[str, str, float | None]:
    """(job algorithm, Fed-MedLoRA+ loss source, server lr) of a federated run id."""
    if run_id in FEDERATED:
        return (*FEDERATED[run_id], None)
    if dp_sgd_of(cfg, run_id):
        return "fed_medlora", "sites", None
    lr = next((lr for lr in cfg.server_lrs if server_lr_id(lr) == run_id), None)
    if kind_of(run_id) != SERVER_LR_KIND or lr is None:
        raise ValueError(f"{run_id!r} is not a federated run of this config")
    return "fed_avgm", "sites", lr


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
    if not cfg.server_lrs or any(not isinstance(lr, (int, float)) or lr <= 0 for lr in cfg.server_lrs):
        raise InputError(path, _line_of(path, "server_lrs"), f"server_lrs must be a list of positive numbers, not {cfg.server_lrs!r}")
    if not cfg.dp_epsilons or any(not isinstance(e, (int, float)) or e <= 0 for e in cfg.dp_epsilons):
        raise InputError(path, _line_of(path, "dp_epsilons"), f"dp_epsilons must be a list of positive numbers, not {cfg.dp_epsilons!r}")
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
