"""Two-process data parallel (torchrun, gloo on the CPU) trains the same weights as one process."""
import os
import socket
import subprocess
import sys

import pytest
import torch

from bwssl_core.io import load_checkpoint

ARGS = ["pretrain", "--preset", "tiny", "--steps", "4", "--batch-size", "8", "--base-lr", "0.05",
        "--warmup-steps", "1", "--log-every", "2", "--device", "cpu"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("split", [["--blocks", "1"], ["--partition", "1,3", "--per-block-backward"],
                                   ["--blocks", "2", "--dec-shared", "--no-per-block-backward"],
                                   ["--blocks", "2", "--dec-shared", "--per-block-backward"]])
def test_two_processes_equal_one(tmp_path, split):
    one, two = tmp_path / "one", tmp_path / "two"
    _run([sys.executable, "-m", "bwssl_core", *ARGS, *split, "--out", str(one)])
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
          "--master-port", str(_free_port()), "-m", "bwssl_core", *ARGS, *split, "--out", str(two)])
    a, b = load_checkpoint(one / "checkpoint.pt"), load_checkpoint(two / "checkpoint.pt")
    assert b["config"]["world_size"] == 2 and b["step"] == 4
    for name, value in a["model"].items():
        torch.testing.assert_close(b["model"][name], value, rtol=1e-5, atol=1e-6, msg=name)
