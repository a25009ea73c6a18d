"""The embedded default data set: labelled synthetic videos of one object moving over a smooth background.

Designed for what a masked autoencoder can learn in minutes on a CPU (benchmarks/NOTES.md,
"Learnability"): smooth, static backgrounds that context predicts; one object large enough (about
6-15% of the frame) to carry a real share of the loss; motions that tube masking forces the model to
infer, since the object's path runs through hidden positions. A marker dot in the complementary
colour makes rotation visible even for a circle.

Label families (every clip has all of them; metadata.csv lists them):
  motion (8, the primary label): right, left, down, up, clockwise, anticlockwise, expand, contract;
      no single frame tells them apart.
  shape (4): circle, square, triangle, cross; readable from any frame.
  colour (4): hue quarter of the object.  speed (3): slow, medium, fast.  position (4): quadrant
      of the object's centre at mid-clip.
Nuisances, drawn independently of the labels: background kind (gradient or low-frequency plaid),
background colours and direction, object size, start position, a distractor disc (probability
`distractor`), static pixel noise up to `noise` (0 by default: per-pixel noise makes normalised
tube targets unpredictable).
"""
from __future__ import annotations

import csv
import io
import json
import math
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import ConfigError
from .io import RunError, save_json, save_tensors, save_text

MOTIONS = ("right", "left", "down", "up", "clockwise", "anticlockwise", "expand", "contract")
SHAPES = ("circle", "square", "triangle", "cross")
FAMILIES = {"motion": len(MOTIONS), "shape": len(SHAPES), "colour": 4, "speed": 3, "position": 4}
_SPEEDS = {  # per speed level: translation (fraction of the frame), rotation (radians), scale ratio
    "shift": (0.25, 0.35, 0.45), "turn": (math.pi / 2, 3 * math.pi / 4, math.pi), "zoom": (1.6, 2.0, 2.5)}


@dataclass
class SynthConfig:
    size: int = 64  # frame height and width
    frames: int = 16
    distractor: float = 0.5  # probability of a distractor disc
    noise: float = 0.0  # maximum std of static pixel noise (0: none)


def sample_factors(n: int, cfg: SynthConfig, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Labels and nuisances of n clips, each (n,). Every label family is balanced (exactly, when n
    is a multiple of its class count) and drawn independently of the others."""
    def u(lo=0.0, hi=1.0):
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    def balanced(k):
        return torch.arange(n)[torch.randperm(n, generator=generator)] % k

    f = {"motion": balanced(8), "shape": balanced(4), "colour": balanced(4), "speed": balanced(3),
         "position": balanced(4)}
    f["hue"] = (f["colour"] + u()) / 4
    f["radius"] = u(0.14, 0.19)  # fraction of the frame at mid-clip
    f["angle0"] = u(0, 2 * math.pi)
    f["bg_kind"] = (u() < 0.5).long()
    f["bg_angle"], f["bg_freq"], f["bg_phase"] = u(0, 2 * math.pi), u(0.5, 1.5), u(0, 2 * math.pi)
    f["bg_lo"], f["bg_hi"] = torch.rand(n, 3, generator=generator) * 0.4 + 0.1, torch.rand(n, 3, generator=generator) * 0.4 + 0.2
    f["has_distractor"] = (u() < cfg.distractor).long()
    f["d_x"], f["d_y"], f["d_vx"], f["d_vy"] = u(0.1, 0.9), u(0.1, 0.9), u(-0.3, 0.3), u(-0.3, 0.3)
    f["d_colour"] = torch.rand(n, 3, generator=generator)
    f["noise"] = u() * cfg.noise
    f["noise_seed"] = torch.randint(0, 2**31 - 1, (n,), generator=generator)
    # start position: inside the frame for the whole clip, in the quadrant given by `position`
    extent = _extent(f)  # (n, 2) half-extent of the object's path around its mid-clip centre
    lo = extent.clamp(max=0.5)
    side = torch.stack([f["position"] % 2, f["position"] // 2], 1).float()  # (n, 2) 0: left/top half
    start = lo + (0.5 - lo) * torch.rand(n, 2, generator=generator)  # in [lo, 0.5)
    f["cx"], f["cy"] = (start + side * (1 - 2 * start).clamp(min=0)).unbind(1)  # mirror into the other half
    return f


def _extent(f) -> torch.Tensor:
    """(n, 2) how far from its mid-clip centre the object reaches, as a fraction of the frame."""
    level, motion = f["speed"], f["motion"]
    shift = torch.tensor(_SPEEDS["shift"])[level]
    zoom = torch.tensor(_SPEEDS["zoom"])[level]
    reach = f["radius"] * 1.35  # the triangle's corners reach 1.3 radii
    reach = torch.where(motion >= 6, reach * zoom.sqrt(), reach)
    horizontal = torch.where(motion < 2, shift / 2, 0.0)
    vertical = torch.where((motion >= 2) & (motion < 4), shift / 2, 0.0)
    return torch.stack([reach + horizontal, reach + vertical], 1)


def _inside(shape: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Membership of canonical coordinates (u, v) (radius units) in each clip's shape."""
    circle = u ** 2 + v ** 2 <= 1
    square = torch.maximum(u.abs(), v.abs()) <= 0.85
    tri = torch.ones_like(circle)
    for a in (math.pi / 2, math.pi * 7 / 6, math.pi * 11 / 6):  # edge normals of an upward triangle
        tri &= u * math.cos(a) - v * math.sin(a) >= -0.65
    cross = ((u.abs() <= 0.35) & (v.abs() <= 1)) | ((v.abs() <= 0.35) & (u.abs() <= 1))
    shapes = torch.stack([circle, square, tri, cross])  # (4, n, T, H, W)
    return shapes.gather(0, shape.view(1, -1, 1, 1, 1).expand(1, *u.shape))[0]


def _hsv_to_rgb(h, s, v):
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], -1)  # (n, 3)
    return v[:, None] - v[:, None] * s[:, None] * (torch.minimum(k, 4 - k).clamp(0, 1))


def render(f: dict[str, torch.Tensor], cfg: SynthConfig, device=None) -> torch.Tensor:
    """uint8 clips (n, T, H, W, C) for factors f (from sample_factors), rendered on `device`."""
    f = {k: v.to(device) for k, v in f.items()}
    n, T, S, up = len(f["motion"]), cfg.frames, cfg.size, 2  # 2 x 2 supersampling for soft edges
    t = torch.linspace(-0.5, 0.5, T, device=device)[None, :]  # (1, T)
    level, motion = f["speed"], f["motion"]
    table = {k: torch.tensor(v, device=device)[level][:, None] for k, v in _SPEEDS.items()}  # (n, 1)
    direction = torch.tensor([[1, 0], [-1, 0], [0, 1], [0, -1]] + [[0, 0]] * 4, device=device)[motion].float()
    cx = f["cx"][:, None] + direction[:, :1] * table["shift"] * t  # (n, T) in frame fractions
    cy = f["cy"][:, None] + direction[:, 1:] * table["shift"] * t
    spin = torch.tensor([0, 0, 0, 0, 1, -1, 0, 0], device=device)[motion][:, None]
    angle = f["angle0"][:, None] + spin * table["turn"] * t  # clockwise on screen (y points down)
    grow = torch.tensor([0, 0, 0, 0, 0, 0, 1, -1], device=device)[motion][:, None]
    radius = f["radius"][:, None] * torch.exp(grow * table["zoom"].log() * t)  # (n, T)

    coords = (torch.arange(S * up, device=device) + 0.5) / (S * up)
    x, y = coords.view(1, 1, 1, -1), coords.view(1, 1, -1, 1)
    dx, dy = x - cx[..., None, None], y - cy[..., None, None]  # (n, T, H, W)
    cos, sin = angle.cos()[..., None, None], angle.sin()[..., None, None]
    r = radius[..., None, None]
    u, v = (dx * cos + dy * sin) / r, (-dx * sin + dy * cos) / r
    body = _inside(f["shape"], u, v)
    dot = body & ((u - 0.55) ** 2 + v ** 2 <= 0.25 ** 2)
    d_r = 0.07
    ddx = x - (f["d_x"][:, None] + f["d_vx"][:, None] * t)[..., None, None]
    ddy = y - (f["d_y"][:, None] + f["d_vy"][:, None] * t)[..., None, None]
    distract = (ddx ** 2 + ddy ** 2 <= d_r ** 2) & f["has_distractor"].bool().view(-1, 1, 1, 1)

    def alpha(m):  # (n, T, H*up, W*up) bool -> (n, T, H, W, 1) coverage
        return F.avg_pool2d(m.float().flatten(0, 1)[:, None], up)[:, 0].view(n, T, S, S, 1)

    # background: gradient or low-frequency plaid between two colours, static over time
    gx, gy = coords[::up].view(1, 1, -1), coords[::up].view(1, -1, 1)
    a = f["bg_angle"].view(-1, 1, 1)
    ramp = 0.5 + (gx - 0.5) * a.cos() + (gy - 0.5) * a.sin()
    plaid = 0.5 + 0.5 * torch.sin(2 * math.pi * f["bg_freq"].view(-1, 1, 1) * (gx * a.cos() - gy * a.sin())
                                  + f["bg_phase"].view(-1, 1, 1)) * torch.cos(2 * math.pi * gy)
    mix = torch.where(f["bg_kind"].view(-1, 1, 1) == 0, ramp, plaid).clamp(0, 1)[:, None, :, :, None]
    lo, hi = f["bg_lo"].view(n, 1, 1, 1, 3), f["bg_hi"].view(n, 1, 1, 1, 3)
    frame = (lo + (hi - lo) * mix).expand(n, T, S, S, 3)
    colour = _hsv_to_rgb(f["hue"], torch.full_like(f["hue"], 0.85), torch.full_like(f["hue"], 0.95)).view(n, 1, 1, 1, 3)
    for mask, paint in ((distract, f["d_colour"].view(n, 1, 1, 1, 3)), (body, colour), (dot, 1 - colour)):
        a_ = alpha(mask)
        frame = frame * (1 - a_) + paint * a_
    noisy = (f["noise"] > 0).nonzero().flatten().tolist()
    if noisy:
        frame = frame.clone()
    for i in noisy:  # static noise, the same in every frame, seeded per clip
        g = torch.Generator(device=device or "cpu").manual_seed(int(f["noise_seed"][i]))
        frame[i] += f["noise"][i] * torch.randn(1, S, S, 3, generator=g, device=device)
    return (frame.clamp(0, 1) * 255).round().to(torch.uint8)


def labels(f: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: f[name] for name in FAMILIES}


def synth_batch(n: int, cfg: SynthConfig, generator: torch.Generator, device=None):
    """n clips made on `device`: uint8 (n, C, T, H, W) and their labels; for benchmarks and tests."""
    f = sample_factors(n, cfg, generator)
    return render(f, cfg, device).permute(0, 4, 1, 2, 3), labels(f)


def write_mp4(path: Path, frames: torch.Tensor, fps: int = 8, crf: int = 10, pix_fmt: str = "yuv444p") -> None:
    """Write uint8 frames (T, H, W, C) as an H.264 mp4. At 64 px, 4:2:0 chroma subsampling smears the
    marker dot (max error about 200 levels, mean 2.5); 4:4:4 at crf 10 keeps it (max 35, mean 0.6)."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.mp4")
    with av.open(str(tmp), "w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"crf": str(crf), "preset": "fast"})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        for frame in frames.numpy():
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    tmp.replace(path)


def _write_chunk(job) -> int:
    factors, cfg, paths = job
    for clip, path in zip(render(factors, cfg), paths):
        write_mp4(Path(path), clip)
    return len(paths)


def _check_readable(path: Path, factors: dict, cfg: SynthConfig) -> None:
    """Decode the first clip back with decord and compare it with what was rendered."""
    from .listfile import DataError
    from .video import open_video, read_frames

    first = render({k: v[:1] for k, v in factors.items()}, cfg)[0]  # (T, H, W, C)
    try:
        frames = torch.from_numpy(read_frames(open_video(path), range(cfg.frames)))
        err = (frames.float() - first.float()).abs().mean().item()
    except Exception:  # decord refuses the file
        err = float("inf")
    if not err < 8:
        raise DataError(f"{path}: decord does not read {cfg.size} x {cfg.size} clips back (mean error {err:.1f}; "
                        f"decord 0.6 mis-decodes some widths, e.g. 16, 24, 48, 72): choose another --size")


def split_factors(n: int, cfg: SynthConfig, seed: int, split: str) -> dict[str, torch.Tensor]:
    """The factors of one split: deterministic per (seed, split)."""
    g = torch.Generator().manual_seed(seed * 1000 + {"train": 0, "val": 1, "test": 2}[split])
    return sample_factors(n, cfg, g)


FORMATS = ("mp4", "tensor")


def holds_dataset(folder: str | Path) -> bool:
    """Whether `folder` holds a data set: list files (train.csv) or synthetic clip tensors (train.pt)."""
    return (Path(folder) / "train.csv").exists() or (Path(folder) / "train.pt").exists()


# a data set's files; train.csv and train.pt (what holds_dataset looks for) written last and removed first,
# so that a write cut short by a kill never leaves a folder that counts as holding a data set
SET_FILES = ("train.csv", "train.pt", "val.csv", "val.pt", "metadata.csv", "synth.json")


def _clear(out: Path) -> None:
    """Remove the data set in `out` (its videos/ too when `bwssl synth` wrote it), train files first."""
    ours = (out / "synth.json").exists()
    for name in SET_FILES:
        (out / name).unlink(missing_ok=True)
    if ours and (out / "videos").is_dir():
        shutil.rmtree(out / "videos")


def _write_tensors(out: Path, n_train: int, n_val: int, cfg: SynthConfig, seed: int, device,
                   chunk: int = 256) -> None:
    """{split}.pt: {"clips": uint8 (N, T, H, W, C), "labels": {family: (N,)}}, rendered on `device`; val.pt,
    then train.pt."""
    for split, n in (("val", n_val), ("train", n_train)):
        f = split_factors(n, cfg, seed, split)
        clips = torch.cat([render({k: v[s:s + chunk] for k, v in f.items()}, cfg, device).cpu()
                           for s in range(0, n, chunk)])
        save_tensors(out / f"{split}.pt", {"clips": clips, "labels": labels(f)})


def write_dataset(out: str | Path, n_train: int = 2000, n_val: int = 500, cfg: SynthConfig = SynthConfig(),
                  seed: int = 0, workers: int | None = None, overwrite: bool = False, chunk: int = 32,
                  fmt: str = "mp4", device=None) -> Path:
    """Write the data set into `out`. fmt "mp4": mp4 clips, VideoMAE list files (train.csv, val.csv:
    `path motion`) and metadata.csv (every label family per clip), rendered in parallel on all cores.
    fmt "tensor": the same clips (rendered on `device`, default the CPU) as uint8 tensors with their
    labels in train.pt and val.pt, which need no video codec to write or read."""
    import os

    out = Path(out)
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt!r}: expected one of {', '.join(FORMATS)}")
    if holds_dataset(out) and not overwrite:
        raise RunError(f"{out} already holds a data set: choose another --out or pass --overwrite")
    foreign = [] if (out / "synth.json").exists() else [n for n in (*SET_FILES, "videos") if (out / n).exists()]
    if foreign and not overwrite:
        raise RunError(f"{out} holds {', '.join(foreign)}, not written by bwssl synth: choose another --out or "
                       "pass --overwrite")
    _clear(out)  # a set of the other format must not outlive this one (train.csv would win over train.pt)
    info = {"config": asdict(cfg), "seed": seed, "n_train": n_train, "n_val": n_val, "format": fmt,
            "families": {k: n for k, n in FAMILIES.items()}, "motions": MOTIONS, "shapes": SHAPES,
            "primary": "motion"}
    save_json(out / "synth.json", info)  # first: a write cut short is then known as ours, and cleared by the next
    if fmt == "tensor":
        _write_tensors(out, n_train, n_val, cfg, seed, device)
        return out
    workers = workers or os.cpu_count() or 1
    jobs, rows = [], []
    for split, n in (("train", n_train), ("val", n_val)):
        f = split_factors(n, cfg, seed, split)
        names = [f"videos/{split}/{i:06d}.mp4" for i in range(n)]
        for s in range(0, n, chunk):
            part = {k: v[s:s + chunk] for k, v in f.items()}
            jobs.append((part, cfg, [str(out / p) for p in names[s:s + chunk]]))
        rows += [{"path": p, "split": split, **{k: int(f[k][i]) for k in FAMILIES}} for i, p in enumerate(names)]
    if workers > 1:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=torch.set_num_threads,
                                 initargs=(1,)) as pool:
            list(pool.map(_write_chunk, jobs))
    else:
        list(map(_write_chunk, jobs))
    _check_readable(out / rows[0]["path"], jobs[0][0], cfg)
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    save_text(out / "metadata.csv", table.getvalue())
    for split in ("val", "train"):  # train.csv last: only a finished set holds one
        save_text(out / f"{split}.csv", "".join(f"{r['path']} {r['motion']}\n" for r in rows if r["split"] == split))
    return out


def ensure_dataset(out: str | Path, n_train: int, n_val: int, cfg: SynthConfig = SynthConfig(), seed: int = 0,
                   fmt: str = "mp4", device=None) -> Path:
    """The synthetic set in `out`: written when the folder has none; a folder `bwssl synth` wrote
    with other settings is refused (naming them) rather than silently used; a folder of one's own
    videos (no synth.json) is taken as it is."""
    out = Path(out)
    if not holds_dataset(out):
        return write_dataset(out, n_train, n_val, cfg, seed, fmt=fmt, device=device)
    if (out / "synth.json").exists():
        have = json.loads((out / "synth.json").read_text())
        have.setdefault("format", "mp4")  # written before there was a choice
        want = {"config": asdict(cfg), "seed": seed, "n_train": n_train, "n_val": n_val, "format": fmt}
        diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
        if diff:
            raise ConfigError(f"{out} holds a synthetic set made with other settings ("
                              + "; ".join(f"{k}: {a} there, {b} asked" for k, (a, b) in diff.items())
                              + "): choose another data folder or delete this one")
    return out

