"""Reliability (issue 7): faults, bad input and long runs lose nothing.

Kill -9 mid-write, non-finite losses and weights, out of memory, failed writes, unsafe or foreign
checkpoints, and property-based tests that every list-file line and config value either works or
fails with the package's own error naming the file:line or the parameter.
"""
import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from bwssl_core import TrainConfig, model_config
from bwssl_core.batches import MovingShapes
from bwssl_core.cli import main
from bwssl_core.config import PRESETS, ConfigError, DataConfig, ModelConfig, from_dict, to_dict
from bwssl_core.io import RunError, load_checkpoint, save_checkpoint, save_json, save_text
from bwssl_core.listfile import DataError, parse_list_file
from bwssl_core.masking import tube_mask
from bwssl_core.model import VideoMAE
from bwssl_core.train import Trainer, claim_folder, load_run, pretrain
from bwssl_core.video import ClipSampler


def _train_cfg(**kw):
    values = dict(steps=8, batch_size=4, base_lr=0.05, warmup_steps=2, log_every=2, ckpt_every=4)
    return TrainConfig(**{**values, **kw})


def _temps(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.tmp"))


def _finite(weights: dict) -> bool:
    return all(v.isfinite().all() for v in weights.values())


# -- kill -9 while a checkpoint is being written ----------------------------------------------------
PAUSE_IN_SAVE = textwrap.dedent("""
    import io, sys, time
    from pathlib import Path
    import torch
    from bwssl_core import TrainConfig, model_config
    from bwssl_core.batches import MovingShapes
    from bwssl_core.train import pretrain
    out, marker, pause_at = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    real_save, saves = torch.save, []
    def paused_save(obj, f):  # save number `pause_at` writes half its bytes, says so, and waits for kill -9
        saves.append(1)
        if len(saves) < pause_at:
            return real_save(obj, f)
        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[:buf.tell() // 2])
        f.flush()
        marker.touch()
        time.sleep(600)
    torch.save = paused_save
    cfg = model_config("tiny", partition=(2, 2))
    pretrain(cfg, TrainConfig(steps=8, batch_size=4, base_lr=0.05, warmup_steps=2, log_every=2, ckpt_every=4),
             MovingShapes(cfg, 4, seed=0), out, device="cpu")
""")


def test_kill_during_checkpoint_write_resumes_to_the_same_weights(tmp_path):
    cfg = model_config("tiny", partition=(2, 2))
    pretrain(cfg, _train_cfg(), MovingShapes(cfg, 4, seed=0), tmp_path / "whole", device="cpu")
    killed, marker = tmp_path / "killed", tmp_path / "half_written"
    proc = subprocess.Popen([sys.executable, "-c", PAUSE_IN_SAVE, str(killed), str(marker), "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 90
    while not marker.exists():  # the step-8 checkpoint is half on disk
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the child never reached its second checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    [half] = _temps(killed)  # the half-written temp file; checkpoint.pt was not touched
    assert half.name.startswith(".checkpoint.pt.") and half.stat().st_size > 0
    with pytest.raises(RunError, match="refused or unreadable"):
        load_checkpoint(half)
    assert load_checkpoint(killed / "checkpoint.pt")["step"] == 4
    with open(killed / "metrics.jsonl", "a") as f:  # and a metrics line cut short, as a kill mid-append leaves
        f.write('{"step": 9, "lo')
    pretrain(cfg, _train_cfg(), MovingShapes(cfg, 4, seed=0), killed, device="cpu", resume=True)
    whole, resumed = load_checkpoint(tmp_path / "whole" / "checkpoint.pt"), load_checkpoint(killed / "checkpoint.pt")
    assert resumed["step"] == 8 and resumed["model"].keys() == whole["model"].keys()
    assert all(torch.equal(resumed["model"][k], whole["model"][k]) for k in whole["model"])
    assert _temps(killed) == []  # the stale temp file is gone
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8]


# -- a write that fails part-way -------------------------------------------------------------------
class _DiskFull:
    """A file that accepts `room` bytes, then fails as a full disk does."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, data) -> int:
        data = bytes(data)
        if len(data) > self.room:
            self.f.write(data[:self.room])
            self.f.flush()
            self.room = 0
            raise OSError(28, "No space left on device")
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.mark.parametrize("writer", ["checkpoint", "json", "text"])
def test_a_write_that_fails_part_way_leaves_the_previous_version(tmp_path, monkeypatch, writer):
    path = tmp_path / "result"
    save = {"checkpoint": lambda v: save_checkpoint(path, {"weights": torch.full((1000,), float(v))}),
            "json": lambda v: save_json(path, {"values": [v] * 1000}),
            "text": lambda v: save_text(path, f"{v}\n" * 1000)}[writer]
    save(1)
    before = path.read_bytes()
    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **kw: _DiskFull(real_fdopen(fd, *a, **kw), 100))
    with pytest.raises((OSError, RuntimeError)):  # torch.save reports the failed write as a RuntimeError
        save(2)
    assert path.read_bytes() == before and sorted(tmp_path.iterdir()) == [path]  # no stray temp file
    if writer == "checkpoint":
        assert load_checkpoint(path)["weights"][0] == 1


def test_a_write_is_on_disk_file_then_rename(tmp_path, monkeypatch):
    """The file is fsynced before the rename and its folder after it: the rename survives a power loss too."""
    synced, real_fsync = [], os.fsync

    def fsync(fd):
        synced.append((os.path.isdir(f"/proc/self/fd/{fd}"), (tmp_path / "r.json").exists()))
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    save_json(tmp_path / "r.json", {"a": 1})
    assert synced == [(False, False), (True, True)]  # (a folder?, renamed yet?)


# -- non-finite losses and weights ------------------------------------------------------------------
def test_nan_loss_stops_before_the_next_checkpoint(tiny, tmp_path):
    """A poisoned batch at step 6, a checkpoint step that is not a log step: nothing is saved after it."""
    cfg = tiny(partition=(2, 2))
    source = MovingShapes(cfg, 4, seed=0)

    def data(start, rank, world):
        for step, batch in enumerate(source(start, rank, world), start + 1):  # step: 1-based, as in metrics
            yield batch * float("nan") if step == 6 else batch
    with pytest.raises(FloatingPointError, match=r"block 0's loss is nan at step 6: training stopped; the last "
                                                 r"checkpoint, .*checkpoint\.pt \(step 3\), is intact"):
        pretrain(cfg, _train_cfg(log_every=4, ckpt_every=3), data, tmp_path, device="cpu")
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["step"] == 3 and _finite(state["model"])
    load_run(tmp_path)
    assert [json.loads(ln)["step"] for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [4]
    assert _temps(tmp_path) == []


def test_infinite_gradient_under_a_finite_loss_is_never_saved(tiny, tmp_path):
    """Block 1's gradient turns infinite at step 6 (a checkpoint step): its loss is still finite, its
    weights are not, and the step-4 checkpoint stays."""
    cfg = tiny(partition=(2, 2))
    trainer = Trainer(cfg, _train_cfg(log_every=8, ckpt_every=2), tmp_path, device="cpu")
    weight = trainer.model.stages[1].layers[0].mlp.fc1.weight
    weight.register_hook(lambda g: g * float("inf") if trainer.step == 5 else g)
    with pytest.raises(FloatingPointError, match=r"block 1's weights are not finite after step 6 .*\(step 4\), "
                                                 r"is intact"):
        trainer.fit(MovingShapes(cfg, 4, seed=0))
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["step"] == 4 and _finite(state["model"])


# -- out of memory ----------------------------------------------------------------------------------
def _fail_at(monkeypatch, step: int, fault: str = "oom"):
    """Trainer.train_step runs out of memory, or returns a NaN loss, when it computes step `step` + 1."""
    real = Trainer.train_step

    def train_step(self, video):
        if self.step != step:
            return real(self, video)
        if fault == "oom":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        losses = real(self, video)
        return [loss * float("nan") for loss in losses]
    monkeypatch.setattr(Trainer, "train_step", train_step)


def test_out_of_memory_names_the_batch_and_what_to_try(tiny, tmp_path, monkeypatch):
    cfg = tiny(partition=(2, 2))
    _fail_at(monkeypatch, 5)
    with pytest.raises(RunError) as err:
        pretrain(cfg, _train_cfg(ckpt_every=2, per_block_backward=False), MovingShapes(cfg, 4), tmp_path, device="cpu")
    message = str(err.value)
    for fragment in ("out of memory on cpu at step 6 with batch_size=4", "Tried to allocate 20.00 GiB",
                     "a smaller --batch-size (now 4, 4 per process)", "--per-block-backward", "--precision bf16",
                     r"checkpoint.pt (step 4), is intact"):
        assert fragment in message, message
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 4 and _temps(tmp_path) == []


@pytest.mark.parametrize("fault, message", [
    ("oom", "error: out of memory on cpu at step 1 with batch_size=4"),
    ("nan", "error: block 0's loss is nan at step 1: training stopped"),
])
def test_out_of_memory_and_nan_exit_2_from_the_command_line(tmp_path, monkeypatch, capsys, fault, message):
    _fail_at(monkeypatch, 0, fault)
    argv = ["pretrain", "--out", str(tmp_path), "--preset", "tiny", "--steps", "2", "--batch-size", "4",
            "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "no checkpoint was written" in err
    assert not (tmp_path / "checkpoint.pt").exists() and _temps(tmp_path) == []


# -- run folders ------------------------------------------------------------------------------------
def test_a_partial_run_folder_is_refused_and_overwrite_clears_only_the_run(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 2}\n')  # a run killed before its first checkpoint
    (tmp_path / "bad_videos.txt").write_text("train.csv:3\tx.mp4\tempty\n")
    (tmp_path / ".checkpoint.pt.k2j4.tmp").write_bytes(b"half")
    (tmp_path / "notes.txt").write_text("the user's own file")
    with pytest.raises(RunError, match=r"stopped before its first checkpoint \(metrics\.jsonl\): there is nothing "
                                       r"to resume; pass --overwrite"):
        claim_folder(tmp_path)
    assert len(list(tmp_path.iterdir())) == 4
    claim_folder(tmp_path, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


# -- unsafe, foreign and old checkpoints ------------------------------------------------------------
class _Plant:
    """Unpickling this runs os.mkdir(marker)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    run, marker = tmp_path / "run", tmp_path / "pwned"
    run.mkdir()
    torch.save({"version": 1, "model": _Plant(marker), "config": {}}, run / "checkpoint.pt")
    with pytest.raises(RunError, match=re.escape(f"{run / 'checkpoint.pt'}: refused or unreadable with weights_only")):
        load_run(run)
    assert not marker.exists()
    torch.load(run / "checkpoint.pt", weights_only=False)  # the plant is live: an unsafe load runs it
    assert marker.exists()


@pytest.fixture
def run(tiny, tmp_path):
    """A finished 2-step run of the tiny preset, blocks (2, 2)."""
    cfg = tiny(partition=(2, 2))
    pretrain(cfg, _train_cfg(steps=2), MovingShapes(cfg, 4), tmp_path / "run", device="cpu")
    return tmp_path / "run"


@pytest.mark.parametrize("change, expected", [
    (dict(embed_dim=64), r"stages\.0\.embed\.proj\.weight: expected \(64, 3, 2, 8, 8\), found \(32, 3, 2, 8, 8\)"),
    (dict(partition=[1, 3]), r"13 missing: stages\.1\.layers\.2\.norm1\.weight, .*\n  "
                             r"13 unexpected: stages\.0\.layers\.1\.norm1\.weight, "),
])
def test_weights_of_another_architecture_name_what_differs(run, change, expected):
    path = run / "checkpoint.pt"
    state = load_checkpoint(path)
    state["config"]["model"].update(change)
    save_checkpoint(path, state)
    with pytest.raises(RunError, match=rf"checkpoint\.pt: the weights do not fit the model that its config describes"
                                       rf"(.|\n)*{expected}"):
        load_run(run)


def test_resume_refuses_weights_that_do_not_fit_its_config(run, tiny):
    path = run / "checkpoint.pt"
    state = load_checkpoint(path)
    state["model"] = VideoMAE(tiny(partition=(2, 2), dec_dim=32)).state_dict()
    save_checkpoint(path, state)
    with pytest.raises(RunError, match=r"do not fit(.|\n)*decoders\.0\.embed\.weight: expected \(16, 32\), "
                                       r"found \(32, 32\)"):
        Trainer(tiny(partition=(2, 2)), _train_cfg(steps=2), run, resume=True, device="cpu")


def test_checkpoint_format_and_config_are_checked(run):
    path = run / "checkpoint.pt"
    state = load_checkpoint(path)
    torch.save({k: v for k, v in state.items() if k != "version"}, path)
    with pytest.raises(RunError, match=r"checkpoint\.pt: no checkpoint format version \(a dict without 'version'\)"):
        load_run(run)
    torch.save(state["model"]["stages.0.norm.weight"], path)
    with pytest.raises(RunError, match=r"no checkpoint format version \(a Tensor\): not a bwssl checkpoint"):
        load_run(run)
    torch.save({**state, "version": 2}, path)
    with pytest.raises(RunError, match=r"checkpoint version 2, expected 1 \(written by another version"):
        load_run(run)
    save_checkpoint(path, {**state, "config": {**state["config"], "model": {**state["config"]["model"], "heads": 3}}})
    with pytest.raises(RunError, match=r"no usable model config .*unknown ModelConfig field\(s\): \['heads'\]"):
        load_run(run)


# -- property-based: every input works or fails naming the parameter / file:line ------------------------
FAST = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
JUNK = st.one_of(st.none(), st.booleans(), st.text(max_size=4), st.floats(), st.integers(-10**30, 10**30),
                 st.lists(st.integers(-1, 3), max_size=2))


def _or_junk(strategy, *good):
    """Half the time values known to work with the tiny preset, else `strategy` or junk of any type."""
    return st.one_of(st.sampled_from(good), st.one_of(strategy, JUNK)) if good else st.one_of(strategy, JUNK)


def _ints(lo: int, hi: int, *good: int):
    return _or_junk(st.integers(lo, hi), *good)


def _floats(lo: float, hi: float, *good: float):
    return _or_junk(st.one_of(st.floats(lo, hi), st.sampled_from([math.nan, math.inf, -math.inf])), *good)


TINY = {**PRESETS["tiny"], "partition": (4,)}
MODEL_VALUES = dict(  # plausible ranges small enough to build and run the model, plus junk of any type
    img_size=_ints(-1, 16, 16, 32), num_frames=_ints(-1, 4, 2, 4), in_chans=_ints(-1, 3, 1, 3),
    tubelet_size=_ints(-1, 4, 1, 2), patch_size=_ints(-1, 8, 1, 4, 8), embed_dim=_ints(-1, 24, 8, 16, 24),
    depth=_ints(-1, 4, 4), num_heads=_ints(-1, 4, 1, 2), mlp_ratio=_floats(-1, 5, 0.5, 4.0),
    norm_eps=_floats(-1, 1, 1e-6), pos_embed=_or_junk(st.sampled_from(["3d", "1d", "2d"])),
    partition=_or_junk(st.one_of(st.lists(st.integers(-1, 4), max_size=4), st.sampled_from(["2,2", "4"])),
                       [2, 2], (1, 3), [4]),
    dec_dim=_ints(-1, 16, 4, 8), dec_depth=_ints(-1, 2, 1, 2), dec_heads=_ints(-1, 4, 1, 2),
    dec_shared=_or_junk(st.booleans()), dec_norm=_or_junk(st.booleans()), mask_ratio=_floats(-0.5, 1.5, 0.5, 0.9),
    norm_target=_or_junk(st.booleans()))


def _names_a_field(err: ConfigError, overrides: dict) -> bool:
    return any(re.search(rf"\b{name}\b", str(err)) for name in overrides)


def _overrides(values: dict, most: int = 3):
    """Up to `most` fields at once (more would nearly always fail on the first), each from its strategy."""
    keys = st.lists(st.sampled_from(sorted(values)), max_size=most, unique=True)
    return keys.flatmap(lambda ks: st.fixed_dictionaries({k: values[k] for k in ks}))


@FAST
@given(_overrides(MODEL_VALUES))
@example(dict(patch_size=1, tubelet_size=1))  # 1-pixel tubes: a per-tube std of one value is NaN
def test_model_config_values_work_or_name_the_field(overrides):
    try:
        cfg = ModelConfig(**{**TINY, **overrides}).validate()
    except ConfigError as err:
        assert _names_a_field(err, overrides), (overrides, str(err))
        event("refused")
        return
    assert from_dict(ModelConfig, json.loads(json.dumps(to_dict(cfg)))) == cfg  # config.json round trip
    if max(cfg.embed_dim, cfg.dec_dim) * max(cfg.mlp_ratio, 1) > 256 or cfg.num_tokens > 1024 or cfg.in_chans > 3:
        return  # valid but too large to build here (junk that happens to be a valid size)
    event("built")
    model = VideoMAE(cfg)
    video = torch.randn(2, cfg.in_chans, cfg.num_frames, cfg.img_size, cfg.img_size)  # (B, C, T, H, W)
    losses = model(video, tube_mask(2, cfg.grid, cfg.mask_ratio, torch.Generator().manual_seed(0)))
    assert len(losses) == len(cfg.partition) and all(loss.isfinite() for loss in losses), (overrides, losses)


TRAIN_VALUES = dict(
    steps=_ints(-1, 10**6), batch_size=_ints(-1, 4), base_lr=_floats(-1, 10), min_lr=_floats(-1, 1),
    warmup_steps=_ints(-2, 10**6), weight_decay=_floats(-1, 1), beta1=_floats(-0.5, 1.5), beta2=_floats(-0.5, 1.5),
    clip_grad=_floats(-1, 10), per_block_backward=_or_junk(st.booleans()),
    precision=_or_junk(st.sampled_from(["auto", "bf16", "fp32", "fp16"])), compile=_or_junk(st.booleans()),
    seed=_or_junk(st.integers(-2**70, 2**70)), log_every=_ints(-1, 10), ckpt_every=_ints(-1, 10))


@FAST
@given(_overrides(TRAIN_VALUES))
def test_train_config_values_work_or_name_the_field(overrides):
    try:
        tcfg = TrainConfig(**overrides).validate()
    except ConfigError as err:
        assert _names_a_field(err, overrides), (overrides, str(err))
        return
    assert from_dict(TrainConfig, json.loads(json.dumps(to_dict(tcfg)))) == tcfg
    if tcfg.batch_size > 4:
        return  # valid but too large to run here
    cfg = model_config("tiny", partition=(2, 2))
    with tempfile.TemporaryDirectory() as out:  # one optimiser step (not compiled: that takes seconds)
        trainer = Trainer(cfg, dataclasses.replace(tcfg, compile=False), out, device="cpu")
        losses = trainer.train_step(MovingShapes(cfg, tcfg.batch_size, tcfg.seed).batch(0))
    assert all(loss.isfinite() for loss in losses)


@FAST
@given(_overrides(dict(sampling_rate=_ints(-1, 8), repeats=_ints(-1, 4), augment=_or_junk(st.booleans()),
                      flip=_or_junk(st.booleans()), skip_bad=_or_junk(st.booleans()))))
def test_data_config_values_work_or_name_the_field(overrides):
    try:
        dcfg = DataConfig(**overrides).validate()
    except ConfigError as err:
        assert _names_a_field(err, overrides), (overrides, str(err))
        return
    ClipSampler(num_frames=4, sampling_rate=dcfg.sampling_rate or 4, repeats=dcfg.repeats)


NAMES = st.one_of(st.sampled_from(["real.mp4", "sub/../real.mp4", "empty.mp4", "sub", "missing.mp4", "a b.mp4",
                                   "x" * 300 + ".mp4", "nul\x00.mp4", "/", ".."]),
                  st.text(st.characters(blacklist_categories=("Cs",)), max_size=12))
LABELS = st.one_of(st.integers(-3, 6).map(str), st.just("9" * 5000), st.text(max_size=3))
LINES = st.one_of(st.builds(lambda p, sep, label: f"{p}{sep}{label}", NAMES, st.sampled_from([" ", "\t", "   "]),
                            LABELS),
                  st.text(st.characters(blacklist_categories=("Cs",)), max_size=20))


@settings(max_examples=150, deadline=None)
@given(lines=st.lists(LINES, max_size=5), num_classes=st.none() | st.integers(1, 5), check_files=st.booleans())
def test_list_file_lines_parse_or_name_the_file_and_line(lines, num_classes, check_files):
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        (d / "real.mp4").write_bytes(b"\0" * 8)
        (d / "a b.mp4").write_bytes(b"\0" * 8)
        (d / "empty.mp4").write_bytes(b"")
        (d / "sub").mkdir()
        lst = d / "list.csv"
        lst.write_text("\n".join(lines), encoding="utf-8")
        try:
            entries = parse_list_file(lst, num_classes=num_classes, check_files=check_files)
        except DataError as err:
            where = rf"{re.escape(str(lst))}:(\d+: | no videos listed$| cannot read the list file)"
            assert re.match(where, str(err)), str(err)
            return
        assert entries and all(0 <= e.label < (num_classes or math.inf) for e in entries)
        assert len({e.path for e in entries}) == len(entries)
        assert [e.line for e in entries] == sorted(e.line for e in entries)
        if check_files:
            assert all(e.path.is_file() and e.path.stat().st_size > 0 for e in entries)
