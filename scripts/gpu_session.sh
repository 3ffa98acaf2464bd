#!/usr/bin/env bash
# One prepared GPU session (see docs/performance.md and docs/model-card.md):
#   1. a forward profile at 256², then inference at 256/1024 (batch 1, 8), fp32/bf16, dense/sparse dispatch, eager
#      and CUDA-graph replay, then bf16 training at batch 16;
#   2. bf16-vs-fp32 loss-curve check;
#   3. MoCE-IR-S all-in-one training for TRAIN_SECONDS (denoise 15/25/50, derain, synthetic dehaze),
#      continuing from FINE_TUNE_FROM when given.
# Results go to $OUT (at most 8 files there). Runs with PYTHONPATH=src: no install needed on the GPU machine.
# Prepare on the CPU first: `python scripts/pack_gpu_data.py` writes the training images to .gpu/data (35 MiB),
# then run this script on the device with carry [".gpu"]; to continue the shipped model, set
# FINE_TUNE_FROM=src/moceir/weights/default.safetensors.
set -u
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/out}; DATA=${DATA:-$PWD/.gpu/data}; TRAIN_SECONDS=${TRAIN_SECONDS:-290}
BENCH=${BENCH:-1}; RUN=/tmp/moceir_run; FINE_TUNE_FROM=${FINE_TUNE_FROM:-}
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c "import torch,lightning;print(torch.__version__, lightning.__version__)"; } > "$OUT/env.txt" 2>&1
if [ "$BENCH" = 1 ]; then
  # Cheapest and most telling first: is batch-1 inference bound by launches (profile), does dense or sparse
  # dispatch win, do CUDA graphs help. cuDNN autotuning is off: it cost minutes per shape on a fresh machine.
  (cd benchmarks && timeout 40 python3 profile_forward.py --device cuda --size 256 --dispatch dense --out "$OUT/profile_256_dense.md") > "$OUT/bench.log" 2>&1
  (cd benchmarks && timeout 80 python3 bench.py --device cuda --cudnn_benchmark off --sizes 256 1024 --batches 1 8 \
      --max_pixels 2.2e6 --precisions fp32 bf16 --dispatches dense sparse --modes eager graphs --skip_train \
      --repeats 5 --out /tmp/bench_eager.json) >> "$OUT/bench.log" 2>&1
  (cd benchmarks && timeout 60 python3 bench.py --device cuda --cudnn_benchmark off --sizes 256 --batches 1 \
      --precisions bf16 --dispatches dense --train_batches 16 --train_warmup 2 --train_repeats 5 --repeats 3 \
      --out /tmp/bench_train.json) >> "$OUT/bench.log" 2>&1
  (cd benchmarks && timeout 30 python3 precision_check.py --device cuda --steps 50 --out /tmp/precision.json) >> "$OUT/bench.log" 2>&1
  python3 - "$OUT/bench.json" <<'PY'
import json, sys, os
merged = {n: json.load(open(f"/tmp/{n}.json")) for n in ("bench_eager", "bench_train", "precision") if os.path.exists(f"/tmp/{n}.json")}
json.dump(merged, open(sys.argv[1], "w"), indent=1)
PY
fi
# Steps for TRAIN_SECONDS at the measured bf16 batch-16 rate (eager, channels_last), 85% for data loading and logging.
STEPS=$(python3 - <<'PY'
import json, os
rate = 60.0  # patches/s if the benchmark did not run
try:
    rows = json.load(open("/tmp/bench_train.json"))["rows"]
    rate = next(r["patches_per_s"] for r in rows if r["task"] == "train" and r["batch"] == 16 and r["precision"] == "bf16")
except Exception:
    pass
print(max(200, int(0.85 * rate / 16 * float(os.environ.get("TRAIN_SECONDS", "290")))))
PY
)
echo "training steps: $STEPS" > "$OUT/train.log"
FT=(); [ -n "$FINE_TUNE_FROM" ] && FT=(--fine_tune_from "$FINE_TUNE_FROM")
timeout $((TRAIN_SECONDS + 90)) python3 -m moceir train --model MoCE_IR_S \
  --de_type denoise_15 denoise_25 denoise_50 derain dehaze --dehaze_source synthetic --holdout_val \
  --repeat derain=12 --repeat dehaze=5 --loss_type FFT --fft_loss_weight 0.1 --balance_loss_weight 0.01 \
  --batch_size 16 --patch_size 128 --precision bf16-mixed --num_workers 14 --lr 2e-4 \
  --warmup_epochs 3 --schedule_epochs 100 --epochs 1000 --max_steps "$STEPS" \
  --max_time "$(printf '00:00:%02d:%02d' $(((TRAIN_SECONDS + 20) / 60)) $(((TRAIN_SECONDS + 20) % 60)))" --save_every_n_epochs 1000 --log_every_n_steps 10 \
  --data_file_dir "$DATA" --ckpt_dir /tmp --run_name moceir_run "${FT[@]}" >> "$OUT/train.log" 2>&1
echo "train exit: $?" >> "$OUT/train.log"
python3 - "$RUN" "$OUT" <<'PY'
import sys, torch, shutil
from pathlib import Path
import moceir
run, out = Path(sys.argv[1]), Path(sys.argv[2])
model = moceir.load_model(run / "model.safetensors")
path = moceir.save_model(model, out / "model_fp16.safetensors", dtype=torch.float16, overwrite=True)
blob = path.read_bytes(); path.unlink()
half = len(blob) // 2 + 1
(out / "model_fp16.part0").write_bytes(blob[:half]); (out / "model_fp16.part1").write_bytes(blob[half:])
shutil.copy(run / "logs" / "metrics.csv", out / "metrics.csv")
shutil.copy(run / "settings.json", out / "settings.json")
PY
ls -la "$OUT"
