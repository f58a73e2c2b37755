"""Where the host's ~45 us from calling the hybrid op to its first kernel launch go (the no-grad forward at the
benchmark's shapes): the whole span as ``bench.first_launch_us`` measures it, then each step on that path timed alone
in a loop (median microseconds a call over batches), so that their sum can be read against the span.

    python experiments/first_launch_parts.py [--T 32768] [--json FILE]

Needs a CUDA device (run it through the device tool). Prints a table; --json writes it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from linearize.kernels import bench  # noqa: E402
from linearize.kernels.hybrid_attention import chunk  # noqa: E402


def per_call_us(fn, n: int = 2000, batches: int = 7) -> float:
    """Median over ``batches`` of the mean microseconds of ``fn()`` over ``n`` calls."""
    got = []
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        got.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(got)


class _Noop(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, q_feat, k_feat, gamma, window, softmax, linear, scale, eps, grad):
        return q

    @staticmethod
    def backward(ctx, do):
        raise NotImplementedError


class _Stop(Exception):
    pass


def to_first_launch(call, n: int = 2000) -> float:
    """Median host microseconds from ``call()`` to its first launch through chunk.PLANS, the launch itself left out
    (it raises there), over n calls after a warm-up: the Python and torch work alone, no GPU queue involved."""
    real = chunk.PLANS.start
    stamp = []

    class Launch:
        def __call__(self, *args):
            stamp.append(time.perf_counter())
            raise _Stop

        def done(self):
            pass

    def start(key, stream):
        real(key, stream)  # (the plan lookup, as a replay does it)
        return Launch()

    chunk.PLANS.start = start
    got = []
    try:
        for i in range(n + 200):
            t0 = time.perf_counter()
            try:
                call()
            except _Stop:
                pass
            if i >= 200:
                got.append((stamp[-1] - t0) * 1e6)
    finally:
        chunk.PLANS.start = real
    return statistics.median(got)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, default=32768)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    T = args.T
    q, k, v, qf, kf, gamma, _ = bench.make_inputs(T)
    kw = dict(window=bench.WINDOW, softmax=True, linear="outside")

    def fwd():
        with torch.no_grad():
            return chunk.hybrid_attention_chunk(q, k, v, qf, kf, gamma, **kw)

    for _ in range(5):
        fwd()
    torch.cuda.synchronize()
    # the forward's own key and state buffers, as its prelude builds them (it launches the state pass once more)
    scale = q.shape[-1] ** -0.5
    with torch.no_grad():
        pre = chunk._prelude(q, k, v, qf, kf, gamma, bench.WINDOW, True, 1, scale, 1e-12, False)
    torch.cuda.synchronize()
    extra = (bench.WINDOW, True, 1, scale, 1e-12, pre.fwd_p, pre.fwd_lin)
    key = chunk._plan_key("fwd", q, k, v, qf, kf, gamma, extra=extra)
    if key != pre.key:  # (the replay's lookup below must find the forward's plan)
        sys.exit("the key built here is not the forward's: update this script to chunk._prelude's extra")
    rows = {
        "span (bench.first_launch_us, real launches)": bench.first_launch_us(fwd, 200),
        "span, first launch faked (no GPU work)": to_first_launch(fwd),
        "supported()": per_call_us(lambda: chunk.supported(q, k, v, qf, kf, window=bench.WINDOW, softmax=True,
                                                             linear="outside")),
        "grad check (is_grad_enabled, requires_grad x6)": per_call_us(
            lambda: torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, qf, kf, gamma))),
        "autograd.Function.apply, 12 args, forward returns q": per_call_us(
            lambda: _Noop.apply(q, k, v, qf, kf, gamma, 64, True, "outside", 0.1, 1e-12, False)),
        "_c x5 + gamma.detach().float().contiguous()": per_call_us(
            lambda: (chunk._c(q), chunk._c(k), chunk._c(v), chunk._c(qf), chunk._c(kf),
                     gamma.detach().float().contiguous())),
        "_plan_key": per_call_us(lambda: chunk._plan_key("fwd", q, k, v, qf, kf, gamma, extra=extra)),
        "  _switches()": per_call_us(chunk._switches),
        "  hash(key)": per_call_us(lambda: hash(key)),
        "  torch.cuda.current_device()": per_call_us(torch.cuda.current_device),
        "  torch._C._cuda_getDevice()": per_call_us(torch._C._cuda_getDevice),
        "PLANS.start (a replay's lookup)": per_call_us(lambda: chunk.PLANS.start(key, chunk._stream)),
        "torch.empty x2 (the forward states hs, zs)": per_call_us(
            lambda: (torch.empty(pre.hs.shape, device="cuda", dtype=pre.hs.dtype),
                     torch.empty(pre.zs.shape, device="cuda", dtype=pre.zs.dtype))),
        "_stream()": per_call_us(chunk._stream),
        "torch._C._cuda_getCurrentRawStream(dev)": per_call_us(lambda: torch._C._cuda_getCurrentRawStream(0)),
    }
    print(f"\n{torch.cuda.get_device_name()} | T={T} | host us a call (medians)")
    print("| step | us |")
    print("|---|---|")
    for name, us in rows.items():
        print(f"| {name} | {us:.2f} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"header": bench.header(), "T": T, "us": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
