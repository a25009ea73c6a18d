"""Files that must never be half-written: atomic saves, safe checkpoint loads, run folders."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

CHECKPOINT_VERSION = 1


class RunError(RuntimeError):
    """A run folder or checkpoint that cannot be used as asked; the message says why."""


def _atomic(path: Path, write) -> None:
    """Write through `write(file)` to a temporary file beside `path`, fsync, rename over it, then fsync the
    folder, so that after a power loss `path` holds the old or the new contents, and the new once returned."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide results from the user's group
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)  # the rename itself, on disk
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def remove_stale_temps(folder: Path, names) -> list[Path]:
    """Delete the temporary files that a process killed mid-write left beside `names` in `folder`
    (the files they would have replaced are intact); returns them."""
    stale = [tmp for name in names for tmp in Path(folder).glob(f".{name}.*.tmp")]
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


def save_json(path: Path, obj) -> None:
    _atomic(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def save_text(path: Path, text: str) -> None:
    _atomic(path, lambda f: f.write(text.encode()))


def save_tensors(path: Path, obj) -> None:
    """torch.save, atomically (a tensor file such as a synthetic data split)."""
    _atomic(Path(path), lambda f: torch.save(obj, f))


def save_checkpoint(path: Path, state: dict) -> None:
    _atomic(path, lambda f: torch.save({"version": CHECKPOINT_VERSION, **state}, f))


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """Load a checkpoint with weights_only=True; refuse anything that would run code."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"{path}: no checkpoint there")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
        raise RunError(f"{path}: refused or unreadable with weights_only=True "
                       f"({err.__class__.__name__}: {first})") from None
    if not isinstance(state, dict) or "version" not in state:
        got = "a dict without 'version'" if isinstance(state, dict) else f"a {type(state).__name__}"
        raise RunError(f"{path}: no checkpoint format version ({got}): not a bwssl checkpoint, "
                       f"expected version {CHECKPOINT_VERSION}")
    if state["version"] != CHECKPOINT_VERSION:
        raise RunError(f"{path}: checkpoint version {state['version']!r}, expected {CHECKPOINT_VERSION} "
                       f"(written by another version of bwssl_core)")
    return state


def config_diff(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two nested config dicts."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: run has {a!r}, now {b!r}")
    return out
