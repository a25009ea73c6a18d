"""Learnability of the default data set at CPU scale (issue 3; REFERENCE section 7).

Pretrains the CPU preset for a wall-clock budget (the step count is calibrated from measured step
times so that the cosine schedule completes), then probes every layer of the trained model, of the
same architecture at random initialisation (the trained model's own starting weights) and of raw
pixels, for every label family and pooling. Writes JSON and prints the best-layer table.

    python benchmarks/learnability.py --data data/synth --out runs/learnability --budget 600
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from bwssl_core import TrainConfig, model_config
from bwssl_core.batches import epoch_batches
from bwssl_core.evaluate import best_layer_table, depthwise, load_split
from bwssl_core.io import save_json
from bwssl_core.train import Trainer


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

    cfg = model_config("cpu", blocks=args.blocks, norm_target=not args.plain_target, mask_ratio=args.mask_ratio)
    tic = time.time()
    train_clips, labels_tr = load_split(args.data, "train", cfg)
    val_clips, labels_va = load_split(args.data, "val", cfg)
    print(f"decoded {len(train_clips)} + {len(val_clips)} clips in {time.time() - tic:.0f}s", flush=True)
    b = args.batch_size

    def batches(start, rank, world):  # epochs of shuffled training clips, deterministic per step
        for _, ids in epoch_batches(len(train_clips), b, seed=0, start_step=start):
            yield train_clips[ids]

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

    t0 = time.time()
    results = depthwise(trainer.model, (train_clips, labels_tr), (val_clips, labels_va), seed=tcfg.seed)
    probe_s = time.time() - t0
    save_json(args.out / "learnability.json", {"config": {"model": cfg.__dict__, "steps": steps, "batch": b,
               "lr": args.lr}, "train_seconds": train_s, "probe_seconds": probe_s, "per_step": per_step,
               "last": last, "results": results})
    print(f"\nbest layer, validation top-1 ({steps} steps, {train_s:.0f}s training, {probe_s:.0f}s probing)")
    print(f"{'family':9s} {'pooling':7s} {'trained':>8s} {'random':>8s} {'pixels':>8s} {'gain':>7s}")
    for row in best_layer_table(results):
        print(f"{row['family']:9s} {row['pooling']:7s} {row['trained']:8.3f} {row['random_init']:8.3f} "
              f"{row['pixels']:8.3f} {row['trained'] - row['random_init']:+7.3f}")


if __name__ == "__main__":
    main()
