"""The clip cache: built once with decord, read back through a memory map equal to VideoClips; gpu_augment."""
import json

import numpy as np
import pytest
import torch
from test_video import make_bad, pattern, write_list, write_mp4
from torch.utils.data import DataLoader

from bwssl_core.cache import CachedClips, build_cache, gpu_augment
from bwssl_core.video import DataError, VideoClips, eval_transform, open_video, read_frames, train_transform


@pytest.fixture(scope="module")
def vids(tmp_path_factory):
    """a.mp4 (24 x 32 x 32), b.mp4 (30 x 32 x 32), wide.mp4 (20 x 48 x 64); same.txt lists a and b, mixed.txt all."""
    d = tmp_path_factory.mktemp("videos")
    write_mp4(d / "a.mp4", pattern(24, 32, 32))
    write_mp4(d / "b.mp4", pattern(30, 32, 32, shade=50))
    write_mp4(d / "wide.mp4", pattern(20, 48, 64))
    write_list(d / "same.txt", ["a.mp4 0", "b.mp4 1"])
    write_list(d / "mixed.txt", ["a.mp4 0", "b.mp4 1", "wide.mp4 2"])
    return d


SAMPLING = [
    dict(num_frames=4, sampling_rate=2),
    dict(num_frames=4, sampling_rate=3, repeats=3, transform=train_transform(16), seed=5),
    dict(num_frames=2, sampling_rate=4, mode="eval", num_clips=2, num_crops=3),
    dict(num_frames=4, sampling_rate=2, mode="eval", num_clips=3, num_crops=1, transform=eval_transform(16)),
]


@pytest.mark.parametrize("sampling", SAMPLING)
@pytest.mark.parametrize("list_name, decode_size", [("same.txt", None), ("mixed.txt", (32, 40))])
def test_cache_returns_what_videoclips_returns(vids, tmp_path, sampling, list_name, decode_size):
    cache = build_cache(vids / list_name, tmp_path / "cache", decode_size=decode_size)
    decoded = VideoClips(vids / list_name, decode_size=decode_size, **sampling)
    cached = CachedClips(cache, **sampling)
    assert len(cached) == len(decoded)
    for epoch in (0, 1):
        decoded.set_epoch(epoch)
        cached.set_epoch(epoch)
        for i in range(len(decoded)):
            (x, y), (cx, cy) = decoded[i], cached[i]
            assert x.dtype == cx.dtype == torch.uint8 and torch.equal(cx, x) and cy == y


def test_index_and_frames_file(vids, tmp_path):
    out = build_cache(vids / "same.txt", tmp_path / "cache")
    index = json.loads((out / "index.json").read_text())
    assert (index["height"], index["width"], index["channels"], index["total_frames"]) == (32, 32, 3, 54)
    assert index["list_file"] == str(vids / "same.txt")
    assert [(v["path"], v["source"], v["line"], v["label"], v["offset"], v["frames"]) for v in index["videos"]] == [
        (str(vids / "a.mp4"), "same.txt:1", 1, 0, 0, 24), (str(vids / "b.mp4"), "same.txt:2", 2, 1, 24, 30)]
    assert sorted(p.name for p in out.iterdir()) == ["frames.u8", "index.json"]  # no temporary left
    frames = np.memmap(out / "frames.u8", np.uint8, "r", shape=(54, 32, 32, 3))
    assert np.abs(frames[24:].astype(int) - pattern(30, 32, 32, shade=50)).mean() < 6


def test_cache_refuses_to_overwrite(vids, tmp_path):
    build_cache(vids / "same.txt", tmp_path / "cache")
    with pytest.raises(DataError, match=r"cache: already holds a clip cache; pass --overwrite to replace it, or "
                                        r"choose another --out"):
        build_cache(vids / "same.txt", tmp_path / "cache")
    build_cache(vids / "mixed.txt", tmp_path / "cache", decode_size=32, overwrite=True)
    assert json.loads((tmp_path / "cache" / "index.json").read_text())["total_frames"] == 74


def test_frame_sizes_must_agree(vids, tmp_path):
    with pytest.raises(DataError, match=r"mixed\.txt:3: .*wide\.mp4: frames of \(48, 64\).*decode_size"):
        build_cache(vids / "mixed.txt", tmp_path / "cache")
    assert not (tmp_path / "cache" / "index.json").exists()


def test_bad_videos_refused_or_skipped(vids, tmp_path):
    bad = [make_bad(tmp_path, kind, vids / "a.mp4") for kind in ("truncated", "random", "zero")]
    lst = write_list(tmp_path / "list.txt", [f"{vids / 'a.mp4'} 0", *(f"{b.name} 1" for b in bad)])
    for b in bad:
        alone = write_list(tmp_path / "alone.txt", [f"{vids / 'a.mp4'} 0", f"{b.name} 1"])
        with pytest.raises(DataError, match=rf"alone\.txt:2: .*{b.name}: (cannot decode|empty file)"):
            build_cache(alone, tmp_path / "cache")
    with pytest.warns(UserWarning, match="3 of 4"):
        out = build_cache(lst, tmp_path / "cache", skip_bad=True)
    index = json.loads((out / "index.json").read_text())
    assert [v["source"] for v in index["videos"]] == ["list.txt:1"]
    expected = [(f"list.txt:{i + 2}", str(b)) for i, b in enumerate(bad)]
    assert [(b["source"], b["path"]) for b in index["bad"]] == expected


def damaged_midway(path, size=32, frames=120):
    """An H.264 video of noise that opens, counts its frames and gives frame 0, with 4,000 bytes overwritten
    at 70% of the file: only a full decode finds the damage."""
    import av

    rng = np.random.default_rng(0)
    with av.open(str(path), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=8, options={"crf": "10", "preset": "fast", "g": "8"})
        stream.width = stream.height = size
        stream.pix_fmt = "yuv444p"
        for _ in range(frames):
            noise = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(noise, format="rgb24")))
        container.mux(stream.encode())
    data = bytearray(path.read_bytes())
    at = int(len(data) * 0.7)
    data[at:at + 4000] = b"\xff" * 4000
    path.write_bytes(bytes(data))
    return path


def test_a_video_damaged_midway_is_refused_or_skipped(vids, tmp_path):
    """skip_bad's first look (open, frame count, frame 0) passes such a video; the full decode of the cache
    build must still drop it rather than stop, and VideoClips names it with what to do when a clip reaches it."""
    damaged = damaged_midway(tmp_path / "damaged.mp4")
    reader = open_video(damaged, None)
    assert len(reader) == 120 and read_frames(reader, [0]).shape == (1, 32, 32, 3)
    lst = write_list(tmp_path / "list.txt", [f"{vids / 'a.mp4'} 0", "damaged.mp4 1", f"{vids / 'b.mp4'} 2"])
    with pytest.raises(DataError, match=r"list\.txt:2: .*damaged\.mp4: cannot decode"):
        build_cache(lst, tmp_path / "refused")
    with pytest.warns(UserWarning, match="1 of 3"):
        out = build_cache(lst, tmp_path / "cache", skip_bad=True)
    index = json.loads((out / "index.json").read_text())
    assert [v["source"] for v in index["videos"]] == ["list.txt:1", "list.txt:3"]
    assert [b["source"] for b in index["bad"]] == ["list.txt:2"] and "cannot decode" in index["bad"][0]["reason"]
    cached = CachedClips(out, num_frames=4, sampling_rate=2, mode="eval")
    direct = VideoClips(lst, num_frames=4, sampling_rate=2, mode="eval", skip_bad=True)
    assert [e.source for e in direct.entries] == ["list.txt:1", "list.txt:2", "list.txt:3"]  # the probe passes it
    assert torch.equal(cached[1][0], direct[2][0]) and cached[1][1] == 2  # b.mp4, after the dropped video
    with pytest.warns(UserWarning, match="2 of 3"):  # a and b are too short for 16 frames at rate 4
        long = VideoClips(lst, num_frames=16, sampling_rate=4, skip_bad=True)
    with pytest.raises(DataError, match="damaged further in: build a clip cache with skip_bad"):
        for epoch in range(8):  # until a clip reaches the damage (training starts are random)
            long.set_epoch(epoch)
            long[0]


def test_short_videos_in_the_cache(vids, tmp_path):
    out = build_cache(vids / "same.txt", tmp_path / "cache")
    with pytest.raises(DataError, match=r"same\.txt:1: .*a\.mp4: 24 frames, fewer than the 25"):
        CachedClips(out, num_frames=5, sampling_rate=5)[0]
    with pytest.warns(UserWarning, match="1 of 2"):
        kept = CachedClips(out, num_frames=5, sampling_rate=5, skip_bad=True)
    assert [e.source for e in kept.entries] == ["same.txt:2"] and kept[0][1] == 1


def test_parallel_build_is_identical(vids, tmp_path):
    one = build_cache(vids / "mixed.txt", tmp_path / "one", decode_size=32)
    two = build_cache(vids / "mixed.txt", tmp_path / "two", decode_size=32, workers=2)
    assert (one / "frames.u8").read_bytes() == (two / "frames.u8").read_bytes()
    assert json.loads((one / "index.json").read_text()) == json.loads((two / "index.json").read_text())


def test_dataloader_workers_see_the_same_clips(vids, tmp_path):
    cache = build_cache(vids / "same.txt", tmp_path / "cache")
    sampling = dict(num_frames=4, sampling_rate=2, transform=train_transform(16), seed=3)
    for ds in (CachedClips(cache, **sampling), VideoClips(vids / "same.txt", **sampling)):
        ds.set_epoch(2)
        batches = list(DataLoader(ds, batch_size=1, num_workers=2))
        for i, (clips, labels) in enumerate(batches):
            assert torch.equal(clips[0], ds[i][0]) and labels.tolist() == [ds[i][1]]


def test_gpu_augment_shapes_and_same_box_over_time():
    g = torch.Generator().manual_seed(0)
    frame = torch.randint(0, 256, (4, 3, 1, 24, 32), dtype=torch.uint8, generator=g)
    video = frame.expand(-1, -1, 6, -1, -1)  # (B, C, T, H, W): every frame of a clip the same
    out = gpu_augment(video, 16, generator=g)
    assert out.shape == (4, 3, 6, 16, 16) and out.dtype == torch.uint8
    assert torch.equal(out, out[:, :, :1].expand_as(out))  # one box per clip, not per frame
    assert not torch.equal(out[0, :, 0], out[1, :, 0])
    floats = gpu_augment(video.float() / 255, 16, generator=torch.Generator().manual_seed(1))
    assert floats.dtype == torch.float32 and floats.shape == (4, 3, 6, 16, 16)
    same = lambda: gpu_augment(video, 16, generator=torch.Generator().manual_seed(7))  # noqa: E731
    assert torch.equal(same(), same())


def test_gpu_augment_full_box_is_identity_or_mirror():
    video = torch.randint(0, 256, (32, 3, 2, 16, 16), dtype=torch.uint8)
    kept = gpu_augment(video, 16, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False)
    assert torch.equal(kept, video)
    out = gpu_augment(video, 16, scale=(1.0, 1.0), ratio=(1.0, 1.0), generator=torch.Generator().manual_seed(0))
    mirrored = [torch.equal(o, v.flip(-1)) for o, v in zip(out, video)]
    assert all(m or torch.equal(o, v) for m, o, v in zip(mirrored, out, video))
    assert 4 < sum(mirrored) < 28


def _nine_videos(vids, tmp_path):
    """A cache of nine videos (three copies of each test video) at 32 x 32."""
    import shutil

    names = []
    for k, name in enumerate(["a.mp4", "b.mp4", "wide.mp4"] * 3):
        names.append(f"{k}{name}")
        shutil.copy(vids / name, tmp_path / names[-1])
    write_list(tmp_path / "many.txt", [f"{n} {k % 3}" for k, n in enumerate(names)])
    return build_cache(tmp_path / "many.txt", tmp_path / "cache", decode_size=32)


def test_augmented_batches_are_the_single_process_ones_in_every_rank(vids, tmp_path):
    """Crops and flips on the device are drawn from (seed, step) for the whole global batch: the two ranks
    of a data-parallel run together get the single-process batch, clip for clip, whatever the global RNG
    (which a model's initialisation moves), from a resumed step too; both batch sources alike."""
    from functools import partial

    from bwssl_core.batches import DatasetBatches
    from bwssl_core.prefetch import CacheBatches

    ds = CachedClips(_nine_videos(vids, tmp_path), num_frames=4, sampling_rate=3, repeats=2, seed=7)
    augment = partial(gpu_augment, size=16)
    for source in (DatasetBatches(ds, 4, seed=3, augment=augment), CacheBatches(ds, 4, seed=3, threads=2,
                                                                                 augment=augment)):
        torch.manual_seed(0)
        one = [b for b, _ in zip(source(0, 0, 1), range(3))]
        torch.manual_seed(1)
        two = [torch.cat(ranks) for ranks in zip(*([b for b, _ in zip(source(0, r, 2), range(3))] for r in (0, 1)))]
        assert one[0].shape == (8, 3, 4, 16, 16) and all(torch.equal(a, b) for a, b in zip(one, two))
        assert torch.equal(next(iter(source(2, 1, 2))), one[2][4:])  # rank 1 of step 2, resumed there


@pytest.mark.parametrize("repeats, world", [(1, 1), (2, 1), (1, 2)])
def test_prefetched_batches_equal_the_dataloader_batches(vids, tmp_path, repeats, world):
    """CacheBatches (threads copying into a reused buffer) gives the clips of DatasetBatches over the
    same CachedClips, batch for batch, from a resumed step too and for each rank's share; a worker's
    error reaches the caller with the video's list line."""
    from bwssl_core.batches import DatasetBatches
    from bwssl_core.prefetch import CacheBatches

    cache = _nine_videos(vids, tmp_path)
    ds = CachedClips(cache, num_frames=4, sampling_rate=3, repeats=repeats, seed=7)
    ref = DatasetBatches(ds, 4, seed=3, workers=0)
    fast = CacheBatches(ds, 4, seed=3, threads=3, depth=2)
    for rank in range(world):
        for start in (0, 5):
            want = [b for b, _ in zip(ref(start, rank, world), range(6))]
            got = [b for b, _ in zip(fast(start, rank, world), range(6))]
            assert all(torch.equal(w, g) for w, g in zip(want, got)) and len(got) == 6
            assert got[0].shape == (4 // world * repeats, 3, 4, 32, 32) and got[0].dtype == torch.uint8
    short = CachedClips(cache, num_frames=8, sampling_rate=3)  # 24 frames: a.mp4 (24) and wide.mp4 (20) are short
    with pytest.raises(DataError, match=r"many\.txt:\d: .*fewer than the 24"):
        next(iter(CacheBatches(short, 4, threads=2)()))
