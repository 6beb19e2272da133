#!/usr/bin/env bash
# One device call (H100/H200, about 7 minutes), run as `bash scripts/gpu/train_toy_variants.sh`:
#  1. fine-tune two toy-model variants side by side with reference pairs (osa_lib.toy.reference)
#     while the CUDA tests run (correctness only);
#  2. the full-size SDXL bench alone on the GPU, with the appearance probe and the quality
#     evaluation of each variant on the CPU cores beside it.
# Results come back under $OUT (8 files at most: a report, one tar per model, one for the checks).
# The image has no diffusers: its wheel travels in wheels/ (git-ignored).
set -u
OUT="${OUT:-gpu_out}"; MINUTES="${MINUTES:-3.0}"; DEVICE="${DEVICE:-cuda}"; mkdir -p "$OUT" /tmp/checks
python3 -m pip install -q --no-index --no-deps --target /tmp/site wheels/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
common="--device $DEVICE --init-from data/toy_model --batch-size 256 --pair-rate 0.75 --lr 4e-4 --threads 2
        --workers 7 --max-minutes $MINUTES --save-every 1000 --log-every 250"
python3 -m osa_lib.toy.train $common --out /tmp/C2 --ckpt-dir /tmp/C2_ckpt --whole-share 0.5 > /tmp/C2.log 2>&1 &
python3 -m osa_lib.toy.train $common --out /tmp/C3 --ckpt-dir /tmp/C3_ckpt --whole-share 0.2 > /tmp/C3.log 2>&1 &
CHECKS="${CHECKS:-.}"  # the tree whose CUDA tests and bench run (a copy of another branch, carried)
( cd "$CHECKS" && PYTHONPATH="/tmp/site:$PWD" timeout 200 python3 -m pytest -q -rs -p no:cacheprovider \
    tests/test_cuda.py tests/test_device.py > /tmp/checks/cuda_tests.log 2>&1 )
wait
for m in C2 C3; do
  ( python3 -m osa_lib.toy.probes.appearance --model /tmp/$m --samples 48 > /tmp/$m.probe 2>&1
    python3 -m osa_lib.toy.probes.evaluate --model /tmp/$m --seeds 4 --json /tmp/$m/evaluate.json > /tmp/$m.eval 2>&1 ) &
done
( cd "$CHECKS" && PYTHONPATH="/tmp/site:$PWD" timeout 170 python3 scripts/bench_sdxl.py --device cuda --dtype fp16 \
    --size 1024 --steps 30 --scenes 4 --out /tmp/checks > /tmp/checks/bench_sdxl.log 2>&1 )
wait
nvidia-smi > /tmp/checks/nvidia-smi.txt 2>&1
for m in C2 C3; do
  { echo "== $m"; tr '\r' '\n' < /tmp/$m.log | grep "^step\|Error" | tail -4; cat /tmp/$m.probe /tmp/$m.eval | grep "^|\|Error\|(.* s)"; } >> "$OUT/report.txt"
  tar -C /tmp -cf "$OUT/$m.tar" $m
done
tar -C /tmp -cf "$OUT/checks.tar" checks
ls -la "$OUT"
