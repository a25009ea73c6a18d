import pytest
import torch

from bwssl_core.attentive import attentive_probe
from bwssl_core.probe import linear_probe


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
