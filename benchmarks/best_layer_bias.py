"""How much a best layer chosen on the validation clips reads high (issue 4; benchmarks/NOTES.md, session 20).

Eight "layers" are equally informative (independent noise around one signal), so every layer's true top-1 is the
same. Over 12 draws: the mean layer's validation top-1, the max over layers (the layer chosen on validation, as
the tables did before 2026-11-28) and the layer chosen on the held-out part of the training clips
(figures.best_index, as they do now). CPU, about 20 s.
"""
import statistics

import torch

from bwssl_core.probe import ProbeSpace, probe_spaces

n, m, d, C, L = 2000, 500, 32, 8, 8  # training and validation clips, features, classes, layers
by_mean, by_val, by_holdout = [], [], []
for seed in range(12):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n + m, C, generator=g)
    y = (z + 1.5 * torch.randn(n + m, C, generator=g)).argmax(1)
    A = torch.randn(C, d, generator=g)
    spaces = []
    for _ in range(L):
        x = z @ A + 2.0 * torch.randn(n + m, d, generator=g)  # (n + m, d)
        spaces.append(ProbeSpace(x[:n], x[n:], basis=False))
    res = [r["y"] for r in probe_spaces(spaces, {"y": (y[:n], y[n:])})]
    acc = [r["acc"] for r in res]
    by_mean.append(statistics.mean(acc))
    by_val.append(max(acc))
    by_holdout.append(acc[max(range(L), key=lambda i: (res[i]["holdout_acc"], -i))])
mean = statistics.mean(by_mean)
print(f"mean layer {mean:.4f}; chosen on validation {statistics.mean(by_val):.4f} "
      f"({statistics.mean(by_val) - mean:+.4f}); chosen on held-out training clips {statistics.mean(by_holdout):.4f} "
      f"({statistics.mean(by_holdout) - mean:+.4f}); one binomial SE at {m} clips: {(0.45 * 0.55 / m) ** 0.5:.4f}")
