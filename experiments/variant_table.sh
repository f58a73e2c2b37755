#!/usr/bin/env bash
# VARIANTS='default "name" ...' bash experiments/variant_table.sh   (on the GPU machine, one call; carry .device/whl
# and .device/fla)
#
# The reverse scan's segment length, say, is VARIANTS='default "linear backward in the reverse scan, segments of 32"
# "linear backward in the reverse scan, segments of 128"' (session 20's seg_table.sh, folded in here in session 21).
#
# Tries TUNE variants, keeps the best and measures the table at it, in one call:
#   1. python -m linearize.kernels.bench --tune --tune-only   the variants, interleaved, at TUNE_TS (no peers)
#   2. experiments/pick_variant.py --apply                    the fastest at the longest T, no slower at the others,
#                                                             written into this (device) copy of chunk.py as defaults
#   3. python -m linearize.kernels.bench --queued            the table (checks first) at the pick
#   4. pytest tests/ops -m gpu                               the GPU test tier at the pick
# Each phase has its own time limit, so that a late phase running out still leaves the earlier results under $OUT.
# Knobs: OUT, VARIANTS (bench TUNE names, shell-quoted; the first is the baseline), TUNE_TS (the lengths of step 1;
# "32768" alone for a variant that changes nothing below 32K, REV_SEG_LONG say, so that 8K's noise cannot veto it
# through SLACK), ROUNDS, REPS, SLACK,
# BUDGET_TUNE, BUDGET_BENCH, BUDGET_TESTS, XDIST_N, BASE_TESTS_K (when the baseline is kept: no table, only the GPU
# tests this -k filter selects).
set -uo pipefail
OUT=${OUT:-outputs/variant_table}
VARIANTS=${VARIANTS:-default}
TUNE_TS=${TUNE_TS:-32768 8192}
ROUNDS=${ROUNDS:-3}
REPS=${REPS:-21}
SLACK=${SLACK:-0.01}
BUDGET_TUNE=${BUDGET_TUNE:-200}
BUDGET_BENCH=${BUDGET_BENCH:-200}
BUDGET_TESTS=${BUDGET_TESTS:-150}
source experiments/device_env.sh
device_setup
eval "variants=($VARIANTS)"
base=${variants[0]}

echo "== 1. variants at T = $TUNE_TS"
# shellcheck disable=SC2086
timeout "$BUDGET_TUNE" python -m linearize.kernels.bench --T $TUNE_TS --tune --tune-only --rounds "$ROUNDS" \
  --reps "$REPS" --no-naive --variants "${variants[@]}" --out "$OUT/tune.json" 2>&1 | grep -v Warning |
  tee "$OUT/tune.log" | grep -v "^# tune" | tail -16

echo "== 2. pick"
pick=$base
if [[ -s $OUT/tune.json ]]; then
  python experiments/pick_variant.py "$OUT/tune.json" --base "$base" --slack "$SLACK" --apply | tee "$OUT/pick.txt"
  pick=$(tail -1 "$OUT/pick.txt")
fi
echo "picked: $pick"

if [[ $pick == "$base" && -n ${BASE_TESTS_K:-} ]]; then  # the baseline's table is known: only these GPU tests
  echo "== 3. (the baseline kept: no table) GPU tests -k $BASE_TESTS_K"
  gpu_tier "$BUDGET_TESTS" 8 "$BASE_TESTS_K"
  exit 0
fi

echo "== 3. table at: $pick"
bench_table "$BUDGET_BENCH" 24

echo "== 4. GPU test tier at: $pick"
gpu_tier "$BUDGET_TESTS" 8
grep -n "^DELTA_TOTALS\|\"delta_totals\":" kernels/hybrid_attention/chunk.py | tee "$OUT/settings.txt"
