# shellcheck shell=bash
# Sourced by the one-call GPU scripts (gpu_perf.sh, variant_table.sh): the carried wheels into
# /tmp/site, PYTHONPATH, the GPU's name under $OUT, and the phases those scripts share. Needs OUT set.

# device_setup: install whichever of the two wheel folders was carried (a glob that matches nothing would fail the
# whole install), put /tmp/site and the tree on PYTHONPATH, record the GPU in $OUT/gpu.txt
device_setup() {
  export PYTHONUNBUFFERED=1
  mkdir -p "$OUT"
  local wheels
  wheels=$(compgen -G ".device/whl/*.whl"; compgen -G ".device/fla/*.whl")
  if [[ -n $wheels ]]; then
    # shellcheck disable=SC2086
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $wheels 2>/dev/null ||
      echo "wheel install failed"
  fi
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
}

# bench_table BUDGET LINES: the table (checks first) at 32K, 8K and 2K, per call and queued, into $OUT/bench_results.json
# and $OUT/bench.log; prints its last LINES lines
bench_table() {
  timeout "$1" python -m linearize.kernels.bench --T 32768 8192 2048 --reps 30 --no-naive --queued \
    --out "$OUT/bench_results.json" 2>&1 | grep -v Warning | tee "$OUT/bench.log" | tail -"$2"
}

# gpu_tier BUDGET LINES [K]: the GPU test tier (-k K where given), over XDIST_N processes (default 12) where
# pytest-xdist is installed, into $OUT/gpu_tests.log; prints its last LINES lines. (timeout -k 10: xdist workers still
# compiling when the budget ends would otherwise live on and disturb later timings)
gpu_tier() {
  local xdist
  xdist=$(python -c "import xdist" 2>/dev/null && echo "-n ${XDIST_N:-12}")
  # shellcheck disable=SC2086
  timeout -k 10 "$1" python -m pytest tests/ops -q -m gpu -p no:cacheprovider $xdist ${3:+-k "$3"} 2>&1 |
    tee "$OUT/gpu_tests.log" | tail -"$2"
}
