"""Command line: `bwssl pretrain ...` (also `python -m bwssl_core`, and under torchrun)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from .config import PRESETS, ConfigError, ModelConfig, TrainConfig, model_config, parse_partition
from .io import RunError

_MODEL_FLAGS = [f for f in dataclasses.fields(ModelConfig) if f.name != "partition"]
_TRAIN_FLAGS = list(dataclasses.fields(TrainConfig))


def _add_fields(parser: argparse.ArgumentParser, fields, title: str) -> None:
    """One flag per config field, defaulting to None so that only given flags override."""
    group = parser.add_argument_group(title)
    for f in fields:
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                               help=f"(default {f.default})")
        else:
            kind = {"int": int, "float": float, "str": str}.get(str(f.type), type(f.default))
            group.add_argument(flag, dest=f.name, type=kind, default=None, metavar=kind.__name__.upper(),
                               help=f"(default {f.default})")


def _picked(args, fields) -> dict:
    return {f.name: getattr(args, f.name) for f in fields if getattr(args, f.name) is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bwssl", description="Blockwise and end-to-end VideoMAE pretraining.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="pretrain a VideoMAE end-to-end (one block) or blockwise",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="run folder (config.json, metrics.jsonl, checkpoint.pt)")
    p.add_argument("--data", default="synthetic",
                   help="'synthetic' (moving shapes made on the device) or a .pt file of uint8 clips (N, T, H, W, C)")
    p.add_argument("--preset", default="cpu", help=f"model size: {', '.join(PRESETS)}")
    split = p.add_mutually_exclusive_group()
    split.add_argument("--blocks", type=int, help="K equal blocks (1: end-to-end)")
    split.add_argument("--partition", help="layers per block, e.g. 3,3,3,3 (must sum to the depth)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: the local GPU if any)")
    _add_fields(p, _MODEL_FLAGS, "model (override the preset)")
    _add_fields(p, _TRAIN_FLAGS, "training")

    s = sub.add_parser("synth", help="write the labelled synthetic video data set (mp4 + list files)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("--out", required=True, help="data folder: train.csv, val.csv, metadata.csv, videos/")
    s.add_argument("--n-train", type=int, default=2000)
    s.add_argument("--n-val", type=int, default=500)
    s.add_argument("--size", type=int, default=64, help="frame height and width (112 or 224 for GPU scale)")
    s.add_argument("--frames", type=int, default=16)
    s.add_argument("--distractor", type=float, default=0.5, help="probability of a distractor disc")
    s.add_argument("--noise", type=float, default=0.0, help="maximum std of static pixel noise")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--workers", type=int, help="processes (default: all cores)")
    s.add_argument("--overwrite", action="store_true")

    sub.add_parser("presets", help="list the model presets")
    return parser


def cmd_synth(args) -> None:
    from .synth import SynthConfig, write_dataset

    for name in ("n_train", "n_val", "size", "frames"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')}={getattr(args, name)}: expected a positive integer")
    if args.size % 2:
        raise ConfigError(f"--size={args.size}: expected an even size (H.264 yuv420p)")
    cfg = SynthConfig(size=args.size, frames=args.frames, distractor=args.distractor, noise=args.noise)
    out = write_dataset(args.out, args.n_train, args.n_val, cfg, args.seed, args.workers, args.overwrite)
    print(json.dumps({"out": str(out), "n_train": args.n_train, "n_val": args.n_val}))


def cmd_pretrain(args) -> None:
    from .batches import ClipTensorFile, MovingShapes
    from .train import default_device, pretrain

    overrides = _picked(args, _MODEL_FLAGS)
    if args.partition:
        overrides["partition"] = parse_partition(args.partition)
    mcfg = model_config(args.preset, blocks=args.blocks, **overrides)
    tcfg = TrainConfig(**_picked(args, _TRAIN_FLAGS)).validate()
    device = args.device or default_device()
    if args.data == "synthetic":
        source = MovingShapes(mcfg, tcfg.batch_size, tcfg.seed, device)
    else:
        source = ClipTensorFile(args.data, tcfg.batch_size, tcfg.seed)
        expected = (mcfg.in_chans, mcfg.num_frames, mcfg.img_size, mcfg.img_size)
        if source.clip_shape() != expected:
            raise ConfigError(f"{args.data}: clips of (C, T, H, W) = {source.clip_shape()}, expected {expected} "
                              f"for preset {args.preset!r} (set --num-frames / --img-size)")
    last = pretrain(mcfg, tcfg, source, args.out, resume=args.resume, overwrite=args.overwrite, device=device, extra={"data": args.data, "preset": args.preset})
    print(json.dumps({"out": args.out, **last}))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "pretrain":
            cmd_pretrain(args)
        elif args.command == "synth":
            cmd_synth(args)
        elif args.command == "presets":
            for name, values in PRESETS.items():
                print(name, json.dumps(values))
    except (ConfigError, RunError, FloatingPointError) as err:
        print(f"bwssl {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0
