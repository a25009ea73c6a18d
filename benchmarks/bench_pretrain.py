"""Pretraining throughput: clips/s, FLOP utilisation and peak memory of E2E and blockwise training,
beside HF transformers' VideoMAEForPreTraining (sdpa attention) at the same batch, in one process.

Rows: HF; ours E2E; ours blockwise for each K that divides the depth, as variants `memory`
(per-block backward, the Trainer's default), `joint` (one backward of the summed losses), `shared`
(one decoder for all blocks) and `light` (1-layer decoders; skipped where the preset's already
are). Every row runs train.Trainer's real step (mask, forward, backward, per-block clipping,
AdamW) on one fixed batch of moving shapes. FLOP utilisation (MFU): flops.train_step_flops per
step over the step time, against a dense matmul of the training dtype measured in the same run.
With --per-block, each block's step (forward, backward, optimiser: the work of one pipeline rank)
is timed on its own and pipeline.pipeline_estimate models the block-parallel speed-up.

Timing: on a GPU, CUDA events around `--steps` steps after `--warmup`, median of `--repeats`; on
the CPU, perf_counter. Peak memory: torch.cuda.max_memory_allocated per row on a GPU; on the CPU
the process's peak RSS, which only grows (so only its first row means much).

    python benchmarks/bench_pretrain.py --out runs/bench_pretrain.json --batch 32 --per-block   # GPU
    python benchmarks/bench_pretrain.py --presets tiny --batch 2 --steps 2 --repeats 1 --warmup 0 --out /tmp/b.json
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import math
import statistics
import tempfile
import time
from typing import Callable

import torch

from bwssl_core.batches import MovingShapes, step_generator
from bwssl_core.config import ModelConfig, TrainConfig, model_config
from bwssl_core.flops import mfu, train_step_flops
from bwssl_core.io import save_json
from bwssl_core.masking import tube_mask
from bwssl_core.pipeline import BlockWorker, pipeline_estimate
from bwssl_core.timing import add_device_args, device_from_args, device_name, sync
from bwssl_core.train import Trainer, peak_memory_gib, step_mask

VARIANTS = {  # name: (model overrides, per-block backward)
    "memory": ({}, True),
    "joint": ({}, False),
    "shared": ({"dec_shared": True}, True),
    "light": ({"dec_depth": 1}, True),
    "lean": ({"dec_depth": 1, "dec_keep": 0.5}, True),  # 1-layer decoders on half the hidden tubes (VideoMAE V2)
}


def time_steps(step: Callable[[], object], device: torch.device, steps: int, warmup: int, repeats: int,
               reduce: Callable = statistics.median) -> float:
    """`reduce` (the median) over `repeats` of the mean seconds per call of `step`, after `warmup` calls."""
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000 / steps)
        else:
            tic = time.perf_counter()
            for _ in range(steps):
                step()
            times.append((time.perf_counter() - tic) / steps)
    return reduce(times)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 5, warm_s: float = 1.0) -> float:
    """Measured FLOP/s of a dense (n, n) @ (n, n) matmul in `dtype`: the fastest of `repeats` after
    `warm_s` seconds of the same matmul (a peak is a maximum; a cold GPU's clocks and a 70 ms warm-up
    gave 707-795 TFLOP/s on one H200, NOTES.md, which moves a 35% MFU target by 4 points)."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    c = torch.empty(n, n, device=device, dtype=dtype)
    tic = time.perf_counter()
    while time.perf_counter() - tic < warm_s:
        torch.mm(a, b, out=c)
        sync(device)
    seconds = time_steps(lambda: torch.mm(a, b, out=c), device, steps=10, warmup=0, repeats=repeats, reduce=min)
    return 2 * n ** 3 / seconds


def _reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def profile_table(step: Callable, device: torch.device, steps: int, rows: int = 25) -> str:
    """torch.profiler's table of the kernels (or CPU ops) that take the most time over `steps` calls."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"  # kernels, not wrappers
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60)


def hf_step(cfg: ModelConfig, video: torch.Tensor, bf16: bool, seed: int) -> Callable:
    """A training step of transformers' VideoMAEForPreTraining of the same size (as the anchor
    shared/anchors/hf_videomae_bench.py: sdpa attention, fused AdamW on a GPU, bf16 autocast; our
    tube mask). Its `attn_used` says which attention transformers picked."""
    from transformers import VideoMAEConfig, VideoMAEForPreTraining

    device = video.device
    hidden = lambda d: int(d * cfg.mlp_ratio)  # noqa: E731
    hcfg = VideoMAEConfig(image_size=cfg.img_size, patch_size=cfg.patch_size, num_channels=cfg.in_chans,
                          num_frames=cfg.num_frames, tubelet_size=cfg.tubelet_size, hidden_size=cfg.embed_dim,
                          num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
                          intermediate_size=hidden(cfg.embed_dim), decoder_hidden_size=cfg.dec_dim,
                          decoder_num_hidden_layers=cfg.dec_depth, decoder_num_attention_heads=cfg.dec_heads,
                          decoder_intermediate_size=hidden(cfg.dec_dim), norm_pix_loss=cfg.norm_target,
                          attn_implementation="sdpa")
    model = VideoMAEForPreTraining(hcfg).to(device)
    fused = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW(model.parameters(), lr=1.5e-4, **fused)
    pixel_values = video.transpose(1, 2).contiguous()  # HF's (B, T, C, H, W)
    count = iter(range(10 ** 9))

    def step():
        g = step_generator("mask", seed, next(count), device)
        hidden_mask = tube_mask(video.shape[0], cfg.grid, cfg.mask_ratio, g, device).hidden
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(pixel_values=pixel_values, bool_masked_pos=hidden_mask).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    step.attn_used = getattr(model.config, "_attn_implementation", None)
    return step


def ours_step(mcfg: ModelConfig, tcfg: TrainConfig, video: torch.Tensor, folder: str) -> Callable:
    trainer = Trainer(mcfg, tcfg, folder, device=str(video.device))
    return lambda: trainer.train_step(video)[-1]


def block_times(mcfg: ModelConfig, tcfg: TrainConfig, video: torch.Tensor, steps: int, warmup: int,
                repeats: int) -> list[float]:
    """Median seconds of each block's step (forward, backward, clipping, AdamW), the blocks run in
    turn in one process as pipeline.train_sequential does."""
    device = video.device
    workers = [BlockWorker(mcfg, tcfg, k, device) for k in range(len(mcfg.partition))]
    runs = []
    for i in range(warmup + repeats):
        total = [0.0] * len(workers)
        for s in range(steps):
            step = i * steps + s
            x, mask = video, step_mask(mcfg, tcfg, step, device)
            for k, w in enumerate(workers):
                sync(device)
                tic = time.perf_counter()
                x, _ = w.step(x, video, mask, step)
                sync(device)
                total[k] += (time.perf_counter() - tic) / steps
        if i >= warmup:
            runs.append(total)
    return [statistics.median(r[k] for r in runs) for k in range(len(workers))]


def bench_preset(preset: str, args, device: torch.device, peak: float,
                 on_row: Callable[[list[dict]], None] = lambda rows: None) -> tuple[list[dict], list[dict]]:
    """This preset's rows and per-block timings; on_row(rows) after each row (main saves them, so a
    run cut short keeps what it measured)."""
    base = model_config(preset, **({"mask_ratio": args.mask_ratio} if args.mask_ratio is not None else {}))
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    steps_total = args.warmup + args.steps * args.repeats
    tcfg = lambda pbb: TrainConfig(steps=steps_total, batch_size=args.batch, warmup_steps=1,  # noqa: E731
                                   per_block_backward=pbb, precision=precision, compile=args.compile)
    video = MovingShapes(base, args.batch, seed=0, device=device).batch(0)
    timing = dict(device=device, steps=args.steps, warmup=args.warmup, repeats=args.repeats)
    rows, per_block = [], []

    def measure(name: str, cfg: ModelConfig, make: Callable[[], Callable]) -> dict:
        """One row; a row that fails (a compile error, out of memory, a non-finite loss) is recorded with
        its error and the next row runs."""
        _reset_memory(device)
        if args.compile:
            torch._dynamo.reset()  # each row compiled afresh, never over dynamo's recompile limit
        row = {"preset": preset, "impl": name, "blocks": len(cfg.partition), "partition": list(cfg.partition),
               "batch": args.batch, "precision": precision}
        try:
            step = make()
            seconds = time_steps(step, **timing)
            if name in args.profile:
                print(f"\nprofile of {preset} {name}, {args.steps} steps:\n{profile_table(step, device, args.steps)}",
                      flush=True)
            loss = float(step())
            if not math.isfinite(loss):
                raise FloatingPointError(f"{preset} {name}: loss {loss}")
            flops = train_step_flops(cfg, args.batch)["total"]
            row.update(step_ms=seconds * 1e3, clips_per_s=args.batch / seconds, tflop_per_s=flops / seconds / 1e12,
                       mfu=mfu(flops / seconds, peak), peak_gib=peak_memory_gib(device), loss=loss)
            if hasattr(step, "attn_used"):
                row["attn_used"] = step.attn_used
            print(f"  {preset} {name}: {row['clips_per_s']:.1f} clips/s", flush=True)
        except Exception as err:  # noqa: BLE001 (kept in the results; the other rows still run)
            row["error"] = f"{type(err).__name__}: {str(err)[:500]}"
            print(f"  {preset} {name}: FAILED {row['error']}", flush=True)
        finally:
            step = None
            _reset_memory(device)
        rows.append(row)
        on_row(rows)
        return row

    hf_first = not args.no_hf
    if hf_first:  # the anchor before and after our rows: it moved by up to 13% between processes (NOTES.md)
        measure("hf_sdpa", base, lambda: hf_step(base, video, precision == "bf16", seed=0))
    with tempfile.TemporaryDirectory() as tmp:
        for K in [1, *(k for k in args.blocks if k > 1 and base.depth % k == 0)]:
            at_k = args.variants if args.variant_blocks is None or K in args.variant_blocks else args.variants[:1]
            for variant in (["e2e"] if K == 1 else at_k):
                overrides, pbb = VARIANTS.get(variant, ({}, True))
                if overrides and all(getattr(base, n) == v for n, v in overrides.items()):
                    continue  # the preset already is this variant (the cpu preset's decoder has 1 layer)
                cfg = model_config(preset, blocks=K, **{**overrides, "mask_ratio": base.mask_ratio})
                measure("e2e" if K == 1 else f"bw_{variant}", cfg,
                        lambda: ours_step(cfg, tcfg(pbb), video, f"{tmp}/{len(rows)}"))
            if K > 1 and args.per_block is not None and (not args.per_block or K in args.per_block):
                cfg = model_config(preset, blocks=K, mask_ratio=base.mask_ratio)
                try:
                    times = block_times(cfg, tcfg(True), video, args.steps, args.warmup, args.repeats)
                except Exception as err:  # noqa: BLE001 (the rows measured so far are kept)
                    print(f"  {preset} per-block K={K}: FAILED {type(err).__name__}: {str(err)[:300]}", flush=True)
                    _reset_memory(device)
                    continue
                sent = args.batch * cfg.num_visible * cfg.embed_dim * 4  # fp32 activations to the next rank
                est = pipeline_estimate(times, sent / (args.link_gbs * 1e9))
                # every rank makes its own target, so the blocks' sum exceeds one process's step: compare
                # the pipeline's period with the Trainer's step too
                single = next((r["step_ms"] for r in rows if r["impl"] == "bw_memory" and r["blocks"] == K
                               and "step_ms" in r), None)
                per_block.append({"preset": preset, "blocks": K, "batch": args.batch,
                                  "block_ms": [t * 1e3 for t in times], "bytes_sent": sent,
                                  "link_gbs": args.link_gbs, **est, "est_clips_per_s": args.batch / est["period_s"],
                                  "trainer_step_ms": single,
                                  "speedup_vs_trainer": single / 1e3 / est["period_s"] if single else None})
    if hf_first:
        measure("hf_sdpa_again", base, lambda: hf_step(base, video, precision == "bf16", seed=0))
    anchors = [r["clips_per_s"] for r in rows if r["impl"].startswith("hf_sdpa") and "clips_per_s" in r]
    hf = statistics.mean(anchors) if anchors else None  # the ratios: against the anchor's mean
    for r in rows:
        r["vs_hf"] = r["clips_per_s"] / hf if hf and "clips_per_s" in r else None
    for p in per_block:
        p["est_vs_hf"] = p["est_clips_per_s"] / hf if hf else None
    return rows, per_block


def print_table(rows: list[dict], per_block: list[dict], peak: float) -> None:
    print(f"\nmeasured matmul peak: {peak / 1e12:.3f} TFLOP/s")
    print(f"{'preset':8} {'impl':12} {'K':>3} {'batch':>5} {'step ms':>9} {'clips/s':>9} {'TFLOP/s':>8} "
          f"{'MFU':>6} {'peak GiB':>8} {'vs HF':>6}")
    for r in rows:
        if "error" in r:
            print(f"{r['preset']:8} {r['impl']:12} {r['blocks']:3d} {r['batch']:5d} failed: {r['error'][:80]}")
            continue
        vs = f"{r['vs_hf']:.2f}" if r["vs_hf"] else "-"
        print(f"{r['preset']:8} {r['impl']:12} {r['blocks']:3d} {r['batch']:5d} {r['step_ms']:9.1f} "
              f"{r['clips_per_s']:9.1f} {r['tflop_per_s']:8.3f} {r['mfu']:6.1%} {r['peak_gib']:8.2f} {vs:>6}")
    for p in per_block:
        print(f"{p['preset']:8} per-block K={p['blocks']}: block ms {', '.join(f'{t:.1f}' for t in p['block_ms'])}; "
              f"serial {p['serial_s'] * 1e3:.1f} ms, pipelined {p['period_s'] * 1e3:.1f} ms/step: "
              f"x{p['speedup']:.2f} on {p['blocks']} devices ({p['est_clips_per_s']:.1f} clips/s"
              + (f", x{p['speedup_vs_trainer']:.2f} over the Trainer's step)" if p["speedup_vs_trainer"] else ")"))


def sdpa_backends(names: list[str] | None):
    """A context in which scaled_dot_product_attention may use only these backends (None: any)."""
    if not names:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    table = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    return sdpa_kernel([table[n] for n in names], set_priority=True)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file of the results")
    p.add_argument("--presets", nargs="+", default=["vit_s", "vit_b"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--blocks", type=int, nargs="+", default=[2, 4, 6, 12], help="K of the blockwise rows")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--variant-blocks", type=int, nargs="+",
                   help="K at which every variant runs; at the others only the first (default: every K)")
    p.add_argument("--mask-ratio", type=float, help="default: the preset's")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="auto: bf16 autocast on a GPU, fp32 on the CPU (as the Trainer)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--steps", type=int, default=10, help="steps per timed repeat")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--per-block", type=int, nargs="*",
                   help="time each block's step and model the block-parallel speed-up, at these K (none given: every K)")
    p.add_argument("--link-gbs", type=float, default=25.0,
                   help="GB/s between pipeline ranks for the transfer term (25: PCIe 4 x16)")
    p.add_argument("--peak-n", type=int, help="matmul size for the peak (default 8192 on a GPU, 1024 on the CPU)")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers row")
    p.add_argument("--profile", nargs="*", default=[], metavar="IMPL",
                   help="print torch.profiler's top kernels for these rows (e.g. e2e bw_light hf_sdpa)")
    p.add_argument("--sdpa", nargs="+", choices=["flash", "cudnn", "efficient", "math"],
                   help="attention backends scaled_dot_product_attention may use, in order (default: torch's choice)")
    add_device_args(p)
    args = p.parse_args(argv)
    device = device_from_args(args)
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    dtype = torch.bfloat16 if bf16 else torch.float32
    peak_n = args.peak_n or (8192 if device.type == "cuda" else 1024)
    warm_s = 1.0 if device.type == "cuda" else 0.1
    peak = matmul_peak(device, dtype, peak_n, warm_s=warm_s)
    env = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
           "device": device_name(device), "threads": torch.get_num_threads(), "peak_dtype": str(dtype).split(".")[-1],
           "peak_flop_per_s_before": peak}
    try:
        import transformers
        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    rows, per_block = [], []
    partial = lambda new: save_json(args.out, {"partial": True, "env": env, "rows": rows + new})  # noqa: E731
    with sdpa_backends(args.sdpa):
        for preset in args.presets:
            r, b = bench_preset(preset, args, device, peak, partial)
            rows += r
            per_block += b
    # the peak again, on a warm GPU: MFU against the larger of the two
    env["peak_flop_per_s_after"] = matmul_peak(device, dtype, peak_n, warm_s=warm_s)
    env["peak_flop_per_s"] = peak = max(peak, env["peak_flop_per_s_after"])
    for r in rows:
        if "tflop_per_s" in r:
            r["mfu"] = mfu(r["tflop_per_s"] * 1e12, peak)
    print_table(rows, per_block, peak)
    result = {"env": env, "args": {k: v for k, v in vars(args).items()}, "rows": rows, "per_block": per_block}
    save_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
