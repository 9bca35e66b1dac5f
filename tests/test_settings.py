"""One settings source: the budget's defaults are written once, in fedmed_components/settings.py.

An AST scan of the package fails when a budget setting (rank, alpha, lr, batch size, max
length, local steps, ...) gets a literal default anywhere else: a dataclass field, a
function parameter or an `add_argument(default=...)`. The commands' parsers are then
checked to show the budget's defaults and help texts.
"""

import argparse
import ast
from pathlib import Path

import pytest

from fedmed_components.settings import BUDGET, Budget, add_budget_arguments, budget_from_args, flag_of

PACKAGE = Path(__file__).resolve().parents[1] / "fedmed_components"
SOURCE = PACKAGE / "settings.py"

# The names a budget setting goes by in the code (peft's and HF's spellings included).
ALIASES = {name: name for name in Budget.names()} | {
    "r": "rank",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "learning_rate": "lr",
    "max_steps": "local_steps",
    "warmup": "warmup_ratio",
}
FLAGS = {flag_of(n): n for n in Budget.names()} | {"--learning-rate": "lr"}


def _literal(node) -> bool:
    """A default written out (a number, a string, a tuple of them), not a reference."""
    if isinstance(node, ast.Constant):
        return node.value is not None and not isinstance(node.value, bool)
    if isinstance(node, ast.UnaryOp):
        return _literal(node.operand)
    if isinstance(node, (ast.Tuple, ast.List)):
        return bool(node.elts) and all(_literal(e) for e in node.elts)
    if isinstance(node, ast.Lambda):
        return _literal(node.body)
    return False


def _field_default(value):
    """`x = 3` or `x = field(default=3)` / `field(default_factory=lambda: [...])`."""
    if isinstance(value, ast.Call) and getattr(value.func, "id", None) == "field":
        for kw in value.keywords:
            if kw.arg in ("default", "default_factory"):
                return kw.value
        return None
    return value


# Same names, other settings: each is its own default, written once where it lives.
OTHER_SETTINGS = {
    ("commands/data.py", "add_argument(--alpha, default=...)"): "data split's Dirichlet concentration",
    ("flare/aggregators.py", "__init__(lr=...)"): "the server optimiser's learning rate",
    ("model/inference.py", "GenerationSettings.batch_size"): "sentences generated at once",
    ("commands/predict.py", "add_argument(--batch-size, default=...)"): "sentences generated at once",
}


def written_defaults(path: Path) -> list[str]:
    found = []
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for stmt in node.body:
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value is not None:
                    if stmt.target.id in ALIASES and _literal(_field_default(stmt.value)):
                        found.append((stmt.lineno, f"{node.name}.{stmt.target.id}"))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            positional = args.posonlyargs + args.args
            pairs = list(zip(positional[len(positional) - len(args.defaults) :], args.defaults))
            pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
            for arg, default in pairs:
                if arg.arg in ALIASES and _literal(default):
                    found.append((node.lineno, f"{node.name}({arg.arg}=...)"))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            flags = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            default = next((kw.value for kw in node.keywords if kw.arg == "default"), None)
            if any(f in FLAGS for f in flags) and default is not None and _literal(default):
                found.append((node.lineno, f"add_argument({flags[0]}, default=...)"))
    return found


def test_no_budget_default_is_written_outside_the_settings_module():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(PACKAGE))
        if path != SOURCE:
            offenders += [f"{rel}:{line} {what}" for line, what in written_defaults(path) if (rel, what) not in OTHER_SETTINGS]
    assert not offenders, "budget defaults written again (take them from fedmed_components/settings.py BUDGET):\n" + "\n".join(offenders)


def test_the_scan_finds_each_way_of_writing_a_default(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from dataclasses import dataclass, field\n"
        "@dataclass\n"
        "class A:\n"
        "    rank: int = 8\n"
        "    alpha: int = BUDGET.alpha\n"
        "    target_modules: list = field(default_factory=lambda: ['q_proj'])\n"
        "def f(x, lr=1e-3, *, max_length=None): pass\n"
        "p.add_argument('--batch-size', type=int, default=4)\n"
        "p.add_argument('--out', default='x')\n"
    )
    assert written_defaults(sample) == [
        (4, "A.rank"),
        (6, "A.target_modules"),
        (7, "f(lr=...)"),
        (8, "add_argument(--batch-size, default=...)"),
    ]


def test_generated_options_parse_into_a_budget():
    parser = argparse.ArgumentParser()
    add_budget_arguments(parser)
    budget = budget_from_args(
        parser.parse_args(["--rank", "8", "--target-modules", "q_proj,v_proj", "--lr", "1e-3", "--local-steps", "20"])
    )
    assert (budget.rank, budget.target_modules, budget.lr, budget.local_steps) == (8, ("q_proj", "v_proj"), 1e-3, 20)
    assert budget.alpha == BUDGET.alpha and budget.max_length == BUDGET.max_length
    with pytest.raises(SystemExit):
        parser.parse_args(["--precision", "fp16"])


def _subparser(parser: argparse.ArgumentParser, *path: str) -> argparse.ArgumentParser:
    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


def _budget_options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest in Budget.names()}


# predict's --batch-size (sentences generated at once), --prompt-style and --ner-sentences
# (default: the adapter's own) are its own settings
@pytest.mark.parametrize(
    "command, own", [(("train-local",), ()), (("job", "export"), ()), (("predict",), ("batch_size", "prompt_style", "ner_sentences"))]
)
def test_every_command_shows_the_budget_defaults_and_help(command, own):
    from fedmed_components.cli import build_parser

    options = {k: v for k, v in _budget_options(_subparser(build_parser(), *command)).items() if k not in own}
    assert {"model", "quantize", "precision"} <= set(options)
    reference = argparse.ArgumentParser()
    add_budget_arguments(reference)
    expected = _budget_options(reference)
    for name, action in options.items():
        assert action.default == getattr(BUDGET, name), (command, name)
        assert action.help == expected[name].help, (command, name)
        assert action.option_strings == expected[name].option_strings


def test_the_site_script_and_train_local_take_every_budget_setting():
    from fedmed_components.model.site import add_site_arguments, site_config_from_args

    parser = argparse.ArgumentParser()
    add_site_arguments(parser)
    assert set(_budget_options(parser)) == set(Budget.names())
    config = site_config_from_args(parser.parse_args(["--rank", "4", "--dropout", "0.1", "--tasks", "ner", "--lr", "0.01"]))
    assert (config.lora.r, config.lora.dropout, config.sft.tasks, config.train.learning_rate) == (4, 0.1, ("ner",), 0.01)
    assert config.lora.alpha == BUDGET.alpha and config.train.max_length == BUDGET.max_length and config.model == BUDGET.model


def test_job_export_carries_the_budget_and_fed_plus_knobs_to_the_job():
    from fedmed_components.cli import build_parser
    from fedmed_components.commands.job import spec_from_args
    from fedmed_components.flare.job import build_aggregator

    args = _subparser(build_parser(), "job", "export").parse_args(
        ["--algorithm", "fed_medlora_plus", "--temperature", "0.5", "--use-sizes", "--precision", "fp32", "--local-steps", "7"]
    )
    spec = spec_from_args(args)
    site_args = spec.site_args().split()
    assert site_args[site_args.index("--precision") + 1] == "fp32"
    assert site_args[site_args.index("--local-steps") + 1] == "7"
    assert site_args[site_args.index("--rank") + 1] == str(BUDGET.rank)
    aggregator = build_aggregator(spec)
    assert (aggregator.temperature, aggregator.use_sizes) == (0.5, True)
