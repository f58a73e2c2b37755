#!/usr/bin/env bash
# Nsight Compute on the forward's two kernels at the benchmark's shapes (the state pass and the output kernel of
# one forward with inputs that want gradients, after warm-up calls): speed of light, memory, warp stalls, occupancy,
# and the source counters' hottest SASS lines. Needs ncu and a GPU (the device tool); OUT set.
#
#   OUT=... T=32768 SET=full bash experiments/ncu_forward.sh
set -uo pipefail
T=${T:-32768}
SET=${SET:-full}
mkdir -p "$OUT"
cat > /tmp/ncu_forward.py <<PY
import torch
from linearize.kernels import bench
from linearize.kernels.hybrid_attention import chunk
q, k, v, qf, kf, gamma, _ = bench.make_inputs($T)
for x in (q, k, v, qf, kf, gamma):
    x.requires_grad_()
for _ in range(6):
    chunk.hybrid_attention_chunk(q, k, v, qf, kf, gamma, window=bench.WINDOW, softmax=True, linear="outside")
torch.cuda.synchronize()
PY
# launches 0-9 are the warm-up's; the 6th forward's state pass and output kernel are launches 10 and 11
timeout 400 ncu --clock-control none --kernel-name regex:'_chunk_state_kernel|_fwd_kernel' --launch-skip 10 \
  --launch-count 2 --set "$SET" --import-source no -o "$OUT/forward_$T" -f python3 /tmp/ncu_forward.py \
  > "$OUT/ncu_run.log" 2>&1
echo "ncu rc $?"
tail -5 "$OUT/ncu_run.log"
ncu -i "$OUT/forward_$T.ncu-rep" --print-details all > "$OUT/ncu_details.txt" 2>&1
ncu -i "$OUT/forward_$T.ncu-rep" --page source --print-source sass --csv > "$OUT/ncu_sass.csv" 2>&1
ls -la "$OUT"
grep -E "Duration|DRAM Throughput|Memory Throughput|L2 Cache Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Registers Per|Stall|One or More|No Eligible" "$OUT/ncu_details.txt" | head -60
