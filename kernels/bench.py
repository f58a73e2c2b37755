"""Benchmark of the fused hybrid attention op against its peers, at Mistral-7B attention shapes.

    python -m linearize.kernels.bench [--T 2048 8192 32768] [--out kernels/bench_results.json]

B=1 (--B N for another batch), 32 query heads (--H), 8 kv heads (--Hkv), d=128, 128 features, w=64, bf16
(DESIGN.md section 8).
Prints a machine header, checks the Triton op against the naive reference first (forward and every gradient, at
--check-T), then times forward and forward+backward with CUDA events (median of --reps after warm-up) for:
  hybrid (ours)   linearize.kernels.hybrid_attention.chunk, LoLCATs hybrid (sliding-window softmax + linear)
  sdpa            torch scaled_dot_product_attention, full causal (GQA)
  flex_swa        torch flex_attention with a sliding-window block mask, compiled
  fla_chunk_la    flash-linear-attention chunk_linear_attn on the 128 features (skipped if fla is absent)
  naive           the quadratic reference, where it fits in memory
Peak GiB is the peak of memory allocated during one forward+backward beyond what the inputs already held; host ms
is the time the call takes to return on the CPU (when it is close to the CUDA time, launching is the bottleneck).
With --queued every op is timed a second way, with a sleep kernel queued before each call's start event so that the
host's work before its first launch overlaps it (as inside a model, whose earlier layers keep the queue full), and our
op's host time to its first launch is recorded; the table of those prints after the main one. Then the peers beside
DESIGN.md's anchors (``ANCHORS``; which timing reads nearer each) and the targets of DESIGN.md section 8 judged on
this run, per call and queued (the JSON's "anchors" and "targets").

    python -m linearize.kernels.bench --T 8192 32768 --tune --profile --out $OUT/bench_tune.json

--tune also times the hybrid op under variants of its launch settings (block sizes, warps, stages: ``TUNE``;
the JSON's "tune" rows; --rounds N interleaves the variants in N rounds, so that drift reaches them alike); --profile records the CUDA time of each kernel of one forward+backward ("profile").
The settings the timed op ran with are in the JSON's "kernel_config".

    python -m linearize.kernels.bench --T 32768 --state-probe 32768 --host-breakdown 2048

--state-probe times the state pass alone under ``STATE_VARIANTS`` (tiles, warps, segments, without its stores);
--host-breakdown splits the host time of one forward+backward into its launches, the floor of an autograd op and
the rest, and times one launch by path (Triton's, the bare launcher); --host-profile is cProfile of the same.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import math
import platform
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

B, H, HKV, D, FEAT, WINDOW = 1, 32, 8, 128, 128, 64


def header() -> dict:
    import triton

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(),
        "sm_count": torch.cuda.get_device_properties(0).multi_processor_count,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "python": platform.python_version(),
    }
    try:
        import fla

        info["fla"] = getattr(fla, "__version__", "unknown")
    except ImportError:
        info["fla"] = None
    return info


def make_inputs(T: int, dtype=torch.bfloat16, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, T, H, D, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(B, T, HKV, D, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(B, T, HKV, D, device="cuda", dtype=dtype, generator=g)
    # Hedgehog-like features: positive, each row sums to 1 (softmax over the features)
    qf = torch.randn(B, T, H, FEAT, device="cuda", generator=g).softmax(-1).to(dtype)
    kf = torch.randn(B, T, H, FEAT, device="cuda", generator=g).softmax(-1).to(dtype)
    gamma = torch.sigmoid(torch.randn(H, device="cuda", generator=g))
    do = torch.randn(B, T, H, D, device="cuda", dtype=dtype, generator=g)
    return q, k, v, qf, kf, gamma, do


def cuda_samples(fn, reps: int, warmup: int = 3, warmup_ms: float = 200.0) -> tuple[list, list]:
    """Median milliseconds of fn() over reps, timed with CUDA events after warm-up (at least ``warmup`` calls and
    ``warmup_ms`` of wall time; with 3 calls alone the table's row of the hybrid op at 32K read 5-9% slower than its
    tune row later in the same run, in three runs of session 8), and the median host time of the call (from an
    idle GPU queue to fn() returning): host >= CUDA time means the op is bound by launching, not by the GPU."""
    t_end = time.perf_counter() + warmup_ms / 1e3
    done = 0
    while done < warmup or time.perf_counter() < t_end:
        fn()
        done += 1
        if done % 8 == 0:
            torch.cuda.synchronize()  # (the wall clock then counts GPU time, not only the queue)
    torch.cuda.synchronize()
    times, host = [], []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        fn()
        host.append((time.perf_counter() - t0) * 1e3)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times, host


def cuda_time(fn, reps: int, **warm) -> tuple[float, float]:
    """``cuda_samples``' medians."""
    times, host = cuda_samples(fn, reps, **warm)
    return statistics.median(times), statistics.median(host)


_SLEEP_CYCLES_PER_MS: list[float] = []


def _sleep_ms(ms: float) -> None:
    """Queue a kernel that keeps the GPU busy for about ``ms`` (``torch.cuda._sleep``, calibrated once)."""
    if not _SLEEP_CYCLES_PER_MS:
        torch.cuda._sleep(1_000_000)  # (loads the kernel)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(10_000_000)
        end.record()
        end.synchronize()
        _SLEEP_CYCLES_PER_MS.append(10_000_000 / start.elapsed_time(end))
    torch.cuda._sleep(int(ms * _SLEEP_CYCLES_PER_MS[0]))


def cuda_time_queued(fn, reps: int, lead_ms: float = 3.0) -> float:
    """Median milliseconds of fn() between CUDA events with the GPU kept busy by a ``lead_ms`` sleep kernel queued
    before the start event: the host's work before fn()'s first launch (Python, allocations, the autograd call) then
    overlaps the sleep instead of showing as idle GPU time inside the measurement, as it does in a model whose earlier
    layers keep the queue full. ``cuda_samples`` minus this is the host latency a lone call exposes. (lead_ms must
    exceed that latency; the op's later launches must also keep ahead of the GPU, as the host column shows.)"""
    cuda_samples(fn, 3, warmup_ms=0.0)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        _sleep_ms(lead_ms)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


@contextlib.contextmanager
def stamped_launches(on_launch, module=None, on_start=None, fake: bool = False):
    """Inside the block every launch the op makes through ``module.PLANS`` (default: ours) calls ``on_launch()`` just
    before it, and ``on_start()`` runs as each call's ``PLANS.start`` returns. fake: the launches are skipped (nothing
    runs on the GPU; the op's outputs are unwritten buffers), for timing the host path alone."""
    if module is None:
        from .hybrid_attention import chunk as module

    real = module.PLANS.start

    def start(key, stream):
        inner = real(key, stream)
        if on_start is not None:
            on_start()

        def launch(*args):
            on_launch()
            if not fake:
                return inner(*args)

        launch.done = (lambda: None) if fake else inner.done
        return launch

    module.PLANS.start = start
    try:
        yield
    finally:
        module.PLANS.start = real


def launch_samples(fn, reps: int, module=None) -> list[list[float]]:
    """Host microseconds from calling fn() (the hybrid op, forward or forward+backward) to each of its kernel
    launches, one list a call, each call from an idle queue: Python, input checks, the plan key and the allocations
    before the first launch (the state pass or the output kernel), then the work up to each later one (the forward's
    second launch is its output kernel, which the GPU waits for if the host reaches it after the state pass ends).
    module: the chunk module whose ``PLANS`` fn launches through (default: ours; experiments/host_ab.py passes an
    earlier version)."""
    stamps: list[float] = []

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    got = []
    try:
        with stamped_launches(lambda: stamps.append(time.perf_counter()), module):
            for _ in range(reps):
                sync()  # (an idle queue, as for cuda_samples' host time)
                stamps.clear()
                t0 = time.perf_counter()
                fn()
                if not stamps:
                    raise RuntimeError("fn() launched no kernel through chunk.PLANS")
                got.append([(t - t0) * 1e6 for t in stamps])
    finally:
        sync()
    return got


def launch_us(fn, reps: int = 50) -> tuple[float, float | None]:
    """Medians over reps calls (after 3 not kept) of the host microseconds to fn()'s first and second launches (None
    for the second where a call launches once)."""
    got = launch_samples(fn, reps + 3)[3:]
    second = [s[1] for s in got if len(s) > 1]
    return statistics.median(s[0] for s in got), statistics.median(second) if len(second) == len(got) else None


def first_launch_us(fn, reps: int = 50) -> float:
    """The first of ``launch_us``: the median host microseconds to fn()'s first launch."""
    return launch_us(fn, reps)[0]


def peak_gib(fn) -> float:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def fwd_bwd(fwd, leaves, do):
    def step():
        out = fwd()
        torch.autograd.grad(out, leaves, do, allow_unused=True)  # (q, k: no gradient without softmax terms)

    return step


# ------------------------------------------------------------------------------------------------------------
# the contenders: each returns (forward closure, forward+backward closure) over fresh inputs of length T


def ours(T, softmax: bool = True, linear: str = "outside"):
    """The hybrid op (the table's and the tune's mode by default; experiments time the others)."""
    from .hybrid_attention.chunk import hybrid_attention_chunk

    q, k, v, qf, kf, gamma, do = make_inputs(T)
    leaves = [x.requires_grad_() for x in (q, k, v, qf, kf, gamma)]

    def fwd():
        return hybrid_attention_chunk(q, k, v, qf, kf, gamma, window=WINDOW, softmax=softmax, linear=linear)

    return fwd, fwd_bwd(fwd, leaves, do)


def naive(T):
    from .hybrid_attention.naive import hybrid_attention_naive

    q, k, v, qf, kf, gamma, do = make_inputs(T)
    leaves = [x.requires_grad_() for x in (q, k, v, qf, kf, gamma)]

    def fwd():
        return hybrid_attention_naive(q, k, v, qf, kf, gamma, window=WINDOW, softmax=True, linear="outside")

    return fwd, fwd_bwd(fwd, leaves, do)


def _bhtd(T):
    q, k, v, _, _, _, do = make_inputs(T)
    return [x.transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v)], do.transpose(1, 2).contiguous()


def sdpa(T):
    (q, k, v), do = _bhtd(T)

    def fwd():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    return fwd, fwd_bwd(fwd, [q, k, v], do)


def flex_swa(T):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    (q, k, v), do = _bhtd(T)

    def sliding_window_causal(b, h, qi, kv):
        return (qi >= kv) & (qi - kv < WINDOW)

    mask = create_block_mask(sliding_window_causal, B=None, H=None, Q_LEN=T, KV_LEN=T, device="cuda")
    flex = torch.compile(flex_attention, dynamic=False)

    def fwd():
        return flex(q, k, v, block_mask=mask, enable_gqa=True)

    return fwd, fwd_bwd(fwd, [q, k, v], do)


def fla_chunk_la(T):
    from fla.ops.linear_attn import chunk_linear_attn

    _, _, v, qf, kf, _, do = make_inputs(T)
    v = v.repeat_interleave(H // HKV, dim=2).contiguous()  # fla has no GQA: one value head per feature head
    leaves = [x.requires_grad_() for x in (qf, kf, v)]

    def fwd():
        return chunk_linear_attn(qf, kf, v, scale=1.0, normalize=True)[0]

    return fwd, fwd_bwd(fwd, leaves, do)


PEERS = {"sdpa": sdpa, "flex_swa": flex_swa, "fla_chunk_la": fla_chunk_la}

# variants of the hybrid op's launch settings for --tune: name -> overrides of chunk's module attributes
# (LAUNCH entries are (num_warps, num_stages) per kernel)
TUNE = {
    "default": {},
    "launch plans off": {"LAUNCH_PLANS": False},
    # (KEEP_STATES is on by default since the tenth pass; the variants before it read "keep states")
    "states recomputed": {"KEEP_STATES": False},
    "states recomputed, one stream": {"KEEP_STATES": False, "SIDE_STREAM": False},
    "one stream": {"SIDE_STREAM": False},
    "side stream from 8K": {"SIDE_STREAM_MIN_CHUNKS": 128},
    "softmax weights recomputed on the key side": {"SAVE_P": False},
    "local dW recomputed": {"SAVE_DW": False},
    # (WINDOW_BLOCKS is on by default since the eleventh pass; the variants before it read "window blocks")
    "block pairs": {"WINDOW_BLOCKS": False},
    "block pairs, reverse states per 2 chunks": {"WINDOW_BLOCKS": False, "REV_STATE_STRIDE": 2},
    "forward blocks": {"FWD_P": True, "FWD_LIN": True},
    "forward blocks, one stream": {"FWD_P": True, "FWD_LIN": True, "SIDE_STREAM": False},
    "forward p0 blocks": {"FWD_P": True},
    "forward linear blocks": {"FWD_LIN": True},
    "no forward blocks": {"FWD_P": False, "FWD_LIN": False},
    "key side in two launches": {"KV_SPLIT": True},
    "side stream from 16K": {"SIDE_STREAM_MIN_CHUNKS": 256},
    "side states 128x128, 8 warps": {"SIDE_STATE_BLOCKS": (128, 128)},
    "side states as the forward's": {"SIDE_STATE_BLOCKS": None},
    "side states 64x128, 4 warps": {"SIDE_STATE_BLOCKS": (64, 128), "LAUNCH": {"side_state": (4, 3)}},
    "side states 128x128, 8 warps, 2 stages": {"SIDE_STATE_BLOCKS": (128, 128), "LAUNCH": {"side_state": (8, 2)}},
    "dk_feat on the side stream": {"SIDE_KF": True},
    "dk_feat in the key side": {"KF_IN_KV": True},
    "fused forward": {"FUSED_FWD": True},
    "fused forward, states recomputed": {"FUSED_FWD": True, "KEEP_STATES": False},
    "dk_feat in the key side, 8 warps": {"KF_IN_KV": True, "LAUNCH": {"bwd_kv": (8, 1)}},
    "dk_feat on the side stream from 8K": {"SIDE_KF": True, "SIDE_STREAM_MIN_CHUNKS": 128},
    "states recomputed, dk_feat on the side stream": {"KEEP_STATES": False, "SIDE_KF": True},
    "a state per chunk": {"STATE_STRIDE": 1},
    "a state per 4 chunks": {"STATE_STRIDE": 4},
    "reverse states per 2 chunks": {"REV_STATE_STRIDE": 2},
    "reverse states per 2 chunks, one stream": {"REV_STATE_STRIDE": 2, "SIDE_STREAM": False},
    "dk_feat and linear dv per kv head": {"KF_DV": True},
    "dk_feat and linear dv per kv head, 8 warps": {"KF_DV": True, "LAUNCH": {"bwd_kfdv": (8, 1)}},
    "dk_feat and linear dv per kv head, one stream": {"KF_DV": True, "SIDE_STREAM": False},
    "dk_feat and linear dv per kv head, reverse states per 2 chunks": {"KF_DV": True, "REV_STATE_STRIDE": 2},
    "heads of a kv group apart": {"GROUP_HEADS": False},
    "bwd_kv 2 stages": {"LAUNCH": {"bwd_kv": (4, 2)}},
    "bwd_q 2 stages": {"LAUNCH": {"bwd_q": (4, 2)}},
    "bwd_kf 2 stages": {"LAUNCH": {"bwd_kf": (4, 2)}},
    "fwd 1 stage": {"LAUNCH": {"fwd": (4, 1)}},
    "bwd_kv 8 warps": {"LAUNCH": {"bwd_kv": (8, 1)}},
    "fwd 3 stages": {"LAUNCH": {"fwd": (4, 3)}},
    "state 4 stages": {"LAUNCH": {"state": (4, 4)}},
    "state z by column sums": {"STATE_Z_DOT": False},
    "bwd_kf 8 warps": {"LAUNCH": {"bwd_kf": (8, 1)}},
    "query side in one launch": {"Q_SPLIT": False},
    "state 32x64": {"STATE_BF": 32},
    "state 64x32": {"STATE_BV": 32},
    "state 32x32": {"STATE_BF": 32, "STATE_BV": 32},
    "state 32x32 2 warps": {"STATE_BF": 32, "STATE_BV": 32, "LAUNCH": {"state": (2, 3)}},
    # register caps (chunk.MAXNREG): 3 programs of 4 warps an SM instead of 2 where a kernel uses more than 168
    # (the query side's cap is a default since session 16)
    "no register caps": {"MAXNREG": {"bwd_q": None}},
    "bwd_q at most 168 registers": {"MAXNREG": {"bwd_q": 168}},
    "state passes at most 168 registers": {"MAXNREG": {"state": 168}},
    "bwd_kv at most 168 registers": {"MAXNREG": {"bwd_kv": 168}},
    "fwd at most 168 registers": {"MAXNREG": {"fwd": 168}},
    "bwd_q and state passes at most 168 registers": {"MAXNREG": {"bwd_q": 168, "state": 168}},
    "bwd_q at most 168 registers, one stream": {"MAXNREG": {"bwd_q": 168}, "SIDE_STREAM": False},
    "reverse pass on do": {"REV_DO": True},
    "reverse pass on do, one stream": {"REV_DO": True, "SIDE_STREAM": False},
    "reverse pass on do, at most 168 registers": {"REV_DO": True, "MAXNREG": {"state": 168}},
    # (REV_LIN is on by default since session 16; the variants before it read "linear backward in the reverse scan")
    "reverse states in memory": {"REV_LIN": False},
    "linear backward in the reverse scan": {"REV_LIN": True},
    "linear backward in the reverse scan, segments of 16": {"REV_LIN": True, "REV_SEG": 16},
    "linear backward in the reverse scan, segments of 32": {"REV_LIN": True, "REV_SEG": 32},
    "linear backward in the reverse scan, segments of 64": {"REV_LIN": True, "REV_SEG": 64},
    "linear backward in the reverse scan, segments of 128": {"REV_LIN": True, "REV_SEG": 128},
    "linear backward in the reverse scan, segments of 256": {"REV_LIN": True, "REV_SEG": 256},
    "linear backward in the reverse scan, one stream": {"REV_LIN": True, "SIDE_STREAM": False},
    "linear backward in the reverse scan, 1 stage": {"REV_LIN": True, "LAUNCH": {"bwd_rev": (4, 1)}},
    "linear backward in the reverse scan, 8 warps": {"REV_LIN": True, "LAUNCH": {"bwd_rev": (8, 2)}},
    "linear backward in the reverse scan, unsplit, 8 warps": {"REV_LIN": True, "REV_SPLIT": 1,
                                                              "LAUNCH": {"bwd_rev": (8, 2)}},
    "linear backward in the reverse scan, bwd_q at most 168 registers": {"REV_LIN": True, "MAXNREG": {"bwd_q": 168}},
    "bwd_q and bwd_kv at most 168 registers": {"MAXNREG": {"bwd_q": 168, "bwd_kv": 168}},
    # the reverse scan (_bwd_rev_kernel) and its segment starts, session 17 (REV_PREFIX is off by default)
    "reverse scan from sums of totals": {"REV_PREFIX": False},
    "reverse scan from prefixes": {"REV_PREFIX": True},
    "reverse scan from prefixes, segments of 16": {"REV_PREFIX": True, "REV_SEG": 16},
    "reverse scan from prefixes, segments of 64": {"REV_PREFIX": True, "REV_SEG": 64},
    "reverse scan from prefixes, segments of 24": {"REV_PREFIX": True, "REV_SEG": 24},
    "reverse scan, 3 stages": {"LAUNCH": {"bwd_rev": (4, 3)}},
    "reverse scan in 4 + 4 parts": {"REV_SPLIT": 4},
    "reverse scan in 4 + 4 parts, at most 168 registers": {"REV_SPLIT": 4, "MAXNREG": {"bwd_rev": 168}},
    "reverse scan in 4 + 4 parts, 1 stage, at most 168 registers": {"REV_SPLIT": 4, "MAXNREG": {"bwd_rev": 168},
                                                                   "LAUNCH": {"bwd_rev": (4, 1)}},
    "reverse scan in 1 + 1 parts, 8 warps, 1 stage": {"REV_SPLIT": 1, "LAUNCH": {"bwd_rev": (8, 1)}},
    # session 18
    "reverse scan, z by column sums": {"REV_ZDOT": False},
    "reverse scan, z by dots": {"REV_ZDOT": True},
    "reverse scan, z by one bf16 dot": {"REV_ZDOT": True, "REV_ZDOT_BF16_ONE": True},
    "reverse scan, z by one bf16 dot, segments of 64": {"REV_ZDOT": True, "REV_ZDOT_BF16_ONE": True, "REV_SEG": 64},
    "reverse scan, z by one bf16 dot, segments of 128": {"REV_ZDOT": True, "REV_ZDOT_BF16_ONE": True, "REV_SEG": 128},
    # session 20: the reverse scan's totals in the delta pass (DELTA_TOTALS), its launch and its parts
    "totals in the delta pass": {"DELTA_TOTALS": True},
    "totals in the delta pass, separate": {"DELTA_TOTALS": False},
    "totals in the delta pass, 1 stage": {"DELTA_TOTALS": True, "LAUNCH": {"delta_totals": (8, 1)}},
    "totals in the delta pass, 3 stages": {"DELTA_TOTALS": True, "LAUNCH": {"delta_totals": (8, 3)}},
    "totals in the delta pass, 256 programs": {"DELTA_TOTALS": True, "DELTA_TOTALS_PROGRAMS": 256},
    "totals in the delta pass, 1024 programs": {"DELTA_TOTALS": True, "DELTA_TOTALS_PROGRAMS": 1024},
    "totals in the delta pass, 2048 programs": {"DELTA_TOTALS": True, "DELTA_TOTALS_PROGRAMS": 2048},
    # (KV_SPLIT's dk launch now goes first, beside the side stream's reverse scan)
    "key side in two launches, dk beside the reverse scan": {"KV_SPLIT": True},
    "key side in two launches, dk beside the reverse scan, totals in the delta pass, 256 programs": {
        "KV_SPLIT": True, "DELTA_TOTALS": True, "DELTA_TOTALS_PROGRAMS": 256},
    # session 22: the forward's state pass (128 programs at 32K, batch 1: one an SM; 32 KB of tiles a stage) with more
    # loads in flight (5 stages is the default since then)
    "state 3 stages": {"LAUNCH": {"state": (4, 3)}},
    "state 5 stages": {"LAUNCH": {"state": (4, 5)}},
    "state 6 stages": {"LAUNCH": {"state": (4, 6)}},
    # session 23: the same pass where its programs outnumber the SMs (batch > 1): 5 stages fit one an SM, 3 fit two
    "state 3 stages when wide": {"LAUNCH": {"state_wide": (4, 3)}},
    "state 5 stages when wide": {"LAUNCH": {"state_wide": (4, 5)}},
    # the backward's totals pass on the side stream (32 programs at 32K, batch 1; 128 x 128 tiles of one chunk a
    # step, 32 KB a stage) with more loads in flight
    "side states 4 stages": {"LAUNCH": {"side_state": (8, 4)}},
    "side states 5 stages": {"LAUNCH": {"side_state": (8, 5)}},
    # session 24: warp counts not timed before (all slower on an H100, kernels/bench_tune_h100_session24_*). ptxas
    # (spills tool): the forward at 8 warps 251 registers and no spills (4 warps: 255, 8 B), one program an SM against
    # two; the query side at 8 warps spills 24 B a thread in its softmax launch (4: 92 B) at 168 registers, one
    # program an SM against three; delta at 8 warps 60 registers
    "fwd 8 warps": {"LAUNCH": {"fwd": (8, 2)}},
    "bwd_q 8 warps": {"LAUNCH": {"bwd_q": (8, 1)}},
    "delta 8 warps": {"LAUNCH": {"delta": (8, 1)}},
    "delta 2 stages": {"LAUNCH": {"delta": (4, 2)}},
    "state 8 warps": {"LAUNCH": {"state": (8, 5)}},
    "reverse scan at most 168 registers": {"MAXNREG": {"bwd_rev": 168}},
    # session 25: delta from the query side's first launch, the delta kernel (or the totals' pass) on the side stream
    # ahead of the reverse scan (DELTA_Q): neither stream waits for the delta kernel before it forks. Slower on an
    # H100 at 32K (kernels/bench_tune_h100_session25_delta_q*); "delta 8 warps" beside it was not timed
    "delta in the query side": {"DELTA_Q": True},
    "delta in the query side, totals in the delta pass": {"DELTA_Q": True, "DELTA_TOTALS": True},
    "delta in the query side, totals in the delta pass, 256 programs": {
        "DELTA_Q": True, "DELTA_TOTALS": True, "DELTA_TOTALS_PROGRAMS": 256},
    "delta in the query side, delta 8 warps": {"DELTA_Q": True, "LAUNCH": {"delta": (8, 1)}},
    # session 26: dA written on the side stream, by the totals' pass from delta (SIDE_DA): the delta kernel before the
    # fork writes no dA
    "dA on the side stream": {"SIDE_DA": True},
    "dA on the side stream, 256 programs": {"SIDE_DA": True, "DELTA_TOTALS_PROGRAMS": 256},
    "dA on the side stream, 1024 programs": {"SIDE_DA": True, "DELTA_TOTALS_PROGRAMS": 1024},
    "dA on the side stream, 4 warps": {"SIDE_DA": True, "LAUNCH": {"delta_totals": (4, 2)}},
    # session 26: the key side's dv pass on the side stream after the reverse scan (SIDE_DV), where --stream-probe
    # showed that stream idle for the last ~0.5-0.7 ms of the backward. No faster on an H100 at 32K, and dA on the
    # side stream slower (kernels/bench_tune_h100_session26_side_dv*)
    "dv on the side stream": {"SIDE_DV": True},
    "dv and dA on the side stream": {"SIDE_DV": True, "SIDE_DA": True},
    "dv on the op's stream": {"SIDE_DV": False},
    # session 26: the reverse scan and its totals read do and divide by Zd themselves (REV_SCALE_DO): no dA written.
    # 0.25 ms slower on an H100 at 32K (kernels/bench_tune_h100_session26_rev_scale_do.*); session 27: for the division
    # on the scan's chain, not its spills (without them, REV_ST, the kernel 1.194 against 0.790 ms)
    "reverse scan on do": {"REV_SCALE_DO": True},
    # session 27: the dk_feat parts' state transposed (REV_ST), so that dividing phi(q)'s rows by Zd fits in the
    # registers (ptxas: 255 and no spills under REV_SCALE_DO, 36 B without REV_ST); alone, 239 as the default
    "reverse scan on do, state transposed": {"REV_SCALE_DO": True, "REV_ST": True},
    "reverse scan state transposed": {"REV_ST": True},
    # session 27: the side stream above the op's in priority (SIDE_PRIORITY): the reverse scan's programs placed first.
    # On by default since session 27 (kernels/bench_tune_h100_session27_priority*)
    "side stream high priority": {"SIDE_PRIORITY": -1},
    "side stream at the default streams' priority": {"SIDE_PRIORITY": 0},
    "side stream high priority, dv on the side stream": {"SIDE_PRIORITY": -1, "SIDE_DV": True},
    "side stream high priority, delta in the query side": {"SIDE_PRIORITY": -1, "DELTA_Q": True},
    "side stream high priority, dA on the side stream": {"SIDE_PRIORITY": -1, "SIDE_DA": True},
    "side stream high priority, dv and dA on the side stream": {"SIDE_PRIORITY": -1, "SIDE_DV": True, "SIDE_DA": True},
    # session 27: the query side's linear launch on the side stream after the reverse scan (SIDE_QLIN)
    "query side's linear launch on the side stream": {"SIDE_QLIN": True},
    "side stream high priority, query side's linear launch on it": {"SIDE_PRIORITY": -1, "SIDE_QLIN": True},
    # session 27: the reverse scan in segments of 128 from 32K, of 64 below (REV_SEG_LONG; the default in session 29)
    "reverse scan in segments of 128 from 32K": {"REV_SEG_LONG": (512, 128)},
    # session 29: two segments a head at 32K (256 programs of 256 steps against 512 of 128)
    "reverse scan in segments of 256 from 32K": {"REV_SEG_LONG": (512, 256)},
    # one segment a head at 32K (128 programs of 512 steps; no carried totals; the default since session 30)
    "reverse scan in segments of 512 from 32K": {"REV_SEG_LONG": (512, 512)},
    # session 30: REV_SEG_LONG's length whatever the number of heads (one segment a head at 32K; with --H 8 --Hkv 2,
    # 32 programs of 512 steps against the floor's 128 of 128; H100: 2.091 against 1.507 ms forward+backward)
    "no floor on the reverse scan's segments": {"REV_MIN_SEGMENTS": 0},
}
# variants of the state pass alone for --state-probe: name -> (STATE_BF, STATE_BV, num_warps, num_stages, STATE_SEG,
# stores); stores=False runs the pass without writing the per-chunk states (its segment-total mode over one segment:
# the same loads and dots, one store at the end), which bounds what the stores cost
STATE_VARIANTS = {
    "64x64 w4 s3 (default)": (64, 64, 4, 3, 0, True),
    "64x64 no stores": (64, 64, 4, 3, 0, False),
    "64x32 w4": (64, 32, 4, 3, 0, True),
    "64x64 seg 32": (64, 64, 4, 3, 32, True),
}
# tried on an H200 at 32K and slower than the default in both directions (kernels/bench_tune_h200_launch_states.json):
# 32x64, 32x32 at 1 / 2 / 4 warps, 16x64, 32x128, 32x32 in segments of 64
KNOBS = ("BT", "STATE_BF", "STATE_BV", "STATE_SEG", "STATE_STRIDE", "REV_STATE_STRIDE", "GROUP_HEADS", "STATE_Z_DOT",
         "OUT_BV", "KEEP_STATES", "Q_SPLIT", "KV_SPLIT", "SAVE_P", "SAVE_DW", "WINDOW_BLOCKS", "FWD_P", "FWD_LIN",
         "KF_IN_KV", "FUSED_FWD",
         "SIDE_STREAM", "SIDE_STREAM_MIN_CHUNKS", "SIDE_KF", "SIDE_STATE_BLOCKS",
         "LAUNCH_PLANS", "LAUNCH_FP32", "MAXNREG", "REV_DO", "REV_LIN", "REV_SEG", "REV_SPLIT",
         "REV_PREFIX", "REV_ZDOT", "REV_ZDOT_MIN_COLS", "REV_ZDOT_BF16_ONE", "DELTA_TOTALS", "DELTA_TOTALS_PROGRAMS",
         "DELTA_TOTALS_MIN_CHUNKS", "DELTA_Q", "SIDE_DA", "SIDE_DV", "REV_SCALE_DO", "REV_ST", "SIDE_PRIORITY",
         "SIDE_QLIN", "REV_SEG_LONG", "REV_MIN_SEGMENTS")


def kernel_config() -> dict:
    from .hybrid_attention import chunk

    return {**{name: getattr(chunk, name) for name in KNOBS},
            "LAUNCH": {k: list(v) for k, v in chunk.LAUNCH.items()}, "MAXNREG": dict(chunk.MAXNREG)}


def with_settings(overrides: dict, fn):
    """Run fn() with chunk's launch settings overridden, restoring them afterwards."""
    from .hybrid_attention import chunk

    saved = {name: getattr(chunk, name) for name in overrides}
    try:
        for name, value in overrides.items():
            setattr(chunk, name, {**saved[name], **value} if isinstance(value, dict) else value)
        return fn()
    finally:
        for name, value in saved.items():
            setattr(chunk, name, value)


def tune(Ts, reps, variants=None, rounds: int = 1) -> list[dict]:
    """The hybrid op under each TUNE variant at each T. rounds > 1 interleaves them: every variant is timed once (its
    compile and warm-up), then ``rounds`` times more over ceil(reps / rounds) calls, the order of the variants reversed
    every other round, on one set of inputs; each row is the median of all its rounds' calls. Clock and heat drift
    over the minutes of a run then reach every variant alike (run one after the other, the same forward kernels read
    0.99 to 1.11 ms at 32K in one run)."""
    unknown = sorted(set(variants or ()) - set(TUNE))
    if unknown:
        raise SystemExit(f"unknown --variants {unknown}; known: {list(TUNE)}")
    names = [name for name in TUNE if not variants or name in variants]
    rows = []
    for T in Ts:
        if rounds <= 1:
            for name in names:
                row = with_settings(TUNE[name], functools.partial(measure, "hybrid (ours)", ours, T, reps))
                row.update(variant=name, overrides={k: str(v) for k, v in TUNE[name].items()})
                rows.append(row)
                print("# tune " + json.dumps(row), flush=True)
            continue
        rows += _tune_interleaved(T, reps, names, rounds)
    return rows


def _tune_interleaved(T, reps, names, rounds, build=None) -> list[dict]:
    """``tune``'s interleaved rounds over the TUNE variants ``names`` of the op ``build(T)`` returns (None: ``ours``,
    as the table times it)."""
    fwd, step = (build or ours)(T)
    samples = {name: {"fwd": ([], []), "fwd_bwd": ([], [])} for name in names}
    failed = {}
    per_round = -(-reps // rounds)
    for r in range(rounds + 1):
        for name in names if r % 2 == 0 else names[::-1]:
            if name in failed:
                continue
            warm = {} if r == 0 else dict(warmup=1, warmup_ms=0.0)  # round 0: compile and warm up, not kept

            def go(warm=warm):
                with torch.no_grad():
                    f = cuda_samples(fwd, per_round, **warm)
                return f, cuda_samples(step, per_round, **warm)

            try:
                f, fb = with_settings(TUNE[name], go)
            except Exception as err:  # a variant failing must not hide the others' numbers
                failed[name] = f"{type(err).__name__}: {err}"
                traceback.print_exc()
                continue
            if r > 0:
                for key, got in (("fwd", f), ("fwd_bwd", fb)):
                    samples[name][key][0].extend(got[0])
                    samples[name][key][1].extend(got[1])
    rows = []
    for name in names:
        row = {"op": "hybrid (ours)", "T": T, "variant": name, "overrides": {k: str(v) for k, v in TUNE[name].items()},
               "rounds": rounds}
        if name in failed:
            row["skipped"] = failed[name]
        else:
            for key, (times, host) in samples[name].items():
                row[f"{key}_ms"], row[f"{key}_host_ms"] = statistics.median(times), statistics.median(host)
                row[f"{key}_calls"] = len(times)
            row["peak_gib"] = with_settings(TUNE[name], lambda: peak_gib(step))
        rows.append(row)
        print("# tune " + json.dumps(row), flush=True)
    torch.cuda.empty_cache()
    return rows


def profile(T: int, iters: int = 5) -> list[dict]:
    """CUDA time per kernel (ms per forward+backward) of the hybrid op, from torch.profiler."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    _, step = ours(T)
    step()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        total = getattr(ev, "device_time_total", None)
        total = getattr(ev, "cuda_time_total", 0) if total is None else total
        if total > 0:
            rows.append({"T": T, "kernel": ev.key, "ms": total / 1000 / iters, "calls": ev.count / iters})
    rows.sort(key=lambda r: -r["ms"])
    for r in rows[:15]:
        print(f"# profile T={T} {r['ms']:8.3f} ms  x{r['calls']:.0f}  {r['kernel'][:90]}", flush=True)
    return rows


def profile_variants(Ts, names) -> list[dict]:
    """``profile`` under each TUNE variant of ``names`` (rows tagged with it)."""
    rows = []
    for name in names:
        print(f"# profile variant: {name}", flush=True)
        for T in Ts:
            rows += [dict(r, variant=name) for r in with_settings(TUNE[name], functools.partial(profile, T))]
    return rows


def stream_probe(T: int, reps: int, names) -> list[dict]:
    """Where the backward's two streams meet (chunk.STREAM_PROBE), per TUNE variant of ``names``: the median over
    ``reps`` forward+backward calls of the ms from the backward's fork until the side stream's reverse pass is done
    (``side``), until the op's stream reaches its wait for it, the key side's dk launch done (``main``), and until its
    last launch is done (``end``). main - side > 0: the op's stream is the longer one and the dv launch does not
    wait."""
    from .hybrid_attention import chunk

    rows = []
    for name in names:
        _, step = ours(T)

        def run(step=step):
            chunk.STREAM_PROBE = []
            try:
                for _ in range(3):  # compile, plans, warm-up
                    step()
                torch.cuda.synchronize()
                chunk.STREAM_PROBE.clear()
                for _ in range(reps):
                    step()
                torch.cuda.synchronize()
                return list(chunk.STREAM_PROBE)
            finally:
                chunk.STREAM_PROBE = None

        marks = with_settings(TUNE[name], run)
        row = {"T": T, "variant": name, "calls": len(marks)}
        if marks:
            for key in ("side", "main", "end"):
                row[f"{key}_ms"] = statistics.median(m["fork"].elapsed_time(m[key]) for m in marks)
            row["main_minus_side_ms"] = statistics.median(
                m["fork"].elapsed_time(m["main"]) - m["fork"].elapsed_time(m["side"]) for m in marks)
        else:
            row["skipped"] = "no side stream at this T"
        rows.append(row)
        print("# streams " + json.dumps(row), flush=True)
    return rows


def state_probe(T: int, reps: int) -> list[dict]:
    """CUDA time of the state pass alone (the forward flavour on (phi(k), v) with GQA, and the reverse one on
    (phi(q), do) with row weights) under STATE_VARIANTS, at the benchmark shapes."""
    from .hybrid_attention import chunk

    q, k, v, qf, kf, gamma, do = make_inputs(T)
    rb = torch.randn(B * H, T, device="cuda")
    flavours = {"forward": (kf, v, None, H // HKV, False), "reverse": (qf, do, rb, 1, True)}
    rows = []
    for name, (bf, bv, warps, stages, seg, stores) in STATE_VARIANTS.items():
        for flavour, (x, y, b, g, rev) in flavours.items():
            over = {"STATE_BF": bf, "STATE_BV": bv, "STATE_SEG": seg, "LAUNCH": {"state": (warps, stages)}}
            if stores:
                run = functools.partial(chunk.chunk_states, x, y, b, heads_per_y=g, reverse=rev, dtype=x.dtype,
                                        big=True)
            else:
                run = functools.partial(_state_totals, x, y, b, g, rev, bf, bv, warps, stages)

            row = {"T": T, "variant": name, "flavour": flavour}
            try:
                row["ms"] = with_settings(over, functools.partial(cuda_time, run, reps))[0]
            except Exception as err:
                row["skipped"] = f"{type(err).__name__}: {err}"[:200]
            rows.append(row)
            print("# state " + json.dumps(row), flush=True)
    return rows


def _state_totals(x, y, rb, g, reverse, bf, bv, warps, stages):
    """The state pass over the whole sequence as one segment in its totals mode (PHASE 1): every load and dot of the
    pass, the per-chunk stores left out."""
    from .hybrid_attention import chunk

    Bx, T, Hx, F = x.shape
    Dv = y.shape[-1]
    NS = chunk._n_states(T, reverse)  # steps of the scan
    BF, BDV, _, _ = chunk._state_tiles(F, Dv)
    meta = chunk._state_meta(F, Dv, x.dtype, big=True, reverse=reverse)
    meta.update(BK=bf, BV=bv, num_warps=warps, num_stages=stages, PHASE=1, REVERSE=reverse, HAS_RB=rb is not None)
    tot = torch.empty(Bx * Hx, 1, BF, BDV, device=x.device, dtype=torch.float32)
    ztot = torch.empty(Bx * Hx, 1, BF, device=x.device, dtype=torch.float32)
    dummy = ztot
    chunk._chunk_state_kernel[((BF // bf) * (BDV // bv), Bx * Hx, 1)](
        x, y, dummy if rb is None else rb, dummy, dummy, tot, ztot,
        x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1), y.stride(2), T, Hx, g, NS, NS, 1, **meta,
    )  # fmt: skip


class _Floor(torch.autograd.Function):
    """The host floor of an autograd op on the hybrid op's inputs: one output and six gradients allocated, no
    kernels."""

    @staticmethod
    def forward(ctx, q, k, v, qf, kf, gamma):
        ctx.save_for_backward(q, k, v, qf, kf, gamma)
        return torch.empty(q.shape[:-1] + v.shape[-1:], device=q.device, dtype=v.dtype)

    @staticmethod
    def backward(ctx, do):
        return tuple(torch.empty_like(x) for x in ctx.saved_tensors)


def host_breakdown(T: int, iters: int = 100) -> dict:
    """Host microseconds of one forward+backward of the hybrid op: the whole call with launch plans (the default) and
    through Triton's own path for every launch, the forward alone, each kernel's launch on Triton's path (its
    ``JITFunction.run`` timed), and the floor of an autograd op with the same inputs that launches nothing."""
    from .hybrid_attention import chunk

    fwd, step = ours(T)
    q, k, v, qf, kf, gamma, do = make_inputs(T)
    leaves = [x.requires_grad_() for x in (q, k, v, qf, kf, gamma)]
    floor = fwd_bwd(lambda: _Floor.apply(*leaves), leaves, do)
    spent: dict[str, list[float]] = {}
    kernels = [getattr(chunk, n) for n in dir(chunk) if n.endswith("_kernel") and hasattr(getattr(chunk, n), "run")]

    def timed(fn):
        real = fn.run

        def run(*args, **kwargs):
            t0 = time.perf_counter()
            out = real(*args, **kwargs)
            spent.setdefault(fn.__name__, []).append(time.perf_counter() - t0)
            return out

        return run

    def host_us(fn, plans: bool, per_launch: bool) -> float:
        def go():
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
            spent.clear()
            if per_launch:
                for kern in kernels:
                    kern.run = timed(kern)  # fn[grid](...) calls the instance's run
            try:
                t0 = time.perf_counter()
                for _ in range(iters):
                    fn()
                return (time.perf_counter() - t0) / iters * 1e6
            finally:
                if per_launch:
                    for kern in kernels:
                        del kern.run
                torch.cuda.synchronize()

        return with_settings({"LAUNCH_PLANS": plans}, go)

    res = {"T": T, "fwd_bwd_us": host_us(step, True, False), "fwd_us": host_us(fwd, True, False)}
    res["fwd_bwd_triton_path_us"] = host_us(step, False, True)
    res["launch_us"] = {k: sum(v) / iters * 1e6 for k, v in spent.items()}
    res["launches"] = {k: len(v) / iters for k, v in spent.items()}
    res["fwd_triton_path_us"] = host_us(fwd, False, False)
    res["autograd_floor_us"] = host_us(floor, True, False)
    total = sum(res["launch_us"].values())
    print(f"# host T={T}: forward+backward {res['fwd_bwd_us']:.0f} us with launch plans, "
          f"{res['fwd_bwd_triton_path_us']:.0f} us through Triton's path, of which {total:.0f} us in "
          f"{sum(res['launches'].values()):.0f} launches; forward {res['fwd_us']:.0f} / "
          f"{res['fwd_triton_path_us']:.0f} us; an autograd op launching nothing: {res['autograd_floor_us']:.0f} us",
          flush=True)
    for k, v in res["launch_us"].items():
        print(f"# host T={T}   {k}: {v / res['launches'][k]:.1f} us x{res['launches'][k]:.0f} (Triton's path)",
              flush=True)
    return res


def launch_probe(T: int = 2048, reps: int = 300) -> dict:
    """Host microseconds of one launch of the delta kernel (6 tensors, 11 scalars) at the benchmark shapes, by path:
    Triton's ``fn[grid](...)`` (binding and specialising every argument, then the launcher), and the compiled kernel's
    launcher alone, called with the tensors themselves or with their addresses (which it does not check)."""
    from triton import knobs
    from triton.runtime import driver

    from .hybrid_attention import chunk
    from .launch import Plans

    q, _, _, _, _, _, do = make_inputs(T)
    zd = torch.rand(B * H, T, device="cuda") + 1
    delta, rb, dA = torch.empty_like(zd), torch.empty_like(zd), torch.empty_like(do)
    tensors = (q, do, zd, delta, rb, dA)
    scalars = (*q.stride()[:3], *do.stride()[:3], *dA.stride()[:3], T, H)
    args = (*tensors, *scalars)
    meta = dict(DV=D, BDV=D, BT=chunk.BT, HAS_DA=True, num_warps=4, num_stages=1)
    grid = (-(-T // chunk.BT), B * H)
    kernel = chunk._delta_kernel[grid](*args, **meta)
    vals = list(Plans().bind(chunk._delta_kernel, tensors, scalars, meta))  # as a launch plan binds them
    ptrs = [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in vals]
    stream = driver.active.get_current_stream(driver.active.get_current_device())
    hooks = (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook)

    def direct(v):
        return lambda: kernel.run(grid[0], grid[1], 1, stream, kernel.function, kernel.packed_metadata, None, *hooks, *v)

    paths = {"triton fn[grid]": lambda: chunk._delta_kernel[grid](*args, **meta),
             "launcher, tensors": direct(vals), "launcher, addresses": direct(ptrs)}
    res = {"T": T}
    for name, fn in paths.items():
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        res[name] = (time.perf_counter() - t0) / reps * 1e6
        torch.cuda.synchronize()
    print("# launch probe (delta kernel, host us per launch): " + ", ".join(f"{k} {v:.1f}" for k, v in res.items()
                                                                             if k != "T"), flush=True)
    return res


def host_profile(T: int, iters: int = 50, top: int = 20) -> list[dict]:
    """Where the host time of one forward+backward of the hybrid op goes (cProfile, own time per function)."""
    import cProfile
    import pstats

    _, step = ours(T)
    step()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(iters):
        step()
    prof.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(prof).stats
    rows = [{"T": T, "function": f"{path.rsplit('/', 1)[-1]}:{line}({name})", "calls": cc / iters,
             "own_us": tt / iters * 1e6, "cum_us": ct / iters * 1e6}
            for (path, line, name), (cc, _, tt, ct, _) in stats.items()]
    rows.sort(key=lambda r: -r["own_us"])
    total = sum(r["own_us"] for r in rows)
    print(f"# host profile T={T}: {total:.0f} us of Python per forward+backward (cProfile adds its own overhead)")
    for r in rows[:top]:
        print(f"# host {r['own_us']:8.1f} us own {r['cum_us']:8.1f} us cum  x{r['calls']:.0f}  {r['function'][:90]}")
    return rows[:top]


# ------------------------------------------------------------------------------------------------------------


def check(T: int) -> dict:
    """Triton op vs the naive reference (inputs upcast to fp32) on bf16 Mistral shapes: output and gradients."""
    from .hybrid_attention.chunk import hybrid_attention_chunk
    from .hybrid_attention.naive import hybrid_attention_naive

    q, k, v, qf, kf, gamma, do = make_inputs(T, seed=1)
    names = ("out", "dq", "dk", "dv", "dq_feat", "dk_feat", "dgamma")
    res = {}
    for mode, (sm, lin) in {"hybrid": (True, "outside"), "overlap": (True, "all"), "la_only": (False, "all"),
                            "swa_only": (True, "none")}.items():
        ins = [x.detach().clone().requires_grad_() for x in (q, k, v, qf, kf, gamma)]
        ref_ins = [x.detach().float().requires_grad_() for x in ins]
        kw = dict(window=WINDOW, softmax=sm, linear=lin)
        out = hybrid_attention_chunk(*ins, **kw)
        ref = hybrid_attention_naive(*ref_ins, **kw)
        grads = torch.autograd.grad(out, ins, do, allow_unused=True)
        ref_grads = torch.autograd.grad(ref, ref_ins, do.float(), allow_unused=True)
        errs = {}
        for name, a, b in zip(names, (out, *grads), (ref, *ref_grads)):
            if a is None or b is None or (name == "dgamma" and lin == "none"):
                continue  # unused input, or gamma cancelling exactly (swa only)
            errs[name] = ((a.float() - b).norm() / b.norm()).item()
        res[mode] = errs
        del ins, ref_ins, out, ref, grads, ref_grads
        torch.cuda.empty_cache()
    return res


def measure(name, build, T, reps, do_bwd=True, queued=False):
    """One row of the table: forward (no grad) and forward+backward of ``build(T)``. queued: also the times with the
    GPU queue kept busy before each call (``cuda_time_queued``), and for our op the host latency to its first launch."""
    row = {"op": name, "T": T}
    try:
        fwd, step = build(T)
        with torch.no_grad():
            row["fwd_ms"], row["fwd_host_ms"] = cuda_time(fwd, reps)
            if queued:
                row["fwd_queued_ms"] = cuda_time_queued(fwd, reps)
                if name == "hybrid (ours)":
                    row["fwd_first_launch_us"], row["fwd_second_launch_us"] = launch_us(fwd)
        if do_bwd:
            row["fwd_bwd_ms"], row["fwd_bwd_host_ms"] = cuda_time(step, reps)
            if queued:
                row["fwd_bwd_queued_ms"] = cuda_time_queued(step, reps)
            row["peak_gib"] = peak_gib(step)
        else:
            row["peak_gib"] = peak_gib(lambda: fwd())
    except ImportError as err:
        row["skipped"] = f"not installed: {err}"
    except torch.OutOfMemoryError:
        row["skipped"] = "out of memory"
    except Exception as err:  # a peer failing must not hide the others' numbers
        row["skipped"] = f"{type(err).__name__}: {err}"
        traceback.print_exc()
    finally:
        torch.cuda.empty_cache()
    return row


# DESIGN.md section 8's anchors: one H100 run, 2026-11-27, median ms, (forward, forward+backward). The targets'
# milliseconds are 3x below the two peers' sums at 32K ((0.67 + 2.49) / 3 = 1.05, (2.89 + 9.26) / 3 = 4.05)
ANCHORS = {
    "sdpa": {2048: (0.086, 0.40), 8192: (0.98, 4.04), 32768: (14.6, 54.6)},
    "flex_swa": {2048: (0.052, 0.66), 8192: (0.18, 0.73), 32768: (0.67, 2.89)},
    "fla_chunk_la": {2048: (0.34, 1.88), 8192: (0.65, 2.41), 32768: (2.49, 9.26)},
}
METHODS = {"per call": "", "queued": "_queued"}  # the table's two timings, by the suffix of their keys


def anchor_rows(rows) -> list[dict]:
    """The peers' times of this run beside DESIGN.md's anchors (``ANCHORS``): per call and queued (where timed), each
    as a ratio to its anchor, and the method that reads nearer the anchor (the smaller |log ratio|)."""
    out = []
    for r in rows:
        anchor = ANCHORS.get(r["op"], {}).get(r["T"])
        if anchor is None or "skipped" in r:
            continue
        for part, ms in zip(("fwd", "fwd_bwd"), anchor):
            row = {"op": r["op"], "T": r["T"], "part": part, "anchor_ms": ms}
            for method, suffix in METHODS.items():
                got = r.get(f"{part}{suffix}_ms")
                row[f"{method}_ms"], row[f"{method}_vs_anchor"] = got, None if got is None else got / ms
            ratios = {m: row[f"{m}_vs_anchor"] for m in METHODS if row[f"{m}_vs_anchor"] is not None}
            row["nearer"] = min(ratios, key=lambda m: abs(math.log(ratios[m]))) if len(ratios) > 1 else None
            out.append(row)
    return out


def targets(rows) -> list[dict]:
    """DESIGN.md section 8's kernel targets judged on this run's table, per call and queued (where timed): one row a
    target, with each method's value (a string) and whether it is met (both None where the table lacks a time it
    needs: a T not timed, a peer skipped, no queued timing)."""
    at = {(r["op"], r["T"]): r for r in rows if "skipped" not in r}
    ours = "hybrid (ours)"

    def ms(op, T, part, suffix):
        return at.get((op, T), {}).get(f"{part}{suffix}_ms")

    def at_most(T, part, limit):
        def judge(sx):
            x = ms(ours, T, part, sx)
            return None if x is None else (f"{x:.3f} ms", x <= limit)
        return judge

    def vs_peers(part):  # flex SWA + fla LA over ours at 32K
        def judge(sx):
            x = [ms(op, 32768, part, sx) for op in ("flex_swa", "fla_chunk_la", ours)]
            return None if None in x else (f"{(x[0] + x[1]) / x[2]:.2f}x", x[0] + x[1] >= 3.0 * x[2])
        return judge

    def vs_sdpa(Ts, bound):  # ours over SDPA, forward and forward+backward at each T
        def judge(sx):
            x = [(ms(ours, T, p, sx), ms("sdpa", T, p, sx)) for T in Ts for p in ("fwd", "fwd_bwd")]
            if not x or any(None in pair for pair in x):
                return None
            r = [o / q for o, q in x]
            return " / ".join(f"{v:.2f}" for v in r), max(r) <= bound
        return judge

    def linear(sx):  # peak GiB a token: the largest over the smallest, over the table's T (peak is not timed)
        per = [r["peak_gib"] / T for (op, T), r in at.items() if op == ours and r.get("peak_gib")]
        if sx or len(per) < 2:
            return None
        return f"{max(per) / min(per):.2f}", max(per) / min(per) <= 1.25

    long_ts = sorted(T for op, T in at if op == ours and T >= 8192)
    checks = {
        "T=32K forward <= 1.0 ms": at_most(32768, "fwd", 1.0),
        "T=32K forward+backward <= 4 ms": at_most(32768, "fwd_bwd", 4.0),
        "T=32K >= 3x faster than flex SWA + fla LA, forward": vs_peers("fwd"),
        "T=32K >= 3x faster than flex SWA + fla LA, forward+backward": vs_peers("fwd_bwd"),
        f"faster than full SDPA from T=8K (ours / SDPA, fwd / fwd+bwd at T={long_ts})": vs_sdpa(long_ts, 1.0),
        "within 2x of SDPA at T=2K (ours / SDPA, fwd / fwd+bwd)": vs_sdpa([2048], 2.0),
        "memory linear in T (peak GiB a token, largest / smallest over the T, <= 1.25)": linear,
    }
    out = []
    for name, judge in checks.items():
        row = {"target": name}
        for method, suffix in METHODS.items():
            got = judge(suffix)
            row[f"{method}_value"], row[f"{method}_met"] = got if got is not None else (None, None)
        out.append(row)
    return out


def print_anchors(anchors: list[dict], judged: list[dict]) -> None:
    """The peers against DESIGN.md's anchors, then the targets, as markdown tables."""
    print("\nThe peers against DESIGN.md's anchors (H100, 2026-11-27): ms, and the ratio to the anchor")
    print("| T | op | part | anchor | per call | queued | nearer the anchor |")
    print("|---|---|---|---|---|---|---|")
    for r in anchors:
        cells = [f"{fmt(r[f'{m}_ms'])} ({fmt(r[f'{m}_vs_anchor'], 2)})" if r[f"{m}_ms"] is not None else "-"
                 for m in METHODS]
        print(f"| {r['T']} | {r['op']} | {r['part']} | {r['anchor_ms']} | " + " | ".join(cells)
              + f" | {r['nearer'] or '-'} |")
    print("\nTargets (DESIGN.md section 8) in this run")
    print("| target | per call | queued |")
    print("|---|---|---|")
    verdict = {True: "met", False: "NOT met"}
    for r in judged:
        cells = [f"{r[f'{m}_value']}: {verdict[r[f'{m}_met']]}" if r[f"{m}_met"] is not None else "-"
                 for m in METHODS]
        print(f"| {r['target']} | " + " | ".join(cells) + " |")


def naive_fits(T: int, bwd: bool) -> bool:
    """The naive reference holds ~6 fp32 [B, H, T, T] tensors in the forward (about twice that with backward)."""
    need = (12 if bwd else 6) * B * H * T * T * 4
    return need < 0.8 * torch.cuda.get_device_properties(0).total_memory


def fmt(x, nd=3):
    return "-" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def main(argv=None):
    global B, H, HKV  # (--B, --H and --Hkv set the shapes of every input)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, nargs="+", default=[2048, 8192, 32768])
    ap.add_argument("--B", type=int, default=B, help="batch size of every input (the check's too)")
    ap.add_argument("--H", type=int, default=H, help="query heads of every input (the check's too)")
    ap.add_argument("--Hkv", type=int, default=HKV, help="kv heads of every input; must divide --H")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--check-T", type=int, default=1000)
    ap.add_argument("--out", default="kernels/bench_results.json")
    ap.add_argument("--tune", action="store_true", help="also time the hybrid op under the TUNE variants")
    ap.add_argument("--variants", nargs="+", metavar="NAME", help="with --tune: only these TUNE variants")
    ap.add_argument("--tune-only", action="store_true",
                    help="with --tune: no table of the op and its peers (the check still runs first)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="with --tune: time the variants interleaved, in this many rounds (1: one after the other)")
    ap.add_argument("--profile", action="store_true", help="also record CUDA time per kernel of the hybrid op")
    ap.add_argument("--profile-variants", nargs="+", metavar="NAME", default=["default"],
                    help="with --profile / --stream-probe: under these TUNE variants (default: the defaults)")
    ap.add_argument("--no-naive", action="store_true", help="do not time the naive reference (it still checks)")
    ap.add_argument("--queued", action="store_true",
                    help="also time every op with the GPU queue kept busy before each call (no host latency in the "
                         "measurement) and our op's host latency to its first launch")
    ap.add_argument("--stream-probe", type=int, nargs="*", metavar="T",
                    help="also time where the backward's two streams meet at these T (the --profile-variants)")
    ap.add_argument("--state-probe", type=int, nargs="*", metavar="T",
                    help="also time the state pass alone under STATE_VARIANTS at these T")
    ap.add_argument("--host-breakdown", type=int, nargs="*", metavar="T",
                    help="also time the host side of the hybrid op at these T (launch plans on and off, per launch, "
                         "and an autograd floor)")
    ap.add_argument("--host-profile", type=int, nargs="*", metavar="T",
                    help="also profile the host (Python) time of the hybrid op at these T")
    args = ap.parse_args(argv)
    if args.B < 1:
        sys.exit(f"--B must be at least 1, got {args.B}")
    if args.H < 1 or args.Hkv < 1 or args.H % args.Hkv:
        sys.exit(f"--Hkv must divide --H (both at least 1), got --H {args.H} --Hkv {args.Hkv}")
    if not torch.cuda.is_available():
        sys.exit("the benchmark needs a CUDA device")
    B, H, HKV = args.B, args.H, args.Hkv

    info = header()
    print("# " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    print(f"# shapes: B={B} H={H} Hkv={HKV} d={D} features={FEAT} w={WINDOW} bf16", flush=True)
    checks = check(args.check_T)
    worst = max(e for errs in checks.values() for e in errs.values())
    for mode, errs in checks.items():
        print(f"# check T={args.check_T} {mode}: rel RMS err " + " ".join(f"{k}={v:.1e}" for k, v in errs.items()))
    ok = worst < 2e-2
    print(f"# correctness vs naive: {'OK' if ok else 'FAILED'} (worst rel RMS err {worst:.2e}, bf16 tol 2e-2)",
          flush=True)

    if args.tune_only and not args.tune:
        sys.exit("--tune-only needs --tune")
    table_ts = [] if args.tune_only else args.T  # (the T of the table of the op and its peers)
    rows = []
    for T in table_ts:
        rows.append(measure("hybrid (ours)", ours, T, args.reps, queued=args.queued))
        for name, build in PEERS.items():
            rows.append(measure(name, build, T, args.reps, queued=args.queued))
        if args.no_naive:
            rows.append({"op": "naive", "T": T, "skipped": "--no-naive"})
        elif naive_fits(T, bwd=False):
            rows.append(measure("naive", naive, T, max(3, args.reps // 5), do_bwd=naive_fits(T, bwd=True)))
        else:
            rows.append({"op": "naive", "T": T, "skipped": "does not fit in memory"})
        for r in rows[-5:]:
            print("# " + json.dumps(r), flush=True)

    # ratios: ours over the best peer and over flex SWA + fla LA (the two halves of a hybrid) summed
    for T in table_ts:
        at = {r["op"]: r for r in rows if r["T"] == T}
        o = at["hybrid (ours)"]
        for key in ("fwd_ms", "fwd_bwd_ms"):
            peers = [at[p].get(key) for p in PEERS if at[p].get(key) is not None]
            if o.get(key) is None:
                continue
            if peers:
                o[f"{key}_vs_best_peer"] = o[key] / min(peers)
            if at["flex_swa"].get(key) is not None and at["fla_chunk_la"].get(key) is not None:
                o[f"{key}_vs_swa_plus_la"] = o[key] / (at["flex_swa"][key] + at["fla_chunk_la"][key])
            if at["sdpa"].get(key) is not None:
                o[f"{key}_vs_sdpa"] = o[key] / at["sdpa"][key]

    result = {"header": info, "shapes": dict(B=B, H=H, Hkv=HKV, d=D, features=FEAT, window=WINDOW, dtype="bf16"),
              "check": {"T": args.check_T, "rel_rms_err": checks, "ok": ok}, "reps": args.reps, "rows": rows,
              "kernel_config": kernel_config()}
    if rows:
        result["anchors"], result["targets"] = anchor_rows(rows), targets(rows)
    if args.tune:
        result["tune"] = tune(args.T, args.reps, args.variants, args.rounds)
    if args.profile:
        result["profile"] = profile_variants(args.T, args.profile_variants)
    if args.stream_probe:
        result["stream_probe"] = [r for T in args.stream_probe for r in stream_probe(T, args.reps,
                                                                                      args.profile_variants)]
    if args.state_probe:
        result["state_probe"] = [r for T in args.state_probe for r in state_probe(T, args.reps)]
    if args.host_breakdown:
        result["launch_probe"] = launch_probe()
        result["host_breakdown"] = [host_breakdown(T) for T in args.host_breakdown]
    if args.host_profile:
        result["host_profile"] = [r for T in args.host_profile for r in host_profile(T)]
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)

    print(f"\n{info['gpu']} | torch {info['torch']} | triton {info['triton']} | fla {info['fla']} | {info['date']}")
    print("| T | op | fwd ms | fwd+bwd ms | host ms fwd+bwd | peak GiB | fwd / best peer | fwd+bwd / best peer "
          "| fwd / (SWA+LA) | fwd+bwd / (SWA+LA) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "skipped" in r:
            print(f"| {r['T']} | {r['op']} | skipped: {r['skipped'][:60]} | | | | | | | |")
            continue
        print(f"| {r['T']} | {r['op']} | {fmt(r.get('fwd_ms'))} | {fmt(r.get('fwd_bwd_ms'))} | "
              f"{fmt(r.get('fwd_bwd_host_ms'))} | "
              f"{fmt(r.get('peak_gib'), 2)} | {fmt(r.get('fwd_ms_vs_best_peer'), 2)} | "
              f"{fmt(r.get('fwd_bwd_ms_vs_best_peer'), 2)} | {fmt(r.get('fwd_ms_vs_swa_plus_la'), 2)} | "
              f"{fmt(r.get('fwd_bwd_ms_vs_swa_plus_la'), 2)} |")
    if args.queued:
        print("\nQueued: each call timed with the GPU kept busy before it (the host's work before the first launch "
              "hidden, as inside a model)")
        print("| T | op | fwd ms, per call / queued | fwd+bwd ms, per call / queued | fwd+bwd queued / (SWA+LA) "
              "| host us to the forward's first / second launch |")
        print("|---|---|---|---|---|---|")
        for T in table_ts:
            at = {r["op"]: r for r in rows if r["T"] == T and "skipped" not in r}
            la = [at.get(p, {}).get("fwd_bwd_queued_ms") for p in ("flex_swa", "fla_chunk_la")]
            for r in at.values():
                if "fwd_queued_ms" not in r:
                    continue
                ratio = (r["fwd_bwd_queued_ms"] / sum(la) if None not in la and r.get("fwd_bwd_queued_ms")
                         and r["op"] == "hybrid (ours)" else None)
                print(f"| {T} | {r['op']} | {fmt(r.get('fwd_ms'))} / {fmt(r.get('fwd_queued_ms'))} | "
                      f"{fmt(r.get('fwd_bwd_ms'))} / {fmt(r.get('fwd_bwd_queued_ms'))} | {fmt(ratio, 2)} | "
                      f"{fmt(r.get('fwd_first_launch_us'), 0)} / {fmt(r.get('fwd_second_launch_us'), 0)} |")
    if result.get("anchors"):
        print_anchors(result["anchors"], result["targets"])
    if result.get("tune"):
        print("\n| T | variant | fwd ms | fwd+bwd ms | host ms fwd+bwd | peak GiB |")
        print("|---|---|---|---|---|---|")
        for r in result["tune"]:
            print(f"| {r['T']} | {r['variant']} | {fmt(r.get('fwd_ms'))} | {fmt(r.get('fwd_bwd_ms'))} | "
                  f"{fmt(r.get('fwd_bwd_host_ms'))} | {fmt(r.get('peak_gib'), 2)} |" if "skipped" not in r else
                  f"| {r['T']} | {r['variant']} | skipped: {r['skipped'][:60]} | | | |")
    if result.get("stream_probe"):
        print("\nThe backward's streams, ms from its fork to (median): the side stream's reverse pass done, the op's "
              "stream at its wait for it (dk done), its last launch done")
        print("| T | variant | side | main | main - side | end |")
        print("|---|---|---|---|---|---|")
        for r in result["stream_probe"]:
            print(f"| {r['T']} | {r['variant']} | {fmt(r.get('side_ms'))} | {fmt(r.get('main_ms'))} | "
                  f"{fmt(r.get('main_minus_side_ms'))} | {fmt(r.get('end_ms'))} |")
    if result.get("state_probe"):
        print("\n| T | state pass variant | forward ms | reverse ms |")
        print("|---|---|---|---|")
        by = {}
        for r in result["state_probe"]:
            by.setdefault((r["T"], r["variant"]), {})[r["flavour"]] = r.get("ms")
        for (T, name), ms in by.items():
            print(f"| {T} | {name} | {fmt(ms.get('forward'))} | {fmt(ms.get('reverse'))} |")
    if not math.isfinite(worst) or not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
