"""A/B of the hybrid op's host path: an earlier ``chunk.py`` against the working tree's, on one GPU, in alternating
rounds (session 13 compared 9fb3ed1 with b356f63 this way).

    git show 9fb3ed1:kernels/hybrid_attention/chunk.py > .device/chunk_before.py
    git show 9fb3ed1:kernels/launch.py > .device/launch_before.py
    python experiments/host_ab.py --before .device/chunk_before.py [--before-launch .device/launch_before.py] \
        --out $OUT/host_ab.json

Both versions run the same inputs (bench.py's Mistral-7B attention shapes); their outputs must be bit-identical (the
kernels are the same source, only the Python around them differs). Per version and T: the no-grad forward's CUDA and
host time (``bench.cuda_samples``), forward+backward likewise, and the host microseconds from the call to the first
kernel launch and to the second (the forward's output kernel). Each row is the median over all rounds; the order of
the versions flips every round. Prints a table;
writes JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from linearize.kernels import bench  # noqa: E402
from linearize.kernels.hybrid_attention import chunk as current  # noqa: E402


def load_before(path: str):
    """The earlier chunk.py as a module of the same package (its relative imports resolve to this checkout's)."""
    name = "linearize.kernels.hybrid_attention.chunk_before"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def load_versions(chunk_path: str, launch_path: str | None):
    """The earlier chunk.py as a module (host_ab.load_before), importing the earlier launch.py where given."""
    if launch_path is None:
        return load_before(chunk_path)
    name = "linearize.kernels.launch"
    spec = importlib.util.spec_from_file_location(name + "_before", launch_path)
    launch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch)
    saved = sys.modules[name]
    sys.modules[name] = launch
    try:
        return load_before(chunk_path)
    finally:
        sys.modules[name] = saved


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="path of the earlier chunk.py")
    ap.add_argument("--before-launch", help="path of the earlier kernels/launch.py (default: the working tree's)")
    ap.add_argument("--T", type=int, nargs="+", default=[2048, 32768])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--out", default="host_ab.json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("the host A/B needs a CUDA device")
    versions = {"before": load_versions(args.before, args.before_launch), "after": current}
    rows = []
    for T in args.T:
        *inputs, do = bench.make_inputs(T)
        leaves = [x.requires_grad_() for x in inputs]
        ops = {}
        for name, mod in versions.items():
            def call(mod=mod, inputs=inputs):
                return mod.hybrid_attention_chunk(*inputs, window=bench.WINDOW)

            def fwd(call=call):
                with torch.no_grad():
                    return call()

            ops[name] = (mod, fwd, bench.fwd_bwd(call, leaves, do))
        outs = [ops[name][1]() for name in ops]
        if not torch.equal(outs[0], outs[1]):
            sys.exit(f"T={T}: the two versions' outputs differ")
        acc = {name: {"fwd": [], "fwd_host": [], "fwd_bwd": [], "fwd_bwd_host": [], "first_launch_us": [],
                      "second_launch_us": []} for name in ops}
        for r in range(args.rounds):
            for name in list(ops) if r % 2 == 0 else list(ops)[::-1]:
                mod, fwd, step = ops[name]
                warm = 200.0 if r == 0 else 50.0
                times, host = bench.cuda_samples(fwd, 40, warmup_ms=warm)
                acc[name]["fwd"] += times
                acc[name]["fwd_host"] += host
                times, host = bench.cuda_samples(step, 20, warmup_ms=warm)
                acc[name]["fwd_bwd"] += times
                acc[name]["fwd_bwd_host"] += host
                stamps = bench.launch_samples(fwd, 40, module=mod)
                acc[name]["first_launch_us"] += [s[0] for s in stamps]
                acc[name]["second_launch_us"] += [s[1] for s in stamps if len(s) > 1]
        for name, samples in acc.items():
            row = {"T": T, "version": name, **{key: statistics.median(v) if v else None for key, v in samples.items()}}
            rows.append(row)
            print("# " + json.dumps(row), flush=True)
    with open(args.out, "w") as fh:
        json.dump({"header": bench.header(), "before": args.before, "rounds": args.rounds, "rows": rows}, fh, indent=1)
    print(f"\n{torch.cuda.get_device_name()} | host A/B, {args.rounds} alternating rounds, medians")
    print("| T | chunk.py | fwd ms | fwd host us | host us to first / second launch | fwd+bwd ms | fwd+bwd host us |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        second = "-" if r["second_launch_us"] is None else f"{r['second_launch_us']:.0f}"
        print(f"| {r['T']} | {r['version']} | {r['fwd']:.3f} | {r['fwd_host'] * 1e3:.0f} | "
              f"{r['first_launch_us']:.0f} / {second} | {r['fwd_bwd']:.3f} | {r['fwd_bwd_host'] * 1e3:.0f} |")


if __name__ == "__main__":
    main()
