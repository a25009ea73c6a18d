"""Similarity and change across depth, and attention metrics, for one model or two (E2E vs BWSSL)."""
from __future__ import annotations

import torch

from .attention import layer_summary
from .batches import normalize_video
from .config import ConfigError
from .model import VideoMAE
from .similarity import consecutive_cka, effective_rank, knn_overlap, minibatch_cka, relative_change


@torch.no_grad()
def pooled_layers(model: VideoMAE, clips: torch.Tensor, batch_size: int, device) -> tuple[list, list[float]]:
    """Mean-pooled features per layer [(N, D)] and the token-level relative change between
    consecutive layers, sqrt(sum ||x_l+1 - x_l||^2 / sum ||x_l||^2) over all tokens of all clips."""
    model = model.to(device).eval()
    pairs = len(model.layers) - 1  # consecutive layers (none in a one-layer encoder)
    means, diff, norm = [], torch.zeros(pairs, dtype=torch.float64), torch.zeros(pairs, dtype=torch.float64)
    for batch in clips.split(batch_size):
        feats = model.forward_intermediates(normalize_video(batch.to(device)))  # [(B, L, D)]
        means.append(torch.stack([f.mean(1) for f in feats]).double().cpu())  # (layers, B, D)
        if pairs:
            diff += torch.stack([(b - a).double().pow(2).sum() for a, b in zip(feats, feats[1:])]).cpu()
            norm += torch.stack([a.double().pow(2).sum() for a in feats[:-1]]).cpu()
    return list(torch.cat(means, 1).unbind(0)), (diff / norm).sqrt().tolist()


def analyze(model: VideoMAE, clips: torch.Tensor, other: VideoMAE | None = None, batch_size: int = 50,
            attention_clips: int = 8, knn: int = 10, device="cpu", other_clips: torch.Tensor | None = None,
            seed: int = 0) -> dict:
    """CKA across layers (minibatch, over fixed batches of `batch_size` clips in a random order drawn from
    `seed`; a short last batch is left out of CKA only), change between consecutive layers, effective rank and
    attention metrics over the first `attention_clips` clips (none when 0).
    clips: uint8 (N, C, T, H, W). With `other`, also the CKA matrix between the two models' layers, over
    the same videos: `other_clips` where `other` reads them at its own clip size, else `clips`."""
    if len(model.layers) < 2:
        raise ConfigError(f"a {len(model.layers)}-layer encoder: the analysis compares consecutive layers, "
                          "expected at least 2")
    if not isinstance(batch_size, int) or batch_size < 4:  # the unbiased HSIC needs 4 samples a batch
        raise ConfigError(f"batch_size={batch_size}: expected an integer >= 4 (clips per minibatch-CKA batch)")
    usable = len(clips) // batch_size * batch_size
    if usable < batch_size:
        raise ConfigError(f"{len(clips)} clips, fewer than one CKA batch of {batch_size}")
    other_clips = clips if other_clips is None else other_clips
    if other is not None and len(other_clips) != len(clips):
        raise ConfigError(f"other_clips: {len(other_clips)} clips, expected the same {len(clips)} videos as clips")
    pooled, token_change = pooled_layers(model, clips, batch_size, device)
    out = {"layers": len(pooled), "clips": len(clips), "cka_clips": usable, "cka_seed": seed,
           "token_relative_change": token_change, "pooled_relative_change": relative_change(pooled),
           "consecutive_cka": consecutive_cka(pooled), "knn_overlap": knn_overlap(pooled, knn),
           "effective_rank": [effective_rank(p) for p in pooled]}
    out["cka_within"] = minibatch_cka(pooled, None, batch_size, seed).tolist()
    if other is not None:
        other_pooled, other_change = pooled_layers(other, other_clips, batch_size, device)
        out["cka_across"] = minibatch_cka(pooled, other_pooled, batch_size, seed).tolist()
        out["other_token_relative_change"] = other_change
    if attention_clips:  # 0: callers that draw attention elsewhere skip it
        out["attention"] = layer_summary(model.to(device), normalize_video(clips[:attention_clips].to(device)))
    return out
