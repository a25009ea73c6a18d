"""Token-level (attentive) probe: a light cross-attention pooling trained on frozen tokens.

Pooled probes can miss what a representation says about where and when; this probe reads the
tokens themselves. Each of `heads` learned queries scores every token (plus a learned bias per
token position, so that where a token sits can count), averages the layer-normed tokens with
its softmax weights, and one linear layer reads the concatenated averages. No key or value
projections: the probe stays light (O(heads * L * D) per clip) and close to linear.
"""
from __future__ import annotations

import inspect
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ConfigError
from .probe import class_labels, dense_classes, feature_precision, holdout_split


class AttentivePool(nn.Module):
    def __init__(self, num_tokens: int, dim: int, num_classes: int, heads: int = 4):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.query = nn.Parameter(torch.randn(heads, dim) * 0.02)
        self.pos = nn.Parameter(torch.zeros(heads, num_tokens))
        self.head = nn.Linear(heads * dim, num_classes)

    def forward(self, tokens: torch.Tensor, return_weights: bool = False):
        """(B, L, D) -> logits (B, C) [and each query's attention over the tokens (B, heads, L)]."""
        return self.read(F.layer_norm(tokens, tokens.shape[-1:], eps=self.norm.eps), return_weights)

    def read(self, xhat: torch.Tensor, return_weights: bool = False):
        """forward() of tokens already normalised without LayerNorm's affine, which is folded in
        exactly: with x = xhat * g + b, a query's score x . q = xhat . (g * q) + b . q, whose second
        term is the same for every token and drops out of the softmax; the weighted mean of x is the
        weighted mean of xhat, times g, plus b. So frozen tokens are normalised once, not every epoch,
        and no gradient flows to them."""
        g, b = self.norm.weight, self.norm.bias
        # (B, heads, D) @ (B, D, L) -> (B, heads, L): as a batched matmul, 11-17% faster a step than a
        # broadcast one (an mm of (B * L, D) by (D, heads) and its gradient; NOTES.md)
        scores = torch.bmm((self.query * g).expand(len(xhat), -1, -1), xhat.mT)
        w = (scores / math.sqrt(xhat.shape[-1]) + self.pos).softmax(-1)
        logits = self.head((w @ xhat * g + b).flatten(1))  # (B, heads, D) -> (B, C)
        return (logits, w) if return_weights else logits


def attentive_probe(train_tokens: torch.Tensor, train_y: torch.Tensor, val_tokens: torch.Tensor,
                    val_y: torch.Tensor, epochs: int = 50, lr: float = 1e-2, weight_decay: float = 0.01,
                    batch_size: int = 64, heads: int = 4, holdout: float = 0.2, seed: int = 0, device="cpu",
                    precision: str = "auto") -> dict:
    """Top-1 on validation of an AttentivePool trained with AdamW (one-cycle schedule) on frozen tokens
    (N, L, D) of any float dtype, kept on their device and moved per batch, or moved to a GPU `device` once
    where they fit (token_home). Fixed hyper-parameters for every model and control, so that rows compare.

    Early stopping: the probe trains on the training split less a held-out part (`holdout`, the rows the
    linear probe of the same seed holds out) for `epochs` epochs, scores the held-out part after each, and
    keeps the weights of the epoch that scored best there (ties: the earlier). A fixed short budget cuts
    some inputs off long before others: on the default study the raw-pixel control sat at chance for ten
    epochs and scored 0.17 after 20, against about 0.55 at its best epoch of 50 (NOTES.md). `holdout=0`:
    all rows train and the last epoch is kept. Returns {"acc", "epoch" (kept), "epochs", "holdout_acc",
    "holdout_curve" (per epoch)}.

    precision "bf16" ("auto": where it is native, as probe.feature_precision): the normalised tokens
    are kept in bfloat16 and the probe's matmuls run under autocast (half the memory traffic: its epochs
    2x faster on a 2-core CPU, NOTES.md); "fp32": tokens kept in their dtype, cast to float32 per batch."""
    if train_tokens.ndim != 3 or val_tokens.shape[1:] != train_tokens.shape[1:]:
        raise ConfigError(f"tokens: expected (N, L, D) for both splits, got train {tuple(train_tokens.shape)} "
                          f"and validation {tuple(val_tokens.shape)}")
    train_y, val_y = class_labels(train_y, "train_y"), class_labels(val_y, "val_y")
    if len(train_tokens) != len(train_y) or len(val_tokens) != len(val_y):
        raise ConfigError(f"tokens and labels differ in length: train {len(train_tokens)} vs {len(train_y)}, "
                          f"validation {len(val_tokens)} vs {len(val_y)}")
    if holdout and len(train_tokens) < 2:
        raise ConfigError(f"{len(train_tokens)} training sample(s): holdout={holdout} needs at least two "
                          "(one to train, one held out)")
    train_y, val_y, num_classes = dense_classes(train_y, val_y)  # ids as 0..C-1
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    probe = AttentivePool(train_tokens.shape[1], train_tokens.shape[2], num_classes, heads).to(device)
    amp = feature_precision(device, precision) == "bf16"
    keep = torch.bfloat16 if amp else train_tokens.dtype
    home = token_home((train_tokens, val_tokens), keep, device)
    train_tokens, val_tokens = (_normalised(t, probe.norm.eps, keep, home) for t in (train_tokens, val_tokens))
    dtype = torch.bfloat16 if amp else torch.float32
    n, train_y, val_y = len(train_tokens), train_y.cpu(), val_y.cpu()
    hold, rows = holdout_split(n, holdout, seed) if holdout else (torch.arange(0), torch.arange(n))
    batch = train_tokens.new_empty((batch_size, *train_tokens.shape[1:]))

    def logits(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(torch.device(device).type, torch.bfloat16, enabled=amp):
            return probe.read(x.to(device, dtype)).float()

    def rows_of(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:  # into one reused buffer, not a new tensor
        return torch.index_select(x, 0, ids.to(x.device), out=batch[:len(ids)])

    @torch.no_grad()
    def accuracy(x: torch.Tensor, y: torch.Tensor, ids: torch.Tensor) -> float:
        pred = torch.cat([logits(rows_of(x, i)).argmax(1) for i in ids.split(len(batch))]).cpu()  # one sync
        return (pred == y[ids]).float().mean().item()

    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(rows) / batch_size)
    # OneCycleLR divides by its warm-up's length in steps less one: at least two steps of warm-up
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=max(0.1, 2 / steps)) \
        if steps >= 4 else None  # fewer steps: a constant lr
    best, curve = (-1.0, epochs, None), []  # (held-out top-1, epoch, weights); held-out top-1 per epoch
    for epoch in range(1, epochs + 1):
        for ids in rows[torch.randperm(len(rows), generator=g)].split(batch_size):
            loss = F.cross_entropy(logits(rows_of(train_tokens, ids)), train_y[ids].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
        if holdout:
            curve.append(score := accuracy(train_tokens, train_y, hold))
            if score > best[0]:
                best = (score, epoch, {k: v.clone() for k, v in probe.state_dict().items()})
    if best[2] is not None:
        probe.load_state_dict(best[2])
    return {"acc": accuracy(val_tokens, val_y, torch.arange(len(val_tokens))), "epoch": best[1], "epochs": epochs,
            "holdout_acc": best[0] if holdout else None, "holdout_curve": curve}


# the hyper-parameters that shape attentive_probe's result, as its defaults: part of the key under which
# probe results are cached (evaluate.depthwise), so results of another protocol are never reused
PROTOCOL = {k: p.default for k, p in inspect.signature(attentive_probe).parameters.items()
            if k in ("epochs", "lr", "weight_decay", "batch_size", "heads", "holdout")}


def token_home(tokens: tuple[torch.Tensor, ...], dtype: torch.dtype, device) -> torch.device:
    """Where the probe keeps its normalised tokens: on `device` when that is a GPU with room for them in
    half its free memory, so that no batch crosses the bus in any of the probe's epochs (a GPU study's
    pixel tokens: 77 MB a batch); else where they are (the features come to the CPU, NOTES.md)."""
    device = torch.device(device)
    if device.type != "cuda":
        return tokens[0].device
    free, _ = torch.cuda.mem_get_info(device)
    need = sum(t.numel() for t in tokens) * dtype.itemsize
    return device if need < free / 2 else tokens[0].device


@torch.no_grad()
def _normalised(tokens: torch.Tensor, eps: float, dtype: torch.dtype, device=None,
                chunk: int | None = None) -> torch.Tensor:
    """Each token normalised over its features (LayerNorm without the affine), in float32, stored in `dtype`
    on `device` (default: the tokens'), written chunk by chunk into one tensor: no second full-size copy.
    chunk (rows): by default about 4 MB of float32 on the CPU, where a chunk that stays in cache made this
    3-5x faster than chunks of 256 clips (the raw-pixel tokens of the default study: 0.5 s against 1.4-2.8 s,
    NOTES.md), and about 256 MB on a GPU, where fewer and larger kernels pay."""
    out = torch.empty(tokens.shape, dtype=dtype, device=tokens.device if device is None else device)
    if chunk is None:
        row = tokens[0].numel() * 4  # bytes of one clip's tokens in float32
        chunk = max(1, (2 ** 28 if out.device.type == "cuda" else 2 ** 22) // max(row, 1))
    for part, t in zip(out.split(chunk), tokens.split(chunk)):
        t = t.to(out.device)
        part.copy_(F.layer_norm(t.float(), t.shape[-1:], eps=eps))
    return out
