"""Configuration: one dataclass for the model, one for training, named presets.

Every field is a flat literal so that a config round-trips through JSON (config.json in each run
folder), a command line (one flag per field) and a Papermill parameters cell.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# Statistics that input videos are normalised with (ImageNet's, as VideoMAE). Defined here only:
# the data pipeline normalises with them, the model un-normalises with them to build its target.
PIXEL_MEAN = (0.485, 0.456, 0.406)
PIXEL_STD = (0.229, 0.224, 0.225)


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the field and what was expected."""


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
    # objective
    mask_ratio: float = 0.9  # fraction of spatial positions hidden (tube masking)
    norm_target: bool = True  # target pixels normalised per tube and channel; False: plain pixels in [0, 1]

    def __post_init__(self):
        self.partition = tuple(int(s) for s in self.partition)

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
    def tube_dim(self) -> int:
        """Pixels in one tube, all channels: the decoder's output width."""
        return self.tubelet_size * self.patch_size ** 2 * self.in_chans

    @property
    def spans(self) -> list[tuple[int, int]]:
        """[start, end) layer indices of each block."""
        ends = [sum(self.partition[:k + 1]) for k in range(len(self.partition))]
        return [(e - s, e) for s, e in zip(self.partition, ends)]

    def validate(self) -> "ModelConfig":
        def need(ok, name, got, expected):
            if not ok:
                raise ConfigError(f"{name}={got!r}: expected {expected}")
        for name in ("img_size", "num_frames", "in_chans", "tubelet_size", "patch_size", "embed_dim",
                     "depth", "num_heads", "dec_dim", "dec_depth", "dec_heads"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value > 0, name, value,
                 "a positive integer")
        need(self.num_frames % self.tubelet_size == 0, "num_frames", self.num_frames,
             f"a multiple of tubelet_size={self.tubelet_size}")
        need(self.img_size % self.patch_size == 0, "img_size", self.img_size,
             f"a multiple of patch_size={self.patch_size}")
        need(self.embed_dim % self.num_heads == 0, "embed_dim", self.embed_dim,
             f"a multiple of num_heads={self.num_heads}")
        need(self.dec_dim % self.dec_heads == 0, "dec_dim", self.dec_dim,
             f"a multiple of dec_heads={self.dec_heads}")
        need(self.pos_embed in ("3d", "1d"), "pos_embed", self.pos_embed, "'3d' or '1d'")
        if self.pos_embed == "3d":
            for name in ("embed_dim", "dec_dim"):
                need(getattr(self, name) % 2 == 0, name, getattr(self, name), "even for 3-D sin-cos")
        need(0.0 <= self.mask_ratio < 1.0, "mask_ratio", self.mask_ratio, "in [0, 1)")
        hw = self.grid[1] * self.grid[2]
        need(num_keep(hw, self.mask_ratio) < hw, "mask_ratio", self.mask_ratio,
             f"high enough to hide at least one of {hw} spatial positions")
        need(all(s > 0 for s in self.partition), "partition", self.partition, "positive block sizes")
        need(sum(self.partition) == self.depth, "partition", ",".join(map(str, self.partition)),
             f"block sizes that sum to depth={self.depth} (they sum to {sum(self.partition)})")
        return self


def num_keep(n: int, mask_ratio: float) -> int:
    """Positions kept visible out of n: n - int(n * ratio), as VideoMAE's tube masking generator."""
    return n - int(n * mask_ratio)


def uniform_partition(depth: int, blocks: int) -> tuple[int, ...]:
    """Split `depth` layers into `blocks` equal contiguous blocks."""
    if blocks < 1 or depth % blocks:
        raise ConfigError(f"blocks={blocks}: expected a divisor of depth={depth} "
                          f"(or give unequal sizes with --partition)")
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
    min_lr: float = 1e-5  # end of the cosine schedule (also scaled by batch_size / 256)
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
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}={value!r}: expected a positive integer")
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps={self.warmup_steps}: expected >= 0")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"precision={self.precision!r}: expected 'auto', 'bf16' or 'fp32'")
        if not (self.base_lr > 0 and 0 <= self.min_lr and self.clip_grad >= 0 and self.weight_decay >= 0):
            raise ConfigError("base_lr must be > 0 and min_lr, clip_grad, weight_decay >= 0")
        return self


@dataclass
class DataConfig:
    sampling_rate: int = 0  # frames between sampled frames; 0: 1 for a `bwssl synth` folder, else 4 (VideoMAE)
    repeats: int = 1  # clips sampled from each decoded video (VideoMAE's repeated sampling)
    augment: bool = True  # random resized crop (scale 0.5-1) and, with flip, horizontal flip
    flip: bool = True  # off for direction-sensitive labels (SSv2)
    skip_bad: bool = False  # skip (and list) bad videos instead of stopping

    def validate(self) -> "DataConfig":
        if self.sampling_rate < 0 or self.repeats < 1:
            raise ConfigError(f"sampling_rate={self.sampling_rate}, repeats={self.repeats}: "
                              f"expected sampling_rate >= 0 and repeats >= 1")
        return self


_VIT_224 = dict(img_size=224, num_frames=16, tubelet_size=2, patch_size=16)
PRESETS: dict[str, dict] = {
    # VideoMAE's sizes (Tong et al. 2022): width / depth / heads, decoder width / depth / heads
    "vit_s": dict(_VIT_224, embed_dim=384, depth=12, num_heads=6, dec_dim=192, dec_depth=4, dec_heads=3),
    "vit_b": dict(_VIT_224, embed_dim=768, depth=12, num_heads=12, dec_dim=384, dec_depth=4, dec_heads=6),
    "vit_l": dict(_VIT_224, embed_dim=1024, depth=24, num_heads=16, dec_dim=512, dec_depth=4, dec_heads=8),
    "vit_h": dict(_VIT_224, embed_dim=1280, depth=32, num_heads=16, dec_dim=640, dec_depth=4, dec_heads=10),
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


__all__ = ["PIXEL_MEAN", "PIXEL_STD", "ConfigError", "ModelConfig", "TrainConfig", "DataConfig", "PRESETS", "model_config",
           "uniform_partition", "parse_partition", "num_keep", "from_dict", "to_dict"]
