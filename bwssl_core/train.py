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

from .batches import normalize_video, shard, step_generator
from .config import ConfigError, ModelConfig, TrainConfig, from_dict, to_dict
from .io import RunError, config_diff, load_checkpoint, save_checkpoint, save_json
from .masking import tube_mask
from .model import VideoMAE

RUN_FILES = ("config.json", "metrics.jsonl", "checkpoint.pt")
# buffers (position tables, pixel statistics) are the same on every rank: no per-step broadcast
_NO_BUFFER_SYNC = ({"forward_sync_buffers": False}
                   if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                   else {"broadcast_buffers": False})
# TrainConfig fields that may change when a run is resumed (they do not change the result)
RESUMABLE = {"log_every", "ckpt_every", "compile"}


def claim_folder(out: Path, overwrite: bool = False, also=("bad_videos.txt",)) -> None:
    """Make `out` ready for a new run: refuse a folder that holds one, unless overwrite, which deletes
    the run's files (and `also`, files written beside them)."""
    out = Path(out)
    existing = [f for f in RUN_FILES if (out / f).exists()]
    if existing and not overwrite:
        raise RunError(f"{out} already holds a run ({', '.join(existing)}): pass --resume to continue "
                       f"it, --overwrite to replace it, or choose another --out")
    if existing:  # and overwrite
        for f in (*existing, *also):
            (out / f).unlink(missing_ok=True)


def lr_at(step: int, t: TrainConfig) -> float:
    """Linear warmup to base_lr * batch / 256, then cosine down to min_lr (never above the peak)."""
    peak = t.base_lr * t.batch_size / 256
    floor = min(t.min_lr, peak)
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


def peak_memory_gib(device: torch.device) -> float:
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
        self.local_batch = self.tcfg.batch_size // self.world
        shard(self.tcfg.batch_size, self.rank, self.world)  # fails early when the batch does not divide
        self.config = {"model": to_dict(self.mcfg), "train": to_dict(self.tcfg), "world_size": self.world,
                       **(extra or {})}
        torch.manual_seed(self.tcfg.seed)
        self.model = VideoMAE(self.mcfg).to(self.device)
        fused = {"fused": True} if self.device.type == "cuda" else {}
        self.optimizer = torch.optim.AdamW(param_groups(self.model, self.tcfg.weight_decay), lr=0.0,
                                           betas=(self.tcfg.beta1, self.tcfg.beta2), **fused)
        self.step = 0
        self._prepare_folder(resume, overwrite)
        self.stages, self.decoders = self._wrap(self.model.stages), self._wrap(self.model.decoders)
        bf16 = self.tcfg.precision == "bf16" or (self.tcfg.precision == "auto" and self.device.type == "cuda")
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if bf16 else nullcontext

    # -- set-up -------------------------------------------------------------------------------
    def _init_distributed(self, device: str | None) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.owns_group = self.world > 1 and not dist.is_initialized()
        self.device = torch.device(device or default_device())
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
                m.compile()
            wrapped.append(m)
        return wrapped

    def _prepare_folder(self, resume: bool, overwrite: bool) -> None:
        ckpt = self.out / "checkpoint.pt"
        if resume:
            state = load_checkpoint(ckpt, map_location=self.device)
            saved = {k: v for k, v in state["config"].items() if k != "train"}
            now = {k: v for k, v in self.config.items() if k != "train"}
            saved["train"] = {k: v for k, v in state["config"]["train"].items() if k not in RESUMABLE}
            now["train"] = {k: v for k, v in self.config["train"].items() if k not in RESUMABLE}
            diff = config_diff(saved, now)
            if diff:
                raise RunError(f"{ckpt}: the run's config differs from the one given:\n  " + "\n  ".join(diff))
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.step = state["step"]
            torch.set_rng_state(state["rng"]["cpu"].cpu())
            if "cuda" in state["rng"] and self.device.type == "cuda":
                torch.cuda.set_rng_state(state["rng"]["cuda"].cpu(), self.device)
            if self.is_main:
                self._truncate_metrics(self.step)
            return
        if not self.is_main:  # rank 0 alone checks and writes the folder
            return
        claim_folder(self.out, overwrite)
        save_json(self.out / "config.json", self.config)

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric lines written after the checkpoint a run resumes from."""
        path = self.out / "metrics.jsonl"
        if path.exists():
            lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
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
        g = step_generator(t.seed + 1, self.step, self.device)
        mask = tube_mask(t.batch_size, self.mcfg.grid, self.mcfg.mask_ratio, g, self.device)
        mask = mask[shard(t.batch_size, self.rank, self.world)]
        lr = lr_at(self.step, t)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        def backward(k, loss):
            with torch.autocast(self.device.type, enabled=False):
                loss.backward()

        with self.autocast():
            losses = self.model(video, mask, backward=backward if t.per_block_backward else None,
                                stages=self.stages, decoders=self.decoders)
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
        sums, window_steps, tic = None, 0, time.perf_counter()
        last = {}
        bar = tqdm(total=t.steps, initial=self.step, disable=not self.is_main, desc="pretrain", dynamic_ncols=True)
        while self.step < t.steps:
            try:
                video = next(batches)
            except StopIteration:
                raise ConfigError(f"the data ran out at step {self.step} of {t.steps}") from None
            losses = torch.stack(self.train_step(video))
            sums = losses if sums is None else sums + losses
            window_steps += 1
            bar.update(1)
            if self.step % t.log_every == 0 or self.step == t.steps:
                last = self._log(sums / window_steps, window_steps, time.perf_counter() - tic)
                bar.set_postfix(loss=" ".join(f"{v:.3f}" for v in last["loss"]))
                sums, window_steps, tic = None, 0, time.perf_counter()
            if self.step % t.ckpt_every == 0 or self.step == t.steps:
                self.save()
        bar.close()
        return last

    def _log(self, mean_losses: torch.Tensor, steps: int, seconds: float) -> dict:
        if self.world > 1:
            dist.all_reduce(mean_losses)
            mean_losses /= self.world
        values = mean_losses.tolist()
        bad = [k for k, v in enumerate(values) if not math.isfinite(v)]
        if bad:
            raise FloatingPointError(f"block {bad[0]}'s loss is {values[bad[0]]} at step {self.step}; "
                                     f"the last checkpoint is {self.out / 'checkpoint.pt'}")
        row = {"step": self.step, "lr": lr_at(self.step - 1, self.tcfg), "loss": values,
               "clips_per_s": steps * self.tcfg.batch_size / max(seconds, 1e-9),
               "peak_mem_gib": peak_memory_gib(self.device)}
        if self.is_main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
        return row

    def save(self) -> None:
        if not self.is_main:
            return
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        save_checkpoint(self.out / "checkpoint.pt", {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step,
            "schedule": {"kind": "warmup_cosine", "next_lr": lr_at(self.step, self.tcfg)},  # a function of step
            "config": self.config, "rng": rng})

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.barrier()  # no rank tears gloo down while another still talks to it
            dist.destroy_process_group()


def pretrain(model_cfg: ModelConfig, train_cfg: TrainConfig, data, out: str | Path, **kwargs) -> dict:
    """Train and return the last metrics row; see Trainer for the arguments."""
    trainer = Trainer(model_cfg, train_cfg, out, **kwargs)
    try:
        return trainer.fit(data)
    finally:
        trainer.close()


def load_run(run: str | Path, device="cpu") -> tuple[VideoMAE, dict]:
    """The trained model of a run folder (its checkpoint, weights_only) and its config."""
    state = load_checkpoint(Path(run) / "checkpoint.pt", map_location=device)
    model = VideoMAE(from_dict(ModelConfig, state["config"]["model"])).to(device)
    model.load_state_dict(state["model"])
    return model.eval(), state["config"]

