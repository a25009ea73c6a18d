"""Batches from a clip cache straight into page-locked memory: the GPU's input path.

The DataLoader route (batches.DatasetBatches over cache.CachedClips) copies every clip four times
on the host: memmap read, HWC to CHW transpose, collate into shared memory, pin. The main process
does the last copy alone. On an H200 host that gave 290 clips/s at 224 px (benchmarks/NOTES.md),
a fifth of what training consumes. Here a thread pool copies each clip's frames from the memory
map into a reused pinned buffer, in one copy (numpy releases the GIL while it copies). The buffer
goes to the GPU asynchronously, and the layout change, crop and flip run there. The next batches
are filled while the GPU works on this one.

The clips equal DatasetBatches(CachedClips(...))'s, clip for clip (a test): the same epoch order
(batches.epoch_batches) and the same per-clip starts (video.item_seed, clip_starts).
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

import numpy as np
import torch

from .batches import augmented, clip_rows, epoch_batches, shard
from .config import ConfigError
from .listfile import DataError
from .video import clip_indices, clip_starts, item_seed


class CacheBatches:
    """A batch source (batches.py) over a cache.CachedClips in train mode: uint8 (b * R, C, T, H, W)
    on `device` (R = the dataset's repeats), after `augment` (e.g. cache.gpu_augment) if given.
    threads: host threads copying frames; depth: batches filled ahead of the one in use."""

    def __init__(self, dataset, batch_size: int, seed: int = 0, threads: int = 8, device="cpu",
                 augment: Callable | None = None, depth: int = 2):
        if dataset.mode != "train":
            raise ConfigError(f"CacheBatches samples training clips: the dataset's mode is {dataset.mode!r}")
        if len(dataset) < batch_size:
            raise ConfigError(f"{len(dataset)} videos, fewer than a batch of {batch_size}")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.threads, self.depth = max(1, threads), max(1, depth)
        self.device, self.augment = torch.device(device), augment

    def _fill(self, buf: np.ndarray, rows: range, ids: list[int], epoch: int) -> None:
        """Copy the clips of videos `ids` (in epoch `epoch`) into buf[rows]: (R, T, H, W, C) each."""
        ds = self.dataset
        R = ds.repeats
        for j, i in zip(rows, ids):
            video = ds.videos[i]
            if problem := ds.too_short(video["frames"]):
                raise DataError(f"{ds.entries[i].source}: {ds.entries[i].path}: {problem}")
            g = torch.Generator().manual_seed(item_seed(ds.seed, epoch, i))
            starts = clip_starts(video["frames"], ds.span, R, True, g)
            idx = video["offset"] + clip_indices(starts, ds.num_frames, ds.sampling_rate)  # (R, T)
            for r in range(R):  # mode "clip": no bounce buffer ("raise" buffers `out`); too_short bounds idx
                np.take(ds.frames, idx[r], axis=0, out=buf[j * R + r], mode="clip")

    def __call__(self, start_step: int = 0, rank: int = 0, world: int = 1) -> Iterator[torch.Tensor]:
        ds, cuda = self.dataset, self.device.type == "cuda"
        _ = ds.frames  # open the memory map here, not in several threads at once
        b = self.batch_size // world
        rows = shard(self.batch_size, rank, world)
        shape = (b * ds.repeats, ds.num_frames, *ds.shape[1:])  # (B, T, H, W, C)
        slots = [torch.empty(shape, dtype=torch.uint8, pin_memory=cuda) for _ in range(self.depth + 1)]
        done = [None] * len(slots)  # the event after which a slot's copy to the device has finished
        steps = epoch_batches(len(ds), self.batch_size, self.seed, start_step, rows)
        chunk = -(-b // self.threads)
        with ThreadPoolExecutor(self.threads) as pool:
            def submit(slot: int):
                if done[slot] is not None:
                    done[slot].synchronize()
                epoch, ids = next(steps)
                ids = ids.tolist()
                buf = slots[slot].numpy()
                return slot, [pool.submit(self._fill, buf, range(k, min(k + chunk, b)), ids[k:k + chunk], epoch)
                              for k in range(0, b, chunk)]

            pending = deque(submit(s) for s in range(self.depth))
            free, step, clips = self.depth, start_step, clip_rows(rows, ds.repeats)  # this process's clips
            while True:
                slot, jobs = pending.popleft()
                for job in jobs:
                    job.result()  # a worker's error is raised here
                host = slots[slot]
                video = host.to(self.device, non_blocking=True) if cuda else host.clone()
                if cuda:
                    done[slot] = torch.cuda.Event()
                    done[slot].record()
                pending.append(submit(free))
                free = slot
                video = video.permute(0, 4, 1, 2, 3)  # (B, C, T, H, W)
                if self.augment is None:
                    yield video.contiguous()
                else:
                    yield augmented(self.augment, video, self.seed, step, clips, self.batch_size * ds.repeats)
                step += 1
