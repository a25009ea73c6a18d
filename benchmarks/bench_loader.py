"""Loader throughput: clips/s of the real-video data paths.

(a) VideoClips (decord decode + CPU train_transform) through a DataLoader with N workers,
(b) CachedClips (memory-mapped frames + CPU train_transform) through a DataLoader,
(c) CachedClips without transform (uint8 batch reads) + gpu_augment on the available device,
(d) prefetch.CacheBatches: N threads copy clips into a reused (pinned) buffer, + gpu_augment.
Makes a set of H.264 clips with PyAV unless --list is given. Prints a table and writes JSON.

    python benchmarks/bench_loader.py --out runs/bench_loader.json --videos 200 --frames 16 --size 64
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import os
import platform
import tempfile
import time
from functools import partial
from pathlib import Path

import av
import numpy as np
import torch
from torch.utils.data import DataLoader

from bwssl_core.cache import CachedClips, build_cache, gpu_augment
from bwssl_core.prefetch import CacheBatches
from bwssl_core.io import save_json
from bwssl_core.timing import device_name
from bwssl_core.video import VideoClips, train_transform


def make_videos(folder: Path, count: int, frames: int, size: int, seed: int = 0) -> Path:
    """`count` H.264 clips of moving squares on gradients, and list.txt over them (labels 0..9)."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:size, 0:size] / (size - 1)
    lines = []
    for i in range(count):
        base = rng.uniform(40, 200, 3)
        background = base + 50 * np.stack([xs, ys, 1 - xs], -1)  # (H, W, 3)
        x0, y0, vx, vy = rng.uniform(0, size / 2, 2).tolist() + rng.uniform(-1.5, 1.5, 2).tolist()
        path = folder / f"clip{i:05d}.mp4"
        with av.open(str(path), "w") as container:
            stream = container.add_stream("libx264", rate=25)
            stream.width = stream.height = size
            stream.pix_fmt, stream.options = "yuv420p", {"crf": "18"}
            for t in range(frames):
                frame = background.copy()
                x, y = int(x0 + vx * t) % (size // 2), int(y0 + vy * t) % (size // 2)
                frame[y:y + size // 4, x:x + size // 4] = 255
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame.astype(np.uint8), format="rgb24")))
            container.mux(stream.encode())
        lines.append(f"{path.name} {i % 10}\n")
    (folder / "list.txt").write_text("".join(lines))
    return folder / "list.txt"


def timed(batches, sync=lambda: None) -> tuple[float, int]:
    """Clips/s over all batches but the first (worker start-up, warm caches)."""
    it = iter(batches)
    next(it)
    sync()
    start, clips = time.perf_counter(), 0
    for batch in it:
        clips += len(batch)
    sync()
    return clips / (time.perf_counter() - start), clips


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON results file")
    p.add_argument("--list", help="list file of existing videos (default: make --videos clips)")
    p.add_argument("--root", help="folder the list's paths are relative to (default: the list's folder)")
    p.add_argument("--work", help="folder for made videos and the cache (default: a temporary folder)")
    p.add_argument("--videos", type=int, default=200)
    p.add_argument("--frames", type=int, default=16, help="frames per made video")
    p.add_argument("--size", type=int, default=64, help="side of made videos and of output clips")
    p.add_argument("--decode-size", type=int, help="decode (and cache) frames at this size")
    p.add_argument("--num-frames", type=int, default=16)
    p.add_argument("--sampling-rate", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--epochs", type=int, default=3, help="passes timed per path")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, help="torch intra-op threads of the main process (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    tmp = tempfile.TemporaryDirectory() if args.work is None else None
    work = Path(args.work or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    if args.list:
        list_file = Path(args.list)
    else:
        t0 = time.perf_counter()
        list_file = make_videos(work, args.videos, args.frames, args.size)
        print(f"made {args.videos} videos of {args.frames} x {args.size} x {args.size} "
              f"in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    cache = build_cache(list_file, work / "cache", root=args.root, decode_size=args.decode_size,
                        workers=max(args.workers), overwrite=True)
    build_s = time.perf_counter() - t0

    sampling = dict(num_frames=args.num_frames, sampling_rate=args.sampling_rate)
    augment = train_transform(args.size)
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    rows = []
    result = dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"), machine=platform.platform(),
        cpu_count=os.cpu_count(), torch=torch.__version__, torch_threads=torch.get_num_threads(), device=str(device),
        device_name=device_name(device), args=vars(args), cache_build_s=build_s, results=[])

    def done(name: str, workers: int, rate_and_clips: tuple[float, int]) -> None:
        """A row printed and saved as soon as it is measured: a run cut short by a time limit keeps it."""
        rows.append((name, workers, *rate_and_clips))
        print(f"{name:44s} {workers:7d} {rate_and_clips[0]:9.1f}", flush=True)
        result["results"] = [dict(path=n, workers=w, clips_per_s=r, clips_timed=c) for n, w, r, c in rows]
        save_json(Path(args.out), {**result, "partial": True})

    print(f"cache build: {build_s:.2f} s ({max(args.workers)} workers)\n{'path':44s} {'workers':>7s} {'clips/s':>9s}")
    for workers in args.workers:
        def loader(ds, pin=False):
            """`--epochs` passes over ds, workers kept between them; pin: batches in page-locked memory."""
            dl = DataLoader(ds, args.batch_size, shuffle=True, num_workers=workers, persistent_workers=workers > 0,
                            drop_last=True, pin_memory=pin)
            return itertools.chain.from_iterable(dl for _ in range(args.epochs))
        decoded = VideoClips(list_file, args.root, decode_size=args.decode_size, transform=augment, **sampling)
        done("VideoClips (decord) + CPU transform", workers, timed(b for b, _ in loader(decoded)))
        cached = CachedClips(cache, transform=augment, **sampling)
        done("CachedClips + CPU transform", workers, timed(b for b, _ in loader(cached)))
        g = torch.Generator(device).manual_seed(0)
        plain = CachedClips(cache, **sampling)  # no transform: uint8 frames for the device
        raw = loader(plain, pin=device.type == "cuda")
        on_device = (gpu_augment(b.to(device, non_blocking=True), args.size, generator=g) for b, _ in raw)
        done(f"CachedClips + gpu_augment ({device.type})", workers, timed(on_device, sync))
        fast = CacheBatches(plain, args.batch_size, threads=max(1, workers), device=device,
                            augment=partial(gpu_augment, size=args.size))  # draws from (seed, step)
        # the fastest path: 4x the passes of the others, so that its timed part is not a fraction of a second
        batches = itertools.islice(fast(), len(plain) // args.batch_size * args.epochs * 4)
        done(f"CacheBatches (threads) + gpu_augment ({device.type})", workers, timed(batches, sync))
    save_json(Path(args.out), result)
    if tmp:
        tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
