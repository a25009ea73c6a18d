"""Real videos: list files, decoding, VideoMAE's clip sampling, bad videos. Tiny H.264 files made with PyAV."""
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from bwssl_core import video as video_mod
from bwssl_core.video import (DataError, VideoClips, clip_indices, clip_starts, eval_transform, open_video,
                              parse_list_file, read_frames, train_transform)


def pattern(n: int, h: int, w: int, shade: int = 0) -> np.ndarray:
    """uint8 (n, h, w, 3): colour gradients, a blue level that rises with t (by 10 per frame up to 24
    frames) and a white square at x = t, so that every frame is told apart well beyond codec error."""
    ys, xs = np.mgrid[0:h, 0:w]
    out, step = np.empty((n, h, w, 3), np.uint8), min(10, 230 // max(n - 1, 1))
    for t in range(n):
        out[t, ..., 0] = xs * 200 // (w - 1) + shade
        out[t, ..., 1] = ys * 200 // (h - 1)
        out[t, ..., 2] = 10 + step * t
        out[t, 4:12, t % (w - 8):t % (w - 8) + 8] = 255
    return out


def write_mp4(path: Path, frames: np.ndarray, crf: int = 10) -> Path:
    """H.264 (libx264, yuv420p) at high quality."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def write_list(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def frame_ids(clip: torch.Tensor, written: np.ndarray) -> list[int]:
    """For a uint8 clip (C, T, H, W), the index of the written frame closest to each of its frames."""
    frames = clip.permute(1, 2, 3, 0).numpy().astype(np.int16)  # (T, H, W, C)
    err = np.abs(frames[:, None] - written[None].astype(np.int16)).mean(axis=(2, 3, 4))  # (T, N)
    return err.argmin(1).tolist()


def make_bad(folder: Path, kind: str, good: Path) -> Path:
    """A video that cannot give a clip of 4 frames at rate 4: zero-byte, truncated, random bytes, text or a
    PNG image named .mp4, audio only (no video stream), one frame, 6 frames."""
    path = folder / f"bad_{kind}.mp4"
    if kind == "zero":
        path.write_bytes(b"")
    elif kind == "truncated":
        data = good.read_bytes()
        path.write_bytes(data[:len(data) // 2])
    elif kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4000))
    elif kind == "text":
        path.write_text("this is not a video\n" * 50)
    elif kind == "png":
        Image.fromarray(pattern(1, 32, 32)[0]).save(path, format="PNG")
    elif kind == "audio":
        with av.open(str(path), "w") as container:
            stream = container.add_stream("aac", rate=16000)
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate = 16000
            for _ in range(4):
                frame.pts = None
                container.mux(stream.encode(frame))
            container.mux(stream.encode())
    elif kind == "one_frame":
        write_mp4(path, pattern(1, 32, 32))
    elif kind == "short":
        write_mp4(path, pattern(6, 32, 32))
    return path


BAD_KINDS = ["zero", "truncated", "random", "text", "png", "audio", "one_frame", "short"]


@pytest.fixture(scope="module")
def vids(tmp_path_factory):
    """Folder with a.mp4 (24 x 32 x 32), 'b c.mp4' (24 x 32 x 32, other colours), wide.mp4 (24 x 48 x 64)."""
    d = tmp_path_factory.mktemp("videos")
    frames = {"a": pattern(24, 32, 32), "b c": pattern(24, 32, 32, shade=50), "wide": pattern(24, 48, 64)}
    for name, f in frames.items():
        write_mp4(d / f"{name}.mp4", f)
    return d, frames


def test_decoded_frames_match_written(vids):
    d, frames = vids
    for name in ("a", "wide"):
        got = read_frames(open_video(d / f"{name}.mp4"), range(24))
        assert got.shape == frames[name].shape and got.dtype == np.uint8
        assert np.abs(got.astype(int) - frames[name]).mean() < 6
    assert read_frames(open_video(d / "wide.mp4", 32), [0, 5]).shape == (2, 32, 32, 3)
    assert read_frames(open_video(d / "wide.mp4", (24, 40)), [3]).shape == (1, 24, 40, 3)


def test_decord_width_bug_is_a_clear_error(vids):
    d, _ = vids
    ds = VideoClips(write_list(d / "w.txt", ["a.mp4 0"]), num_frames=2, sampling_rate=1, decode_size=(32, 48))
    with pytest.raises(DataError, match=r"w\.txt:1: .*a\.mp4: cannot decode .*decode_size"):
        ds[0]


def test_clip_starts_and_indices():
    assert clip_starts(24, 8, 3, train=False).tolist() == [0, 8, 16]
    assert clip_starts(20, 8, 5, train=False).tolist() == [0, 3, 6, 9, 12]
    assert clip_starts(24, 8, 1, train=False).tolist() == [8]  # one eval clip: the centre
    draws = clip_starts(24, 8, 2000, train=True, generator=torch.Generator().manual_seed(0))
    assert draws.min() == 0 and draws.max() == 16
    assert clip_indices(np.array([2, 5]), 4, 3).tolist() == [[2, 5, 8, 11], [5, 8, 11, 14]]


def test_train_clips_are_strided_from_a_random_start(vids):
    d, frames = vids
    ds = VideoClips(write_list(d / "a.txt", ["a.mp4 7"]), num_frames=4, sampling_rate=3, seed=1)
    starts = set()
    for epoch in range(12):
        ds.set_epoch(epoch)
        clip, label = ds[0]
        assert clip.shape == (3, 4, 32, 32) and clip.dtype == torch.uint8 and label == 7
        ids = frame_ids(clip, frames["a"])
        assert 0 <= ids[0] <= 24 - 12 and ids == [ids[0] + 3 * i for i in range(4)]
        assert torch.equal(ds[0][0], clip)  # a function of (seed, epoch, index)
        starts.add(ids[0])
    assert len(starts) > 3


def test_eval_clips_spread_and_three_crops(vids):
    d, _ = vids
    lst = write_list(d / "wide.txt", ["wide.mp4 2"])
    full = torch.from_numpy(read_frames(open_video(d / "wide.mp4"), range(24))).permute(3, 0, 1, 2)  # (C, N, H, W)
    ds = VideoClips(lst, num_frames=4, sampling_rate=2, mode="eval", num_clips=3, num_crops=3)
    clips, label = ds[0]
    assert clips.shape == (9, 3, 4, 48, 48) and clips.dtype == torch.uint8 and label == 2
    for k, start in enumerate([0, 8, 16]):  # span 8 spread over [0, 24 - 8]
        for j, x in enumerate([0, 8, 16]):  # left / centre / right squares of the 48 x 64 frames
            expected = full[:, start:start + 8:2, :, x:x + 48]
            assert torch.equal(clips[k * 3 + j], expected)
    one, _ = VideoClips(lst, num_frames=4, sampling_rate=2, mode="eval")[0]
    assert torch.equal(one, full[None, :, 8:16:2, :, 8:56])
    sized, _ = VideoClips(lst, num_frames=4, sampling_rate=2, mode="eval", num_clips=2, num_crops=3,
                          transform=eval_transform(16))[0]
    assert sized.shape == (6, 3, 4, 16, 16)


def test_repeats_draw_several_clips_from_one_decode(vids, monkeypatch):
    d, frames = vids
    opened = []
    monkeypatch.setattr(video_mod, "open_video", lambda *a: opened.append(a) or open_video(*a))
    ds = VideoClips(write_list(d / "a.txt", ["a.mp4 0"]), num_frames=4, sampling_rate=2, repeats=4, seed=2)
    clips, _ = ds[0]
    assert clips.shape == (4, 3, 4, 32, 32) and len(opened) == 1
    starts = []
    for clip in clips:
        ids = frame_ids(clip, frames["a"])
        assert ids == [ids[0] + 2 * i for i in range(4)] and 0 <= ids[0] <= 16
        starts.append(ids[0])
    assert len(set(starts)) > 1


def test_transforms(vids):
    d, _ = vids
    lst = write_list(d / "a.txt", ["a.mp4 0"])
    clip, _ = VideoClips(lst, num_frames=4, sampling_rate=2, transform=train_transform(16))[0]
    assert clip.shape == (3, 4, 16, 16) and clip.dtype == torch.uint8
    # dark left half, bright right half: without flips the right side stays brighter
    halves = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    halves[..., 4:] = 255
    for flip, expect_mirror in ((False, False), (True, True)):
        t = train_transform(8, scale=(1.0, 1.0), flip=flip)
        mirrored = [bool(t(tv_tensors.Video(halves))[..., 0].float().mean() > 127) for _ in range(40)]
        assert any(mirrored) == expect_mirror
    assert eval_transform(16)(tv_tensors.Video(torch.zeros(2, 3, 48, 64, dtype=torch.uint8))).shape == (2, 3, 16, 16)


def test_list_file_good(vids, tmp_path):
    d, _ = vids
    lst = write_list(tmp_path / "train.csv", ["a.mp4 0", "", "  b c.mp4   3  ", "wide.mp4\t1"])
    entries = parse_list_file(lst, root=d, num_classes=4)
    assert [(e.path, e.label, e.line, e.source) for e in entries] == [
        (d / "a.mp4", 0, 1, "train.csv:1"), (d / "b c.mp4", 3, 3, "train.csv:3"), (d / "wide.mp4", 1, 4, "train.csv:4")]
    assert entries[0].path.is_absolute()
    # root defaults to the list file's folder
    assert parse_list_file(write_list(d / "train.csv", ["b c.mp4 3"]))[0].path == d / "b c.mp4"


@pytest.mark.parametrize("lines, line, fragment", [
    (["a.mp4 0", "a.mp4"], 2, "one column"),
    (["a.mp4 x"], 1, "label 'x' is not an integer"),
    (["a.mp4 0", "b c.mp4 4"], 2, "unknown label 4"),
    (["a.mp4 -1"], 1, "unknown label -1"),
    (["a.mp4 0", "wide.mp4 1", "./a.mp4 1"], 3, "duplicate path './a.mp4', already on line 1"),
    (["a.mp4 0", "missing.mp4 1"], 2, "no such file"),
    (["empty.mp4 1"], 1, "empty file"),
])
def test_list_file_errors_name_file_and_line(vids, lines, line, fragment):
    d, _ = vids
    (d / "empty.mp4").write_bytes(b"")
    with pytest.raises(DataError) as err:
        parse_list_file(write_list(d / "bad.csv", lines), num_classes=4)
    assert f"bad.csv:{line}: " in str(err.value) and fragment in str(err.value)


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_video_raises_naming_it(vids, kind):
    d, _ = vids
    bad = make_bad(d, kind, d / "a.mp4")
    lst = write_list(d / "mixed.txt", ["a.mp4 0", f"{bad.name} 1"])
    with pytest.raises(DataError, match=rf"mixed\.txt:2: .*{bad.name}") as err:
        ds = VideoClips(lst, num_frames=4, sampling_rate=4)
        for i in range(len(ds)):
            ds[i]
    if kind in ("short", "one_frame"):
        assert f"{6 if kind == 'short' else 1} frames, fewer than the 16" in str(err.value)


def test_a_one_frame_video_gives_one_frame_clips(vids):
    d, _ = vids
    one = make_bad(d, "one_frame", d / "a.mp4")
    clip, label = VideoClips(write_list(d / "one.txt", [f"{one.name} 3"]), num_frames=1, sampling_rate=1)[0]
    written = torch.from_numpy(pattern(1, 32, 32)).permute(3, 0, 1, 2).float()  # (C, T, H, W)
    assert clip.shape == (3, 1, 32, 32) and label == 3 and (clip.float() - written).abs().mean() < 6


def test_skip_bad_drops_and_lists_bad_videos(vids, tmp_path):
    d, frames = vids
    bad = [make_bad(d, kind, d / "a.mp4") for kind in BAD_KINDS]
    lst = write_list(d / "mixed.txt", ["a.mp4 0", *(f"{b.name} 5" for b in bad), "b c.mp4 1"])
    out = tmp_path / "bad.tsv"
    with pytest.warns(UserWarning, match=f"{len(bad)} of {len(bad) + 2}"):
        ds = VideoClips(lst, num_frames=4, sampling_rate=4, skip_bad=True, bad_list_out=out)
    assert len(ds) == 2 and [e.path for e, _ in ds.bad] == bad
    rows = [line.split("\t") for line in out.read_text().splitlines()]
    assert [(r[0], r[1]) for r in rows] == [(f"mixed.txt:{i + 2}", str(b)) for i, b in enumerate(bad)]
    reasons = dict(zip(BAD_KINDS, (r[2] for r in rows)))
    assert all(reasons.values()) and "6 frames" in reasons["short"] and "1 frames" in reasons["one_frame"]
    assert reasons["zero"] == "empty file (0 bytes)" and all("cannot open" in reasons[k] for k in ("text", "png"))
    for i, (name, label) in enumerate([("a", 0), ("b c", 1)]):  # each good video is itself
        clip, got = ds[i]
        ids = frame_ids(clip, frames[name])
        written = torch.from_numpy(frames[name][ids]).permute(3, 0, 1, 2).float()  # (C, T, H, W)
        assert got == label and (clip.float() - written).abs().mean() < 6
    with pytest.raises(DataError, match=f"none of its {len(bad)} videos"):
        VideoClips(write_list(d / "allbad.txt", [f"{b.name} 0" for b in bad]), num_frames=4, sampling_rate=4,
                   skip_bad=True)
