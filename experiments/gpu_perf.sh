#!/usr/bin/env bash
# bash experiments/gpu_perf.sh      (on the GPU machine, one call; carry .device/whl and .device/fla)
#
# The performance measurements of the kernels and generation issues in one run, most important first, each phase
# with its own time limit so that a late phase running out of time still leaves the earlier results:
#   1. python -m linearize.kernels.bench            training op vs SDPA / flex SWA / fla chunk LA (checks first)
#   2. experiments/bench_decode.py                  decode step: fused hybrid vs softmax + KV cache
#   3. pytest tests/ops -m gpu                      the GPU test tier (Triton vs the naive reference)
#   4. python -m linearize.kernels.bench --tune     launch-setting variants of the training op (not by default)
# Logs and JSON go to $OUT (the device tool brings them back). Knobs: OUT, PHASES (default "bench decode tests"),
# T_BENCH, T_TUNE, DECODE_CONTEXTS, TESTS_K (a pytest -k filter for the GPU tier), XDIST_N (its processes, default 8),
# BUDGET_*. The GPU tier needs .device/whl carried (tests/conftest.py imports omegaconf); the bench needs .device/fla
# (the fla-core and flash-linear-attention 0.6.0 wheels) for its fla row. pytest-xdist is on the GPU image.
set -uo pipefail
OUT=${OUT:-outputs/gpu_perf}
T_BENCH=${T_BENCH:-2048 8192 32768}
DECODE_CONTEXTS=${DECODE_CONTEXTS:-1024 8192 32768}
BUDGET_BENCH=${BUDGET_BENCH:-170}
BUDGET_DECODE=${BUDGET_DECODE:-170}
BUDGET_TESTS=${BUDGET_TESTS:-150}
BUDGET_TUNE=${BUDGET_TUNE:-150}
PHASES=${PHASES:-bench decode tests}
T_TUNE=${T_TUNE:-32768}
TESTS_K=${TESTS_K:-}
XDIST_N=${XDIST_N:-8}
source experiments/device_env.sh
device_setup

has() { [[ " $PHASES " == *" $1 "* ]]; }

if has bench; then
  echo "== 1. kernels bench"
  # shellcheck disable=SC2086
  timeout "$BUDGET_BENCH" python -m linearize.kernels.bench --T $T_BENCH --profile --out "$OUT/bench.json" 2>&1 |
    tee "$OUT/bench.log" | grep -v Warning | tail -45
fi

if has decode; then
  echo "== 2. decode bench"
  # shellcheck disable=SC2086
  timeout "$BUDGET_DECODE" python experiments/bench_decode.py --models smollm2_135m mistral7b \
    --contexts $DECODE_CONTEXTS --batches 1 16 --budget-s $((BUDGET_DECODE - 25)) --out "$OUT/decode.json" 2>&1 |
    tee "$OUT/decode.log" | tail -40
fi

if has tests; then
  echo "== 3. GPU test tier"
  # compiling the kernels for every dtype x mode x head dim dominates: spread it over processes
  gpu_tier "$BUDGET_TESTS" 15 "$TESTS_K"
fi

if has tune; then
  echo "== 4. launch-setting variants"
  # shellcheck disable=SC2086
  timeout "$BUDGET_TUNE" python -m linearize.kernels.bench --T $T_TUNE --tune --profile --no-naive --reps 10 \
    --host-profile 2048 \
    --out "$OUT/bench_tune.json" 2>&1 | tee "$OUT/tune.log" | grep -v "^# tune" | grep -v Warning | tail -70
fi
