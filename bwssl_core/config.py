"""Configuration: one dataclass for the model, one for training, named presets.

Every field is a flat literal so that a config round-trips through JSON (config.json in each run
folder), a command line (one flag per field) and a Papermill parameters cell.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

# Statistics that input videos are normalised with (ImageNet's, as VideoMAE). Defined here only:
# the data pipeline normalises with them, the model un-normalises with them to build its target.
PIXEL_MEAN = (0.485, 0.456, 0.406)
PIXEL_STD = (0.229, 0.224, 0.225)
MAX_SIZE = 2 ** 20  # upper bound on every ModelConfig size (pixels, frames, widths, depths, heads)


def pixel_stats(in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The per-channel mean and std that clips of `in_chans` channels are normalised with (and the target
    un-normalised with): ImageNet's for RGB, 0 and 1 for any other channel count."""
    return (PIXEL_MEAN, PIXEL_STD) if in_chans == 3 else ((0.0,) * in_chans, (1.0,) * in_chans)


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the field and what was expected."""


def _need(ok: bool, name: str, got, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={got!r}: expected {expected}")


def _is_int(value) -> bool:
    """A Python int (not a bool): what config.json and a command line hold."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    """A finite Python number (not a bool, not NaN or inf)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _need_flags(cfg, names) -> None:
    for name in names:
        _need(isinstance(getattr(cfg, name), bool), name, getattr(cfg, name), "True or False")


@dataclass
class ModelConfig:
    # input clip: (C, T, H, W) = (in_chans, num_frames, img_size, img_size)
    img_size: int = 224
    num_frames: int = 16
    in_chans: int = 3
    tubelet_size: int = 2  # frames per tube
    patch_size: int = 16  # pixels per tube side
    # encoder
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    pos_embed: str = "3d"  # "3d": separable sin-cos over (t, h, w); "1d": VideoMAE's table over the token index
    # blockwise partition: sizes of contiguous groups of encoder layers; (depth,) is end-to-end
    partition: tuple = (12,)
    # per-block decoders
    dec_dim: int = 384
    dec_depth: int = 4
    dec_heads: int = 6
    dec_shared: bool = False  # one decoder shared by every block
    dec_norm: bool = True  # LayerNorm on each block's output before its decoder (VideoMAE's encoder norm)
    dec_keep: float = 1.0  # fraction of the hidden tubes each decoder reconstructs, drawn per step (VideoMAE V2)
    # objective
    mask_ratio: float = 0.9  # fraction of spatial positions hidden (tube masking)
    norm_target: bool = True  # target pixels normalised per tube and channel; False: plain pixels in [0, 1]

    def __post_init__(self):
        parts = self.partition  # a list from config.json; anything but integers: validate() says what is wrong
        if isinstance(parts, (tuple, list)) and all(isinstance(s, numbers.Integral) and not isinstance(s, bool)
                                                    for s in parts):
            self.partition = tuple(int(s) for s in parts)

    @property
    def grid(self) -> tuple[int, int, int]:
        """Token grid (T', H', W')."""
        return (self.num_frames // self.tubelet_size, self.img_size // self.patch_size,
                self.img_size // self.patch_size)

    @property
    def num_tokens(self) -> int:
        t, h, w = self.grid
        return t * h * w

    @property
    def num_visible(self) -> int:
        """Visible tokens per clip: the same spatial positions kept in every temporal slice."""
        t, h, w = self.grid
        return t * num_keep(h * w, self.mask_ratio)

    @property
    def num_decoded(self) -> int:
        """Hidden tokens per clip that each decoder reconstructs (all of them unless dec_keep < 1)."""
        hidden = self.num_tokens - self.num_visible
        return hidden if self.dec_keep >= 1 else num_decode(hidden, self.dec_keep)

    @property
    def tube_dim(self) -> int:
        """Pixels in one tube, all channels: the decoder's output width."""
        return self.tubelet_size * self.patch_size ** 2 * self.in_chans

    @property
    def spans(self) -> list[tuple[int, int]]:
        """[start, end) layer indices of each block."""
        ends = [sum(self.partition[:k + 1]) for k in range(len(self.partition))]
        return [(e - s, e) for s, e in zip(self.partition, ends)]

    def validate(self) -> "ModelConfig":
        for name in ("img_size", "num_frames", "in_chans", "tubelet_size", "patch_size", "embed_dim",
                     "depth", "num_heads", "dec_dim", "dec_depth", "dec_heads"):
            value = getattr(self, name)
            _need(_is_int(value) and 0 < value <= MAX_SIZE, name, value, f"a positive integer (at most {MAX_SIZE})")
        _need_flags(self, ("dec_shared", "dec_norm", "norm_target"))
        width = min(self.embed_dim, self.dec_dim)
        _need(_is_real(self.mlp_ratio) and 1 <= int(width * self.mlp_ratio) and self.mlp_ratio <= 64, "mlp_ratio",
              self.mlp_ratio, f"a number in [1/{width}, 64] (MLP width = int(width x mlp_ratio) >= 1)")
        _need(_is_real(self.norm_eps) and 0 < self.norm_eps < 1, "norm_eps", self.norm_eps, "a number in (0, 1)")
        _need(_is_real(self.mask_ratio) and 0 <= self.mask_ratio < 1, "mask_ratio", self.mask_ratio, "in [0, 1)")
        _need(_is_real(self.dec_keep) and 0 < self.dec_keep <= 1, "dec_keep", self.dec_keep, "in (0, 1]")
        _need(isinstance(self.partition, tuple) and len(self.partition) > 0 and all(map(_is_int, self.partition)),
              "partition", self.partition, "a list of integer layer counts like (3, 3, 3, 3)")
        _need(self.num_frames % self.tubelet_size == 0, "num_frames", self.num_frames,
              f"a multiple of tubelet_size={self.tubelet_size}")
        _need(self.img_size % self.patch_size == 0, "img_size", self.img_size,
              f"a multiple of patch_size={self.patch_size}")
        _need(self.embed_dim % self.num_heads == 0, "embed_dim", self.embed_dim,
              f"a multiple of num_heads={self.num_heads}")
        _need(self.dec_dim % self.dec_heads == 0, "dec_dim", self.dec_dim,
              f"a multiple of dec_heads={self.dec_heads}")
        _need(self.pos_embed in ("3d", "1d"), "pos_embed", self.pos_embed, "'3d' or '1d'")
        if self.pos_embed == "3d":
            for name in ("embed_dim", "dec_dim"):
                _need(getattr(self, name) % 2 == 0 and getattr(self, name) >= 6, name, getattr(self, name),
                      "even and at least 6 for 3-D sin-cos (2 channels or more for each of t, h, w)")
        _need(not self.norm_target or self.tubelet_size * self.patch_size ** 2 >= 2, "norm_target", self.norm_target,
              f"tubes of 2 pixels or more to normalise over (tubelet_size={self.tubelet_size} x "
              f"patch_size={self.patch_size}^2 is 1): set norm_target=False or a larger patch")
        hw = self.grid[1] * self.grid[2]
        _need(num_keep(hw, self.mask_ratio) < hw, "mask_ratio", self.mask_ratio,
              f"high enough to hide at least one of {hw} spatial positions "
              f"(img_size={self.img_size} / patch_size={self.patch_size}, squared)")
        _need(all(s > 0 for s in self.partition), "partition", self.partition, "positive block sizes")
        _need(sum(self.partition) == self.depth, "partition", ",".join(map(str, self.partition)),
              f"block sizes that sum to depth={self.depth} (they sum to {sum(self.partition)})")
        return self


def num_keep(n: int, mask_ratio: float) -> int:
    """Positions kept visible out of n: n - int(n * ratio), as VideoMAE's tube masking generator."""
    return n - int(n * mask_ratio)


def num_decode(hidden: int, dec_keep: float) -> int:
    """Hidden tokens each decoder reconstructs out of `hidden`: round(hidden * dec_keep), at least 1."""
    return max(1, round(hidden * dec_keep))


def uniform_partition(depth: int, blocks: int,
                      hint: str = "or give unequal sizes with --partition") -> tuple[int, ...]:
    """Split `depth` layers into `blocks` equal contiguous blocks; `hint` says what else to do."""
    if blocks < 1 or depth % blocks:
        raise ConfigError(f"blocks={blocks}: expected a divisor of depth={depth} ({hint})")
    return (depth // blocks,) * blocks


def parse_partition(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(","))
    except ValueError:
        raise ConfigError(f"partition={text!r}: expected comma-separated layer counts like 3,3,3,3") from None


@dataclass
class TrainConfig:
    steps: int = 1000  # optimiser steps
    batch_size: int = 8  # clips per step, all processes together
    base_lr: float = 1.5e-4  # lr = base_lr * batch_size / 256
    min_lr: float = 1e-5  # end of the cosine schedule: min_lr * batch_size / 256 (never above the peak)
    warmup_steps: int = 100
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    clip_grad: float = 1.0  # max grad norm per block (0: off)
    per_block_backward: bool = True  # backward each block's loss as soon as its forward is done
    precision: str = "auto"  # "auto": bf16 autocast on GPU, fp32 on CPU; or "bf16" / "fp32"
    compile: bool = False  # torch.compile each block and decoder
    seed: int = 0
    log_every: int = 10  # steps between metrics.jsonl lines
    ckpt_every: int = 500  # steps between checkpoints (one more at the end)

    def validate(self) -> "TrainConfig":
        for name in ("steps", "batch_size", "log_every", "ckpt_every"):
            value = getattr(self, name)
            _need(_is_int(value) and value >= 1, name, value, "a positive integer")
        _need(_is_int(self.warmup_steps) and self.warmup_steps >= 0, "warmup_steps", self.warmup_steps,
              "an integer >= 0")
        _need(self.precision in ("auto", "bf16", "fp32"), "precision", self.precision, "'auto', 'bf16' or 'fp32'")
        _need(_is_real(self.base_lr) and self.base_lr > 0, "base_lr", self.base_lr, "a finite number > 0")
        for name in ("min_lr", "clip_grad", "weight_decay"):
            value = getattr(self, name)
            _need(_is_real(value) and value >= 0, name, value, "a finite number >= 0")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            _need(_is_real(value) and 0 <= value < 1, name, value, "in [0, 1)")
        _need_flags(self, ("per_block_backward", "compile"))
        _need(_is_int(self.seed) and 0 <= self.seed < 2 ** 31, "seed", self.seed, "an integer in [0, 2**31)")
        return self


@dataclass
class DataConfig:
    sampling_rate: int = 0  # frames between sampled frames; 0: 1 for a `bwssl synth` folder, else 4 (VideoMAE)
    repeats: int = 1  # clips sampled from each decoded video (VideoMAE's repeated sampling)
    augment: bool = True  # random resized crop (scale 0.5-1) and, with flip, horizontal flip
    flip: bool = True  # off for direction-sensitive labels (SSv2)
    skip_bad: bool = False  # skip (and list) bad videos instead of stopping

    def validate(self) -> "DataConfig":
        _need(_is_int(self.sampling_rate) and self.sampling_rate >= 0, "sampling_rate", self.sampling_rate,
              "an integer >= 0 (0: automatic)")
        _need(_is_int(self.repeats) and self.repeats >= 1, "repeats", self.repeats, "a positive integer")
        _need_flags(self, ("augment", "flip", "skip_bad"))
        return self


_VIT_224 = dict(img_size=224, num_frames=16, tubelet_size=2, patch_size=16)
PRESETS: dict[str, dict] = {
    # VideoMAE's sizes (Tong et al. 2022): width / depth / heads, decoder width / depth / heads
    "vit_s": dict(_VIT_224, embed_dim=384, depth=12, num_heads=6, dec_dim=192, dec_depth=4, dec_heads=3),
    "vit_b": dict(_VIT_224, embed_dim=768, depth=12, num_heads=12, dec_dim=384, dec_depth=4, dec_heads=6),
    "vit_l": dict(_VIT_224, embed_dim=1024, depth=24, num_heads=16, dec_dim=512, dec_depth=4, dec_heads=8),
    "vit_h": dict(_VIT_224, embed_dim=1280, depth=32, num_heads=16, dec_dim=640, dec_depth=4, dec_heads=8),
    # the study on one GPU: ViT-S width and depth on 16 x 112 x 112 clips, 8 x 7 x 7 = 392 tokens; one
    # decoder layer per block, as the CPU study has (with 4, motion fell below random init: NOTES.md)
    "gpu": dict(img_size=112, num_frames=16, tubelet_size=2, patch_size=16, embed_dim=384, depth=12,
                num_heads=6, dec_dim=192, dec_depth=1, dec_heads=3),
    # a 2-core CPU study: 16 x 64 x 64 clips, 8 x 8 x 8 = 512 tokens
    "cpu": dict(img_size=64, num_frames=16, tubelet_size=2, patch_size=8, embed_dim=128, depth=4,
                num_heads=4, dec_dim=64, dec_depth=1, dec_heads=2),
    # tests: 4 x 32 x 32 clips, 2 x 4 x 4 = 32 tokens
    "tiny": dict(img_size=32, num_frames=4, tubelet_size=2, patch_size=8, embed_dim=32, depth=4,
                 num_heads=2, dec_dim=16, dec_depth=1, dec_heads=2, mask_ratio=0.75),
}


def model_config(preset: str = "vit_b", blocks: int | None = None, **overrides) -> ModelConfig:
    """The preset's config with overrides; `blocks` splits the depth uniformly."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}: expected one of {', '.join(PRESETS)}")
    values = {**PRESETS[preset], **overrides}
    unknown = set(values) - {f.name for f in dataclasses.fields(ModelConfig)}
    if unknown:
        raise ConfigError(f"unknown model option(s) {sorted(unknown)}")
    depth = values["depth"]
    if blocks is not None:
        if "partition" in overrides:
            raise ConfigError("give either blocks or partition, not both")
        values["partition"] = uniform_partition(depth, blocks)
    values.setdefault("partition", (depth,))
    return ModelConfig(**values).validate()


def from_dict(cls, values: dict):
    """Build a config dataclass from a dict (as saved in config.json), naming unknown keys."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} field(s): {sorted(unknown)}")
    return cls(**values)


def to_dict(cfg) -> dict:
    d = dataclasses.asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


__all__ = ["PIXEL_MEAN", "PIXEL_STD", "pixel_stats", "ConfigError", "ModelConfig", "TrainConfig", "DataConfig",
           "PRESETS", "model_config", "uniform_partition", "parse_partition", "num_keep", "num_decode", "from_dict",
           "to_dict"]
