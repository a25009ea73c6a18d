import pytest
import torch
import torch.nn.functional as F

from bwssl_core import ConfigError, VideoMAE
from bwssl_core.layers import sincos_1d_interleaved, sincos_3d
from bwssl_core.config import model_config
from bwssl_core.masking import tube_mask


@pytest.mark.parametrize("kw", [
    dict(),
    dict(partition=(2, 2)),
    dict(partition=(1, 2, 1), dec_shared=True),
    dict(partition=(1, 1, 1, 1), dec_norm=False, norm_target=False),
    dict(pos_embed="1d", dec_depth=2, dec_dim=24, dec_heads=3),
    dict(partition=(2, 2), dec_keep=0.5),
])
def test_every_parameter_learns_and_losses_are_finite(tiny, clips, kw):
    model = VideoMAE(tiny(**kw))
    losses = model(clips(), generator=torch.Generator().manual_seed(0))
    assert len(losses) == len(model.cfg.partition)
    assert all(torch.isfinite(loss) and loss.ndim == 0 for loss in losses)
    torch.stack(losses).sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


def test_decoder_predicts_masked_tubes(tiny, clips):
    model = VideoMAE(tiny())
    c = model.cfg
    mask = tube_mask(4, c.grid, c.mask_ratio, torch.Generator().manual_seed(0))
    x, z = model.stages[0](clips(), mask.ids_keep)
    assert x.shape == (4, c.num_visible, c.embed_dim)
    pred = model.decoders[0](z, mask.ids_keep, mask.ids_mask)
    assert pred.shape == (4, c.num_tokens - c.num_visible, c.tube_dim)
    target = model.target(clips(), mask.ids_mask)
    loss = model.decoders[0](z, mask.ids_keep, mask.ids_mask, target)  # with a target: its loss
    assert loss.shape == () and loss > 0
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(pred, target), rtol=0, atol=0)
    assert model(clips(), mask)[0] == loss  # the loss the model trains on


def test_visible_tubes_embed_as_the_convolution_does(tiny, clips):
    """Embedding only the visible tubes (gather, then one matmul) equals the tubelet convolution over
    the whole clip followed by the gather."""
    model = VideoMAE(tiny())
    c, video = model.cfg, clips()
    mask = tube_mask(4, c.grid, c.mask_ratio, torch.Generator().manual_seed(0))
    embed = model.stages[0].embed
    every = embed(video)  # (B, L, D) by the convolution
    ids = mask.ids_keep[:, :, None].expand(-1, -1, c.embed_dim)
    torch.testing.assert_close(embed(video, mask.ids_keep), every.gather(1, ids), atol=1e-5, rtol=1e-5)


def test_attention_path_matches_sdpa(tiny, clips):
    model = VideoMAE(tiny())
    video = clips()
    fast = model.forward_intermediates(video)
    slow, attn = model.forward_intermediates(video, return_attn=True)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    L = model.cfg.num_tokens
    assert attn[0].shape == (4, model.cfg.num_heads, L, L)
    torch.testing.assert_close(attn[2].sum(-1), torch.ones(4, model.cfg.num_heads, L))


def test_forward_intermediates(tiny, clips):
    model = VideoMAE(tiny(partition=(1, 3)))
    c, video = model.cfg, clips()
    feats = model.forward_intermediates(video)
    assert len(feats) == c.depth and feats[0].shape == (4, c.num_tokens, c.embed_dim)
    # the last layer's output is the raw output of the last block
    mask = tube_mask(4, c.grid, c.mask_ratio, torch.Generator().manual_seed(0))
    x, _ = model.stages[0](video, mask.ids_keep)
    x, _ = model.stages[1](x)
    visible = model.forward_intermediates(video, mask, indices=[1, -1])
    assert len(visible) == 2 and visible[0].shape == (4, c.num_visible, c.embed_dim)
    torch.testing.assert_close(visible[1], x)


def test_sincos_3d_is_separable_and_distinct():
    table = sincos_3d((4, 3, 5), 48)  # 16 channels each for t, h, w
    assert table.shape == (60, 48)
    grid = table.view(4, 3, 5, 48)
    # the time channels depend on t only, the height channels on h only
    assert torch.equal(grid[:, :1, :1, :16].expand(4, 3, 5, 16), grid[..., :16])
    assert torch.equal(grid[:1, :, :1, 16:32].expand(4, 3, 5, 16), grid[..., 16:32])
    assert torch.cdist(table, table).add(torch.eye(60)).min() > 0.1  # every position distinct


def test_videomae_position_table_is_the_official_formula():
    """VideoMAE's get_sinusoid_encoding_table (pos / 10000^(2 (j // 2) / d), in float64, sin on even channels,
    cos on odd) at ViT-B's 1,568 tokens and width 768, to float32 rounding (it was 2.2e-5 off when the
    exponent was computed in float32)."""
    pos, j = torch.arange(1568, dtype=torch.float64)[:, None], torch.arange(768, dtype=torch.float64)[None]
    angles = pos / 10000.0 ** (2 * torch.div(j, 2, rounding_mode="floor") / 768)
    official = torch.where(j.long() % 2 == 0, angles.sin(), angles.cos())
    torch.testing.assert_close(sincos_1d_interleaved(1568, 768).double(), official, atol=1e-7, rtol=0)


def test_plain_pixel_switch_changes_the_target(tiny, clips):
    video = clips()
    torch.manual_seed(0)
    norm = VideoMAE(tiny())
    torch.manual_seed(0)
    plain = VideoMAE(tiny(norm_target=False))
    ids = tube_mask(4, norm.cfg.grid, 0.75, torch.Generator().manual_seed(0)).ids_mask
    t_norm, t_plain = norm.target(video, ids), plain.target(video, ids)
    assert t_plain.min() >= 0 and t_plain.max() <= 1  # pixels back in [0, 1]
    assert not torch.allclose(t_norm, t_plain)


def test_clip_that_does_not_fit_is_refused(tiny, clips):
    model = VideoMAE(tiny())
    with pytest.raises(ConfigError, match=r"video of shape \(4, 3, 4, 30, 30\).*\(B, 3, 4, 32, 32\).*tubelet 2x8x8"):
        model(F.interpolate(clips(), size=(4, 30, 30)))


def test_starting_encoder_depends_on_the_seed_only():
    """E2E and BWSSL runs with one seed start from the same encoder, whatever the partition or decoders."""
    from bwssl_core.features import encoder_hash

    hashes = set()
    for kw in (dict(), dict(blocks=2), dict(blocks=4, dec_shared=True), dict(blocks=2, dec_depth=2)):
        torch.manual_seed(3)
        hashes.add(encoder_hash(VideoMAE(model_config("tiny", **kw))))
    torch.manual_seed(4)
    other = encoder_hash(VideoMAE(model_config("tiny")))
    assert len(hashes) == 1 and other not in hashes
