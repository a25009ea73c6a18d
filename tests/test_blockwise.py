import pytest
import torch
import torch.nn.functional as F

from bwssl_core import VideoMAE
from bwssl_core.masking import tube_mask


def _mask(model, batch=4, seed=0):
    return tube_mask(batch, model.cfg.grid, model.cfg.mask_ratio, torch.Generator().manual_seed(seed))


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_isolation(tiny, clips):
    model = VideoMAE(tiny(partition=(1, 2, 1)))
    video, mask = clips(), _mask(model)
    for k in range(3):
        model.zero_grad(set_to_none=True)
        losses = model(video, mask)
        losses[k].backward()
        moved = {n.split(".")[0] + "." + n.split(".")[1] for n, p in model.named_parameters()
                 if p.grad is not None and p.grad.abs().sum() > 0}
        assert moved == {f"stages.{k}", f"decoders.{k}"}, k  # the embedding lives in stages.0
        expected = {n for n, _ in model.named_parameters() if n.startswith((f"stages.{k}.", f"decoders.{k}."))}
        got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        assert got == expected


def _reference_e2e_loss(model, video, mask):
    """VideoMAE written out by hand: embed, all layers, norm, decoder, MSE on normalised tubes."""
    c = model.cfg
    stage, dec = model.stages[0], model.decoders[0]
    x = stage.embed.proj(video).flatten(2).transpose(1, 2) + stage.pos
    x = torch.stack([x[b, mask.ids_keep[b]] for b in range(len(x))])
    for layer in stage.layers:
        x = layer(x)
    y = dec.embed(stage.norm(x)) + dec.pos[mask.ids_keep]
    y = torch.cat([y, dec.mask_token + dec.pos[mask.ids_mask]], 1)
    for layer in dec.layers:
        y = layer(y)
    pred = dec.head(dec.norm(y[:, -mask.ids_mask.shape[1]:]))
    pixels = video * model.pixel_std + model.pixel_mean
    B, C, T, H, W = pixels.shape
    t, p = c.tubelet_size, c.patch_size
    tubes = pixels.view(B, C, T // t, t, H // p, p, W // p, p).permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(B, -1, t * p * p, C)
    tubes = (tubes - tubes.mean(2, keepdim=True)) / (tubes.std(2, keepdim=True) + 1e-6)
    target = torch.stack([tubes[b, mask.ids_mask[b]] for b in range(B)]).flatten(2)
    return F.mse_loss(pred, target)


def test_one_block_is_exactly_e2e(tiny, clips):
    model = VideoMAE(tiny())
    video, mask = clips(), _mask(model)
    (loss,) = model(video, mask)
    loss.backward()
    ours = _grads(model)
    model.zero_grad()
    ref = _reference_e2e_loss(model, video, mask)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    for name, grad in _grads(model).items():
        torch.testing.assert_close(ours[name], grad, msg=name)


def test_blockwise_forward_equals_e2e_values(tiny, clips):
    """Detaching changes gradients, not values: with the same weights, the last block's loss of a
    K=2 model equals the E2E loss."""
    e2e = VideoMAE(tiny())
    bw = VideoMAE(tiny(partition=(2, 2)))
    sd = {}
    for name, value in e2e.state_dict().items():
        if name.startswith("stages.0.layers."):
            i = int(name.split(".")[3])
            name = f"stages.{i // 2}.layers.{i % 2}." + ".".join(name.split(".")[4:])
        elif name.startswith("stages.0.norm"):
            name = name.replace("stages.0", "stages.1")
        elif name.startswith("decoders.0"):
            name = name.replace("decoders.0", "decoders.1")
        sd[name] = value
    missing = bw.load_state_dict(sd, strict=False).missing_keys
    assert all(m.startswith(("stages.0.norm", "decoders.0")) for m in missing)
    video, mask = clips(), _mask(e2e)
    torch.testing.assert_close(bw(video, mask)[1], e2e(video, mask)[0])


@pytest.mark.parametrize("shared", [False, True])
def test_memory_mode_equals_joint_backward(tiny, clips, shared):
    model = VideoMAE(tiny(partition=(1, 2, 1), dec_shared=shared)).double()
    video, mask = clips().double(), _mask(model)
    joint = model(video, mask)
    torch.stack(joint).sum().backward()
    g_joint = _grads(model)
    model.zero_grad(set_to_none=True)
    seen = []
    memory = model(video, mask, backward=lambda k, loss: (seen.append(k), loss.backward()))
    assert seen == [0, 1, 2]
    assert all(not loss.requires_grad for loss in memory)
    torch.testing.assert_close(torch.stack(memory), torch.stack(joint).detach())
    g_memory = _grads(model)
    assert g_memory.keys() == g_joint.keys()
    for name in g_joint:
        torch.testing.assert_close(g_memory[name], g_joint[name], rtol=1e-10, atol=1e-12, msg=name)


def test_shared_decoder_is_one_module(tiny, clips):
    model = VideoMAE(tiny(partition=(2, 2), dec_shared=True))
    assert len(model.decoders) == 1
    own = VideoMAE(tiny(partition=(2, 2)))
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(own) - n(model) == n(own.decoders[1])
    # a shared decoder's gradient sums both blocks' contributions
    video, mask = clips(), _mask(model)
    losses = model(video, mask)
    losses[0].backward(retain_graph=True)
    g0 = model.decoders[0].head.weight.grad.clone()
    losses[1].backward()
    assert not torch.allclose(model.decoders[0].head.weight.grad, g0)


def test_block_parameters_cover_the_model_once(tiny):
    for kw, n in ((dict(partition=(1, 3)), 2), (dict(partition=(1, 3), dec_shared=True), 3),
                  (dict(partition=(4,), dec_shared=True), 1)):  # one block: its only decoder with it, as E2E
        model = VideoMAE(tiny(**kw))
        groups = model.block_parameters()
        flat = [id(p) for g in groups for p in g]
        assert sorted(flat) == sorted(id(p) for p in model.parameters())
        assert len(groups) == n, kw

