#!/usr/bin/env bash
# Everything the GPU path needs measured, as one script for a short GPU session (one H100/H200
# with MLX's CUDA backend, the nearest GPU backend to Metal we can reach). From the project root:
#
#   bash ../shared/gpu/pack.sh                      # here: packs MLX CUDA + diffusers into .gpu/
#   bash .gpu/run.sh bash bench/gpu_check.sh        # there, with carry [".gpu"]
#
# Logs go to $OUT (or ./gpu-out) as each part finishes, so a run cut short still returns what it
# did. Parts: the suite on the GPU, a full-size random 8-bit model drawing the DVD cover in bf16
# (not black? stage peaks?), what the activations add per size, and the step time against torch.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
MODEL=${MODEL:-/tmp/flux-random-q8}
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/device.txt" 2>&1

echo "== the suite on the GPU"
MLXFLUX_TEST_DEVICE=gpu timeout 240 python3 -m pytest -q -p no:cacheprovider -n 4 -rf \
  > "$OUT/tests.log" 2>&1
tail -n 40 "$OUT/tests.log"

echo "== a full-size random model, the DVD cover in bf16"
[ -d "$MODEL" ] || python3 bench/make_random_model.py --out "$MODEL" --bits 8 > "$OUT/gen.log" 2>&1
timeout 300 python3 -m mlxflux.cli gen --preset dvd --steps 4 --seed 1 --model "$MODEL" \
  --report "$OUT/dvd-report.json" --output "$OUT/dvd.png" >> "$OUT/gen.log" 2>&1
echo "exit $?" >> "$OUT/gen.log"
python3 - "$OUT/dvd.png" >> "$OUT/gen.log" 2>&1 <<'PY'
import sys
import numpy as np
from PIL import Image
a = np.asarray(Image.open(sys.argv[1]))
print(f"dvd.png: mean {a.mean():.1f}, std {a.std():.1f}, black pixels {np.mean(a.max(-1) == 0):.1%}")
PY
tail -n 12 "$OUT/gen.log"

echo "== the DVD cover streamed at a 4 GiB budget (peaks per stage, bytes read, read waits)"
timeout 300 python3 -m mlxflux.cli gen --preset dvd --steps 2 --seed 1 --model "$MODEL" \
  --memory-budget 4 --report "$OUT/dvd-streamed.json" --output "$OUT/dvd-streamed.png" \
  > "$OUT/streamed.log" 2>&1
tail -n 8 "$OUT/streamed.log"

echo "== what the denoise activations add, bf16, fused kernels"
timeout 120 python3 bench/denoise_memory.py --precision bfloat16 --sizes 256,dvd \
  --out "$OUT/denoise_memory" > /dev/null 2>&1
cat "$OUT/denoise_memory.md"

echo "== seconds per step against torch bf16: bfloat16 and float16 (its guards included)"
timeout 240 python3 bench/speed.py --depth 4 --single 8 --precisions bfloat16,float16 \
  --bits none,8 --sizes vinyl,dvd --torch-device cuda --torch-dtype bfloat16 --iters 5 \
  --warmup 2 --out "$OUT/speed" > /dev/null 2>&1
cat "$OUT/speed.md"

echo "== where a step's time goes, bf16 against torch bf16"
timeout 120 python3 bench/speed.py --depth 4 --single 8 --precisions bfloat16 --bits none \
  --sizes dvd --torch-device cuda --torch-dtype bfloat16 --breakdown --out "$OUT/speed" \
  > /dev/null 2>&1
cat "$OUT/speed_breakdown.md"
rm -f "$OUT/speed.json"
