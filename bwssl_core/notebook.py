"""Notebook parameters: the study notebooks' `parameters` cells are the one source of defaults.

Each notebook (notebooks/<name>.py, Jupytext py:percent) starts with a cell tagged `parameters`
holding flat literals. Papermill injects overrides after it; the notebook's next cell calls
`parameters(globals(), "<name>")`, which stops at once on an unknown name or a wrong type, naming it.
`bwssl study` checks the same way before it starts a notebook.
"""
from __future__ import annotations

import ast
import os
import types
from pathlib import Path

from .config import ConfigError

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
# names IPython and Papermill put into a kernel's globals: never parameters
_KERNEL_NAMES = {"In", "Out", "get_ipython", "exit", "quit", "open"}


def notebook_path(name: str) -> Path:
    path = NOTEBOOKS / f"{name}.py"
    if not path.is_file():
        known = sorted(p.stem for p in NOTEBOOKS.glob("[0-9]*.py"))
        raise ConfigError(f"notebook {name!r}: no {path} (known: {', '.join(known)})")
    return path


def defaults(name: str) -> dict:
    """{parameter: default} from the `parameters` cell of notebooks/<name>.py."""
    path = notebook_path(name)
    lines = path.read_text().splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith("# %%") and "parameters" in ln), None)
    if start is None:
        raise ConfigError(f"{path}: no cell tagged 'parameters'")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("# %%")), len(lines))
    out = {}
    for node in ast.parse("\n".join(lines[start + 1:end])).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise ConfigError(f"{path}:{start + 1 + node.lineno}: the parameters cell holds only `name = literal`")
        out[node.targets[0].id] = ast.literal_eval(node.value)
    return out


def _type_ok(value, default) -> bool:
    if default is None:
        return True
    if isinstance(default, bool) or isinstance(value, bool):
        return type(value) is type(default)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple)) and all(_type_ok(v, default[0]) for v in value) if default \
            else isinstance(value, (list, tuple))
    return isinstance(value, type(default))


def check(params: dict, name: str) -> dict:
    """`params` over the notebook's defaults; an unknown name or a wrong type raises ConfigError."""
    known = defaults(name)
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ConfigError(f"notebook {name}: unknown parameter(s) {', '.join(unknown)} "
                          f"(it takes {', '.join(known)})")
    for key, value in params.items():
        if not _type_ok(value, known[key]):
            raise ConfigError(f"notebook {name}: parameter {key}={value!r} is a {type(value).__name__}, "
                              f"expected {type(known[key]).__name__} like its default {known[key]!r}")
    return {**known, **params}


def parameters(scope: dict, name: str) -> dict:
    """The notebook's parameters as the kernel holds them (after Papermill's injected cell), checked. In a
    kernel started in notebooks/ (as JupyterLab starts one), the working folder becomes the repository
    root, so that relative paths (data/synth, runs/...) mean what they mean to `bwssl study`.

    A kernel that ran this check before (cells run again in JupyterLab) also holds the notebook's own
    variables: there only the parameters' types are checked (Papermill starts a fresh kernel each time)."""
    if Path.cwd().resolve() == NOTEBOOKS:
        os.chdir(NOTEBOOKS.parent)
    again = scope.get("_bwssl_notebook") == name
    scope["_bwssl_notebook"] = name
    given = {k: v for k, v in scope.items()
             if not k.startswith("_") and k not in _KERNEL_NAMES
             and not isinstance(v, (types.ModuleType, types.FunctionType, type))}
    if again:
        given = {k: v for k, v in given.items() if k in defaults(name)}
    return check(given, name)
