"""Patch-level diagnostics: how much each input tube moves a block's representation, and what each
block's decoder reconstructs, with its per-tube error."""
from __future__ import annotations

import torch

from .masking import Mask, tube_target, unpatchify
from .model import VideoMAE


def _block_end(model: VideoMAE, block: int) -> int:
    """Index of the last encoder layer of `block`."""
    return model.cfg.spans[block][1] - 1


def _pooled(model: VideoMAE, video: torch.Tensor, block: int) -> torch.Tensor:
    """(B, D): the mean over all tokens of the block's output."""
    return model.forward_intermediates(video, indices=[_block_end(model, block)])[0].mean(1)


def influence_gradient(model: VideoMAE, video: torch.Tensor, block: int, probes: int = 16,
                       seed: int = 0) -> torch.Tensor:
    """Frobenius norm of the Jacobian of the block's pooled output with respect to each input tube,
    estimated with `probes` random projections (E||v^T J||^2 = ||J||_F^2): (B, T', H', W')."""
    c = model.cfg
    video = video.detach().requires_grad_(True)
    pooled = _pooled(model.eval(), video, block)  # (B, D)
    g = torch.Generator(device=video.device).manual_seed(seed)
    total = torch.zeros(video.shape[0], c.num_tokens, device=video.device)
    for i in range(probes):
        v = torch.randn(pooled.shape, generator=g, device=video.device)
        (grad,) = torch.autograd.grad(pooled, video, v, retain_graph=i < probes - 1)
        tubes = grad.reshape(*grad.shape[:2], c.grid[0], c.tubelet_size, c.grid[1], c.patch_size, c.grid[2],
                             c.patch_size)  # (B, C, T', t, H', p, W', p)
        total += tubes.pow(2).sum((1, 3, 5, 7)).flatten(1)
    return (total / probes).sqrt().view(-1, *c.grid)


@torch.no_grad()
def influence_occlusion(model: VideoMAE, video: torch.Tensor, block: int, batch: int = 64) -> torch.Tensor:
    """How far the block's pooled output moves (L2) when one tube is replaced by the clip's mean
    per channel: (B, T', H', W'), one forward per tube (a check on influence_gradient)."""
    c = model.cfg
    model.eval()
    base = _pooled(model, video, block)  # (B, D)
    fill = video.mean((2, 3, 4), keepdim=True)  # (B, C, 1, 1, 1)
    out = torch.zeros(video.shape[0], c.num_tokens, device=video.device)
    t, p = c.tubelet_size, c.patch_size
    T_, H_, W_ = c.grid
    for b in range(video.shape[0]):
        for start in range(0, c.num_tokens, batch):
            ids = range(start, min(start + batch, c.num_tokens))
            occluded = video[b:b + 1].repeat(len(ids), 1, 1, 1, 1)
            for j, i in enumerate(ids):
                ti, hi, wi = i // (H_ * W_), (i // W_) % H_, i % W_
                occluded[j, :, ti * t:(ti + 1) * t, hi * p:(hi + 1) * p, wi * p:(wi + 1) * p] = fill[b]
            out[b, start:start + len(ids)] = (_pooled(model, occluded, block) - base[b]).norm(dim=1)
    return out.view(-1, *c.grid)


@torch.no_grad()
def reconstructions(model: VideoMAE, video: torch.Tensor, mask: Mask) -> list[dict]:
    """Each block's reconstruction of a normalised video under `mask`.

    Per block: "pixels" (B, C, T, H, W) in [0, 1], visible tubes from the input and hidden tubes
    from the decoder; "error" (B, T', H', W') mean squared error per hidden tube in target space
    (NaN on visible tubes); "reinjected" True when the model predicts per-tube normalised pixels, so
    that showing pixels needs the ground truth's per-tube mean and std put back: a display must say
    so, since such images look right whatever the model learned.
    """
    c = model.cfg
    model.eval()
    pixels = (video.float() * model.pixel_std + model.pixel_mean).clamp(0, 1)
    target = model.target(video, mask.ids_mask)  # (B, N_mask, P)
    raw = tube_target(pixels, mask.ids_mask, c.tubelet_size, c.patch_size, normalize=False)
    raw = raw.view(*raw.shape[:2], -1, c.in_chans)  # (B, N_mask, t*p*p, C)
    mean, std = raw.mean(2, keepdim=True), raw.var(2, keepdim=True).sqrt() + 1e-6
    everything = tube_target(pixels, torch.arange(c.num_tokens, device=video.device).expand(len(video), -1),
                             c.tubelet_size, c.patch_size, normalize=False)  # (B, L, P)
    x, out = video, []
    for k, stage in enumerate(model.stages):
        x, z = stage(x, mask.ids_keep)
        pred = model.block_decoder(k)(z, mask.ids_keep, mask.ids_mask).float()  # (B, N_mask, P)
        shown = pred
        if c.norm_target:  # back to pixels with the ground truth's statistics
            shown = (pred.view_as(raw) * std + mean).flatten(2)
        tubes = everything.clone().scatter_(1, mask.ids_mask[..., None].expand_as(shown), shown.clamp(0, 1))
        error = torch.full((len(video), c.num_tokens), float("nan"), device=video.device)
        error.scatter_(1, mask.ids_mask, (pred - target).pow(2).mean(-1))
        out.append({"pixels": unpatchify(tubes, c.grid, c.tubelet_size, c.patch_size),
                    "error": error.view(-1, *c.grid), "reinjected": c.norm_target})
    return out
