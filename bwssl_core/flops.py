"""Analytic FLOP count of one training step, and model FLOP utilisation (MFU).

Counts matmul FLOPs only (a multiply-add is 2 FLOPs), as torch.utils.flop_counter does: linear
layers, the tubelet embedding (a strided Conv3d, i.e. one matmul per tube), attention scores
q k^T and the weighted sum a v. Norms, GELU, softmax, the loss and the optimiser are left out
(they are memory-bound and small next to the matmuls).

Backward costs twice the forward (a gradient for the input and one for the weight), so a step
costs 3x the forward, except the tubelet embedding: the video needs no gradient, so its backward
computes only the weight gradient and the embedding costs 2x its forward.

Where each part runs (cfg.grid gives L tokens, N of them visible, M of the hidden ones decoded:
all L - N of them unless cfg.dec_keep < 1):
- tubelet embedding: the N visible tubes (gathered before the embedding);
- encoder layers: the N visible tokens, whatever the partition;
- each block's decoder (K of them, also when one decoder is shared): embedding on the N visible
  features, layers on N + M tokens, head on the M decoded ones.
"""
from __future__ import annotations

from .config import ModelConfig

BACKWARD = 2  # backward FLOPs per forward FLOP of a matmul whose input and weight both need gradients


def linear_flops(tokens: int, d_in: int, d_out: int) -> int:
    """(tokens, d_in) @ (d_in, d_out)."""
    return 2 * tokens * d_in * d_out


def layer_flops(tokens: int, dim: int, mlp_ratio: float) -> dict[str, int]:
    """Forward FLOPs of one pre-norm transformer layer on (tokens, dim), by part."""
    return {"qkv": linear_flops(tokens, dim, 3 * dim),
            "attention": 2 * linear_flops(tokens, dim, tokens),  # q k^T and a v, all heads together
            "proj": linear_flops(tokens, dim, dim),
            "mlp": 2 * linear_flops(tokens, dim, int(dim * mlp_ratio))}


def forward_flops(cfg: ModelConfig, batch: int) -> dict:
    """Forward FLOPs of a batch of clips by part: embed, enc_{qkv,attention,proj,mlp},
    dec_{embed,layers,head}, and per block (`blocks`: its layers plus its decoder; the first block
    also counts the embedding)."""
    N, M = cfg.num_visible, cfg.num_decoded
    enc = {f"enc_{k}": v * cfg.depth for k, v in layer_flops(N, cfg.embed_dim, cfg.mlp_ratio).items()}
    per_layer = sum(enc.values()) // cfg.depth
    decoder = {"dec_embed": linear_flops(N, cfg.embed_dim, cfg.dec_dim),
               "dec_layers": cfg.dec_depth * sum(layer_flops(N + M, cfg.dec_dim, cfg.mlp_ratio).values()),
               "dec_head": linear_flops(M, cfg.dec_dim, cfg.tube_dim)}
    one_decoder = sum(decoder.values())
    K = len(cfg.partition)
    parts = {"embed": linear_flops(N, cfg.tube_dim, cfg.embed_dim), **enc,
             **{k: v * K for k, v in decoder.items()}}
    parts = {k: v * batch for k, v in parts.items()}
    blocks = [batch * (n * per_layer + one_decoder) for n in cfg.partition]
    blocks[0] += parts["embed"]
    return {**parts, "blocks": blocks, "total": sum(blocks)}


def train_step_flops(cfg: ModelConfig, batch: int) -> dict:
    """FLOPs of one training step (forward and backward) of `batch` clips, by part as
    forward_flops, plus `per_clip`. The embedding costs 2x its forward, every other part 3x."""
    fwd = forward_flops(cfg, batch)
    out = {k: v * (1 + BACKWARD) for k, v in fwd.items() if k not in ("blocks", "total")}
    out["embed"] = fwd["embed"] * 2  # no gradient for the video: weight gradient only
    blocks = [b * (1 + BACKWARD) for b in fwd["blocks"]]
    blocks[0] -= fwd["embed"]
    total = sum(blocks)
    return {**out, "blocks": blocks, "total": total, "per_clip": total / batch}


def mfu(flops_per_s: float, peak_flops_per_s: float) -> float:
    """Model FLOP utilisation: achieved counted FLOP/s as a fraction of the device's peak."""
    return flops_per_s / peak_flops_per_s
