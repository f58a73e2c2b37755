"""REV_ZDOT on and off in each mode of the op at the benchmark's shapes (32 heads, 8 kv heads, d = F = 128, bf16):
forward+backward ms per call, interleaved over rounds (``bench``'s tune with ``--rounds``), medians. The benchmark's tune
times the hybrid mode only; with the same chunk's linear block (overlap, linear-only) the kernel spills more with z by
dots (ptxas: 116 / 108 B a thread against 48 / 48), so those modes are timed here.

    python experiments/rev_zdot_modes.py [--T 32768] [--rounds 3] [--reps 21] [--modes hybrid overlap la_only]

Session 18 (H100): overlap 5.006 / 4.958 ms, linear-only 4.021 / 3.957, hybrid 4.145 / 4.055 with column sums / dots
(kernels/rev_zdot_modes_h100_session18.log, from this script's first form, which ran the same interleaved rounds with a
loop of its own and floor(reps / rounds) calls a round). Needs a CUDA device (run it through the device tool).
"""

import argparse
import functools

import torch

from linearize.kernels import bench

MODES = {"hybrid": (True, "outside"), "overlap": (True, "all"), "la_only": (False, "all")}
VARIANTS = ["reverse scan, z by column sums", "reverse scan, z by dots"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=32768)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=21)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    args = ap.parse_args()
    print(f"# {torch.cuda.get_device_name()}, T={args.T}, {args.rounds} rounds of {-(-args.reps // args.rounds)} calls")
    print("| mode | z by column sums, fwd+bwd ms | z by dots, fwd+bwd ms | dots / sums |\n|---|---|---|---|")
    for mode in args.modes:
        softmax, linear = MODES[mode]
        build = functools.partial(bench.ours, softmax=softmax, linear=linear)
        off, on = (r.get("fwd_bwd_ms") for r in bench._tune_interleaved(args.T, args.reps, VARIANTS, args.rounds,
                                                                        build=build))
        print(f"| {mode} | {bench.fmt(off)} | {bench.fmt(on)} | {bench.fmt(on / off if off and on else None)} |",
              flush=True)


if __name__ == "__main__":
    main()
