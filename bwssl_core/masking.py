"""Tube masking and the reconstruction target.

A tube mask hides the same spatial positions in every temporal slice of a clip, and every clip in a
batch keeps the same number of tokens, so visible tokens pack into a dense (B, N_vis, D) tensor.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import num_decode, num_keep


@dataclass
class Mask:
    ids_keep: torch.Tensor  # (B, N_vis) visible token indices, ascending
    ids_mask: torch.Tensor  # (B, N_mask) hidden token indices, ascending
    ids_decode: torch.Tensor | None = None  # (B, N_dec) the hidden tokens the decoders reconstruct; None: all

    @property
    def decode(self) -> torch.Tensor:
        """(B, N_dec) hidden token indices the decoders reconstruct, ascending."""
        return self.ids_mask if self.ids_decode is None else self.ids_decode

    @property
    def hidden(self) -> torch.Tensor:
        """(B, L) bool, True where a token is hidden (HF's bool_masked_pos)."""
        B = self.ids_keep.shape[0]
        L = self.ids_keep.shape[1] + self.ids_mask.shape[1]
        out = torch.zeros(B, L, dtype=torch.bool, device=self.ids_keep.device)
        return out.scatter_(1, self.ids_mask, True)

    def __getitem__(self, rows) -> "Mask":
        return Mask(self.ids_keep[rows], self.ids_mask[rows], None if self.ids_decode is None else self.ids_decode[rows])

    @classmethod
    def from_hidden(cls, hidden: torch.Tensor) -> "Mask":
        """From a (B, L) bool mask with the same hidden count in every row."""
        counts = hidden.sum(1)
        if counts.min() != counts.max():
            raise ValueError("every clip must hide the same number of tokens")
        order = hidden.to(torch.int8).argsort(dim=1, stable=True)  # visible first, each ascending
        n_vis = hidden.shape[1] - int(counts[0])
        return cls(order[:, :n_vis], order[:, n_vis:])


def tube_mask(batch: int, grid: tuple[int, int, int], mask_ratio: float,
              generator: torch.Generator | None = None, device=None, dec_keep: float = 1.0) -> Mask:
    """Random tube mask for `batch` clips on `device`, drawn from `generator`. dec_keep < 1 also
    draws, after the mask, the hidden tokens the decoders reconstruct: num_decode(N_mask, dec_keep)
    of them per clip, uniformly at random (VideoMAE V2's decoder masking)."""
    t, h, w = grid
    hw = h * w
    keep = num_keep(hw, mask_ratio)
    noise = torch.rand(batch, hw, generator=generator, device=device)
    order = noise.argsort(dim=1)
    offsets = torch.arange(t, device=noise.device)[None, :, None] * hw  # (1, T', 1)

    def over_time(spatial):  # (B, n) spatial ids -> (B, T' * n) token ids, ascending
        return (offsets + spatial.sort(dim=1).values[:, None, :]).flatten(1)

    mask = Mask(over_time(order[:, :keep]), over_time(order[:, keep:]))
    if dec_keep < 1:
        hidden = mask.ids_mask.shape[1]
        pick = torch.rand(batch, hidden, generator=generator, device=device).argsort(dim=1)
        pick = pick[:, :num_decode(hidden, dec_keep)].sort(dim=1).values
        mask.ids_decode = mask.ids_mask.gather(1, pick)
    return mask


def patchify(video: torch.Tensor, tubelet_size: int, patch_size: int) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, L, t*p*p, C), tubes in (t, h, w) raster order."""
    B, C, T, H, W = video.shape
    t, p = tubelet_size, patch_size
    x = video.reshape(B, C, T // t, t, H // p, p, W // p, p)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # (B, T', H', W', t, p, p, C)
    return x.reshape(B, -1, t * p * p, C)


def unpatchify(tubes: torch.Tensor, grid: tuple[int, int, int], tubelet_size: int, patch_size: int):
    """(B, L, t*p*p*C) -> (B, C, T, H, W); the inverse of patchify."""
    B = tubes.shape[0]
    T_, H_, W_ = grid
    t, p = tubelet_size, patch_size
    x = tubes.reshape(B, T_, H_, W_, t, p, p, -1)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, C, T', t, H', p, W', p)
    return x.reshape(B, x.shape[1], T_ * t, H_ * p, W_ * p)


def tube_target(pixels: torch.Tensor, ids: torch.Tensor, tubelet_size: int, patch_size: int,
                normalize: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Target for the tubes `ids` (B, N) of a clip in pixel space [0, 1]: (B, N, t*p*p*C).

    normalize: subtract each tube's per-channel mean and divide by its unbiased std (+ eps).
    """
    tubes = patchify(pixels.float(), tubelet_size, patch_size)  # (B, L, t*p*p, C)
    tubes = tubes.gather(1, ids[:, :, None, None].expand(-1, -1, *tubes.shape[2:]))
    if normalize:
        tubes = (tubes - tubes.mean(dim=-2, keepdim=True)) / (tubes.var(dim=-2, keepdim=True).sqrt() + eps)
    return tubes.flatten(2)
