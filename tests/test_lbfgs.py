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
    x, iters = lbfgs_each(fun, torch.zeros(2, 5, 6).double(), owner, max_iter=500, tol=1e-6, tol_change=0)
    grad = scales * (x - target)
    assert grad.abs().max() <= 1e-6
    assert iters.shape == (2, 3) and (iters[:, 0] == 1).all() and (iters[:, 2] > iters[:, 1]).all()
    assert calls[0] == [0, 1, 2] and calls[-1] == [2]  # problem 0 (then 1) left the batch


def test_the_cap_stops_a_problem_and_says_so():
    """At max_iter a problem stops where it is and its count reads max_iter; the others are unaffected."""
    owner = torch.tensor([0, 1])
    scales = torch.tensor([[[1.0, 1.0], [1.0, 1e6]]])  # (1, 2, 2): problem 1 needs several iterations
    target = torch.ones(1, 2, 2)
    x, iters = lbfgs_each(quadratics(scales, target, owner, []), torch.zeros(1, 2, 2), owner, max_iter=1, tol=1e-8)
    assert iters.tolist() == [[1, 1]]
    torch.testing.assert_close(x[0, 0], target[0, 0])
    assert (scales[0, 1] * (x[0, 1] - target[0, 1])).abs().max() > 1e-8


def test_probe_warns_when_a_fit_reaches_max_iter():
    from bwssl_core.probe import linear_probe

    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 30, generator=g)
    y = (x[:, :3] + torch.randn(200, 3, generator=g)).argmax(1)
    with pytest.warns(UserWarning, match="stopped at max_iter=2"):
        res = linear_probe(x[:150], y[:150], x[150:], y[150:], max_iter=2)
    assert res["iterations"] == 2
    assert linear_probe(x[:150], y[:150], x[150:], y[150:])["iterations"] < 300  # no warning at the default
