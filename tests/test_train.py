import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from bwssl_core import TrainConfig, model_config
from bwssl_core.batches import MovingShapes
from bwssl_core.io import RunError, load_checkpoint
from bwssl_core.train import Trainer, load_run, lr_at, param_groups, pretrain
from bwssl_core.model import VideoMAE


def _train_cfg(**kw):
    values = dict(steps=8, batch_size=4, base_lr=0.05, warmup_steps=2, log_every=2, ckpt_every=4)
    return TrainConfig(**{**values, **kw})


def _weights(run):
    return load_checkpoint(run / "checkpoint.pt")["model"]


def _assert_same(a, b, exact=True):
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            # Adam divides by sqrt(v): round-off in a near-zero gradient moves a weight by a small
            # fraction of one step (lr ~8e-4 here); 1e-5 is about 1% of a step, so a real difference fails
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5, msg=k)


@pytest.mark.parametrize("blocks", [1, 2])
def test_tiny_model_overfits_a_few_clips(tiny, tmp_path, blocks):
    cfg = tiny(partition=(4,) if blocks == 1 else (2, 2))
    video = MovingShapes(cfg, 4, seed=0).batch(0)  # the same 4 clips at every step, fresh masks
    # 300 steps: after 150 the loss was 0.37-0.51 of its start over seeds 0-2, too near the bar; after 250, 0.30-0.41
    trainer = Trainer(cfg, _train_cfg(steps=300, base_lr=0.1, warmup_steps=10), tmp_path, device="cpu")
    history = torch.stack([torch.stack(trainer.train_step(video)) for _ in range(300)])  # (steps, K)
    first, last = history[:5].mean(0), history[-10:].mean(0)
    assert (last < first / 2).all(), (first, last)


def test_schedule_and_decay_groups(tiny):
    t = TrainConfig(steps=100, batch_size=512, base_lr=1e-3, min_lr=1e-5, warmup_steps=10)
    peak, floor = 1e-3 * 512 / 256, 1e-5 * 512 / 256  # both scaled by batch / 256, as VideoMAE scales them
    assert lr_at(0, t) == pytest.approx(peak / 10)
    assert lr_at(9, t) == pytest.approx(peak)
    assert lr_at(55, t) == pytest.approx(floor + (peak - floor) / 2)
    assert lr_at(100, t) == pytest.approx(floor)
    assert all(lr_at(s, t) > lr_at(s + 1, t) for s in range(10, 100))
    small = TrainConfig(batch_size=8, base_lr=1.5e-4, min_lr=1e-5, warmup_steps=0, steps=10)  # peak 4.7e-6
    assert lr_at(10, small) == pytest.approx(1e-5 * 8 / 256)  # decays at a small batch too (was flat at the peak)
    assert all(lr_at(s, small) > lr_at(s + 1, small) for s in range(10))
    assert lr_at(10, TrainConfig(batch_size=8, base_lr=1e-6, min_lr=1e-5, warmup_steps=0, steps=10)) == \
        pytest.approx(1e-6 * 8 / 256)  # a floor above the peak: the peak
    model = VideoMAE(tiny(partition=(2, 2)))
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.05
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert "decoders.0.mask_token" in skipped and "stages.1.norm.weight" in skipped
    assert "stages.0.layers.0.attn.q_bias" in skipped and no_decay["weight_decay"] == 0


def test_run_folder_contents(tiny, tmp_path):
    cfg = tiny(partition=(2, 2))
    pretrain(cfg, _train_cfg(), MovingShapes(cfg, 4, seed=0), tmp_path, device="cpu")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model"]["partition"] == [2, 2] and config["train"]["steps"] == 8
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6, 8]
    assert all(len(r["loss"]) == 2 and r["clips_per_s"] > 0 and r["peak_mem_gib"] > 0 and r["lr"] > 0 for r in rows)
    model, saved = load_run(tmp_path)
    assert saved["model"] == config["model"] and not model.training
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 8


def test_runs_are_never_silently_overwritten(tiny, tmp_path):
    cfg = tiny()
    pretrain(cfg, _train_cfg(steps=2), MovingShapes(cfg, 4), tmp_path, device="cpu")
    before = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(RunError, match="already holds a run.*--resume.*--overwrite"):
        Trainer(cfg, _train_cfg(steps=2), tmp_path, device="cpu")
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    pretrain(cfg, _train_cfg(steps=2, seed=5), MovingShapes(cfg, 4), tmp_path, device="cpu", overwrite=True)
    assert json.loads((tmp_path / "config.json").read_text())["train"]["seed"] == 5


def test_resume_refuses_another_config(tiny, tmp_path):
    cfg = tiny(partition=(2, 2))
    pretrain(cfg, _train_cfg(steps=2), MovingShapes(cfg, 4), tmp_path, device="cpu")
    with pytest.raises(RunError, match=r"model\.partition: run has \[2, 2\], now \[1, 3\]"):
        Trainer(tiny(partition=(1, 3)), _train_cfg(steps=2), tmp_path, resume=True, device="cpu")
    with pytest.raises(RunError, match=r"train\.base_lr: run has 0\.05, now 0\.01"):
        Trainer(cfg, _train_cfg(steps=2, base_lr=0.01), tmp_path, resume=True, device="cpu")
    with pytest.raises(RunError, match="no checkpoint"):
        Trainer(cfg, _train_cfg(), tmp_path / "elsewhere", resume=True, device="cpu")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"version": 1, "model": _Evil()}, path)
    with pytest.raises(RunError, match="refused or unreadable with weights_only=True"):
        load_checkpoint(path)
    torch.save({"version": 99}, path)
    with pytest.raises(RunError, match="checkpoint version 99, expected 1"):
        load_checkpoint(path)


@pytest.mark.parametrize("shared", [False, True])
def test_memory_mode_trains_the_same_weights(tiny, tmp_path, shared):
    cfg = tiny(partition=(1, 3), dec_shared=shared)
    runs = {}
    for mode in (False, True):
        out = tmp_path / f"mode{mode}"
        pretrain(cfg, _train_cfg(steps=4, per_block_backward=mode), MovingShapes(cfg, 4), out, device="cpu")
        runs[mode] = _weights(out)
    _assert_same(runs[False], runs[True], exact=False)


def test_one_block_with_a_shared_decoder_trains_as_e2e(tiny, tmp_path):
    """K=1: the only decoder is clipped with the encoder, as E2E's (clip_grad small: clipping is active)."""
    runs = {}
    for shared in (False, True):
        cfg = tiny(partition=(4,), dec_shared=shared)
        out = tmp_path / f"shared{shared}"
        pretrain(cfg, _train_cfg(steps=4, clip_grad=0.02), MovingShapes(cfg, 4), out, device="cpu")
        runs[shared] = _weights(out)
    _assert_same(runs[False], runs[True])


def test_each_run_starts_a_new_gpu_memory_peak(tiny, tmp_path, monkeypatch):
    """peak_mem_gib of a run trained after another in one process (notebook 01) is its own on a GPU; the
    CPU's figure, the process's peak RSS, cannot be reset."""
    import bwssl_core.train as train
    from bwssl_core.train import reset_peak_memory

    resets = []
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", resets.append)
    reset_peak_memory(torch.device("cpu"))
    reset_peak_memory(torch.device("cuda", 1))
    assert resets == [torch.device("cuda", 1)]
    monkeypatch.setattr(train, "reset_peak_memory", resets.append)
    trainer = Trainer(tiny(), _train_cfg(steps=1), tmp_path, device="cpu")
    assert resets[1:] == [trainer.device]  # when a Trainer starts


KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from bwssl_core import TrainConfig, model_config
    from bwssl_core.batches import MovingShapes
    from bwssl_core.train import pretrain
    cfg = model_config("tiny", partition=(2, 2))
    source = MovingShapes(cfg, 4, seed=0)
    def data(start, rank, world):
        for step, batch in enumerate(source(start, rank, world), start):
            if step == int(sys.argv[2]):
                os.kill(os.getpid(), signal.SIGKILL)  # kill -9 in the middle of the run
            yield batch
    pretrain(cfg, TrainConfig(steps=8, batch_size=4, base_lr=0.05, warmup_steps=2, log_every=2, ckpt_every=4),
             data, sys.argv[1], device="cpu")
""")


def test_kill_and_resume_gives_the_same_weights(tmp_path):
    cfg = model_config("tiny", partition=(2, 2))
    t = _train_cfg()
    pretrain(cfg, t, MovingShapes(cfg, 4, seed=0), tmp_path / "whole", device="cpu")
    killed = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(killed), "6"], capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert load_checkpoint(killed / "checkpoint.pt")["step"] == 4
    assert json.loads((killed / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 6
    pretrain(cfg, t, MovingShapes(cfg, 4, seed=0), killed, device="cpu", resume=True)
    _assert_same(_weights(killed), _weights(tmp_path / "whole"))
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8]  # the lines past the checkpoint were replaced, not repeated


@pytest.mark.parametrize("dec_keep", [1.0, 0.5])  # in turn in one process: the decoders' token count changes
def test_compiled_blocks_train_like_eager(tiny, tmp_path, dec_keep):
    """--compile: every block and decoder (with its loss) and the target through torch.compile (inductor on
    the CPU here), also for a second configuration compiled in the same process: the same losses and
    gradients at every step. (Not the weights: Adam turns round-off in a near-zero gradient element into
    up to a whole step of difference, so compiled weights can differ by more than round-off.) A little noise
    on the clip: a hidden tube of one flat colour has a std of round-off, and the target's (x - mean) / (std
    + 1e-6), VideoMAE's, turns the two paths' round-off into differences of 1e-4 in the loss."""
    cfg = tiny(partition=(2, 2), dec_keep=dec_keep)
    video = MovingShapes(cfg, 4).batch(0)
    video = video + 0.05 * torch.randn(video.shape, generator=torch.Generator().manual_seed(0))
    grads, losses = {}, {}
    for compiled in (False, True):
        trainer = Trainer(cfg, _train_cfg(steps=3, compile=compiled), tmp_path / str(compiled), device="cpu")
        grads[compiled] = []
        trainer.optimizer.register_step_pre_hook(  # each step's gradients, just before AdamW uses them
            lambda *_: grads[compiled].append({n: p.grad.clone() for n, p in trainer.model.named_parameters()}))
        losses[compiled] = torch.stack([torch.stack(trainer.train_step(video)) for _ in range(3)])
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-5, atol=1e-5)
    assert len(grads[True]) == len(grads[False]) == 3
    for step, (a, b) in enumerate(zip(grads[True], grads[False])):
        for name in b:  # gradients of 1e-4 to 1e-2 here; compiled and eager differ by about 1e-8
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=f"step {step}: {name}")


def test_bf16_autocast(tiny, tmp_path):
    cfg = tiny(partition=(2, 2))
    video = MovingShapes(cfg, 4).batch(0)
    runs = {}
    for precision in ("fp32", "bf16"):
        trainer = Trainer(cfg, _train_cfg(steps=20, precision=precision, base_lr=0.1), tmp_path / precision,
                          device="cpu")
        runs[precision] = torch.stack([torch.stack(trainer.train_step(video)) for _ in range(20)])
        assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # master weights stay fp32
    assert torch.isfinite(runs["bf16"]).all()
    assert (runs["bf16"][-5:].mean(0) < runs["bf16"][:3].mean(0)).all()  # it learns
    assert not torch.equal(runs["bf16"], runs["fp32"])  # autocast was on
    torch.testing.assert_close(runs["bf16"][0], runs["fp32"][0], rtol=0.02, atol=0.02)


def test_a_run_saved_before_a_field_existed_resumes(tiny, tmp_path):
    """A checkpoint written before a config field was added (here model.dec_keep) resumes with the
    field's default, which keeps the old behaviour; setting the field to another value is refused."""
    from bwssl_core.io import save_checkpoint

    cfg = tiny(partition=(2, 2))
    video = MovingShapes(cfg, 4, seed=0).batch(0)
    trainer = Trainer(cfg, _train_cfg(), tmp_path, device="cpu")
    for _ in range(4):
        trainer.train_step(video)
    trainer.save()
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    del state["config"]["model"]["dec_keep"]
    save_checkpoint(tmp_path / "checkpoint.pt", {k: v for k, v in state.items() if k != "version"})
    assert Trainer(cfg, _train_cfg(), tmp_path, resume=True, device="cpu").step == 4
    with pytest.raises(RunError, match=r"model\.dec_keep: run has 1\.0, now 0\.5"):
        Trainer(tiny(partition=(2, 2), dec_keep=0.5), _train_cfg(), tmp_path, resume=True, device="cpu")
    del state["config"]["rng_streams"]  # trained before the streams were told apart: its data would change
    save_checkpoint(tmp_path / "checkpoint.pt", {k: v for k, v in state.items() if k != "version"})
    with pytest.raises(RunError, match="random streams of an earlier bwssl"):
        Trainer(cfg, _train_cfg(), tmp_path, resume=True, device="cpu")


def test_random_streams_share_no_draws_across_streams_seeds_or_key_counts():
    """Each stream of each seed draws its own numbers: the mask stream of seed s once drew what the order
    stream of seed s + 1 drew, and an epoch's shuffle drew what its item 0 drew (SeedSequence reads (a, b) as
    (a, b, 0))."""
    from bwssl_core.batches import STREAMS, hashed_seed, step_generator
    from bwssl_core.video import item_seed

    draws = {(stream, seed, step): tuple(torch.rand(4, generator=step_generator(stream, seed, step)).tolist())
             for stream in STREAMS for seed in range(3) for step in range(3)}
    draws.update({("item", seed, epoch, 0): tuple(torch.rand(4, generator=torch.Generator().manual_seed(
        item_seed(seed, epoch, 0))).tolist()) for seed in range(3) for epoch in range(3)})
    assert len(set(draws.values())) == len(draws)
    assert hashed_seed(5, 0) != hashed_seed(5, 0, 0) and hashed_seed(5) != hashed_seed(5, 0)


def test_normalize_video_is_the_reference_formula_and_leaves_its_input_alone():
    """(x / 255 - mean) / std per channel, to the bit of the out-of-place float32 formula; a float input
    is copied, not normalised in place."""
    from bwssl_core.batches import normalize_video
    from bwssl_core.config import PIXEL_MEAN, PIXEL_STD

    x = torch.randint(0, 256, (2, 3, 4, 5, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = (torch.tensor(v).view(1, 3, 1, 1, 1) for v in (PIXEL_MEAN, PIXEL_STD))
    out = normalize_video(x)
    assert out.dtype == torch.float32 and torch.equal(out, (x.float() / 255 - mean) / std)
    f = x.float()
    normalize_video(f)
    assert torch.equal(f, x.float())


def test_clips_of_another_channel_count_train_with_the_model_s_pixel_statistics(tiny, tmp_path):
    """A 1-channel model (`--in-chans 1`): its clips are normalised with what its target is un-normalised with
    (mean 0, std 1 off RGB), and it trains; before, normalize_video broadcast ImageNet's 3 channels and failed."""
    from bwssl_core.batches import normalize_video

    x = torch.randint(0, 256, (2, 1, 4, 5, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(normalize_video(x), x.float() / 255)
    cfg = tiny(in_chans=1)
    model = VideoMAE(cfg)
    assert model.pixel_mean.flatten().tolist() == [0.0] and model.pixel_std.flatten().tolist() == [1.0]
    last = pretrain(cfg, _train_cfg(steps=2), MovingShapes(cfg, 4, seed=0), tmp_path / "grey", device="cpu")
    assert last["step"] == 2 and len(last["loss"]) == 1 and last["loss"][0] > 0


def test_a_resumed_run_logs_the_rows_of_an_uninterrupted_one(tiny, tmp_path):
    """A checkpoint between two log steps (ckpt_every 3, log_every 4) keeps the open window's losses: after
    a crash at step 5 and a resume from step 3, the step-4 row is the uninterrupted run's, not the mean of
    step 4 alone."""
    cfg = tiny(partition=(2, 2))
    t = _train_cfg(steps=8, log_every=4, ckpt_every=3)
    pretrain(cfg, t, MovingShapes(cfg, 4, seed=0), tmp_path / "whole", device="cpu")

    def crashing(start, rank, world):
        for i, batch in enumerate(MovingShapes(cfg, 4, seed=0)(start, rank, world)):
            if start + i == 5:
                raise RuntimeError("power cut")
            yield batch
    with pytest.raises(RuntimeError, match="power cut"):
        pretrain(cfg, t, crashing, tmp_path / "cut", device="cpu")
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["step"] == 3
    pretrain(cfg, t, MovingShapes(cfg, 4, seed=0), tmp_path / "cut", device="cpu", resume=True)
    rows = {run: [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("whole", "cut")}
    assert [r["step"] for r in rows["cut"]] == [4, 8]
    assert [r["loss"] for r in rows["cut"]] == [r["loss"] for r in rows["whole"]]
    _assert_same(_weights(tmp_path / "cut"), _weights(tmp_path / "whole"))


def test_device_names_are_checked(monkeypatch):
    """--device: an unknown name or a GPU that is not there is a ConfigError naming it; a bare "cuda" gets
    this process's index (torch.cuda.set_device refuses a device without one)."""
    from bwssl_core.config import ConfigError
    from bwssl_core.train import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="device='gpu0': expected cpu, cuda or cuda:N"):
        resolve_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="device='cuda': no CUDA GPU is available here"):
        resolve_device("cuda")
    assert resolve_device(None) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("cuda") == torch.device("cuda", 1) == resolve_device(None)
    with pytest.raises(ConfigError, match="device='cuda:2': this machine has 2 GPU"):
        resolve_device("cuda:2")


def test_a_run_killed_before_its_first_checkpoint_is_not_offered_to_resume(tmp_path):
    from bwssl_core.train import claim_folder

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(RunError, match=r"before its first checkpoint \(config.json\): there is nothing to resume; "
                                       r"pass --overwrite to start it again") as err:
        claim_folder(tmp_path)
    assert "--resume" not in str(err.value)
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(RunError, match="already holds a run.*pass --resume to continue it"):
        claim_folder(tmp_path)
