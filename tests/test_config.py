import pytest

from bwssl_core.config import PRESETS, ConfigError, ModelConfig, model_config, parse_partition


def test_presets_follow_videomae():
    b = model_config("vit_b")
    assert (b.embed_dim, b.depth, b.num_heads, b.dec_dim, b.dec_depth) == (768, 12, 12, 384, 4)
    assert b.grid == (8, 14, 14) and b.num_tokens == 1568
    assert b.num_visible == 8 * 20  # 0.9 of 196 spatial positions hidden: 20 kept per slice
    assert b.tube_dim == 2 * 16 * 16 * 3
    s, l = model_config("vit_s"), model_config("vit_l")
    assert (s.embed_dim, s.num_heads, s.dec_dim) == (384, 6, 192)
    assert (l.embed_dim, l.depth, l.num_heads, l.dec_dim) == (1024, 24, 16, 512)
    for name in PRESETS:
        model_config(name)  # every preset validates


def test_blocks_and_partition():
    assert model_config("vit_b", blocks=4).partition == (3, 3, 3, 3)
    assert model_config("vit_b", partition=(2, 4, 6)).spans == [(0, 2), (2, 6), (6, 12)]
    assert parse_partition("3,3,6") == (3, 3, 6)


@pytest.mark.parametrize("kwargs, words", [
    (dict(partition=(3, 3, 3)), ["partition='3,3,3'", "depth=12", "sum to 9"]),
    (dict(blocks=5), ["blocks=5", "divisor of depth=12"]),
    (dict(img_size=100), ["img_size=100", "multiple of patch_size=16"]),
    (dict(num_frames=15), ["num_frames=15", "multiple of tubelet_size=2"]),
    (dict(mask_ratio=1.0), ["mask_ratio=1.0"]),
    (dict(dec_keep=0.0), ["dec_keep=0.0", "(0, 1]"]),
    (dict(dec_keep=1.5), ["dec_keep=1.5"]),
    (dict(embed_dim=770), ["embed_dim=770", "num_heads=12"]),
    (dict(pos_embed="2d"), ["pos_embed='2d'"]),
    (dict(partition=(6.0, 6.0)), ["partition=(6.0, 6.0)", "integer layer counts"]),  # not a TypeError later
    (dict(partition=(True, 11)), ["partition=(True, 11)", "integer layer counts"]),  # not a block of 1 layer
    (dict(dec_dim=4, dec_heads=2), ["dec_dim=4", "at least 6 for 3-D sin-cos"]),  # time would get no channel
    (dict(embed_dim=2, num_heads=1), ["embed_dim=2", "at least 6 for 3-D sin-cos"]),
])
def test_bad_model_config_names_the_problem(kwargs, words):
    with pytest.raises(ConfigError) as err:
        model_config("vit_b", **kwargs)
    for w in words:
        assert w in str(err.value)


def test_unknown_preset_and_option():
    with pytest.raises(ConfigError, match="unknown preset 'vit_x'.*vit_s, vit_b"):
        model_config("vit_x")
    with pytest.raises(ConfigError, match="widht"):
        model_config("vit_b", widht=3)
    with pytest.raises(ConfigError, match="partition=.*3,x"):
        parse_partition("3,x")


def test_3d_sincos_needs_six_channels():
    from bwssl_core.layers import sincos_3d

    with pytest.raises(ValueError, match="dim=4: expected even and at least 6"):
        sincos_3d((2, 4, 4), 4)
    assert sincos_3d((2, 4, 4), 6).unique(dim=0).shape == (32, 6)  # every (t, h, w) its own row
    assert model_config("tiny", dec_dim=4, dec_heads=2, pos_embed="1d").dec_dim == 4  # VideoMAE's 1-D table


def test_any_divisible_shape():
    cfg = model_config("tiny", num_frames=6, img_size=40, tubelet_size=3, patch_size=8)
    assert cfg.grid == (2, 5, 5)
    assert ModelConfig(partition=(12,)).validate().num_tokens == 1568
