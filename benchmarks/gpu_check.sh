#!/usr/bin/env bash
# The GPU checks of issues 4 and 6 in one run, each step under its own time limit so that one that
# fails or overruns leaves the others' results. JSON and one log go to $OUT (the device tool's result
# folder) or runs/gpu-check. SMOKE=1 runs every step at a tiny size (to try the script on a CPU; the
# vit_s step then without torch.compile).
#
#   bash benchmarks/gpu_check.sh [STEP ...]
# steps: pretrain (eager, every K and variant), compiled, ratio (compiled E2E against HF, ViT-B), probe,
# loader, loader160, lean (compiled E2E against the blockwise variants, HF beside), vit_s (compiled, every
# K), profile (flash attention), cudnn (the same step with cuDNN attention first), study (the GPU study
# of issue 5; STUDY names its folder, default runs/study-device). The default is what benchmarks/NOTES.md
# still lists first, in one device call (limits 120 + 130 + 230 + 80 s, under the tool's 600): ratio probe lean
# profile, the least needed last. Wheels the device lacks: benchmarks/device_wheels.sh (loader:
# decord and PyAV; study: papermill and the rest). At most 8 files come back from the device ($OUT):
# the study's are packed into two archives.
set -u
OUT=${OUT:-runs/gpu-check}
STUDY=${STUDY:-runs/study-device}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
LOG=$OUT/gpu_check.log
if [ "${SMOKE:-0}" = 1 ]; then
  P=tiny; S=tiny; COMPILE=""; B=4; STEPS="--steps 1 --warmup 0 --repeats 1 --peak-n 256"; CLIPS=200; VIDEOS=12; SIZE=32; W="0 2"
else
  P=vit_b; S=vit_s; COMPILE=--compile; B=64; STEPS="--steps 10 --warmup 3 --repeats 3"; CLIPS=10000; VIDEOS=192; SIZE=224; W="8 16"
fi

run() {  # run NAME LIMIT_S COMMAND...: one step, its output appended to the log
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit} s) $(date +%T)" | tee -a "$LOG"
  local tic=$SECONDS
  timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1
  echo "== $name: rc=$? in $((SECONDS - tic)) s" | tee -a "$LOG"
}

steps=${*:-ratio probe lean profile}
{ date -Is; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
  python3 -c "import transformers; print('transformers', transformers.__version__)" 2>&1 | tail -1; } | tee -a "$LOG"
for step in $steps; do
  case $step in
    pretrain)  # eager: HF sdpa, E2E, K=4 every variant, K=2, 6, 12 with per-block backward
      run pretrain 170 python3 benchmarks/bench_pretrain.py --presets $P --batch $B $STEPS --blocks 2 4 6 12 \
        --variant-blocks 4 --per-block 4 --out "$OUT/pretrain.json" ;;
    compiled)  # torch.compile: E2E and K=4 with 1-layer decoders
      run compiled 150 python3 benchmarks/bench_pretrain.py --presets $P --batch $B $STEPS --blocks 4 \
        --variants light --compile --no-hf --out "$OUT/pretrain_compiled.json" ;;
    ratio)  # the first target: compiled E2E against HF sdpa in one process, ViT-B, batch 64
      run ratio 120 python3 benchmarks/bench_pretrain.py --presets $P --batch $B $STEPS --blocks 1 $COMPILE \
        --out "$OUT/pretrain_ratio.json" ;;
    probe)  # features plus probes, all layers, over 10,000 clips
      run probe 130 python3 benchmarks/bench_probe.py --preset $P --clips $CLIPS --out "$OUT/probe.json" ;;
    loader)  # decord, cache + CPU transform, cache -> GPU (+ gpu_augment) at the training batch
      run loader 60 python3 benchmarks/bench_loader.py --videos $VIDEOS --size $SIZE --batch-size $B \
        --workers $W --epochs 6 --out "$OUT/loader.json" ;;
    loader160)  # the same with frames stored at 160 x 160 (half the bytes), gpu_augment back up to 224
      run loader160 45 python3 benchmarks/bench_loader.py --videos $VIDEOS --size $SIZE --decode-size $((SIZE * 5 / 7)) \
        --batch-size $B --workers 16 --epochs 6 --out "$OUT/loader160.json" ;;
    lean)  # compiled, HF anchor beside: E2E, K=4 with 4-layer decoders, 1-layer ones, 1-layer on half the hidden tubes
      run lean 230 python3 benchmarks/bench_pretrain.py --presets $P --batch $B $STEPS --blocks 4 \
        --variants memory light lean --compile --out "$OUT/pretrain_lean.json" ;;
    vit_s)  # ViT-S, compiled, HF beside: E2E and K = 2, 4, 6, 12 with 4-layer decoders, per-block backward
      run vit_s 240 python3 benchmarks/bench_pretrain.py --presets $S --batch $B $STEPS --blocks 2 4 6 12 \
        --variants memory $COMPILE --out "$OUT/pretrain_vit_s.json" ;;
    profile)  # where a compiled E2E step spends its time (kernels by their own time), flash attention asked
      run profile 80 python3 benchmarks/bench_pretrain.py --presets $P --batch $B $STEPS --blocks 1 --compile \
        --no-hf --profile e2e --out "$OUT/profile_flash.json" --sdpa flash ;;
    cudnn)  # the same step with cuDNN attention first (under compile torch took cuDNN's even when flash was asked)
      run cudnn 50 python3 benchmarks/bench_pretrain.py --presets $P --batch $B $STEPS --blocks 1 --compile \
        --no-hf --profile e2e --out "$OUT/profile_cudnn.json" --sdpa cudnn flash ;;
    study)  # the GPU study (issue 5): clips kept as tensors, so no video codec is needed there
      # the smoke scale as tensors too: the device has no PyAV to write mp4
      if [ "${SMOKE:-0}" = 1 ]; then scale=(smoke -p data_format tensor -p data "$STUDY-data"); else scale=(gpu); fi
      # --resume when a study is there: a second call on the still-warm machine (runs/ is kept there between
      # calls) continues one the first call's limit stopped: finished notebooks are kept, training resumes
      # from its checkpoint and probing from the feature cache
      resume=(); [ -f "$STUDY/study.json" ] && resume=(--resume)
      run study 540 python3 -m bwssl_core study --scale "${scale[@]}" --out "$STUDY" ${resume[@]+"${resume[@]}"}
      mkdir -p "$OUT/study"
      cp "$STUDY/report.html" "$STUDY/FAILED.json" "$OUT/study/" 2>/dev/null
      python3 -c "import json, glob; json.dump({p: json.load(open(p)) for p in sorted(glob.glob('$STUDY/results/*.json'))}, open('$OUT/study/results.json', 'w'))"
      # finished probe results, small, kept even if notebook 02 was stopped; then everything else but
      # checkpoints and cached features (the executed notebooks carry their cells' durations; each run
      # its metrics.jsonl and config.json)
      tar czf "$OUT/study/probes.tgz" "$STUDY"/features/probe-* 2>/dev/null
      tar czf "$OUT/study/study.tgz" --exclude='*.pt' --exclude='features' "$STUDY"
      # the paper's claims as the report reads them, into the log and the output's tail
      python3 -m bwssl_core report --study "$STUDY" 2>&1 | grep -E '"(claim|run|what the numbers say)"' \
        | paste - - - | tee -a "$LOG" ;;
    *) echo "unknown step $step" | tee -a "$LOG" ;;
  esac
done
echo "== summary" | tee -a "$LOG"
grep -h -E "^(preset|vit_|tiny|measured|all poolings|path|VideoClips|CachedClips|CacheBatches|cache build)" "$LOG"
