"""Helpers for the notebook tests: a tiny study made with the command line, notebooks for Papermill,
and hermetic Jupyter folders."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import jupytext

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def bwssl(*args: str) -> None:
    done = subprocess.run([str(BIN / "bwssl"), *args], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"bwssl {' '.join(args)} failed:\n{done.stderr[-3000:]}")


_made: list[tuple[Path, Path]] = []  # the first study this test session made: later ones copy it


def make_study(root: Path, study: str = "runs/study-demo", data: str = "data/synth") -> tuple[Path, Path]:
    """A smoke-size study under `root`: 8 + 8 synthetic 32 px, 4-frame videos and two tiny runs of
    2 steps each (e2e and bwssl-k2), laid out as `bwssl study` does. Returns (study, data).
    The first call of a session runs the command line; later calls copy its data and runs."""
    study_dir, data_dir = root / study, root / data
    if _made:
        shutil.copytree(_made[0][0] / "runs", study_dir / "runs")
        shutil.copytree(_made[0][1], data_dir)
        return study_dir, data_dir
    bwssl("synth", "--out", str(data_dir), "--n-train", "8", "--n-val", "8", "--size", "32", "--frames", "4",
          "--workers", "1")
    for name, extra in (("e2e", ()), ("bwssl-k2", ("--blocks", "2"))):
        bwssl("pretrain", "--preset", "tiny", "--data", str(data_dir), "--steps", "2", "--batch-size", "4",
              "--workers", "0", "--device", "cpu", "--out", str(study_dir / "runs" / name), *extra)
    _made.append((study_dir, data_dir))
    return study_dir, data_dir


def notebook_ipynb(name: str, out: Path) -> Path:
    """notebooks/<name>.py as an .ipynb at `out`, with the python3 kernelspec that Papermill needs."""
    nb = jupytext.read(ROOT / "notebooks" / f"{name}.py")
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    jupytext.write(nb, out, fmt="ipynb")
    return out


def jupyter_env(tmp: Path) -> dict[str, str]:
    """Environment variables that keep Jupyter's config, data, runtime and IPython folders in `tmp`
    (kernelspecs and lab extensions are still found in the virtualenv's share/jupyter)."""
    env = {}
    for var, sub in (("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_DATA_DIR", "data"),
                     ("JUPYTER_RUNTIME_DIR", "runtime"), ("IPYTHONDIR", "ipython")):
        (tmp / sub).mkdir(parents=True, exist_ok=True)
        env[var] = str(tmp / sub)
    return env
