import pytest
import torch

from bwssl_core.attentive import attentive_probe, token_home
from bwssl_core.probe import holdout_split, linear_probe


def marker_tokens(n, g, L=16, D=8, slots=(1, 6, 9, 14)):
    """Noise tokens (n, L, D) with one marker token (+3 on feature 0) at one of `slots`; the label is
    which slot. Pooling over tokens erases where the marker is."""
    x = torch.randn(n, L, D, generator=g)
    y = torch.randint(0, len(slots), (n,), generator=g)
    x[torch.arange(n), torch.tensor(slots)[y], 0] += 3.0
    return x, y


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_attentive_probe_reads_where_mean_pooling_cannot(precision):
    """In float32, and in bfloat16 (tokens stored so, matmuls under autocast) as on a GPU or a CPU
    with native bf16."""
    g = torch.Generator().manual_seed(0)
    (tx, ty), (vx, vy) = marker_tokens(800, g), marker_tokens(400, g)
    attentive = attentive_probe(tx, ty, vx, vy, precision=precision)["acc"]
    pooled = linear_probe(tx.mean(1), ty, vx.mean(1), vy)["acc"]
    assert attentive > 0.85, attentive
    assert pooled < 0.4, pooled  # chance is 0.25


def test_attentive_probe_refuses_bad_shapes():
    x, y = torch.randn(10, 4, 3), torch.arange(10) % 2
    with pytest.raises(ValueError, match=r"expected \(N, L, D\) for both splits"):
        attentive_probe(x, y, torch.randn(10, 5, 3), y)
    with pytest.raises(ValueError, match="tokens and labels differ in length: train 10 vs 9"):
        attentive_probe(x, y[:9], x, y)


@pytest.mark.parametrize("n,epochs", [(640, 1), (100, 1), (64, 1)])
def test_attentive_probe_runs_on_few_steps(n, epochs):
    """Few optimiser steps (10, 2, 1) train with a valid schedule: OneCycleLR failed at 10 steps."""
    g = torch.Generator().manual_seed(1)
    (tx, ty), (vx, vy) = marker_tokens(n, g), marker_tokens(50, g)
    res = attentive_probe(tx, ty, vx, vy, epochs=epochs)
    assert res["epochs"] == epochs and 0 <= res["acc"] <= 1


def noisy_markers(seed, n=200):
    """marker_tokens with 30% of the labels redrawn: the held-out score goes up and down over epochs."""
    g = torch.Generator().manual_seed(seed)
    x, y = marker_tokens(n, g)
    flip = torch.rand(n, generator=g) < 0.3
    return x, torch.where(flip, torch.randint(0, 4, (n,), generator=g), y)


def test_held_out_clips_never_train():
    """With holdout, the probe trains on the other rows only (the linear probe's split of the same seed)
    and scores the held-out ones after each epoch: its last score equals that of a probe trained on the
    other rows alone, validated on the held-out ones."""
    x, y = noisy_markers(1)
    hold, rows = holdout_split(len(x), 0.2, seed=3)
    kw = dict(epochs=6, seed=3, precision="fp32")
    with_holdout = attentive_probe(x, y, x[:50], y[:50], holdout=0.2, **kw)
    alone = attentive_probe(x[rows], y[rows], x[hold], y[hold], holdout=0, **kw)
    assert len(with_holdout["holdout_curve"]) == 6 and alone["holdout_curve"] == []
    assert with_holdout["holdout_curve"][-1] == alone["acc"]


def test_early_stopping_keeps_the_best_held_out_epoch():
    """The weights kept are those of the first epoch with the best held-out score, not the last epoch's:
    validated on the held-out clips themselves, the probe scores exactly that best."""
    x, y = noisy_markers(1)
    hold, _ = holdout_split(len(x), 0.2, seed=2)
    res = attentive_probe(x, y, x[hold], y[hold], epochs=30, seed=2, precision="fp32")
    curve = res["holdout_curve"]
    assert curve[-1] < max(curve)  # the case this test is about: the last epoch is not the best
    assert res["epoch"] == curve.index(max(curve)) + 1 and res["holdout_acc"] == max(curve)
    assert res["acc"] == max(curve)


def test_a_tie_keeps_the_earlier_epoch():
    """Two epochs tie for the best held-out score (epochs 17 and 18 here): the earlier one is kept."""
    x, y = marker_tokens(800, torch.Generator().manual_seed(1))
    res = attentive_probe(x, y, x[:20], y[:20], epochs=25, seed=2, precision="fp32")
    curve = res["holdout_curve"]
    assert curve.count(max(curve)) > 1  # the case this test is about
    assert res["epoch"] == curve.index(max(curve)) + 1


def test_attentive_probe_needs_a_row_to_hold_out():
    x, y = torch.randn(1, 4, 3), torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match="holdout=0.2 needs at least two"):
        attentive_probe(x, y, x, y)
    assert attentive_probe(x, y, x, y, holdout=0, epochs=1)["holdout_acc"] is None


def test_folded_layernorm_equals_the_plain_module():
    """AttentivePool.read (tokens normalised once, LayerNorm's affine folded into the query and the
    pooled mean) gives the logits and weights of LayerNorm -> scores -> softmax -> weighted mean."""
    import torch.nn.functional as F

    from bwssl_core.attentive import AttentivePool

    torch.manual_seed(0)
    pool = AttentivePool(16, 8, 5)
    for p in (pool.norm.weight, pool.norm.bias, pool.pos):
        torch.nn.init.normal_(p)
    x = torch.randn(3, 16, 8) * 3 + 1
    xn = pool.norm(x)
    w = ((xn @ pool.query.T).transpose(1, 2) / 8 ** 0.5 + pool.pos).softmax(-1)  # (B, heads, L)
    logits = pool.head((w @ xn).flatten(1))
    for out, weights in (pool(x, True), pool.read(F.layer_norm(x, (8,)), True)):
        torch.testing.assert_close(out, logits)
        torch.testing.assert_close(weights, w)


def test_tokens_move_to_a_gpu_only_where_they_fit(monkeypatch):
    """The probe keeps its normalised tokens on the GPU when they take under half its free memory, else
    where they are; on the CPU they stay. Decided from torch.cuda.mem_get_info, faked here (no GPU)."""
    tokens = (torch.zeros(10, 4, 8, dtype=torch.float16), torch.zeros(5, 4, 8, dtype=torch.float16))
    need = 15 * 4 * 8 * 2  # bytes in bfloat16
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * need + 2, 10 ** 12))
    assert token_home(tokens, torch.bfloat16, "cuda") == torch.device("cuda")
    assert token_home(tokens, torch.float32, "cuda") == torch.device("cpu")  # twice the bytes: no room
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * need, 10 ** 12))
    assert token_home(tokens, torch.bfloat16, "cuda:0") == torch.device("cpu")
    assert token_home(tokens, torch.bfloat16, "cpu") == torch.device("cpu")


def test_tokens_normalised_alike_in_any_chunk():
    """The normalised tokens do not depend on the chunking (by default a few MB per chunk on the CPU)."""
    import torch.nn.functional as F

    from bwssl_core.attentive import _normalised

    x = (torch.randn(7, 16, 24) * 3 + 2).half()
    ref = F.layer_norm(x.float(), (24,)).bfloat16()
    for chunk in (None, 1, 3, 100):
        assert torch.equal(_normalised(x, 1e-5, torch.bfloat16, chunk=chunk), ref)
