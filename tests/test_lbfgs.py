import pytest
import torch

from bwssl_core.lbfgs import lbfgs_each


def quadratics(scales: torch.Tensor, target: torch.Tensor, owner: torch.Tensor, calls: list):
    """f_(g, p)(x) = sum over p's columns of 1/2 (x - target)^T diag(scales) (x - target): minimum at target."""
    def fun(x, live):
        calls.append(list(live))
        cols = torch.isin(owner, torch.tensor(live))
        a, t = scales[:, cols], target[:, cols]
        live_of = torch.isin(torch.arange(int(owner.max()) + 1), torch.tensor(live))  # (P,)
        pos = torch.cumsum(live_of.long(), 0)[owner[cols]] - 1  # column -> position in live
        colwise = (0.5 * a * (x - t) ** 2).sum(2)  # (G, K')
        return x.new_zeros(x.shape[0], len(live)).index_add_(1, pos, colwise), a * (x - t)
    return fun


def test_each_problem_converges_on_its_own_and_leaves_the_batch():
    """Problems of very different conditioning in one batch (2 groups x 3 problems, one of 1 column, two of
    2): each reaches its minimum, the well-conditioned ones in few iterations, and a problem finished in
    every group is no longer evaluated."""
    g = torch.Generator().manual_seed(0)
    owner = torch.tensor([0, 1, 1, 2, 2])  # (K,)
    cond = torch.tensor([1.0, 1e2, 1e2, 1e4, 1e4])  # problem 0 round, problem 2 badly conditioned
    scales = (torch.rand(2, 5, 6, generator=g) * cond[:, None] + 1).double()  # (G, K, m)
    scales[:, 0] = 1.0  # problem 0 is exactly round: its first step lands on the minimum
    target = torch.randn(2, 5, 6, generator=g).double()
    calls = []
    fun = quadratics(scales, target, owner, calls)
    x, iters, capped = lbfgs_each(fun, torch.zeros(2, 5, 6).double(), owner, max_iter=500, tol=1e-6, tol_change=0)
    grad = scales * (x - target)
    assert grad.abs().max() <= 1e-6
    assert iters.shape == (2, 3) and (iters[:, 0] == 1).all() and (iters[:, 2] > iters[:, 1]).all()
    assert not capped.any()
    assert calls[0] == [0, 1, 2] and calls[-1] == [2]  # problem 0 (then 1) left the batch


def test_the_cap_stops_a_problem_and_says_so():
    """At max_iter a problem stops where it is, its count reads max_iter and it is flagged as capped; one
    that converged in its last allowed iteration is not; the others are unaffected."""
    owner = torch.tensor([0, 1])
    scales = torch.tensor([[[1.0, 1.0], [1.0, 1e6]]])  # (1, 2, 2): problem 1 needs several iterations
    target = torch.ones(1, 2, 2)
    x, iters, capped = lbfgs_each(quadratics(scales, target, owner, []), torch.zeros(1, 2, 2), owner, max_iter=1,
                                  tol=1e-8)
    assert iters.tolist() == [[1, 1]] and capped.tolist() == [[False, True]]  # problem 0: round, one exact step
    torch.testing.assert_close(x[0, 0], target[0, 0])
    assert (scales[0, 1] * (x[0, 1] - target[0, 1])).abs().max() > 1e-8


def test_a_stiff_minimum_is_reached_superlinearly():
    """Near the minimum of a stiff quadratic (curvatures 1 to 1,000) y . s falls below 1e-10: an absolute
    threshold that turned such pairs inert let them push the good ones out of the history, and the solve
    slowed to 396 iterations at tol 1e-7; with a threshold relative to y . y it takes 30."""
    g = torch.Generator().manual_seed(12)
    scales = torch.rand(1, 2, 5, generator=g, dtype=torch.float64) * 1000 + 1  # (1, 2, 5): one problem
    target = torch.randn(1, 2, 5, generator=g, dtype=torch.float64)
    owner = torch.tensor([0, 0])
    x, iters, capped = lbfgs_each(quadratics(scales, target, owner, []), torch.zeros(1, 2, 5).double(), owner,
                                  max_iter=1000, tol=1e-7, tol_change=0)
    assert (scales * (x - target)).abs().max() <= 1e-7 and not capped.any() and iters.item() <= 60


def test_a_skipped_pair_leaves_each_problems_own_history():
    """On non-convex problems (-a cos x + x^2 / 20: a step can cross negative curvature, y . s < 0, and that
    pair is skipped for its problem alone, here once) every problem solved in the batch takes exactly the
    steps it takes alone: a history shifted for the wrong problems would change them."""
    g = torch.Generator().manual_seed(1)
    owner = torch.tensor([0, 1, 1, 2])
    scale = torch.rand(2, 4, 6, generator=g, dtype=torch.float64) * 10 + 1  # (G, K, m)
    x0 = 1.6 + torch.rand(2, 4, 6, generator=g, dtype=torch.float64) * 1.5  # where cos is concave

    def waves(a: torch.Tensor, owner: torch.Tensor):
        def fun(x, live):
            cols = torch.isin(owner, torch.tensor(live))
            pos = torch.cumsum(torch.isin(torch.arange(int(owner.max()) + 1), torch.tensor(live)).long(), 0)[
                owner[cols]] - 1  # column -> position in live
            colwise = (-a[:, cols] * torch.cos(x) + x ** 2 / 20).sum(2)
            return x.new_zeros(x.shape[0], len(live)).index_add_(1, pos, colwise), a[:, cols] * torch.sin(x) + x / 10
        return fun

    kw = dict(max_iter=300, tol=1e-8, tol_change=0, history=3)
    x, iters, _ = lbfgs_each(waves(scale, owner), x0, owner, **kw)
    for p in range(3):
        cols, one = owner == p, torch.zeros(int((owner == p).sum()), dtype=torch.long)
        alone, alone_iters, _ = lbfgs_each(waves(scale[:, cols], one), x0[:, cols], one, **kw)
        assert torch.equal(alone, x[:, cols]) and torch.equal(alone_iters[:, 0], iters[:, p])


def test_probe_warns_when_a_fit_reaches_max_iter():
    from bwssl_core.probe import linear_probe

    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 30, generator=g)
    y = (x[:, :3] + torch.randn(200, 3, generator=g)).argmax(1)
    with pytest.warns(UserWarning, match="stopped at max_iter=2"):
        res = linear_probe(x[:150], y[:150], x[150:], y[150:], max_iter=2)
    assert res["iterations"] == 2
    assert linear_probe(x[:150], y[:150], x[150:], y[150:])["iterations"] < 300  # no warning at the default
