"""Decode speed and memory vs context length: converted (hybrid cache) vs softmax + KV cache.

    python experiments/bench_decode.py [--models mistral7b smollm2_135m] [--contexts 1024 4096 8192 16384 32768]
        [--batches 1 16] [--compile] [--budget-s 220] [--out bench_decode.json]
    python experiments/bench_decode.py --smoke [--compile]   # CPU, tiny shapes: checks the script end to end

Random weights in bf16 at the real shapes (SmolLM2-135M: 30 layers, 9 heads, 3 kv heads, d=64; Mistral-7B:
32 layers, 32 heads, 8 kv heads, d=128, all layers). The converted model is hybrid, window 64, Hedgehog feature map
with 2 x 64 features (DESIGN.md section 8). Methods, per (model, batch, context):

- ``softmax_eager``: HF SDPA, DynamicCache, one Python forward per token (the default ``generate`` path);
- ``softmax_static_graph``: HF SDPA, StaticCache sized to the context, one decode step captured in a CUDA graph
  and replayed (what ``generate(cache_implementation="static")`` + ``torch.compile(mode="reduce-overhead")`` does,
  without Inductor's kernel fusion);
- ``softmax_static_compile`` (with ``--compile``): the same StaticCache step through ``torch.compile(model.forward)``
  (Inductor's fused kernels), captured in a CUDA graph after the compiling warm-up steps: the
  ``generate(cache_implementation="static")`` + ``torch.compile(mode="reduce-overhead")`` recipe, timed like the others;
- ``hybrid_eager``: the converted model with ``linearize.cache.HybridCache``, one Python forward per token (on CUDA the
  single-token step is the fused Triton kernel, ``kernels/hybrid_attention/decode_fused.py``);
- ``hybrid_graph``: the same decode step captured in a CUDA graph (the cache updates in place);
- ``hybrid_ref_graph``: the unfused PyTorch reference step (``HybridCache(model, fused=False)``) in a CUDA graph.

The caches are filled with random keys/values (and a random state) as if ``ctx`` tokens had been prefilled, so
that prefill is not timed; per-step latency is the median over the timed steps (CUDA events). Before timing, a
correctness check on a small float32 model compares prefill + eager decode + graph-replayed decode with one full
forward without cache, for the hybrid cache (fused step and reference step), the static softmax cache (and the
compiled one with ``--compile``). Writes JSON (with versions, GPU,
git sha) and prints the table last.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

# The project must be installed (pip install -e .): kernels/ is importable only as linearize.kernels.
ROOT = Path(__file__).resolve().parents[1]

SHAPES = {
    # SmolLM2-135M (Llama): the embedded default model of the project
    "smollm2_135m": dict(
        arch="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0, tie_word_embeddings=True,
    ),
    # Mistral-7B (v0.1 shapes, full attention)
    "mistral7b": dict(
        arch="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, rope_theta=10000.0, tie_word_embeddings=False,
    ),
    "tiny": dict(
        arch="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=False,
    ),
}  # fmt: skip
WINDOW, FEATURE_DIM = 64, 64
METHODS = ("softmax_eager", "softmax_static_graph", "softmax_static_compile", "hybrid_eager", "hybrid_ref_graph",
           "hybrid_graph")  # fmt: skip


# None: the hybrid cache picks its step (fused Triton on CUDA); --smoke sets True so that the CPU check runs the fused
# kernel too, under Triton's interpreter.
FUSED: bool | None = None


def _version(pkg: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def build(shape: dict, dtype, device, max_pos: int, layers: int | None = None):
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

    kw = {k: v for k, v in shape.items() if k != "arch"}
    if layers is not None:
        kw["num_hidden_layers"] = layers
    cls = {"llama": LlamaConfig, "mistral": MistralConfig}[shape["arch"]]
    cfg = cls(**kw, max_position_embeddings=max_pos)
    if shape["arch"] == "mistral":
        cfg.sliding_window = None
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    return model.eval().requires_grad_(False)


def convert_model(model, window=WINDOW):
    from omegaconf import OmegaConf

    from linearize.attention import convert, hybrid_layers

    attn = OmegaConf.create(dict(kind="hybrid", window=window, sinks=8, backend="auto", gamma_init=0.1))
    fm = OmegaConf.create(
        dict(name="hedgehog", activation="softmax", feature_dim=FEATURE_DIM, match_head_dim=False, signed=True,
             bias=False, projection=True)
    )  # fmt: skip
    convert(model, attn, fm)
    g = torch.Generator(device="cpu").manual_seed(1)
    with torch.no_grad():
        for layer in hybrid_layers(model):
            for fmap in (layer.q_map, layer.k_map):
                fmap.weight.add_(0.3 * torch.randn(fmap.weight.shape, generator=g).to(fmap.weight.device))
    return model


def kv_shape(model):
    c = model.config
    return (
        c.num_hidden_layers,
        c.num_key_value_heads,
        getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
    )


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


# --- caches filled as if ctx tokens had been prefilled ------------------------------------------------------------


def dynamic_cache(model, B, ctx):
    from transformers import DynamicCache

    L, Hkv, D = kv_shape(model)
    cache = DynamicCache()
    p = next(model.parameters())
    for i in range(L):
        k = torch.randn(B, Hkv, ctx, D, device=p.device, dtype=p.dtype)
        cache.update(k, torch.randn_like(k), i)
    return cache, lambda: nbytes([t for layer in cache.layers for t in (layer.keys, layer.values)])


def static_cache(model, B, ctx, max_len):
    from transformers import StaticCache

    L, Hkv, D = kv_shape(model)
    p = next(model.parameters())
    cache = StaticCache(config=model.config, max_cache_len=max_len)
    empty = torch.empty(B, Hkv, 0, D, device=p.device, dtype=p.dtype)
    for layer in cache.layers:
        layer.lazy_initialization(empty, empty)
        layer.keys[:, :, :ctx].normal_()
        layer.values[:, :, :ctx].normal_()
        layer.cumulative_length.fill_(ctx)
    mask = torch.zeros(B, 1, 1, max_len, dtype=torch.bool, device=p.device)
    mask[..., :ctx] = True
    return cache, mask, lambda: nbytes([t for layer in cache.layers for t in (layer.keys, layer.values)])


def hybrid_cache(model, B, ctx, fused=None):
    from linearize.cache import HybridCache

    _, Hkv, D = kv_shape(model)
    p = next(model.parameters())
    cache = HybridCache(model, fused=fused)
    empty = torch.empty(B, Hkv, 0, D, device=p.device, dtype=p.dtype)
    for layer in cache.layers:
        layer.lazy_initialization(empty, empty)
        refill_hybrid_layer(layer, ctx)
    return cache, cache.nbytes


def refill_hybrid_layer(layer, ctx):
    layer.keys.normal_()
    layer.values.normal_()
    layer.valid.fill_(True)
    layer.pos.fill_(ctx)  # the ring's write position (slot ctx % (w + 1) is the free one)
    n_old = max(ctx - layer.window, 0)
    layer.S.normal_().mul_(n_old**0.5 / layer.S.shape[2])  # a sum of n_old rank-one terms phi(k) v^T, sum(phi) = 2
    layer.z.uniform_(0, 4 * n_old / layer.z.shape[-1])
    layer.seen = ctx


# --- one decode step, eager or replayed from a CUDA graph ---------------------------------------------------------


class Step:
    """A decode step with static input buffers; ``capture`` records it in a CUDA graph, ``__call__`` runs it."""

    def __init__(self, model, cache, B, mask=None, forward=None):
        p = next(model.parameters())
        self.model, self.cache, self.mask = model, cache, mask
        self.forward = forward or model  # e.g. torch.compile(model.forward)
        self.ids = torch.zeros(B, 1, dtype=torch.long, device=p.device)
        self.pos = torch.zeros(B, 1, dtype=torch.long, device=p.device)
        self.graph = self.out = None

    def eager(self):
        from linearize.cache import cache_kwargs

        return self.forward(
            input_ids=self.ids, position_ids=self.pos, attention_mask=self.mask,
            **cache_kwargs(self.model, self.cache), use_cache=True,
        ).logits  # fmt: skip

    def capture(self, warmup_calls):
        """``warmup_calls()`` runs the eager warm-up steps (they advance the cache) on a side stream first."""
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            warmup_calls()
        torch.cuda.current_stream().wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self.eager()

    def __call__(self, token, position):
        self.ids.fill_(token) if isinstance(token, int) else self.ids.copy_(token)
        self.pos.fill_(position)
        if self.mask is not None:
            self.mask[..., position] = True
        if self.graph is None:
            return self.eager()
        self.graph.replay()
        return self.out


def time_steps(step: Step, start_pos: int, warmup: int, steps: int) -> list[float]:
    """Per-step milliseconds (CUDA events on GPU, wall clock on CPU)."""
    cuda = step.ids.is_cuda
    for i in range(warmup):
        step(1, start_pos + i)
    times = []
    for i in range(steps):
        pos = start_pos + warmup + i
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step(1, pos)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            step(1, pos)
            times.append((time.perf_counter() - t0) * 1e3)
    return times


# --- correctness first ----------------------------------------------------------------------------------------------


def check_correctness(device, compile_: bool = False) -> dict:
    """Small fp32 model: prefill + eager decode + graph-replayed decode == one full forward without cache.

    Variants: the hybrid cache with the fused step (on CUDA; the reference elsewhere) and with the reference step,
    the static softmax cache, and (``compile_``) the static cache through ``torch.compile``. 32 decoded tokens with
    window 16: the hybrid ring buffer wraps twice."""
    from linearize.attention import softmax_attention
    from linearize.cache import HybridCache, cache_kwargs

    model = convert_model(build(SHAPES["smollm2_135m"], torch.float32, device, 4096, layers=4), window=16)
    T, P = 72, 40
    ids = torch.randint(0, 1000, (2, T), generator=torch.Generator().manual_seed(0)).to(device)
    variants = ["hybrid", "hybrid_ref", "softmax_static"] + (["softmax_static_compile"] if compile_ else [])
    res = {}
    with torch.no_grad():
        for name in variants:
            with softmax_attention(model) if name.startswith("softmax") else _null():
                full = model(input_ids=ids, use_cache=False).logits
                forward = None
                if name.startswith("hybrid"):
                    cache, mask = HybridCache(model, fused=False if name == "hybrid_ref" else FUSED), None
                    pre = model(input_ids=ids[:, :P], **cache_kwargs(model, cache), use_cache=True).logits
                else:
                    from transformers import StaticCache

                    cache = StaticCache(config=model.config, max_cache_len=T + 8)
                    pre = model(input_ids=ids[:, :P], **cache_kwargs(model, cache), use_cache=True).logits
                    mask = torch.zeros(2, 1, 1, T + 8, dtype=torch.bool, device=device)
                    mask[..., :P] = True
                    if name == "softmax_static_compile":
                        torch._dynamo.reset()
                        forward = torch.compile(model.forward)
                step = Step(model, cache, 2, mask, forward)
                outs = [pre]
                n_eager = 3
                for t in range(P, P + n_eager):
                    outs.append(step(ids[:, t : t + 1], t).clone())
                if device.type == "cuda":
                    step.capture(lambda: None)  # warm-up already done by the eager steps above
                for t in range(P + n_eager, T):
                    outs.append(step(ids[:, t : t + 1], t).clone())
                got = torch.cat(outs, 1)
                err = (got - full).abs().max().item()
                res[name] = err
                assert err < 2e-3, f"{name}: cached decode differs from the full forward by {err:.3g}"
    del model
    return res


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


# --- the sweep --------------------------------------------------------------------------------------------------------


def run_config(model, method, B, ctx, warmup, steps, graphs):
    p = next(model.parameters())
    cuda = p.is_cuda
    L, Hkv, D = kv_shape(model)
    if method.startswith("softmax"):
        kv = 2 * L * B * Hkv * (ctx + warmup + steps + 8) * D * p.element_size()
        if cuda and kv * 1.15 > torch.cuda.mem_get_info()[0]:
            return {"status": f"skipped: KV cache {kv / 2**30:.1f} GiB does not fit"}
    if method.endswith("graph") and not graphs:
        return {"status": "skipped: CUDA graphs need a GPU"}
    captured = method.endswith("graph") or (method == "softmax_static_compile" and graphs)
    if cuda:
        torch.cuda.empty_cache()
    mask = forward = None
    if method == "softmax_eager":
        cache, size = dynamic_cache(model, B, ctx)
    elif method.startswith("softmax_static"):
        cache, mask, size = static_cache(model, B, ctx, ctx + 2 * warmup + steps + 8)
        if method == "softmax_static_compile":
            torch._dynamo.reset()  # a fresh compile per shape, not a pile of recompiles
            forward = torch.compile(model.forward)
    else:
        cache, size = hybrid_cache(model, B, ctx, fused=False if method == "hybrid_ref_graph" else FUSED)
    step = Step(model, cache, B, mask, forward)
    start = ctx
    if captured:

        def warm(step=step):
            for i in range(warmup):
                step(1, ctx + i)

        step.capture(warm)
        start = ctx + warmup
        if method.startswith("softmax_static"):  # the warm-up steps advanced the write position
            for layer in cache.layers:
                layer.cumulative_length.fill_(start)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    cache_before = size()
    times = time_steps(step, start, warmup, steps)
    peak = torch.cuda.max_memory_allocated() if cuda else None
    cache_after = size()
    ms = statistics.median(times)
    del step, cache
    return {
        "status": "ok",
        "ms_per_step": ms,
        "tokens_per_s": B * 1e3 / ms,
        "cache_bytes": cache_after,
        "cache_bytes_before": cache_before,
        "peak_bytes": peak,
        "step_ms": times,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["mistral7b", "smollm2_135m"])
    ap.add_argument("--contexts", nargs="+", type=int, default=[1024, 4096, 8192, 16384, 32768])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    ap.add_argument("--methods", nargs="+", choices=METHODS,
                    default=["softmax_eager", "softmax_static_graph", "hybrid_eager", "hybrid_ref_graph",
                             "hybrid_graph"])  # fmt: skip
    ap.add_argument("--compile", action="store_true",
                    help="also time softmax_static_compile (torch.compile of the static-cache step; compiles once per "
                         "batch and context, about a minute each for SmolLM2)")  # fmt: skip
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--budget-s", type=float, default=220.0, help="skip what is left after this many seconds")
    ap.add_argument("--out", default="bench_decode.json")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU")
    args = ap.parse_args(argv)
    t_start = time.time()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if args.smoke:
        args.models, args.contexts, args.batches, args.steps = ["tiny"], [64, 256], [1, 2], 3
        args.budget_s = max(args.budget_s, 3600.0)  # every row runs: the point is to exercise each code path
        global FUSED
        FUSED = True
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported: the fused kernel runs on the CPU
    if args.compile and "softmax_static_compile" not in args.methods:
        args.methods.insert(args.methods.index("softmax_static_graph") + 1 if "softmax_static_graph" in args.methods
                            else 0, "softmax_static_compile")  # fmt: skip
    import transformers

    header = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "triton": _version("triton"),
        "git_sha": subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip(),
        "window": WINDOW,
        "features": 2 * FEATURE_DIM,
        "dtype": "bfloat16" if device.type == "cuda" else "float32",
        "warmup": args.warmup,
        "steps": args.steps,
    }
    print(json.dumps(header), flush=True)
    try:
        header["correctness_max_abs_err"] = check_correctness(device, args.compile)
    except Exception as err:  # reported, and the timings below are then not to be trusted
        header["correctness_error"] = f"{type(err).__name__}: {err}"
    print("correctness (max abs logit error vs full forward):",
          header.get("correctness_max_abs_err", header.get("correctness_error")), flush=True)  # fmt: skip

    rows = []
    out = Path(args.out)
    graphs = device.type == "cuda"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for name in args.models:
        model = build(SHAPES[name], dtype, device, max(args.contexts) + 256)
        convert_model(model)
        from linearize.attention import softmax_attention

        for B in args.batches:
            for ctx in args.contexts:
                for method in args.methods:
                    row = {"model": name, "batch": B, "ctx": ctx, "method": method}
                    if time.time() - t_start > args.budget_s:
                        row["status"] = "skipped: time budget"
                    else:
                        try:
                            with torch.no_grad(), softmax_attention(model) if method.startswith("softmax") else _null():
                                row.update(run_config(model, method, B, ctx, args.warmup, args.steps, graphs))
                        except torch.cuda.OutOfMemoryError as err:
                            row["status"] = f"OOM: {str(err).splitlines()[0][:120]}"
                        except Exception as err:  # keep measuring the other rows; the error is in the JSON
                            row["status"] = f"error: {type(err).__name__}: {str(err)[:300]}"
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                    rows.append(row)
                    brief = {k: row.get(k) for k in ("model", "batch", "ctx", "method", "status", "ms_per_step")}
                    print(json.dumps(brief), flush=True)
                    out.write_text(json.dumps({"header": header, "rows": rows}, indent=1))
        del model
        gc.collect()  # convert() hooks generate with a bound method: a reference cycle that only gc frees
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(table(rows))


def table(rows) -> str:
    """Markdown table: ms/step per method, tokens/s of the fused hybrid graph, its speed-up against each softmax
    baseline (ratio of ms at equal batch = ratio of tokens/s), cache memory and peak memory."""
    by = {}
    for r in rows:
        by.setdefault((r["model"], r["batch"], r["ctx"]), {})[r["method"]] = r

    def ok(r):
        return r is not None and r.get("status") == "ok"

    def ms(r):
        if ok(r):
            return f"{r['ms_per_step']:.2f}"
        return "OOM" if r and ("OOM" in r.get("status", "") or "fit" in r.get("status", "")) else "—"

    def mib(r):
        return f"{r['cache_bytes'] / 2**20:.0f}" if ok(r) else "—"

    def speedup(base, hyb):
        return f"{base['ms_per_step'] / hyb['ms_per_step']:.2f}x" if ok(base) and ok(hyb) else "—"

    lines = [
        "| model | B | ctx | softmax eager ms | softmax static+graph ms | softmax static+compile+graph ms "
        "| hybrid eager ms | hybrid ref graph ms | hybrid graph ms | hybrid graph tok/s | speed-up vs static+graph "
        "| vs static+compile | vs eager | softmax KV MiB | hybrid cache MiB | cache ratio "
        "| peak GiB softmax static / hybrid graph |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (model, B, ctx), m in by.items():
        se, ss, sc, he, hr, hg = (m.get(k) for k in ("softmax_eager", "softmax_static_graph", "softmax_static_compile",
                                                      "hybrid_eager", "hybrid_ref_graph", "hybrid_graph"))  # fmt: skip
        soft = ss if ok(ss) else sc if ok(sc) else se
        ratio = f"{100 * hg['cache_bytes'] / soft['cache_bytes']:.2f}%" if ok(soft) and ok(hg) else "—"
        tps = f"{hg['tokens_per_s']:.0f}" if ok(hg) else "—"
        peak = " / ".join(f"{r['peak_bytes'] / 2**30:.1f}" if ok(r) and r.get("peak_bytes") else "—" for r in (ss, hg))
        lines.append(
            f"| {model} | {B} | {ctx} | {ms(se)} | {ms(ss)} | {ms(sc)} | {ms(he)} | {ms(hr)} | {ms(hg)} | {tps} "
            f"| {speedup(ss, hg)} | {speedup(sc, hg)} | {speedup(se, hg)} | {mib(soft)} | {mib(hg)} | {ratio} | {peak} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
