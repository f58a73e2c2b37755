#!/usr/bin/env bash
# bash experiments/seg_table.sh     (on the GPU machine, one call; carry .device/whl and .device/fla)
#
# Settles the reverse scan's segment length and measures the table at it, in one call:
#   1. experiments/seg_tune.py       REV_SEG variants timed alone, interleaved, at 32K and 8K
#   2. experiments/pick_segments.py  the fastest at 32K that is no slower (within --slack) at 8K
#   3. sets chunk.REV_SEG to it in this (device) copy of the tree, when it differs
#   4. python -m linearize.kernels.bench --queued   the table (checks first), at the chosen length
#   5. pytest tests/ops -m gpu       the GPU test tier at the chosen length
# Each phase has its own time limit so that a late phase running out still leaves the earlier results under $OUT.
# Knobs: OUT, SEGS, BUDGET_SEG, BUDGET_BENCH, BUDGET_TESTS, XDIST_N.
set -uo pipefail
OUT=${OUT:-outputs/seg_table}
SEGS=${SEGS:-32 64 128}
BUDGET_SEG=${BUDGET_SEG:-170}
BUDGET_BENCH=${BUDGET_BENCH:-200}
BUDGET_TESTS=${BUDGET_TESTS:-150}
source experiments/device_env.sh
device_setup
chunk=kernels/hybrid_attention/chunk.py

echo "== 1. segment lengths alone"
# shellcheck disable=SC2086
timeout "$BUDGET_SEG" python experiments/seg_tune.py --T 32768 8192 --segs $SEGS --out "$OUT/seg.json" 2>&1 |
  grep -v Warning | tee "$OUT/seg.log" | tail -12

echo "== 2. pick"
was=$(sed -n 's/^REV_SEG = \([0-9]*\).*/\1/p' $chunk)
seg=$was
if [[ -s $OUT/seg.json ]]; then
  seg=$(python experiments/pick_segments.py "$OUT/seg.json" | tail -1)
fi
echo "REV_SEG: module $was, picked $seg" | tee "$OUT/pick.txt"
if [[ $seg =~ ^[0-9]+$ && $seg != "$was" ]]; then
  sed -i "s/^REV_SEG = $was/REV_SEG = $seg/" $chunk
  grep -n "^REV_SEG" $chunk
fi

echo "== 3. table at REV_SEG=$seg"
bench_table "$BUDGET_BENCH" 45

echo "== 4. GPU test tier at REV_SEG=$seg"
gpu_tier "$BUDGET_TESTS" 15
