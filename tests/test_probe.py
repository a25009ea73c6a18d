import pytest
import torch

from bwssl_core.probe import linear_probe, pool_tokens, retrieval


def test_retrieval_by_hand():
    gallery = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])  # cosine order from (1, 0): 0, 1, 2, 3
    labels = torch.tensor([5, 6, 7, 6])
    queries = torch.tensor([[3.0, 0.0], [0.0, 2.0]])  # from (0, 1): 2, 1, 0/3
    r = retrieval(gallery, labels, queries, torch.tensor([6, 7]), ks=(1, 2, 3))
    # query 0 (label 6) first hits at rank 2; query 1 (label 7) at rank 1
    assert r == {"R@1": 0.5, "R@2": 1.0, "R@3": 1.0}
    with pytest.raises(ValueError, match="gallery of 4 clips is smaller than R@50"):
        retrieval(gallery, labels, queries, torch.tensor([6, 7]))


def test_linear_probe_reads_a_linear_label_and_not_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 20, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
    result = linear_probe(x[:400], y[:400], x[400:], y[400:])
    assert result["acc"] > 0.9
    noise = torch.randint(0, 4, (600,), generator=g)
    assert linear_probe(x[:400], noise[:400], x[400:], noise[400:])["acc"] < 0.4


def test_poolings_keep_when_and_where():
    x = torch.arange(16 * 6, dtype=torch.float).view(1, 16, 6)  # grid (2, 2, 4), D = 6
    assert pool_tokens(x, (2, 2, 4), "mean").shape == (1, 6)
    assert pool_tokens(x, (2, 2, 4), "slices").shape == (1, 12)
    grid = pool_tokens(x, (2, 2, 4), "grid")
    assert grid.shape == (1, 2 * 4 * 6)
    # first cell: t=0, top-left 1 x 2 tokens (ids 0, 1)
    torch.testing.assert_close(grid[0, :6], x[0, :2].mean(0))


def test_probe_refuses_too_few_samples_and_mismatched_lengths():
    x, y = torch.randn(10, 4), torch.arange(10) % 8
    with pytest.raises(ValueError, match="10 training samples are fewer than the probe needs for 8 classes"):
        linear_probe(x, y, x, y)
    with pytest.raises(ValueError, match="features and labels differ in length: train 10 vs 9"):
        linear_probe(x, y[:9], x, y)


def test_agrees_with_scikit_learn():
    """The L-BFGS probe and scikit-learn's LogisticRegression on the same standardised features and the
    same penalty (ours: mean CE + l2/2 |W|^2; theirs: C * sum CE + 1/2 |W|^2, so C = 1 / (l2 n))."""
    sklearn = pytest.importorskip("sklearn.linear_model")
    from bwssl_core.probe import _fit

    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 6, generator=g)
    x = torch.randn(1500, 64, generator=g)
    y = (x @ w + 4 * torch.randn(1500, 6, generator=g)).argmax(1)  # noisy: accuracy well below 1
    x = (x - x[:1000].mean(0)) / x[:1000].std(0)
    for l2 in (1e-3, 1e-1):
        ours = _fit(x[:1000].double(), y[:1000], 6, l2, max_iter=500)
        acc = (ours(x[1000:].double()).argmax(1) == y[1000:]).float().mean().item()
        ref = sklearn.LogisticRegression(C=1 / (l2 * 1000), max_iter=2000, tol=1e-8).fit(x[:1000].numpy(), y[:1000].numpy())
        ref_acc = (ref.predict(x[1000:].numpy()) == y[1000:].numpy()).mean()
        assert abs(acc - ref_acc) <= 0.01, (l2, acc, ref_acc)
        assert 0.4 < acc < 0.95
