"""The study folder that `bwssl study` (and `make study`) fills, and that the notebooks share.

    runs/study-<timestamp>/
        study.json              the parameters every notebook was given
        runs/<name>/            one pretraining run each: e2e, bwssl-k2, ... (config.json, checkpoint.pt, ...)
        results/<notebook>.json what each notebook measured
        <notebook>.ipynb        the executed notebooks
        report.html             the key figures and tables
"""
from __future__ import annotations

from pathlib import Path


def run_name(blocks: int) -> str:
    return "e2e" if blocks == 1 else f"bwssl-k{blocks}"


def run_dir(study: str | Path, name: str) -> Path:
    return Path(study) / "runs" / name


def results_path(study: str | Path, notebook: str) -> Path:
    return Path(study) / "results" / f"{notebook}.json"
