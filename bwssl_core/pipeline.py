"""Block-parallel blockwise pretraining: one process per block, activations passed forward only.

No gradient crosses a block boundary, so block k needs nothing from the blocks after it: rank k
owns block k (its Stage, its decoder and their AdamW), receives the detached output of block k - 1's
visible tokens (point-to-point), computes its loss, backward and optimiser step, and sends its own
output on to rank k + 1. Nothing travels backward.

    torchrun --nproc-per-node K -m bwssl_core.pipeline --preset cpu --blocks K --steps N --out DIR

Pipelining: rank k runs step t while rank k - 1 already runs step t + 1. A rank sends with isend and
waits for that send only before its next one (so step t's output travels while step t + 1 computes),
and posts the receive of step t + 1 into a second buffer before computing step t. A rank is thus at
most two steps ahead of the next; the step time is that of the slowest block once the pipe is full.

Same result as one process (train.Trainer with per-block backward), by construction:
- weights: every rank builds the whole model from the seed, as Trainer does, and keeps its block;
- data: every rank reads the same global batch of step t from the same deterministic batch source
  (rather than rank 0 broadcasting it: every rank needs the clip for its block's target; read a clip
  cache, not videos, when decoding is costly). CPU transforms are seeded per clip, and gpu_augment
  draws from the device RNG, seeded alike on every rank;
- mask: train.step_mask, the Trainer's own;
- optimiser: Trainer's lr_at, param_groups and per-block clipping; AdamW is elementwise, so one
  optimiser per block equals Trainer's single one.
Rank 0 gathers the blocks' weights into one checkpoint.pt (load_run reads it). Optimiser states
are not saved, so a pipeline run cannot be resumed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .batches import RNG_STREAMS, normalize_video
from .config import ConfigError, ModelConfig, TrainConfig, to_dict
from .io import RunError, save_checkpoint, save_json, save_text
from .listfile import DataError
from .masking import Mask
from .model import VideoMAE
from .train import (compile_module, compiled, lr_at, param_groups, peak_memory_gib, resolve_device,
                    step_mask)


class BlockWorker:
    """The work of one pipeline rank: block k's stage and decoder, their AdamW, one step at a time."""

    def __init__(self, mcfg: ModelConfig, tcfg: TrainConfig, k: int, device="cpu"):
        if mcfg.dec_shared:
            raise ConfigError("dec_shared: a decoder shared by all blocks cannot be split over processes")
        self.tcfg, self.k, self.device = tcfg.validate(), k, torch.device(device)
        torch.manual_seed(tcfg.seed)
        model = VideoMAE(mcfg)  # the whole model, so that block k starts from Trainer's weights
        for j in range(len(mcfg.partition)):
            if j != k:  # keep the skeleton: its buffers make the target; state_dict keys stay global
                model.stages[j], model.decoders[j] = nn.Identity(), nn.Identity()
        self.model = model.to(self.device)
        self.stage, self.decoder = model.stages[k], model.decoders[k]
        self.params = [*self.stage.parameters(), *self.decoder.parameters()]  # model.block_parameters()[k]
        fused = {"fused": True} if self.device.type == "cuda" else {}
        self.optimizer = torch.optim.AdamW(param_groups(model, tcfg.weight_decay), lr=0.0,
                                           betas=(tcfg.beta1, tcfg.beta2), **fused)
        self.make_target = compiled(model.target) if tcfg.compile else model.target
        if tcfg.compile:
            compile_module(self.stage)
            compile_module(self.decoder)
        bf16 = tcfg.precision == "bf16" or (tcfg.precision == "auto" and self.device.type == "cuda")
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if bf16 else nullcontext

    def step(self, x: torch.Tensor, video: torch.Tensor, mask: Mask, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimiser step of this block. x: the normalised video (B, C, T, H, W) for block 0, else
        the previous block's output (B, N, D). Returns (this block's output, detached; its loss)."""
        t = self.tcfg
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(step, t)
        with self.autocast():
            target = self.make_target(video, mask.decode)
            x, z = self.stage(x if self.k == 0 else x.detach(), mask.ids_keep)
            loss = self.decoder(z, mask.ids_keep, mask.decode, target)
            with torch.autocast(self.device.type, enabled=False):
                loss.backward()
        if t.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(self.params, t.clip_grad, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return x.detach(), loss.detach()


def _video(batch: torch.Tensor, device) -> torch.Tensor:
    batch = batch.to(device, non_blocking=True)
    return normalize_video(batch) if batch.dtype == torch.uint8 else batch


def train_sequential(workers: list[BlockWorker], batches, steps: int, start: int = 0) -> torch.Tensor:
    """All blocks in one process, in turn: the pipeline's arithmetic without processes. (steps, K) losses."""
    first = workers[0]
    losses = []
    for step, batch in zip(range(start, steps), batches):
        x = video = _video(batch, first.device)
        mask = step_mask(first.model.cfg, first.tcfg, step, first.device)
        row = []
        for w in workers:
            x, loss = w.step(x, video, mask, step)
            row.append(loss)
        losses.append(torch.stack(row))
    return torch.stack(losses).cpu()


def _wait(work) -> float:
    """Wait for a point-to-point request; the seconds it blocked."""
    tic = time.perf_counter()
    work.wait()
    return time.perf_counter() - tic


def run_rank(worker: BlockWorker, batches, steps: int) -> tuple[torch.Tensor, dict]:
    """This rank's part of a pipelined run (rank = block index, world = K): (steps,) losses, timing."""
    k, K, dev = worker.k, dist.get_world_size(), worker.device
    cfg = worker.model.cfg
    shape = (worker.tcfg.batch_size, cfg.num_visible, cfg.embed_dim)  # the residual stream, fp32
    buffers = [torch.empty(shape, device=dev) for _ in range(2)] if k > 0 else None
    send = None  # (work, tensor): the tensor lives until its send completes
    losses, times, wait = [], [], 0.0  # wait: seconds blocked on communication
    dist.barrier()  # before any point-to-point call: NCCL creates each pair's communicator at its first one
    tic = time.perf_counter()
    recv = dist.irecv(buffers[0], src=k - 1) if k > 0 else None
    for step, batch in zip(range(steps), batches):
        video = _video(batch, dev)
        mask = step_mask(cfg, worker.tcfg, step, dev)
        x = video
        if k > 0:
            wait += _wait(recv)
            x = buffers[step % 2]
            if step + 1 < steps:  # post the next receive before computing this step (on a GPU, NCCL's
                # stream waits for the work queued before it, step - 1's reads of that buffer included)
                recv = dist.irecv(buffers[(step + 1) % 2], src=k - 1)
        out, loss = worker.step(x, video, mask, step)
        if k < K - 1:
            if send is not None:
                wait += _wait(send[0])
            out = out.float().contiguous()
            send = (dist.isend(out, dst=k + 1), out)
        losses.append(loss)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - tic)
    if send is not None:
        wait += _wait(send[0])
    return torch.stack(losses).float().cpu(), {"seconds": times[-1], "first_step_s": times[0], "wait_s": wait,
                                               "peak_mem_gib": peak_memory_gib(dev)}


def pipeline_estimate(block_seconds: list[float], transfer_seconds: float = 0.0) -> dict:
    """Modelled speed-up of K pipelined ranks over one device running the blocks in turn, from each
    block's measured step time (forward, backward, optimiser) on one device.

    Once the pipe is full every rank does one step per period, so the period is the slowest block
    plus one transfer of activations (an upper bound: isend and the early irecv can hide it)."""
    serial = sum(block_seconds)
    period = max(block_seconds) + (transfer_seconds if len(block_seconds) > 1 else 0.0)
    return {"serial_s": serial, "period_s": period, "speedup": serial / period,
            "efficiency": serial / period / len(block_seconds),
            "bottleneck": max(range(len(block_seconds)), key=block_seconds.__getitem__)}


def build_parser() -> argparse.ArgumentParser:
    from .cli import _DATA_FLAGS, _MODEL_FLAGS, _TRAIN_FLAGS, _add_fields

    p = argparse.ArgumentParser(prog="python -m bwssl_core.pipeline", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="run folder (config.json, metrics.jsonl, checkpoint.pt)")
    p.add_argument("--data", default="synthetic", help="as `bwssl pretrain --data`")
    p.add_argument("--workers", type=int, default=0, help="DataLoader processes per rank for video folders")
    p.add_argument("--preset", default="cpu")
    split = p.add_mutually_exclusive_group()
    split.add_argument("--blocks", type=int, help="K equal blocks, one process each")
    split.add_argument("--partition", help="layers per block, e.g. 1,3")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.add_argument("--device", help="default: cuda:LOCAL_RANK if there is a GPU, else cpu")
    _add_fields(p, _MODEL_FLAGS, "model (override the preset)")
    _add_fields(p, _TRAIN_FLAGS, "training (per_block_backward is always on)")
    _add_fields(p, _DATA_FLAGS, "data")
    return p


def _window_rows(losses: torch.Tensor, tcfg: TrainConfig) -> list[dict]:
    """metrics.jsonl rows as Trainer writes them: mean loss of each log window."""
    rows, start = [], 0
    for end in range(1, len(losses) + 1):
        if end % tcfg.log_every == 0 or end == len(losses):
            rows.append({"step": end, "lr": lr_at(end - 1, tcfg), "loss": losses[start:end].mean(0).tolist()})
            start = end
    return rows


def main(argv: list[str] | None = None) -> int:
    from .cli import _DATA_FLAGS, _MODEL_FLAGS, _TRAIN_FLAGS, _picked, source_for_run
    from .config import DataConfig, model_config, parse_partition

    args = build_parser().parse_args(argv)
    try:
        overrides = _picked(args, _MODEL_FLAGS)
        if args.partition:
            overrides["partition"] = parse_partition(args.partition)
        mcfg = model_config(args.preset, blocks=args.blocks, **overrides)
        tcfg = TrainConfig(**{**_picked(args, _TRAIN_FLAGS), "per_block_backward": True}).validate()
        dcfg = DataConfig(**_picked(args, _DATA_FLAGS)).validate()
        K, world = len(mcfg.partition), int(os.environ.get("WORLD_SIZE", "1"))
        if world != K:
            raise ConfigError(f"{K} blocks need {K} processes (torchrun --nproc-per-node {K}), got {world}")
        device = resolve_device(args.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank, out = dist.get_rank(), Path(args.out)
        config = {"model": to_dict(mcfg), "train": to_dict(tcfg), "world_size": K, "pipeline": True,
                  "rng_streams": RNG_STREAMS, "data": {"path": args.data, **to_dict(dcfg)}, "preset": args.preset}
        source = source_for_run(argparse.Namespace(data=args.data, preset=args.preset, out=args.out,
                                                   workers=args.workers, overwrite=args.overwrite),
                                mcfg, tcfg, dcfg, str(device), claims=rank == 0, resumable=False)
        worker = BlockWorker(mcfg, tcfg, rank, device)
        if rank == 0:
            save_json(out / "config.json", config)
        losses, timing = run_rank(worker, source(0, 0, 1), tcfg.steps)  # every rank: the whole global batch
        gathered = [None] * K if rank == 0 else None
        part = {"state": {n: v.cpu() for n, v in worker.model.state_dict().items()}, "losses": losses, **timing}
        dist.gather_object(part, gathered, dst=0)
        if rank == 0:
            state = {n: v for p in gathered for n, v in p["state"].items()}
            all_losses = torch.stack([p["losses"] for p in gathered], dim=1)  # (steps, K)
            if not all_losses.isfinite().all():  # as Trainer: a diverged run is not saved
                step, k = (~all_losses.isfinite()).nonzero()[0].tolist()  # the first bad step, its first block
                raise FloatingPointError(f"block {k}'s loss is {all_losses[step, k].item()} at step {step + 1}: "
                                         "training diverged; no checkpoint was written")
            seconds = max(p["seconds"] for p in gathered)
            rows = _window_rows(all_losses, tcfg)
            last = gathered[-1]  # its first step ends when the pipe is full
            steady = (tcfg.steps - 1) * tcfg.batch_size / max(last["seconds"] - last["first_step_s"], 1e-9)
            rows[-1].update(clips_per_s=tcfg.steps * tcfg.batch_size / seconds, steady_clips_per_s=steady,
                            seconds=[p["seconds"] for p in gathered], wait_s=[p["wait_s"] for p in gathered],
                            peak_mem_gib=max(p["peak_mem_gib"] for p in gathered))
            save_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
            save_checkpoint(out / "checkpoint.pt", {"model": state, "step": tcfg.steps, "config": config,
                                                    "losses": all_losses})
            print(json.dumps({"out": str(out), **rows[-1]}))
        dist.barrier()
        dist.destroy_process_group()
    except (ConfigError, DataError, RunError, FloatingPointError) as err:
        print(f"bwssl pipeline: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    code = main()
    # Skip interpreter finalisation: gloo's worker threads can still hold point-to-point work whose
    # destruction then aborts the process ("terminate called without an active exception", seen here
    # once in a few runs after a clean destroy_process_group; pytorch/pytorch#179291)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
