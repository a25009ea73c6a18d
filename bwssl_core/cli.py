"""Command line: `bwssl pretrain ...` (also `python -m bwssl_core`, and under torchrun)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from functools import partial
from pathlib import Path

from .config import PRESETS, ConfigError, DataConfig, ModelConfig, TrainConfig, model_config, parse_partition
from .io import RunError
from .listfile import DataError

_MODEL_FLAGS = [f for f in dataclasses.fields(ModelConfig) if f.name != "partition"]
_TRAIN_FLAGS = list(dataclasses.fields(TrainConfig))
_DATA_FLAGS = list(dataclasses.fields(DataConfig))
_IMPORT_OVERRIDES = ("img_size", "num_frames", "num_heads", "dec_heads")  # `bwssl import`'s config flags
_FIELD_HELP = {"sampling_rate": "frames between sampled frames (default: 1 for a `bwssl synth` folder or clip "
                                "tensors, else 4, VideoMAE's); config.json records the rate used"}


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in --help, except None (a flag that only overrides when given says what it overrides)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def _add_fields(parser: argparse.ArgumentParser, fields, title: str, preset: bool = False) -> None:
    """One flag per config field, defaulting to None so that only given flags override; the help gives
    the field's default, or for a model field the preset's value (`bwssl presets`)."""
    group = parser.add_argument_group(title)
    for f in fields:
        flag = "--" + f.name.replace("_", "-")
        help = "(the preset's value)" if preset else _FIELD_HELP.get(f.name, f"(default {f.default})")
        if f.type in ("bool", bool):
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help)
        else:
            kind = {"int": int, "float": float, "str": str}.get(str(f.type), type(f.default))
            group.add_argument(flag, dest=f.name, type=kind, default=None, metavar=kind.__name__.upper(), help=help)


def _picked(args, fields) -> dict:
    return {f.name: getattr(args, f.name) for f in fields if getattr(args, f.name) is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bwssl", description="Blockwise and end-to-end VideoMAE pretraining.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="pretrain a VideoMAE end-to-end (one block) or blockwise",
                       formatter_class=_Help)
    p.add_argument("--out", required=True, help="run folder (config.json, metrics.jsonl, checkpoint.pt)")
    p.add_argument("--data", default="synthetic",
                   help="a data folder with train.csv (e.g. from `bwssl synth`), a list file, a clip cache "
                        "(`bwssl cache`), a .pt file of uint8 clips (N, T, H, W, C), or 'synthetic' "
                        "(moving shapes made on the device)")
    p.add_argument("--workers", type=int, default=2,
                   help="DataLoader processes for video folders; threads copying clips for a clip cache")
    p.add_argument("--preset", default="cpu", help=f"model size: {', '.join(PRESETS)}")
    split = p.add_mutually_exclusive_group()
    split.add_argument("--blocks", type=int, help="K equal blocks (1: end-to-end)")
    split.add_argument("--partition", help="layers per block, e.g. 3,3,3,3 (must sum to the depth)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: the local GPU if any)")
    _add_fields(p, _MODEL_FLAGS, "model (override the preset; `bwssl presets` lists each preset's values)", preset=True)
    _add_fields(p, _TRAIN_FLAGS, "training")
    _add_fields(p, _DATA_FLAGS, "data")

    s = sub.add_parser("synth", help="write the labelled synthetic video data set (mp4 + list files)",
                       formatter_class=_Help)
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
    s.add_argument("--format", default="mp4", choices=["mp4", "tensor"],
                   help="mp4 clips and list files, or uint8 clip tensors with labels (train.pt, val.pt: no codec needed)")

    c = sub.add_parser("cache", help="decode a data set once into a memory-mapped clip cache",
                       formatter_class=_Help)
    c.add_argument("--list", required=True, help="list file (path label per line), e.g. data/synth/train.csv")
    c.add_argument("--out", required=True, help="cache folder (frames.u8, index.json)")
    c.add_argument("--root", help="folder the list's paths are relative to (default: the list file's)")
    c.add_argument("--decode-size", type=int, help="decode frames resized to this square size")
    c.add_argument("--workers", type=int, default=1, help="processes decoding videos while the cache is built")
    c.add_argument("--skip-bad", action="store_true", help="skip and list bad videos instead of stopping")
    c.add_argument("--overwrite", action="store_true")

    q = sub.add_parser("probe", help="per-layer linear probes and retrieval of a run, with controls",
                       formatter_class=_Help)
    q.add_argument("--run", required=True, help="run folder with checkpoint.pt (trained, or `bwssl import`)")
    q.add_argument("--data", required=True, help="data folder with train.csv and val.csv (metadata.csv: all families)")
    q.add_argument("--families", help="comma-separated label families (default: all the data has)")
    q.add_argument("--sampling-rate", type=int, help="default: 1 for a `bwssl synth` folder, else 4")
    q.add_argument("--attentive-layers", help="comma-separated layers for the token-level attentive probe: "
                   "-1 (the last), or with = before a list that starts with a minus: --attentive-layers=-1,-2")
    q.add_argument("--cache", help="feature cache folder (default: RUN/features); 'none' to keep nothing")
    q.add_argument("--device", help="default: the local GPU if any")
    q.add_argument("--overwrite", action="store_true", help="replace the run's probe.json")

    a = sub.add_parser("analyze", help="CKA, representational change and attention metrics of a run",
                       formatter_class=_Help)
    a.add_argument("--run", required=True, help="run folder with checkpoint.pt (trained, or `bwssl import`)")
    a.add_argument("--vs", help="a second run: adds the CKA matrix between the two runs' layers")
    a.add_argument("--data", required=True, help="data folder; its validation clips are analysed")
    a.add_argument("--split", default="val")
    a.add_argument("--batch-size", type=int, default=50, help="clips per minibatch-CKA batch")
    a.add_argument("--sampling-rate", type=int, help="default: 1 for a `bwssl synth` folder, else 4")
    a.add_argument("--device", help="default: the local GPU if any")
    a.add_argument("--overwrite", action="store_true", help="replace the run's analyze.json")

    im = sub.add_parser("import", help="official VideoMAE or HF transformers weights as a run folder (for probe, "
                        "analyze and load_run)", formatter_class=_Help)
    im.add_argument("--weights", required=True, help="an official pretraining or fine-tuned checkpoint (.pth) or an HF "
                    "transformers folder (save_pretrained: config.json and the weights)")
    im.add_argument("--out", required=True, help="run folder to write (config.json, checkpoint.pt)")
    for name in _IMPORT_OVERRIDES:
        im.add_argument("--" + name.replace("_", "-"), type=int, help="override the weights' config "
                        "(official checkpoints do not carry clip size, frames or heads: ViT-S to ViT-H take "
                        "VideoMAE's)")
    im.add_argument("--overwrite", action="store_true", help="replace a run already in --out")

    st = sub.add_parser("study", help="run the study notebooks with Papermill, then write report.html",
                        formatter_class=_Help)
    st.add_argument("--out", help="study folder (default: runs/study-<timestamp>)")
    st.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                    help="a notebook parameter (a Python literal, else a string), e.g. -p steps 400")
    st.add_argument("--scale", choices=("auto", "cpu", "gpu", "smoke"), default="auto",
                    help="parameter set: cpu (2-core CPU, the notebooks' defaults), gpu (ViT-S width, 112 px, 5,000 + "
                         "1,000 clips), smoke (tiny, for tests); auto: gpu when CUDA is present, else cpu")
    st.add_argument("--smoke", action="store_true", help="the same as --scale smoke")
    st.add_argument("--resume", action="store_true", help="continue the study in --out with the parameters it was "
                    "started with (and any -p); finished notebooks are kept, and so are their parameters")
    st.add_argument("--notebooks", help="comma-separated subset, e.g. 01_pretrain,02_probe (default: all, in order)")

    r = sub.add_parser("report", help="write a study's report.html again from its results (after an upgrade, or "
                       "for a study copied from elsewhere) and print the paper's claims as read off them")
    r.add_argument("--study", required=True, help="study folder (bwssl study --out)")

    sub.add_parser("presets", help="list the model presets, each with every model field's value")
    return parser


def cmd_synth(args) -> None:
    from .synth import SynthConfig, write_dataset

    for name in ("n_train", "n_val", "size", "frames"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')}={getattr(args, name)}: expected a positive integer")
    if args.size % 2:
        raise ConfigError(f"--size={args.size}: expected an even size")
    if not 0 <= args.distractor <= 1:
        raise ConfigError(f"--distractor={args.distractor}: expected a probability in [0, 1]")
    if args.noise < 0:
        raise ConfigError(f"--noise={args.noise}: expected a standard deviation >= 0")
    cfg = SynthConfig(size=args.size, frames=args.frames, distractor=args.distractor, noise=args.noise)
    from .train import default_device

    out = write_dataset(args.out, args.n_train, args.n_val, cfg, args.seed, args.workers, args.overwrite,
                        fmt=args.format, device=default_device())
    print(json.dumps({"out": str(out), "n_train": args.n_train, "n_val": args.n_val}))


def sampling_rate(data: str, dcfg: DataConfig, out: Path | None = None) -> int:
    """The sampling rate that training on --data uses: --sampling-rate, else auto_rate. A run resumed in `out`
    whose config.json says 0 (recorded before the rate was resolved) keeps 0 where it resolves to the rate used
    now, so that its config still matches."""
    from .evaluate import auto_rate

    auto = auto_rate(Path(data))
    rate = dcfg.sampling_rate or auto
    saved = out / "config.json" if out is not None else None
    if rate == auto and saved is not None and saved.is_file() and \
            json.loads(saved.read_text()).get("data", {}).get("sampling_rate") == 0:
        return 0
    return rate


def make_source(args, mcfg: ModelConfig, tcfg: TrainConfig, dcfg: DataConfig, device: str, world: int = 1):
    """The batch source that --data names (see batches.py); world: the data-parallel processes that share
    each batch (torchrun's WORLD_SIZE; 1 for the pipeline, whose every rank reads the whole batch)."""
    from .batches import ClipTensorFile, DatasetBatches, MovingShapes
    from .cache import CachedClips
    from .cache import gpu_augment
    from .evaluate import auto_rate, tensor_rate_check
    from .prefetch import CacheBatches

    size, expected = mcfg.img_size, (mcfg.in_chans, mcfg.num_frames, mcfg.img_size, mcfg.img_size)
    if tcfg.batch_size % world:  # the Trainer refuses it too, but only after --overwrite deleted the old run
        raise ConfigError(f"batch_size={tcfg.batch_size}: expected a multiple of the {world} processes")
    if args.data == "synthetic":
        if dcfg != DataConfig():
            raise ConfigError("--data synthetic generates its clips: the data options (--sampling-rate, --repeats, "
                              "--no-augment, --no-flip, --skip-bad) do not apply to it")
        return MovingShapes(mcfg, tcfg.batch_size, tcfg.seed, device)
    path = Path(args.data)
    if path.is_dir() and (path / "train.pt").exists() and not (path / "train.csv").exists():
        path = path / "train.pt"  # a folder of clip tensors (bwssl synth --format tensor)
    augment = partial(gpu_augment, size=size, flip=dcfg.flip) if dcfg.augment else None
    if path.suffix == ".pt":
        tensor_rate_check(path, dcfg.sampling_rate)
        for flag, value in (("repeats", dcfg.repeats != 1), ("skip-bad", dcfg.skip_bad)):
            if value:
                raise ConfigError(f"--{flag}: {path} holds clip tensors, one per clip, none bad; it applies to "
                                  "videos")
        source = ClipTensorFile(path, tcfg.batch_size, tcfg.seed, device=device, augment=augment)
        if source.clip_shape() != expected:
            raise ConfigError(f"{path}: clips of (C, T, H, W) = {source.clip_shape()}, expected {expected} "
                              f"for preset {args.preset!r} (set --num-frames / --img-size)")
        return source
    rate = dcfg.sampling_rate or auto_rate(path)
    if tcfg.batch_size % dcfg.repeats:
        raise ConfigError(f"batch_size={tcfg.batch_size}: expected a multiple of repeats={dcfg.repeats}")
    videos = tcfg.batch_size // dcfg.repeats
    if videos % world:  # each process reads whole videos
        raise ConfigError(f"batch_size={tcfg.batch_size} with repeats={dcfg.repeats}: {videos} videos a step, "
                          f"expected a multiple of the {world} processes")
    common = dict(num_frames=mcfg.num_frames, sampling_rate=rate, mode="train", repeats=dcfg.repeats,
                  skip_bad=dcfg.skip_bad, seed=tcfg.seed)
    bad_list = Path(args.out) / "bad_videos.txt"
    if (path / "index.json").exists():  # a clip cache: crops and flips run on the training device
        dataset = CachedClips(path, bad_list_out=bad_list, **common)
        stored = (dataset.shape[1], dataset.shape[2])
        if not dcfg.augment and stored != (size, size):
            raise ConfigError(f"{path}: cached frames are {stored[0]}x{stored[1]}, expected {size}x{size} "
                              f"without augmentation (or rebuild the cache with --decode-size {size})")
    else:
        from .video import VideoClips, eval_transform, train_transform

        list_file = path / "train.csv" if path.is_dir() else path
        if not list_file.is_file():
            raise ConfigError(f"--data {args.data}: expected 'synthetic', a .pt clip file, a clip cache "
                              f"(index.json) or a data folder with train.csv")
        transform = train_transform(size, flip=dcfg.flip) if dcfg.augment else eval_transform(size)
        dataset = VideoClips(list_file, transform=transform, bad_list_out=bad_list,
                             **common)
    if isinstance(dataset, CachedClips):  # threads copy clips into pinned memory (prefetch.py)
        return CacheBatches(dataset, tcfg.batch_size // dcfg.repeats, tcfg.seed, args.workers, device, augment)
    return DatasetBatches(dataset, tcfg.batch_size // dcfg.repeats, tcfg.seed, args.workers, device)  # transform: crops


def source_for_run(args, mcfg: ModelConfig, tcfg: TrainConfig, dcfg: DataConfig, device: str, world: int = 1,
                   claims: bool = True, resumable: bool = True):
    """make_source for a run written to --out. Where this process claims the folder: one that holds a run is
    refused before any work, and with --overwrite the old run is deleted only once the data has been checked (a
    mistake there deletes nothing)."""
    from .train import claim_folder

    if claims and not args.overwrite:
        claim_folder(Path(args.out), resumable=resumable)
    source = make_source(args, mcfg, tcfg, dcfg, device, world)
    if claims and args.overwrite:  # keep the list of bad videos the data has just written there
        claim_folder(Path(args.out), True, also=() if dcfg.skip_bad else ("bad_videos.txt",))
    return source


def cmd_pretrain(args) -> None:
    from .train import pretrain, resolve_device

    overrides = _picked(args, _MODEL_FLAGS)
    if args.partition:
        overrides["partition"] = parse_partition(args.partition)
    mcfg = model_config(args.preset, blocks=args.blocks, **overrides)
    tcfg = TrainConfig(**_picked(args, _TRAIN_FLAGS)).validate()
    dcfg = DataConfig(**_picked(args, _DATA_FLAGS)).validate()
    if args.data != "synthetic":  # config.json records the rate used, not 0
        resumed = Path(args.out) if args.resume else None
        dcfg = dataclasses.replace(dcfg, sampling_rate=sampling_rate(args.data, dcfg, resumed))
    device = str(resolve_device(args.device))
    if args.workers < 0:  # checked before the folder is claimed: DataLoader would refuse it after config.json
        raise ConfigError(f"--workers={args.workers}: expected an integer >= 0")
    # under torchrun rank 0 alone claims the folder: a later rank would find (or delete) rank 0's new config.json
    claims = not args.resume and os.environ.get("RANK", "0") == "0"
    source = source_for_run(args, mcfg, tcfg, dcfg, device, int(os.environ.get("WORLD_SIZE", "1")), claims)
    data = {"path": args.data, **({} if args.data == "synthetic" else dataclasses.asdict(dcfg))}  # what applied
    last = pretrain(mcfg, tcfg, source, args.out, resume=args.resume, overwrite=args.overwrite, device=device,
                    extra={"data": data, "preset": args.preset})
    print(json.dumps({"out": args.out, **last}))


def cmd_cache(args) -> None:
    from .cache import build_cache

    out = build_cache(args.list, args.out, root=args.root, decode_size=args.decode_size, workers=args.workers,
                      skip_bad=args.skip_bad, overwrite=args.overwrite)
    print(json.dumps({"out": str(out)}))


def _open_run(args, result: str):
    """(result path, device, (model, config)) for an analysis of --run; refuses to overwrite."""
    from .train import load_run, resolve_device

    out = Path(args.run) / result
    if out.exists() and not args.overwrite:
        raise RunError(f"{out} exists: pass --overwrite to replace it")
    device = str(resolve_device(args.device))
    return out, device, load_run(args.run, device)


def cmd_import(args) -> None:
    from .interop import import_run

    overrides = {k: getattr(args, k) for k in _IMPORT_OVERRIDES if getattr(args, k) is not None}
    config = import_run(args.weights, args.out, args.overwrite, **overrides)
    print(json.dumps({"out": str(args.out), **config["imported"]}))


def cmd_probe(args) -> None:
    from .evaluate import best_layer_table, depthwise, load_split
    from .io import save_json

    out, device, (model, config) = _open_run(args, "probe.json")
    try:
        layers = [int(i) for i in args.attentive_layers.split(",")] if args.attentive_layers else []
    except ValueError:
        raise ConfigError(f"--attentive-layers={args.attentive_layers}: expected comma-separated layer "
                          "indices like -1 or 0,2") from None
    depth = model.cfg.depth
    if any(not -depth <= i < depth for i in layers):  # checked before any data is read
        raise ConfigError(f"--attentive-layers={args.attentive_layers}: {args.run} has {depth} encoder layers: "
                          f"expected indices from {-depth} to {depth - 1}")
    train = load_split(args.data, "train", model.cfg, args.sampling_rate)
    val = load_split(args.data, "val", model.cfg, args.sampling_rate)
    families = args.families.split(",") if args.families else None
    cache = None if args.cache == "none" else args.cache or Path(args.run) / "features"
    meta = {"config": config, "checkpoint": str(Path(args.run) / "checkpoint.pt"), "data": str(args.data)}
    results = depthwise(model, train, val, families, seed=config["train"]["seed"], device=device, cache=cache,
                        meta=meta, attentive_layers=layers)
    save_json(out, {"run": str(args.run), "data": str(args.data), "results": results})
    for row in best_layer_table(results):
        print(json.dumps(row))


def cmd_analyze(args) -> None:
    from .analyze import analyze
    from .evaluate import clip_shape, load_split
    from .io import save_json
    from .train import load_run

    out, device, (model, _) = _open_run(args, "analyze.json")
    other = load_run(args.vs, device)[0] if args.vs else None
    clips, _ = load_split(args.data, args.split, model.cfg, args.sampling_rate)
    other_clips = None  # the same videos, read at --vs's own clip size where it differs
    if other is not None and clip_shape(other.cfg) != clip_shape(model.cfg):
        other_clips, _ = load_split(args.data, args.split, other.cfg, args.sampling_rate)
    result = analyze(model, clips, other, batch_size=args.batch_size, device=device, other_clips=other_clips)
    save_json(out, {"run": str(args.run), "vs": args.vs, "data": str(args.data), **result})
    print(json.dumps({"out": str(out), "layers": result["layers"], "clips": result["clips"]}))


def cmd_study(args) -> None:
    import ast
    import time

    import torch

    from .study import NOTEBOOK_ORDER, run_study, scale_params

    out = Path(args.out or f"runs/study-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.resume and (out / "study.json").exists():
        params = json.loads((out / "study.json").read_text())["params"]  # what it was started with, -p's included
        if args.smoke or args.scale != "auto":
            print(f"{out}: --resume takes the parameters the study was started with (study.json); "
                  "--scale and --smoke are ignored", file=sys.stderr)
    else:
        params = scale_params("smoke" if args.smoke else args.scale, torch.cuda.is_available())
    for name, value in args.param:
        try:
            params[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            params[name] = value  # a bare word: a string
    notebooks = args.notebooks.split(",") if args.notebooks else NOTEBOOK_ORDER
    run_study(out, params, notebooks, resume=args.resume)
    print(json.dumps({"out": str(out), "report": str(out / "report.html")}))


def cmd_report(args) -> None:
    from .report import write

    if not Path(args.study, "results").is_dir():
        raise RunError(f"{args.study}: not a study folder (no results/ inside)")
    path, said = write(args.study)
    print(json.dumps({"report": str(path),
                      "claims": [{k: line[k] for k in ("claim", "run", "what the numbers say")}
                                 for line in (said or {}).get("lines", [])]}, indent=1))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "pretrain":
            cmd_pretrain(args)
        elif args.command == "synth":
            cmd_synth(args)
        elif args.command == "cache":
            cmd_cache(args)
        elif args.command == "probe":
            cmd_probe(args)
        elif args.command == "analyze":
            cmd_analyze(args)
        elif args.command == "import":
            cmd_import(args)
        elif args.command == "study":
            cmd_study(args)
        elif args.command == "report":
            cmd_report(args)
        elif args.command == "presets":  # every model field, as the preset resolves it (the flags' defaults)
            from .config import to_dict

            for name in PRESETS:
                print(name, json.dumps(to_dict(model_config(name))))
    except (ConfigError, DataError, RunError, FloatingPointError) as err:
        print(f"bwssl {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0
