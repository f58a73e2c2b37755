"""Repro: REV_ZDOT at D = F = 64, la_only: runs bit-identical? close to naive?"""
import sys, torch
sys.path[:0] = ["tests"]
from ops.test_hybrid_attention import make_inputs, run, GRAD_NAMES, MODES
from linearize.kernels.hybrid_attention import chunk
from linearize.kernels.hybrid_attention.naive import hybrid_attention_naive

def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()

for mode in sys.argv[1].split(","):
    softmax, linear = MODES[mode]
    kw = dict(window=64, softmax=softmax, linear=linear)
    for D, T in ((64, 300), (128, 300), (32, 200)):
        inputs, do = make_inputs(1, T, 4, 2, D, D, torch.bfloat16, device="cuda", seed=3)
        ref_in = [None if x is None else x.detach().float().requires_grad_() for x in inputs]
        rout, rgrads = run(hybrid_attention_naive, ref_in, do.float(), **kw)
        for zdot in (True,):
            chunk.REV_ZDOT = zdot
            for plans in (True,):
                chunk.LAUNCH_PLANS = plans
                res = [run(chunk.hybrid_attention_chunk, inputs, do, **kw) for _ in range(3)]
                diffs = []
                for i, name in enumerate(GRAD_NAMES):
                    gs = [r[1][i] for r in res]
                    if gs[0] is None:
                        continue
                    same = all(torch.equal(gs[0], g) for g in gs[1:])
                    diffs.append(f"{name}:{'=' if same else 'DIFF'}:{rel(gs[0], rgrads[i]):.1e}")
                print(mode, D, T, "zdot", zdot, "plans", plans, "out", f"{rel(res[0][0], rout):.1e}", " ".join(diffs),
                      flush=True)
