import torch

from bwssl_core.masking import Mask, patchify, tube_mask, tube_target, unpatchify


def test_tube_mask_invariants():
    grid, B = (4, 6, 6), 5
    m = tube_mask(B, grid, 0.75, torch.Generator().manual_seed(0))
    hidden = m.hidden.view(B, *grid)  # (B, T', H', W')
    # the same spatial mask in every temporal slice
    assert torch.equal(hidden, hidden[:, :1].expand_as(hidden))
    # the same count for every clip: 36 - int(0.75 * 36) = 9 kept per slice
    assert m.ids_keep.shape == (B, 4 * 9) and m.ids_mask.shape == (B, 4 * 27)
    assert (~m.hidden).sum(1).tolist() == [36] * B
    # keep and mask partition the tokens, both ascending
    both = torch.cat([m.ids_keep, m.ids_mask], 1).sort(1).values
    assert torch.equal(both, torch.arange(144).expand(B, -1))
    assert (m.ids_keep.diff(dim=1) > 0).all() and (m.ids_mask.diff(dim=1) > 0).all()
    # clips differ from each other
    assert len({tuple(r) for r in hidden[:, 0].flatten(1).tolist()}) > 1


def test_tube_mask_deterministic_per_seed():
    draw = lambda seed: tube_mask(3, (2, 4, 4), 0.5, torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(draw(1).ids_keep, draw(1).ids_keep)
    assert not torch.equal(draw(1).ids_keep, draw(2).ids_keep)


def test_mask_from_hidden_round_trip():
    m = tube_mask(3, (2, 4, 4), 0.5, torch.Generator().manual_seed(3))
    back = Mask.from_hidden(m.hidden)
    assert torch.equal(back.ids_keep, m.ids_keep) and torch.equal(back.ids_mask, m.ids_mask)


def test_patchify_layout_and_inverse():
    video = torch.randn(2, 3, 4, 16, 24)
    tubes = patchify(video, 2, 8)  # (B, L, t*p*p, C)
    assert tubes.shape == (2, 2 * 2 * 3, 2 * 8 * 8, 3)
    # token 0 is the top-left tube of the first two frames, channel last
    assert torch.equal(tubes[0, 0, :, 1], video[0, 1, :2, :8, :8].reshape(-1))
    # token index runs over (t, h, w): token 4 is row 1, column 1 of the first temporal slice
    assert torch.equal(tubes[1, 4, :, 2], video[1, 2, :2, 8:16, 8:16].reshape(-1))
    assert torch.equal(unpatchify(tubes.flatten(2), (2, 2, 3), 2, 8), video)


def test_target_normalised_per_tube_and_channel():
    pixels = torch.rand(2, 3, 4, 16, 16)
    ids = torch.tensor([[0, 3, 5], [1, 2, 7]])
    target = tube_target(pixels, ids, 2, 8).view(2, 3, 2 * 8 * 8, 3)
    tube = pixels[1, 0, 0:2, 0:8, 8:16].reshape(-1)  # batch 1, token 1, channel 0
    expected = (tube - tube.mean()) / (tube.std(unbiased=True) + 1e-6)
    torch.testing.assert_close(target[1, 0, :, 0], expected)
    assert torch.allclose(target.mean(2), torch.zeros(2, 3, 3), atol=1e-5)
    plain = tube_target(pixels, ids, 2, 8, normalize=False).view(2, 3, 128, 3)
    torch.testing.assert_close(plain[1, 0, :, 0], tube)


def test_decoder_masking_draws_a_subset_of_the_hidden_tokens_after_the_same_mask():
    """dec_keep < 1 leaves the tube mask as it was (the decoder's subset is drawn after it) and picks
    round(N_mask * dec_keep) of the hidden tokens per clip, ascending, different across clips; a row
    slice keeps the rows of all three."""
    g = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    full, half = tube_mask(5, (4, 6, 6), 0.75, g()), tube_mask(5, (4, 6, 6), 0.75, g(), dec_keep=0.5)
    assert full.ids_decode is None and full.decode is full.ids_mask
    assert torch.equal(full.ids_keep, half.ids_keep) and torch.equal(full.ids_mask, half.ids_mask)
    assert half.decode.shape == (5, 54)  # 108 hidden, half of them
    assert all(set(d.tolist()) <= set(m.tolist()) for d, m in zip(half.decode, half.ids_mask))
    assert (half.decode.diff(dim=1) > 0).all()
    assert len({tuple(r) for r in half.decode.tolist()}) == 5
    assert torch.equal(half[1:3].decode, half.decode[1:3])


def test_model_loss_covers_only_the_decoded_tokens(tiny, clips):
    """With decoder masking the loss is the MSE over the decoded subset of the hidden tubes: it equals
    the full model's loss computed with a mask whose hidden set is that subset for the decoder."""
    from bwssl_core import VideoMAE

    cfg = tiny(dec_keep=0.5)
    model, video = VideoMAE(cfg), clips()
    mask = tube_mask(4, cfg.grid, cfg.mask_ratio, torch.Generator().manual_seed(0), dec_keep=0.5)
    (loss,) = model(video, mask)
    x, z = model.stages[0](video, mask.ids_keep)
    for stage in model.stages[1:]:
        x, z = stage(x)
    pred = model.decoders[0](z, mask.ids_keep, mask.ids_decode)
    assert pred.shape[1] == cfg.num_decoded == 12
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(pred, model.target(video, mask.ids_decode)))


def test_each_step_draws_its_own_mask():
    """The training mask is drawn from (seed, step): another step, another mask; the same step, the same."""
    from bwssl_core import TrainConfig, model_config
    from bwssl_core.train import step_mask

    m, t = model_config("tiny"), TrainConfig(batch_size=4)
    assert not torch.equal(step_mask(m, t, 0, "cpu").ids_keep, step_mask(m, t, 1, "cpu").ids_keep)
    assert torch.equal(step_mask(m, t, 1, "cpu").ids_keep, step_mask(m, t, 1, "cpu").ids_keep)
    assert not torch.equal(step_mask(m, t, 1, "cpu").ids_keep, step_mask(m, TrainConfig(batch_size=4, seed=1), 1,
                                                                         "cpu").ids_keep)
