"""Frozen-feature linear probes: per-layer features, three poolings, multinomial logistic regression.

Poolings of a layer's tokens (B, L, D), L over the (T', H', W') grid:
  mean:   the mean over all tokens (the paper's standard)            -> D
  slices: the means of each temporal slice, concatenated (keeps when) -> T' * D
  grid:   means over T' x 2 x 2 space-time cells (keeps where and when) -> T' * 4 * D
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F

from .batches import normalize_video
from .config import ConfigError
from .masking import patchify
from .model import VideoMAE

POOLINGS = ("mean", "slices", "grid")


def pool_tokens(x: torch.Tensor, grid: tuple[int, int, int], kind: str) -> torch.Tensor:
    """(B, L, D) tokens in (t, h, w) order -> (B, F) pooled features."""
    B, L, D = x.shape
    T, H, W = grid
    if kind == "mean":
        return x.mean(1)
    x = x.view(B, T, H, W, D)
    if kind == "slices":
        return x.mean((2, 3)).flatten(1)  # (B, T' * D)
    if kind == "grid":
        cells = F.adaptive_avg_pool3d(x.permute(0, 4, 1, 2, 3).float(), (T, 2, 2))  # (B, D, T', 2, 2)
        return cells.permute(0, 2, 3, 4, 1).flatten(1)  # (B, T' * 4 * D)
    raise ValueError(f"pooling {kind!r}: expected one of {POOLINGS}")


def _batches(clips: torch.Tensor | Iterable[torch.Tensor], batch_size: int):
    if isinstance(clips, torch.Tensor):
        yield from clips.split(batch_size)
    else:
        yield from clips


@torch.no_grad()
def layer_features(model: VideoMAE, clips, poolings=POOLINGS, batch_size: int = 64,
                   device="cpu") -> dict[str, torch.Tensor]:
    """Features of every encoder layer for uint8 clips (N, C, T, H, W) (a tensor or an iterable of
    batches), all tokens visible: {pooling: (layers, N, F)} on the CPU."""
    model = model.to(device).eval()
    out = {kind: [] for kind in poolings}
    for batch in _batches(clips, batch_size):
        video = normalize_video(batch.to(device))
        feats = model.forward_intermediates(video)  # list of (B, L, D)
        for kind in poolings:
            out[kind].append(torch.stack([pool_tokens(f, model.cfg.grid, kind) for f in feats]).float().cpu())
    return {kind: torch.cat(parts, 1) for kind, parts in out.items()}


@torch.no_grad()
def pixel_features(clips, tubelet_size: int, patch_size: int, grid, poolings=POOLINGS,
                   batch_size: int = 64) -> dict[str, torch.Tensor]:
    """The raw-pixel control: each tube's pixels as a token, pooled like the layers: {pooling: (1, N, F)}."""
    out = {kind: [] for kind in poolings}
    for batch in _batches(clips, batch_size):
        tubes = patchify(batch.float() / 255, tubelet_size, patch_size).flatten(2)  # (B, L, t*p*p*C)
        for kind in poolings:
            out[kind].append(pool_tokens(tubes, grid, kind)[None])
    return {kind: torch.cat(parts, 1) for kind, parts in out.items()}


def _fit(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, max_iter: int,
         init: torch.nn.Linear | None = None) -> torch.nn.Linear:
    """Multinomial logistic regression, mean cross-entropy + l2/2 ||W||^2, by L-BFGS (stopping
    rules as scikit-learn's lbfgs: gradient max-norm below 1e-4 or max_iter iterations)."""
    clf = torch.nn.Linear(x.shape[1], num_classes, dtype=x.dtype, device=x.device)
    with torch.no_grad():
        clf.weight.copy_(init.weight if init is not None else torch.zeros_like(clf.weight))
        clf.bias.copy_(init.bias if init is not None else torch.zeros_like(clf.bias))
    opt = torch.optim.LBFGS(clf.parameters(), lr=1, max_iter=max_iter, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-4, tolerance_change=1e-7)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(clf(x), y) + 0.5 * l2 * clf.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return clf


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                 l2_grid=(1e-1, 1e-2, 1e-3, 1e-4), holdout: float = 0.2, seed: int = 0,
                 max_iter: int = 100) -> dict:
    """Top-1 on validation of a logistic regression on standardised features, its l2 chosen on a
    held-out part of the training split, then refit on the whole training split."""
    if len(train_x) != len(train_y) or len(val_x) != len(val_y):
        raise ConfigError(f"features and labels differ in length: train {len(train_x)} vs {len(train_y)}, "
                         f"validation {len(val_x)} vs {len(val_y)}")
    num_classes = int(max(train_y.max(), val_y.max())) + 1
    if len(train_x) < 2 * num_classes / (1 - holdout):
        raise ConfigError(f"{len(train_x)} training samples are fewer than the probe needs for {num_classes} "
                         f"classes (at least {int(2 * num_classes / (1 - holdout)) + 1}: two per class to fit, "
                         f"plus a {holdout:.0%} held-out part to choose l2)")
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    tx, vx = (train_x - mean) / std, (val_x - mean) / std
    order = torch.randperm(len(tx), generator=torch.Generator().manual_seed(seed))
    n_hold = max(1, int(len(tx) * holdout))
    hold, fit = order[:n_hold], order[n_hold:]
    scores, clf = {}, None
    for l2 in sorted(l2_grid, reverse=True):  # strong to weak, each fit warm-started from the last
        clf = _fit(tx[fit], train_y[fit], num_classes, l2, max_iter, init=clf)
        with torch.no_grad():
            scores[l2] = (clf(tx[hold]).argmax(1) == train_y[hold]).float().mean().item()
    best = max(l2_grid, key=lambda l2: (scores[l2], l2))  # ties: the stronger regulariser
    clf = _fit(tx, train_y, num_classes, best, max_iter)
    with torch.no_grad():
        acc = (clf(vx).argmax(1) == val_y).float().mean().item()
    return {"acc": acc, "l2": best, "holdout_acc": scores[best]}


@torch.no_grad()
def retrieval(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
              ks=(1, 5, 10, 20, 50), chunk: int = 1024) -> dict[str, float]:
    """VCOP / CoCLR protocol: every validation clip queries the training gallery by cosine
    similarity; a hit at k when any of its k nearest shares its label. No clip is dropped."""
    if len(train_x) < max(ks):
        raise ConfigError(f"a gallery of {len(train_x)} clips is smaller than R@{max(ks)} needs")
    gallery = F.normalize(train_x.float(), dim=1)
    hits = []
    for q, y in zip(F.normalize(val_x.float(), dim=1).split(chunk), val_y.split(chunk)):
        top = (q @ gallery.T).topk(max(ks), dim=1).indices  # (n, kmax)
        hits.append(train_y[top] == y[:, None])
    hits = torch.cat(hits)
    return {f"R@{k}": hits[:, :k].any(1).float().mean().item() for k in ks}
