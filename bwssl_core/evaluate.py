"""Depth-wise decodability of a model: a linear probe and retrieval on every layer, for every label
family and pooling, beside two controls: the same architecture at random initialisation and raw
pixels (each tube's pixels as a token, pooled the same way)."""
from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import torch

from .config import ConfigError, ModelConfig
from .listfile import parse_list_file
from .model import VideoMAE
from .features import FeatureCache, encoder_hash, key_of, tensor_hash
from .attentive import PROTOCOL as ATTENTIVE_PROTOCOL, attentive_probe
from .probe import PROTOCOL as LINEAR_PROTOCOL
from .probe import POOLINGS, ProbeSpace, feature_precision, layer_features, nearest, pixel_features, pixel_tokens, \
    probe_spaces, recall_at


def clip_shape(cfg: ModelConfig) -> tuple[int, int]:
    """(frames, pixels): the clip size `load_split` reads for a model; models that share it share the clips."""
    return cfg.num_frames, cfg.img_size


def load_split(data: str | Path, split: str, cfg: ModelConfig, sampling_rate: int | None = None):
    """One centre clip per video of `data/<split>.csv` as uint8 (N, C, T, H, W), and its labels:
    every family of metadata.csv when the folder has one (as `bwssl synth` writes), else the list
    file's {"label": ...}. A folder of clip tensors (`bwssl synth --format tensor`: <split>.pt) gives
    its clips, resized as decoded ones would be, and its labels."""
    from .video import VideoClips, eval_transform

    data = Path(data)
    if (data / f"{split}.pt").exists() and not (data / f"{split}.csv").exists():
        tensor_rate_check(data / f"{split}.pt", sampling_rate)
        return _tensor_split(data / f"{split}.pt", cfg)
    rate = sampling_rate or auto_rate(data)
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


def auto_rate(path: Path) -> int:
    """The sampling rate for --data when none is given: 1 for clip tensors (used frame by frame) and a `bwssl synth`
    folder (its clips are exactly T frames) or a cache of one, else 4 (VideoMAE's)."""
    if path.suffix == ".pt" or (path.is_dir() and (path / "train.pt").exists() and not (path / "train.csv").exists()):
        return 1
    folder = path if path.is_dir() else path.parent
    if (path / "index.json").exists():  # a cache: look beside the list file it was built from
        folder = Path(json.loads((path / "index.json").read_text()).get("list_file", path)).parent
    return 1 if (folder / "synth.json").exists() else 4


def tensor_rate_check(path: Path, sampling_rate: int | None) -> None:
    """Clip tensors are used frame by frame as stored: a sampling rate (of decoded videos) would be ignored."""
    if sampling_rate not in (None, 0, 1):
        raise ConfigError(f"sampling_rate={sampling_rate}: {path} holds clip tensors, used frame by frame as "
                          "stored; a sampling rate applies to decoded videos only (0 or 1 here)")


def _tensor_split(path: Path, cfg: ModelConfig) -> tuple[torch.Tensor, dict]:
    from torchvision import tv_tensors

    from .batches import load_clip_tensors
    from .video import clip_indices, clip_starts, eval_transform

    clips, labels = load_clip_tensors(path)  # (N, T, H, W, C)
    if clips.shape[1] < cfg.num_frames:
        raise ConfigError(f"{path}: clips of {clips.shape[1]} frames, fewer than num_frames={cfg.num_frames}")
    if not labels:
        raise ConfigError(f"{path}: no labels (expected {{'clips': ..., 'labels': {{family: (N,)}}}})")
    # the centre num_frames, as decoding a synthetic mp4 gives (sampling rate 1, one centre clip)
    frames = clip_indices(clip_starts(clips.shape[1], cfg.num_frames, 1, train=False), cfg.num_frames, 1)[0]
    video = clips[:, torch.from_numpy(frames)].permute(0, 1, 4, 2, 3)  # (N, T, C, H, W)
    if video.shape[-2:] != (cfg.img_size, cfg.img_size):
        transform = eval_transform(cfg.img_size)
        video = torch.stack([transform(tv_tensors.Video(v)) for v in video]).as_subclass(torch.Tensor)
    return video.permute(0, 2, 1, 3, 4).contiguous(), labels  # (N, C, T, H, W)


def random_init(cfg: ModelConfig, seed: int) -> VideoMAE:
    """The random-init control: VideoMAE(cfg) right after torch.manual_seed(seed), the starting weights
    of a run with that seed (the same whatever its partition)."""
    torch.manual_seed(seed)
    return VideoMAE(cfg)


def depthwise(model: VideoMAE, train: tuple, val: tuple, families=None, poolings=POOLINGS, seed: int = 0,
              ks=(1, 5, 10, 20, 50), device="cpu", cache: str | Path | None = None, meta: dict | None = None,
              attentive_layers=(), attentive_families=None, precision: str = "auto") -> dict:
    """{control or "trained": {pooling: {family: {"acc": [per layer], "R@k": [per layer], ...}}}}.

    train, val: (uint8 clips (N, C, T, H, W), {family: labels (N,)}). The random-init control is
    random_init(cfg, seed): the starting weights of a run with that seed.
    With `cache` (a folder), features and probe results are kept there keyed by the hash of the
    weights, clips and labels (features.py), so controls shared by several runs are computed once;
    `meta` (config, checkpoint, data) is recorded beside each entry.
    attentive_layers (e.g. [-1]): also the token-level attentive probe on those layers (the last
    for pixels), for attentive_families (default: those of `families`), under the key "attentive".
    precision: of the frozen features ("auto": bf16 where native, see probe.feature_precision).
    """
    (train_clips, train_labels), (val_clips, val_labels) = train, val
    families = list(train_labels) if families is None else list(families)
    attentive_families = list(attentive_families or families)
    probed = list(dict.fromkeys(families + (attentive_families if attentive_layers else [])))
    missing = [f for f in probed if f not in train_labels or f not in val_labels]
    if missing:
        raise ConfigError(f"label families {missing} are not in the data (it has {sorted(train_labels)})")
    cfg, store, precision = model.cfg, FeatureCache(cache), feature_precision(device, precision)
    models = {"trained": model, "random_init": random_init(cfg, seed), "pixels": None}
    clips_key = tensor_hash(train_clips, val_clips)
    if any(k > len(train_clips) for k in ks):  # nearest() could not answer them: said, not silently dropped
        warnings.warn(f"a gallery of {len(train_clips)} training clips: R@k for k in "
                      f"{[k for k in ks if k > len(train_clips)]} left out", stacklevel=2)
        ks = tuple(k for k in ks if k <= len(train_clips))
        if not ks:
            raise ConfigError(f"ks: every k exceeds the {len(train_clips)} training clips of the gallery")
    splits = {"train": train_clips, "val": val_clips}
    out = {}
    for name, net in models.items():
        weights = encoder_hash(net) if net is not None else f"{cfg.tubelet_size}x{cfg.patch_size}"
        feat_key = key_of(name if net is not None else "pixels", weights=weights, clips=clips_key,
                          poolings=list(poolings), grid=list(cfg.grid), precision=precision if net is not None else None)
        token_layers = (list(attentive_layers) if net is not None else [0]) if attentive_layers else []
        tokens = {}  # split -> (layers, N, L, D), filled by the pass that computes the pooled features

        def compute(net=net, token_layers=token_layers, tokens=tokens):
            if net is None:
                return {split: pixel_features(c, cfg.tubelet_size, cfg.patch_size, cfg.grid, poolings)
                        for split, c in splits.items()}
            feats = {}
            for split, c in splits.items():
                feats[split], tokens[split] = layer_features(net, c, poolings, device=device,
                                                             token_layers=token_layers, precision=precision)
            return feats

        def token_level(net=net, token_layers=token_layers, tokens=tokens):
            for split, c in splits.items():
                if split not in tokens:  # pooled features came from the cache: one pass for the tokens
                    tokens[split] = pixel_tokens(c, cfg.tubelet_size, cfg.patch_size) if net is None else \
                        layer_features(net, c, (), device=device, token_layers=token_layers, precision=precision)[1]
            return tokens["train"], tokens["val"]

        def probes(feats, token_layers=token_layers, token_level=token_level):
            res = probe_layers(feats["train"], train_labels, feats["val"], val_labels, families, seed, ks, device)
            if token_layers:
                tr_t, va_t = token_level()
                res["attentive"] = {}
                for fam in attentive_families:
                    fits = [attentive_probe(tr_t[i], train_labels[fam], va_t[i], val_labels[fam], seed=seed,
                                            device=device, precision=precision) for i in range(len(token_layers))]
                    res["attentive"][fam] = {"layers": token_layers, **{k: [f[k] for f in fits] for k in fits[0]}}
            return res

        probe_key = key_of("probe", features=feat_key, seed=seed, ks=list(ks), attentive=list(attentive_layers),
                           attentive_protocol=ATTENTIVE_PROTOCOL, linear_protocol=LINEAR_PROTOCOL,
                           precision=precision, families=families, attentive_families=attentive_families,
                           labels={f: tensor_hash(train_labels[f], val_labels[f]) for f in probed})
        # each entry's sidecar says what it came from: the controls did not come from the trained checkpoint
        own = {**(meta or {}), "model": name, "weights": weights} if name == "trained" else \
            {"model": name, "weights": weights, "seed": seed if net is not None else None,
             "control_of": {k: v for k, v in (meta or {}).items() if k != "checkpoint"}}
        out[name] = store.get(probe_key, lambda: probes(store.get(feat_key, compute, own)),
                              {**own, "features": feat_key})
    return out


def probe_layers(train_feats: dict, train_labels: dict, val_feats: dict, val_labels: dict, families,
                 seed: int = 0, ks=(1, 5, 10, 20, 50), device="cpu") -> dict:
    """Linear probe and retrieval on every layer of pooled features {pooling: (layers, N, F)}:
    {pooling: {family: {"acc": [per layer], "R@k": [per layer], ...}}}."""
    labels = {f: (train_labels[f].to(device), val_labels[f].to(device)) for f in families}
    res = {}
    for pool in train_feats:
        spaces, found = [], []
        for i in range(len(train_feats[pool])):
            tr_x, va_x = train_feats[pool][i].to(device), val_feats[pool][i].to(device)
            spaces.append(ProbeSpace(tr_x, va_x, basis=False))
            top = nearest(tr_x, va_x, max(ks))  # (m, max(ks)): the same neighbours for every family
            found.append({fam: recall_at(top, tr_y, va_y, ks) for fam, (tr_y, va_y) in labels.items()})
        fitted = probe_spaces(spaces, labels, seed=seed)  # all layers at once (one solve on a GPU)
        res[pool] = {fam: {} for fam in families}
        for layer, hits in zip(fitted, found):
            for fam in families:
                for k, v in {**layer[fam], **hits[fam]}.items():
                    res[pool][fam].setdefault(k, []).append(v)
    return res


def best_layer_table(results: dict, metric: str = "acc") -> list[dict]:
    """Rows of (family, pooling, trained, random_init, pixels): each one's `metric` at its best layer, the one
    whose linear probe scored best on held-out training clips (figures.best_index; retrieval has no held-out
    score of its own), with how the layers were chosen."""
    from .figures import best_acc, chosen_on  # plotly's import only where a table is made

    rows = []
    for pool, fams in results["trained"].items():
        for fam in fams:
            if metric not in fams[fam]:  # e.g. retrieval of the attentive probe
                continue
            rows.append({"family": fam, "pooling": pool,
                         **{name: best_acc(results[name][pool][fam], metric) for name in results},
                         "layer chosen on": chosen_on(*(results[name][pool][fam] for name in results))})
    return rows
