"""The layers hold: an AST scan of every import in the package (top-level and lazy).

The pure core (data, task, federation, model) never imports the FLARE layer, the runs or
the CLI; inside the core, data < task < model and federation stands alone; and no two
modules import each other, directly or round a longer loop.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fedmed_components"

# What each sub-package may import from fedmed_components (itself always allowed).
# errors and settings sit at the root: every layer reads them and they import nothing.
ROOT = {"errors", "settings"}
ALLOWED = {
    "data": ROOT,
    "task": {"data"} | ROOT,
    "federation": ROOT,
    "model": {"data", "task", "federation"} | ROOT,
    "flare": {"data", "task", "federation", "model"} | ROOT,
    "runs": {"data", "task", "federation", "model", "flare"} | ROOT,
    "commands": {"data", "task", "federation", "model", "flare", "runs"} | ROOT,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every fedmed_components module a file imports, wherever the import stands."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("fedmed_components")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fedmed_components"):
            for alias in node.names:  # `from pkg import module` names a module, not a symbol
                sub = f"{node.module}.{alias.name}"
                found.add(sub if _is_module(sub) else node.module)
    return found


def _is_module(dotted: str) -> bool:
    rel = Path(*dotted.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").exists() or (PACKAGE / rel / "__init__.py").exists()


def graph() -> dict[str, set[str]]:
    return {module_name(p): imported_modules(p) for p in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_core_module_sits_in_a_sub_package():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert top == ["__init__.py", "cli.py", "errors.py", "settings.py"]


@pytest.mark.parametrize("root_module", sorted(ROOT))
def test_root_modules_import_nothing_from_the_package(root_module):
    assert imported_modules(PACKAGE / f"{root_module}.py") == set()


@pytest.mark.parametrize("sub_package", sorted(ALLOWED))
def test_sub_package_imports_only_the_layers_below_it(sub_package):
    bad = []
    for module, imports in graph().items():
        if layer(module) != sub_package:
            continue
        for target in imports:
            target_layer = layer(target)
            if target_layer and target_layer != sub_package and target_layer not in ALLOWED[sub_package]:
                bad.append(f"{module} imports {target}")
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    edges = {m: {t for t in ts if t != m} for m, ts in graph().items()}
    # a package's __init__ is imported along with its modules; it is not an edge back
    edges = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in edges.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]) if nxt in stack else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def test_the_scan_sees_a_forbidden_import(tmp_path):
    """The scan itself: a lazy import inside a function is found."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from fedmed_components.flare import job\n    import fedmed_components.runs.demo\n")
    assert imported_modules(bad) == {"fedmed_components.flare.job", "fedmed_components.runs.demo"}


def test_every_module_opens_with_a_docstring():
    missing = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if not ast.get_docstring(ast.parse(p.read_text()))]
    assert not missing, missing
