"""Patch-level attention diagnostics on the 3-D token grid (time, height, width).

Attention probabilities come from the model's one door, `forward_intermediates(return_attn=True)`:
a list over layers of (B, h, N, N), N the tokens the encoder saw (all L, or the visible ones of a
mask). Distances use each token's tube centre: frames for time, pixels for space, reported apart.
There is no CLS token.
"""
from __future__ import annotations

import torch

from .config import ModelConfig
from .masking import Mask
from .model import VideoMAE


def token_positions(cfg: ModelConfig, ids: torch.Tensor | None = None) -> torch.Tensor:
    """Centres of the tubes, (L, 3) as (frame, y pixel, x pixel); with ids (B, N): (B, N, 3)."""
    T, H, W = cfg.grid
    t, y, x = torch.meshgrid(torch.arange(T), torch.arange(H), torch.arange(W), indexing="ij")
    pos = torch.stack([t.flatten() * cfg.tubelet_size + (cfg.tubelet_size - 1) / 2,
                       y.flatten() * cfg.patch_size + (cfg.patch_size - 1) / 2,
                       x.flatten() * cfg.patch_size + (cfg.patch_size - 1) / 2], dim=1).float()
    return pos if ids is None else pos.to(ids.device)[ids]


@torch.no_grad()
def attention_maps(model: VideoMAE, video: torch.Tensor, mask: Mask | None = None) -> list[torch.Tensor]:
    """Attention probabilities of every encoder layer for a normalised video: [(B, h, N, N)]."""
    _, attn = model.forward_intermediates(video, mask, return_attn=True)
    return attn


def mean_attention_distance(attn: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head: sum over keys of attention times query-key distance, averaged over queries and
    clips (Dosovitskiy et al. 2021), split into space (pixels) and time (frames).

    attn: (B, h, N, N); positions: (N, 3) or (B, N, 3) as token_positions gives.
    Returns (spatial, temporal), each (h,).
    """
    pos = positions.to(attn.device)
    pos = pos if pos.dim() == 3 else pos[None]  # (B or 1, N, 3)
    diff = pos[:, :, None, :] - pos[:, None, :, :]  # (B, N, N, 3)
    spatial = diff[..., 1:].norm(dim=-1)[:, None]  # (B, 1, N, N)
    temporal = diff[..., 0].abs()[:, None]
    a = attn.double()
    return (a * spatial).sum(-1).mean((0, 2)).float(), (a * temporal).sum(-1).mean((0, 2)).float()


def attention_entropy(attn: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of each query's attention, per head: (B, h, N, N) -> (h,)."""
    a = attn.double().clamp_min(1e-12)
    return -(a * a.log()).sum(-1).mean((0, 2)).float()


def self_attention(attn: torch.Tensor) -> torch.Tensor:
    """Token mixing: the weight each token gives itself, averaged per head: (B, h, N, N) -> (h,).
    1 - this is the share of attention paid to other tokens."""
    return attn.diagonal(dim1=-2, dim2=-1).double().mean((0, 2)).float()


MOVING_SHARE = 0.1  # moving_tubes: the share of a clip's tubes counted as where it moves


def moving_count(num_tokens: int, share: float = MOVING_SHARE) -> int:
    """How many of a clip's tubes moving_tubes marks: round(share * L), at least 1."""
    return max(1, round(share * num_tokens))


def moving_tubes(video: torch.Tensor, cfg: ModelConfig, share: float = MOVING_SHARE) -> torch.Tensor:
    """Where a clip changes: each tube's mean absolute difference from the frame before (over channels,
    its frames and pixels; the first frame, which has none, from the frame after), and the top `share` of
    tubes by it. video (B, C, T, H, W), any scale -> bool (B, L), round(share * L) True per clip (at least 1)."""
    t, p, T = cfg.tubelet_size, cfg.patch_size, video.shape[2]
    v = video.float()  # a uint8 difference would wrap around
    # the frame each is compared with; frame 0, with none before it, with frame 1 (a 0 there would halve the first
    # tube slice's change at tubelet 2, and zero it at tubelet 1); a clip of one frame with itself: no change
    before = [min(1, T - 1), *range(T - 1)]
    diff = (v - v[:, :, before]).abs().mean(1)  # (B, T, H, W)
    energy = torch.nn.functional.avg_pool3d(diff[:, None], (t, p, p)).flatten(1)  # (B, L)
    out = torch.zeros_like(energy, dtype=torch.bool)
    return out.scatter_(1, energy.topk(moving_count(energy.shape[1], share), dim=1).indices, True)


def attention_to(attn: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The share of each query's attention that goes to the keys marked in `keys` (B, N) bool, averaged
    over queries and clips, per head: (B, h, N, N) -> (h,). Uniform attention gives the marked share."""
    marked = keys.to(attn.device, torch.float64)[:, None, None, :]  # (B, 1, 1, N)
    return (attn.double() * marked).sum(-1).mean((0, 2)).float()


def attention_rollout(attns: list[torch.Tensor]) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020) with the residual: per layer the head mean A becomes
    0.5 A + 0.5 I with rows renormalised, and the layers multiply: [(B, h, N, N)] -> (B, N, N).
    Row q says how much each input token flows into output token q."""
    out = None
    for attn in attns:
        a = attn.double().mean(1)  # (B, N, N)
        a = 0.5 * a + 0.5 * torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        a = a / a.sum(-1, keepdim=True)
        out = a if out is None else a @ out
    return out.float()


def layer_summary(model: VideoMAE, video: torch.Tensor, mask: Mask | None = None,
                  attns: list[torch.Tensor] | None = None) -> list[dict]:
    """Per layer and head: mean attention distance (space px, time frames), entropy, self-attention;
    from `attns` when the caller has attention_maps(model, video, mask) already."""
    attns = attention_maps(model, video, mask) if attns is None else attns
    pos = token_positions(model.cfg, None if mask is None else mask.ids_keep)
    rows = []
    for layer, attn in enumerate(attns):
        spatial, temporal = mean_attention_distance(attn, pos)
        rows.append({"layer": layer, "spatial_px": spatial.tolist(), "temporal_frames": temporal.tolist(),
                     "entropy": attention_entropy(attn).tolist(), "self": self_attention(attn).tolist()})
    return rows
