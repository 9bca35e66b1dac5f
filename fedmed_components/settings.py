"""The training and LoRA budget: each setting's default and help text, written once.

It sits at the package root, beside errors.py, because every layer reads it; it imports
nothing from the package.

The site script, `fedmed train-local`, the job builder (`fedmed job export`), the demo and
the experiment YAML all take their defaults from `Budget`; their command-line options are
generated from its fields (`add_budget_arguments`), so a default or a help text cannot
drift between them. The defaults are the paper's (Fed-MedLoRA, Methods): LoRA r 16 /
alpha 64 / dropout 0 on all seven Llama projections, lr 2e-4, 800 tokens.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields

PAPER_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PRECISIONS = ("auto", "fp32", "bf16")
QUANTIZATIONS = ("auto", "4bit", "8bit", "none")
PROMPT_STYLES = ("paper", "compact")  # task/prompts.py defines each


def setting(default, help: str, *, choices: tuple | None = None):
    """A budget field: its default and the help text every command shows for it."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, (list, dict, set)):
        raise TypeError("budget defaults are immutable (use a tuple)")
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Budget:
    """What a site trains with. One instance, `BUDGET`, holds the defaults."""

    model: str = setting("smollm2-135m", "tiny | smollm2-135m | minilm | HF id | local folder (the same at every site)")
    quantize: str = setting("auto", "base model quantisation (auto: NF4 on CUDA, none on CPU)", choices=QUANTIZATIONS)
    precision: str = setting(
        "auto",
        "compute precision: bf16 autocast (LoRA weights and optimiser stay fp32) or fp32; "
        "auto: bf16 on CUDA and on CPUs with AVX512-BF16/AMX, else fp32",
        choices=PRECISIONS,
    )
    rank: int = setting(16, "LoRA rank")
    alpha: int = setting(64, "LoRA alpha (the update is scaled by alpha / rank)")
    dropout: float = setting(0.0, "LoRA dropout")
    target_modules: tuple[str, ...] = setting(PAPER_TARGET_MODULES, "comma-separated module names LoRA wraps")
    lr: float = setting(2e-4, "learning rate (AdamW)")
    batch_size: int = setting(4, "examples per training step")
    max_length: int = setting(800, "tokens per training example (longer ones are cut)")
    local_steps: int | None = setting(None, "training steps per round (overrides --local-epochs)")
    local_epochs: float = setting(1.0, "epochs over the site's examples per round (when --local-steps is not set)")
    warmup_ratio: float = setting(0.05, "share of the schedule spent warming the learning rate up")
    tasks: tuple[str, ...] = setting(("ner", "modifier"), "comma-separated tasks: ner, modifier")
    prompt_style: str = setting(
        "paper",
        "paper: the paper's full instructions, HTML answers; compact: a few-token instruction, "
        "modifiers answered as a JSON list (fewer tokens a step; predict with the same style)",
        choices=PROMPT_STYLES,
    )
    ner_sentences: int = setting(
        1,
        "consecutive sentences of a note in one NER example (its fixed prompt paid once for all of "
        "them; modifier examples stay one sentence); predict with the same",
    )

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


BUDGET = Budget()


def flag_of(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_budget_arguments(parser: argparse.ArgumentParser, names: tuple[str, ...] | None = None) -> None:
    """Add the budget's options (all, or `names`) to a parser, with its defaults and help."""
    for f in fields(Budget):
        if names is not None and f.name not in names:
            continue
        default = f.default
        kwargs = {"dest": f.name, "help": f.metadata["help"] + f" (default: {_shown(default)})"}
        if f.metadata["choices"]:
            kwargs["choices"] = f.metadata["choices"]
        if f.type.startswith("tuple"):
            kwargs.update(type=_comma_list, default=tuple(default))
        else:
            kwargs.update(type=_parser_type(f.type), default=default)
        parser.add_argument(flag_of(f.name), **kwargs)


def budget_from_args(args: argparse.Namespace) -> Budget:
    """The Budget a parsed command line holds (fields absent from the parser keep defaults)."""
    return Budget(**{n: getattr(args, n) for n in Budget.names() if hasattr(args, n)})


def _parser_type(annotation: str):
    """int, float or str from the field's annotation (a string under postponed evaluation)."""
    return float if annotation.startswith("float") else int if annotation.startswith("int") else str


def _comma_list(text: str) -> tuple[str, ...]:
    items = tuple(t.strip() for t in text.split(",") if t.strip())
    if not items:
        raise argparse.ArgumentTypeError("give at least one module name")
    return items


def _shown(value) -> str:
    return ",".join(value) if isinstance(value, tuple) else str(value)
