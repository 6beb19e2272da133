#!/usr/bin/env bash
# One device call (H100/H200, under 10 minutes), run as `bash scripts/gpu/speed_and_finetunes.sh`:
#  1. two fine-tunes of the toy model side by side (issue 13): E's recipe of
#     results/toy_attn_only_finetune.md at batch 256 (G1), and with a larger pair share held by a
#     stronger preservation term (G3); the CUDA tests beside them (correctness only);
#  2. each fine-tune's appearance probe, drawing quality and uncoloured-story tuning on the GPU;
#  3. alone on the GPU: bench_sdxl.py (full-size random SDXL, 1024², fp16, 30 steps, with a profile)
#     and the attribution of isolated attention's time (issue 14).
# DRY=1 runs the same steps on the CPU, briefly (--device cpu, --quick bench), to check the script.
# Every step has a time limit and logs to $OUT; a failing step does not stop the next.
# The image has no diffusers: its wheel travels in wheels/ (git-ignored; `pip download --no-deps
# -d wheels/ diffusers==0.42.1`).
set -u
OUT="${OUT:-gpu_out}"; MINUTES="${MINUTES:-2.5}"; LIMIT="${LIMIT:-560}"; mkdir -p "$OUT"
DEVICE=cuda; BENCH="--device cuda --dtype fp16 --size 1024 --steps 30 --scenes 4 --profile"; PY=python3
if [ "${DRY:-0}" = 1 ]; then
  DEVICE=cpu; BENCH="--quick"; PY="${PYTHON:-python3}"; export CUDA_VISIBLE_DEVICES=""
else
  python3 -m pip install -q --no-index --no-deps --target /tmp/site wheels/*.whl || exit 1
fi
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
START=$SECONDS
stamp() { echo "[$((SECONDS - START)) s] $*" | tee -a "$OUT/report.txt"; }

# 1. fine-tunes (E = A's flags with --preserve 1, here at batch 256) and the CUDA tests
E="--device $DEVICE --init-from data/toy_model --batch-size 256 --pair-min-t 700 --threads 1 --workers 7
   --max-minutes $MINUTES --save-every 100000 --log-every 100 --whole-share 0.2"
declare -A RECIPE=(
  [G1]="$E --pair-rate 0.75 --lr 2e-3 --train-only up-self-attention --preserve 1.0"
  [G3]="$E --pair-rate 0.9 --lr 2e-3 --train-only up-self-attention --preserve 2.0"
)
for m in G1 G3; do
  $PY -m osa_lib.toy.train ${RECIPE[$m]} --out /tmp/$m --ckpt-dir /tmp/${m}_ckpt > /tmp/$m.log 2>&1 &
done
stamp "fine-tunes started: G1=${RECIPE[G1]} | G3=${RECIPE[G3]}"
timeout 150 $PY -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py tests/test_device.py \
  > "$OUT/cuda_tests.log" 2>&1
stamp "CUDA tests: exit $? ($(tail -n 1 "$OUT/cuda_tests.log"))"
wait
stamp "fine-tunes done"

# 2. each fine-tune measured on the GPU, all six measurements side by side
for m in G1 G3; do
  timeout 60 $PY -m osa_lib.toy.probes.appearance --model /tmp/$m --samples 48 --quick > /tmp/$m.probe 2>&1 &
  timeout 100 $PY -m osa_lib.toy.probes.evaluate --model /tmp/$m --seeds 4 > /tmp/$m.eval 2>&1 &
  timeout 120 $PY scripts/tune_isolation.py --model /tmp/$m --seeds 6 --weights 16,32 --threads 1 \
    > /tmp/$m.tune 2>&1 &
done
wait
for m in G1 G3; do
  { echo "== $m"; tr '\r' '\n' < /tmp/$m.log | grep "^step\|Error\|steps in" | tail -3
    cat /tmp/$m.probe /tmp/$m.eval /tmp/$m.tune | grep "^|\|Error\|Highest\|(.* s)"; } >> "$OUT/report.txt"
  rm -rf /tmp/${m}_ckpt; tar -C /tmp -cf "$OUT/$m.tar" $m $m.log $m.probe $m.eval $m.tune
done
stamp "fine-tunes measured"

# 3. issue 14, alone on the GPU
timeout 180 $PY scripts/bench_sdxl.py $BENCH --out "$OUT" > "$OUT/bench_sdxl.log" 2>&1
stamp "bench_sdxl: exit $?"
LEFT=$((LIMIT - (SECONDS - START) - 15))
[ $LEFT -gt 30 ] && [ $DEVICE = cuda ] && timeout $LEFT $PY scripts/gpu/isolated_overhead.py --out "$OUT" > "$OUT/isolated_overhead.log" 2>&1
stamp "isolated_overhead: exit $?"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
ls -la "$OUT"
