"""The reverse scan's segment lengths timed alone: the hybrid op's forward and forward+backward under ``REV_SEG``
variants, interleaved (``bench``'s tune), at each T, with no peers and no table (a short device call).

    python experiments/seg_tune.py [--T 32768 8192] [--segs 32 64 128] [--rounds 3] [--reps 21] [--out FILE]

``--out`` writes {"tune": rows} as ``bench --tune --out`` does, for ``experiments/pick_segments.py``. Needs a CUDA
device (run it through the device tool).
"""

import argparse
import json

import torch

from linearize.kernels import bench


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, nargs="+", default=[32768, 8192])
    ap.add_argument("--segs", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=21)
    ap.add_argument("--out")
    args = ap.parse_args()
    names = []
    for s in args.segs:
        name = f"linear backward in the reverse scan, segments of {s}"  # (bench's names; those it lacks added)
        bench.TUNE.setdefault(name, {"REV_LIN": True, "REV_SEG": s})
        names.append(name)
    print(f"# {torch.cuda.get_device_name()}, {args.rounds} rounds", flush=True)
    rows = []
    for T in args.T:
        rows += bench._tune_interleaved(T, args.reps, names, args.rounds)
    print("| T | REV_SEG | fwd ms | fwd+bwd ms |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['T']} | {r['overrides']['REV_SEG']} | {bench.fmt(r.get('fwd_ms'))} | "
              f"{bench.fmt(r.get('fwd_bwd_ms'))} |")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"tune": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
