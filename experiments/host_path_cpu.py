"""The hybrid op's forward host path, on the CPU: an earlier ``chunk.py`` against the working tree's.

No GPU needed. Each version runs the forward's Python (checks, prelude, plan key and lookup, buffers, the autograd
Function) through a replayed launch plan, with CPU tensors and a fake launcher that only stamps the time of each
launch: the time to the first launch (the state pass: the GPU waits for it), to the last (the output kernel: a GPU
that finishes the state pass first waits for it) and to the return. The versions alternate in one process (the
same heap, caches and clock for both), ``--rounds`` rounds of ``--calls`` calls each; a row is the median of the
rounds' medians. Read it as a ratio: at 38d67b3 the first launch came ~21 us after the call here, 56 us on an H100
host back to back and 111 us after a GPU wait (``first_launch_stamps.py``, session 32), but the same Python does the
same work.

    git show HEAD:kernels/hybrid_attention/chunk.py > /tmp/chunk_before.py
    git show HEAD:kernels/launch.py > /tmp/launch_before.py
    python experiments/host_path_cpu.py --before /tmp/chunk_before.py [--before-launch /tmp/launch_before.py] \
        [--T 2048] [--json FILE]

``--before-launch``: the earlier ``kernels/launch.py`` (launch plans) the earlier ``chunk.py`` imports; without it
both versions use the working tree's.
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

from host_ab import load_versions  # noqa: E402

from linearize.kernels.hybrid_attention import chunk as current  # noqa: E402


def path_timer(mod, inputs, window: int):
    """A function that runs one forward of ``mod``'s op with fake launches and returns the microseconds from the call
    to its first launch, to its last launch (the output kernel) and to its return. The plan of this key is recorded
    first, from the launches that call makes (fake: nothing runs; the output is an unwritten buffer)."""
    mod.INTERPRETED = False
    mod._interpreting = lambda: True  # (``supported`` lets CPU tensors through as under the interpreter)
    mod._stream = lambda: 0
    seen = {"launches": []}
    real_start = mod.PLANS.start

    def capture(key, stream):
        seen["key"] = key

        def launch(fn, grid, tensors, rest):
            seen["launches"].append((fn, grid))

        launch.done = lambda: None
        return launch

    def call():
        return mod.hybrid_attention_chunk(*inputs, window=window)

    mod.PLANS.start = capture
    try:
        call()
    finally:
        mod.PLANS.start = real_start
    if seen.get("key") is None:
        raise SystemExit(f"{mod.__name__}: no plan key (plans off?)")
    stamps: list[float] = []

    def run(*args):
        stamps.append(time.perf_counter())

    mod.PLANS.store(seen["key"], tuple((fn, grid, run, None, None, 1, 1, 1, ()) for fn, grid in seen["launches"]))

    def once() -> tuple[float, float, float]:
        stamps.clear()
        t0 = time.perf_counter()
        call()
        t1 = time.perf_counter()
        return (stamps[0] - t0) * 1e6, (stamps[-1] - t0) * 1e6, (t1 - t0) * 1e6

    replays = mod.PLANS.replays
    once()
    if mod.PLANS.replays != replays + 1:
        raise SystemExit(f"{mod.__name__}: the call did not replay its plan")
    return once


MARKS = ("first launch", "last launch", "return")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="path of the earlier chunk.py")
    ap.add_argument("--before-launch", help="path of the earlier kernels/launch.py")
    ap.add_argument("--T", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    B, H, Hkv, D, F = 1, 32, 8, 128, 128  # the benchmark's shapes (bench.py)
    g = torch.Generator().manual_seed(0)

    def leaf(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=g).to(dtype).requires_grad_()

    inputs = (leaf(B, args.T, H, D), leaf(B, args.T, Hkv, D), leaf(B, args.T, Hkv, D), leaf(B, args.T, H, F),
              leaf(B, args.T, H, F), leaf(H, dtype=torch.float32))
    timers = {"before": path_timer(load_versions(args.before, args.before_launch), inputs, 64),
              "after": path_timer(current, inputs, 64)}
    meds: dict[str, dict[str, list[float]]] = {name: {m: [] for m in MARKS} for name in timers}
    for r in range(args.rounds):
        for name in list(timers) if r % 2 == 0 else list(timers)[::-1]:
            calls = [timers[name]() for _ in range(args.calls)]
            for i, m in enumerate(MARKS):
                meds[name][m].append(statistics.median(c[i] for c in calls))
    rows = {name: {m: statistics.median(v) for m, v in marks.items()} for name, marks in meds.items()}
    print(f"host us from the call of a forward (inputs that want gradients) to its first launch, its last launch and "
          f"its return; CPU, T={args.T}, {args.rounds} alternating rounds of {args.calls} calls (median of the "
          f"round medians)")
    print("| chunk.py | " + " | ".join(MARKS) + " |\n|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row[m]:.2f}" for m in MARKS) + " |")
    print("after / before: " + ", ".join(f"{m} {rows['after'][m] / rows['before'][m]:.3f}" for m in MARKS))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"T": args.T, "rounds": args.rounds, "calls": args.calls, "us": rows, "round_medians": meds}, fh,
                      indent=1)


if __name__ == "__main__":
    main()
