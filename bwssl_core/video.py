"""Real videos: decoding with decord, VideoMAE's clip sampling, torchvision transforms.

Datasets return uint8 clips; the trainer normalises them on its device with
`bwssl_core.batches.normalize_video`. Randomness: item i of epoch e draws its clip starts and its
transform from generators seeded by (seed, e, i), whatever process or DataLoader worker runs it, so a
clip is a function of (seed, epoch, index) and VideoClips and CachedClips agree exactly. Call
`set_epoch(e)` at the start of each epoch (as with DistributedSampler), or ask for index
i + e * len(dataset), which reaches persistent workers too (batches.DatasetBatches does this);
otherwise every epoch sees the same clips. The transform runs under `torch.random.fork_rng`, so the global RNG is left as it was.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from .batches import STREAMS, hashed_seed
from .config import ConfigError
from .io import save_text
from .listfile import DataError, VideoEntry, file_problem, parse_list_file

if TYPE_CHECKING:
    import decord

Size = int | tuple[int, int]


def _pair(size: Size | None) -> tuple[int, int] | None:
    """decode_size -> (H, W), or None for the native size."""
    if size is None:
        return None
    h, w = (size, size) if isinstance(size, int) else size
    return int(h), int(w)


def _reason(err: BaseException) -> str:
    """One line for an exception, without decord's '[time] /src/file.cc:123: ' prefixes."""
    text = re.sub(r"\[\d\d:\d\d:\d\d\] \S+:\d+: ", "", str(err)).strip().splitlines()
    text = text[0][:200] if text else ""
    if "DECORDArrayCopyFromTo" in text:
        text += " (decord mis-sizes frames of some widths, e.g. 16, 24, 48, 72: choose another decode_size)"
    return f"{err.__class__.__name__}: {text}"


def open_video(path: Path, decode_size: Size | None = None) -> decord.VideoReader:
    """The one decord call used to read videos (VideoClips and the clip cache). decord is imported
    here, not with the module, so that clip tensors and caches need no video codec."""
    import decord

    hw = _pair(decode_size)
    if hw is None:
        return decord.VideoReader(str(path), num_threads=1)
    return decord.VideoReader(str(path), num_threads=1, width=hw[1], height=hw[0])


def read_frames(reader: decord.VideoReader, indices) -> np.ndarray:
    """Frames at `indices`: uint8 (K, H, W, 3)."""
    frames = reader.get_batch(list(map(int, indices))).asnumpy()
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise RuntimeError(f"decord returned frames of shape {frames.shape}, expected (K, H, W, 3)")
    return frames


def clip_starts(n: int, span: int, count: int, train: bool, generator: torch.Generator | None = None) -> np.ndarray:
    """First frames of `count` clips of `span` frames in a video of n >= span frames. Train: uniform
    in [0, n - span]. Eval: spread evenly over [0, n - span], ends included (one clip: the centre)."""
    if train:
        return torch.randint(0, n - span + 1, (count,), generator=generator).numpy()
    return spread(n - span, count)


def spread(extent: int, count: int) -> np.ndarray:
    """`count` integer offsets evenly over [0, extent], ends included; one offset: the centre."""
    if count == 1:
        return np.array([extent // 2])
    return np.round(np.linspace(0, extent, count)).astype(np.int64)


def clip_indices(starts: np.ndarray, num_frames: int, sampling_rate: int) -> np.ndarray:
    """Frame indices (count, num_frames): start + i * sampling_rate."""
    return np.asarray(starts)[:, None] + np.arange(num_frames) * sampling_rate


def item_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed that depends on (seed, epoch, index) only: an item's clip starts and crop."""
    return hashed_seed(STREAMS["item"], seed, epoch, index)


def square_crops(video: torch.Tensor, count: int) -> torch.Tensor:
    """(R, T, C, H, W) -> (R * count, T, C, s, s), s = min(H, W): squares spread along the longer side
    (3: left / centre / right, or top / centre / bottom), clip-major."""
    h, w = video.shape[-2:]
    s = min(h, w)
    boxes = list(zip(spread(h - s, count), spread(w - s, count)))
    return torch.stack([clip[..., y:y + s, x:x + s] for clip in video for y, x in boxes])


def train_transform(size: int, scale: tuple[float, float] = (0.5, 1.0), flip: bool = True) -> v2.Compose:
    """Random resized crop (the same box over all frames) and optional horizontal flip. Turn the flip
    off for labels that name left / right motion."""
    ops = [v2.RandomResizedCrop(size, scale=scale, antialias=True)]
    if flip:
        ops.append(v2.RandomHorizontalFlip())
    return v2.Compose(ops)


def eval_transform(size: int) -> v2.Compose:
    """Shorter side to `size`, then the centre square."""
    return v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size)])


class ClipSampler(Dataset):
    """Sampling shared by VideoClips and CachedClips: subclasses give `entries` and `_open(i)`.

    Item i is `(clips, label)`: uint8 (C, T, H, W) in train mode with repeats=1, otherwise
    (R, C, T, H, W) with R = repeats (train) or num_clips * num_crops (eval, clip-major: clip k,
    crop j at k * num_crops + j). A clip is frames start + i * sampling_rate, i < num_frames.
    """

    def __init__(self, num_frames: int = 16, sampling_rate: int = 4, mode: str = "train", num_clips: int = 1,
                 num_crops: int = 1, transform: Callable | None = None, repeats: int = 1, seed: int = 0):
        if mode not in ("train", "eval"):
            raise ConfigError(f"mode={mode!r}: expected 'train' or 'eval'")
        for name, value in dict(num_frames=num_frames, sampling_rate=sampling_rate, num_clips=num_clips,
                                num_crops=num_crops, repeats=repeats).items():
            if not (isinstance(value, int) and value >= 1):
                raise ConfigError(f"{name}={value!r}: expected a positive integer")
        self.num_frames, self.sampling_rate, self.mode = num_frames, sampling_rate, mode
        self.num_clips, self.num_crops, self.repeats = num_clips, num_crops, repeats
        self.transform, self.seed, self.epoch = transform, seed, 0
        self.entries: list[VideoEntry] = []

    @property
    def span(self) -> int:
        """Frames one clip covers: num_frames * sampling_rate (a video needs at least this many)."""
        return self.num_frames * self.sampling_rate

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.entries)

    def _open(self, i: int) -> tuple[int, Callable[[np.ndarray], np.ndarray]]:
        """(frame count, read) for item i; read(sorted unique indices) -> uint8 (K, H, W, C)."""
        raise TypeError(f"{type(self).__name__} must define _open")

    def too_short(self, n: int) -> str | None:
        if n < self.span:
            return (f"{n} frames, fewer than the {self.span} one clip spans "
                    f"({self.num_frames} frames x sampling rate {self.sampling_rate})")
        return None

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        """Index i + e * len(self) reads item i as in epoch e (added to set_epoch's): this is how a
        sampler passes the epoch to persistent DataLoader workers."""
        extra, i = divmod(i, len(self.entries))
        epoch = self.epoch + extra
        entry = self.entries[i]
        n, read = self._open(i)
        if problem := self.too_short(n):
            raise DataError(f"{entry.source}: {entry.path}: {problem}")
        train = self.mode == "train"
        g = torch.Generator().manual_seed(item_seed(self.seed, epoch, i))
        starts = clip_starts(n, self.span, self.repeats if train else self.num_clips, train, g)
        idx = clip_indices(starts, self.num_frames, self.sampling_rate)  # (R, T)
        unique, inverse = np.unique(idx, return_inverse=True)  # each frame decoded once
        frames = torch.from_numpy(read(unique))[torch.from_numpy(inverse.reshape(-1))]  # (R*T, H, W, C)
        video = frames.view(*idx.shape, *frames.shape[1:]).permute(0, 1, 4, 2, 3)  # (R, T, C, H, W)
        if not train:
            video = square_crops(video, self.num_crops)  # (R * crops, T, C, s, s)
        if self.transform is not None:
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(int(torch.randint(2 ** 62, (1,), generator=g)))
                video = torch.stack([self.transform(tv_tensors.Video(v)) for v in video])
        clips = video.as_subclass(torch.Tensor).permute(0, 2, 1, 3, 4).contiguous()  # (R, C, T, H, W)
        return (clips[0] if train and self.repeats == 1 else clips), entry.label


class VideoClips(ClipSampler):
    """Clips decoded with decord from the videos of a list file (see ClipSampler for what items are).

    decode_size: int s (frames decoded at s x s) or (H, W); None keeps the native size.
    skip_bad: probe every video first (open, frame count) and drop those that cannot give a clip,
    listing them in `.bad` as (entry, reason) and in `bad_list_out` (source, path, reason; tab-separated).
    Otherwise a bad video raises DataError naming it and its list line when its item is read. A bad
    video is never replaced by another. The probe decodes no frame: a video damaged further in is found when
    a clip reaches it (DataError); a clip cache built with skip_bad decodes every frame and drops it.
    """

    def __init__(self, list_file: str | Path, root: str | Path | None = None, num_frames: int = 16,
                 sampling_rate: int = 4, mode: str = "train", num_clips: int = 1, num_crops: int = 1,
                 decode_size: Size | None = None, transform: Callable | None = None, repeats: int = 1,
                 num_classes: int | None = None, skip_bad: bool = False, bad_list_out: str | Path | None = None,
                 seed: int = 0):
        super().__init__(num_frames, sampling_rate, mode, num_clips, num_crops, transform, repeats, seed)
        self.list_file, self.decode_size, self.skip_bad = Path(list_file), decode_size, skip_bad
        entries = parse_list_file(list_file, root, num_classes, check_files=not skip_bad)
        self.bad: list[tuple[VideoEntry, str]] = []
        if skip_bad:
            for entry in entries:
                if problem := self.probe(entry):
                    self.bad.append((entry, problem))
                else:
                    self.entries.append(entry)
            report_bad(self.list_file, len(entries), self.bad, bad_list_out)
        else:
            self.entries = entries

    def probe(self, entry: VideoEntry) -> str | None:
        """Why this video cannot give a clip (missing, empty, unopenable, too short), or None."""
        if problem := file_problem(entry.path):
            return problem
        try:
            n = len(open_video(entry.path, self.decode_size))
        except Exception as err:
            return f"cannot open ({_reason(err)})"
        return self.too_short(n)

    def _open(self, i: int):
        entry = self.entries[i]

        def fail(err: Exception) -> DataError:
            hint = ("; it opened when skip_bad probed it, so it is damaged further in: build a clip cache with "
                    "skip_bad (bwssl cache --skip-bad), which decodes every frame") if self.skip_bad else ""
            return DataError(f"{entry.source}: {entry.path}: cannot decode ({_reason(err)}){hint}")
        try:
            reader = open_video(entry.path, self.decode_size)
        except Exception as err:
            raise fail(err) from None

        def read(indices: np.ndarray) -> np.ndarray:
            try:
                return read_frames(reader, indices)
            except Exception as err:
                raise fail(err) from None
        return len(reader), read


def report_bad(list_file: Path, total: int, bad: list[tuple[VideoEntry, str]], out: str | Path | None) -> None:
    """Write the skipped videos to `out` (one `source<TAB>path<TAB>reason` per line) and warn once."""
    if out is not None:
        save_text(Path(out), "".join(f"{e.source}\t{e.path}\t{reason}\n" for e, reason in bad))
    if len(bad) == total:
        raise DataError(f"{list_file}: none of its {total} videos can be read (first: {bad[0][0].path}: {bad[0][1]})")
    if bad:
        where = f", listed in {out}" if out is not None else ""
        warnings.warn(f"{list_file}: skipping {len(bad)} of {total} videos that cannot be read{where}",
                      stacklevel=3)


__all__ = ["DataError", "VideoEntry", "parse_list_file", "open_video", "read_frames", "clip_starts", "spread",
           "clip_indices", "item_seed", "square_crops", "train_transform", "eval_transform", "ClipSampler",
           "VideoClips", "report_bad"]
