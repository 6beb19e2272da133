#!/usr/bin/env bash
# On a machine with a CUDA GPU (torch's CUDA build installed, see the README): the CUDA tests, then
# scripts/bench_sdxl.py at full size (SDXL's architecture with random weights, no download).
#
#   bash scripts/gpu_check.sh                      # results under $OUT (default ./gpu_out)
#   GPU_CHECK_QUICK=1 bash scripts/gpu_check.sh    # the same steps on the CPU, with a --quick bench
#   GPU_CHECK_PROFILE=1 / GPU_CHECK_OVERHEAD=1     # also torch.profiler tables / the attribution
#                                                  # of isolated's time (scripts/research/isolated_overhead.py)
#
# Everything (each step's log, summary.txt, the bench's .md/.json) goes to "$OUT". A failing step is
# logged and the next one still runs; the exit status is 1 if any step failed. On an H200: tests
# ~40 s, bench ~3 min (1024², fp16, 30 steps, 4 scenes x 3 methods, --repeats 3 because a shared
# host drifts between runs more than the gap being measured); each step has a timeout.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"
PY="${PYTHON:-.venv/bin/python}"
QUICK="${GPU_CHECK_QUICK:-0}"
FAILED=0
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

step() {  # step NAME TIMEOUT_S COMMAND...: log to $OUT/NAME.log, never stop the script
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  echo "== $name: $*" | tee -a "$SUMMARY"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  [ $rc -eq 124 ] && echo "   (timed out after $limit s)" | tee -a "$SUMMARY"
  echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$SUMMARY"
  [ $rc -ne 0 ] && FAILED=1
  tail -n 25 "$OUT/$name.log"
  return 0
}

step environment 60 "$PY" -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__); print('cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
command -v nvidia-smi > /dev/null && nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1

step cuda_tests 150 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py tests/test_device.py

if [ "$QUICK" = "1" ]; then
  step bench_sdxl 480 "$PY" scripts/bench_sdxl.py --quick --out "$OUT"
else
  step bench_sdxl 300 "$PY" scripts/bench_sdxl.py --device cuda --dtype fp16 --size 1024 --steps 30 --scenes 4 --repeats 3 \
    ${GPU_CHECK_PROFILE:+--profile} --out "$OUT"
  [ -n "${GPU_CHECK_OVERHEAD:-}" ] && step isolated_overhead 120 "$PY" scripts/research/isolated_overhead.py --out "$OUT"
fi

echo "== done: $([ $FAILED -eq 0 ] && echo 'all steps passed' || echo 'some step FAILED, see the logs') (results in $OUT)" | tee -a "$SUMMARY"
exit $FAILED
