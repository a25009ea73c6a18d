"""Many independent smooth minimisations run as one: each its own L-BFGS, all evaluated together.

The probes fit hundreds of small logistic regressions (layer x label family x l2) on the same
features. One L-BFGS over their sum (torch.optim.LBFGS) shares a step length and a curvature
history between problems of very different conditioning, so it runs as long as the slowest one
and the weakly regularised problems still had not converged at its 100-iteration cap (NOTES.md).
Here every problem keeps its own history, step length and stopping test; their evaluations stay
batched (one pair of matmuls for all), and a problem leaves the batch once it has converged in
every group, so the later iterations cost only what the slow problems need.

Layout: parameters x (G, K, m), G groups (e.g. layers) of K columns of m numbers; column k belongs
to problem owner[k] (ascending, a problem's columns contiguous), so problem (g, p) is the columns
of p in group g. fun(x, live) gets x's columns of the problems `live` (a list of problem indices,
ascending) and returns each (group, problem)'s value (G, len(live)) and the gradient, like x.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

Fun = Callable[[torch.Tensor, list], tuple[torch.Tensor, torch.Tensor]]


def lbfgs_each(fun: Fun, x0: torch.Tensor, owner: torch.Tensor, max_iter: int = 300, tol: float = 1e-4,
               history: int = 10, tol_change: float = 1e-9) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Minimise every problem of x0 (G, K, m) from x0. A problem stops when the max-norm of its gradient
    is at most `tol`, when its value or its step changes by less than `tol_change`, or after `max_iter`
    iterations (the stopping tests of torch.optim.LBFGS, per problem). Line search: backtracking from a
    step of 1 to the Armijo condition (suits a preconditioned problem, whose unit step is near Newton's).
    A curvature pair with y . s <= 1e-10 y . y is skipped for its problem, whose history stays as it was (as
    torch.optim.LBFGS skips one with y . s <= 1e-10: kept as an inert pair, it would push a good one out).
    Returns the minimiser (G, K, m), each (group, problem)'s iteration count (G, P) and whether it stopped
    at the cap still short of convergence (G, P), on the CPU."""
    G, K, _ = x0.shape
    P = int(owner.max()) + 1
    x_out, iters, capped = x0.detach().clone(), torch.zeros(G, P, dtype=torch.long), torch.zeros(G, P, dtype=bool)
    live_p = list(range(P))  # problems still in the batch, ascending
    cols = torch.arange(K, device=x0.device)  # their columns in x_out
    own = owner.to(x0.device)  # (K,) each column's position in live_p

    sums = F.one_hot(own, P).to(x0.dtype)  # (K', P'): sums columns per problem (a matmul: deterministic on a
    # GPU, unlike index_add); rebuilt only when problems leave the batch

    def per_problem(colwise: torch.Tensor, reduce: str = "sum") -> torch.Tensor:  # (G, K') -> (G, P')
        if reduce == "sum":
            return colwise @ sums
        out = colwise.new_zeros(G, len(live_p))
        return out.scatter_reduce_(1, own.expand(G, -1), colwise, "amax", include_self=False)

    def dot(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # per (group, problem): (G, P')
        return per_problem(torch.linalg.vecdot(u, v))

    def cols_of(v: torch.Tensor) -> torch.Tensor:  # (G, P') -> (G, K', 1)
        return v.index_select(1, own)[..., None]

    x = x0.detach().clone()
    f, g = fun(x, live_p)
    todo = per_problem(g.abs().amax(2), "amax") > tol  # (G, P'): still iterating
    count = torch.zeros_like(todo, dtype=torch.long)  # iterations of each (group, problem)
    S, Y, rho = [], [], []  # the last `history` steps, gradient changes, 1 / (y . s); per problem
    gamma = torch.ones_like(f)  # the initial inverse Hessian's scale, y . s / y . y of the last pair
    for it in range(max_iter + 1):
        done = ~todo.any(0)  # (P',): finished in every group: out of the batch
        if done.any():
            gone, keep_c, keep_p = done.tolist(), ~done[own], ~done
            x_out[:, cols[~keep_c]] = x[:, ~keep_c]
            iters[:, [p for p, out in zip(live_p, gone) if out]] = count[:, done].cpu()
            live_p = [p for p, out in zip(live_p, gone) if not out]
            if not live_p:
                return x_out, iters, capped
            cols, own = cols[keep_c], (torch.cumsum(keep_p.long(), 0) - 1)[own[keep_c]]  # renumbered
            sums = F.one_hot(own, len(live_p)).to(x.dtype)
            x, g, f, todo, gamma, count = (x[:, keep_c], g[:, keep_c], f[:, keep_p], todo[:, keep_p],
                                           gamma[:, keep_p], count[:, keep_p])
            S, Y, rho = [v[:, keep_c] for v in S], [v[:, keep_c] for v in Y], [v[:, keep_p] for v in rho]
        if it == max_iter:
            break
        # the direction: two-loop recursion, each problem with its own pairs and scale (none yet: -g)
        d, alpha = g.neg(), []  # updated in place: fused multiply-adds, no temporaries
        for s_i, y_i, r_i in zip(reversed(S), reversed(Y), reversed(rho)):
            alpha.append(r_i * dot(s_i, d))
            d.addcmul_(cols_of(alpha[-1]), y_i, value=-1)
        d.mul_(cols_of(gamma))
        for s_i, y_i, r_i, a_i in zip(S, Y, rho, reversed(alpha)):
            d.addcmul_(cols_of(a_i - r_i * dot(y_i, d)), s_i)
        slope, step = dot(g, d), torch.ones_like(f)  # (G, P'): directional derivative, step length
        todo = todo & (slope < -tol_change)  # no descent left along d: stop, as torch.optim.LBFGS does
        d = d * cols_of(todo.to(d.dtype))  # a finished (group, problem) stays where it is
        x_new = x + d
        f_new, g_new = fun(x_new, live_p)
        for _ in range(40):  # halve the step of each problem short of sufficient decrease
            short = todo & (f_new > f + 1e-4 * step * slope)
            if not short.any():
                break
            step = torch.where(short, step / 2, step)
            x_new = x + cols_of(step) * d
            f_try, g_try = fun(x_new, live_p)
            f_new, g_new = torch.where(short, f_try, f_new), torch.where(cols_of(short), g_try, g_new)
        s, y = x_new - x, g_new - g
        ys, yy = dot(y, s), dot(y, y)
        # a pair that keeps the inverse Hessian positive definite, its curvature y.y / y.s below 1e10: relative,
        # since near a stiff minimum y.s itself falls below any fixed threshold while the pair is still sound
        fresh = todo & (ys > 1e-10 * yy)
        S, Y, rho = S + [s], Y + [y], rho + [torch.where(fresh, 1 / ys.clamp_min(1e-30), 0.0)]  # else inert
        if len(S) > history:  # the oldest pair goes, except for a problem whose new pair was skipped
            skip = todo & ~fresh
            if skip.any():  # rare: a step across negative curvature (y . s <= 0), or y . s lost in rounding
                kc = cols_of(skip.to(x.dtype)) > 0
                S = [torch.where(kc, old, new) for old, new in zip(S, S[1:])]
                Y = [torch.where(kc, old, new) for old, new in zip(Y, Y[1:])]
                rho = [torch.where(skip, old, new) for old, new in zip(rho, rho[1:])]
            else:
                S, Y, rho = S[1:], Y[1:], rho[1:]
        gamma = torch.where(fresh, ys / yy.clamp_min(1e-30), gamma)
        count += todo.long()
        todo = todo & (per_problem(g_new.abs().amax(2), "amax") > tol) & ((f_new - f).abs() >= tol_change) \
            & (per_problem(s.abs().amax(2), "amax") > tol_change)
        x, f, g = x_new, f_new, g_new
    x_out[:, cols] = x  # the problems that reached max_iter
    iters[:, live_p], capped[:, live_p] = count.cpu(), todo.cpu()
    return x_out, iters, capped
