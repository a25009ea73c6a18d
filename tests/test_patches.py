import math

import torch

from bwssl_core import VideoMAE
from bwssl_core.masking import patchify, tube_mask
from bwssl_core.patches import influence_gradient, influence_occlusion, reconstructions


def test_gradient_influence_estimates_the_jacobian_norm(tiny, clips):
    model = VideoMAE(tiny(partition=(2, 2))).eval()
    video = clips(batch=1)
    est = influence_gradient(model, video, block=0, probes=256)
    assert est.shape == (1, *model.cfg.grid)
    f = lambda v: model.forward_intermediates(v, indices=[1])[0].mean(1)[0]  # noqa: E731  block 0's pooled output
    jac = torch.autograd.functional.jacobian(f, video)  # (D, 1, C, T, H, W)
    exact = patchify(jac.pow(2).sum(0), 2, 8).sum((2, 3)).sqrt().view(1, *model.cfg.grid)
    rel = ((est - exact).abs() / exact).mean()
    assert rel < 0.15, rel
    assert torch.corrcoef(torch.stack([est.flatten(), exact.flatten()]))[0, 1] > 0.9


def test_occlusion_influence_sees_only_tubes_that_change(tiny):
    model = VideoMAE(tiny()).eval()
    video = torch.full((1, 3, 4, 32, 32), 0.3)
    video[:, :, 0:2, 0:8, 0:8] += 1.0  # token 0
    video[:, :, 2:4, 8:16, 16:24] -= 1.0  # token 16 + 4 + 2 = 22: the clip mean stays 0.3
    occ = influence_occlusion(model, video, block=0).flatten()
    assert occ[0] > 0 and occ[22] > 0
    others = torch.ones(32, dtype=torch.bool)
    others[[0, 22]] = False
    assert occ[others].abs().max() < 1e-5


def test_reconstructions_per_block(tiny, clips):
    video = clips()
    for norm_target in (True, False):
        model = VideoMAE(tiny(partition=(2, 2), norm_target=norm_target)).eval()
        mask = tube_mask(4, model.cfg.grid, 0.75, torch.Generator().manual_seed(0))
        recs = reconstructions(model, video, mask)
        losses = model(video, mask)
        assert len(recs) == 2
        for rec, loss in zip(recs, losses):
            assert rec["reinjected"] is norm_target
            assert rec["pixels"].shape == video.shape and 0 <= rec["pixels"].min() and rec["pixels"].max() <= 1
            err = rec["error"].flatten(1)  # (B, L)
            assert err.gather(1, mask.ids_keep).isnan().all() and not err.gather(1, mask.ids_mask).isnan().any()
            assert math.isclose(err.gather(1, mask.ids_mask).mean().item(), loss.item(), rel_tol=1e-4)
            # visible tubes are the input's own pixels
            pixels = (video * model.pixel_std + model.pixel_mean).clamp(0, 1)
            keep = mask.ids_keep[..., None, None].expand(-1, -1, 128, 3)
            torch.testing.assert_close(patchify(rec["pixels"], 2, 8).gather(1, keep), patchify(pixels, 2, 8).gather(1, keep))
