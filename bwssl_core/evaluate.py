"""Depth-wise decodability of a model: a linear probe and retrieval on every layer, for every label
family and pooling, beside two controls: the same architecture at random initialisation and raw
pixels (each tube's pixels as a token, pooled the same way)."""
from __future__ import annotations

import csv
from pathlib import Path

import torch

from .config import ConfigError, ModelConfig
from .listfile import parse_list_file
from .model import VideoMAE
from .probe import POOLINGS, layer_features, linear_probe, pixel_features, retrieval


def load_split(data: str | Path, split: str, cfg: ModelConfig, sampling_rate: int | None = None):
    """One centre clip per video of `data/<split>.csv` as uint8 (N, C, T, H, W), and its labels:
    every family of metadata.csv when the folder has one (as `bwssl synth` writes), else the list
    file's {"label": ...}."""
    from .video import VideoClips, eval_transform

    data = Path(data)
    rate = sampling_rate or (1 if (data / "synth.json").exists() else 4)
    clips = VideoClips(data / f"{split}.csv", num_frames=cfg.num_frames, sampling_rate=rate, mode="eval",
                       transform=eval_transform(cfg.img_size))
    video = torch.stack([clips[i][0][0] for i in range(len(clips))])  # (N, C, T, H, W)
    entries = parse_list_file(data / f"{split}.csv")
    labels = {"label": torch.tensor([e.label for e in entries])}
    meta = data / "metadata.csv"
    if meta.exists():  # its families replace the list file's single label
        labels = {}
        with open(meta, newline="") as fh:
            rows = {(data / r["path"]).resolve(): r for r in csv.DictReader(fh)}
        families = [k for k in next(iter(rows.values())) if k not in ("path", "split")]
        for fam in families:
            labels[fam] = torch.tensor([int(rows[e.path.resolve()][fam]) for e in entries])
    return video, labels


def depthwise(model: VideoMAE, train: tuple, val: tuple, families=None, poolings=POOLINGS, seed: int = 0,
              ks=(1, 5, 10, 20, 50), device="cpu") -> dict:
    """{control or "trained": {pooling: {family: {"acc": [per layer], "R@k": [per layer], ...}}}}.

    train, val: (uint8 clips (N, C, T, H, W), {family: labels (N,)}). The random-init control is
    VideoMAE(cfg) right after torch.manual_seed(seed): the starting weights of a run with that seed.
    """
    (train_clips, train_labels), (val_clips, val_labels) = train, val
    families = list(train_labels) if families is None else list(families)
    missing = [f for f in families if f not in train_labels or f not in val_labels]
    if missing:
        raise ConfigError(f"label families {missing} are not in the data (it has {sorted(train_labels)})")
    cfg = model.cfg
    torch.manual_seed(seed)
    random_init = VideoMAE(cfg)
    feats = {
        "trained": [layer_features(model, c, poolings, device=device) for c in (train_clips, val_clips)],
        "random_init": [layer_features(random_init, c, poolings, device=device) for c in (train_clips, val_clips)],
        "pixels": [pixel_features(c, cfg.tubelet_size, cfg.patch_size, cfg.grid, poolings)
                   for c in (train_clips, val_clips)],
    }
    ks = tuple(k for k in ks if k <= len(train_clips))
    out = {}
    for name, (tr, va) in feats.items():
        out[name] = {}
        for pool in poolings:
            out[name][pool] = {}
            for fam in families:
                rows = [(linear_probe(tr[pool][i], train_labels[fam], va[pool][i], val_labels[fam], seed=seed),
                         retrieval(tr[pool][i], train_labels[fam], va[pool][i], val_labels[fam], ks))
                        for i in range(len(tr[pool]))]
                out[name][pool][fam] = {"acc": [p["acc"] for p, _ in rows], "l2": [p["l2"] for p, _ in rows],
                                        **{k: [r[k] for _, r in rows] for k in rows[0][1]}}
    return out


def best_layer_table(results: dict, metric: str = "acc") -> list[dict]:
    """Rows of (family, pooling, trained, random_init, pixels): the best layer's value of each."""
    rows = []
    for pool, fams in results["trained"].items():
        for fam in fams:
            rows.append({"family": fam, "pooling": pool,
                         **{name: max(results[name][pool][fam][metric]) for name in results}})
    return rows
