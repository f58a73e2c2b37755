"""Repro 2: which setting breaks REV_ZDOT's dk_feat (la_only, CUR_LIN): stages, head dims, dtype."""
import sys, torch
sys.path[:0] = ["tests"]
from ops.test_hybrid_attention import make_inputs, run, GRAD_NAMES, MODES
from linearize.kernels.hybrid_attention import chunk
from linearize.kernels.hybrid_attention.naive import hybrid_attention_naive


real = chunk._options
def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()

for D, dtype, rev_opts, zmode, mode in [(D, dt, None, zm, m) for zm in ("split", "tf32x3") for m in ("la_only", "overlap", "hybrid", "hybrid@33") for D in (32, 64, 128) for dt in (torch.bfloat16, torch.float16)]:
    chunk.REV_ZDOT = zmode
    def opts(name, big, dt, rev_opts=rev_opts):
        o = real(name, big, dt)
        if name == "bwd_rev" and rev_opts:
            o = dict(o, num_warps=rev_opts[0], num_stages=rev_opts[1])
        return o
    chunk._options = opts
    softmax, linear = MODES[mode.split("@")[0]]
    kw = dict(window=int(mode.split("@")[1]) if "@" in mode else 64, softmax=softmax, linear=linear)
    inputs, do = make_inputs(1, 300, 4, 2, D, D, dtype, device="cuda", seed=3)
    ref_in = [None if x is None else x.detach().double().requires_grad_() for x in inputs]
    rout, rgrads = run(hybrid_attention_naive, ref_in, do.double(), **kw)
    out, grads = run(chunk.hybrid_attention_chunk, inputs, do, **kw)
    print(mode, zmode, D, dtype, "bwd_rev", rev_opts, "dk_feat", f"{rel(grads[4], rgrads[4]):.1e}", "dv", f"{rel(grads[2], rgrads[2]):.1e}",
          flush=True)
