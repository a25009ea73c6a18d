"""Batch sources for the trainer: normalisation, a clip tensor file, moving shapes made on the device.

A batch source is a callable `source(start_step, rank, world)` returning an iterator of the local
batches of steps start_step, start_step + 1, ... Each global batch is a deterministic function of
(seed, step), and rank r of `world` gets rows [r * b, (r + 1) * b) of it, so a resumed or
data-parallel run sees exactly the clips of an uninterrupted single-process run.
"""
from __future__ import annotations

import functools
import itertools
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .config import ConfigError, ModelConfig, pixel_stats


@functools.cache
def _pixel_stats(device: torch.device, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """config.pixel_stats as (1, C, 1, 1, 1) tensors on `device`, made once per device and channel count."""
    shape = (1, -1, 1, 1, 1)
    mean, std = pixel_stats(channels)
    return torch.tensor(mean, device=device).view(shape), torch.tensor(std, device=device).view(shape)


def normalize_video(video: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, T, H, W) in [0, 255] -> float normalised with config.pixel_stats(C): (x / 255 - mean) / std
    on one float copy, in place (the same values as out of place, 4x faster on the CPU)."""
    mean, std = _pixel_stats(video.device, video.shape[1])
    return video.to(torch.float32, copy=True).div_(255.0).sub_(mean).div_(std)


# One tag per random stream of a run, so that no two streams share draws: (seed + 1, step) for the masks once
# drew what run seed + 1's (seed, step) drew for its epoch order (RNG_STREAMS counts this numbering).
STREAMS = {"order": 1, "item": 2, "mask": 3, "augment": 4, "shapes": 5}
RNG_STREAMS = 2  # saved with every run: a run trained with other streams is not resumed with these


def hashed_seed(*keys: int) -> int:
    """A 63-bit seed that depends on `keys` only, hashed (numpy's SeedSequence) so that its low 32 bits do
    too: torch's CPU generator keeps only those, so (seed << 32) + step gave every seed the same stream.
    The key count is hashed too: SeedSequence reads (a, b) as (a, b, 0)."""
    return int(np.random.SeedSequence([*keys, len(keys)]).generate_state(1, np.uint64)[0] >> 1)


def step_generator(stream: str, seed: int, step: int, device=None) -> torch.Generator:
    """A generator of one of a run's STREAMS, seeded by (stream, seed, step): what step `step` draws does
    not depend on the past."""
    return torch.Generator(device=device or "cpu").manual_seed(hashed_seed(STREAMS[stream], seed, step))


def epoch_batches(n: int, batch_size: int, seed: int, start_step: int = 0,
                  rows: slice = slice(None)) -> Iterator[tuple[int, torch.Tensor]]:
    """(epoch, item indices) of steps start_step, start_step + 1, ...: each epoch a permutation of
    n items drawn from (seed, epoch), cut into whole batches; `rows` picks this process's share."""
    per_epoch = n // batch_size
    epoch = None
    for step in itertools.count(start_step):
        e, i = divmod(step, per_epoch)
        if e != epoch:
            epoch, order = e, torch.randperm(n, generator=step_generator("order", seed, e))
        yield epoch, order[i * batch_size:(i + 1) * batch_size][rows]


def augmented(augment, video: torch.Tensor, seed: int, step: int, rows: slice, total: int) -> torch.Tensor:
    """augment(video) (e.g. cache.gpu_augment) with its draws made from ("augment", seed, step) on video's
    device for all `total` clips of the step's global batch, of which video is `rows`: every process
    of a data-parallel run, a resumed run and a single-process run give a clip the same crop and flip,
    and no model's initialisation moves the stream (the global generator is not used)."""
    if augment is None:
        return video
    return augment(video, generator=step_generator("augment", seed, step, video.device), rows=rows, total=total)


def clip_rows(videos: slice, repeats: int) -> slice:
    """The rows of a batch's clips (repeats per video, video-major) that a slice of its videos holds."""
    return slice(videos.start * repeats, videos.stop * repeats)


def shard(global_batch: int, rank: int, world: int) -> slice:
    if global_batch % world:
        raise ConfigError(f"batch_size={global_batch}: expected a multiple of the {world} processes")
    b = global_batch // world
    return slice(rank * b, (rank + 1) * b)


def load_clip_tensors(path: str | Path) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A tensor file of clips: uint8 (N, T, H, W, C) as decoders return them, alone or as
    {"clips": ..., "labels": {family: (N,)}} (`bwssl synth --format tensor`). Returns (clips, labels)."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(f"{path}: cannot load clips ({err.__class__.__name__}: {err})") from None
    clips, labels = (obj.get("clips"), obj.get("labels") or {}) if isinstance(obj, dict) else (obj, {})
    if not (isinstance(clips, torch.Tensor) and clips.dtype == torch.uint8 and clips.dim() == 5):
        raise ConfigError(f"{path}: expected a uint8 tensor (N, T, H, W, C), got "
                          f"{getattr(clips, 'dtype', type(clips).__name__)} {tuple(getattr(clips, 'shape', ()))}")
    bad = [k for k, y in labels.items() if not (isinstance(y, torch.Tensor) and y.shape == (len(clips),)
                                                  and not (y.dtype.is_floating_point or y.dtype == torch.bool))]
    if bad:
        raise ConfigError(f"{path}: labels {bad} are not one integer per clip ({len(clips)} clips)")
    return clips, {k: y.long() for k, y in labels.items()}


class ClipTensorFile:
    """Clips from a tensor file (see load_clip_tensors), shuffled each epoch; `augment` as DatasetBatches'."""

    def __init__(self, path: str | Path, batch_size: int, seed: int = 0, device="cpu", augment=None):
        path = Path(path)
        clips, _ = load_clip_tensors(path)
        if len(clips) < batch_size:
            raise ConfigError(f"{path}: {len(clips)} clips, fewer than batch_size={batch_size}")
        self.clips, self.batch_size, self.seed, self.device, self.augment = clips, batch_size, seed, device, augment

    def clip_shape(self) -> tuple[int, int, int, int]:
        """(C, T, H, W) of one clip."""
        N, T, H, W, C = self.clips.shape
        return C, T, H, W

    def __call__(self, start_step: int = 0, rank: int = 0, world: int = 1) -> Iterator[torch.Tensor]:
        rows = shard(self.batch_size, rank, world)
        batches = epoch_batches(len(self.clips), self.batch_size, self.seed, start_step, rows)
        for step, (_, ids) in enumerate(batches, start_step):
            clips = self.clips[ids].to(self.device, non_blocking=True).permute(0, 4, 1, 2, 3)  # (b, C, T, H, W)
            yield normalize_video(augmented(self.augment, clips, self.seed, step, rows, self.batch_size))


class DatasetBatches:
    """Batches of a clip dataset (video.VideoClips, cache.CachedClips) read by a DataLoader with
    `workers` processes, in an order fixed by (seed, epoch). Items are `(clips, label)` with clips
    uint8 (C, T, H, W), or (R, C, T, H, W) with repeated sampling, flattened into the batch; the
    sampler passes the epoch to the dataset as index + epoch * len(dataset), so persistent workers
    and resumed runs read the same clips. `augment` runs on `device` after the transfer (for
    example cache.gpu_augment). batch_size counts videos, all processes together."""

    def __init__(self, dataset, batch_size: int, seed: int = 0, workers: int = 0, device="cpu", augment=None):
        if len(dataset) < batch_size:
            raise ConfigError(f"{len(dataset)} videos, fewer than a batch of {batch_size}")
        self.dataset, self.batch_size, self.seed, self.workers = dataset, batch_size, seed, workers
        self.device, self.augment = torch.device(device), augment

    def _indices(self, start_step: int, rank: int, world: int) -> Iterator[int]:
        n = len(self.dataset)
        rows = shard(self.batch_size, rank, world)
        for epoch, ids in epoch_batches(n, self.batch_size, self.seed, start_step, rows):
            yield from (ids + epoch * n).tolist()

    def __call__(self, start_step: int = 0, rank: int = 0, world: int = 1) -> Iterator[torch.Tensor]:
        from torch.utils.data import DataLoader

        loader = DataLoader(self.dataset, batch_size=self.batch_size // world,
                            sampler=self._indices(start_step, rank, world), num_workers=self.workers,
                            pin_memory=self.device.type == "cuda", persistent_workers=self.workers > 0)
        R = getattr(self.dataset, "repeats", 1)
        rows = clip_rows(shard(self.batch_size, rank, world), R)  # this process's clips of each global batch
        for step, (clips, _) in enumerate(loader, start_step):
            clips = clips.flatten(0, 1) if clips.dim() == 6 else clips  # (b * R, C, T, H, W)
            clips = clips.to(self.device, non_blocking=True)
            yield augmented(self.augment, clips, self.seed, step, rows, self.batch_size * R)


class MovingShapes:
    """Squares gliding over smooth colour gradients, generated on the device: a smoke-test and
    benchmark source that needs no files (the labelled study data set is `bwssl synth`)."""

    def __init__(self, cfg: ModelConfig, batch_size: int, seed: int = 0, device="cpu"):
        self.cfg, self.batch_size, self.seed, self.device = cfg, batch_size, seed, torch.device(device)

    def batch(self, step: int) -> torch.Tensor:
        """The global batch of `step`: normalised (B, C, T, H, W)."""
        c, B, dev = self.cfg, self.batch_size, self.device
        g = step_generator("shapes", self.seed, step, dev)
        rand = lambda *shape: torch.rand(*shape, generator=g, device=dev)  # noqa: E731
        T, S, C = c.num_frames, c.img_size, c.in_chans
        t = torch.linspace(0, 1, T, device=dev)[None, :, None, None]  # (1, T, 1, 1)
        ys = torch.linspace(0, 1, S, device=dev)[None, None, :, None]
        xs = torch.linspace(0, 1, S, device=dev)[None, None, None, :]
        angle = rand(B, 1, 1, 1) * 6.2832
        background = (0.5 + (xs - 0.5) * angle.cos() + (ys - 0.5) * angle.sin())[:, None]  # (B, 1, 1, S, S)
        start, velocity = rand(2, B, 1, 1, 1) * 0.6 + 0.2, (rand(2, B, 1, 1, 1) - 0.5) * 0.8
        half = rand(B, 1, 1, 1) * 0.1 + 0.1
        cy, cx = start + velocity * (t - 0.5)  # (B, T, 1, 1)
        inside = (((ys - cy).abs() < half) & ((xs - cx).abs() < half))[:, None].float()  # (B, 1, T, S, S)
        low, high, colour = rand(3, B, C, 1, 1, 1)
        pixels = low + (high - low) * background
        pixels = pixels * (1 - inside) + colour * inside  # (B, C, T, S, S) in [0, 1]
        return normalize_video((pixels.clamp(0, 1) * 255).round().to(torch.uint8))

    def __call__(self, start_step: int = 0, rank: int = 0, world: int = 1) -> Iterator[torch.Tensor]:
        rows = shard(self.batch_size, rank, world)
        for step in itertools.count(start_step):
            yield self.batch(step)[rows]
