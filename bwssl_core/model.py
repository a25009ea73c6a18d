"""VideoMAE-style masked video autoencoder, trained end-to-end (one block) or blockwise (K blocks).

Data flow: video -> tubes -> visible tokens -> block 1 ... block K, each block's output -> its
decoder -> its masked-reconstruction loss. The input of every block after the first is detached, so
no gradient crosses a block boundary. With one block this is exactly VideoMAE.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import ConfigError, ModelConfig, pixel_stats
from .layers import Layer, TubeletEmbed, init_weights, position_table
from .masking import Mask, tube_mask, tube_target


class Stage(nn.Module):
    """One block of the partition: contiguous encoder layers and the norm on their output.

    The first stage also owns the tubelet embedding and the encoder's position table.
    forward: (video or tokens, ids_keep) -> (x, z): the raw output (B, N, D) that feeds the next
    block and its normalised copy z that feeds this block's decoder.
    """

    def __init__(self, cfg: ModelConfig, num_layers: int, first: bool):
        super().__init__()
        self.embed = TubeletEmbed(cfg.in_chans, cfg.embed_dim, cfg.tubelet_size, cfg.patch_size) if first else None
        if first:
            self.register_buffer("pos", position_table(cfg.pos_embed, cfg.grid, cfg.embed_dim), persistent=False)
        self.layers = nn.ModuleList(Layer(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, cfg.norm_eps)
                                    for _ in range(num_layers))
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps) if cfg.dec_norm else nn.Identity()

    def tokens(self, video: torch.Tensor, ids_keep: torch.Tensor | None) -> torch.Tensor:
        """(B, C, T, H, W) -> (B, N, D): embedded tubes plus positions, visible ones only if ids_keep."""
        pos = self.pos if ids_keep is None else self.pos[ids_keep]  # (L, D) or (B, N, D)
        return self.embed(video, ids_keep) + pos.to(video.dtype)

    def forward(self, x: torch.Tensor, ids_keep: torch.Tensor | None = None):
        if self.embed is not None:
            x = self.tokens(x, ids_keep)
        for layer in self.layers:
            x = layer(x)
        return x, self.norm(x)


class Decoder(nn.Module):
    """A block's decoder: (B, N_vis, D) visible features -> (B, N_mask, t*p*p*C) predicted tubes."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed = nn.Linear(cfg.embed_dim, cfg.dec_dim, bias=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.dec_dim))
        self.register_buffer("pos", position_table(cfg.pos_embed, cfg.grid, cfg.dec_dim), persistent=False)
        self.layers = nn.ModuleList(Layer(cfg.dec_dim, cfg.dec_heads, cfg.mlp_ratio, cfg.norm_eps)
                                    for _ in range(cfg.dec_depth))
        self.norm = nn.LayerNorm(cfg.dec_dim, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.dec_dim, cfg.tube_dim)

    def forward(self, z: torch.Tensor, ids_keep: torch.Tensor, ids_mask: torch.Tensor,
                target: torch.Tensor | None = None) -> torch.Tensor:
        """The predicted tubes, or with `target` (B, N_mask, t*p*p*C) their float32 mean squared error
        (inside this module, so that a compiled decoder fuses the loss and its gradient into one kernel
        each instead of writing float32 copies of the prediction)."""
        n_mask = ids_mask.shape[1]
        x = self.embed(z) + self.pos[ids_keep]  # (B, N_vis, Dd)
        m = self.mask_token + self.pos[ids_mask]  # (B, N_mask, Dd)
        x = torch.cat([x, m.to(x.dtype)], dim=1)  # visible first, then hidden (VideoMAE's order)
        for layer in self.layers:
            x = layer(x)
        pred = self.head(self.norm(x[:, -n_mask:]))
        return pred if target is None else F.mse_loss(pred.float(), target)


class VideoMAE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg.validate()
        rng = torch.random.get_rng_state()
        self.stages = nn.ModuleList(Stage(cfg, n, k == 0) for k, n in enumerate(cfg.partition))
        self.decoders = nn.ModuleList(Decoder(cfg) for _ in range(1 if cfg.dec_shared else len(cfg.partition)))
        shape = (1, cfg.in_chans, 1, 1, 1)
        mean, std = pixel_stats(cfg.in_chans)
        self.register_buffer("pixel_mean", torch.tensor(mean).view(shape), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(shape), persistent=False)
        # initialise from the RNG state at entry, encoder first in layer order: under one seed the
        # starting encoder is the same whatever the partition or decoders (E2E and BWSSL start matched)
        torch.random.set_rng_state(rng)
        self.stages.apply(init_weights)
        for dec in self.decoders:
            dec.apply(init_weights)
            nn.init.trunc_normal_(dec.mask_token, std=0.02)

    @property
    def layers(self) -> list[Layer]:
        """All encoder layers in order (global layer index)."""
        return [layer for stage in self.stages for layer in stage.layers]

    def block_decoder(self, k: int) -> Decoder:
        return self.decoders[0 if self.cfg.dec_shared else k]

    def check_input(self, video: torch.Tensor) -> None:
        c = self.cfg
        expected = (c.in_chans, c.num_frames, c.img_size, c.img_size)
        if video.dim() != 5 or tuple(video.shape[1:]) != expected:
            raise ConfigError(
                f"video of shape {tuple(video.shape)}: expected (B, C, T, H, W) = (B, {', '.join(map(str, expected))}) "
                f"for tubelet {c.tubelet_size}x{c.patch_size}x{c.patch_size}")

    def random_mask(self, batch: int, generator: torch.Generator | None = None) -> Mask:
        return tube_mask(batch, self.cfg.grid, self.cfg.mask_ratio, generator, self.pixel_mean.device, self.cfg.dec_keep)

    def target(self, video: torch.Tensor, ids_mask: torch.Tensor) -> torch.Tensor:
        """(B, N_mask, t*p*p*C) target for the hidden tubes of a normalised video."""
        pixels = video.float() * self.pixel_std + self.pixel_mean  # back to [0, 1]
        return tube_target(pixels, ids_mask, self.cfg.tubelet_size, self.cfg.patch_size, self.cfg.norm_target)

    def forward(self, video: torch.Tensor, mask: Mask | None = None, *, generator: torch.Generator | None = None,
                backward: Callable[[int, torch.Tensor], None] | None = None,
                stages: Sequence[nn.Module] | None = None, decoders: Sequence[nn.Module] | None = None,
                make_target: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
                ) -> list[torch.Tensor]:
        """Per-block reconstruction losses for a normalised video (B, C, T, H, W).

        mask: which tokens to hide; drawn from `generator` when None.
        backward: memory mode: called as backward(k, loss_k) as soon as block k's loss exists, so its
            activations are freed before the next block runs; the returned losses are then detached.
        stages, decoders, make_target: stand-ins for self.stages / self.decoders / self.target (the
            trainer passes DDP wrappers and compiled copies).
        """
        self.check_input(video)
        stages = self.stages if stages is None else stages
        decoders = self.decoders if decoders is None else decoders
        mask = self.random_mask(video.shape[0], generator) if mask is None else mask
        target = (make_target or self.target)(video, mask.decode)  # the hidden tubes the decoders reconstruct
        batched_decoder = self.cfg.dec_shared and backward is None  # one call for all blocks
        x, outputs, losses = video, [], []
        for k, stage in enumerate(stages):
            x, z = stage(x if k == 0 else x.detach(), mask.ids_keep)  # no gradient crosses a block boundary
            if batched_decoder:
                outputs.append(z)
                continue
            loss = decoders[0 if self.cfg.dec_shared else k](z, mask.ids_keep, mask.decode, target)
            if backward is not None:
                backward(k, loss)
                loss = loss.detach()
            losses.append(loss)
        if batched_decoder:
            K = len(outputs)
            pred = decoders[0](torch.cat(outputs), mask.ids_keep.repeat(K, 1), mask.decode.repeat(K, 1))
            losses = [F.mse_loss(p.float(), target) for p in pred.chunk(K)]
        return losses

    def forward_intermediates(self, video: torch.Tensor, mask: Mask | None = None,
                              indices: Sequence[int] | None = None, return_attn: bool = False):
        """Per-layer token features: the one door for analysis.

        video: normalised (B, C, T, H, W). mask: keep only its visible tokens (None: all L tokens,
        in (t, h, w) raster order). indices: layers to return (default all, 0-based).
        Returns a list of (B, N, D) layer outputs (the residual stream, before any block norm), and
        with return_attn also a list of (B, h, N, N) attention probabilities of the same layers.
        """
        self.check_input(video)
        layers = self.layers
        indices = range(len(layers)) if indices is None else [i % len(layers) for i in indices]
        wanted, last = set(indices), max(indices)
        x = self.stages[0].tokens(video, None if mask is None else mask.ids_keep)
        feats, attns = {}, {}
        for i, layer in enumerate(layers[:last + 1]):
            if return_attn:
                x, a = layer(x, return_attn=True)
                if i in wanted:
                    attns[i] = a
            else:
                x = layer(x)
            if i in wanted:
                feats[i] = x
        out = [feats[i] for i in indices]
        return (out, [attns[i] for i in indices]) if return_attn else out

    def block_parameters(self) -> list[list[nn.Parameter]]:
        """Parameters of each block with its own decoder; a shared decoder comes last, on its own (of two
        blocks or more: one block and its only decoder are one group, as E2E)."""
        groups = [list(s.parameters()) for s in self.stages]
        if self.cfg.dec_shared and len(groups) > 1:
            return groups + [list(self.decoders[0].parameters())]
        return [g + list(d.parameters()) for g, d in zip(groups, self.decoders)]
