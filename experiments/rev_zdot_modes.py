"""REV_ZDOT on and off in each mode of the op at the benchmark's shapes (32 heads, 8 kv heads, d = F = 128, bf16):
forward+backward ms per call, interleaved over rounds (as ``bench --tune --rounds``), medians. The benchmark's tune
times the hybrid mode only; with the same chunk's linear block (overlap, linear-only) the kernel spills more with z by
dots (ptxas: 116 / 108 B a thread against 48 / 48), so those modes are timed here.

    python experiments/rev_zdot_modes.py [--T 32768] [--rounds 3] [--reps 21] [--modes hybrid overlap la_only]

Session 18 (H100): overlap 5.006 / 4.958 ms, linear-only 4.021 / 3.957, hybrid 4.145 / 4.055 with column sums / dots
(kernels/rev_zdot_modes_h100_session18.log). Needs a CUDA device (run it through the device tool).
"""

import argparse
import statistics

import torch

from linearize.kernels.bench import WINDOW, cuda_samples, make_inputs, with_settings
from linearize.kernels.hybrid_attention.chunk import hybrid_attention_chunk

MODES = {"hybrid": (True, "outside"), "overlap": (True, "all"), "la_only": (False, "all")}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=32768)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=21)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    args = ap.parse_args()
    q, k, v, qf, kf, gamma, do = make_inputs(args.T)
    leaves = [x.requires_grad_() for x in (q, k, v, qf, kf, gamma)]
    print(f"# {torch.cuda.get_device_name()}, T={args.T}, {args.rounds} rounds of {args.reps // args.rounds} calls")
    print("| mode | z by column sums, fwd+bwd ms | z by dots, fwd+bwd ms | dots / sums |\n|---|---|---|---|")
    for mode in args.modes:
        softmax, linear = MODES[mode]

        def step(softmax=softmax, linear=linear):
            out = hybrid_attention_chunk(q, k, v, qf, kf, gamma, window=WINDOW, softmax=softmax, linear=linear)
            torch.autograd.grad(out, leaves, do, allow_unused=True)

        times = {False: [], True: []}
        for r in range(args.rounds + 1):  # round 0: compile and warm up, not kept
            for zdot in (False, True) if r % 2 == 0 else (True, False):
                warm = {} if r == 0 else dict(warmup=1, warmup_ms=0.0)
                t, _ = with_settings({"REV_ZDOT": zdot}, lambda warm=warm: cuda_samples(step, args.reps // args.rounds,
                                                                                           **warm))
                if r:
                    times[zdot] += t
        off, on = statistics.median(times[False]), statistics.median(times[True])
        print(f"| {mode} | {off:.3f} | {on:.3f} | {on / off:.3f} |", flush=True)


if __name__ == "__main__":
    main()
