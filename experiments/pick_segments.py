"""The reverse scan's segment length from a tune of ``REV_SEG`` variants (``bench --tune --out FILE``): the fastest
forward+backward at the longest T, unless it is more than ``--slack`` slower than the default at a shorter T.

    python experiments/pick_segments.py TUNE.json [--slack 0.02]

Prints the chosen length (``chunk.REV_SEG`` when no variant wins); the baseline at the shorter T is the "default"
variant, or (``experiments/seg_tune.py``) the variant at ``chunk.REV_SEG``. Written in session 19 to set
``chunk.REV_SEG`` on the device between a tune and the table (``experiments/seg_table.sh``); session 20 ran it on an
H100 and kept 64 (kernels/seg_tune_h100_session20.*).
"""

import argparse
import json

from linearize.kernels.hybrid_attention import chunk


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("tune")
    ap.add_argument("--slack", type=float, default=0.02)
    args = ap.parse_args()
    rows = json.load(open(args.tune))["tune"]
    seg = {}  # variant -> REV_SEG it sets (the default: the module's)
    for r in rows:
        s = r["overrides"].get("REV_SEG")
        if set(r["overrides"]) <= {"REV_LIN", "REV_SEG"}:  # (variants that change nothing else)
            seg[r["variant"]] = int(s) if s is not None else (chunk.REV_SEG if r["variant"] == "default" else None)
    # the baseline: the "default" variant, else the one at the module's segment length (experiments/seg_tune.py)
    base = "default" if any(r["variant"] == "default" for r in rows) else next(
        (v for v, s in seg.items() if s == chunk.REV_SEG), None)
    ts = sorted({r["T"] for r in rows})
    at = {(r["T"], r["variant"]): r.get("fwd_bwd_ms") for r in rows}
    longest = [r for r in rows if r["T"] == ts[-1] and seg.get(r["variant"]) is not None and r.get("fwd_bwd_ms")]
    for r in sorted(longest, key=lambda r: r["fwd_bwd_ms"]):
        pairs = [(at.get((t, base)), at.get((t, r["variant"]))) for t in ts[:-1]]
        if all(b is None or v is None or v <= b * (1 + args.slack) for b, v in pairs):
            print(seg[r["variant"]])
            return
    print(chunk.REV_SEG)


if __name__ == "__main__":
    main()
