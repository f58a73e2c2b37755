"""Generation with the hybrid cache: cached decoding equals one full forward; padding; saved runs; constant memory.

Every reference is independent of the cache: the full forward of the same model (no cache, the quadratic naive op)
or ``kernels/hybrid_attention/naive.py``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import load_triton_module
from omegaconf import OmegaConf

from linearize.attention import attention_mode, convert, hybrid_layers
from linearize.cache import HybridCache, cache_kwargs
from linearize.kernels.hybrid_attention.decode import hybrid_attention_decode, hybrid_state_update
from linearize.kernels.hybrid_attention.naive import hybrid_attention_naive
from linearize.models import byte_tokenizer, tiny_model

ATOL, RTOL = 2e-5, 2e-5  # float32 throughout; the cached path only reorders sums
KIND_SPANS = {"hybrid": (True, "outside"), "hybrid_overlap": (True, "all"), "linear": (False, "all")}


def _tiny(arch="llama", heads=4, kv_heads=2, layers=2, seed=0):
    cfg = OmegaConf.create(
        dict(
            arch=arch, hidden_size=64, num_hidden_layers=layers, num_attention_heads=heads,
            num_key_value_heads=kv_heads, intermediate_size=128, max_position_embeddings=512, seed=seed,
        )
    )  # fmt: skip
    tok = byte_tokenizer()
    return tiny_model(cfg, vocab_size=len(tok)).float().eval(), tok


def _converted(kind="hybrid", window=6, feature_dim=8, activation="softmax", **kw):
    model, tok = _tiny(**kw)
    attn = OmegaConf.create(dict(kind=kind, window=window, sinks=4, backend="naive", gamma_init=0.3))
    fm = OmegaConf.create(
        dict(name="t", activation=activation, feature_dim=feature_dim, match_head_dim=False, signed=True, bias=False,
             projection=True)
    )  # fmt: skip
    convert(model, attn, fm)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial feature maps and gamma, different per layer and head
        for layer in hybrid_layers(model):
            for fmap in (layer.q_map, layer.k_map):
                fmap.weight.copy_(torch.randn(fmap.weight.shape, generator=g) * 0.5)
            layer.theta.copy_(torch.randn(layer.theta.shape, generator=g))
    return model, tok


def _ids(B, T, seed=0, vocab=256):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def _assert_close(actual, expected, what=""):
    err = (actual - expected).abs().max().item()
    rel = ((actual - expected).pow(2).mean().sqrt() / expected.pow(2).mean().sqrt().clamp_min(1e-30)).item()
    assert torch.allclose(actual, expected, atol=ATOL, rtol=RTOL), f"{what}: max abs err {err:.3g}, rel rms {rel:.3g}"


def _cached_logits(model, ids, prefill, step=1, attention_mask=None, fused=None):
    """Prefill ``prefill`` tokens, then feed the rest ``step`` tokens at a time through a HybridCache."""
    cache = HybridCache(model, fused=fused)
    outs = []
    T = ids.shape[1]
    bounds = [0, prefill, *range(prefill + step, T, step), T] if prefill < T else [0, T]
    for a, b in zip(bounds[:-1], bounds[1:]):
        kw = {} if attention_mask is None else {"attention_mask": attention_mask[:, :b]}
        if attention_mask is not None:
            pos = (attention_mask[:, :b].long().cumsum(-1) - 1).clamp_min(0)[:, a:b]
            kw["position_ids"] = pos
        out = model(input_ids=ids[:, a:b], **cache_kwargs(model, cache), use_cache=True, **kw)
        outs.append(out.logits)
    return torch.cat(outs, dim=1), cache


# --- the decode op against the naive reference -------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(KIND_SPANS))
@pytest.mark.parametrize("T,Tq,window", [(9, 1, 4), (20, 1, 4), (20, 5, 4), (7, 7, 8), (33, 3, 5)])
def test_decode_op_matches_naive(kind, T, Tq, window):
    """Queries at the end, older keys summed in the state, the last w (+ Tq) keys raw: the naive rows."""
    torch.manual_seed(0)
    B, H, Hkv, D, F = 2, 4, 2, 8, 6
    q, k, v = torch.randn(B, T, H, D), torch.randn(B, T, Hkv, D), torch.randn(B, T, Hkv, D)
    qf, kf = torch.rand(B, T, H, F), torch.rand(B, T, H, F)
    gamma = torch.rand(H)
    softmax, linear = KIND_SPANS[kind]
    ref = hybrid_attention_naive(q, k, v, qf, kf, gamma, window=window, softmax=softmax, linear=linear)
    ctx0 = max(0, T - Tq - window)  # keys before ctx0 live in the state
    S, z = torch.zeros(B, H, F, D), torch.zeros(B, H, F)
    hybrid_state_update(S, z, kf[:, :ctx0], v[:, :ctx0])
    out = hybrid_attention_decode(
        q[:, T - Tq :], k[:, ctx0:], v[:, ctx0:], qf[:, T - Tq :], kf[:, ctx0:], gamma, (S, z),
        window=window, softmax=softmax, linear=linear,
    )  # fmt: skip
    _assert_close(out, ref[:, T - Tq :], f"{kind} T={T} Tq={Tq} w={window}")


def test_decode_op_padding_keys_are_ignored():
    """Invalid keys in the context contribute nothing: same as the context without them."""
    torch.manual_seed(0)
    B, T, H, D, F, w = 1, 10, 2, 8, 4, 4
    q, k, v = torch.randn(B, T, H, D), torch.randn(B, T, H, D), torch.randn(B, T, H, D)
    qf, kf = torch.rand(B, T, H, F), torch.rand(B, T, H, F)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[:, :3] = False
    out = hybrid_attention_decode(q[:, -1:], k, v, qf[:, -1:], kf, None, None, valid, window=w)
    ref = hybrid_attention_naive(q[:, 3:], k[:, 3:], v[:, 3:], qf[:, 3:], kf[:, 3:], None, window=w)
    _assert_close(out, ref[:, -1:], "padding")


# --- the model: cached decoding equals one full forward -----------------------------------------------------------


@pytest.mark.parametrize("kind", list(KIND_SPANS))
@pytest.mark.parametrize("T,prefill", [(5, 2), (6, 3), (6, 6), (30, 4), (30, 1), (30, 17)])
def test_prefill_then_decode_equals_full_forward(kind, T, prefill):
    """window 6; lengths below, equal to and well above it; GQA (4 heads, 2 kv heads); fp32."""
    model, _ = _converted(kind=kind, window=6)
    ids = _ids(2, T)
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
        cached, _ = _cached_logits(model, ids, prefill)
    _assert_close(cached, full, f"{kind} T={T} prefill={prefill}")


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_other_architectures(arch):
    model, _ = _converted(kind="hybrid", window=5, arch=arch)
    ids = _ids(1, 20)
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
        cached, _ = _cached_logits(model, ids, 7)
    _assert_close(cached, full, arch)


def test_chunked_prefill_and_multi_token_steps(monkeypatch):
    """A long prompt is prefilled in chunks, and steps of several tokens work (speculative-style)."""
    import linearize.cache as cache_mod

    monkeypatch.setattr(cache_mod, "PREFILL_CHUNK", 5)
    monkeypatch.setattr(cache_mod.attend_recurrent, "__defaults__", (5,))
    model, _ = _converted(kind="hybrid", window=4)
    ids = _ids(2, 40)
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
        cached, _ = _cached_logits(model, ids, 23, step=3)
    _assert_close(cached, full, "chunks")


@pytest.mark.parametrize("mode", ["swa_only", "la_only", "no_attention"])
def test_ablation_modes_decode(mode):
    model, _ = _converted(kind="hybrid", window=4)
    ids = _ids(1, 16)
    with torch.no_grad(), attention_mode(model, mode):
        full = model(input_ids=ids, use_cache=False).logits
        cached, _ = _cached_logits(model, ids, 3)
    _assert_close(cached, full, mode)


def test_sinks_only_decoding_is_refused():
    model, _ = _converted(kind="hybrid", window=4)
    with torch.no_grad(), attention_mode(model, "sinks_only"), pytest.raises(ValueError, match="sinks_only"):
        _cached_logits(model, _ids(1, 8), 3)


# --- padding ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(KIND_SPANS))
def test_left_padded_batch_equals_rows_one_by_one(kind):
    """Batch of 2 (lengths 19 and 7, window 5), left padded: same logits as each row alone, with and without cache."""
    model, _ = _converted(kind=kind, window=5)
    long, short = _ids(1, 19, seed=1), _ids(1, 7, seed=2)
    pad = 19 - 7
    ids = torch.cat([long, torch.cat([torch.zeros(1, pad, dtype=torch.long), short], 1)])
    mask = torch.ones(2, 19, dtype=torch.long)
    mask[1, :pad] = 0
    extra = _ids(2, 6, seed=3)  # decoded continuation for both rows
    ids_all = torch.cat([ids, extra], 1)
    mask_all = torch.cat([mask, torch.ones(2, 6, dtype=torch.long)], 1)
    with torch.no_grad():
        ref_long = model(input_ids=torch.cat([long, extra[:1]], 1), use_cache=False).logits
        ref_short = model(input_ids=torch.cat([short, extra[1:]], 1), use_cache=False).logits
        pos = (mask_all.cumsum(-1) - 1).clamp_min(0)
        nocache = model(input_ids=ids_all, attention_mask=mask_all, position_ids=pos, use_cache=False).logits
        cached, _ = _cached_logits(model, ids_all, 19, attention_mask=mask_all)
    for name, got in (("no cache", nocache), ("cached", cached)):
        _assert_close(got[0], ref_long[0], f"{kind} {name} row 0")
        _assert_close(got[1, pad:], ref_short[0], f"{kind} {name} row 1")


def test_generate_left_padded_batch_matches_single_rows():
    """model.generate with a left-padded batch gives each row's own greedy continuation (HybridCache automatic)."""
    model, tok = _converted(kind="hybrid", window=4)
    tok.padding_side = "left"
    prompts = ["hello there, a longer prompt", "hi"]
    batch = tok(prompts, return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        out = model.generate(**batch, **kw)
        for i, p in enumerate(prompts):
            single = tok([p], return_tensors="pt")
            ref = model.generate(**single, **kw)[0, single["input_ids"].shape[1] :].tolist()
            got = out[i, batch["input_ids"].shape[1] :].tolist()
            # a row that hit eos early is padded in the batch
            assert got[: len(ref)] == ref and set(got[len(ref) :]) <= {tok.pad_token_id}


# --- generate() ---------------------------------------------------------------------------------------------------


def _greedy_reference(model, ids, n):
    """Greedy decoding by repeated full forwards without any cache."""
    for _ in range(n):
        with torch.no_grad():
            nxt = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
    return ids


@pytest.mark.parametrize("kind", list(KIND_SPANS))
def test_generate_uses_hybrid_cache_and_matches_uncached_greedy(kind):
    model, _ = _converted(kind=kind, window=4)
    ids = _ids(2, 9)
    seen = []
    orig = HybridCache.__init__

    def spy(self, m):
        seen.append(self)
        orig(self, m)

    HybridCache.__init__ = spy
    try:
        with torch.no_grad():
            out = model.generate(input_ids=ids, max_new_tokens=15, do_sample=False, pad_token_id=0)
    finally:
        HybridCache.__init__ = orig
    assert len(seen) == 1 and seen[0].get_seq_length() == 9 + 15 - 1
    assert out.tolist() == _greedy_reference(model, ids, 15).tolist()


def test_generate_sampling_runs_and_is_seeded():
    model, _ = _converted(kind="hybrid", window=4)
    ids = _ids(1, 5)
    kw = dict(max_new_tokens=10, do_sample=True, temperature=0.8, top_p=0.9, pad_token_id=0)
    with torch.no_grad():
        torch.manual_seed(3)
        a = model.generate(input_ids=ids, **kw)
        torch.manual_seed(3)
        b = model.generate(input_ids=ids, **kw)
    assert a.shape == (1, 15) and a.tolist() == b.tolist()


def test_cache_kwargs_names_the_forward_argument():
    """The keyword is one the installed transformers' forward takes, and the deprecated one only where it must be."""
    import inspect

    model, _ = _converted(kind="hybrid", window=4)
    cache = HybridCache(model)
    (name,) = cache_kwargs(model, cache)
    params = inspect.signature(type(model).forward).parameters
    assert name in params
    assert name == ("cache" if "cache" in params else "past_key_values")
    assert cache_kwargs(model, cache)[name] is cache


def test_explicit_dynamic_cache_is_exact_but_warns():
    from transformers import DynamicCache

    model, _ = _converted(kind="hybrid", window=4)
    ids = _ids(1, 12)
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
        cache = DynamicCache()
        a = model(input_ids=ids[:, :7], **cache_kwargs(model, cache), use_cache=True).logits
        with pytest.warns(RuntimeWarning, match="memory grows"):
            import linearize.cache as cache_mod

            cache_mod._warned = False
            b = model(input_ids=ids[:, 7:], **cache_kwargs(model, cache), use_cache=True).logits
    _assert_close(torch.cat([a, b], 1), full, "dynamic cache")


def test_static_cache_is_refused():
    model, _ = _converted(kind="hybrid", window=4)
    with torch.no_grad(), pytest.raises(ValueError, match="hybrid cache"):
        model.generate(input_ids=_ids(1, 5), max_new_tokens=3, cache_implementation="static", pad_token_id=0)


# --- memory ---------------------------------------------------------------------------------------------------------


def test_cache_memory_does_not_grow():
    model, _ = _converted(kind="hybrid", window=6)
    ids = _ids(2, 9)
    sizes = {}
    for n in (10, 50):
        cache = HybridCache(model)
        with torch.no_grad():
            model.generate(input_ids=ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                           **cache_kwargs(model, cache))  # fmt: skip
        assert cache.get_seq_length() == 9 + n - 1
        sizes[n] = cache.nbytes()
        tensors = [t for layer in cache.layers for t in (layer.keys, layer.values, layer.valid, layer.pos, layer.S,
                                                         layer.z)]  # fmt: skip
        assert sizes[n] == sum(t.numel() * t.element_size() for t in tensors)
    assert sizes[10] == sizes[50] > 0
    # ring of w + 1 keys/values of 2 rows + validity + position counters + state: nothing of size T
    cfg = model.config
    hd, H = cfg.hidden_size // cfg.num_attention_heads, cfg.num_attention_heads
    F = hybrid_layers(model)[0].k_map.out_features
    per_layer = 2 * 2 * cfg.num_key_value_heads * 7 * hd * 4 + 2 * 7 + 2 * H * 8 + 2 * H * F * (hd + 1) * 4
    assert sizes[10] == cfg.num_hidden_layers * per_layer


# --- a saved run directory round-trips ------------------------------------------------------------------------------


def test_generate_from_saved_run_dir(tmp_path, capsys):
    from peft import get_peft_model

    from linearize import finetune
    from linearize.attention import save_hybrid
    from linearize.generate import load_run
    from linearize.transfer import CHECKPOINT

    model_cfg = dict(name="tiny_llama", source="tiny", device="cpu", dtype="float32", gguf_path=None,
                     pretrained=None, tiny=dict(arch="llama", hidden_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                     max_position_embeddings=512, seed=0))  # fmt: skip
    cfg = OmegaConf.create(
        dict(
            model=model_cfg,
            attention=dict(kind="hybrid", window=4, sinks=4, backend="naive", gamma_init=0.3),
            feature_map=dict(name="t", activation="softmax", feature_dim=8, match_head_dim=False, signed=True,
                             bias=False, projection=True),
            finetune=dict(train_feature_maps=False, lora=dict(r=4, alpha=8, dropout=0.0,
                          target_modules=["q_proj", "v_proj"], layers=[])),
        )
    )  # fmt: skip
    from linearize.models import load_model

    model, tok = load_model(cfg.model)
    convert(model, cfg.attention, cfg.feature_map)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in hybrid_layers(model):
            layer.k_map.weight.copy_(torch.randn(layer.k_map.weight.shape, generator=g))
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    OmegaConf.save(cfg, run / "config.yaml")
    save_hybrid(model, run / "checkpoints" / CHECKPOINT)
    peft_model = get_peft_model(model, finetune.lora_config(cfg.finetune.lora))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    finetune.save(peft_model, cfg, run / "checkpoints")
    peft_model.eval()

    loaded, tok2 = load_run(run)
    ids = tok("The run directory", return_tensors="pt")["input_ids"]
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        expected = peft_model.generate(input_ids=ids, **kw)
        got = loaded.generate(input_ids=ids, **kw)
        # the loaded model is the trained one, not a fresh conversion
        _assert_close(loaded(input_ids=ids).logits, peft_model(input_ids=ids).logits, "loaded run")
    assert got.tolist() == expected.tolist()

    from linearize.generate import main

    main([f"run_dir={run}", "prompt=The run directory", "max_new_tokens=12", "temperature=0", "chat=false"])
    streamed = capsys.readouterr().out
    text = tok.decode(expected[0, ids.shape[1] :], skip_special_tokens=True).strip()
    assert len(text) >= 5 and text in streamed


def test_load_run_errors(tmp_path):
    from linearize.generate import load_run

    with pytest.raises(FileNotFoundError, match="run directory"):
        load_run(tmp_path / "nope")
    (tmp_path / "r").mkdir()
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        load_run(tmp_path / "r")


def test_beam_search_matches_uncached_beam_search():
    """Beam search reorders the hybrid cache between steps: same beams as beam search without any cache."""
    model, _ = _converted(kind="hybrid", window=4)
    ids = _ids(2, 7)
    kw = dict(max_new_tokens=10, num_beams=3, do_sample=False, pad_token_id=0, early_stopping=False)
    with torch.no_grad():
        cached = model.generate(input_ids=ids, **kw)
        uncached = model.generate(input_ids=ids, use_cache=False, **kw)
    assert cached.tolist() == uncached.tolist()


# --- the fused single-token step (kernels/hybrid_attention/decode_fused.py) in the model ----------------------------





# Imported at collection, before any test can import triton without the interpreter switch (triton's own @jit
# library functions are built interpreted or compiled when triton is first imported).
_FUSED = load_triton_module("decode_fused", interpret=not torch.cuda.is_available())
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # the fused step runs compiled on a GPU, interpreted on the CPU


@pytest.fixture
def fused_kernel(monkeypatch):
    """The fused kernel module (interpreted on CPU); counts its launches in ``fused_kernel.calls``."""
    mod = _FUSED
    if mod is None:
        pytest.skip("triton is not installed")
    if not torch.cuda.is_available():
        # Triton reads TRITON_INTERPRET again when a launch first imports its gluon modules: keep it set meanwhile
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    mod.calls = 0
    step = mod.hybrid_decode_step

    def counted(*a, **kw):
        mod.calls += 1
        return step(*a, **kw)

    monkeypatch.setattr(mod, "hybrid_decode_step", counted)
    return mod


@pytest.mark.parametrize("kind", list(KIND_SPANS))
@pytest.mark.parametrize("prefill", [1, 9])
def test_fused_decode_equals_full_forward(fused_kernel, kind, prefill):
    """Prefill, then single-token fused steps well past the window (w = 4, 30 tokens: the ring of 5 slots wraps 4-6
    times); GQA; fp32. Every decode step goes through the kernel (its launches are counted)."""
    model, _ = _converted(kind=kind, window=4)
    model, ids = model.to(DEV), _ids(2, 30).to(DEV)
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
        cached, _ = _cached_logits(model, ids, prefill, fused=True)
    single_token_forwards = 30 - prefill + (prefill == 1)  # a one-token prompt is a single-token step too
    assert fused_kernel.calls == single_token_forwards * model.config.num_hidden_layers
    _assert_close(cached, full, f"fused {kind} prefill={prefill}")


@pytest.mark.parametrize("mode", ["swa_only", "la_only", "no_attention"])
def test_fused_decode_ablation_modes(fused_kernel, mode):
    model, _ = _converted(kind="hybrid", window=4)
    model, ids = model.to(DEV), _ids(1, 16).to(DEV)
    with torch.no_grad(), attention_mode(model, mode):
        full = model(input_ids=ids, use_cache=False).logits
        cached, _ = _cached_logits(model, ids, 3, fused=True)
    assert fused_kernel.calls == 13 * model.config.num_hidden_layers
    _assert_close(cached, full, f"fused {mode}")


def test_fused_decode_mixed_with_multi_token_steps(fused_kernel):
    """Fused single-token steps, then a 3-token step (reference path, reading the ring the kernel wrote), then fused
    steps again: the ring and the position counter are shared by both paths."""
    model, _ = _converted(kind="hybrid", window=4)
    model, ids = model.to(DEV), _ids(2, 24).to(DEV)
    cache = HybridCache(model, fused=True)
    bounds = [0, 5, 6, 7, 8, 9, 12, 13, 14, 15, 16, 19, 20, 21, 22, 23, 24]
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
        outs = [model(input_ids=ids[:, a:b], **cache_kwargs(model, cache), use_cache=True).logits
                for a, b in zip(bounds[:-1], bounds[1:])]  # fmt: skip
    assert fused_kernel.calls == 13 * model.config.num_hidden_layers
    _assert_close(torch.cat(outs, 1), full, "fused + multi-token steps")


@pytest.mark.parametrize("kind", ["hybrid", "linear"])
def test_fused_decode_left_padded_batch(fused_kernel, kind):
    """Left-padded batch (lengths 19 and 7, window 5), decoded through the kernel: each row's own logits."""
    model, _ = _converted(kind=kind, window=5)
    model = model.to(DEV)
    long, short = _ids(1, 19, seed=1).to(DEV), _ids(1, 7, seed=2).to(DEV)
    pad = 19 - 7
    ids = torch.cat([long, torch.cat([torch.zeros(1, pad, dtype=torch.long, device=DEV), short], 1)])
    mask = torch.ones(2, 19, dtype=torch.long, device=DEV)
    mask[1, :pad] = 0
    extra = _ids(2, 12, seed=3).to(DEV)
    ids_all = torch.cat([ids, extra], 1)
    mask_all = torch.cat([mask, torch.ones(2, 12, dtype=torch.long, device=DEV)], 1)
    with torch.no_grad():
        ref_long = model(input_ids=torch.cat([long, extra[:1]], 1), use_cache=False).logits
        ref_short = model(input_ids=torch.cat([short, extra[1:]], 1), use_cache=False).logits
        cached, _ = _cached_logits(model, ids_all, 4, attention_mask=mask_all, fused=True)
    assert fused_kernel.calls == (31 - 4) * model.config.num_hidden_layers
    _assert_close(cached[0], ref_long[0], f"fused {kind} row 0")
    _assert_close(cached[1, pad:], ref_short[0], f"fused {kind} row 1")


def test_fused_generate_matches_reference_generate(fused_kernel):
    """generate() (greedy, a left-padded batch) with the fused step gives the reference path's tokens."""
    model, tok = _converted(kind="hybrid", window=4)
    tok.padding_side = "left"
    batch = tok(["hello there, a longer prompt", "hi"], return_tensors="pt", padding=True).to(DEV)
    model = model.to(DEV)
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        ref = model.generate(**batch, **cache_kwargs(model, HybridCache(model, fused=False)), **kw)
        assert fused_kernel.calls == 0
        got = model.generate(**batch, **cache_kwargs(model, HybridCache(model, fused=True)), **kw)
    assert fused_kernel.calls == 11 * model.config.num_hidden_layers
    assert got.tolist() == ref.tolist()


def test_fused_true_raises_when_the_kernel_cannot_run(fused_kernel):
    model, _ = _converted(kind="hybrid", window=4)
    with torch.no_grad():
        model.to(DEV, torch.float64)
        with pytest.raises(ValueError, match="fused decode step cannot run"):
            _cached_logits(model, _ids(1, 6).to(DEV), 3, fused=True)
