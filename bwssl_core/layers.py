"""Building blocks: tubelet embedding, sin-cos position tables, attention, MLP, pre-norm layer.

Axis convention: video (B, C, T, H, W); tokens (B, L, D) in (t, h, w) raster order; heads h.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .masking import patchify


class TubeletEmbed(nn.Module):
    """(B, C, T, H, W) -> (B, L, D): one token per tubelet_size x patch_size x patch_size tube."""

    def __init__(self, in_chans: int, dim: int, tubelet_size: int, patch_size: int):
        super().__init__()
        kernel = (tubelet_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_chans, dim, kernel_size=kernel, stride=kernel)

    def forward(self, video: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """All tubes, or with ids (B, N) only those: gathered first and embedded as one matmul with
        the same weights, so hidden tubes cost nothing -> (B, N, D)."""
        if ids is None:
            return self.proj(video).flatten(2).transpose(1, 2)  # (B, D, T', H', W') -> (B, L, D)
        t, p = self.proj.kernel_size[:2]
        tubes = patchify(video, t, p).flatten(2)  # (B, L, t*p*p*C)
        tubes = tubes.gather(1, ids[:, :, None].expand(-1, -1, tubes.shape[-1]))  # (B, N, t*p*p*C)
        weight = self.proj.weight.permute(0, 2, 3, 4, 1).flatten(1)  # (D, t*p*p*C), patchify's order
        return F.linear(tubes, weight, self.proj.bias)


def _sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """(N,) positions -> (N, dim): first half sin, second half cos (MAE's layout)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.double()[:, None] * omega[None]  # (N, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_3d(grid: tuple[int, int, int], dim: int) -> torch.Tensor:
    """Separable 3-D sin-cos table (L, dim) over a (T', H', W') grid, L in (t, h, w) raster order.

    Channels are split into time (a third, rounded to even) and two equal-as-possible even halves of
    the rest for height and width. dim: even and at least 6 (below 6 time would get no channel).
    """
    if dim < 6 or dim % 2:
        raise ValueError(f"dim={dim}: expected even and at least 6 for 3-D sin-cos (2 channels or more for each "
                         "of t, h, w)")
    d_t = 2 * (dim // 6)
    d_h = 2 * ((dim - d_t) // 4)
    d_w = dim - d_t - d_h
    t, h, w = torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij")
    table = torch.cat([_sincos_1d(t.flatten(), d_t), _sincos_1d(h.flatten(), d_h),
                       _sincos_1d(w.flatten(), d_w)], dim=1)
    return table.float()


def sincos_1d_interleaved(num_tokens: int, dim: int) -> torch.Tensor:
    """VideoMAE's table (L, dim) over the flat token index: sin on even channels, cos on odd."""
    pos = torch.arange(num_tokens, dtype=torch.float64)[:, None]
    omega = 1.0 / 10000 ** (2 * (torch.arange(dim, dtype=torch.float64) // 2) / dim)  # float64 throughout, as VideoMAE
    angles = pos * omega[None]
    angles[:, 0::2] = angles[:, 0::2].sin()
    angles[:, 1::2] = angles[:, 1::2].cos()
    return angles.float()


def position_table(kind: str, grid: tuple[int, int, int], dim: int) -> torch.Tensor:
    if kind == "3d":
        return sincos_3d(grid, dim)
    return sincos_1d_interleaved(math.prod(grid), dim)


class Attention(nn.Module):
    """Multi-head self-attention through scaled_dot_product_attention.

    With return_attn=True it computes the same output explicitly and also returns the attention
    probabilities (B, h, L, L), for analysis. As in VideoMAE, queries and values have biases and keys
    have none (a key bias would not change the softmax, and its round-off gradient would make Adam
    move it at random).
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, return_attn: bool = False):
        B, L, D = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.v_bias), self.v_bias])
        qkv = F.linear(x, self.qkv.weight, bias)
        qkv = qkv.view(B, L, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, h, L, hd)
        if return_attn:
            attn = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).float().softmax(dim=-1)  # (B, h, L, L)
            out = attn.to(v.dtype) @ v
        else:
            attn, out = None, F.scaled_dot_product_attention(q, k, v)
        out = self.proj(out.transpose(1, 2).reshape(B, L, D))
        return (out, attn) if return_attn else out


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Layer(nn.Module):
    """Pre-norm transformer layer: x + attn(norm1(x)), then + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, return_attn: bool = False):
        if return_attn:
            a, attn = self.attn(self.norm1(x), return_attn=True)
            x = x + a
            return x + self.mlp(self.norm2(x)), attn
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def init_weights(module: nn.Module) -> None:
    """VideoMAE/MAE init: xavier-uniform linear and patch projection weights, zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv3d):
        nn.init.xavier_uniform_(module.weight.view(module.weight.shape[0], -1))
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
