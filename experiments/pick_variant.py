"""Pick a TUNE variant from an interleaved tune (``bench --tune --out FILE``) and, with ``--apply``, write its
settings into ``kernels/hybrid_attention/chunk.py`` as the new defaults (meant for the device's copy of the tree, so
that the table and the GPU tier of the same call run at the pick).

    python experiments/pick_variant.py TUNE.json [--base default] [--slack 0.01] [--apply]

The pick: the variant with the fastest forward+backward at the longest T that beats ``--base`` there by more than
``--slack`` and is no slower than it (within ``--slack``) at every other T; else ``--base``. Prints the variant's name
last. ``--apply`` rewrites the module's ``NAME = value`` lines (a dict setting: the variant's entries over the
line's) and the ``LAUNCH`` entries the variant sets.
"""

import argparse
import ast
import json
import re
from pathlib import Path

from linearize.kernels import bench

CHUNK = Path(__file__).resolve().parents[1] / "kernels" / "hybrid_attention" / "chunk.py"


def pick(rows: list[dict], base: str, slack: float) -> str:
    ts = sorted({r["T"] for r in rows})
    at = {(r["T"], r["variant"]): r.get("fwd_bwd_ms") for r in rows}
    if at.get((ts[-1], base)) is None:
        raise SystemExit(f"no forward+backward time of {base!r} at T={ts[-1]} in the tune")
    longest = [r for r in rows if r["T"] == ts[-1] and r.get("fwd_bwd_ms") and r["variant"] != base]
    for r in sorted(longest, key=lambda r: r["fwd_bwd_ms"]):
        if r["fwd_bwd_ms"] >= at[(ts[-1], base)] * (1 - slack):
            break  # (sorted: no faster one follows)
        others = [(at.get((t, base)), at.get((t, r["variant"]))) for t in ts[:-1]]
        if all(b is not None and v is not None and v <= b * (1 + slack) for b, v in others):
            return r["variant"]
    return base


def apply(name: str, path: Path = CHUNK) -> list[str]:
    """Rewrite ``path``'s settings to those of TUNE[name]; returns the lines written."""
    text = path.read_text()
    done = []
    for key, value in bench.TUNE[name].items():
        if key == "LAUNCH":
            for kernel, setting in value.items():
                text, n = re.subn(rf'"{kernel}": \(\d+, \d+\)', f'"{kernel}": {tuple(setting)}', text, count=1)
                if n != 1:
                    raise SystemExit(f"LAUNCH[{kernel!r}] not found in {path}")
                done.append(f"LAUNCH[{kernel!r}] = {tuple(setting)}")
        else:
            line = re.search(rf"^{key}(?:: [^=]+)? = (.*)$", text, flags=re.M)
            if line is None:
                raise SystemExit(f"{key} not found in {path}")
            if isinstance(value, dict):  # (MAXNREG: the variant's entries over those of the file's line)
                value = {**ast.literal_eval(line.group(1)), **value}
            text = f"{text[:line.start()]}{key} = {value!r}{text[line.end():]}"
            done.append(f"{key} = {value!r}")
    path.write_text(text)
    return done


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("tune")
    ap.add_argument("--base", default="default")
    ap.add_argument("--slack", type=float, default=0.01)
    ap.add_argument("--apply", action="store_true")
    args = ap.parse_args()
    name = pick(json.load(open(args.tune))["tune"], args.base, args.slack)
    if args.apply and name != args.base:
        for line in apply(name):
            print(f"# set {line}")
    print(name)


if __name__ == "__main__":
    main()
