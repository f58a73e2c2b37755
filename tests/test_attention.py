"""The converted attention against independent references: HF's own softmax/sliding-window models and a
float64 per-position formula (DESIGN.md section 3)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import attn_cfg, fm_cfg, tiny

from linearize import attention as A
from linearize.kernels.hybrid_attention import hybrid_attention_naive


def hybrid_formula_f64(q, k, v, fq, fk, gamma, window, *, softmax=True, linear="outside"):
    """One query position and head at a time, in float64, straight from DESIGN.md section 3."""
    q, k, v, fq, fk, gamma = (x.double() for x in (q, k, v, fq, fk, gamma))
    B, T, H, D = q.shape
    group = H // k.shape[2]
    out = torch.zeros(B, T, H, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            kh, vh = k[b, :, h // group], v[b, :, h // group]
            for n in range(T):
                num = torch.zeros(v.shape[-1], dtype=torch.float64)
                den = torch.zeros((), dtype=torch.float64)
                if softmax:
                    lo = max(0, n - window + 1)
                    s = kh[lo : n + 1] @ q[b, n, h] / math.sqrt(D)
                    p = gamma[h] * torch.exp(s - s.max())
                    num += p @ vh[lo : n + 1]
                    den += p.sum()
                if linear != "none":
                    hi = n - window + 1 if linear == "outside" else n + 1
                    if hi > 0:
                        a = fk[b, :hi, h] @ fq[b, n, h]
                        num += a @ vh[:hi]
                        den += a.sum()
                out[b, n, h] = num / (den + 1e-12)
    return out


def random_inputs(B, T, H, KV, D, F, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, T, H, D, generator=g), torch.randn(B, T, KV, D, generator=g)
    v = torch.randn(B, T, KV, D, generator=g)
    fq = torch.rand(B, T, H, F, generator=g) + 0.05  # positive feature maps
    fk = torch.rand(B, T, H, F, generator=g) + 0.05
    gamma = torch.rand(H, generator=g) * 0.9 + 0.05
    return q, k, v, fq, fk, gamma


SPANS = [(True, "outside"), (True, "all"), (False, "all"), (True, "none")]


@pytest.mark.parametrize("T,window", [(1, 4), (7, 16), (33, 8), (63, 16)], ids=lambda x: str(x))
@pytest.mark.parametrize("H,KV", [(2, 2), (6, 2)], ids=["mha", "gqa3"])
@pytest.mark.parametrize("softmax,linear", SPANS, ids=["hybrid", "overlap", "linear", "swa"])
def test_naive_reference_matches_float64_formula(T, window, H, KV, softmax, linear):
    q, k, v, fq, fk, gamma = random_inputs(2, T, H, KV, 8, 5)
    got = hybrid_attention_naive(q, k, v, fq, fk, gamma, window=window, softmax=softmax, linear=linear)
    want = hybrid_formula_f64(q, k, v, fq, fk, gamma, window, softmax=softmax, linear=linear)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_window_covering_sequence_reproduces_hf_logits(arch):
    """With T <= w the linear terms are empty and gamma cancels: the hybrid is exactly softmax attention."""
    model, _ = tiny(arch)
    x = torch.randint(0, 250, (2, 37))
    with torch.no_grad():
        want = model(x).logits
        A.convert(model, attn_cfg(window=37), fm_cfg())
        for layer in A.hybrid_layers(model):  # a gamma far from its init must still cancel
            layer.theta.data.uniform_(-3, 3)
        shortcut = model(x).logits  # inference: run as SDPA (test_short_sequences_at_inference_skip_the_op)
    with torch.enable_grad():  # with autograd on, the hybrid op itself
        got = model(x).logits
    assert model.config._attn_implementation == A.IMPLEMENTATION
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(shortcut, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("mode", ["hybrid", "swa_only", "la_only"])
@pytest.mark.parametrize("T", [5, 8, 9])
@pytest.mark.parametrize("grad", [False, True])
def test_short_sequences_at_inference_skip_the_op(monkeypatch, mode, T, grad):
    """At inference a sequence no longer than the window has no linear term in hybrid and swa_only modes: it runs
    as SDPA (same output as the op), while la_only, longer sequences and anything under autograd take the op."""
    layer = A.HybridAttention(4, 2, 8, attn_cfg(window=8), fm_cfg())
    with torch.no_grad():
        layer.theta.uniform_(-2, 2)
    layer.mode = mode
    q, k, v, *_ = random_inputs(2, T, 4, 2, 8, 1)
    want = layer(q, k, v, scale=8**-0.5)  # autograd on: the op
    calls = []
    op = A.hybrid_attention
    monkeypatch.setattr(A, "hybrid_attention", lambda *a, **kw: calls.append(1) or op(*a, **kw))
    with torch.set_grad_enabled(grad):
        got = layer(q, k, v, scale=8**-0.5)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    skipped = not grad and T <= 8 and mode in ("hybrid", "swa_only")
    assert calls == ([] if skipped else [1])


def test_swa_only_matches_hf_sliding_window_model():
    """swa_only against Hugging Face's own Mistral sliding-window attention with the same weights."""
    window = 6
    model, _ = tiny("mistral")
    x = torch.randint(0, 250, (2, 29))
    model.config.sliding_window = window
    model.set_attn_implementation("eager")
    with torch.no_grad():
        want = model(x).logits
    model.config.sliding_window = None
    A.convert(model, attn_cfg(window=window), fm_cfg())
    with torch.no_grad(), A.attention_mode(model, "swa_only"):
        got = model(x).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_ablation_switches_change_exactly_what_they_should(tiny_llama):
    model, _ = tiny_llama
    window, T = 8, 30
    x = torch.randint(0, 250, (1, T))
    with torch.no_grad():
        base = model(x).logits
        A.convert(model, attn_cfg(window=window), fm_cfg())
        hybrid = model(x).logits
        with A.attention_mode(model, "swa_only"):
            swa = model(x).logits
        with A.attention_mode(model, "la_only"):
            la = model(x).logits
        with A.attention_mode(model, "no_attention"):
            none = model(x).logits
        with A.attention_mode(model, "sinks_only"):
            sinks = model(x).logits
    assert all(layer.mode == "hybrid" for layer in A.hybrid_layers(model)), "mode must be restored"
    # Before the window fills, hybrid = swa_only = base; after it, the linear terms change the output.
    torch.testing.assert_close(hybrid[:, :window], base[:, :window], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(swa[:, :window], base[:, :window], atol=2e-5, rtol=2e-5)
    assert (hybrid[:, window:] - swa[:, window:]).abs().amax() > 1e-3
    # la_only differs everywhere but the first token (a single key: every attention gives v_0).
    torch.testing.assert_close(la[:, 0], base[:, 0], atol=2e-5, rtol=2e-5)
    assert (la[:, 1:] - hybrid[:, 1:]).abs().amax(-1).min() > 1e-4
    # sinks_only (4 sink tokens here) = base over the first 4 positions.
    torch.testing.assert_close(sinks[:, :4], base[:, :4], atol=2e-5, rtol=2e-5)
    assert (sinks[:, 4:] - base[:, 4:]).abs().amax() > 1e-3
    # no_attention: every attention output is zero, as if o_proj saw zeros.
    hooks = [m.o_proj.register_forward_pre_hook(lambda mod, args: (torch.zeros_like(args[0]),))
             for m in A.attention_modules(model)]
    with torch.no_grad(), A.softmax_attention(model):
        zeroed = model(x).logits
    for h in hooks:
        h.remove()
    torch.testing.assert_close(none, zeroed, atol=1e-5, rtol=1e-5)


def test_la_only_layer_matches_linear_attention_formula():
    """One converted layer in la_only mode = phi(q) S / phi(q) z over the full prefix, computed in float64."""
    model, _ = tiny("llama", heads=4, kv_heads=2)
    A.convert(model, attn_cfg(window=4), fm_cfg())
    layer = A.hybrid_layers(model)[0]
    q, k, v, *_ = random_inputs(1, 21, 4, 2, 16, 1)
    fq, fk = layer.features(q, k)
    with torch.no_grad():
        layer.mode = "la_only"
        got = layer(q, k, v, scale=16**-0.5)
    want = hybrid_formula_f64(q, k, v, fq, fk, layer.gamma, 4, softmax=False, linear="all")
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_hedgehog_feature_map():
    from linearize.attention import FeatureMap

    fm = FeatureMap(3, 8, fm_cfg(feature_dim=8))
    x = torch.randn(2, 5, 3, 8)
    phi = fm(x)
    assert phi.shape == (2, 5, 3, 16)
    # identity init: z = x, phi = [softmax(x), softmax(-x)] with two separate softmaxes
    torch.testing.assert_close(phi, torch.cat([x.softmax(-1), (-x).softmax(-1)], -1))
    half = FeatureMap(3, 8, fm_cfg(feature_dim=4))
    assert half(x).shape[-1] == 8
    torch.testing.assert_close(half(x)[..., :4], x[..., :4].softmax(-1))


@pytest.mark.parametrize("activation", ["exp", "relu", "elu", "identity"])
def test_other_feature_maps(activation):
    from linearize.attention import FeatureMap

    signed = activation in ("exp", "identity")
    fm = FeatureMap(2, 4, fm_cfg(activation, feature_dim=4, signed=signed))
    x = torch.randn(1, 3, 2, 4)
    z = torch.cat([x, -x], -1) if signed else x
    want = {
        "exp": torch.exp(z - z.amax(-1, keepdim=True)),
        "relu": torch.relu(z),
        "elu": 1 + torch.nn.functional.elu(z),
        "identity": z,
    }[activation]
    torch.testing.assert_close(fm(x), want)


def test_mode_rejects_unknown_name(tiny_llama):
    model, _ = tiny_llama
    A.convert(model, attn_cfg(), fm_cfg())
    with pytest.raises(ValueError, match="not one of"):
        A.set_mode(model, "swa")
