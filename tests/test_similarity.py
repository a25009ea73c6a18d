import itertools
import math

import pytest
import torch

from bwssl_core.similarity import (MinibatchCKA, consecutive_cka, effective_rank, hsic_unbiased,
                                   knn_overlap, linear_cka, minibatch_cka, relative_change)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def orthogonal(d, seed=0):
    return torch.linalg.qr(randn(d, d, seed=seed)).Q


def hsic_u_statistic(K, L):
    """Reference: the unbiased HSIC as the U-statistic over ordered distinct (i, j, q, r) of
    k_ij l_ij + k_ij l_qr - 2 k_ij l_iq (Song et al. 2012, eq. 5), by explicit summation."""
    n = len(K)
    t = torch.tensor(list(itertools.permutations(range(n), 4)))  # (n)_4 rows of distinct indices
    i, j, q, r = t.unbind(1)
    h = K[i, j] * L[i, j] + K[i, j] * L[q, r] - 2 * K[i, j] * L[i, q]
    return h.sum() / len(t)


def cka_reference(x, y, debiased):
    """Reference CKA from uncentred linear Grams: the U-statistic HSIC, or the centred-Gram form."""
    K, L = x @ x.T, y @ y.T
    if debiased:
        return hsic_u_statistic(K, L) / (hsic_u_statistic(K, K) * hsic_u_statistic(L, L)).sqrt()
    H = torch.eye(len(x), dtype=x.dtype) - 1 / len(x)
    Kc, Lc = H @ K @ H, H @ L @ H
    return (Kc * Lc).sum() / (Kc.norm() * Lc.norm())


@pytest.mark.parametrize("debiased", [True, False])
def test_cka_of_itself_is_one(debiased):
    x = randn(40, 16)
    assert linear_cka(x, x, debiased) == pytest.approx(1, abs=1e-6)
    assert linear_cka(x.float(), x.float(), debiased) == pytest.approx(1, abs=1e-6)


@pytest.mark.parametrize("debiased", [True, False])
def test_cka_invariances(debiased):
    x, y = randn(50, 12, seed=1), randn(50, 20, seed=2)
    y = y + x @ randn(12, 20, seed=3)  # related, so CKA is well away from 0
    base = linear_cka(x, y, debiased)
    assert 0.2 < base < 0.99
    assert linear_cka(x @ orthogonal(12), y, debiased) == pytest.approx(base, abs=1e-10)
    assert linear_cka(x, y @ orthogonal(20, seed=4), debiased) == pytest.approx(base, abs=1e-10)
    assert linear_cka(3.7 * x, 0.01 * y, debiased) == pytest.approx(base, abs=1e-10)
    assert linear_cka(x + 5.0, y - 2.0, debiased) == pytest.approx(base, abs=1e-10)  # feature offsets
    # not invariant to a non-isotropic scaling: the measure is not trivially constant
    stretch = torch.linspace(0.05, 20, 12, dtype=torch.float64)
    assert abs(linear_cka(x * stretch, y, debiased) - base) > 0.01


@pytest.mark.parametrize("debiased", [True, False])
def test_cka_matches_independent_reference(debiased):
    x, y = randn(9, 5, seed=5), randn(9, 7, seed=6) + 0.5
    y[:, :3] += x[:, :3]
    assert linear_cka(x, y, debiased) == pytest.approx(cka_reference(x, y, debiased).item(), abs=1e-8)


def test_hsic_unbiased_matches_u_statistic_and_not_the_broadcast_bug():
    x, y = randn(8, 4, seed=7) + 1.0, randn(8, 6, seed=8)
    K, L = x @ x.T, y @ y.T
    got = hsic_unbiased(K, L)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(hsic_u_statistic(K, L).item(), abs=1e-8)
    # the bug in the wild: subtracting the diagonal *vector* broadcasts over the columns
    n = len(K)
    Kb, Lb = K - torch.diag(K), L - torch.diag(L)
    wrong = ((Kb @ Lb).trace() + Kb.sum() * Lb.sum() / ((n - 1) * (n - 2))
             - 2 / (n - 2) * Kb.sum(0) @ Lb.sum(1)) / (n * (n - 3))
    assert abs(got.item() - wrong.item()) > 1e-3 * abs(got.item())


def test_biased_cka_inflated_debiased_not_for_independent_wide_features():
    x, y = randn(64, 2000, seed=10), randn(64, 2000, seed=11)
    assert linear_cka(x, y, debiased=False) > 0.5
    assert abs(linear_cka(x, y, debiased=True)) < 0.1


def test_cka_errors():
    x = randn(10, 4)
    with pytest.raises(ValueError, match="same samples"):
        linear_cka(x, randn(11, 4))
    with pytest.raises(ValueError, match="at least 4"):
        linear_cka(x[:3], x[:3])
    assert linear_cka(x[:3], x[:3] * 2, debiased=False) == pytest.approx(1)  # biased: any N >= 2
    with pytest.raises(ValueError, match="constant.*zero variance"):
        linear_cka(x, torch.ones(10, 4))
    with pytest.raises(ValueError, match="constant.*zero variance"):
        linear_cka(torch.full((10, 3), 0.1), x, debiased=False)
    with pytest.raises(ValueError, match="NaN or infinite"):
        linear_cka(x, torch.where(x > 1, float("nan"), x))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        linear_cka(x[None], x[None])
    with pytest.raises(ValueError, match="at least 4"):
        hsic_unbiased(torch.eye(3), torch.eye(3))
    with pytest.raises(ValueError, match="square"):
        hsic_unbiased(torch.eye(5), torch.eye(6))
    # all samples but one equal: the U-centred Gram is exactly 0, so CKA is 0 / 0, whatever round-off leaves
    outlier = torch.ones(100, 5, dtype=torch.float64)
    outlier[-1] *= 3.7
    with pytest.raises(ValueError, match="HSIC\\(K, K\\) of the first features"):
        linear_cka(outlier, randn(100, 7))
    mb = MinibatchCKA()
    mb.update([outlier[50:], randn(50, 4)])
    with pytest.raises(ValueError, match=r"index \[0\]"):
        mb.compute()


def batches_of(feats, size):
    """Per-layer (N, D) features -> list of per-batch lists of per-layer (size, D)."""
    return list(zip(*[f.split(size) for f in feats]))


def correlated_layers(n, seed=0):
    x = randn(n, 16, seed=seed)
    return [x, x @ randn(16, 24, seed=seed + 1) + randn(n, 24, seed=seed + 2), randn(n, 8, seed=seed + 3)]


def test_minibatch_cka_within_model_has_unit_diagonal():
    mb = MinibatchCKA()
    for batch in batches_of(correlated_layers(96), 32):
        mb.update(list(batch))
    m = mb.compute()
    assert m.shape == (3, 3) and m.dtype == torch.float64
    assert torch.allclose(m.diagonal(), torch.ones(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(m, m.T, atol=1e-12)
    assert m[0, 1] > 0.3 and abs(m[0, 2]) < 0.2


def test_minibatch_cka_equals_hand_accumulation():
    a, b = correlated_layers(60), [randn(60, 5, seed=20), randn(60, 10, seed=21)]
    mb = MinibatchCKA()
    kl = kk = ll = 0
    for fa, fb in zip(batches_of(a, 12), batches_of(b, 12)):
        mb.update(list(fa), list(fb))
        K, L = fa[1] @ fa[1].T, fb[0] @ fb[0].T  # uncentred: the unbiased HSIC ignores offsets
        kl, kk, ll = kl + hsic_unbiased(K, L), kk + hsic_unbiased(K, K), ll + hsic_unbiased(L, L)
    m = mb.compute()
    assert m.shape == (3, 2) and mb.batches == 5
    assert m[1, 0].item() == pytest.approx((kl / (kk * ll).sqrt()).item(), abs=1e-10)


def test_minibatch_cka_close_to_full_batch():
    a = correlated_layers(1024, seed=30)
    mb = MinibatchCKA()
    for batch in batches_of(a, 128):
        mb.update(list(batch))
    full = linear_cka(a[0], a[1])
    assert 0.3 < full < 0.95
    assert mb.compute()[0, 1].item() == pytest.approx(full, abs=0.05)


def test_minibatch_cka_of_samples_sorted_by_class_batches_them_at_random():
    """UCF101's list files are sorted by class: batches taken in that order would each hold one class, and CKA
    over them measures similarity within a class. minibatch_cka batches in a seeded random order."""
    classes = torch.arange(8).repeat_interleave(50)  # 400 samples, sorted by class
    a = randn(8, 16, seed=1)[classes] + 0.5 * randn(400, 16, seed=2)
    b = randn(8, 12, seed=3)[classes] + 0.5 * randn(400, 12, seed=4)
    full = linear_cka(a, b)
    in_order = MinibatchCKA()
    for i in range(0, 400, 50):
        in_order.update([a[i:i + 50]], [b[i:i + 50]])
    assert full > 0.5 and in_order.compute().item() < 0.2  # the trap: one class per batch
    shuffled = minibatch_cka([a], [b], batch_size=50, seed=0)
    assert shuffled.shape == (1, 1) and shuffled.item() == pytest.approx(full, abs=0.05)
    assert minibatch_cka([a], [b], batch_size=50, seed=1).item() != shuffled.item()  # the seed draws the order
    assert minibatch_cka([a, b], batch_size=50)[0, 1].item() == pytest.approx(shuffled.item(), abs=1e-12)
    with pytest.raises(ValueError, match="fewer than one CKA batch of 500"):
        minibatch_cka([a], batch_size=500)


def test_minibatch_cka_errors():
    mb = MinibatchCKA()
    with pytest.raises(ValueError, match="no batches"):
        mb.compute()
    a = correlated_layers(40)
    batches = batches_of(a, 16)  # 16, 16, 8
    mb.update(list(batches[0]))
    with pytest.raises(ValueError, match="short.*drop"):
        mb.update(list(batches[2]))
    with pytest.raises(ValueError, match="layers"):
        mb.update(list(batches[1])[:2])
    with pytest.raises(ValueError, match="at least 4"):
        MinibatchCKA().update([randn(3, 4)])
    const = MinibatchCKA()
    const.update([randn(8, 4), torch.ones(8, 4)])
    with pytest.raises(ValueError, match=r"index \[1\].*zero variance"):
        const.compute()


def test_relative_change():
    x = randn(20, 6)
    assert relative_change([x, x, 2 * x]) == pytest.approx([0.0, 1.0])
    y = randn(20, 6, seed=1)
    assert relative_change([x, y])[0] == pytest.approx(((y - x).norm() / x.norm()).item())
    with pytest.raises(ValueError, match="all zeros"):
        relative_change([torch.zeros(20, 6), x])
    with pytest.raises(ValueError, match="same shape"):
        relative_change([x, x[:, :5]])
    with pytest.raises(ValueError, match="at least two"):
        relative_change([x])


def test_consecutive_cka():
    a = correlated_layers(50)
    got = consecutive_cka([a[0], a[0] @ orthogonal(16), a[1]])
    assert got[0] == pytest.approx(1, abs=1e-10)
    assert got[1] == pytest.approx(linear_cka(a[0], a[1]))
    with pytest.raises(ValueError, match="same samples"):
        consecutive_cka([a[0], a[1][:40]])


def on_circle(degrees):
    """Unit 2-D vectors (N, 2) at the given angles."""
    rad = torch.tensor(degrees, dtype=torch.float64).deg2rad()
    return torch.stack([rad.cos(), rad.sin()], 1)


def test_knn_overlap():
    x = randn(200, 12)
    rotated = 3.0 * x @ orthogonal(12, seed=1)
    assert knn_overlap([x, x, rotated], k=10) == pytest.approx([1.0, 1.0])
    unrelated = knn_overlap([x, randn(200, 12, seed=2)], k=10)[0]
    assert unrelated < 0.2  # chance is k / (N - 1) = 0.05
    partial = knn_overlap([x, x + 0.3 * randn(200, 12, seed=3)], k=10)[0]
    assert unrelated < partial < 1
    # by hand, k = 1: angles (degrees) pair the samples as (0 1) (2 3) (4 5), then (0 2) (1 3) (4 5)
    a, b = on_circle([0., 10, 100, 110, 200, 210]), on_circle([0., 100, 10, 110, 200, 210])
    assert knn_overlap([a, b], k=1) == pytest.approx([2 / 6])  # only samples 4 and 5 keep theirs
    # by angle, not by dot product: sample 2 is long and would be everyone's nearest by dot product
    a = torch.tensor([[1.0, 0.0], [0.9, 0.1], [5.0, 5.0], [0.0, 1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 0.0], [0.99, 0.05], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    assert knn_overlap([a, b], k=1) == pytest.approx([1.0])
    with pytest.raises(ValueError, match="1 <= k <= 199"):
        knn_overlap([x, x], k=200)
    with pytest.raises(ValueError, match="all-zero"):
        knn_overlap([torch.zeros(200, 12), x])


def test_effective_rank():
    n, d, r = 100, 30, 5
    u = randn(n, r)
    u = torch.linalg.qr(u - u.mean(0)).Q  # orthonormal columns orthogonal to 1: centring keeps them
    v = torch.linalg.qr(randn(d, r, seed=1)).Q
    assert effective_rank(7.0 * u @ v.T) == pytest.approx(r, abs=1e-4)
    two = u[:, :2] @ torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64)) @ v[:, :2].T
    assert effective_rank(two) == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))
    offset = 50 * randn(1, d, seed=6)
    assert effective_rank(two + offset) == pytest.approx(effective_rank(two))  # the mean is removed
    dominant = 100 * randn(n, 1, seed=2) @ randn(1, d, seed=3) + 0.01 * randn(n, d, seed=4)
    assert 1 <= effective_rank(dominant) < 1.1
    assert effective_rank(randn(n, d, seed=5)) > 0.8 * d  # isotropic: near full rank
    with pytest.raises(ValueError, match="constant"):
        effective_rank(torch.ones(10, 3))


@pytest.mark.parametrize("depth", [3, 1])
def test_analyze_token_change_over_batches_and_a_one_layer_encoder(tiny, depth):
    """The token-level change is accumulated over batches exactly as over all clips at once; a one-layer
    encoder has no consecutive pair: pooled_layers gives no change, analyze says why it cannot compare."""
    from bwssl_core.analyze import analyze, pooled_layers
    from bwssl_core.batches import normalize_video
    from bwssl_core.config import ConfigError
    from bwssl_core.model import VideoMAE

    model = VideoMAE(tiny(depth=depth, partition=(depth,))).eval()
    clips = torch.randint(0, 256, (8, 3, 4, 32, 32), dtype=torch.uint8)
    pooled, change = pooled_layers(model, clips, 5, "cpu")  # batches of 5 and 3
    with torch.no_grad():
        feats = [f.double() for f in model.forward_intermediates(normalize_video(clips))]
    expected = [float(((b - a).norm() / a.norm())) for a, b in zip(feats, feats[1:])]
    assert len(pooled) == depth and change == pytest.approx(expected, rel=1e-6)
    if depth == 1:
        with pytest.raises(ConfigError, match="a 1-layer encoder: the analysis compares consecutive layers"):
            analyze(model, clips, batch_size=4, attention_clips=0, knn=2)
    else:
        for bad in (0, 3):  # a ZeroDivisionError and an HSIC error deep inside before
            with pytest.raises(ConfigError, match=f"batch_size={bad}: expected an integer >= 4"):
                analyze(model, clips, batch_size=bad, attention_clips=0, knn=2)
        out = analyze(model, clips, batch_size=4, attention_clips=0, knn=2)
        assert out["token_relative_change"] == pytest.approx(expected, rel=1e-6) and len(out["knn_overlap"]) == 2
