import json
import shutil
import subprocess
import sys

import pytest
import torch

from bwssl_core.cli import main
from bwssl_core.config import ConfigError, model_config
from bwssl_core.io import load_checkpoint

TINY = ["--preset", "tiny", "--steps", "2", "--batch-size", "4", "--log-every", "1", "--device", "cpu"]


def test_console_script_and_module():
    exe = shutil.which("bwssl", path=str(__import__("pathlib").Path(sys.executable).parent))
    assert exe, "pip install -e . should install the bwssl console script"
    for cmd in ([exe, "--help"], [sys.executable, "-m", "bwssl_core", "pretrain", "--help"]):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode == 0 and "pretrain" in proc.stdout


def test_pretrain_from_the_command_line(tmp_path, capsys):
    assert main(["pretrain", "--out", str(tmp_path), *TINY, "--blocks", "2", "--dec-shared", "--mask-ratio", "0.5"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["step"] == 2 and len(printed["loss"]) == 2
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model"]["dec_shared"] is True and config["model"]["mask_ratio"] == 0.5
    assert config["model"]["partition"] == [2, 2] and config["preset"] == "tiny"
    assert config["data"] == {"path": "synthetic"}  # no data option applies to generated clips


def test_pretrain_from_a_clip_file(tmp_path, capsys):
    """Clip tensors get the crops and flips the config records (they were recorded and never applied);
    options that apply to videos only are refused by name, as they are for generated clips."""
    from functools import partial

    from bwssl_core.batches import ClipTensorFile
    from bwssl_core.cache import gpu_augment

    clips = torch.randint(0, 256, (6, 4, 32, 32, 3), dtype=torch.uint8)  # (N, T, H, W, C)
    torch.save(clips, tmp_path / "clips.pt")
    assert main(["pretrain", "--out", str(tmp_path / "run"), "--data", str(tmp_path / "clips.pt"), *TINY]) == 0
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 2
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"]["augment"] is True
    plain = next(ClipTensorFile(tmp_path / "clips.pt", 4)())
    cropped = next(ClipTensorFile(tmp_path / "clips.pt", 4, augment=partial(gpu_augment, size=32))())
    assert plain.shape == cropped.shape == (4, 3, 4, 32, 32) and not torch.allclose(plain, cropped)
    capsys.readouterr()
    for data, flags, message in ((tmp_path / "clips.pt", ["--repeats", "2"], "--repeats: "),
                                 (tmp_path / "clips.pt", ["--skip-bad"], "--skip-bad: "),
                                 ("synthetic", ["--no-flip"], "--data synthetic generates its clips")):
        assert main(["pretrain", "--out", str(tmp_path / "other"), "--data", str(data), *TINY, *flags]) == 2
        assert message in capsys.readouterr().err


def test_clip_file_batches_are_cropped_on_the_training_device(tmp_path):
    """A GPU run moves the clips of a .pt file to its GPU before gpu_augment crops them, as a cache's (they
    stayed on the CPU); nothing moves before a batch is drawn, so a GPU's name can be checked here."""
    import argparse

    from bwssl_core.cli import make_source
    from bwssl_core.config import DataConfig, TrainConfig

    torch.save(torch.zeros(6, 4, 32, 32, 3, dtype=torch.uint8), tmp_path / "clips.pt")
    args = argparse.Namespace(data=str(tmp_path / "clips.pt"), preset="tiny", out=str(tmp_path / "run"), workers=0)
    for device in ("cpu", "cuda:1"):
        assert make_source(args, model_config("tiny"), TrainConfig(batch_size=4), DataConfig(), device).device == device


def test_repeats_that_cannot_split_over_the_processes_are_refused_first(tmp_path, synth_data, capsys, monkeypatch):
    """--batch-size 6 --repeats 2 under 2 processes: 3 videos a step cannot be split. Refused naming what was
    given, before any file is written (the message named a batch_size of 3, after config.json)."""
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it: the data is checked before the process group
    out = tmp_path / "run"
    assert main(["pretrain", "--data", str(synth_data), *TINY, "--batch-size", "6", "--repeats", "2",
                 "--workers", "0", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "batch_size=6 with repeats=2: 3 videos a step, expected a multiple of the 2 processes" in err
    assert not out.exists()


def test_a_batch_that_cannot_split_over_the_processes_keeps_the_run_it_would_replace(tmp_path, capsys, monkeypatch):
    """--overwrite with a batch of 3 under 2 processes: refused before the old run's files are deleted (the
    Trainer refused it only after claim_folder had deleted them)."""
    out = tmp_path / "run"
    out.mkdir()
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt"):
        (out / name).write_text(name)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["pretrain", *TINY, "--batch-size", "3", "--overwrite", "--out", str(out)]) == 2
    assert "batch_size=3: expected a multiple of the 2 processes" in capsys.readouterr().err
    assert sorted(p.read_text() for p in out.iterdir()) == ["checkpoint.pt", "config.json", "metrics.jsonl"]


@pytest.mark.parametrize("extra, message", [
    (["--preset", "vit_x"], "unknown preset 'vit_x'"),
    (["--partition", "1,1"], "partition='1,1': expected block sizes that sum to depth=4"),
    (["--blocks", "3"], "blocks=3: expected a divisor of depth=4"),
    (["--img-size", "30"], "img_size=30: expected a multiple of patch_size=8"),
    (["--batch-size", "0"], "batch_size=0: expected a positive integer"),
    (["--device", "gpu0"], "device='gpu0': expected cpu, cuda or cuda:N"),
    (["--workers", "-1"], "--workers=-1: expected an integer >= 0"),
])
def test_bad_input_stops_before_training(tmp_path, capsys, extra, message):
    assert main(["pretrain", "--out", str(tmp_path / "run"), *TINY, *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_sampling_rate_for_clip_tensors_is_refused(tmp_path, capsys):
    """Clip tensors are used frame by frame: a sampling rate would be silently ignored, so it is refused,
    in training and in probing alike."""
    from bwssl_core.evaluate import load_split

    clips = torch.randint(0, 256, (6, 4, 32, 32, 3), dtype=torch.uint8)
    torch.save(clips, tmp_path / "clips.pt")
    assert main(["pretrain", "--out", str(tmp_path / "run"), "--data", str(tmp_path / "clips.pt"), *TINY,
                 "--sampling-rate", "2"]) == 2
    assert "sampling_rate=2: " + str(tmp_path / "clips.pt") + " holds clip tensors" in capsys.readouterr().err
    torch.save({"clips": clips, "labels": {"a": torch.arange(6) % 2}}, tmp_path / "val.pt")
    with pytest.raises(ConfigError, match="sampling_rate=3: .*val.pt holds clip tensors"):
        load_split(tmp_path, "val", model_config("tiny"), 3)
    assert load_split(tmp_path, "val", model_config("tiny"), 1)[0].shape == (6, 3, 4, 32, 32)


def test_clip_file_of_another_shape(tmp_path, capsys):
    torch.save(torch.zeros(6, 8, 32, 32, 3, dtype=torch.uint8), tmp_path / "clips.pt")
    assert main(["pretrain", "--out", str(tmp_path / "run"), "--data", str(tmp_path / "clips.pt"), *TINY]) == 2
    err = capsys.readouterr().err
    assert "clips.pt: clips of (C, T, H, W) = (3, 8, 32, 32), expected (3, 4, 32, 32)" in err


def test_resume_and_refusals(tmp_path, capsys):
    run = ["pretrain", "--out", str(tmp_path), *TINY]
    assert main(run) == 0
    assert main(run) == 2 and "already holds a run" in capsys.readouterr().err
    assert main([*run, "--resume", "--mask-ratio", "0.5"]) == 2
    assert "model.mask_ratio: run has 0.75, now 0.5" in capsys.readouterr().err
    assert main([*run, "--resume", "--steps", "3"]) == 2  # a longer run would change the schedule
    assert main([*run, "--resume", "--log-every", "5"]) == 0  # already finished: nothing to do
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 2
    capsys.readouterr()
    before = {f: (tmp_path / f).read_bytes() for f in ("config.json", "metrics.jsonl", "checkpoint.pt")}
    assert main([*run, "--overwrite", "--data", str(tmp_path / "clipz.pt")]) == 2  # a typo in --data
    assert "clipz.pt" in capsys.readouterr().err
    assert {f: (tmp_path / f).read_bytes() for f in before} == before  # the run it would replace is kept


def test_pretrain_from_a_data_folder_and_its_cache(tmp_path, synth_data):
    cache = tmp_path / "cache"
    assert main(["cache", "--list", str(synth_data / "train.csv"), "--out", str(cache)]) == 0
    for source in (synth_data, cache):
        out = tmp_path / f"run-{source.name}"
        assert main(["pretrain", "--out", str(out), "--data", str(source), *TINY, "--workers", "0"]) == 0
        data = json.loads((out / "config.json").read_text())["data"]
        assert data["path"] == str(source) and data["augment"] is True
        assert load_checkpoint(out / "checkpoint.pt")["step"] == 2


def test_dataset_batches_resume_exactly(synth_data):
    from bwssl_core.batches import DatasetBatches
    from bwssl_core.video import VideoClips, train_transform

    clips = VideoClips(synth_data / "train.csv", num_frames=4, sampling_rate=1, transform=train_transform(32))
    source = DatasetBatches(clips, batch_size=4, seed=0, workers=0)
    whole = [b for _, b in zip(range(12), source(0))]  # 40 videos, 10 steps an epoch: crosses two epochs
    resumed = [b for _, b in zip(range(3), source(9))]
    assert all(torch.equal(a, b) for a, b in zip(whole[9:], resumed))
    assert not torch.equal(whole[0], whole[10])  # another epoch: another order and other crops
    halves = [next(iter(source(10, rank, 2))) for rank in (0, 1)]
    assert torch.equal(torch.cat(halves), whole[10])  # two processes split the same global batch


def test_data_that_is_not_there(tmp_path, capsys):
    assert main(["pretrain", "--out", str(tmp_path / "run"), *TINY, "--data", str(tmp_path)]) == 2
    assert "expected 'synthetic', a .pt clip file, a clip cache" in capsys.readouterr().err


def test_probe_a_run(tmp_path, synth_data, capsys):
    run = tmp_path / "run"
    assert main(["pretrain", "--out", str(run), "--data", str(synth_data), *TINY, "--workers", "0"]) == 0
    capsys.readouterr()
    probe = ["probe", "--run", str(run), "--data", str(synth_data), "--families", "motion,colour", "--device", "cpu",
             "--attentive-layers", "-1"]
    assert main(probe) == 0
    results = json.loads((run / "probe.json").read_text())["results"]
    assert set(results) == {"trained", "random_init", "pixels"}
    motion = results["trained"]["slices"]["motion"]
    assert len(motion["acc"]) == 4 and len(results["pixels"]["mean"]["colour"]["acc"]) == 1
    # R@50 needs 50 clips
    assert set(motion) == {"acc", "l2", "holdout_acc", "iterations", "R@1", "R@5", "R@10", "R@20"}
    assert all(0 <= a <= 1 for a in motion["acc"]) and motion["R@20"][0] >= motion["R@1"][0]
    assert results["trained"]["attentive"]["motion"]["layers"] == [-1]
    assert len(results["pixels"]["attentive"]["colour"]["acc"]) == 1
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {(r["family"], r["pooling"]) for r in rows} == {(f, p) for f in ("motion", "colour")
                                                           for p in ("mean", "slices", "grid", "attentive")}
    assert main(["probe", "--run", str(run), "--data", str(synth_data)]) == 2  # no silent overwrite
    assert "probe.json exists" in capsys.readouterr().err
    # features and probe results are cached by content: a rerun computes nothing and agrees
    cached = sorted(p.name for p in (run / "features").glob("*.pt"))
    assert len(cached) == 6 and sum(name.startswith("probe-") for name in cached) == 3
    stamp = {p: p.stat().st_mtime_ns for p in (run / "features").iterdir()}
    assert main([*probe, "--overwrite"]) == 0
    assert json.loads((run / "probe.json").read_text())["results"] == results
    assert {p: p.stat().st_mtime_ns for p in (run / "features").iterdir()} == stamp


def test_probe_names_a_missing_family(tmp_path, synth_data, capsys):
    run = tmp_path / "run"
    assert main(["pretrain", "--out", str(run), "--data", str(synth_data), *TINY, "--workers", "0"]) == 0
    assert main(["probe", "--run", str(run), "--data", str(synth_data), "--families", "texture"]) == 2
    assert "label families ['texture'] are not in the data" in capsys.readouterr().err
    assert main(["probe", "--run", str(run), "--data", str(synth_data), "--attentive-layers", "last"]) == 2
    assert "--attentive-layers=last: expected comma-separated layer indices" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [(["--distractor", "2"], "--distractor=2.0: expected a probability"),
                                            (["--noise", "-1"], "--noise=-1.0: expected a standard deviation")])
def test_synth_refuses_bad_factors(tmp_path, capsys, extra, message):
    assert main(["synth", "--out", str(tmp_path / "d"), "--n-train", "4", "--n-val", "2", *extra]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "d").exists()


def test_analyze_a_run_against_another(tmp_path, synth_data, capsys):
    runs = []
    for k in (1, 2):
        run = tmp_path / f"k{k}"
        assert main(["pretrain", "--out", str(run), "--data", str(synth_data), *TINY, "--workers", "0",
                     "--blocks", str(k)]) == 0
        runs.append(run)
    assert main(["analyze", "--run", str(runs[0]), "--vs", str(runs[1]), "--data", str(synth_data),
                 "--batch-size", "8", "--device", "cpu"]) == 0
    result = json.loads((runs[0] / "analyze.json").read_text())
    within = torch.tensor(result["cka_within"])
    assert within.shape == (4, 4) and torch.allclose(within.diagonal(), torch.ones(4, dtype=within.dtype))
    assert torch.tensor(result["cka_across"]).shape == (4, 4)
    assert len(result["token_relative_change"]) == 3 and len(result["knn_overlap"]) == 3
    assert len(result["attention"]) == 4 and result["cka_clips"] == 16
    assert main(["analyze", "--run", str(runs[0]), "--data", str(synth_data), "--batch-size", "32"]) == 2
    assert "analyze.json exists" in capsys.readouterr().err


def test_bad_video_stops_the_run_or_is_listed_with_skip_bad(tmp_path, synth_data, capsys):
    data = tmp_path / "data"
    shutil.copytree(synth_data, data)
    broken = data / "videos" / "train" / "000003.mp4"
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 3])  # truncated
    args = ["pretrain", "--data", str(data), *TINY, "--workers", "0", "--steps", "12", "--log-every", "4"]
    assert main([*args, "--out", str(tmp_path / "strict")]) == 2
    err = capsys.readouterr().err
    assert "train.csv:4" in err and "000003.mp4" in err
    with pytest.warns(UserWarning, match="skipping 1 of 40 videos that cannot be read, listed in"):
        assert main([*args, "--out", str(tmp_path / "lenient"), "--skip-bad"]) == 0
    listed = (tmp_path / "lenient" / "bad_videos.txt").read_text().splitlines()
    assert len(listed) == 1 and "train.csv:4\t" in listed[0] and "000003.mp4" in listed[0]


def test_probe_refuses_an_attentive_layer_the_run_does_not_have(tmp_path, capsys):
    assert main(["pretrain", "--out", str(tmp_path / "run"), *TINY]) == 0
    capsys.readouterr()
    for layers in ("9", "-5", "0,4"):  # checked before the data is read: none is given here
        assert main(["probe", "--run", str(tmp_path / "run"), "--data", str(tmp_path / "none"), "--device", "cpu",
                     f"--attentive-layers={layers}"]) == 2
        assert f"--attentive-layers={layers}: " + str(tmp_path / "run") + " has 4 encoder layers: expected " \
               "indices from -4 to 3" in capsys.readouterr().err
    assert not (tmp_path / "run" / "probe.json").exists()


def test_cache_workers_say_what_they_are(capsys):
    with pytest.raises(SystemExit):
        main(["cache", "--help"])
    assert "processes decoding videos" in " ".join(capsys.readouterr().out.split())


def test_presets_list_every_model_field_the_flags_default_to(capsys):
    import dataclasses

    from bwssl_core.config import PRESETS, ModelConfig

    assert main(["presets"]) == 0
    listed = dict(line.split(" ", 1) for line in capsys.readouterr().out.splitlines())
    assert list(listed) == list(PRESETS)
    cpu = json.loads(listed["cpu"])
    assert set(cpu) == {f.name for f in dataclasses.fields(ModelConfig)}
    assert cpu["mask_ratio"] == 0.9 and cpu["norm_target"] is True and cpu["dec_keep"] == 1.0
    assert cpu["depth"] == 4 and cpu["partition"] == [4]


def test_config_records_the_sampling_rate_used_and_old_runs_still_resume(tmp_path, synth_data, capsys):
    from bwssl_core.io import save_checkpoint

    run = ["pretrain", "--out", str(tmp_path / "run"), "--data", str(synth_data), *TINY, "--workers", "0"]
    assert main(run) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"]["sampling_rate"] == 1  # synth: 1
    from bwssl_core.cli import sampling_rate
    from bwssl_core.config import DataConfig

    (tmp_path / "list.csv").write_text("")
    assert sampling_rate(str(tmp_path / "list.csv"), DataConfig()) == 4  # videos not from `bwssl synth`
    assert sampling_rate(str(tmp_path / "list.csv"), DataConfig(sampling_rate=2)) == 2
    assert sampling_rate(str(tmp_path / "clips.pt"), DataConfig()) == 1  # clip tensors: frame by frame
    assert main([*run, "--resume"]) == 0
    # a run recorded before the rate was resolved (0: automatic) resumes with the same flags, not with another rate
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    state["config"]["data"]["sampling_rate"] = 0
    save_checkpoint(tmp_path / "run" / "checkpoint.pt", {k: v for k, v in state.items() if k != "version"})
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    config["data"]["sampling_rate"] = 0
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert main([*run, "--resume"]) == 0 and main([*run, "--resume", "--sampling-rate", "1"]) == 0
    assert main([*run, "--resume", "--sampling-rate", "4"]) == 2
    assert "data.sampling_rate: run has 0, now 4" in capsys.readouterr().err


def test_pretrain_help_explains_the_sampling_rate(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--sampling-rate INT frames between sampled frames (default: 1 for a `bwssl synth` folder or clip " \
           "tensors, else 4" in text and "--sampling-rate INT (default 0)" not in text
