#!/usr/bin/env bash
# One device call (H100/H200, under 10 minutes), run as `bash scripts/gpu/continue_finetune.sh`:
#  1. issue 13: the committed fine-tune in progress (data/toy_finetune/, osa_lib.toy.delta) rebuilt on
#     data/toy_model and trained on with its own recipe at batch 256 for $MINUTES minutes, the
#     preservation teacher kept at data/toy_model; the new delta, its probe, drawing quality and
#     uncoloured-story tuning come back under $OUT (commit the delta if it is better);
#  2. issue 14, alone on the GPU afterwards: bench_sdxl.py, 3 paired rounds.
# Call it with timeout_s 590: about 15 s of set-up, $MINUTES (2.5) minutes of training plus 150 s for
# loading and, when the recipe trains on drawn references, drawing the pool ($POOL_N), 150 s of
# measurements, 150 s of bench. DRY=1 runs the same steps on the CPU, briefly, to check the script
# (its bench is cut by the 150 s limit there).
# The image has no diffusers: its wheel travels in wheels/ (git-ignored; `pip download --no-deps
# -d wheels/ diffusers==0.42.1`), passed with carry.
set -u
OUT="${OUT:-gpu_out}"; MINUTES="${MINUTES:-2.5}"; mkdir -p "$OUT"
DEVICE=cuda; BENCH="--device cuda --dtype fp16 --size 1024 --steps 30 --scenes 4 --repeats 3"; PY=python3
SEEDS=6; SAMPLES=48; BATCH=256; WORKERS=7; POOL_N=4000  # the pool: only drawn when the recipe asks for one
if [ "${DRY:-0}" = 1 ]; then
  DEVICE=cpu; BENCH="--quick"; PY="${PYTHON:-python3}"; export CUDA_VISIBLE_DEVICES=""
  SEEDS=1; SAMPLES=4; BATCH=16; WORKERS=1; POOL_N=32
else
  python3 -m pip install -q --no-index --no-deps --target /tmp/site wheels/*.whl || exit 1
fi
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
START=$SECONDS
stamp() { echo "[$((SECONDS - START)) s] $*" | tee -a "$OUT/report.txt"; }
# 1. continue the fine-tune (the same script as on the CPU, at a GPU's batch)
PY=$PY DEVICE=$DEVICE BATCH=$BATCH WORKERS=$WORKERS THREADS=1 WORK=/tmp/ft POOL_N=$POOL_N DELTA_OUT="$OUT/up_self_attention.safetensors" \
  timeout $(( ${MINUTES%.*} * 60 + 150 )) bash scripts/continue_finetune.sh "$MINUTES" > "$OUT/train.log" 2>&1
stamp "trained: exit $? ($(tr '\r' '\n' < "$OUT/train.log" | grep '^step\|^wrote' | tail -n 2 | tr '\n' ' '))"
# measured side by side on the GPU
timeout 90 $PY -m osa_lib.toy.probes.appearance --model /tmp/ft/tuned --samples $SAMPLES --quick > "$OUT/probe.txt" 2>&1 &
timeout 120 $PY -m osa_lib.toy.probes.evaluate --model /tmp/ft/tuned --seeds 4 > "$OUT/evaluate.txt" 2>&1 &
timeout 150 $PY scripts/tune_isolation.py --model /tmp/ft/tuned --seeds $SEEDS --weights 16,32 --threads 1 \
  > "$OUT/tune.txt" 2>&1 &
wait
cat "$OUT/probe.txt" "$OUT/evaluate.txt" "$OUT/tune.txt" | grep "^|\|Error\|Highest\|(.* s)" >> "$OUT/report.txt"
stamp "fine-tune measured"

# 2. issue 14, alone on the GPU
timeout 150 $PY scripts/bench_sdxl.py $BENCH --out "$OUT" > "$OUT/bench_sdxl.log" 2>&1
stamp "bench_sdxl: exit $?"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
ls -la "$OUT"
