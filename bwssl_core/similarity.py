"""Representational similarity between layers and models, and representational change with depth.

  linear_cka:      linear CKA of two feature matrices of the same samples, debiased (unbiased HSIC,
                   Song et al. 2012; Nguyen, Raghu & Kornblith 2021) or the classic biased form
  MinibatchCKA:    CKA of every pair of layers, HSIC sums accumulated over fixed-size minibatches
  relative_change, consecutive_cka, knn_overlap: how much each layer changes the previous one
  effective_rank:  exp(entropy of the normalised singular values) (Roy & Vetterli 2007)

Features are per-sample vectors, e.g. the `mean` pooling of `probe.layer_features`. Everything is
computed in float64; CKA uses Gram matrices (N, N), so N up to a few thousand samples is fine.
"""
from __future__ import annotations

import math

import torch

MIN_SAMPLES = 4  # the unbiased HSIC divides by n (n - 3) and (n - 1) (n - 2)


def _features(x: torch.Tensor, name: str) -> torch.Tensor:
    """x: (N, D) -> float64 (N, D), after checking the shape and that every value is finite."""
    if x.ndim != 2:
        raise ValueError(f"{name}: expected features (N, D), got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} has NaN or infinite values: expected finite features")
    return x.detach().to(torch.float64)


def _check_varies(x: torch.Tensor, name: str) -> None:
    """x: (N, D). Raise if every sample has the same features (zero variance)."""
    if (x == x[:1]).all():
        raise ValueError(f"{name} is constant over its {len(x)} samples (zero variance): "
                         "the similarity is undefined; expected features that vary across samples")


def _gram(x: torch.Tensor) -> torch.Tensor:
    """x: (N, D) -> the linear Gram matrix of the centred features (N, N). Centring changes
    neither form of CKA and avoids cancellation when the features have a large mean."""
    x = x - x.mean(0)
    return x @ x.T


def _zero_diag(K: torch.Tensor) -> torch.Tensor:
    """K: (..., n, n) -> K with a zero diagonal (the matrix K~ of the unbiased HSIC)."""
    return K - torch.diag_embed(K.diagonal(dim1=-2, dim2=-1))


def _hsic_cross(Ks: torch.Tensor, Ls: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC of every pair: Ks (A, n, n), Ls (B, n, n) Gram matrices -> (A, B)."""
    n = Ks.shape[-1]
    K, L = _zero_diag(Ks), _zero_diag(Ls)
    trace = torch.einsum("aij,bji->ab", K, L)  # tr(K~ L~)
    sums = K.sum((1, 2))[:, None] * L.sum((1, 2))[None] / ((n - 1) * (n - 2))  # 1'K~1 1'L~1 / ((n-1)(n-2))
    cross = K.sum(1) @ L.sum(2).T  # 1'K~ L~1
    return (trace + sums - 2 / (n - 2) * cross) / (n * (n - 3))


def _check_samples(n: int, what: str) -> None:
    if n < MIN_SAMPLES:
        raise ValueError(f"{what}: {n} samples, expected at least {MIN_SAMPLES} for the unbiased HSIC")


def hsic_unbiased(K: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """The unbiased HSIC estimator (Song et al. 2012) of two Gram matrices K, L: (n, n), n >= 4.
    Returns a float64 scalar tensor."""
    if K.ndim != 2 or K.shape[0] != K.shape[1] or K.shape != L.shape:
        raise ValueError(f"expected two square Gram matrices (n, n) of the same n, got "
                         f"{tuple(K.shape)} and {tuple(L.shape)}")
    _check_samples(K.shape[0], "hsic_unbiased")
    K, L = _features(K, "K"), _features(L, "L")
    return _hsic_cross(K[None], L[None])[0, 0]


REL_TOL = 1e-10  # HSIC(K, K) below this share of ||K||_F^2 / (n (n - 3)) is round-off of an exact zero


def _scale(grams: torch.Tensor) -> torch.Tensor:
    """(A, n, n) centred Grams -> (A,) ||K||_F^2 / (n (n - 3)): the size HSIC(K, K) is measured against."""
    n = grams.shape[-1]
    return grams.pow(2).sum((1, 2)) / (n * (n - 3))


def _normalise(kl: torch.Tensor, kk: torch.Tensor, ll: torch.Tensor, what: str,
               kk_scale: torch.Tensor | None = None, ll_scale: torch.Tensor | None = None) -> torch.Tensor:
    """CKA = HSIC(K,L) / sqrt(HSIC(K,K) HSIC(L,L)) from (A, B), (A,) and (B,) HSIC values; raises
    rather than returning NaN, infinity or a ratio of round-off when a self-similarity is not
    positive (or, given the Grams' scales, is zero up to round-off: e.g. all samples but one equal,
    where the unbiased HSIC(K, K) is exactly 0)."""
    for name, self_hsic, scale in (("first", kk, kk_scale), ("second", ll, ll_scale)):
        floor = 0 if scale is None else REL_TOL * scale
        bad = (self_hsic <= floor).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"{what}: HSIC(K, K) of the {name} features (index {bad}) is "
                             f"{self_hsic[bad[0]].item():.3g}, expected > 0: the features have (near) "
                             "zero variance or too few samples for the estimator")
    return kl / (kk[:, None] * ll[None]).sqrt()


def linear_cka(x: torch.Tensor, y: torch.Tensor, debiased: bool = True) -> float:
    """Linear CKA of x: (N, D1) and y: (N, D2), features of the same N samples: HSIC(K, L) /
    sqrt(HSIC(K, K) HSIC(L, L)) with K = x x', L = y y'. debiased: the unbiased HSIC (N >= 4),
    else the classic biased form with centred Gram matrices."""
    x, y = _features(x, "x"), _features(y, "y")
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} samples and y {len(y)}: expected the same samples in both")
    if debiased:
        _check_samples(len(x), "linear_cka")
    _check_varies(x, "x")
    _check_varies(y, "y")
    grams = torch.stack([_gram(x), _gram(y)])  # (2, N, N)
    # biased: the Grams are already centred (H K H = K); the 1 / (N - 1)^2 factor cancels
    hsic = _hsic_cross(grams, grams) if debiased else torch.einsum("aij,bij->ab", grams, grams)
    scale = _scale(grams) if debiased else None
    return _normalise(hsic[:1, 1:], hsic[:1, 0], hsic[1:, 1], "linear_cka",
                      None if scale is None else scale[:1], None if scale is None else scale[1:]).item()


class MinibatchCKA:
    """Minibatch CKA (Nguyen, Raghu & Kornblith 2021) of every layer of model A with every layer of
    model B: the unbiased HSIC(K, L), HSIC(K, K) and HSIC(L, L) are summed over minibatches, all of
    the same size, and normalised once in `compute`. A and B may be the same model."""

    def __init__(self):
        self.batch_size: int | None = None
        self.batches = 0
        self.hsic_ab = self.hsic_aa = self.hsic_bb = None  # (LA, LB), (LA,), (LB,) float64 sums
        self.scale_a = self.scale_b = 0  # (LA,), (LB,) sums of _scale: how small HSIC(K, K) may be

    def _grams(self, feats: list[torch.Tensor], name: str) -> torch.Tensor:
        """feats: per layer (B, D) (or (B, ...), flattened) -> centred Grams (layers, B, B)."""
        if not feats:
            raise ValueError(f"{name}: expected a non-empty list of per-layer features (B, D)")
        grams = []
        for i, f in enumerate(feats):
            f = _features(f.flatten(1), f"{name}[{i}]")
            if self.batch_size is None:
                _check_samples(len(f), f"{name}[{i}]")
                self.batch_size = len(f)
            if len(f) != self.batch_size:
                raise ValueError(
                    f"{name}[{i}]: batch of {len(f)} samples, expected {self.batch_size} like the first: "
                    "minibatch CKA weights every batch's HSIC equally, so a short (last) batch would be "
                    "mis-weighted; drop it (drop_last=True) or pad every run the same way")
            grams.append(_gram(f))
        return torch.stack(grams)

    def update(self, feats_a: list[torch.Tensor], feats_b: list[torch.Tensor] | None = None) -> None:
        """Add one minibatch: feats_a per layer of A (B, D); feats_b per layer of B (B, D), the
        same B samples, or None to compare A with itself."""
        Ka = self._grams(feats_a, "feats_a")
        Kb = Ka if feats_b is None else self._grams(feats_b, "feats_b")
        hsic_ab = _hsic_cross(Ka, Kb)
        hsic_aa = hsic_ab.diagonal() if feats_b is None else _hsic_cross(Ka, Ka).diagonal()
        hsic_bb = hsic_ab.diagonal() if feats_b is None else _hsic_cross(Kb, Kb).diagonal()
        if self.hsic_ab is None:
            self.hsic_ab, self.hsic_aa, self.hsic_bb = hsic_ab, hsic_aa.clone(), hsic_bb.clone()
        elif hsic_ab.shape != self.hsic_ab.shape:
            raise ValueError(f"{tuple(hsic_ab.shape)} layers (A, B) in this batch, expected "
                             f"{tuple(self.hsic_ab.shape)} as in the first")
        else:
            self.hsic_ab += hsic_ab
            self.hsic_aa += hsic_aa
            self.hsic_bb += hsic_bb
        self.scale_a = self.scale_a + _scale(Ka)
        self.scale_b = self.scale_b + _scale(Kb)
        self.batches += 1

    def compute(self) -> torch.Tensor:
        """The CKA matrix (LA, LB), float64."""
        if self.hsic_ab is None:
            raise ValueError("MinibatchCKA.compute: no batches yet, expected at least one update()")
        return _normalise(self.hsic_ab, self.hsic_aa, self.hsic_bb, "MinibatchCKA", self.scale_a, self.scale_b)


def minibatch_cka(feats_a: list[torch.Tensor], feats_b: list[torch.Tensor] | None = None, batch_size: int = 50,
                  seed: int = 0) -> torch.Tensor:
    """MinibatchCKA of per-layer features [(N, D)] over fixed batches of `batch_size` samples, drawn in one
    seeded random order (the same for A and B): the estimator takes each batch for a random sample, and
    samples in list-file order (UCF101's and HMDB51's lists are sorted by class) would give the similarity
    within a class. A short last batch is left out. Returns the CKA matrix (LA, LB), float64."""
    n = len(feats_a[0])
    if n < batch_size:
        raise ValueError(f"{n} samples, fewer than one CKA batch of {batch_size}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:n // batch_size * batch_size]
    mb = MinibatchCKA()
    for idx in order.split(batch_size):
        mb.update([f[idx] for f in feats_a], None if feats_b is None else [f[idx] for f in feats_b])
    return mb.compute()


def _layers(feats: list[torch.Tensor]) -> list[torch.Tensor]:
    """feats: per layer (N, D_l), at least two layers, the same N -> float64 list."""
    if len(feats) < 2:
        raise ValueError(f"{len(feats)} layers: expected at least two to compare consecutive layers")
    out = [_features(f, f"feats[{i}]") for i, f in enumerate(feats)]
    sizes = [len(f) for f in out]
    if len(set(sizes)) > 1:
        raise ValueError(f"layers have {sizes} samples: expected the same samples in every layer")
    return out


def relative_change(feats: list[torch.Tensor]) -> list[float]:
    """feats: per layer (N, D) -> ||x_{l+1} - x_l||_F / ||x_l||_F for each consecutive pair."""
    feats, out = _layers(feats), []
    for i, (a, b) in enumerate(zip(feats, feats[1:])):
        if a.shape != b.shape:
            raise ValueError(f"layers {i} and {i + 1} have shapes {tuple(a.shape)} and {tuple(b.shape)}: "
                             "expected the same shape")
        norm = a.norm()
        if norm == 0:
            raise ValueError(f"layer {i} is all zeros: expected a nonzero norm to divide by")
        out.append(((b - a).norm() / norm).item())
    return out


def consecutive_cka(feats: list[torch.Tensor], debiased: bool = True) -> list[float]:
    """feats: per layer (N, D_l) -> linear_cka(x_l, x_{l+1}) for each consecutive pair."""
    feats = _layers(feats)
    return [linear_cka(a, b, debiased) for a, b in zip(feats, feats[1:])]


def _neighbours(x: torch.Tensor, k: int, name: str) -> torch.Tensor:
    """x: (N, D) -> (N, N) bool, row i marking the k nearest samples to i by cosine similarity,
    i itself excluded."""
    norms = x.norm(dim=1, keepdim=True)
    if (norms == 0).any():
        raise ValueError(f"{name} has all-zero samples: cosine similarity needs nonzero features")
    xn = x / norms
    sim = (xn @ xn.T).fill_diagonal_(-math.inf)
    idx = sim.topk(k, dim=1).indices
    return torch.zeros_like(sim, dtype=torch.bool).scatter_(1, idx, True)


def knn_overlap(feats: list[torch.Tensor], k: int = 10) -> list[float]:
    """feats: per layer (N, D_l) -> for each consecutive pair, the mean over samples of
    |kNN_l(i) & kNN_{l+1}(i)| / k, neighbours by cosine similarity (1: local geometry kept)."""
    feats = _layers(feats)
    n = len(feats[0])
    if not 1 <= k <= n - 1:
        raise ValueError(f"k = {k} with {n} samples: expected 1 <= k <= {n - 1}")
    nbrs = [_neighbours(f, k, f"feats[{i}]") for i, f in enumerate(feats)]
    return [((a & b).sum(1).double().mean() / k).item() for a, b in zip(nbrs, nbrs[1:])]


def effective_rank(x: torch.Tensor) -> float:
    """x: (N, D) -> exp(entropy of the normalised singular values of the centred features), between
    1 and min(N, D) (Roy & Vetterli 2007)."""
    x = _features(x, "x")
    _check_varies(x, "x")
    s = torch.linalg.svdvals(x - x.mean(0))
    p = s / s.sum()
    p = p[p > 0]
    return math.exp(-(p * p.log()).sum().item())
