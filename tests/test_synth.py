"""The embedded default data set: deterministic, balanced, decodable, and it needs time."""
import json

import decord
import pytest
import torch
from torch import nn

from bwssl_core.cli import main
from bwssl_core.config import ConfigError
from bwssl_core.synth import FAMILIES, SynthConfig, ensure_dataset, render, sample_factors, split_factors, synth_batch


def test_deterministic_per_seed_and_balanced():
    cfg = SynthConfig(size=32, frames=8)
    a, la = synth_batch(48, cfg, torch.Generator().manual_seed(3))
    b, lb = synth_batch(48, cfg, torch.Generator().manual_seed(3))
    c, _ = synth_batch(48, cfg, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and all(torch.equal(la[k], lb[k]) for k in FAMILIES)
    assert not torch.equal(a, c)
    assert a.shape == (48, 3, 8, 32, 32) and a.dtype == torch.uint8
    for name, k in FAMILIES.items():
        assert torch.bincount(la[name], minlength=k).tolist() == [48 // k] * k, name
    # families are drawn independently: motion does not determine shape
    joint = torch.zeros(8, 4)
    f = sample_factors(3200, cfg, torch.Generator().manual_seed(0))
    joint.index_put_((f["motion"], f["shape"]), torch.ones(3200), accumulate=True)
    assert joint.min() > 50  # every (motion, shape) pair occurs, about 100 times each


def test_motion_is_what_the_label_says():
    cfg = SynthConfig(size=64, frames=8, distractor=0.0)
    f = sample_factors(64, cfg, torch.Generator().manual_seed(0))
    clips = render(f, cfg).float()  # (n, T, H, W, C)
    background = clips[:, :, :, :, :].median(dim=1).values  # the object moves: the median is mostly background
    xs = torch.arange(64.0)
    for i in range(64):
        moving = (clips[i] - background[i]).abs().sum(-1) > 60  # (T, H, W) object pixels
        area = moving.flatten(1).sum(1).float()
        cx = (moving.sum(1) * xs).sum(1) / area.clamp(min=1)
        cy = (moving.sum(2) * xs).sum(1) / area.clamp(min=1)
        m = int(f["motion"][i])
        if m < 4:
            dx, dy = (cx[-1] - cx[0]).item(), (cy[-1] - cy[0]).item()
            assert {0: dx > 5, 1: dx < -5, 2: dy > 5, 3: dy < -5}[m], (i, m, dx, dy)
        elif m >= 6:
            grows = area[-1] > area[0]
            assert grows == (m == 6), (i, m, area[0].item(), area[-1].item())


def test_written_mp4s_decode_to_the_generated_frames(tmp_path):
    assert main(["synth", "--out", str(tmp_path), "--n-train", "8", "--n-val", "4", "--size", "32",
                 "--frames", "8", "--workers", "1"]) == 0
    lines = (tmp_path / "train.csv").read_text().splitlines()
    assert len(lines) == 8 and lines[0].startswith("videos/train/000000.mp4 ")
    meta = (tmp_path / "metadata.csv").read_text().splitlines()
    assert meta[0] == "path,split," + ",".join(FAMILIES) and len(meta) == 13
    cfg = SynthConfig(size=32, frames=8)
    f = split_factors(8, cfg, 0, "train")
    clips = render(f, cfg)
    for i, line in enumerate(lines):
        path, label = line.rsplit(" ", 1)
        assert int(label) == int(f["motion"][i])
        frames = torch.from_numpy(decord.VideoReader(str(tmp_path / path)).get_batch(list(range(8))).asnumpy())
        err = (frames.float() - clips[i].float()).abs()
        assert frames.shape == (8, 32, 32, 3) and err.mean() < 2 and err.max() < 64, (err.mean(), err.max())
    assert main(["synth", "--out", str(tmp_path), "--n-train", "8", "--n-val", "4"]) == 2  # no silent overwrite
    before = (tmp_path / "train.csv").stat().st_mtime_ns
    assert ensure_dataset(tmp_path, 8, 4, cfg) == tmp_path  # the same settings: taken as it is
    with pytest.raises(ConfigError, match=r"other settings \(n_train: 8 there, 9 asked"):
        ensure_dataset(tmp_path, 9, 4, cfg)  # never silently a set made for other parameters
    assert (tmp_path / "train.csv").stat().st_mtime_ns == before


def test_tensor_format_holds_the_rendered_clips_and_every_label(tmp_path, tiny):
    """--format tensor: train.pt and val.pt hold exactly the rendered frames and every label family;
    load_split reads them (resized for a model of another size), pretrain trains from the folder,
    and a folder of the other format is refused by name."""
    from bwssl_core.evaluate import load_split

    assert main(["synth", "--out", str(tmp_path), "--n-train", "8", "--n-val", "4", "--size", "32",
                 "--frames", "4", "--format", "tensor"]) == 0
    cfg = SynthConfig(size=32, frames=4)
    f = split_factors(8, cfg, 0, "train")
    saved = torch.load(tmp_path / "train.pt", weights_only=True)
    assert torch.equal(saved["clips"], render(f, cfg)) and saved["clips"].shape == (8, 4, 32, 32, 3)
    assert set(saved["labels"]) == set(FAMILIES) and torch.equal(saved["labels"]["motion"], f["motion"])
    clips, labels = load_split(tmp_path, "val", tiny())  # tiny: 4 frames of 32 x 32
    assert clips.shape == (4, 3, 4, 32, 32) and clips.dtype == torch.uint8 and len(labels["shape"]) == 4
    small, _ = load_split(tmp_path, "val", tiny(img_size=16, patch_size=8))
    assert small.shape == (4, 3, 4, 16, 16)
    with pytest.raises(ConfigError, match="clips of 4 frames, fewer than num_frames=8"):
        load_split(tmp_path, "val", tiny(num_frames=8))
    centre, _ = load_split(tmp_path, "val", tiny(num_frames=2, tubelet_size=2))  # frames 1 and 2 of 0..3
    torch.testing.assert_close(centre, clips[:, :, 1:3])
    with pytest.raises(ConfigError, match=r"format: tensor there, mp4 asked"):
        ensure_dataset(tmp_path, 8, 4, cfg, fmt="mp4")
    assert ensure_dataset(tmp_path, 8, 4, cfg, fmt="tensor") == tmp_path
    run = tmp_path / "run"
    assert main(["pretrain", "--out", str(run), "--data", str(tmp_path), "--preset", "tiny", "--steps", "2",
                 "--batch-size", "4", "--log-every", "1"]) == 0
    assert (run / "checkpoint.pt").exists()


def test_overwriting_with_the_other_format_leaves_only_the_new_set(tmp_path, tiny, monkeypatch):
    """--overwrite with the other format removes the old set (whose train.csv would be read in preference
    to train.pt); a write cut short leaves a folder that holds no data set, so it is written again."""
    from bwssl_core import synth
    from bwssl_core.evaluate import load_split

    cfg = SynthConfig(size=32, frames=4)
    synth.write_dataset(tmp_path, 8, 4, cfg, seed=0, workers=1)
    assert (tmp_path / "train.csv").exists() and (tmp_path / "videos").is_dir()
    synth.write_dataset(tmp_path, 8, 4, cfg, seed=1, overwrite=True, fmt="tensor")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth.json", "train.pt", "val.pt"]
    clips, labels = load_split(tmp_path, "val", tiny())
    assert torch.equal(labels["motion"], split_factors(4, cfg, 1, "val")["motion"])  # seed 1's set, not seed 0's

    def cut(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(synth, "save_tensors", cut)
    with pytest.raises(KeyboardInterrupt):
        synth.write_dataset(tmp_path, 8, 4, cfg, seed=2, overwrite=True, fmt="tensor")
    assert not synth.holds_dataset(tmp_path)
    monkeypatch.undo()
    assert ensure_dataset(tmp_path, 8, 4, cfg, seed=2, fmt="tensor") == tmp_path
    assert json.loads((tmp_path / "synth.json").read_text())["seed"] == 2 and synth.holds_dataset(tmp_path)


def test_files_bwssl_synth_did_not_write_are_never_cleared_without_overwrite(tmp_path, capsys):
    """A folder with one's own val.csv and metadata.csv (no train list, so no data set) once lost them to
    `bwssl synth`; now it is refused by name. A set cut short after val.pt (synth.json already written) is
    known as ours and written again."""
    from bwssl_core import synth
    from bwssl_core.cli import main

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "val.csv").write_text("clip.mp4 0\n")
    (mine / "metadata.csv").write_text("path,motion\n")
    args = ["synth", "--out", str(mine), "--n-train", "8", "--n-val", "4", "--size", "32", "--frames", "4",
            "--format", "tensor"]
    assert main(args) == 2
    assert "holds val.csv, metadata.csv, not written by bwssl synth" in capsys.readouterr().err
    assert (mine / "val.csv").read_text() == "clip.mp4 0\n" and not (mine / "val.pt").exists()
    assert main([*args, "--overwrite"]) == 0 and not (mine / "val.csv").exists()
    cfg = SynthConfig(size=32, frames=4)
    cut = tmp_path / "cut"
    calls = []

    def save_val_only(path, obj):
        calls.append(path.name)
        if path.name == "train.pt":
            raise KeyboardInterrupt
        save_tensors(path, obj)
    save_tensors = synth.save_tensors
    synth.save_tensors = save_val_only
    try:
        with pytest.raises(KeyboardInterrupt):
            synth.write_dataset(cut, 8, 4, cfg, fmt="tensor")
    finally:
        synth.save_tensors = save_tensors
    assert calls == ["val.pt", "train.pt"] and (cut / "synth.json").exists() and not synth.holds_dataset(cut)
    assert ensure_dataset(cut, 8, 4, cfg, fmt="tensor") == cut and synth.holds_dataset(cut)


def test_a_size_decord_cannot_read_back_is_refused(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path), "--n-train", "4", "--n-val", "4", "--size", "48",
                 "--frames", "4", "--workers", "1"]) == 2
    assert "decord does not read 48 x 48 clips back" in capsys.readouterr().err
    assert not (tmp_path / "train.csv").exists()


def small_cnn(in_chans, classes):
    """Three conv layers with batch norm and a global max pool: sees colour and shape anywhere."""
    def conv(i, o):
        return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU()]
    return nn.Sequential(*conv(in_chans, 32), nn.MaxPool2d(2), *conv(32, 64), nn.MaxPool2d(2), *conv(64, 64),
                         nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(64, classes))


def _accuracy(x_tr, y_tr, x_va, y_va, classes, epochs=10):
    torch.manual_seed(0)
    net = small_cnn(x_tr.shape[1], classes)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(x_tr)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x_tr[idx]), y_tr[idx]).backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        return (net(x_va).argmax(1) == y_va).float().mean().item()


def test_the_data_set_needs_time():
    """One frame tells the shape but not the motion; frame differences tell the motion."""
    cfg = SynthConfig(size=32, frames=8)
    clips, labels = synth_batch(1600, cfg, torch.Generator().manual_seed(0))
    x = clips.float() / 255 - 0.5  # (N, C, T, H, W)
    one_frame = x[:, :, 4]  # (N, C, H, W): a CNN sees colour and shape wherever the object is
    diffs = (x[:, :, 1:] - x[:, :, :-1]).flatten(1, 2)  # (N, C * (T - 1), H, W)
    tr, va = slice(0, 1200), slice(1200, 1600)
    acc = {}
    for name, feats in (("frame", one_frame), ("diffs", diffs)):
        for fam in ("shape", "motion") if name == "frame" else ("motion",):
            y = labels[fam]
            acc[name, fam] = _accuracy(feats[tr], y[tr], feats[va], y[va], FAMILIES[fam])
    assert acc["frame", "shape"] > 0.8, acc  # measured 0.95
    assert acc["frame", "motion"] < 0.25, acc  # chance is 0.125; measured 0.15
    assert acc["diffs", "motion"] > 0.8, acc  # measured 0.995
