"""REV_ZDOT's 16-bit split on the GPU: dk_feat against the float64 naive reference, per mode, head dim and dtype.

    python experiments/rev_zdot_repro.py            # the defaults (the split only from REV_ZDOT_MIN_COLS columns)
    python experiments/rev_zdot_repro.py --all      # the split at every head dim (REV_ZDOT_MIN_COLS = 16)
    python experiments/rev_zdot_repro.py --one      # bf16 takes one dot with the weights in bf16 (REV_ZDOT_BF16_ONE)

Session 18 (H100, Triton 3.6): with the split at every head dim, dk_feat's relative RMS error was 3-120 (wrong) at
D = F = 32 and 64 in each mode with the same chunk's linear block (la_only, overlap, hybrid at w = 33), 16-bit only,
and ~3e-3 (bf16) / ~4e-4 (fp16) at 128 and in the hybrid at w = 64 (kernels/rev_zdot_repro_h100_session18.log).
Needs a CUDA device (run it through the device tool).
"""

import sys

import torch

sys.path[:0] = ["tests"]
from ops.test_hybrid_attention import MODES, make_inputs, run  # noqa: E402

from linearize.kernels.hybrid_attention import chunk  # noqa: E402
from linearize.kernels.hybrid_attention.naive import hybrid_attention_naive  # noqa: E402


def rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def main():
    if "--all" in sys.argv:
        chunk.REV_ZDOT_MIN_COLS = 16
    if "--one" in sys.argv:
        chunk.REV_ZDOT_BF16_ONE = True
    print("| mode | w | D = F | dtype | z | dk_feat rel err | dv rel err |\n|---|---|---|---|---|---|---|")
    for mode, w in (("la_only", 64), ("overlap", 64), ("hybrid", 64), ("hybrid", 33)):
        softmax, linear = MODES[mode]
        for D in (32, 64, 128):
            for dtype in (torch.bfloat16, torch.float16):
                inputs, do = make_inputs(1, 300, 4, 2, D, D, dtype, device="cuda", seed=3)
                ref = [None if x is None else x.detach().double().requires_grad_() for x in inputs]
                _, ref_grads = run(hybrid_attention_naive, ref, do.double(), window=w, softmax=softmax, linear=linear)
                _, grads = run(chunk.hybrid_attention_chunk, inputs, do, window=w, softmax=softmax, linear=linear)
                split = chunk._rev_zdot(dtype, chunk._p2(D) // chunk.REV_SPLIT)
                split = ("one dot" if not chunk._rev_zsplit(dtype) else "split") if split else "column sum"
                print(f"| {mode} | {w} | {D} | {str(dtype)[6:]} | {split} | {rel(grads[4], ref_grads[4]):.1e} | "
                      f"{rel(grads[2], ref_grads[2]):.1e} |", flush=True)


if __name__ == "__main__":
    main()
