"""Where a lone forward's host time to its two kernel launches goes, measured as the benchmark's per-call timing
sees it (a synchronised queue before each call), against the same path with warm caches.

``first_launch_parts.py`` times each step alone in a tight loop, warm; their sum (~31 us on an H100 host) is well
below the span of a lone call (52-122 us in the last four benchmark runs). This script stamps the path itself (``time.perf_counter`` at the entry of
``supported``, ``_prelude``, ``chunk_states``, the first launch (the state pass) and the second (the output kernel,
which the GPU waits for if the host reaches it after the state pass's ~0.22 ms at 32K), at the exit of
``_plan_key`` and ``PLANS.start``, and at the return) under four conditions, 200 calls each:

* ``gpu wait``: real launches, ``torch.cuda.synchronize()`` before each call (what ``bench.first_launch_us`` and a
  per-call timing see);
* ``sleep kernel + sync``: the launches faked (no GPU work), a ~1 ms sleep kernel queued and waited for before
  each call: the host waits as long as in ``gpu wait`` but the op queues nothing;
* ``host sleep``: the launches faked, ``time.sleep(1 ms)`` before each call (an idle host, no CUDA wait);
* ``back to back``: the launches faked, nothing between calls (warm).

If ``sleep kernel + sync`` reads as ``gpu wait``, the lone call's extra time is the host's state after a wait, not
the op's work.

    python experiments/first_launch_stamps.py [--T 32768] [--grad] [--json FILE]

Needs a CUDA device (run it through the device tool). Prints a table of median microseconds from the call to each
stamp; --json writes it.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from linearize.kernels import bench  # noqa: E402
from linearize.kernels.hybrid_attention import chunk  # noqa: E402

MARKS = ("supported", "_prelude", "_plan_key done", "PLANS.start done", "chunk_states", "first launch",
         "second launch", "return")


def stamped(call, before, fake: bool, reps: int = 200, skip: int = 20) -> dict[str, float]:
    """Median microseconds from ``call()`` to each of MARKS over ``reps`` calls (after ``skip``), ``before()`` run
    ahead of each call and outside the span. fake: the launches are stamped and skipped (nothing runs; the output is
    an unwritten buffer)."""
    stamps: dict[str, float] = {}
    saved = {name: getattr(chunk, name) for name in ("supported", "_prelude", "_plan_key", "chunk_states")}

    def stamp(name):  # (the first time a call reaches the mark)
        stamps.setdefault(name, time.perf_counter())

    def at_entry(name, fn):
        def wrapped(*a, **kw):
            stamp(name)
            return fn(*a, **kw)

        return wrapped

    def at_exit(name, fn):
        def wrapped(*a, **kw):
            out = fn(*a, **kw)
            stamp(name)
            return out

        return wrapped

    def launched():
        stamp("second launch" if "first launch" in stamps else "first launch")

    chunk.supported = at_entry("supported", saved["supported"])
    chunk._prelude = at_entry("_prelude", saved["_prelude"])
    chunk._plan_key = at_exit("_plan_key done", saved["_plan_key"])
    chunk.chunk_states = at_entry("chunk_states", saved["chunk_states"])
    rows: dict[str, list[float]] = {m: [] for m in MARKS}
    started = functools.partial(stamp, "PLANS.start done")
    try:
        with bench.stamped_launches(launched, chunk, on_start=started, fake=fake):
            for i in range(reps + skip):
                before()
                stamps.clear()
                t0 = time.perf_counter()
                call()
                stamps["return"] = time.perf_counter()
                if i >= skip:
                    for m in MARKS:
                        rows[m].append((stamps[m] - t0) * 1e6)
    finally:
        for name, fn in saved.items():
            setattr(chunk, name, fn)
        torch.cuda.synchronize()
    return {m: statistics.median(v) for m, v in rows.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, default=32768)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--json")
    ap.add_argument("--grad", action="store_true",
                    help="the forward with gradients wanted (it writes the backward's blocks); default: under "
                         "torch.no_grad(), as the benchmark's forward row is timed")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    q, k, v, qf, kf, gamma, _ = bench.make_inputs(args.T)
    for x in (q, k, v, qf, kf, gamma):
        x.requires_grad_()

    def fwd():  # the benchmark's forward: inputs that want gradients, timed under torch.no_grad() unless --grad
        with torch.set_grad_enabled(args.grad):
            return chunk.hybrid_attention_chunk(q, k, v, qf, kf, gamma, window=bench.WINDOW, softmax=True,
                                                linear="outside")

    for _ in range(5):
        fwd()
    torch.cuda.synchronize()
    bench._sleep_ms(0.1)  # (calibrates the sleep kernel)

    def sleep_kernel_sync():
        bench._sleep_ms(1.0)
        torch.cuda.synchronize()

    conditions = {
        "gpu wait": (torch.cuda.synchronize, False),
        "sleep kernel + sync": (sleep_kernel_sync, True),
        "host sleep": (lambda: time.sleep(1e-3), True),
        "back to back": (lambda: None, True),
    }
    table = {name: stamped(fwd, before, fake, args.reps) for name, (before, fake) in conditions.items()}
    mode = "with gradients" if args.grad else "no grad"
    print(f"\n{torch.cuda.get_device_name()} | T={args.T} | forward {mode} | median host us from the call to each stamp")
    print("| condition | " + " | ".join(MARKS) + " |")
    print("|---" * (len(MARKS) + 1) + "|")
    for name, row in table.items():
        print(f"| {name} | " + " | ".join(f"{row[m]:.1f}" for m in MARKS) + " |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"header": bench.header(), "T": args.T, "grad": args.grad, "us": table}, fh, indent=1)


if __name__ == "__main__":
    main()
