"""The analytic FLOP count against a hand count and against torch's FLOP counter; the benchmark runs."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from bwssl_core import VideoMAE
from bwssl_core.flops import mfu, train_step_flops
from bwssl_core.masking import tube_mask

BENCH = Path(__file__).parents[1] / "benchmarks" / "bench_pretrain.py"


def test_hand_count_tiny(tiny):
    """tiny: 4 x 32 x 32 clips, tubes 2 x 8 x 8 x 3 = 384 pixels, grid 2 x 4 x 4 = 32 tokens, mask 0.75
    keeps 4 of 16 positions per slice: 8 visible, 24 hidden. Width 32 (MLP 128), decoder 16 (MLP 64)."""
    f = train_step_flops(tiny(partition=(1, 3)), batch=2)
    embed = 2 * 8 * 384 * 32  # the 8 visible tubes
    enc_layer = (2 * 8 * 32 * 96  # qkv on 8 visible tokens
                 + 2 * 2 * 8 * 8 * 32  # q k^T and a v
                 + 2 * 8 * 32 * 32  # proj
                 + 2 * 2 * 8 * 32 * 128)  # fc1 and fc2
    decoder = (2 * 8 * 32 * 16  # embed the visible features
               + 2 * 32 * 16 * 48 + 2 * 2 * 32 * 32 * 16 + 2 * 32 * 16 * 16 + 2 * 2 * 32 * 16 * 64  # 1 layer, 32 tokens
               + 2 * 24 * 16 * 384)  # head on the 24 hidden tokens
    assert (embed, enc_layer, decoder) == (196_608, 204_800, 565_248)
    block0 = 2 * (2 * embed + 3 * (enc_layer + decoder))  # batch 2; the video needs no gradient
    block1 = 2 * 3 * (3 * enc_layer + decoder)
    assert f["blocks"] == [block0, block1] == [5_406_720, 7_077_888]
    assert f["total"] == block0 + block1 and f["per_clip"] == (block0 + block1) / 2
    assert f["embed"] == 2 * 2 * embed and f["enc_attention"] == 2 * 3 * 4 * (2 * 2 * 8 * 8 * 32)
    parts = sum(v for k, v in f.items() if k not in ("blocks", "total", "per_clip"))
    assert parts == f["total"]
    assert mfu(f["total"] / 0.5, 1e9) == pytest.approx(f["total"] * 2 / 1e9)
    # decoder masking: each decoder reconstructs 12 of the 24 hidden tokens, so runs on 8 + 12
    half = (2 * 8 * 32 * 16 + 2 * 20 * 16 * 48 + 2 * 2 * 20 * 20 * 16 + 2 * 20 * 16 * 16 + 2 * 2 * 20 * 16 * 64
            + 2 * 12 * 16 * 384)
    assert half == 304_128
    g = train_step_flops(tiny(partition=(1, 3), dec_keep=0.5), batch=2)
    assert g["blocks"] == [2 * (2 * embed + 3 * (enc_layer + half)), 2 * 3 * (3 * enc_layer + half)]


@pytest.mark.parametrize("kw, memory", [(dict(), False), (dict(partition=(1, 3)), True),
                                        (dict(partition=(2, 2), dec_shared=True), False),
                                        (dict(partition=(1, 1, 2), mlp_ratio=2.0, mask_ratio=0.5), True),
                                        (dict(partition=(2, 2), dec_keep=0.4), True)])
def test_equals_torch_flop_counter(tiny, clips, kw, memory):
    """FlopCounterMode on a real forward and backward. It counts matmuls, convolutions and fused
    attention kernels, but not the CPU flash-attention kernel that scaled_dot_product_attention
    picks on the CPU; the math backend writes attention as two bmm, which it counts. Both then
    count the same operations, so they agree exactly (no tolerance needed)."""
    cfg = tiny(**kw)
    model = VideoMAE(cfg)
    video = clips(batch=2, cfg=cfg)
    mask = tube_mask(2, cfg.grid, cfg.mask_ratio, torch.Generator().manual_seed(0), dec_keep=cfg.dec_keep)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        losses = model(video, mask, backward=(lambda k, loss: loss.backward()) if memory else None)
        if not memory:
            torch.stack(losses).sum().backward()
    assert counter.get_total_flops() == train_step_flops(cfg, 2)["total"]


def test_benchmark_runs_on_cpu(tmp_path):
    """benchmarks/bench_pretrain.py at tiny size: every row there, positive and finite numbers."""
    pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location("bench_pretrain", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    result = bench.main(["--presets", "tiny", "--batch", "2", "--steps", "1", "--repeats", "1", "--warmup", "1",
                         "--blocks", "2", "--variants", "memory", "joint", "--per-block", "--peak-n", "256",
                         "--device", "cpu", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert [(r["impl"], r["blocks"]) for r in result["rows"]] == [("hf_sdpa", 1), ("e2e", 1), ("bw_memory", 2),
                                                                  ("bw_joint", 2), ("hf_sdpa_again", 1)]
    assert result["rows"][0]["attn_used"] == "sdpa"
    env = result["env"]  # the peak before and after the rows; MFU against the larger
    assert env["peak_flop_per_s"] == max(env["peak_flop_per_s_before"], env["peak_flop_per_s_after"]) > 0
    anchor = (result["rows"][0]["clips_per_s"] + result["rows"][-1]["clips_per_s"]) / 2
    assert result["rows"][1]["vs_hf"] == pytest.approx(result["rows"][1]["clips_per_s"] / anchor)
    for r in result["rows"]:
        for key in ("step_ms", "clips_per_s", "tflop_per_s", "mfu", "peak_gib", "vs_hf"):
            assert 0 < r[key] < float("inf"), (r["impl"], key)
    (est,) = result["per_block"]
    assert est["blocks"] == 2 and len(est["block_ms"]) == 2 and min(est["block_ms"]) > 0
    assert 0.9 < est["speedup"] <= 2 and est["est_clips_per_s"] > 0 and est["speedup_vs_trainer"] > 0


def test_a_failing_benchmark_row_is_recorded_and_the_others_run(tmp_path, monkeypatch, capsys):
    """A row that raises (a compile error, out of memory on a GPU) is kept with its error; the rows after
    it, the table and the JSON still come."""
    pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location("bench_pretrain", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    ours = bench.ours_step

    def flaky(mcfg, tcfg, video, folder):
        if len(mcfg.partition) == 2 and tcfg.per_block_backward:
            raise RuntimeError("inductor failed")
        return ours(mcfg, tcfg, video, folder)
    monkeypatch.setattr(bench, "ours_step", flaky)
    result = bench.main(["--presets", "tiny", "--batch", "2", "--steps", "1", "--repeats", "1", "--warmup", "1",
                         "--blocks", "2", "--variants", "memory", "joint", "--peak-n", "128", "--no-hf",
                         "--device", "cpu", "--out", str(tmp_path / "b.json")])
    rows = {r["impl"]: r for r in result["rows"]}
    assert rows["bw_memory"]["error"] == "RuntimeError: inductor failed" and "clips_per_s" not in rows["bw_memory"]
    assert rows["e2e"]["clips_per_s"] > 0 and rows["bw_joint"]["clips_per_s"] > 0
    assert "failed: RuntimeError: inductor failed" in capsys.readouterr().out


def test_gpu_check_script_runs_its_steps_in_smoke_mode(tmp_path):
    """benchmarks/gpu_check.sh, the device run, at its tiny size: each step's JSON and a zero exit
    status in the log; an unknown step is named."""
    import os
    import subprocess
    import sys

    script = Path(__file__).parents[1] / "benchmarks" / "gpu_check.sh"
    env = {**os.environ, "OUT": str(tmp_path / "out"), "SMOKE": "1", "STUDY": str(tmp_path / "study"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # python3: this interpreter
    subprocess.run(["bash", str(script), "pretrain", "ratio", "probe", "vit_s", "study", "nonsense"],
                   cwd=script.parents[1], env=env, check=True, capture_output=True, timeout=900)
    out = tmp_path / "out"
    log = (out / "gpu_check.log").read_text()
    assert all(f"== {step}: rc=0" in log for step in ("pretrain", "ratio", "probe", "vit_s", "study"))
    ratio = json.loads((out / "pretrain_ratio.json").read_text())["rows"]
    assert [r["impl"] for r in ratio] == ["hf_sdpa", "e2e", "hf_sdpa_again"] and ratio[1]["vs_hf"] > 0
    # at most 8 files come back from the device, 2 folders down: a study call's are the log and these
    files = [p for p in (out / "study").rglob("*") if p.is_file()]
    assert len(files) <= 7 and all(len(p.relative_to(out).parts) <= 3 for p in files), files
    assert {"report.html", "results.json", "probes.tgz", "study.tgz"} <= {p.name for p in files}
    assert "04_sweep" in "".join(json.loads((out / "study" / "results.json").read_text()))
    assert '"claim": "1. BWSSL gets close to E2E"' in log  # the claims, one line each, read off the results
    assert "unknown step nonsense" in log
    small = json.loads((out / "pretrain_vit_s.json").read_text())["rows"]
    assert {r["blocks"] for r in small} == {1, 2, 4}  # the tiny preset's 4 layers: no K = 6, 12
    assert {r["impl"] for r in small} >= {"hf_sdpa", "e2e", "bw_memory"}
    rows = json.loads((out / "pretrain.json").read_text())["rows"]
    assert {r["impl"] for r in rows} >= {"hf_sdpa", "e2e", "bw_memory", "bw_joint", "bw_shared"}
    assert json.loads((out / "probe.json").read_text())["total_s"] > 0
