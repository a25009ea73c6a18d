"""Frozen-feature linear probes: per-layer features, three poolings, multinomial logistic regression.

Poolings of a layer's tokens (B, L, D), L over the (T', H', W') grid:
  mean:   the mean over all tokens (the paper's standard)            -> D
  slices: the means of each temporal slice, concatenated (keeps when) -> T' * D
  grid:   means over T' x 2 x 2 space-time cells (keeps where and when) -> T' * 4 * D
"""
from __future__ import annotations

import inspect
import math
import warnings
from typing import Iterable

import torch
import torch.nn.functional as F

from .batches import normalize_video
from .config import ConfigError
from .lbfgs import lbfgs_each
from .masking import patchify
from .model import VideoMAE

POOLINGS = ("mean", "slices", "grid")
MAX_ITER = 300  # L-BFGS iterations per probe fit at most; the default study's slowest needed 131 (NOTES.md)


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


def finite_features(x: torch.Tensor, what: str) -> None:
    """A ConfigError naming `what` and how many of its rows hold NaN or inf (a diverged run, a bf16 overflow):
    the probe's eigendecomposition fails on them with a solver's message, retrieval ranks them anywhere."""
    bad = int((~torch.isfinite(x)).flatten(1).any(1).sum()) if len(x) else 0
    if bad:
        raise ConfigError(f"{what}: NaN or inf in {bad} of {len(x)} rows")


def _eigh_kept(m: torch.Tensor, rel_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues lam (r,) and eigenvectors (k, r) of a symmetric float64 matrix m (k, k), those with
    lam <= rel_eps * max(lam) dropped."""
    lam, V = torch.linalg.eigh(m)
    keep = lam > rel_eps * lam.max().clamp_min(1e-300)
    return lam[keep], V[:, keep]


def _fit(z: torch.Tensor, ys: torch.Tensor, num_classes: list[int], l2, lam: torch.Tensor,
         max_iter: int, init: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, ...]:
    """G x J multinomial logistic regressions solved together: features z (G, n, r) of G groups (layers), each in
    its principal basis with variances lam (G, r) (zero-padded to a common r), and labels ys (J, n) shared by
    the groups, problem (g, j) with num_classes[j] classes and penalty l2 (J,) or (G, J), minimising mean
    cross-entropy + l2_gj/2 ||B_gj||^2. Each problem runs its own L-BFGS (lbfgs.lbfgs_each) and stops at its own
    convergence (gradient max-norm below 1e-4) or after max_iter iterations, while every evaluation is one
    batched matmul over the problems still running. The problems' classes are packed side by side (padding each
    to the largest count cost 1.7x the matmuls on the study's families), problems of one class count contiguous,
    so each count's softmax is one call; the gradient is written out (objective). B_gj = P_gj * c_gj with c_gj =
    (lam_g / 4 + l2_gj)^-1/2, a diagonal preconditioner (the same minimum in far fewer steps). A padded
    direction (z and lam zero) keeps zero weight. Returns B (G, J, C, r) and b (G, J, C), C the largest class
    count, a problem's absent classes zero-weighted with bias -inf, each problem's iteration count (G, J) and
    whether it stopped at max_iter short of convergence (G, J)."""
    G, n, r = z.shape
    J, C = ys.shape[0], max(num_classes)
    order = sorted(range(J), key=lambda j: num_classes[j])  # problem p of the solver is problem order[p]
    first = [0]
    for j in order:
        first.append(first[-1] + num_classes[j])
    owner = torch.tensor([p for p, j in enumerate(order) for _ in range(num_classes[j])], device=z.device)  # (K,)
    slot = torch.tensor([j * C + i for j in order for i in range(num_classes[j])], device=z.device)  # in (J * C)
    l2k = torch.as_tensor(l2, dtype=z.dtype, device=z.device).expand(G, J)[:, [j for j in order for _ in
                                                                                range(num_classes[j])]]  # (G, K)
    c = (lam[:, None] / 4 + l2k[..., None]).rsqrt()  # (G, K, r)
    x0 = z.new_zeros(G, len(slot), r + 1)  # (G, K, r + 1): P and the bias
    if init is not None:
        x0[..., :r], x0[..., r] = init[0].flatten(1, 2)[:, slot] / c, init[1].flatten(1)[:, slot]
    layouts = {}

    def layout(live: list) -> tuple:  # the columns, preconditioner, penalty, label groups and targets of `live`
        if tuple(live) not in layouts:
            cols = torch.cat([torch.arange(first[p], first[p + 1]) for p in live]).to(z.device)
            counts = [num_classes[order[p]] for p in live]
            groups = []  # (first column, problems, class count) per class count
            for k in sorted(set(counts)):
                i = counts.index(k)
                groups.append((sum(counts[:i]), counts.count(k), k))
            layouts.clear()  # the batch only shrinks: an older layout is never needed again
            pos = torch.tensor([i for i, k in enumerate(counts) for _ in range(k)], device=z.device)  # col -> problem
            pos = F.one_hot(pos, len(live)).to(z.dtype)  # (K', live): sums columns per problem, deterministically
            target = torch.cat([F.one_hot(ys[order[p]], num_classes[order[p]]) for p in live], 1).to(z.dtype)
            layouts[tuple(live)] = (c[:, cols], l2k[:, cols], groups, pos, target.T / n)  # target (K', n) / n
        return layouts[tuple(live)]

    def objective(x: torch.Tensor, live: list) -> tuple[torch.Tensor, torch.Tensor]:
        """Each (group, problem)'s mean cross-entropy plus penalty (G, live), and the gradient by hand:
        d logits = (softmax - one-hot) / n, then one matmul back to the weights. The log-softmax runs
        on logits transposed to (G, K', n), samples last: over a last dimension of 3-8 classes it cost
        as much as a matmul. Through autograd the E2E grid solve took 1.5x as long (NOTES.md)."""
        cl, l2l, groups, pos, target = layout(live)
        B, b = x[..., :r] * cl, x[..., r]  # (G, K', r), (G, K')
        spare = -B.shape[1] % 8  # zero columns: a Zen 4's matmul was up to 2x slower at a width not a multiple of 8
        logits = torch.baddbmm(F.pad(b, (0, spare))[:, None], z, F.pad(B, (0, 0, 0, spare)).transpose(1, 2))
        logits = logits[..., :B.shape[1]].transpose(1, 2).contiguous()  # (G, K', n)
        logp = torch.cat([logits[:, first_col:first_col + nj * k].unflatten(1, (nj, k)).log_softmax(2).flatten(1, 2)
                          for first_col, nj, k in groups], 1)  # (G, K', n): each problem's classes normalised
        f = (0.5 * l2l * B.pow(2).sum(2) - torch.linalg.vecdot(logp, target)) @ pos  # (G, live)
        dlogits = logp.exp_().div_(n).sub_(target)  # (G, K', n), in logp's memory
        gB = torch.bmm(dlogits, z).addcmul_(l2l[..., None], B)  # (G, K', r)
        return f, torch.cat([gB * cl, dlogits.sum(2)[..., None]], 2)

    x, iters, capped = lbfgs_each(objective, x0, owner, max_iter)
    B_out = z.new_zeros(G, J * C, r)
    b_out = z.new_full((G, J * C), float("-inf"))  # an absent class never wins
    B_out[:, slot], b_out[:, slot] = x[..., :r] * c, x[..., r]
    inverse = [order.index(j) for j in range(J)]
    return B_out.view(G, J, C, r), b_out.view(G, J, C), iters[:, inverse], capped[:, inverse]


def _accuracy(z: torch.Tensor, B: torch.Tensor, b: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Top-1 of weights B (G, J, C, r), b (G, J, C) on features z (G, n, r) and labels y (J, n): (G, J)."""
    return ((torch.einsum("gnr,gjcr->gjnc", z, B) + b[:, :, None]).argmax(-1) == y).float().mean(2)


class ProbeSpace:
    """One layer's features for probing: standardised by the training split's statistics and
    expressed in its principal basis (exact: an l2-penalised linear model's weights lie in the span
    of the training features), shared by the probes of every label family. basis=False: the (d, r)
    basis itself is not kept (only fit() needs it), which saves two large matmuls when d > n."""

    def __init__(self, train_x: torch.Tensor, val_x: torch.Tensor, basis: bool = True, rel_eps: float = 1e-7):
        if train_x.ndim != 2 or val_x.shape[1:] != train_x.shape[1:]:
            raise ConfigError(f"features: expected (N, F) for both splits with the same F, got train "
                              f"{tuple(train_x.shape)} and validation {tuple(val_x.shape)}")
        finite_features(train_x, "training features")
        finite_features(val_x, "validation features")
        mean, std = train_x.mean(0), train_x.std(0)
        # as scikit-learn's StandardScaler: a feature constant over the training clips (a letterbox border, a
        # dead unit) keeps scale 1; its std is rounding noise (~1e-7 of its value), by which its validation
        # values would be multiplied by ~1e6
        std = torch.where(std > 1e-5 * mean.abs().clamp_min(1e-2), std + 1e-6, torch.ones_like(std))
        tx, vx = (train_x - mean) / std, (val_x - mean) / std
        n, d = tx.shape
        xd = tx.double()
        if d <= n:  # the eigenvectors of the covariance x^T x / n, in float64
            lam, V = _eigh_kept(xd.T @ xd / n, rel_eps)
            self.basis, self.lam = V.to(tx.dtype), lam.to(tx.dtype)  # (d, r), (r,)
            self.train, self.val = tx @ self.basis, vx @ self.basis  # (n, r), (m, r)
            return
        # wider than long: through the n x n Gram matrix, where the training coordinates are its scaled
        # eigenvectors, so neither they nor the validation ones need the (d, r) basis
        lam, U = _eigh_kept(xd @ xd.T / n, rel_eps)
        scale = (n * lam).sqrt()
        w = (U / scale).to(tx.dtype)  # (n, r): the basis is tx^T w
        self.lam, self.train, self.val = lam.to(tx.dtype), (U * scale).to(tx.dtype), (vx @ tx.T) @ w
        self.basis = tx.T @ w if basis else None  # (d, r), only for fit()

    def fit(self, y: torch.Tensor, l2: float, max_iter: int = MAX_ITER) -> tuple[torch.Tensor, torch.Tensor]:
        """Weights (C, d) on the standardised features and bias (C,), fitted on the whole training split."""
        if self.basis is None:
            raise ValueError("fit() maps weights back through the basis: make the ProbeSpace with basis=True")
        y = y.to(self.train.device)
        B, b, _, _ = _fit(self.train[None], y[None], [int(y.max()) + 1], [l2], self.lam[None], max_iter)
        return B[0, 0] @ self.basis.T, b[0, 0]

    def probe(self, train_y: torch.Tensor, val_y: torch.Tensor, **kwargs) -> dict:
        """Top-1 on validation, l2 chosen on a held-out part of the training split, then refit on all of it."""
        return self.probe_families({"y": (train_y, val_y)}, **kwargs)["y"]

    def probe_families(self, labels: dict[str, tuple[torch.Tensor, torch.Tensor]], **kwargs) -> dict[str, dict]:
        """probe() for several label families {family: (train_y, val_y)} at once (see probe_spaces)."""
        return probe_spaces([self], labels, **kwargs)[0]


def holdout_split(n: int, holdout: float, seed: int = 0, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the held-out rows (a `holdout` fraction of n, at least one) and of the rest, drawn by
    `seed`: every probe of a seed holds out the same training clips."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(device)
    n_hold = max(1, int(n * holdout))
    return order[:n_hold], order[n_hold:]


def class_labels(y: torch.Tensor, what: str) -> torch.Tensor:
    """Labels as int64 class indices (numpy and `.int()` give int32), or a ConfigError naming `what`."""
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise ConfigError(f"{what}: labels of dtype {y.dtype}, expected integer class indices")
    if len(y) and int(y.min()) < 0:
        raise ConfigError(f"{what}: label {int(y.min())}, expected class indices from 0")
    return y.long()


def dense_classes(train_y: torch.Tensor, val_y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Class ids renumbered 0..C-1 over both splits (ids such as 7, 107, 207 need not make 208 classes), and C."""
    classes, dense = torch.unique(torch.cat([train_y, val_y]), return_inverse=True)
    return dense[:len(train_y)], dense[len(train_y):], len(classes)


def probe_spaces(spaces: list[ProbeSpace], labels: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 l2_grid=(1e-1, 1e-2, 1e-3, 1e-4), holdout: float = 0.2, seed: int = 0,
                 max_iter: int = MAX_ITER) -> list[dict[str, dict]]:
    """The probes of several label families {family: (train_y, val_y)} on several layers' spaces (the
    same clips): every (layer, family, l2) fit on the training rows in one solve, each (layer, family)'s
    l2 chosen on the held-out rows (ties: the stronger), then refit at its l2 on all training rows in a
    second solve; every problem stops at its own convergence (_fit), and a warning counts those that
    reached max_iter first. Per space: {family: {"acc", "l2", "holdout_acc", "iterations" (the refit's)}}."""
    n, m = len(spaces[0].train), len(spaces[0].val)
    dev = spaces[0].train.device
    counts = {}
    labels = {fam: tuple(class_labels(y, f"{fam} ({split})") for y, split in zip(ys, ("train", "validation")))
              for fam, ys in labels.items()}
    for fam, (train_y, val_y) in labels.items():
        if n != len(train_y) or m != len(val_y):
            raise ConfigError(f"features and labels{'' if fam == 'y' else f' of {fam}'} differ in length: "
                              f"train {n} vs {len(train_y)}, validation {m} vs {len(val_y)}")
        train_y, val_y, counts[fam] = dense_classes(train_y, val_y)
        labels[fam] = train_y, val_y
        need = math.ceil(2 * counts[fam] / (1 - holdout) - 1e-9)  # the rounding of 2 * 8 / 0.8 aside
        if len(train_y) < need:
            raise ConfigError(f"{len(train_y)} training samples are fewer than the probe needs for {counts[fam]} "
                              f"classes (at least {need}: two per class to fit, plus a {holdout:.0%} held-out "
                              "part to choose l2)")
    if any(len(s.train) != n or len(s.val) != m for s in spaces):
        raise ConfigError(f"the layers' features differ in length: train {[len(s.train) for s in spaces]}, "
                          f"validation {[len(s.val) for s in spaces]}")
    r = max(s.train.shape[1] for s in spaces)  # each layer zero-padded to the widest basis
    tz = torch.stack([F.pad(s.train, (0, r - s.train.shape[1])) for s in spaces])  # (G, n, r)
    vz = torch.stack([F.pad(s.val, (0, r - s.val.shape[1])) for s in spaces])  # (G, m, r)
    lam = torch.stack([F.pad(s.lam, (0, r - s.lam.shape[0])) for s in spaces])  # (G, r)
    fams, grid = list(labels), sorted(l2_grid, reverse=True)
    train_y = torch.stack([labels[f][0] for f in fams]).to(dev)  # (F, n)
    val_y = torch.stack([labels[f][1] for f in fams]).to(dev)  # (F, m)
    hold, rows = holdout_split(n, holdout, seed, dev)
    # problem j = (family j // len(grid), l2 grid[j % len(grid)])
    ys = train_y.repeat_interleave(len(grid), 0)  # (F * G, n)
    B, b, _, held_capped = _fit(tz[:, rows], ys[:, rows], [counts[f] for f in fams for _ in grid], grid * len(fams),
                                lam, max_iter)
    scores = _accuracy(tz[:, hold], B, b, ys[:, hold]).view(len(spaces), len(fams), len(grid)).tolist()
    best = [[max(range(len(grid)), key=lambda i: (s[i], grid[i])) for s in layer] for layer in scores]  # (G, F)
    pick = torch.tensor([[f * len(grid) + i for f, i in enumerate(layer)] for layer in best], device=dev)  # (G, F)
    gi = torch.arange(len(spaces), device=dev)[:, None]
    B, b, iters, capped = _fit(tz, train_y, [counts[f] for f in fams], [[grid[i] for i in layer] for layer in best],
                               lam, max_iter, (B[gi, pick], b[gi, pick]))  # each (layer, family) at its own l2
    short = int(held_capped.sum() + capped.sum())
    if short:
        warnings.warn(f"{short} of {held_capped.numel() + capped.numel()} linear probe fits stopped at max_iter="
                      f"{max_iter} before their gradient fell below the tolerance: raise max_iter", stacklevel=2)
    acc, iters = _accuracy(vz, B, b, val_y).tolist(), iters.tolist()
    return [{f: {"acc": acc[g][j], "l2": grid[best[g][j]], "holdout_acc": scores[g][j][best[g][j]],
                 "iterations": iters[g][j]} for j, f in enumerate(fams)} for g in range(len(spaces))]


# what shapes probe_spaces' results: its defaults, the solver (per-problem L-BFGS since session 11) and the
# standardisation (features constant on the training clips unscaled, no longer divided by 1e-6); part of the key
# under which probe results are cached (evaluate.depthwise), so results of another protocol are never reused
PROTOCOL = {"solver": "lbfgs_each", "standardise": "constant features unscaled",
            **{k: p.default for k, p in inspect.signature(probe_spaces).parameters.items()
               if k in ("l2_grid", "holdout", "max_iter")}}


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                 **kwargs) -> dict:
    """Top-1 on validation of a logistic regression on standardised features (see ProbeSpace.probe)."""
    return ProbeSpace(train_x, val_x).probe(train_y, val_y, **kwargs)


@torch.no_grad()
def nearest(train_x: torch.Tensor, val_x: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """Indices (m, k) of each validation clip's k nearest training clips by cosine similarity, nearest
    first: the part of retrieval that no label enters, so one call serves every label family."""
    if len(train_x) < k:
        raise ConfigError(f"a gallery of {len(train_x)} clips is smaller than R@{k} needs")
    if train_x.shape[1:] != val_x.shape[1:]:
        raise ConfigError(f"features of different widths: gallery (train) {tuple(train_x.shape)}, queries "
                          f"(validation) {tuple(val_x.shape)}")
    finite_features(train_x, "gallery (training) features")
    finite_features(val_x, "query (validation) features")
    gallery = F.normalize(train_x.float(), dim=1)
    return torch.cat([(q @ gallery.T).topk(k, dim=1).indices for q in F.normalize(val_x.float(), dim=1).split(chunk)])


def recall_at(top: torch.Tensor, train_y: torch.Tensor, val_y: torch.Tensor, ks=(1, 5, 10, 20, 50)) -> dict[str, float]:
    """R@k from nearest()'s indices top (m, >= max(ks)): a hit at k when any of a query's k nearest shares its label."""
    if len(val_y) != len(top):
        raise ConfigError(f"{len(top)} queries but {len(val_y)} validation labels")
    hits = train_y[top] == val_y[:, None]  # (m, kmax)
    recall = torch.stack([hits[:, :k].any(1).float().mean() for k in ks]).tolist()  # one host sync, not one per k
    return {f"R@{k}": r for k, r in zip(ks, recall)}


def retrieval(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
              ks=(1, 5, 10, 20, 50), chunk: int = 1024) -> dict[str, float]:
    """VCOP / CoCLR protocol: every validation clip queries the training gallery by cosine
    similarity; a hit at k when any of its k nearest shares its label. No clip is dropped."""
    if len(train_x) != len(train_y) or len(val_x) != len(val_y):
        raise ConfigError(f"features and labels differ in length: train {len(train_x)} vs {len(train_y)}, "
                          f"validation {len(val_x)} vs {len(val_y)}")
    return recall_at(nearest(train_x, val_x, max(ks), chunk), train_y, val_y, ks)
