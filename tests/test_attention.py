import math

import torch

from bwssl_core import VideoMAE
from bwssl_core.attention import (attention_entropy, attention_rollout, layer_summary, mean_attention_distance,
                                  self_attention, token_positions)
from bwssl_core.masking import tube_mask


def test_token_positions_follow_the_3d_grid(tiny):
    cfg = tiny()  # grid (2, 4, 4), tubelet 2 x 8 x 8
    pos = token_positions(cfg)
    assert pos.shape == (32, 3)
    assert pos[0].tolist() == [0.5, 3.5, 3.5]
    assert pos[16 + 4 * 2 + 3].tolist() == [2.5, 2 * 8 + 3.5, 3 * 8 + 3.5]  # t=1, h=2, w=3
    ids = torch.tensor([[0, 5], [31, 16]])
    assert torch.equal(token_positions(cfg, ids)[1, 0], pos[31])


def test_mean_attention_distance_by_brute_force(tiny):
    cfg = tiny()
    pos = token_positions(cfg)
    N = len(pos)
    identity = torch.eye(N).expand(2, 3, N, N)
    s, t = mean_attention_distance(identity, pos)
    assert s.tolist() == [0.0] * 3 and t.tolist() == [0.0] * 3
    uniform = torch.full((1, 1, N, N), 1.0 / N)
    s, t = mean_attention_distance(uniform, pos)
    brute_s = sum(math.dist(p[1:], q[1:]) for p in pos.tolist() for q in pos.tolist()) / N / N
    brute_t = sum(abs(p[0] - q[0]) for p in pos.tolist() for q in pos.tolist()) / N / N
    assert abs(s.item() - brute_s) < 1e-4 and abs(t.item() - brute_t) < 1e-5
    # every token looks at the same spatial place in the other temporal slice: space 0, time 2 frames
    other = torch.zeros(1, 1, N, N)
    idx = torch.arange(N)
    other[0, 0, idx, (idx + 16) % 32] = 1
    s, t = mean_attention_distance(other, pos)
    assert s.item() == 0 and t.item() == 2.0


def test_mean_attention_distance_follows_the_attention_device(tiny):
    # token_positions builds on the CPU; on a GPU the attention is elsewhere (the GPU study's notebook
    # 03 failed so). "meta" stands in for the other device here: a mix would raise
    attn = torch.full((1, 2, 32, 32), 1 / 32, device="meta")
    spatial, temporal = mean_attention_distance(attn, token_positions(tiny()))
    assert spatial.device.type == temporal.device.type == "meta" and spatial.shape == (2,)


def test_entropy_self_attention_and_rollout():
    N = 6
    uniform = torch.full((2, 2, N, N), 1 / N)
    eye = torch.eye(N).expand(2, 2, N, N)
    torch.testing.assert_close(attention_entropy(uniform), torch.full((2,), math.log(N)))
    torch.testing.assert_close(attention_entropy(eye), torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(self_attention(uniform), torch.full((2,), 1 / N))
    torch.testing.assert_close(self_attention(eye), torch.ones(2))
    torch.testing.assert_close(attention_rollout([eye, eye]), torch.eye(N).expand(2, N, N))
    rolled = attention_rollout([uniform, uniform])
    torch.testing.assert_close(rolled.sum(-1), torch.ones(2, N))
    # one layer of uniform attention: 0.5 / N to every token plus 0.5 to itself
    torch.testing.assert_close(attention_rollout([uniform])[0, 0, :2], torch.tensor([0.5 + 0.5 / N, 0.5 / N]))
    # two layers that do not commute: rollout = A2_hat @ A1_hat (the later layer on the left), A_hat the head
    # mean mixed half-and-half with the identity (rows already sum to one)
    a1, a2 = (torch.randn(1, 3, N, N, generator=torch.Generator().manual_seed(s)).softmax(-1) for s in (1, 2))
    hat = [0.5 * a.mean(1) + 0.5 * torch.eye(N) for a in (a1, a2)]
    assert not torch.allclose(hat[1] @ hat[0], hat[0] @ hat[1], atol=1e-3)
    torch.testing.assert_close(attention_rollout([a1, a2]), hat[1] @ hat[0])


def test_layer_summary_on_a_model_with_and_without_mask(tiny, clips):
    model = VideoMAE(tiny(partition=(2, 2)))
    video = clips()
    rows = layer_summary(model, video)
    assert len(rows) == 4 and len(rows[0]["spatial_px"]) == model.cfg.num_heads
    assert all(0 < v < 32 for r in rows for v in r["spatial_px"])
    mask = tube_mask(4, model.cfg.grid, 0.75, torch.Generator().manual_seed(0))
    masked = layer_summary(model, video, mask)
    assert masked[0]["entropy"][0] < rows[0]["entropy"][0]  # fewer tokens to spread over


def test_moving_tubes_find_where_the_clip_changes_and_attention_to_them(tiny):
    """A bright square that moves right across the clip beside one that stands still: the four tubes the
    moving one enters or leaves are found, never the still one's; attention to them is their share of
    each query's row."""
    from bwssl_core.attention import attention_to, moving_tubes

    cfg = tiny()  # grid (2, 4, 4), tubelet 2 x 8 x 8: 32 tubes
    video = torch.zeros(1, 3, 4, 32, 32)
    video[:, :, :, 0:8, 0:8] = 1.0  # standing still in tube row 0, column 0
    for f in range(1, 4):
        video[:, :, f, 24:32, 8 * f:8 * f + 8] = 1.0  # row 3, column f in frame f
    moving = moving_tubes(video, cfg, share=4 / 32)
    expected = torch.zeros(2, 4, 4, dtype=torch.bool)
    expected[0, 3, 1] = expected[1, 3, 1] = expected[1, 3, 2] = expected[1, 3, 3] = True  # (slice, row, col)
    assert torch.equal(moving.view(2, 4, 4), expected)
    clip = torch.full((1, 3, 4, 32, 32), 100, dtype=torch.uint8)  # uint8: a darkening must not wrap around
    clip[:, :, 1:, 0:8, 0:8] -= 10  # tube (0, 0, 0) darkens by 10, tube (0, 1, 1) brightens by 30
    clip[:, :, 1:, 8:16, 8:16] += 30
    assert moving_tubes(clip, cfg, share=1 / 32).nonzero()[:, 1].tolist() == [5]
    assert moving_tubes(video, cfg).sum() == 3  # the default share: round(0.1 * 32) tubes
    uniform = torch.full((1, 2, 32, 32), 1 / 32)
    assert attention_to(uniform, moving).tolist() == [4 / 32] * 2
    onehot = torch.zeros(1, 2, 32, 32)
    onehot[:, 0, :, 16 + 3 * 4 + 2] = 1.0  # head 0 looks only at a moving tube, head 1 at the still square
    onehot[:, 1, :, 0] = 1.0
    assert attention_to(onehot, moving).tolist() == [1.0, 0.0]


def test_moving_tubes_mark_every_tube_slice_alike_under_uniform_motion(tiny):
    """A bright square shakes between tube columns 1 and 2 every frame, a dimmer one (0.75) in another row:
    every frame changes alike, so the bright square's two tubes are the moving ones in every tube slice, the
    first too (a frame 0 counted as unchanged halved its change at tubelet 2 and zeroed it at tubelet 1)."""
    from bwssl_core.attention import moving_tubes

    for tubelet in (1, 2):
        cfg = tiny(tubelet_size=tubelet)  # grid (4 / tubelet, 4, 4)
        video = torch.zeros(1, 3, 4, 32, 32)
        for f in range(4):
            x = 8 + 8 * (f % 2)
            video[:, :, f, 0:8, x:x + 8] = 1.0  # tube row 0, column 1 or 2
            video[:, :, f, 24:32, x:x + 8] = 0.75  # tube row 3
        slices = cfg.grid[0]
        moving = moving_tubes(video, cfg, share=2 * slices / cfg.num_tokens).view(cfg.grid)
        assert moving.sum((1, 2)).tolist() == [2] * slices, tubelet
        assert moving[:, 0, 1:3].all(), tubelet
    assert moving_tubes(video[:, :, :1], tiny(num_frames=1, tubelet_size=1)).sum() == 2  # one frame: no change
