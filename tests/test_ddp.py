"""Two-process data parallel (torchrun, gloo on the CPU) trains the same weights as one process."""
import json
import shutil
import sys

import pytest
import torch

from bwssl_core.io import load_checkpoint
from launch import free_port, run_ok, run_within

ARGS = ["pretrain", "--preset", "tiny", "--steps", "4", "--batch-size", "8", "--base-lr", "0.05",
        "--warmup-steps", "1", "--log-every", "2", "--device", "cpu"]




@pytest.mark.parametrize("split", [["--blocks", "1"], ["--partition", "1,3", "--per-block-backward"],
                                   ["--blocks", "2", "--dec-shared", "--no-per-block-backward"],
                                   ["--blocks", "2", "--dec-shared", "--per-block-backward"]])
def test_two_processes_equal_one(tmp_path, split):
    one, two = tmp_path / "one", tmp_path / "two"
    run_ok([sys.executable, "-m", "bwssl_core", *ARGS, *split, "--out", str(one)])
    run_ok([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
          "--master-port", str(free_port()), "-m", "bwssl_core", *ARGS, *split, "--out", str(two)])
    a, b = load_checkpoint(one / "checkpoint.pt"), load_checkpoint(two / "checkpoint.pt")
    assert b["config"]["world_size"] == 2 and b["step"] == 4
    for name, value in a["model"].items():
        # 1e-5: about 1% of one Adam step at this lr (round-off in near-zero gradients, see test_train)
        torch.testing.assert_close(b["model"][name], value, rtol=1e-5, atol=1e-5, msg=name)
    rows = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (one, two)]
    assert [(r["step"], r["lr"]) for r in rows[0]] == [(r["step"], r["lr"]) for r in rows[1]]
    for r1, r2 in zip(*rows):  # each block's loss, the mean over both processes: the one-process value
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-5)


def test_an_error_on_one_process_stops_every_process(tmp_path, synth_data):
    """A video that only one process reads is broken: that process prints its error and leaves without
    waiting for the others (it waited for them at a barrier while they waited for it in an all-reduce: every
    process hung, the error unseen); torchrun then stops the others."""
    data = tmp_path / "data"
    shutil.copytree(synth_data, data)
    broken = data / "videos" / "train" / "000003.mp4"
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 3])  # truncated
    proc = run_within([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                       "127.0.0.1", "--master-port", str(free_port()), "-m", "bwssl_core", *ARGS, "--steps", "10",
                       "--data", str(data), "--workers", "0", "--out", str(tmp_path / "run")], 90)
    assert proc.returncode != 0
    assert "bwssl pretrain: error: train.csv:4: " in proc.stderr and "000003.mp4" in proc.stderr
