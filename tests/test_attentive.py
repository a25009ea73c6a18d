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


def test_attentive_probe_reads_where_mean_pooling_cannot():
    g = torch.Generator().manual_seed(0)
    (tx, ty), (vx, vy) = marker_tokens(800, g), marker_tokens(400, g)
    attentive = attentive_probe(tx, ty, vx, vy)["acc"]
    pooled = linear_probe(tx.mean(1), ty, vx.mean(1), vy)["acc"]
    assert attentive > 0.85, attentive
    assert pooled < 0.4, pooled  # chance is 0.25


def test_attentive_probe_refuses_bad_shapes():
    x, y = torch.randn(10, 4, 3), torch.arange(10) % 2
    with pytest.raises(ValueError, match=r"expected \(N, L, D\) for both splits"):
        attentive_probe(x, y, torch.randn(10, 5, 3), y)
    with pytest.raises(ValueError, match="tokens and labels differ in length: train 10 vs 9"):
        attentive_probe(x, y[:9], x, y)
