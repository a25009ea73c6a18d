"""The study folder that `bwssl study` (and `make study`) fills, and that the notebooks share.

    runs/study-<timestamp>/
        study.json              the parameters every notebook was given
        runs/<name>/            one pretraining run each: e2e, bwssl-k2, ... (config.json, checkpoint.pt, ...)
        results/<notebook>.json what each notebook measured
        <notebook>.ipynb        the executed notebooks
        report.html             the key figures and tables
        FAILED.json             (only after a failure) which notebook and cell failed
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from .config import ConfigError, to_dict
from .io import RunError, save_json


def run_name(blocks: int) -> str:
    return "e2e" if blocks == 1 else f"bwssl-k{blocks}"


def run_dir(study: str | Path, name: str) -> Path:
    return Path(study) / "runs" / name


def run_paths(study: str | Path, runs: list[str]) -> dict[str, Path]:
    """{label: run folder} for a notebook's `runs`: a bare name is a run of the study (<study>/runs/<name>);
    an entry with a path separator is a run folder anywhere (`bwssl import` wrote it, or another study
    trained it), labelled by its folder's name, or by the path as given where another run has that name."""
    bare = {entry for entry in runs if "/" not in entry and os.sep not in entry}
    out = {}
    for entry in runs:
        path = run_dir(study, entry) if entry in bare else Path(entry)
        if not (path / "checkpoint.pt").is_file():
            raise ConfigError(f"runs: {entry!r} has no run at {path} (no checkpoint.pt): a run of the study is "
                              f"named as under {run_dir(study, '')}, any other run folder by its path")
        if path.resolve() in {p.resolve() for p in out.values()}:
            raise ConfigError(f"runs: {entry!r} names a run folder given before it ({path})")
        as_given = entry in bare or path.name in bare or path.name in out  # else labelled by its folder name
        out[entry if as_given else path.name] = path
    return out


def results_path(study: str | Path, notebook: str) -> Path:
    return Path(study) / "results" / f"{notebook}.json"


def check_results(study: str | Path, notebook: str, parameters: dict) -> Path:
    """results_path, refused where it holds results of other parameters (save_results): a notebook checks this
    before any work, so that a notebook run on a finished study stops at once, not after its training."""
    path = results_path(study, notebook)
    if path.exists():
        was = json.loads(path.read_text()).get("parameters")
        now = json.loads(json.dumps(parameters))  # as saved: tuples are lists
        if was != now:
            diff = [f"{k}: {was.get(k)!r} there, {now.get(k)!r} now" for k in sorted({*was, *now})
                    if was.get(k) != now.get(k)] if isinstance(was, dict) else ["no parameters there"]
            raise RunError(f"{path} holds results made with other parameters ({'; '.join(diff)}): it is not "
                           f"replaced. Give a new `study` folder, naming the finished study's runs by path "
                           f"(e.g. {run_dir(study, 'e2e')}), or delete {path} to run {notebook} again")
    return path


def save_results(study: str | Path, notebook: str, results: dict) -> Path:
    """Write a notebook's results (their "parameters" the notebook's) to results_path. Results that the same
    parameters made are replaced (a rerun, `bwssl study --resume`); those of other parameters are refused,
    never overwritten: the study's report and claims read them."""
    path = check_results(study, notebook, results["parameters"])
    save_json(path, results)
    return path


# parameters `bwssl study` sets over the notebooks' defaults: a smoke size for tests, and a larger
# study when a GPU is there (the defaults are the 2-core CPU study). The GPU study keeps its clips as
# tensors (rendered on the GPU, no codec; 6,000 clips of 16 x 112 x 112 are 3.6 GB) and must fit one
# 10-minute device call: its small model's steps ran at 2-4% of the GPU's FLOPs, which points to the
# host, so a larger batch should cost little per step (NOTES.md, "The GPU study: made to fit one call");
# on an H100 notebooks 01 and 02 then took 463 s (NOTES.md, "GPU: an H100, session 8"). Its lr is the
# one at which 12 layers learned motion in CPU trials; at 1e-3 or more they lost it (same section). The
# sweep also trains the CPU study's smaller model (64 px, 4 layers), so that the GPU study compares model
# sizes too (NOTES.md, "GPU: an H100, session 9", and its list of what is still to measure)
SMOKE = {"data": "data/synth-smoke", "n_train": 64, "n_val": 32, "synth_size": 32, "preset": "tiny", "steps": 20,
         "batch_size": 8, "warmup_steps": 2, "attentive_families": ["motion"], "cka_batch": 16,
         "points": ["tiny:1", "tiny:2"]}
GPU = {"data": "data/synth-112-5k", "data_format": "tensor", "n_train": 5000, "n_val": 1000, "synth_size": 112,
       "preset": "gpu", "steps": 1200, "batch_size": 128, "warmup_steps": 120, "lr": 3e-4, "blocks": [1, 2, 4],
       "points": ["gpu:1", "gpu:2", "gpu:4", "cpu:1", "cpu:2", "cpu:4"]}


def scale_params(scale: str, cuda: bool) -> dict:
    """The parameters a study scale sets over the notebooks' defaults (the cpu scale)."""
    scales = {"cpu": {}, "gpu": GPU, "smoke": SMOKE}
    if scale == "auto":
        scale = "gpu" if cuda else "cpu"
    if scale not in scales:
        raise ConfigError(f"scale={scale!r}: expected auto, {', '.join(scales)}")
    return dict(scales[scale])


# -- training runs ---------------------------------------------------------------------------------
def train_run(out: str | Path, model_cfg, train_cfg, clips: torch.Tensor, device: str, extra: dict | None = None) -> dict:
    """Pretrain on uint8 clips (N, C, T, H, W) held in memory, shuffled per epoch. Safe to rerun: a
    finished run with the same config is kept as it is, an unfinished one resumes from its checkpoint,
    one with another config is refused (never overwritten). Returns the run's last metrics row."""
    from .batches import epoch_batches
    from .train import Trainer, with_defaults

    out = Path(out)
    resume = (out / "checkpoint.pt").exists()
    # a start that never reached its first checkpoint, with this very config, has nothing to lose
    restart = not resume and (out / "config.json").exists() and \
        {k: with_defaults(json.loads((out / "config.json").read_text())).get(k) for k in ("model", "train")} == \
        {"model": to_dict(model_cfg), "train": to_dict(train_cfg)}
    trainer = Trainer(model_cfg, train_cfg, out, resume=resume, overwrite=restart, device=device,
                      extra=extra)  # refuses a run with another config
    if trainer.step >= train_cfg.steps:
        return metrics(out)[-1]
    b = train_cfg.batch_size
    clips = on_device(clips, trainer.device)  # each batch then gathered there, with no host copy

    def batches(start, rank, world):
        for _, ids in epoch_batches(len(clips), b, seed=train_cfg.seed, start_step=start):
            yield clips[ids]

    try:
        return trainer.fit(batches)
    finally:
        trainer.close()


def on_device(clips: torch.Tensor, device: torch.device, share: float = 0.5) -> torch.Tensor:
    """`clips` moved to a CUDA device when they take at most `share` of its free memory, else as they are.
    On a GPU the study's small-model steps ran at a few percent of its FLOPs (NOTES.md); a batch gathered
    in host memory, then copied from pageable memory, is host work that this removes."""
    if device.type != "cuda" or clips.device == device:
        return clips
    free, _ = torch.cuda.mem_get_info(device)
    return clips.to(device) if clips.numel() * clips.element_size() <= share * free else clips


def metrics(run: str | Path) -> list[dict]:
    """The rows of a run's metrics.jsonl."""
    path = Path(run) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -- notebooks -------------------------------------------------------------------------------------
NOTEBOOK_ORDER = ("01_pretrain", "02_probe", "03_patches", "04_sweep")


def run_notebook(name: str, out: str | Path, params: dict, failure: str | Path | None = None) -> Path:
    """Execute notebooks/<name>.py (the Jupytext source) with Papermill into `out` (.ipynb), after
    checking `params` against its parameters cell. On a failing cell, `failure` (a JSON file) says
    which notebook and cell, and the error is raised as a RunError."""
    import jupytext
    import papermill

    from .notebook import check, notebook_path

    check(params, name)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    nb = jupytext.read(notebook_path(name))
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    source = out.with_name(f".{out.stem}.input.ipynb")
    jupytext.write(nb, source, fmt="ipynb")
    try:
        papermill.execute_notebook(str(source), str(out), parameters=params, kernel_name="python3",
                                   progress_bar=False, store_widget_state=False, cwd=str(Path.cwd()))
    except papermill.PapermillExecutionError as err:
        info = {"notebook": name, "executed": str(out), "cell": err.cell_index, "execution_count": err.exec_count,
                "error": err.ename, "message": str(err.evalue)[:2000]}
        if failure is not None:
            save_json(Path(failure), info)
        raise RunError(f"notebook {name} failed in cell {err.cell_index} ({err.ename}: "
                       f"{str(err.evalue)[:300]}); the partly executed notebook is {out}") from None
    finally:
        source.unlink(missing_ok=True)
    return out


def run_study(out: str | Path, params: dict | None, notebooks=NOTEBOOK_ORDER, resume: bool = False) -> Path:
    """The study: each notebook in order into `out`, every one given the parameters it takes from
    `params` (plus study=out), then report.html. Every notebook's parameters are checked before
    anything is written. A new study needs a new or empty folder. `resume` continues the study in
    `out` (params None: with the parameters it was started with): notebooks whose results are already
    written are not run again, and their parameters cannot change (refused, naming them, so that the
    report never states parameters a result was not made with); the training and probing inside the
    others pick up what is done (train_run, the feature cache)."""
    from .notebook import check
    from .report import write_report

    out = Path(out)
    saved = out / "study.json"
    unknown = [n for n in notebooks if n not in NOTEBOOK_ORDER]
    if unknown:
        raise ConfigError(f"notebooks {', '.join(unknown)}: a study has {', '.join(NOTEBOOK_ORDER)}")
    if resume:
        if not saved.exists():
            raise RunError(f"{out}: no study.json, so no study to resume there")
        started = json.loads(saved.read_text())["params"]
        params = started if params is None else params
        diff = []
        for name in (n for n in NOTEBOOK_ORDER if results_path(out, n).exists()):  # finished: its values are fixed
            was, now = (check(notebook_params(p, name), name) for p in (started, params))
            diff += [f"{k}: {was[k]!r} in {name}, {now[k]!r} given" for k in was if was[k] != now[k]]
        if diff:
            raise RunError(f"{saved}: finished notebooks were run with other parameters ({'; '.join(diff)}): "
                           "resume without those, or start a new study in another --out")
    elif saved.exists():
        raise RunError(f"{out} already holds a study: pass --resume to continue it or choose another --out")
    elif out.exists() and any(out.iterdir()):
        raise RunError(f"{out} is not empty and holds no study: choose a new or empty --out")
    check_study(params)  # the study's parameters, for all its notebooks: a later --resume of others takes them
    before = json.loads(saved.read_text())["notebooks"] if resume else []
    out.mkdir(parents=True, exist_ok=True)
    save_json(saved, {"params": params, "notebooks": [n for n in NOTEBOOK_ORDER if n in {*before, *notebooks}]})
    (out / "FAILED.json").unlink(missing_ok=True)
    for stale in out.glob(".*.input.ipynb"):  # a notebook's input, left by a kill during its run
        stale.unlink()
    for name in notebooks:
        if resume and results_path(out, name).exists():
            continue
        run_notebook(name, out / f"{name}.ipynb", {**notebook_params(params, name), "study": str(out)},
                     failure=out / "FAILED.json")
    write_report(out)
    return out


def check_study(params: dict) -> None:
    """Every parameter known to some notebook and of its type (notebook.check), the presets and block
    counts (blocks, sweep points) valid: checked before the first notebook, not 15 minutes into a study.
    All notebooks' parameters, whichever run_study runs: they are the study's."""
    from .notebook import check, defaults

    all_names = {k for name in NOTEBOOK_ORDER for k in defaults(name)}
    unknown = sorted(set(params) - all_names)
    if unknown:
        raise ConfigError(f"unknown study parameter(s) {', '.join(unknown)} (the notebooks take "
                          f"{', '.join(sorted(all_names))})")
    full = {name: check(notebook_params(params, name), name) for name in NOTEBOOK_ORDER}
    main, depth = full["01_pretrain"]["preset"], full["01_pretrain"]["depth"]

    def fits(preset: str, k: int, what: str) -> None:
        own = depth if preset == main else 0  # notebook 01's depth: its preset's points; another preset: its own
        try:
            run_configs({**full["01_pretrain"], "preset": preset, "depth": own}, k)
        except ConfigError as err:
            raise ConfigError(f"{what}: {err}") from None

    for k in full["01_pretrain"]["blocks"]:
        fits(main, k, f"blocks={full['01_pretrain']['blocks']} of preset {main!r}"
             + (f", depth={depth}" if depth else ""))
    for preset, ks in sweep_points(full["04_sweep"]["points"]).items():
        for k in ks:
            fits(preset, k, f"sweep point '{preset}:{k}'" + (f" (depth={depth})" if depth and preset == main else ""))
    sweep_seeds(full["04_sweep"]["seeds"], 0)
    probe = full["02_probe"]  # the tables, CKA across and the claims of notebook 02 are measured against reference
    if probe["reference"] not in probe["runs"] and probe["reference"] not in {Path(r).name for r in probe["runs"]}:
        raise ConfigError(f"reference={probe['reference']!r}: not one of notebook 02's runs {probe['runs']} (blocks "
                          "gives them: include 1 for E2E, or name another reference)")
    check_poolings(probe["poolings"])
    if probe["cka_batch"] < 4:  # analyze() would fail only after all of notebook 02's probes
        raise ConfigError(f"cka_batch={probe['cka_batch']}: expected at least 4 clips per minibatch-CKA batch")


def run_configs(p: dict, k: int):
    """Notebook 01's model and training configs of its run with k blocks, from its checked parameters `p`: one
    place, so that check_study refuses before a study starts what notebook 01 would refuse in it. The
    learning rates are per 256 clips inside TrainConfig: a bad lr or batch_size is named here as given."""
    from .config import PRESETS, TrainConfig, model_config, uniform_partition

    if p["batch_size"] < 1:
        raise ConfigError(f"batch_size={p['batch_size']}: expected a positive integer")
    if not (math.isfinite(p["lr"]) and p["lr"] > 0):
        raise ConfigError(f"lr={p['lr']!r}: expected a finite number > 0")
    if not (math.isfinite(p["min_lr"]) and p["min_lr"] >= 0):
        raise ConfigError(f"min_lr={p['min_lr']!r}: expected a finite number >= 0")
    depth = p["depth"] or PRESETS.get(p["preset"], {}).get("depth")  # an unknown preset: model_config names it
    split = {"partition": uniform_partition(depth, k, hint="a study splits the depth into equal blocks: give block "
                                            "counts that divide it, or another depth")} if depth else {"blocks": k}
    mcfg = model_config(p["preset"], **split, mask_ratio=p["mask_ratio"], norm_target=not p["plain_target"],
                        dec_keep=p["dec_keep"], **({"dec_depth": p["dec_depth"]} if p["dec_depth"] else {}),
                        **({"depth": p["depth"]} if p["depth"] else {}))
    tcfg = TrainConfig(steps=p["steps"], batch_size=p["batch_size"], base_lr=p["lr"] * 256 / p["batch_size"],
                       min_lr=p["min_lr"] * 256 / p["batch_size"], warmup_steps=p["warmup_steps"],
                       log_every=max(1, p["steps"] // 40), ckpt_every=max(1, p["steps"] // 4), seed=p["seed"],
                       compile=p["torch_compile"]).validate()
    return mcfg, tcfg


def check_poolings(poolings: list[str]) -> None:
    """Notebook 02's poolings: mean among them, which its final table, R@1 figure and the report read."""
    if "mean" not in poolings:
        raise ConfigError(f"poolings={poolings}: expected 'mean' among them (the final table, the R@1 figure and "
                          "the report read mean pooling)")


def notebook_params(params: dict, name: str) -> dict:
    """The study parameters that notebook `name` takes. Notebook 02 probes every run that notebook 01
    trains: `runs` follows `blocks` unless it is given itself."""
    from .notebook import defaults

    params = dict(params)
    blocks = params.get("blocks")
    if "runs" not in params and isinstance(blocks, list) and all(type(k) is int for k in blocks):
        params["runs"] = [run_name(k) for k in blocks]  # a malformed `blocks` is left to notebook 01's check
    return {k: v for k, v in params.items() if k in defaults(name)}


# -- sweeps ----------------------------------------------------------------------------------------
def sweep_points(points: list[str]) -> dict[str, list[int]]:
    """["cpu:1", "cpu:2", "tiny:4"] -> {"cpu": [1, 2], "tiny": [4]} (preset: block counts)."""
    out: dict[str, list[int]] = {}
    for p in points:
        preset, _, k = p.partition(":")
        if not k.isdigit() or int(k) < 1:
            raise ConfigError(f"sweep point {p!r}: expected 'preset:K' with K >= 1 blocks, e.g. 'cpu:2'")
        out.setdefault(preset, []).append(int(k))
    return out


def sweep_seeds(seeds: list, main_seed: int) -> list[int]:
    """The training seeds of every sweep point: notebook 01's first, then the others of `seeds` in order."""
    bad = [s for s in seeds if type(s) is not int or s < 0]
    if bad:
        raise ConfigError(f"sweep seeds {bad}: expected non-negative integers, e.g. seeds=[1, 2]")
    return list(dict.fromkeys([main_seed, *seeds]))


def main_probe(study: str | Path, names: list[str]) -> Path | None:
    """The main study's 02_probe results when they already cover every run in `names` (a sweep point
    of the main preset needs no new training or probing), else None."""
    path = results_path(study, "02_probe")
    if not path.exists():
        return None
    probed = json.loads(path.read_text())["parameters"]["runs"]
    return path if set(names) <= set(probed) else None


def point_path(study: str | Path, preset: str, seed: int | None = None) -> Path:
    """The study folder of a sweep's preset: study/sweep/<preset>/, or <preset>-seed<seed>/ for a training
    seed other than the main study's."""
    return Path(study) / "sweep" / (preset if seed is None else f"{preset}-seed{seed}")


def point_folder(study: str | Path, preset: str, reuse: list[str], seed: int | None = None) -> Path:
    """point_path, made; runs named in `reuse` (those of the main study, trained with the same parameters)
    are linked in, not trained again."""
    folder = point_path(study, preset, seed)
    (folder / "runs").mkdir(parents=True, exist_ok=True)
    for name in reuse:
        link = folder / "runs" / name
        if not link.exists():
            link.symlink_to(Path("..", "..", "..", "runs", name), target_is_directory=True)
    if reuse and (Path(study) / "features").is_dir() and not (folder / "features").exists():
        (folder / "features").symlink_to(Path("..", "..", "features"), target_is_directory=True)
    return folder
