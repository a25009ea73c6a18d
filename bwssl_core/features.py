"""A content-addressed cache of frozen features on disk.

Features are a function of the weights, the clips and the feature kind, so the key is a hash of
exactly those: a cached entry can never be stale, and controls (random init, raw pixels) shared
by several runs are computed once. Each entry is `<key>.pt` (weights_only, written atomically)
with a `<key>.json` beside it recording what it came from (config, checkpoint, data, kind).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import torch

from .io import load_checkpoint, save_checkpoint, save_json


def tensor_hash(*tensors: torch.Tensor, extra: dict | None = None) -> str:
    """sha256 over the tensors' shapes, dtypes and bytes (and a JSON-able `extra`), 16 hex digits."""
    h = hashlib.sha256(json.dumps(extra or {}, sort_keys=True, default=str).encode())
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().reshape(-1) if t.numel() else b"")  # the buffer, not a copy
    return h.hexdigest()[:16]


def key_of(kind: str, **parts) -> str:
    """A file-name key: the kind, then a hash of the JSON-able parts."""
    return f"{kind}-{tensor_hash(extra=parts)}"


def encoder_hash(model) -> str:
    """Hash of what a VideoMAE's features depend on: the tubelet embedding and the encoder layers in
    global order (not the partition, block norms or decoders), and the position table's kind and grid."""
    tensors = [*model.stages[0].embed.state_dict().values()]
    tensors += [t for layer in model.layers for t in layer.state_dict().values()]
    return tensor_hash(*tensors, extra={"pos_embed": model.cfg.pos_embed, "grid": list(model.cfg.grid),
                                        "heads": model.cfg.num_heads, "eps": model.cfg.norm_eps})


class FeatureCache:
    """get(key, compute, meta): the entry saved under key, or compute()'s result, saved there first.
    Without a folder it only computes."""

    def __init__(self, folder: str | Path | None):
        self.folder = Path(folder) if folder is not None else None
        self.hits = self.misses = 0

    def get(self, key: str, compute: Callable[[], dict], meta: dict | None = None) -> dict:
        if self.folder is None:
            return compute()
        path = self.folder / f"{key}.pt"
        if path.exists():
            self.hits += 1
            return load_checkpoint(path)["value"]
        self.misses += 1
        value = compute()
        self.folder.mkdir(parents=True, exist_ok=True)
        save_checkpoint(path, {"key": key, "value": value})
        save_json(path.with_suffix(".json"), {"key": key, **(meta or {})})
        return value
