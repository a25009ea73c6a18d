"""The clip cache: every video of a list file decoded once into one uint8 memory-mapped file.

A cache folder holds `frames.u8`, all frames (total_frames, H, W, C) back to back, and `index.json`
(per video: path, list line, label, frame offset, frame count; H, W, C; the list file). index.json is
written last, so a folder without it is not a cache. CachedClips samples exactly as VideoClips
(the same ClipSampler) and reads frames from the memory map, so both return equal clips.
`gpu_augment` crops and flips a uint8 batch on its device, for when CPU transforms are the bottleneck.
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import roi_align

from .io import save_json
from .listfile import DataError, VideoEntry, file_problem, parse_list_file
from .video import ClipSampler, Size, _pair, _reason, open_video, read_frames, report_bad

CACHE_VERSION = 1
FRAMES, INDEX = "frames.u8", "index.json"
CHUNK = 64  # frames decoded per get_batch while building


def _probe(entry: VideoEntry, decode_size) -> tuple[int, tuple[int, ...]] | str:
    """(frame count, (H, W, C)) of a video, or why it cannot be read."""
    if problem := file_problem(entry.path):
        return problem
    try:
        reader = open_video(entry.path, decode_size)
        return len(reader), read_frames(reader, [0]).shape[1:]
    except Exception as err:
        return f"cannot decode ({_reason(err)})"


def _decode_into(entry: VideoEntry, decode_size, tmp: str, shape: tuple, offset: int, n: int) -> str | None:
    """Decode all n frames of a video into rows [offset, offset + n) of the frames file, or say why not (a
    video can open and give its first frame, and still be damaged further in)."""
    frames = np.memmap(tmp, np.uint8, "r+", shape=shape)
    try:
        reader = open_video(entry.path, decode_size)
        for lo in range(0, n, CHUNK):
            hi = min(lo + CHUNK, n)
            frames[offset + lo:offset + hi] = read_frames(reader, range(lo, hi))  # (k, H, W, C)
    except Exception as err:
        return f"cannot decode ({_reason(err)})"
    frames.flush()
    return None


def build_cache(list_file: str | Path, out_dir: str | Path, root: str | Path | None = None,
                decode_size: Size | None = None, workers: int = 1, skip_bad: bool = False,
                overwrite: bool = False) -> Path:
    """Decode every video of `list_file` once (as VideoClips would, with the same decode_size) into
    `out_dir`. Videos must share one frame size (give decode_size otherwise). skip_bad drops videos
    that cannot be read, whether at the first look or in the full decode (listed in index.json's "bad";
    the frame rows of one that failed midway stay unused), instead of failing."""
    list_file, out = Path(list_file), Path(out_dir)
    if (out / INDEX).exists() or (out / FRAMES).exists():
        if not overwrite:
            raise DataError(f"{out}: already holds a clip cache; pass --overwrite to replace it, or choose another "
                            "--out")
        (out / INDEX).unlink(missing_ok=True)  # the old index must never describe new frames
    entries = parse_list_file(list_file, root, check_files=not skip_bad)
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    run = pool.map if pool else map
    try:
        probes = list(run(_probe, entries, [decode_size] * len(entries)))
        good, bad = [], []
        for entry, probe in zip(entries, probes):
            if isinstance(probe, tuple):
                good.append((entry, *probe))
            elif skip_bad:
                bad.append((entry, probe))
            else:
                raise DataError(f"{entry.source}: {entry.path}: {probe}")
        if not good:
            report_bad(list_file, len(entries), bad, None)  # none can be read: says so
        hwc = good[0][2]
        for entry, _, shape in good:
            if shape != hwc:
                raise DataError(f"{entry.source}: {entry.path}: frames of {shape[:2]}, but {good[0][0].path} "
                                f"has {hwc[:2]}; give decode_size to decode all at one size")
        counts = [n for _, n, _ in good]
        offsets = np.cumsum([0] + counts[:-1]).tolist()
        shape = (sum(counts), *hwc)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".{FRAMES}.{os.getpid()}.tmp"  # renamed to frames.u8 once complete
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            os.ftruncate(fd, int(np.prod(shape)))
            args = [[e for e, _, _ in good], [decode_size] * len(good), [str(tmp)] * len(good), [shape] * len(good),
                    offsets, counts]
            failed = set()
            for k, problem in enumerate(run(_decode_into, *args)):
                if problem and not skip_bad:
                    raise DataError(f"{good[k][0].source}: {good[k][0].path}: {problem}")
                if problem:
                    bad.append((good[k][0], problem))
                    failed.add(k)
            os.fsync(fd)
            os.replace(tmp, out / FRAMES)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    report_bad(list_file, len(entries), bad, None)
    videos = [dict(path=str(e.path), source=e.source, line=e.line, label=e.label, offset=o, frames=n)
              for k, ((e, n, _), o) in enumerate(zip(good, offsets)) if k not in failed]
    save_json(out / INDEX, dict(version=CACHE_VERSION, list_file=str(list_file.resolve()),
                                decode_size=_pair(decode_size), height=hwc[0], width=hwc[1], channels=hwc[2],
                                total_frames=shape[0], videos=videos,
                                bad=[dict(source=e.source, path=str(e.path), reason=r) for e, r in bad]))
    return out


class CachedClips(ClipSampler):
    """Clips read from a cache folder with no decoding; items as VideoClips' (see ClipSampler).
    skip_bad drops videos too short for one clip (`.bad`), as VideoClips(skip_bad=True) does; videos that
    could not be decoded were dropped (skip_bad) or refused when the cache was built."""

    def __init__(self, cache_dir: str | Path, num_frames: int = 16, sampling_rate: int = 4, mode: str = "train",
                 num_clips: int = 1, num_crops: int = 1, transform=None, repeats: int = 1, skip_bad: bool = False,
                 bad_list_out: str | Path | None = None, seed: int = 0):
        super().__init__(num_frames, sampling_rate, mode, num_clips, num_crops, transform, repeats, seed)
        self.dir = Path(cache_dir)
        try:
            index = json.loads((self.dir / INDEX).read_text())
        except (OSError, ValueError) as err:
            raise DataError(f"{self.dir}: not a clip cache, or its build did not finish "
                            f"({err.__class__.__name__}: {err})") from None
        if index.get("version") != CACHE_VERSION:
            raise DataError(f"{self.dir / INDEX}: cache version {index.get('version')!r}, expected {CACHE_VERSION}")
        self.shape = (index["total_frames"], index["height"], index["width"], index["channels"])
        size = (self.dir / FRAMES).stat().st_size if (self.dir / FRAMES).exists() else None
        if size != int(np.prod(self.shape)):
            raise DataError(f"{self.dir / FRAMES}: {size} bytes, expected {int(np.prod(self.shape))} "
                            f"for frames {self.shape}")
        self.index, self.videos, self.bad = index, [], []
        for v in index["videos"]:
            entry = VideoEntry(Path(v["path"]), v["label"], v["line"], v["source"])
            if skip_bad and (problem := self.too_short(v["frames"])):
                self.bad.append((entry, problem))
            else:
                self.entries.append(entry)
                self.videos.append(v)
        if self.bad:
            report_bad(self.dir / INDEX, len(index["videos"]), self.bad, bad_list_out)
        self._frames = None  # opened lazily in each process: a memmap must not be pickled into workers

    def __getstate__(self):
        return {**self.__dict__, "_frames": None}

    @property
    def frames(self) -> np.memmap:
        """Every frame (total_frames, H, W, C), memory-mapped, opened on first use in each process."""
        if self._frames is None:
            self._frames = np.memmap(self.dir / FRAMES, np.uint8, "r", shape=self.shape)
        return self._frames

    def _open(self, i: int):
        video, frames = self.videos[i], self.frames
        offset = video["offset"]
        return video["frames"], lambda indices: np.asarray(frames[offset + indices])  # (K, H, W, C)


def gpu_augment(video: torch.Tensor, size: int, scale: tuple[float, float] = (0.5, 1.0), flip: bool = True,
                generator: torch.Generator | None = None, ratio: tuple[float, float] = (3 / 4, 4 / 3),
                rows: slice = slice(None), total: int | None = None) -> torch.Tensor:
    """Random resized crop (one box per clip, the same over its frames) and horizontal flip (p = 0.5),
    batched on video's device: (B, C, T, H, W) -> (B, C, T, size, size), uint8 in -> uint8 out, float
    -> float. Boxes as RandomResizedCrop's (area fraction in `scale`, log-uniform aspect `ratio`),
    clamped to the frame instead of re-drawn. `generator` must live on video's device. Data-parallel:
    the draws are made for all `total` clips of the global batch and video is its `rows` (see
    batches.augmented), so each clip gets the crop it would get in one process."""
    B, C, T, H, W = video.shape
    dev, total = video.device, total or B
    rand = lambda n: torch.rand(n, generator=generator, device=dev)[rows]  # noqa: E731 (B,) of the global draw
    if len(range(total)[rows]) != B:
        raise ValueError(f"rows {rows} of a global batch of {total} clips: expected {B}, the clips given")
    area = H * W * (scale[0] + (scale[1] - scale[0]) * rand(total))
    log_lo, log_hi = np.log(ratio[0]), np.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * rand(total))
    w = (area * aspect).sqrt().clamp(max=W)
    h = (area / aspect).sqrt().clamp(max=H)
    x0, y0 = (W - w) * rand(total), (H - h) * rand(total)
    boxes = torch.stack([torch.arange(B * T, device=dev, dtype=torch.float),  # frame b*T + t uses clip b's box
                         *(c.repeat_interleave(T) for c in (x0, y0, x0 + w, y0 + h))], 1)  # (B*T, 5)
    frames = video.transpose(1, 2).reshape(B * T, C, H, W).float()  # (B*T, C, H, W)
    out = roi_align(frames, boxes, (size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    out = out.view(B, T, C, size, size).transpose(1, 2)  # (B, C, T, size, size)
    if flip:
        mirror = (rand(total) < 0.5).view(B, 1, 1, 1, 1)
        out = torch.where(mirror, out.flip(-1), out)
    if video.dtype == torch.uint8:
        return out.round().clamp(0, 255).to(torch.uint8)
    return out.to(video.dtype)


__all__ = ["CACHE_VERSION", "build_cache", "CachedClips", "gpu_augment"]
