"""Learnability of the default data set at CPU scale (issue 3; REFERENCE section 7).

Pretrains the CPU preset for a wall-clock budget (the step count is calibrated from measured step
times so that the cosine schedule completes), then probes every layer of the trained model, of the
same architecture at random initialisation (the trained model's own starting weights) and of raw
pixels, for every label family and pooling. Writes JSON and prints the best-layer table.

    python benchmarks/learnability.py --data data/synth --out runs/learnability --budget 600
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import decord
import numpy as np
import torch

from bwssl_core import TrainConfig, VideoMAE, model_config
from bwssl_core.io import save_json
from bwssl_core.probe import POOLINGS, layer_features, linear_probe, pixel_features
from bwssl_core.synth import FAMILIES
from bwssl_core.train import Trainer


def decode_split(data: Path, split: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """All clips of a split as uint8 (N, C, T, H, W) and their labels from metadata.csv."""
    rows = [line.split(",") for line in (data / "metadata.csv").read_text().splitlines()]
    head, rows = rows[0], [r for r in rows[1:] if r[1] == split]
    clips = []
    for r in rows:
        vr = decord.VideoReader(str(data / r[0]), num_threads=1)
        clips.append(torch.from_numpy(vr.get_batch(list(range(len(vr)))).asnumpy()))
    labels = {k: torch.tensor([int(r[head.index(k)]) for r in rows]) for k in FAMILIES}
    return torch.stack(clips).permute(0, 4, 1, 2, 3).contiguous(), labels


def probe_all(feats_by_model: dict, labels_tr, labels_va) -> dict:
    results = {}
    for name, (tr, va) in feats_by_model.items():
        for pool in tr:
            for fam in FAMILIES:
                accs = [linear_probe(tr[pool][i], labels_tr[fam], va[pool][i], labels_va[fam])["acc"]
                        for i in range(len(tr[pool]))]
                results[f"{name}/{pool}/{fam}"] = accs
    return results


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--budget", type=float, default=600, help="training seconds")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--blocks", type=int, default=1)
    p.add_argument("--plain-target", action="store_true")
    p.add_argument("--mask-ratio", type=float, default=0.9)
    args = p.parse_args(argv)

    tic = time.time()
    train_clips, labels_tr = decode_split(args.data, "train")
    val_clips, labels_va = decode_split(args.data, "val")
    print(f"decoded {len(train_clips)} + {len(val_clips)} clips in {time.time() - tic:.0f}s", flush=True)
    cfg = model_config("cpu", blocks=args.blocks, norm_target=not args.plain_target, mask_ratio=args.mask_ratio)
    b = args.batch_size

    def batches(start, rank, world):  # epochs of shuffled training clips, deterministic per step
        per_epoch = len(train_clips) // b
        step = start
        while True:
            order = torch.randperm(len(train_clips), generator=torch.Generator().manual_seed(step // per_epoch))
            yield train_clips[order[(step % per_epoch) * b:(step % per_epoch + 1) * b]]
            step += 1

    # calibrate: seconds per step on this machine now
    probe_run = Trainer(cfg, TrainConfig(steps=30, batch_size=b), args.out / "calibrate", device="cpu", overwrite=True)
    it = batches(0, 0, 1)
    for _ in range(5):
        probe_run.train_step(next(it))
    t0 = time.time()
    for _ in range(15):
        probe_run.train_step(next(it))
    per_step = (time.time() - t0) / 15
    steps = int(args.budget / per_step)
    print(f"{per_step:.3f} s/step -> {steps} steps in {args.budget:.0f}s", flush=True)
    tcfg = TrainConfig(steps=steps, batch_size=b, base_lr=args.lr * 256 / b, warmup_steps=min(100, steps // 10),
                       log_every=50, ckpt_every=steps)
    trainer = Trainer(cfg, tcfg, args.out / "run", device="cpu", overwrite=True)
    t0 = time.time()
    last = trainer.fit(batches)
    train_s = time.time() - t0
    print(f"trained {steps} steps in {train_s:.0f}s, last losses {last['loss']}", flush=True)

    torch.manual_seed(tcfg.seed)
    random_init = VideoMAE(cfg)  # the trained model's starting weights
    t0 = time.time()
    feats = {
        "trained": (layer_features(trainer.model, train_clips), layer_features(trainer.model, val_clips)),
        "random": (layer_features(random_init, train_clips), layer_features(random_init, val_clips)),
        "pixels": tuple(pixel_features(c, cfg.tubelet_size, cfg.patch_size, cfg.grid) for c in (train_clips, val_clips)),
    }
    results = probe_all(feats, labels_tr, labels_va)
    probe_s = time.time() - t0
    save_json(args.out / "learnability.json", {"config": {"model": cfg.__dict__, "steps": steps, "batch": b,
               "lr": args.lr}, "train_seconds": train_s, "probe_seconds": probe_s, "per_step": per_step,
               "last": last, "results": results})
    print(f"\nbest layer, validation top-1 ({steps} steps, {train_s:.0f}s training, {probe_s:.0f}s probing)")
    print(f"{'family':9s} {'pooling':7s} {'trained':>8s} {'random':>8s} {'pixels':>8s} {'gain':>7s}")
    for fam in FAMILIES:
        for pool in POOLINGS:
            tr, rn, px = (max(results[f"{m}/{pool}/{fam}"]) for m in ("trained", "random", "pixels"))
            print(f"{fam:9s} {pool:7s} {tr:8.3f} {rn:8.3f} {px:8.3f} {tr - rn:+7.3f}")


if __name__ == "__main__":
    main()
