"""Check a FLARE job folder before it is run or submitted.

A job folder names its workflows, aggregator, persistor, executors and filters by class
path, with constructor arguments. A typo there (an unknown aggregator, an algorithm
this version does not have, an argument the class does not take) would otherwise
surface minutes later as a traceback in a simulator or server log; here it is one
InputError naming the config file and line.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from fedmed_components.data.document import InputError

CONFIG_GLOB = "*/config/config_fed_*.json"


def check_job_folder(folder: str | os.PathLike) -> None:
    """Raise InputError for the first part of the job folder that cannot run."""
    folder = Path(folder)
    if not (folder / "meta.json").is_file():
        raise InputError(folder, None, "not a FLARE job folder (no meta.json); `fedmed job export` writes one")
    _read_json(folder / "meta.json")
    configs = sorted(folder.glob(CONFIG_GLOB))
    if not configs:
        raise InputError(folder, None, "no <app>/config/config_fed_server.json or config_fed_client.json in the job folder")
    for config in configs:
        text = config.read_text(encoding="utf-8")
        with _importable(config.parents[1] / "custom"):  # FLARE imports an app's own code from there
            for entry in _components(_read_json(config)):
                problem = _component_problem(entry)
                if problem:
                    raise InputError(config, _line_of(text, entry["path"]), f"{_label(entry)}: {problem}")


@contextlib.contextmanager
def _importable(folder: Path):
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        sys.path.remove(str(folder))


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise InputError(path, None, f"not UTF-8 text ({exc.reason})") from exc
    except json.JSONDecodeError as exc:
        raise InputError(path, exc.lineno, f"not JSON: {exc.msg}") from exc


def _components(config) -> Iterator[dict]:
    """Every {"path": "module.Class", "args": {...}} in a FLARE config, at any depth."""
    if isinstance(config, dict):
        if isinstance(config.get("path"), str):
            yield config
        for value in config.values():
            yield from _components(value)
    elif isinstance(config, list):
        for value in config:
            yield from _components(value)


def _label(entry: dict) -> str:
    return f"component {entry['id']!r}" if "id" in entry else "component"


def _component_problem(entry: dict) -> str | None:
    """Why FLARE could not build this component (None: the class exists and takes the args)."""
    module_name, _, class_name = entry["path"].rpartition(".")
    try:
        module = importlib.import_module(module_name) if module_name else None
    except ImportError as exc:
        return f"{entry['path']!r} cannot be imported ({exc})"
    cls = getattr(module, class_name, None)
    if not inspect.isclass(cls):
        return f"{entry['path']!r} names no class{_known_classes(module, class_name)}; re-export the job with `fedmed job export`"
    args = entry.get("args", {})
    if not isinstance(args, dict):
        return f"its args must be a JSON object, not {type(args).__name__}"
    try:
        inspect.signature(cls).bind(**args)
    except TypeError as exc:
        return f"{cls.__name__} does not take these args ({exc})"
    return None


def _known_classes(module, wanted: str) -> str:
    """The module's classes of the same kind (its aggregators, for an unknown aggregator)."""
    if module is None:
        return ""
    kind = next((k for k in ("Aggregator", "Controller", "Persistor", "Executor", "Filter") if wanted.endswith(k)), None)
    known = sorted(
        n for n, v in vars(module).items() if inspect.isclass(v) and v.__module__ == module.__name__ and kind and n.endswith(kind)
    )
    return f" (this version has: {', '.join(known)})" if known else ""


def _line_of(text: str, value: str) -> int | None:
    """The first line where the config spells this class path."""
    quoted = json.dumps(value)
    for number, line in enumerate(text.splitlines(), start=1):
        if quoted in line:
            return number
    return None
