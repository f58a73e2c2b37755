"""Registers, spills and shared memory of the Triton kernels, compiled ahead of time for an H100 (sm_90a): no GPU needed.

    python -m linearize.kernels.spills [--modes hybrid overlap la_only swa_only] [--dtype bf16] [--warps 4 8]
                                       [--stages 1 2] [--out-bv 64 128] [--state-blocks 64 128]
                                       [--stride 1 2 4] [--rev-stride 1 2] [--save-p] [--pair-blocks] [--fwd-blocks]

Each kernel of ``hybrid_attention/chunk.py`` is compiled by Triton for the benchmark shapes (D = F = Dv = 128,
DESIGN.md section 8; 64-token chunks) with the launch settings the host code uses (``chunk.LAUNCH``, block sizes
``chunk.STATE_BF``/``STATE_BV``/``OUT_BV``) or the ones given on the command line, and the bundled ``ptxas -v``
reports per thread: registers, spill stores / loads (bytes of local memory traffic per thread), and the static
shared memory of the compiled kernel. Any spill means registers ran out: the goal is zero everywhere.

Compiling needs no driver: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))``. The kernel
arguments follow one convention in chunk.py (pointers first, then strides, then scalars, then constexprs), from
which the signature is built here: pointers get the data dtype (fp32 for row statistics and z),
pointers and strides divisibility 16 as a real launch on aligned, contiguous tensors gives them.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # the interpreter does not compile: these must be real JIT functions

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from .hybrid_attention import chunk  # noqa: E402

D = DV = F = 128  # Mistral-7B attention shapes, 128 features
MODES = {"hybrid": (True, 1), "overlap": (True, 2), "la_only": (False, 2), "swa_only": (True, 0)}
DTYPES = {"bf16": (tl.bfloat16, "tf32"), "fp16": (tl.float16, "tf32"), "fp32": (tl.float32, "ieee")}
# pointers holding the data dtype (q, k, v, features, do, outputs and gradients in the input dtype, the per-chunk
# states);
# all other pointers are fp32 (row statistics, z, fp32 gradient buffers)
DATA_PTRS = {"X", "Y", "HS", "DHS", "DA", "Q", "K", "V", "QF", "KF", "OUT", "DO", "DQ", "DQF", "DKF", "DK", "DV_",
             "PS", "DS", "DWL", "PB", "LB", "DVH"}
INT_PTRS = {"READY", "ARG"}  # the fused forward's per-state counts and ticket, the forward's arg maxes
FLOAT_SCALARS = {"scale", "eps"}


def _signature(fn, constexprs: dict, dtype: str):
    """Signature and divisibility attributes of ``fn`` under the chunk.py argument convention."""
    sig, attrs, in_pointers = {}, {}, True
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        is_stride = name.startswith("s") and name.islower()
        in_pointers = in_pointers and not is_stride
        if in_pointers:
            sig[name] = "*" + ("i32" if name in INT_PTRS else dtype if name in DATA_PTRS else "fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "fp32" if name in FLOAT_SCALARS else "i32"
            if is_stride:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def compile_stats(fn, constexprs: dict, dtype: str, num_warps: int, num_stages: int, maxnreg: int | None = None) -> dict:
    """Compile ``fn`` for sm_90a and read ``ptxas -v``: registers, spill bytes, stack and shared memory (``maxnreg``:
    a cap on the registers a thread, as ``chunk.MAXNREG`` sets it)."""
    from triton.backends.nvidia.compiler import get_ptxas

    sig, attrs = _signature(fn, constexprs, dtype)
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as fh:
            fh.write(compiled.asm["ptx"])
        res = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name", "sm_90a", path, "-o", os.devnull],
                             capture_output=True, text=True, check=True)
    log = res.stdout + res.stderr

    def grab(pattern):
        found = re.search(pattern, log)
        return int(found.group(1)) if found else 0

    return {
        "registers": grab(r"Used (\d+) registers"),
        "stack": grab(r"(\d+) bytes stack frame"),
        "spill_stores": grab(r"(\d+) bytes spill stores"),
        "spill_loads": grab(r"(\d+) bytes spill loads"),
        "shared": compiled.metadata.shared,
    }


def kernel_configs(mode: str, dtype: str, out_bv: int, state_blocks: int, stride: int, rev_stride: int):
    """(name, kernel, constexprs) of every kernel one forward + backward of ``mode`` launches; ``stride`` /
    ``rev_stride``: chunks per forward / reverse state (the forward side reads the first, the key side the second)."""
    softmax, lin = MODES[mode]
    dt, prec = DTYPES[dtype]
    # CUR_LIN as for the benchmark's window (w = BT): the same chunk's linear block only where the mode has one
    cur = chunk._cur_lin(lin, chunk.BT)
    ndw = chunk._ndw(lin, chunk.BT)  # slots of the local dW blocks, as the host allocates them
    # the forward's blocks for the backward (FWD_P, FWD_LIN), as the host decides for inputs that want gradients
    fwd_p, fwd_lin = chunk._fwd_blocks(softmax, lin, grad=True)
    fwd_blocks = dict(FWD_P=fwd_p, FWD_LIN=fwd_lin, NDW=ndw)
    heads = dict(D=D, DV=DV, F=F, BD=D, BDV=DV, BF=F, BT=chunk.BT, SOFTMAX=softmax, LINEAR=lin, CUR_LIN=cur, DT=dt,
                 PREC=prec)
    # the weighted z dot of the reverse pass takes fp32 operands at 3xTF32 for 16-bit inputs
    state = dict(F=F, DV=DV, BF=F, BDV=DV, BK=state_blocks, BV=state_blocks, BT=chunk.BT, DT=dt, PREC=prec,
                 Z_DOT=chunk.STATE_Z_DOT, ZPREC="ieee" if dtype == "fp32" else "tf32x3", HAS_RS=False, RS_Y=False)
    out = []
    if lin:
        out.append(("state (fwd)", chunk._chunk_state_kernel, "state",
                    dict(state, PHASE=0, REVERSE=False, HAS_RB=False, SC=stride)))
        out.append(("state (fwd, grid wider than the SMs)", chunk._chunk_state_kernel, "state_wide",
                    dict(state, PHASE=0, REVERSE=False, HAS_RB=False, SC=stride)))
        out.append(("state totals (fwd)", chunk._chunk_state_kernel, "state",
                    dict(state, PHASE=1, REVERSE=False, HAS_RB=False, SC=stride)))
        out.append(("state (bwd, reverse)", chunk._chunk_state_kernel, "state",
                    dict(state, PHASE=0, REVERSE=True, HAS_RB=True, SC=rev_stride, HAS_RS=chunk.REV_DO)))
    out.append((f"fwd (BV={out_bv})", chunk._fwd_kernel, "fwd",
                dict(heads, BV=out_bv, SC=stride, GROUP=chunk.GROUP_HEADS, WIN=chunk.WINDOW_BLOCKS, FWD_P=False,
                     FWD_LIN=False, NDW=ndw)))
    if fwd_p or fwd_lin:
        out.append((f"fwd, blocks for the backward (BV={out_bv})", chunk._fwd_kernel, "fwd",
                    dict(heads, BV=out_bv, SC=stride, GROUP=chunk.GROUP_HEADS, WIN=chunk.WINDOW_BLOCKS, **fwd_blocks)))
    if lin and chunk.FUSED_FWD:
        out.append((f"fwd fused (BV={out_bv})", chunk._fwd_fused_kernel, "fwd_fused",
                    dict(heads, BV=out_bv, SC=stride, SBK=state_blocks, SBV=state_blocks, Z_DOT=chunk.STATE_Z_DOT,
                         ZPREC=state["ZPREC"], NTHREADS=32 * chunk.LAUNCH["fwd_fused"][0], WIN=chunk.WINDOW_BLOCKS,
                         **fwd_blocks)))
    # (DELTA_Q: the query side's first launch stores delta, the delta kernel only rb and dA)
    # (SIDE_DA: the delta kernel writes delta and rb, the side stream's totals pass dA)
    side_da = chunk.SIDE_DA and not chunk.DELTA_Q and bool(lin) and chunk.REV_LIN
    out.append(("delta", chunk._delta_kernel, "delta",
                dict(DV=DV, BDV=DV, BT=chunk.BT, HAS_DA=bool(lin) and not chunk.REV_DO and not side_da,
                     HAS_DELTA=not chunk.DELTA_Q)))
    if lin and chunk.REV_LIN and chunk.DELTA_TOTALS and not side_da:  # delta with the reverse scan's totals
        out.append(("delta_totals (DELTA_TOTALS)", chunk._delta_totals_kernel, "delta_totals",
                    dict(DV=DV, F=F, BDV=DV, BF=F, BT=chunk.BT, DT=dt, PREC=prec, HAS_DELTA=not chunk.DELTA_Q,
                         FROM_DELTA=False)))
    if side_da:
        out.append(("delta_totals from delta (SIDE_DA)", chunk._delta_totals_kernel, "delta_totals",
                    dict(DV=DV, F=F, BDV=DV, BF=F, BT=chunk.BT, DT=dt, PREC=prec, HAS_DELTA=False, FROM_DELTA=True)))
    # constexprs with defaults must be named here too, or the signature would make them runtime arguments
    both = dict(heads, DO_LIN=True, DO_SM=True, SC=stride, GROUP=chunk.GROUP_HEADS, SAVE_P=chunk.SAVE_P,
                SAVE_DW=chunk.SAVE_DW and softmax and bool(lin), WIN=chunk.WINDOW_BLOCKS, NDW=ndw, FWD_P=fwd_p,
                DELTA_Q=chunk.DELTA_Q)
    out.append(("bwd_q", chunk._bwd_q_kernel, "bwd_q", both))
    if softmax and lin:  # (the first launch computes delta under DELTA_Q: the softmax side)
        out.append(("bwd_q linear side (Q_SPLIT)", chunk._bwd_q_kernel, "bwd_q",
                    dict(both, DO_SM=False, DELTA_Q=False)))
        out.append(("bwd_q softmax side (Q_SPLIT)", chunk._bwd_q_kernel, "bwd_q", dict(both, DO_LIN=False)))
    # (DG_SUM: the benchmark's gamma, dgamma summed in the key side)
    both = dict(heads, DO_DV=True, DO_DK=True, SC=rev_stride, SAVE_P=chunk.SAVE_P, WIN=chunk.WINDOW_BLOCKS,
                WITH_KF=chunk.KF_IN_KV and bool(lin), SAVE_DW=chunk.SAVE_DW and softmax and bool(lin), NDW=ndw,
                DG_SUM=bool(softmax), FWD_P=fwd_p, FWD_LIN=fwd_lin)
    out.append(("bwd_kv", chunk._bwd_kv_kernel, "bwd_kv", both))
    if softmax:
        out.append(("bwd_kv dv (KV_SPLIT)", chunk._bwd_kv_kernel, "bwd_kv", dict(both, DO_DK=False)))
        out.append(("bwd_kv dk (KV_SPLIT)", chunk._bwd_kv_kernel, "bwd_kv", dict(both, DO_DV=False)))
    if lin and chunk.KF_DV:  # dk_feat and dv's linear terms per kv head; the key side's dv pass without them
        out.append(("bwd_kfdv (KF_DV)", chunk._bwd_kfdv_kernel, "bwd_kfdv",
                    dict(DV=DV, F=F, BDV=DV, BF=F, BT=chunk.BT, LINEAR=lin, CUR_LIN=cur, DT=dt, PREC=prec,
                         SC=rev_stride, SAVE_DW=chunk.SAVE_DW and softmax, NDW=ndw)))
        if softmax:
            out.append(("bwd_kv (KF_DV)", chunk._bwd_kv_kernel, "bwd_kv",
                        dict(both, LINEAR=0, CUR_LIN=0, WITH_KF=False, FWD_LIN=False, DV_INIT=True)))
    if lin and chunk.REV_LIN:  # the key side's linear terms in the reverse scan; the key side sums the heads' dv
        out.append(("bwd_rev (REV_LIN)", chunk._bwd_rev_kernel, "bwd_rev",
                    dict(DV=DV, F=F, BDV=DV, BF=F, BT=chunk.BT, LINEAR=lin, CUR_LIN=cur, DT=dt, PREC=prec,
                         NV=chunk.REV_SPLIT, NF=chunk.REV_SPLIT,
                         ZDOT=chunk._rev_zdot(torch.float32 if dtype == "fp32" else torch.bfloat16,
                                              F // chunk.REV_SPLIT),
                         ZSPLIT=chunk._rev_zsplit(torch.float32 if dtype == "fp32" else torch.bfloat16),
                         SCALE=chunk.REV_SCALE_DO, ST=chunk.REV_ST)))
        if chunk.SIDE_STATE_BLOCKS:  # its segment totals on the side stream, in the side stream's tiles
            bk, bv = chunk.SIDE_STATE_BLOCKS
            out.append((f"reverse scan totals (side stream, {bk}x{bv})", chunk._chunk_state_kernel,
                        "side_state", dict(state, BK=bk, BV=bv, PHASE=1, REVERSE=True, HAS_RB=True, SC=1,
                                           HAS_RS=chunk.REV_SCALE_DO, RS_Y=chunk.REV_ST)))
        out.append(("bwd_kv (REV_LIN)", chunk._bwd_kv_kernel, "bwd_kv",
                    dict(both, LINEAR=0, CUR_LIN=0, WITH_KF=False, FWD_LIN=False, DVL_HEADS=True)))
    if lin and not chunk.KF_IN_KV and not chunk.KF_DV and not chunk.REV_LIN:
        out.append(("bwd_kf", chunk._bwd_kf_kernel, "bwd_kf",
                    dict(DV=DV, F=F, BDV=DV, BF=F, BT=chunk.BT, LINEAR=lin, CUR_LIN=cur, DT=dt, PREC=prec,
                         SC=rev_stride, GROUP=chunk.GROUP_HEADS, SAVE_DW=chunk.SAVE_DW and softmax, NDW=ndw)))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", nargs="+", default=["hybrid"], choices=list(MODES))
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    ap.add_argument("--warps", type=int, nargs="*",
                    help="num_warps to try (default: chunk.LAUNCH, chunk.LAUNCH_FP32 for fp32)")
    ap.add_argument("--stages", type=int, nargs="*",
                    help="num_stages to try (default: chunk.LAUNCH, chunk.LAUNCH_FP32 for fp32)")
    ap.add_argument("--save-p", action="store_true", help="compile with chunk.SAVE_P on")
    ap.add_argument("--pair-blocks", action="store_true", help="compile with chunk.WINDOW_BLOCKS off (block pairs)")
    ap.add_argument("--kf-in-kv", action="store_true", help="compile with chunk.KF_IN_KV on")
    ap.add_argument("--kf-dv", action="store_true", help="compile with chunk.KF_DV on")
    ap.add_argument("--rev-do", action="store_true", help="compile with chunk.REV_DO on (the reverse pass on do)")
    ap.add_argument("--reverse-states", action="store_true",
                    help="compile with chunk.REV_LIN off (reverse states in memory, dk_feat's own kernel)")
    ap.add_argument("--fused-fwd", action="store_true", help="also compile the fused forward (chunk.FUSED_FWD)")
    ap.add_argument("--delta-totals", action="store_true",
                    help="also compile delta with the reverse scan's totals (chunk.DELTA_TOTALS)")
    ap.add_argument("--delta-q", action="store_true",
                    help="compile with chunk.DELTA_Q on (delta computed by the query side's first launch)")
    ap.add_argument("--side-da", action="store_true",
                    help="compile with chunk.SIDE_DA on (dA written by the side stream's totals pass)")
    ap.add_argument("--rev-scale-do", action="store_true",
                    help="compile with chunk.REV_SCALE_DO on (the reverse scan divides do by Zd itself)")
    ap.add_argument("--rev-st", action="store_true",
                    help="compile with chunk.REV_ST on (the reverse scan's dk_feat parts hold dh transposed)")
    ap.add_argument("--fwd-blocks", action="store_true",
                    help="compile with chunk.FWD_P and chunk.FWD_LIN on (the forward's blocks for the backward)")
    ap.add_argument("--out-bv", type=int, nargs="+", default=[chunk.OUT_BV], help="forward Dv block")
    ap.add_argument("--state-blocks", type=int, nargs="+", default=[chunk.STATE_BF],
                    help="state pass F and Dv block (square)")
    ap.add_argument("--stride", type=int, nargs="+", default=[chunk.STATE_STRIDE],
                    help="chunks per forward state (STATE_STRIDE)")
    ap.add_argument("--rev-stride", type=int, nargs="+", default=[chunk.REV_STATE_STRIDE],
                    help="chunks per reverse state (REV_STATE_STRIDE)")
    ap.add_argument("--kernels", nargs="*", help="only kernels whose name starts with one of these")
    ap.add_argument("--maxnreg", type=int, nargs="*",
                    help="register caps a thread to try (default: chunk.MAXNREG, none for a kernel not in it)")
    args = ap.parse_args(argv)
    chunk.SAVE_P = chunk.SAVE_P or args.save_p
    chunk.WINDOW_BLOCKS = chunk.WINDOW_BLOCKS and not args.pair_blocks
    chunk.KF_IN_KV = chunk.KF_IN_KV or args.kf_in_kv
    chunk.FUSED_FWD = chunk.FUSED_FWD or args.fused_fwd
    chunk.DELTA_TOTALS = chunk.DELTA_TOTALS or args.delta_totals
    chunk.DELTA_Q = chunk.DELTA_Q or args.delta_q
    chunk.SIDE_DA = chunk.SIDE_DA or args.side_da
    chunk.REV_SCALE_DO = chunk.REV_SCALE_DO or args.rev_scale_do
    chunk.REV_ST = chunk.REV_ST or args.rev_st
    chunk.KF_DV = chunk.KF_DV or args.kf_dv
    chunk.REV_DO = chunk.REV_DO or args.rev_do
    chunk.REV_LIN = chunk.REV_LIN and not args.reverse_states
    chunk.FWD_P = chunk.FWD_P or args.fwd_blocks
    chunk.FWD_LIN = chunk.FWD_LIN or args.fwd_blocks

    print(f"# triton {triton.__version__}, sm_90a, D=F=Dv={D}, BT={chunk.BT}, {args.dtype}; bytes per thread")
    print("| mode | kernel | SC | warps | stages | cap | registers | spill stores B | spill loads B | stack B | shared KiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    seen, failed = set(), 0
    grid = itertools.product(args.modes, args.out_bv, args.state_blocks, args.stride, args.rev_stride)
    for mode, out_bv, sb, sc, rsc in grid:
        for name, fn, launch, constexprs in kernel_configs(mode, args.dtype, out_bv, sb, sc, rsc):
            if args.kernels and not any(name.startswith(k) for k in args.kernels):
                continue
            key = (name, mode, constexprs.get("SC"))
            if key in seen:  # the state pass does not depend on the forward's block, nor a kernel on the other stride
                continue
            seen.add(key)
            if name.startswith("state"):
                name = f"{name} ({sb}x{sb})"
            warps0, stages0 = chunk.LAUNCH_FP32 if args.dtype == "fp32" else chunk.LAUNCH[launch]
            sc = constexprs.get("SC", "-")
            caps = args.maxnreg or [None if args.dtype == "fp32" else chunk.MAXNREG.get(launch)]
            for warps, stages, cap in itertools.product(args.warps or [warps0], args.stages or [stages0], caps):
                try:
                    st = compile_stats(fn, constexprs, args.dtype, warps, stages, cap)
                except Exception as err:  # one configuration that does not compile must not hide the others
                    failed += 1
                    print(f"| {mode} | {name} | {sc} | {warps} | {stages} | {cap or '-'} | failed: "
                          f"{type(err).__name__}: {str(err).splitlines()[0][:80]} | | | | |", flush=True)
                    continue
                print(f"| {mode} | {name} | {sc} | {warps} | {stages} | {cap or '-'} | {st['registers']} | "
                      f"{st['spill_stores']} | "
                      f"{st['spill_loads']} | {st['stack']} | {st['shared'] / 1024:.0f} |", flush=True)
    if failed:
        print(f"# {failed} configuration(s) failed to compile", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
