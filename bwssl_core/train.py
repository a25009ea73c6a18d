"""Pretraining loop: E2E or blockwise, one process or data-parallel under torchrun.

Run folder: config.json (the full resolved config), metrics.jsonl (one line per log step),
checkpoint.pt (model, optimiser, step, RNG states; written atomically, loaded with weights_only).
"""
from __future__ import annotations

import inspect
import json
import math
import os
import resource
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from .batches import RNG_STREAMS, normalize_video, shard, step_generator
from .config import ConfigError, ModelConfig, TrainConfig, from_dict, to_dict
from .io import RunError, config_diff, load_checkpoint, remove_stale_temps, save_checkpoint, save_json
from .masking import Mask, tube_mask
from .model import VideoMAE

RUN_FILES = ("config.json", "metrics.jsonl", "checkpoint.pt")
# buffers (position tables, pixel statistics) are the same on every rank: no per-step broadcast
_NO_BUFFER_SYNC = ({"forward_sync_buffers": False}
                   if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                   else {"broadcast_buffers": False})
# TrainConfig fields that may change when a run is resumed (they do not change the result)
RESUMABLE = {"log_every", "ckpt_every", "compile"}
_NONE = torch.iinfo(torch.int64).max  # "no non-finite loss yet" in Trainer.first_bad


def claim_folder(out: Path, overwrite: bool = False, also=("bad_videos.txt",), resumable: bool = True) -> None:
    """Make `out` ready for a new run: refuse a folder that holds one, unless overwrite, which deletes
    the run's files (and `also`, files written beside them)."""
    out = Path(out)
    existing = [f for f in RUN_FILES if (out / f).exists()]
    if existing and not overwrite:
        if resumable and "checkpoint.pt" not in existing:  # stopped before its first checkpoint
            raise RunError(f"{out} holds a run that stopped before its first checkpoint ({', '.join(existing)}): "
                           "there is nothing to resume; pass --overwrite to start it again, or choose another --out")
        resume = "pass --resume to continue it, " if resumable else ""
        raise RunError(f"{out} already holds a run ({', '.join(existing)}): {resume}pass --overwrite to replace "
                       f"it, or choose another --out")
    if existing:  # and overwrite
        for f in (*existing, *also):
            (out / f).unlink(missing_ok=True)
    remove_stale_temps(out, RUN_FILES)


def lr_at(step: int, t: TrainConfig) -> float:
    """Linear warmup to base_lr * batch / 256, then cosine down to min_lr * batch / 256 (VideoMAE's
    linear_scaled_min_lr; never above the peak)."""
    peak = t.base_lr * t.batch_size / 256
    floor = min(t.min_lr, t.base_lr) * t.batch_size / 256
    if step < t.warmup_steps:
        return peak * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on weight matrices only; none on norms, biases and mask tokens.
    (Position tables are fixed buffers, not parameters.)"""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or name.endswith("mask_token") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def default_device() -> str:
    """This process's GPU (LOCAL_RANK under torchrun) when there is one, else the CPU."""
    return f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device that --device (or a `device` parameter) names, checked: None gives default_device(),
    "cuda" this process's GPU (LOCAL_RANK under torchrun), as torch.cuda.set_device needs an index; a
    name torch does not know, or a GPU that is not there, is a ConfigError."""
    if device is None:
        return torch.device(default_device())
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigError(f"device={device!r}: expected cpu, cuda or cuda:N ({err})") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={device!r}: no CUDA GPU is available here (use cpu)")
        d = d if d.index is not None else torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if d.index >= torch.cuda.device_count():
            raise ConfigError(f"device={device!r}: this machine has {torch.cuda.device_count()} GPU(s), "
                              f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return d


def step_mask(mcfg: ModelConfig, tcfg: TrainConfig, step: int, device) -> Mask:
    """The mask of the global batch of `step`, drawn from (seed, step): the same for every process, a
    resumed run and a block-parallel pipeline."""
    g = step_generator("mask", tcfg.seed, step, device)
    return tube_mask(tcfg.batch_size, mcfg.grid, mcfg.mask_ratio, g, device, mcfg.dec_keep)


def with_defaults(config: dict) -> dict:
    """A run's saved config with the fields its version did not have yet (added since, with defaults
    that keep the old behaviour, like model.dec_keep) set to those defaults."""
    out = dict(config)
    for key, cls in (("model", ModelConfig), ("train", TrainConfig)):
        if isinstance(out.get(key), dict):
            out[key] = {**to_dict(cls()), **out[key]}
    return out


def compile_module(module: torch.nn.Module) -> None:
    """torch.compile in place, with static shapes: a run's shapes never change, and in a process that
    trains several configurations in turn (a notebook, the benchmark) dynamo would otherwise switch to
    symbolic shapes at the first new one; inductor's backward for such a graph failed on an H200
    (torch 2.11: "shape '[1728, 384]' is invalid for input of size 320")."""
    module.compile(dynamic=False)


def compiled(fn: Callable) -> Callable:
    """torch.compile of a function, with static shapes as compile_module. The reconstruction target
    (un-normalise, patchify, gather, per-tube normalise) is several passes over the whole float32 clip
    when eager, one fused reduction and one write when compiled (5x faster on the CPU at ViT-B size)."""
    return torch.compile(fn, dynamic=False)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak on a GPU, so that a process training several runs in turn (notebook 01) logs each
    run's own. The CPU's figure, the process's peak RSS, cannot be reset: it covers every earlier run too."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float:
    """The peak since reset_peak_memory on a GPU; on the CPU the process's peak RSS (since it started)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (process peak RSS)


class Trainer:
    """Trains a VideoMAE (E2E or blockwise) into a run folder.

    Under torchrun (WORLD_SIZE > 1) it joins the process group (nccl on GPU, gloo on CPU) and wraps
    every block and every decoder in its own DistributedDataParallel, so that in memory mode block k's
    gradient all-reduce overlaps block k+1's compute.
    """

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, out: str | Path,
                 resume: bool = False, overwrite: bool = False, device: str | None = None, extra: dict | None = None):
        self.mcfg, self.tcfg, self.out = model_cfg.validate(), train_cfg.validate(), Path(out)
        self._init_distributed(device)
        reset_peak_memory(self.device)  # peak_mem_gib: this run's (on a GPU)
        self.local_batch = self.tcfg.batch_size // self.world
        shard(self.tcfg.batch_size, self.rank, self.world)  # fails early when the batch does not divide
        self.config = {"model": to_dict(self.mcfg), "train": to_dict(self.tcfg), "world_size": self.world,
                       "rng_streams": RNG_STREAMS, **(extra or {})}
        torch.manual_seed(self.tcfg.seed)
        self.model = VideoMAE(self.mcfg).to(self.device)
        fused = {"fused": True} if self.device.type == "cuda" else {}
        self.optimizer = torch.optim.AdamW(param_groups(self.model, self.tcfg.weight_decay), lr=0.0,
                                           betas=(self.tcfg.beta1, self.tcfg.beta2), **fused)
        self.step, self.saved_step = 0, None  # saved_step: the step of the checkpoint on disk
        self.window = (None, 0)  # loss sums and steps of a log window that the checkpoint resumed from cut
        self._prepare_folder(resume, overwrite)
        self.stages, self.decoders = self._wrap(self.model.stages), self._wrap(self.model.decoders)
        self.make_target = compiled(self.model.target) if self.tcfg.compile else self.model.target
        bf16 = self.tcfg.precision == "bf16" or (self.tcfg.precision == "auto" and self.device.type == "cuda")
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if bf16 else nullcontext

    # -- set-up -------------------------------------------------------------------------------
    def _init_distributed(self, device: str | None) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.owns_group = self.world > 1 and not dist.is_initialized()
        self.device = resolve_device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.owns_group:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.rank = dist.get_rank() if self.world > 1 else 0
        self.is_main = self.rank == 0

    def _wrap(self, modules: torch.nn.ModuleList) -> list[torch.nn.Module]:
        wrapped = []
        for m in modules:
            if self.world > 1:
                ids = [self.device.index] if self.device.type == "cuda" else None
                m = DistributedDataParallel(m, device_ids=ids, **_NO_BUFFER_SYNC)
            if self.tcfg.compile:
                compile_module(m)
            wrapped.append(m)
        return wrapped

    def _prepare_folder(self, resume: bool, overwrite: bool) -> None:
        ckpt = self.out / "checkpoint.pt"
        if resume:
            state = load_checkpoint(ckpt, map_location=self.device)
            if "imported" in state["config"]:
                raise RunError(f"{ckpt}: weights imported with `bwssl import`, not a training run: no optimiser "
                               "state or step to resume from")
            if state["config"].get("rng_streams") != RNG_STREAMS:
                raise RunError(f"{ckpt}: trained with the random streams of an earlier bwssl (data order, masks, "
                               "crops); resumed here it would change them midway. Retrain it (--overwrite), or "
                               "resume it with the version that started it")
            saved = with_defaults(state["config"])
            now = {k: v for k, v in self.config.items() if k != "train"}
            saved["train"] = {k: v for k, v in saved["train"].items() if k not in RESUMABLE}
            now["train"] = {k: v for k, v in self.config["train"].items() if k not in RESUMABLE}
            diff = config_diff(saved, now)
            if diff:
                raise RunError(f"{ckpt}: the run's config differs from the one given:\n  " + "\n  ".join(diff))
            load_weights(self.model, state["model"], ckpt)
            self.optimizer.load_state_dict(state["optimizer"])
            self.step = self.saved_step = state["step"]
            if state.get("window"):  # the log window the checkpoint cut: its first row as if never cut
                self.window = (state["window"]["loss_sum"].to(self.device), state["window"]["steps"])
            torch.set_rng_state(state["rng"]["cpu"].cpu())
            if "cuda" in state["rng"] and self.device.type == "cuda":
                torch.cuda.set_rng_state(state["rng"]["cuda"].cpu(), self.device)
            if self.is_main:
                self._truncate_metrics(self.step)
                remove_stale_temps(self.out, RUN_FILES)  # left by a kill during a write
            return
        if not self.is_main:  # rank 0 alone checks and writes the folder
            return
        claim_folder(self.out, overwrite)
        save_json(self.out / "config.json", self.config)

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric lines written after the checkpoint a run resumes from (and a line cut short by a kill)."""
        path = self.out / "metrics.jsonl"
        if path.exists():
            lines = [ln for ln in path.read_text().splitlines() if _row_step(ln) <= step]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(ln + "\n" for ln in lines))
            os.replace(tmp, path)

    # -- training -----------------------------------------------------------------------------
    def train_step(self, video: torch.Tensor) -> list[torch.Tensor]:
        """One optimiser step on a local batch; returns each block's loss (detached)."""
        t = self.tcfg
        video = video.to(self.device, non_blocking=True)
        video = normalize_video(video) if video.dtype == torch.uint8 else video
        if video.shape[0] != self.local_batch:
            raise ConfigError(f"batch of {video.shape[0]} clips: expected {self.local_batch} per process "
                              f"(batch_size={t.batch_size} over {self.world})")
        # the global batch's mask, drawn from (seed, step); this process keeps its rows
        mask = step_mask(self.mcfg, t, self.step, self.device)[shard(t.batch_size, self.rank, self.world)]
        lr = lr_at(self.step, t)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        def backward(k, loss):
            with torch.autocast(self.device.type, enabled=False):
                loss.backward()

        with self.autocast():
            losses = self.model(video, mask, backward=backward if t.per_block_backward else None,
                                stages=self.stages, decoders=self.decoders, make_target=self.make_target)
        if not t.per_block_backward:
            torch.stack(losses).sum().backward()
        if t.clip_grad > 0:
            for params in self.model.block_parameters():  # each block clipped on its own
                torch.nn.utils.clip_grad_norm_(params, t.clip_grad, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return [loss.detach() for loss in losses]

    def fit(self, data: Callable[..., Iterable[torch.Tensor]] | Iterable[torch.Tensor]) -> dict:
        """Train until train.steps. `data`: a batch source (batches.py) or any iterable of local
        batches (B, C, T, H, W), uint8 or normalised float; a plain iterable restarts from its
        beginning on resume."""
        t = self.tcfg
        batches = iter(data(self.step, self.rank, self.world) if callable(data) else data)
        sums, window_steps = self.window  # the losses of a window that a resumed checkpoint cut, all ranks'
        untimed, tic = window_steps, time.perf_counter()  # those steps ran before this process: not timed
        self.first_bad = None  # (K,) each block's first step with a non-finite loss (_NONE: none), on the device
        last = {}
        bar = tqdm(total=t.steps, initial=self.step, disable=not self.is_main, desc="pretrain", dynamic_ncols=True)
        while self.step < t.steps:
            try:
                video = next(batches)
            except StopIteration:
                raise ConfigError(f"the data ran out at step {self.step} of {t.steps}") from None
            try:
                losses = torch.stack(self.train_step(video))  # (K,)
            except torch.OutOfMemoryError as err:
                raise self._out_of_memory(err) from None
            sums = losses if sums is None else sums + losses
            bad_at = torch.where(losses.isfinite(), _NONE, self.step)  # no sync: checked at log and ckpt steps
            self.first_bad = bad_at if self.first_bad is None else torch.minimum(self.first_bad, bad_at)
            window_steps += 1
            bar.update(1)
            log = self.step % t.log_every == 0 or self.step == t.steps
            ckpt = self.step % t.ckpt_every == 0 or self.step == t.steps
            if log or ckpt:  # a checkpoint never follows a non-finite loss or weight
                mean = self._finite_mean(sums / window_steps)
            if log:
                last = self._log(mean, window_steps - untimed, time.perf_counter() - tic)
                bar.set_postfix(loss=" ".join(f"{v:.3f}" for v in last["loss"]))
                sums, window_steps, untimed, tic = None, 0, 0, time.perf_counter()
            if ckpt:
                self._check_weights()
                self.save(self._window_state(sums, window_steps))
        bar.close()
        return last

    def _last_checkpoint(self) -> str:
        if self.saved_step is None:
            return "no checkpoint was written"
        return f"the last checkpoint, {self.out / 'checkpoint.pt'} (step {self.saved_step}), is intact"

    def _finite_mean(self, mean_losses: torch.Tensor) -> list[float]:
        """Each block's mean loss over the window and all processes; FloatingPointError naming the block
        and the first step whose loss was not finite."""
        if self.world > 1:
            dist.all_reduce(mean_losses)
            mean_losses /= self.world
        values = mean_losses.tolist()
        if all(math.isfinite(v) for v in values):
            return values
        first = self.first_bad.clone()
        if self.world > 1:
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        k = int(first.argmin())
        step = int(first[k])
        if step == _NONE:  # every loss was finite, their sum was not
            k, step = next(i for i, v in enumerate(values) if not math.isfinite(v)), self.step
        raise FloatingPointError(f"block {k}'s loss is {values[k]} at step {step}: training stopped; "
                                 f"{self._last_checkpoint()}")

    def _check_weights(self) -> None:
        """Refuse to save weights that are not finite (a non-finite gradient under finite losses)."""
        groups = self.model.block_parameters()
        finite = torch.stack([torch.stack([p.isfinite().all() for p in g]).all() for g in groups]).tolist()
        if not all(finite):
            k = finite.index(False)
            name = f"block {k}" if k < len(self.mcfg.partition) else "the shared decoder"
            raise FloatingPointError(f"{name}'s weights are not finite after step {self.step} (a non-finite "
                                     f"gradient): training stopped before saving; {self._last_checkpoint()}")

    def _out_of_memory(self, err: BaseException) -> RunError:
        t = self.tcfg
        tips = [f"a smaller --batch-size (now {t.batch_size}, {self.local_batch} per process)"]
        if not t.per_block_backward:
            tips.append("--per-block-backward (frees each block's activations before the next block runs)")
        if self.autocast is nullcontext:
            tips.append("--precision bf16")
        tips.append("a smaller --preset or fewer --num-frames / --img-size")
        detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else err.__class__.__name__
        return RunError(f"out of memory on {self.device} at step {self.step + 1} with batch_size={t.batch_size} "
                        f"({detail}); try {'; '.join(tips)} (in a new run: --resume refuses a changed config). "
                        f"Nothing was half-written: {self._last_checkpoint()}")

    def _log(self, values: list[float], steps: int, seconds: float) -> dict:
        row = {"step": self.step, "lr": lr_at(self.step - 1, self.tcfg), "loss": values,
               "clips_per_s": steps * self.tcfg.batch_size / max(seconds, 1e-9),
               "peak_mem_gib": peak_memory_gib(self.device)}
        if self.is_main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
        return row

    def _window_state(self, sums: torch.Tensor | None, steps: int) -> dict | None:
        """The loss sums of a log window still open at a checkpoint, over all processes (their mean, so
        that each process resumes from the same sums), so that a resumed run logs the uninterrupted rows."""
        if sums is None:
            return None
        total = sums.clone()
        if self.world > 1:
            dist.all_reduce(total)
            total /= self.world
        return {"loss_sum": total.cpu(), "steps": steps}

    def save(self, window: dict | None = None) -> None:
        if not self.is_main:
            self.saved_step = self.step
            return
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        save_checkpoint(self.out / "checkpoint.pt", {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step,
            "schedule": {"kind": "warmup_cosine", "next_lr": lr_at(self.step, self.tcfg)},  # a function of step
            "config": self.config, "rng": rng, "window": window})
        self.saved_step = self.step

    def close(self, failed: bool = False) -> None:
        """Leave the process group. failed: this rank stopped on an error, while the others may still wait for it
        in an all-reduce: no barrier, which they would never reach (every rank would hang, the error unseen)."""
        if self.owns_group and dist.is_initialized():
            if not failed:
                dist.barrier()  # no rank tears gloo down while another still talks to it
            dist.destroy_process_group()


def pretrain(model_cfg: ModelConfig, train_cfg: TrainConfig, data, out: str | Path, **kwargs) -> dict:
    """Train and return the last metrics row; see Trainer for the arguments."""
    trainer = Trainer(model_cfg, train_cfg, out, **kwargs)
    try:
        last = trainer.fit(data)
    except BaseException:
        trainer.close(failed=True)
        raise
    trainer.close()
    return last


def _row_step(line: str) -> float:
    """The step of a metrics.jsonl line; inf for a line that is not one (cut short by a kill)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, TypeError, KeyError):
        return math.inf


def load_weights(model: torch.nn.Module, weights: dict, path: Path) -> None:
    """model.load_state_dict(weights), or a RunError naming what differs (expected vs found shapes,
    missing and unexpected tensors) instead of torch's traceback."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(getattr(v, "shape", ())) for k, v in weights.items()} if isinstance(weights, dict) else {}
    shapes = [f"{k}: expected {expected[k]}, found {found[k]}"
              for k in expected if k in found and found[k] != expected[k]]
    lines = shapes[:6] + ([f"... and {len(shapes) - 6} more of another shape"] if len(shapes) > 6 else [])
    for what, keys in (("missing", [k for k in expected if k not in found]),
                       ("unexpected", [k for k in found if k not in expected])):
        if keys:
            lines.append(f"{len(keys)} {what}: {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}")
    if lines:
        raise RunError(f"{path}: the weights do not fit the model that its config describes (another "
                       f"architecture or version?):\n  " + "\n  ".join(lines))
    model.load_state_dict(weights)


def load_run(run: str | Path, device="cpu") -> tuple[VideoMAE, dict]:
    """The trained model of a run folder (its checkpoint, weights_only) and its config."""
    path = Path(run) / "checkpoint.pt"
    state = load_checkpoint(path, map_location=device)
    try:
        cfg = from_dict(ModelConfig, state["config"]["model"]).validate()
    except (KeyError, TypeError, ConfigError) as err:
        raise RunError(f"{path}: no usable model config in the checkpoint "
                       f"({err.__class__.__name__}: {err})") from None
    model = VideoMAE(cfg).to(device)
    load_weights(model, state.get("model"), path)
    return model.eval(), state["config"]

