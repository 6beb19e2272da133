#!/usr/bin/env bash
# Continue the fine-tune of the toy model's up-block self-attention (data/toy_finetune) from its
# committed state:
#   bash scripts/research/continue_finetune.sh 100                             # minutes; CPU by default
#   DEVICE=cuda BATCH=256 WORKERS=7 bash scripts/research/continue_finetune.sh 3   # on a GPU
# It rebuilds the fine-tune from data/toy_finetune/up_self_attention.safetensors on data/toy_model
# (osa_lib.toy.delta), trains it on with data/toy_finetune/recipe.txt, the preservation term still
# holding rows without a reference at data/toy_model, and writes the new delta to $DELTA_OUT (by
# default over the committed one: compare before committing; data/toy_finetune/README.md says how).
# The run's folders are in $WORK (git-ignored runs/ by default); a run cut short still exports its
# last checkpoint, so the save step can be run again by hand.
# A recipe with --drawn-share trains on the model's own drawings (osa_lib.toy.drawn_pool): the pool is
# drawn by the rebuilt model first, unless $POOL exists (about 25 minutes for 3,000 on a 2-core CPU).
# Environment: DEVICE (cpu), BATCH (64), WORKERS (1), THREADS (2), WORK (runs/finetune), DELTA_OUT,
# POOL ($WORK/drawn_pool.npz), POOL_N (3000), PY (.venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/../.."
MINUTES="${1:?give the minutes to train, e.g. 100}"
PY="${PY:-.venv/bin/python}"; DEVICE="${DEVICE:-cpu}"; BATCH="${BATCH:-64}"; WORKERS="${WORKERS:-1}"
THREADS="${THREADS:-2}"; WORK="${WORK:-runs/finetune}"
DELTA=data/toy_finetune/up_self_attention.safetensors; DELTA_OUT="${DELTA_OUT:-$DELTA}"
rm -rf "$WORK/start" "$WORK/tuned" "$WORK/tuned_ckpt"
mkdir -p "$WORK"
"$PY" -m osa_lib.toy.delta apply "$DELTA" --base data/toy_model --out "$WORK/start"
POOL="${POOL:-$WORK/drawn_pool.npz}"; POOL_FLAGS=()
if grep -q -- "--drawn-share" data/toy_finetune/recipe.txt; then
  [ -f "$POOL" ] || "$PY" -m osa_lib.toy.drawn_pool --model "$WORK/start" --n "${POOL_N:-3000}" --device "$DEVICE" --out "$POOL"
  POOL_FLAGS=(--drawn-pool "$POOL")
fi
# shellcheck disable=SC2046  # the recipe is a list of flags
"$PY" -m osa_lib.toy.train --device "$DEVICE" --init-from "$WORK/start" --preserve-from data/toy_model \
  $(cat data/toy_finetune/recipe.txt) "${POOL_FLAGS[@]}" --batch-size "$BATCH" --workers "$WORKERS" --threads "$THREADS" \
  --max-minutes "$MINUTES" --save-every 200 --out "$WORK/tuned" --ckpt-dir "$WORK/tuned_ckpt"
"$PY" -m osa_lib.toy.delta save "$WORK/tuned" --base data/toy_model --out "$DELTA_OUT" \
  --note "continued for $MINUTES min on $DEVICE at batch $BATCH with $(cat data/toy_finetune/recipe.txt)"
