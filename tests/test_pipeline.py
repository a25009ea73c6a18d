"""Block-parallel training (one process per block) trains the same weights as the blockwise Trainer."""
import json
import re
import sys

import pytest
import torch
import torch.distributed as dist

from bwssl_core import ConfigError, TrainConfig
from bwssl_core.batches import MovingShapes
from bwssl_core.io import load_checkpoint
from bwssl_core.pipeline import BlockWorker, main, pipeline_estimate, train_sequential
from bwssl_core.train import Trainer, load_run, pretrain
from launch import free_port, run_ok

ARGS = ["--preset", "tiny", "--steps", "3", "--batch-size", "4", "--base-lr", "0.05", "--warmup-steps", "1",
        "--clip-grad", "0.02", "--device", "cpu"]


def _tcfg(**kw):
    return TrainConfig(**{**dict(steps=3, batch_size=4, base_lr=0.05, warmup_steps=1, clip_grad=0.02), **kw})


def _assemble(workers):
    return {n: v for w in workers for n, v in w.model.state_dict().items()}


@pytest.mark.parametrize("partition", [(1, 3), (1, 1, 2)])
def test_sequential_workers_equal_trainer(tiny, tmp_path, partition):
    """The per-rank step logic, run in one process: bitwise Trainer's blockwise run. clip_grad is
    small so that clipping is active."""
    mcfg, tcfg = tiny(partition=partition), _tcfg()
    trainer = Trainer(mcfg, tcfg, tmp_path, device="cpu")
    source = MovingShapes(mcfg, tcfg.batch_size, tcfg.seed)
    reference = torch.stack([torch.stack(trainer.train_step(v)) for v, _ in zip(source(), range(3))])
    workers = [BlockWorker(mcfg, tcfg, k) for k in range(len(partition))]
    losses = train_sequential(workers, source(), tcfg.steps)
    assert torch.equal(losses, reference)
    state = _assemble(workers)
    assert state.keys() == trainer.model.state_dict().keys()
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(state[name], value), name


def test_refuses_shared_decoder_and_wrong_world(tiny, tmp_path, capsys):
    with pytest.raises(ConfigError, match="dec_shared"):
        BlockWorker(tiny(partition=(2, 2), dec_shared=True), _tcfg(), 0)
    assert main([*ARGS, "--blocks", "2", "--out", str(tmp_path / "run")]) == 2  # WORLD_SIZE 1, 2 blocks
    assert "2 blocks need 2 processes" in capsys.readouterr().err


def _one_rank(monkeypatch, *argv) -> int:
    """main(argv) in this process as the one rank of a one-block torchrun; leaves no process group behind."""
    for name, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(name, value)
    try:
        return main([*ARGS, "--blocks", "1", *argv])
    finally:
        if dist.is_initialized():  # an error returns with the group still up
            dist.destroy_process_group()


def test_overwrite_checks_the_data_before_deleting_the_run(tmp_path, capsys, monkeypatch):
    """As bwssl pretrain: a typo in --data keeps the run --overwrite would replace; the refusal does not offer
    --resume, which the pipeline has not."""
    out = str(tmp_path / "run")
    assert _one_rank(monkeypatch, "--out", out) == 0
    before = {f: (tmp_path / "run" / f).read_bytes() for f in ("config.json", "metrics.jsonl", "checkpoint.pt")}
    capsys.readouterr()
    assert _one_rank(monkeypatch, "--out", out, "--overwrite", "--data", str(tmp_path / "clipz.pt")) == 2
    err = capsys.readouterr().err
    assert "bwssl pipeline: error: " in err and "clipz.pt" in err
    assert {f: (tmp_path / "run" / f).read_bytes() for f in before} == before
    assert _one_rank(monkeypatch, "--out", out) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--overwrite" in err and "--resume" not in err


def test_a_diverged_run_is_refused_before_saving(tmp_path, capsys, monkeypatch):
    """As Trainer: a non-finite loss stops the run with an error naming the block and step (exit 2, no
    traceback), and no checkpoint of NaN weights is written."""
    out = tmp_path / "run"
    assert _one_rank(monkeypatch, "--out", str(out), "--base-lr", "1e30", "--clip-grad", "0", "--steps", "6") == 2
    err = capsys.readouterr().err
    assert re.search(r"bwssl pipeline: error: block 0's loss is (nan|inf|-inf) at step [1-6]: ", err), err
    assert "Traceback" not in err
    assert not (out / "checkpoint.pt").exists() and not (out / "metrics.jsonl").exists()


def test_estimate():
    est = pipeline_estimate([0.1, 0.3, 0.2], transfer_seconds=0.05)
    assert est["serial_s"] == pytest.approx(0.6) and est["period_s"] == pytest.approx(0.35)
    assert est["speedup"] == pytest.approx(0.6 / 0.35) and est["bottleneck"] == 1
    assert pipeline_estimate([0.2], 1.0)["speedup"] == 1.0  # one block: nothing to transfer




@pytest.mark.parametrize("partition", [(1, 3), (1, 1, 2)])
def test_torchrun_equals_trainer(tiny, tmp_path, partition):
    """K gloo processes, one block each, pipelined: bitwise the single-process blockwise run (made
    here with one thread, as the processes have)."""
    one, pipe, K = tmp_path / "one", tmp_path / "pipe", len(partition)
    mcfg, tcfg = tiny(partition=partition), _tcfg(log_every=2)  # as ARGS
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pretrain(mcfg, tcfg, MovingShapes(mcfg, tcfg.batch_size, tcfg.seed), one, device="cpu")
    finally:
        torch.set_num_threads(threads)
    run_ok([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(K), "--master-addr", "127.0.0.1",
          "--master-port", str(free_port()), "-m", "bwssl_core.pipeline", *ARGS, "--log-every", "2",
          "--partition", ",".join(map(str, partition)), "--out", str(pipe)])
    a, b = load_checkpoint(one / "checkpoint.pt"), load_checkpoint(pipe / "checkpoint.pt")
    assert b["step"] == 3 and b["config"]["world_size"] == K and b["losses"].shape == (3, K)
    assert a["model"].keys() == b["model"].keys()
    for name, value in a["model"].items():
        assert torch.equal(b["model"][name], value), name
    ref, got = ([json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (one, pipe))
    assert [r["step"] for r in ref] == [r["step"] for r in got] == [2, 3]
    for r, g in zip(ref, got):
        assert g["lr"] == r["lr"] and g["loss"] == pytest.approx(r["loss"], rel=1e-6)
    assert got[-1]["clips_per_s"] > 0
    assert load_run(pipe)[0].cfg.partition == partition
