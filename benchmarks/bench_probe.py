"""Analysis speed: per-layer frozen features plus linear probes and retrieval on every layer, for every
label family of the synthetic data, over N clips, timed as the study runs them.

The clips are made on the device first (synth.synth_batch, labelled) and are not timed. Timed: one
pass of probe.layer_features over train and validation (all poolings at once, as the study does),
then evaluate.probe_layers (standardise, principal basis, l2 chosen on a held-out part, refit; R@k)
for each pooling on its own. The encoder is at random init: the speed does not depend on the weights.
Prints a table and saves JSON.

    python benchmarks/bench_probe.py --preset vit_b --clips 10000 --out runs/bench_probe.json   # GPU
    python benchmarks/bench_probe.py --preset tiny --clips 200 --out /tmp/p.json
"""
from __future__ import annotations

import argparse
import datetime
import time

import torch

from bwssl_core.config import model_config
from bwssl_core.evaluate import probe_layers
from bwssl_core.io import save_json
from bwssl_core.model import VideoMAE
from bwssl_core.probe import POOLINGS, feature_precision, layer_features
from bwssl_core.synth import FAMILIES, SynthConfig, synth_batch
from bwssl_core.timing import add_device_args, device_from_args, device_name, sync


def make_clips(n: int, cfg, device: torch.device, chunk: int = 256, seed: int = 0):
    """n labelled clips (uint8 (n, C, T, H, W) on `device`, {family: (n,) labels}) at the model's size."""
    scfg = SynthConfig(size=cfg.img_size, frames=cfg.num_frames)
    g = torch.Generator().manual_seed(seed)
    clips, labels = [], []
    for start in range(0, n, chunk):
        c, y = synth_batch(min(chunk, n - start), scfg, g, device)
        clips.append(c.to(device))
        labels.append(y)
    return torch.cat(clips), {f: torch.cat([y[f] for y in labels]) for f in FAMILIES}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file of the results")
    p.add_argument("--preset", default="vit_b")
    p.add_argument("--clips", type=int, default=10000, help="train and validation together")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--poolings", nargs="+", default=list(POOLINGS), choices=list(POOLINGS))
    p.add_argument("--batch", type=int, default=64, help="clips per forward pass")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    add_device_args(p)
    args = p.parse_args(argv)
    device = device_from_args(args)
    cfg = model_config(args.preset)
    torch.manual_seed(0)
    model = VideoMAE(cfg)

    tic = time.perf_counter()
    clips, labels = make_clips(args.clips, cfg, device)
    sync(device)
    make_s = time.perf_counter() - tic
    n_val = int(args.clips * args.val_fraction)
    split = {"train": (clips[n_val:], {f: y[n_val:] for f, y in labels.items()}),
             "val": (clips[:n_val], {f: y[:n_val] for f, y in labels.items()})}
    print(f"made {args.clips} clips of {tuple(clips.shape[1:])} in {make_s:.1f} s", flush=True)

    tic = time.perf_counter()
    feats = {s: layer_features(model, c, args.poolings, args.batch, device, precision=args.precision)[0]
             for s, (c, _) in split.items()}
    sync(device)
    features_s = time.perf_counter() - tic
    print(f"features ({', '.join(args.poolings)}; {cfg.depth} layers): {features_s:.1f} s", flush=True)
    probes_s, results = {}, {}
    for pool in args.poolings:
        tic = time.perf_counter()
        results[pool] = probe_layers({pool: feats["train"][pool]}, split["train"][1], {pool: feats["val"][pool]},
                                     split["val"][1], list(FAMILIES), device=device)[pool]
        sync(device)
        probes_s[pool] = time.perf_counter() - tic
        print(f"probes, {pool} ({feats['train'][pool].shape[-1]} features): {probes_s[pool]:.1f} s", flush=True)

    print(f"\n{'preset':8} {'clips':>6} {'pooling':8} {'features s':>10} {'probes s':>9} {'total s':>8}")
    print(f"{args.preset:8} {args.clips:6d} {'(all)':8} {features_s:10.1f} {'':>9} {'':>8}")
    for pool, s in probes_s.items():
        print(f"{args.preset:8} {args.clips:6d} {pool:8} {'':>10} {s:9.1f} {features_s + s:8.1f}")
    print(f"all poolings: {features_s + sum(probes_s.values()):.1f} s")
    env = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
           "device": device_name(device),
           "threads": torch.get_num_threads(), "precision": feature_precision(device, args.precision)}
    result = {"env": env, "args": vars(args), "make_clips_s": make_s, "features_s": features_s,
              "probes_s": probes_s, "total_s": features_s + sum(probes_s.values()),
              "best_acc": {pool: {f: max(r[f]["acc"]) for f in r} for pool, r in results.items()}}
    save_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
