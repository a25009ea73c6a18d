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
    f32 = torch.float32  # accumulate in float32 whatever x's dtype, without a float32 copy of x
    if kind == "mean":
        return x.mean(1, dtype=f32)
    x = x.view(B, T, H, W, D)
    if kind == "slices":
        return x.mean((2, 3), dtype=f32).flatten(1)  # (B, T' * D)
    if kind == "grid":
        if H % 2 == 0 and W % 2 == 0:  # equal cells: a plain reduction, as adaptive pooling gives
            cells = x.view(B, T, 2, H // 2, 2, W // 2, D).mean((3, 5), dtype=f32)  # (B, T', 2, 2, D)
        else:  # adaptive pooling's overlapping cells
            cells = F.adaptive_avg_pool3d(x.permute(0, 4, 1, 2, 3).float(), (T, 2, 2)).permute(0, 2, 3, 4, 1)
        return cells.flatten(1)  # (B, T' * 4 * D)
    raise ValueError(f"pooling {kind!r}: expected one of {POOLINGS}")


def _batches(clips: torch.Tensor | Iterable[torch.Tensor], batch_size: int):
    if isinstance(clips, torch.Tensor):
        yield from clips.split(batch_size)
    else:
        yield from clips


def feature_precision(device, precision: str = "auto") -> str:
    """"bf16" or "fp32" for frozen features. "auto": bf16 where it is native (CUDA, or a CPU with
    avx512_bf16 / amx_bf16, about 1.5x faster than fp32 on a 2-core Zen 4), else fp32."""
    if precision not in ("auto", "bf16", "fp32"):
        raise ConfigError(f"precision={precision!r}: expected 'auto', 'bf16' or 'fp32'")
    if precision != "auto":
        return precision
    if torch.device(device).type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return "fp32"
    return "bf16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "fp32"


@torch.no_grad()
def layer_features(model: VideoMAE, clips, poolings=POOLINGS, batch_size: int = 64, device="cpu",
                   token_layers=(), precision: str = "auto"):
    """Features of every encoder layer for uint8 clips (N, C, T, H, W) (a tensor or an iterable of
    batches), all tokens visible, in one pass: ({pooling: (layers, N, F)} in float32, and for
    token_layers the token-level features (len(token_layers), N, L, D) in float16, else None), on the CPU."""
    model = model.to(device).eval()
    amp = feature_precision(device, precision) == "bf16"
    out, tokens = {kind: [] for kind in poolings}, []
    for batch in _batches(clips, batch_size):
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
            feats = model.forward_intermediates(normalize_video(batch.to(device)))  # list of (B, L, D)
        for kind in poolings:
            out[kind].append(torch.stack([pool_tokens(f, model.cfg.grid, kind) for f in feats]).cpu())
        if token_layers:
            tokens.append(torch.stack([feats[i] for i in token_layers]).half().cpu())  # (layers, B, L, D)
    return {kind: torch.cat(parts, 1) for kind, parts in out.items()}, (torch.cat(tokens, 1) if tokens else None)


def pixel_tokens(clips, tubelet_size: int, patch_size: int, batch_size: int = 64) -> torch.Tensor:
    """The raw-pixel control at token level: each tube's pixels as a token, (1, N, L, t*p*p*C) float16."""
    return torch.cat([patchify(b.float() / 255, tubelet_size, patch_size).flatten(2)[None].half()
                      for b in _batches(clips, batch_size)], 1)


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


def principal_basis(x: torch.Tensor, rel_eps: float = 1e-7) -> tuple[torch.Tensor, torch.Tensor]:
    """An orthonormal basis V (d, r) of the row space of centred features x (n, d), and the variance
    along each direction lam (r,): the eigenvectors of x^T x / n (through the n x n Gram matrix when
    d > n), in float64, directions with lam <= rel_eps * max(lam) dropped."""
    n, d = x.shape
    xd = x.double()
    if d <= n:
        lam, V = torch.linalg.eigh(xd.T @ xd / n)
    else:
        lam, U = torch.linalg.eigh(xd @ xd.T / n)
        lam = lam.clamp_min(0)
        V = xd.T @ U / (n * lam).clamp_min(1e-300).sqrt()  # (d, n): right singular vectors
    keep = lam > rel_eps * lam.max().clamp_min(1e-300)
    return V[:, keep].to(x.dtype), lam[keep].to(x.dtype)


def _fit(z: torch.Tensor, ys: torch.Tensor, num_classes: list[int], l2: list[float], lam: torch.Tensor,
         max_iter: int, init: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """J multinomial logistic regressions on shared features z (n, r) in a principal basis, solved as one:
    labels ys (J, n), problem j with num_classes[j] classes and penalty l2[j]. Minimises the sum over j
    of mean cross-entropy + l2_j/2 ||B_j||^2 over weights B (J, C, r) and biases b (J, C), C the largest
    class count (a problem's extra classes are masked out), by one L-BFGS: the problems share no
    parameter, so the joint minimum is every problem's own minimum, reached in one run of batched
    matmuls instead of J runs. B_j = P_j * c_j with c_j = (lam / 4 + l2_j)^-1/2, a diagonal
    preconditioner (the same minimum in far fewer steps). Stops when the max-norm of the gradient in
    P falls below 1e-4 or after max_iter iterations."""
    J, n = ys.shape
    C = max(num_classes)
    l2s = torch.tensor(l2, dtype=z.dtype, device=z.device)  # (J,)
    c = (lam[None] / 4 + l2s[:, None]).rsqrt()[:, None]  # (J, 1, r)
    absent = torch.arange(C, device=z.device)[None] >= torch.tensor(num_classes, device=z.device)[:, None]  # (J, C)
    B0, b0 = init if init is not None else (z.new_zeros(J, C, z.shape[1]), z.new_zeros(J, C))
    P = (B0 / c).clone().requires_grad_(True)
    b = b0.masked_fill(absent, 0).requires_grad_(True)
    opt = torch.optim.LBFGS([P, b], lr=1, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-4, tolerance_change=1e-9)
    targets = ys.T.contiguous()  # (n, J)

    def closure():
        opt.zero_grad()
        B = P * c  # (J, C, r)
        logits = (z @ B.flatten(0, 1).T).view(n, J, C) + b  # (n, J, C)
        logits = logits.masked_fill(absent, float("-inf"))
        ce = F.cross_entropy(logits.permute(0, 2, 1), targets, reduction="none").mean(0)  # (J,)
        loss = (ce + 0.5 * l2s * B.pow(2).sum((1, 2))).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return (P * c).detach(), b.detach().masked_fill(absent, float("-inf"))  # an absent class never wins


def _solve(z: torch.Tensor, ys: torch.Tensor, num_classes: list[int], l2: list[float], lam: torch.Tensor,
           max_iter: int, init: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """_fit's problems: on a GPU all in one batched solve (the calls, not the arithmetic, cost there);
    on the CPU one at a time, each stopping at its own convergence and, without `init`, starting from
    the solution of the problem before it when that one has the same labels (a stronger l2 of the same
    family). Weights padded to the largest class count, absent classes' bias -inf."""
    if z.device.type == "cuda":
        return _fit(z, ys, num_classes, l2, lam, max_iter, init)
    C, Bs, bs = max(num_classes), [], []
    for j, k in enumerate(num_classes):
        if init is not None:
            start = (init[0][j:j + 1, :k], init[1][j:j + 1, :k])
        else:
            same = j > 0 and num_classes[j - 1] == k and torch.equal(ys[j], ys[j - 1])
            start = (Bs[-1][:, :k], bs[-1][:, :k]) if same else None
        B, b = _fit(z, ys[j:j + 1], [k], [l2[j]], lam, max_iter, start)
        Bs.append(F.pad(B, (0, 0, 0, C - k)))
        bs.append(F.pad(b, (0, C - k), value=float("-inf")))
    return torch.cat(Bs), torch.cat(bs)


def _accuracy(z: torch.Tensor, B: torch.Tensor, b: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Top-1 of the J problems' weights B (J, C, r), b (J, C) on features z (n, r) and labels y (J, n): (J,)."""
    return ((torch.einsum("nr,jcr->jnc", z, B) + b[:, None]).argmax(-1) == y).float().mean(1)


class ProbeSpace:
    """One layer's features for probing: standardised by the training split's statistics and
    expressed in its principal basis (exact: an l2-penalised linear model's weights lie in the span
    of the training features), shared by the probes of every label family."""

    def __init__(self, train_x: torch.Tensor, val_x: torch.Tensor):
        mean, std = train_x.mean(0), train_x.std(0) + 1e-6
        tx, vx = (train_x - mean) / std, (val_x - mean) / std
        self.basis, self.lam = principal_basis(tx)
        self.train, self.val = tx @ self.basis, vx @ self.basis  # (n, r), (m, r)

    def fit(self, y: torch.Tensor, l2: float, max_iter: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
        """Weights (C, d) on the standardised features and bias (C,), fitted on the whole training split."""
        y = y.to(self.train.device)
        B, b = _fit(self.train, y[None], [int(y.max()) + 1], [l2], self.lam, max_iter)
        return B[0] @ self.basis.T, b[0]

    def probe(self, train_y: torch.Tensor, val_y: torch.Tensor, **kwargs) -> dict:
        """Top-1 on validation, l2 chosen on a held-out part of the training split, then refit on all of it."""
        return self.probe_families({"y": (train_y, val_y)}, **kwargs)["y"]

    def probe_families(self, labels: dict[str, tuple[torch.Tensor, torch.Tensor]],
                       l2_grid=(1e-1, 1e-2, 1e-3, 1e-4), holdout: float = 0.2, seed: int = 0,
                       max_iter: int = 100) -> dict[str, dict]:
        """probe() for several label families {family: (train_y, val_y)} at once: every (family, l2)
        fit on the training rows in one solve, each family's l2 chosen on the held-out rows (ties:
        the stronger), then every family refit at its l2 on all training rows in a second solve.
        {family: {"acc", "l2", "holdout_acc"}}."""
        dev = self.train.device
        counts = {}
        for fam, (train_y, val_y) in labels.items():
            if len(self.train) != len(train_y) or len(self.val) != len(val_y):
                raise ConfigError(f"features and labels{'' if fam == 'y' else f' of {fam}'} differ in length: "
                                  f"train {len(self.train)} vs {len(train_y)}, validation {len(self.val)} vs {len(val_y)}")
            counts[fam] = int(max(train_y.max(), val_y.max())) + 1
            if len(train_y) < 2 * counts[fam] / (1 - holdout):
                raise ConfigError(f"{len(train_y)} training samples are fewer than the probe needs for {counts[fam]} "
                                  f"classes (at least {int(2 * counts[fam] / (1 - holdout)) + 1}: two per class to "
                                  f"fit, plus a {holdout:.0%} held-out part to choose l2)")
        fams, grid = list(labels), sorted(l2_grid, reverse=True)
        train_y = torch.stack([labels[f][0] for f in fams]).to(dev)  # (F, n)
        val_y = torch.stack([labels[f][1] for f in fams]).to(dev)  # (F, m)
        order = torch.randperm(train_y.shape[1], generator=torch.Generator().manual_seed(seed)).to(dev)
        n_hold = max(1, int(train_y.shape[1] * holdout))
        hold, rows = order[:n_hold], order[n_hold:]
        # problem j = (family j // len(grid), l2 grid[j % len(grid)])
        ys = train_y.repeat_interleave(len(grid), 0)  # (F * G, n)
        B, b = _solve(self.train[rows], ys[:, rows], [counts[f] for f in fams for _ in grid], grid * len(fams),
                    self.lam, max_iter)
        scores = _accuracy(self.train[hold], B, b, ys[:, hold]).view(len(fams), len(grid)).tolist()
        best = [max(range(len(grid)), key=lambda i: (s[i], grid[i])) for s in scores]  # ties: the stronger l2
        pick = torch.tensor([f * len(grid) + i for f, i in enumerate(best)], device=dev)
        B, b = _solve(self.train, train_y, [counts[f] for f in fams], [grid[i] for i in best], self.lam, max_iter,
                    (B[pick], b[pick]))
        acc = _accuracy(self.val, B, b, val_y).tolist()
        return {f: {"acc": acc[j], "l2": grid[best[j]], "holdout_acc": scores[j][best[j]]} for j, f in enumerate(fams)}


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                 **kwargs) -> dict:
    """Top-1 on validation of a logistic regression on standardised features (see ProbeSpace.probe)."""
    return ProbeSpace(train_x, val_x).probe(train_y, val_y, **kwargs)


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
