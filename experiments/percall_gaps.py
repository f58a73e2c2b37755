"""Where a lone call of the hybrid op loses time: the benchmark's per-call times at 32K exceed its queued ones by
~0.19 ms forward+backward but only ~0.06 ms forward (session 18, H100), more than the ~50 us to the first launch.

    python experiments/percall_gaps.py [--T 32768] [--reps 20] [--leads 0 0.1 1] [--trace] [--steps 5] [--probe]
                                       [--gc] [--json FILE]

1. Forward and forward+backward timed between CUDA events with a sleep kernel of ``lead`` ms queued before each start
   event (``bench.cuda_time_queued``; lead 0 is the per-call time): if the difference is all host latency before
   the first launch, a lead of ~0.1 ms hides it; a later bubble or a slower first kernel needs a longer lead.
2. Launch marks: an event recorded after each launch, median ms from the start event to each, lone and queued (1 ms
   lead): where in the call the lone one falls behind.
3. --trace: a torch.profiler trace of ``--steps`` lone calls (each from an idle queue): the idle intervals of the GPU
   inside a call (no kernel on any stream), and the last call's launches (host) against its kernels (GPU).
4. --probe: lone calls after different preludes (a host sleep, a tiny kernel, L2 clean or dirty, a forward);
   --gc: lone calls with Python's garbage collector on and off.

Session 19 (H100, 32K): lead sweep 4.050 / 3.951 / 3.976 / 3.908 / 3.869 / 3.828 / 3.829 ms forward+backward at 0 /
0.05 / 0.1 / 0.2 / 0.5 / 1 / 3 ms (kernels/percall_leads_h100_session19.log); the marks put the whole loss before the
first kernel ends (kernels/percall_marks_h100_session19.log). Session 20 (H100, 32K, --leads 0 --probe --gc,
kernels/percall_probe_h100_session20.*): no prelude and neither collector setting removed the loss (lone
forward+backward 3.889-4.205 ms against 3.902 after nothing: a spread as large as the loss).

Needs a CUDA device (run it through the device tool). Prints tables; --json writes them."""

import argparse
import json
import os
import statistics
import tempfile

import torch

from linearize.kernels import bench


def lead_sweep(step, reps: int, leads) -> dict:
    out = {}
    for lead in leads:
        if lead == 0:
            out[lead] = bench.cuda_time(step, reps)[0]
        else:
            out[lead] = bench.cuda_time_queued(step, reps, lead_ms=lead)
    return out


def trace_gaps(step, steps: int, min_gap_us: float = 3.0) -> list[dict]:
    """Idle GPU intervals inside each of ``steps`` lone calls, from a chrome trace of the profiler."""
    from torch.profiler import ProfilerActivity, profile, record_function

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(steps):
            with record_function(f"call {i}"):
                step()
            torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as fh:
            events = json.load(fh)["traceEvents"]
    kernels = sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    launches = {e["args"].get("correlation"): e for e in events if e.get("cat") in ("cuda_runtime", "cuda_driver")
                and "Launch" in e.get("name", "")}
    calls = sorted((e for e in events if e.get("cat") == "user_annotation" and e["name"].startswith("call ")),
                   key=lambda e: e["ts"])
    rows = []
    for c in calls:
        t0, t1 = c["ts"], c["ts"] + c["dur"]
        ks = [k for k in kernels if t0 <= k["ts"] <= t1 + 50_000]
        # a kernel belongs to this call if launched inside it
        ks = [k for k in ks if t0 <= launches.get(k["args"].get("correlation"), {"ts": -1})["ts"] <= t1]
        if not ks:
            continue
        busy_end = ks[0]["ts"] + ks[0]["dur"]
        first_launch = launches.get(ks[0]["args"].get("correlation"), {}).get("ts", t0)
        row = {"call": c["name"], "span_us": ks[-1]["ts"] + ks[-1]["dur"] - ks[0]["ts"],
               "host_to_first_kernel_us": ks[0]["ts"] - t0, "host_to_first_launch_us": first_launch - t0,
               "kernels": len(ks), "gaps": []}
        prev = ks[0]
        for k in ks[1:]:
            if k["ts"] - busy_end > min_gap_us:
                lk = launches.get(k["args"].get("correlation"), {})
                row["gaps"].append({"gap_us": k["ts"] - busy_end, "after": prev["name"][:60], "before": k["name"][:60],
                                    "start_after_launch_us": k["ts"] - lk["ts"] if lk else None})
            if k["ts"] + k["dur"] > busy_end:
                busy_end, prev = k["ts"] + k["dur"], k
        row["idle_us"] = sum(g["gap_us"] for g in row["gaps"])
        # the call's timeline: each kernel's launch (host) and start / end (GPU), us from the call's start
        row["timeline"] = [(k["name"][:40], k["args"].get("stream"),
                            launches.get(k["args"].get("correlation"), {}).get("ts", float("nan")) - t0,
                            k["ts"] - t0, k["ts"] + k["dur"] - t0) for k in ks]
        row["host_marks"] = [(e["name"][:60], e["ts"] - t0, e.get("dur", 0)) for e in events
                             if e.get("cat") in ("cpu_op", "user_annotation") and t0 <= e.get("ts", -1) <= t1
                             and any(w in e["name"] for w in ("Backward", "HybridAttention", "autograd::engine"))]
        rows.append(row)
    return rows


def _lone_calls(step, reps: int, before, after) -> None:
    """reps calls of step after 3 not kept, each between CUDA events from an idle GPU: synchronize, ``before()``
    (queued work to precede the start event, or host work), start event, step(), end event; ``after(start, end)``
    once the end event is done."""
    for i in range(reps + 3):
        torch.cuda.synchronize()
        before()
        s0, s1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s0.record()
        step()
        s1.record()
        s1.synchronize()
        if i >= 3:
            after(s0, s1)


def launch_marks(step, reps: int, lead_ms: float) -> list[tuple[str, float]]:
    """Median milliseconds from the start event to the end of each launch of one call (an event recorded on the
    launch's stream right after it), lead_ms of sleep queued before the start (0: a lone call). Launches are
    numbered by kernel name; the call's end is the last row."""
    from linearize.kernels.hybrid_attention import chunk

    real = chunk.PLANS.start
    marks: list = []
    samples: dict = {}

    def start(key, stream):
        inner = real(key, stream)

        def launch(fn, *args):
            out = inner(fn, *args)
            ev = torch.cuda.Event(enable_timing=True)
            ev.record(torch.cuda.current_stream())
            marks.append((getattr(fn, "__name__", None) or fn.fn.__name__, ev))
            return out

        launch.done = inner.done
        return launch

    def before():
        marks.clear()
        if lead_ms:
            bench._sleep_ms(lead_ms)

    def after(s0, s1):
        for j, (name, ev) in enumerate(marks + [("end", s1)]):
            samples.setdefault((j, name), []).append(s0.elapsed_time(ev))

    chunk.PLANS.start = start
    try:
        _lone_calls(step, reps, before, after)
    finally:
        chunk.PLANS.start = real
    return [(f"{j} {name}", statistics.median(v)) for (j, name), v in samples.items()]


def probes(step, fwd_nograd, reps: int) -> list[tuple[str, float]]:
    """Median ms of lone calls of step after different preludes, each finished before the start event: nothing; a
    1 ms host sleep (the GPU idle longer); a tiny kernel (the GPU just woke); reading a 256 MiB buffer (L2 holds clean
    lines of it, not the last call's dirty ones); writing it (L2 dirty); a forward without gradients (the previous op
    call was a forward)."""
    import time

    buf = torch.empty(64 * 2**20, device="cuda", dtype=torch.float32)
    small = torch.zeros(1, device="cuda")
    sink = torch.empty((), device="cuda")
    cases = [("nothing", lambda: None), ("host sleep 1 ms", lambda: time.sleep(1e-3)),
             ("tiny kernel", lambda: small.add_(1)), ("read 256 MiB", lambda: torch.sum(buf, dim=0, out=sink)),
             ("write 256 MiB", lambda: buf.fill_(1.0)), ("a forward without gradients", fwd_nograd)]
    rows = []
    for name, prelude in cases:
        times: list = []
        _lone_calls(step, reps, lambda prelude=prelude: (prelude(), torch.cuda.synchronize()),
                    lambda s0, s1, times=times: times.append(s0.elapsed_time(s1)))
        rows.append((name, statistics.median(times)))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=32768)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--leads", type=float, nargs="+", default=[0, 0.05, 0.1, 0.2, 0.5, 1.0, 3.0])
    ap.add_argument("--json")
    ap.add_argument("--trace", action="store_true", help="also the profiler's trace of lone calls")
    ap.add_argument("--gc", action="store_true", help="also lone calls with Python's garbage collector off")
    ap.add_argument("--probe", action="store_true", help="also lone calls after different preludes")
    args = ap.parse_args()
    fwd, step = bench.ours(args.T)

    def fwd_nograd():
        with torch.no_grad():
            fwd()

    result = {"device": torch.cuda.get_device_name(), "T": args.T}
    print(f"# {result['device']}, T={args.T}")
    result["lead_fwd_bwd"] = lead_sweep(step, args.reps, args.leads)
    result["lead_fwd"] = lead_sweep(fwd_nograd, args.reps, args.leads)
    print("| lead ms | fwd ms | fwd+bwd ms |\n|---|---|---|")
    for lead in args.leads:
        print(f"| {lead} | {result['lead_fwd'][lead]:.3f} | {result['lead_fwd_bwd'][lead]:.3f} |")
    if args.probe:
        rows = probes(step, fwd_nograd, args.reps) + [(f"(forward only) {n}", t)
                                                      for n, t in probes(fwd_nograd, fwd_nograd, args.reps)]
        result["probes"] = rows
        print("\n| lone forward+backward after | ms |\n|---|---|")
        for name, t in rows:
            print(f"| {name} | {t:.3f} |")
    if args.gc:  # lone calls with Python's garbage collector on (the default) and off
        import gc

        rows = []
        for name, fn in (("fwd", fwd_nograd), ("fwd+bwd", step)):
            on = bench.cuda_time(fn, args.reps)[0]
            gc.collect()
            gc.disable()
            try:
                off = bench.cuda_time(fn, args.reps)[0]
            finally:
                gc.enable()
            rows.append((name, on, off))
        result["gc"] = rows
        print("\n| lone call | gc on, ms | gc off, ms |\n|---|---|---|")
        for name, on, off in rows:
            print(f"| {name} | {on:.3f} | {off:.3f} |")
    lone, queued = launch_marks(step, args.reps, 0.0), launch_marks(step, args.reps, 1.0)
    result["launch_marks"] = {"lone": lone, "queued": queued}
    print("\n| launch | lone call: ms to its end | queued (1 ms lead) | difference |\n|---|---|---|---|")
    for (name, a), (_, b) in zip(lone, queued):
        print(f"| {name} | {a:.3f} | {b:.3f} | {a - b:+.3f} |")
    for name, fn in (("fwd+bwd", step), ("fwd", fwd_nograd)):
        if not args.trace:
            break
        rows = trace_gaps(fn, args.steps)
        result[f"gaps_{name}"] = rows
        print(f"\n## {name}: idle GPU inside lone calls (profiler on)")
        for r in rows:
            print(f"{r['call']}: span {r['span_us']:.0f} us, {r['kernels']} kernels, first launch at "
                  f"{r['host_to_first_launch_us']:.0f} us, first kernel at {r['host_to_first_kernel_us']:.0f} us, "
                  f"idle inside {r['idle_us']:.0f} us")
            if r is rows[-1]:
                for name, at, dur in r["host_marks"]:
                    print(f"    host: {name:60s} at {at:7.1f} for {dur:7.1f}")
                for name, stream, launched, start, end in r["timeline"]:
                    print(f"    {name:40s} stream {stream}: launched {launched:7.1f}, ran {start:7.1f} - {end:7.1f}")
            for g in r["gaps"]:
                print(f"    {g['gap_us']:7.1f} us idle: after {g['after']} / before {g['before']} "
                      f"(started {g['start_after_launch_us']} us after its launch)")
        if rows:
            print(f"median idle inside: {statistics.median(r['idle_us'] for r in rows):.0f} us")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1, default=str)


if __name__ == "__main__":
    main()
