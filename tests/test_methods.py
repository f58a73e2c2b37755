"""The paper's methods: SSD (schedule, granularities, exactness at p = 0 / 1, reset), the weight_xent transfer
objective, inference-time hybridisation (eval.kinds) and the method presets, on tiny in-memory models.

    pytest tests/test_methods.py
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from linearize import finetune, ssd, transfer
from linearize.attention import HybridAttention, attention_kind, convert, hybrid_layers
from linearize.data import PackedData
from linearize.kernels.hybrid_attention import hybrid_attention_naive

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
METHODS = ("lolcats", "hedgecats", "ssd", "inference_hybrid")


def _attn(kind="hybrid", window=4):
    return OmegaConf.create(dict(kind=kind, window=window, sinks=2, backend="naive", gamma_init=0.3))


def _fm(activation="softmax", feature_dim=6):
    return OmegaConf.create(
        dict(name=activation, activation=activation, feature_dim=feature_dim, match_head_dim=False, signed=True,
             bias=False, projection=True)
    )  # fmt: skip


def _layer(kind="hybrid", window=4, heads=4, kv_heads=2, head_dim=8, seed=0):
    torch.manual_seed(seed)
    layer = HybridAttention(heads, kv_heads, head_dim, _attn(kind, window), _fm())
    with torch.no_grad():  # away from the identity init so q and k maps differ
        layer.q_map.weight.add_(0.3 * torch.randn_like(layer.q_map.weight))
        layer.k_map.weight.add_(0.3 * torch.randn_like(layer.k_map.weight))
    layer.layer_idx = 0
    return layer


def _qkv(B=3, T=13, heads=4, kv_heads=2, D=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, T, heads, D, generator=g),
        torch.randn(B, T, kv_heads, D, generator=g),
        torch.randn(B, T, kv_heads, D, generator=g),
    )


def _reference(layer, q, k, v, softmax, linear):
    """hybrid_attention_naive called directly, with phi applied here (GQA-repeated keys) rather than by the layer."""
    k_rep = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    return hybrid_attention_naive(
        q, k, v, layer.q_map(q), layer.k_map(k_rep), layer.gamma, window=layer.window, softmax=softmax, linear=linear
    )


def _ssd_cfg(**kw):
    base = dict(enabled=True, probs=[0.9, 0.75, 0.5], boundaries=[], windows=[], granularity="step",
                stages=["transfer", "finetune"], seed=0)  # fmt: skip
    base.update(kw)
    return OmegaConf.create(base)


# ---------------------------------------------------------------- SSD: exactness at p = 1 and p = 0


@pytest.mark.parametrize("granularity", ["step", "layer", "sequence"])
@pytest.mark.parametrize("kind,span", [("hybrid", "outside"), ("hybrid_overlap", "all")])
def test_ssd_p1_is_linear_only_p0_is_hybrid(kind, span, granularity):
    layer = _layer(kind)
    q, k, v = _qkv()
    scale = q.shape[-1] ** -0.5
    linear_only = _reference(layer, q, k, v, softmax=False, linear="all")
    hybrid = _reference(layer, q, k, v, softmax=True, linear=span)
    assert (linear_only - hybrid).abs().max() > 1e-3  # the two references differ, so the test can fail
    for p, expected in ((1.0, linear_only), (0.0, hybrid)):
        s = ssd.SSD(_ssd_cfg(probs=[p], granularity=granularity), [layer], "finetune", batch_size=q.shape[0])
        metrics = s.before_step(0, 10)
        s.next_micro_batch(q.shape[0])
        assert metrics["ssd/p"] == p and metrics["ssd/drop_rate"] == p
        torch.testing.assert_close(layer(q, k, v, scale), expected, rtol=0, atol=1e-6)
        s.reset()
        torch.testing.assert_close(layer(q, k, v, scale), hybrid, rtol=0, atol=1e-6)


def test_sequence_mask_selects_per_sequence():
    layer = _layer("hybrid")
    q, k, v = _qkv(B=4)
    scale = q.shape[-1] ** -0.5
    linear_only = _reference(layer, q, k, v, softmax=False, linear="all")
    hybrid = _reference(layer, q, k, v, softmax=True, linear="outside")
    mask = torch.tensor([True, False, False, True])
    layer.drop_mask = mask
    out = layer(q, k, v, scale)
    torch.testing.assert_close(out[mask], linear_only[mask], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[~mask], hybrid[~mask], rtol=0, atol=1e-6)
    layer.drop_mask = torch.tensor([True, False])
    with pytest.raises(ValueError, match="drop_mask has shape"):
        layer(q, k, v, scale)


def test_dropped_layer_has_no_zero_division_before_the_window():
    """Dropped: linear attention over the whole prefix, so position 0 (no key outside the window) is finite."""
    layer = _layer("hybrid", window=64)
    q, k, v = _qkv(T=10)
    layer.drop_swa = True
    out = layer(q, k, v, q.shape[-1] ** -0.5)
    assert torch.isfinite(out).all() and out[:, 0].abs().sum() > 0


def test_ssd_in_a_model_matches_la_only_ablation():
    model, _ = _tiny()
    convert(model, _attn("hybrid", 4), _fm())
    ids = torch.randint(0, 200, (2, 12))
    with torch.no_grad():
        from linearize.attention import attention_mode

        with attention_mode(model, "la_only"):
            la_only = model(input_ids=ids).logits
        hybrid = model(input_ids=ids).logits
        s = ssd.SSD(_ssd_cfg(probs=[1.0]), hybrid_layers(model), "transfer")
        s.before_step(0, 1)
        dropped = model(input_ids=ids).logits
        s.reset()
        after = model(input_ids=ids).logits
    assert (la_only - hybrid).abs().max() > 1e-4
    torch.testing.assert_close(dropped, la_only)
    torch.testing.assert_close(after, hybrid)


# ---------------------------------------------------------------- SSD: schedule, rates, granularity, seeding


def test_schedule_switches_at_configured_steps():
    s = ssd.Schedule([0.9, 0.5, 0.1], [0.2, 0.7])
    assert s.starts(10) == [0, 2, 7]
    assert [s.p(t, 10) for t in range(10)] == [0.9, 0.9, 0.5, 0.5, 0.5, 0.5, 0.5, 0.1, 0.1, 0.1]
    equal = ssd.Schedule([0.9, 0.75, 0.5])
    assert [equal.p(t, 9) for t in range(9)] == [0.9] * 3 + [0.75] * 3 + [0.5] * 3
    assert [equal.phase(t, 30) for t in (9, 10, 19, 20, 29)] == [0, 1, 1, 2, 2]


def test_window_schedule_is_applied_and_restored():
    layers = [_layer(window=4), _layer(window=4)]
    s = ssd.SSD(_ssd_cfg(probs=[0.0, 0.0], windows=[2, 3]), layers, "finetune")
    seen = []
    for t in range(4):
        metrics = s.before_step(t, 4)
        seen.append((metrics["ssd/window"], [layer.window for layer in layers]))
    assert seen == [(2.0, [2, 2]), (2.0, [2, 2]), (3.0, [3, 3]), (3.0, [3, 3])]
    s.reset()
    assert [layer.window for layer in layers] == [4, 4]


@pytest.mark.parametrize("granularity,coins_per_step", [("step", 1), ("layer", 6), ("sequence", 3 * 2)])
def test_realised_drop_rate_matches_schedule(granularity, coins_per_step):
    layers = [_layer() for _ in range(6)]
    total = 1500
    s = ssd.SSD(_ssd_cfg(granularity=granularity), layers, "finetune", micro_batches=3, batch_size=2)
    rates: dict[float, list[float]] = {}
    for t in range(total):
        m = s.before_step(t, total)
        rates.setdefault(m["ssd/p"], []).append(m["ssd/drop_rate"])
    assert sorted(rates) == [0.5, 0.75, 0.9]
    for p, values in rates.items():
        n = len(values) * coins_per_step
        realised = sum(values) / len(values)
        bound = 4.5 * math.sqrt(p * (1 - p) / n)  # ~1e-5 two-sided false-alarm probability per phase
        assert abs(realised - p) < bound, (p, realised, bound)


def test_granularities_behave_as_specified():
    layers = [_layer() for _ in range(8)]
    step = ssd.SSD(_ssd_cfg(probs=[0.5]), layers, "finetune")
    outcomes = set()
    for t in range(40):
        step.before_step(t, 40)
        flags = {layer.drop_swa for layer in layers}
        assert len(flags) == 1  # one coin for every layer
        outcomes |= flags
    assert outcomes == {True, False}

    per_layer = ssd.SSD(_ssd_cfg(probs=[0.5], granularity="layer"), layers, "finetune")
    mixed = 0
    for t in range(40):
        per_layer.before_step(t, 40)
        mixed += len({layer.drop_swa for layer in layers}) == 2
    assert mixed > 30  # 8 independent coins disagree in all but 2^-7 of steps

    per_seq = ssd.SSD(_ssd_cfg(probs=[0.5], granularity="sequence"), layers, "finetune", micro_batches=2, batch_size=5)
    per_seq.before_step(0, 1)
    assert not any(layer.drop_swa for layer in layers)
    masks = []
    for _ in range(2):
        per_seq.next_micro_batch(5)
        assert all(layer.drop_mask is layers[0].drop_mask for layer in layers)
        masks.append(layers[0].drop_mask.clone())
    assert all(m.shape == (5,) and m.dtype == torch.bool for m in masks)
    with pytest.raises(RuntimeError, match="more micro-batches"):
        per_seq.next_micro_batch(5)


def test_ssd_is_seeded():
    def draws(seed, stage="finetune"):
        layers = [_layer() for _ in range(3)]
        s = ssd.SSD(_ssd_cfg(granularity="layer", seed=seed), layers, stage)
        out = []
        for t in range(30):
            s.before_step(t, 30)
            out.append(tuple(layer.drop_swa for layer in layers))
        return out

    assert draws(0) == draws(0)
    assert draws(0) != draws(1)
    assert draws(0, "transfer") != draws(0, "finetune")


def test_schedule_context_resets_even_on_error_and_skips_other_stages():
    layers = [_layer(window=4) for _ in range(2)]
    cfg = OmegaConf.create(
        dict(ssd=_ssd_cfg(probs=[1.0], windows=[2], stages=["finetune"]), finetune=dict(batch_size=1, grad_accum=1))
    )
    with ssd.schedule(cfg, layers, "transfer") as s:
        assert s is None
    with pytest.raises(KeyError):
        with ssd.schedule(cfg, layers, "finetune") as s:
            s.before_step(0, 1)
            assert all(layer.drop_swa and layer.window == 2 for layer in layers)
            raise KeyError("boom")
    assert all(not layer.drop_swa and layer.drop_mask is None and layer.window == 4 for layer in layers)


def test_ssd_rejects_bad_configs():
    with pytest.raises(ValueError, match="boundaries"):
        ssd.Schedule([0.9, 0.5], [0.5, 0.7])
    with pytest.raises(ValueError, match="probs"):
        ssd.Schedule([1.5])
    with pytest.raises(ValueError, match="attention.kind=\\['linear'\\]"):
        ssd.SSD(_ssd_cfg(), [_layer("linear")], "finetune")


# ---------------------------------------------------------------- weight_xent


def _kl_reference(q, k, q_feat, k_feat, scale):
    """Full T x T matrices, torch's own KL: sum P (log P - log A) over causal keys, mean over rows."""
    H = q.shape[2]
    k = k.repeat_interleave(H // k.shape[2], dim=2)
    T = q.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    s = torch.einsum("bnhd,bjhd->bhnj", q.double(), k.double()) * scale
    log_p = s.masked_fill(~causal, float("-inf")).log_softmax(-1)
    a = torch.einsum("bnhf,bjhf->bhnj", q_feat.double(), k_feat.double()) * causal
    a = a / a.sum(-1, keepdim=True)
    kl = torch.nn.functional.kl_div(a.clamp_min(1e-300).log(), log_p, log_target=True, reduction="none")
    return kl.masked_fill(~causal, 0).sum(-1).mean()


def _matching_case(B=2, T=11, H=2, D=5, c=1.7):
    """Keys c * one-hot: q_n . k_j * scale = c * scale * q_n[idx_j], so phi(q) = exp(c * scale * q), phi(k) =
    one-hot(idx_j) makes phi(q_n) . phi(k_j) = exp(s_nj) exactly: linear attention = softmax attention."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, T, H, D, generator=g, dtype=torch.float64)
    idx = torch.randint(0, D, (B, T, H), generator=g)
    one_hot = torch.nn.functional.one_hot(idx, D).double()
    k = c * one_hot
    scale = D**-0.5
    return q, k, torch.exp(c * scale * q), one_hot, scale


@pytest.mark.parametrize("chunk", [1, 4, 11, 256])
def test_weight_xent_zero_when_linear_equals_softmax(chunk):
    q, k, q_feat, k_feat, scale = _matching_case()
    loss = transfer.attention_weight_kl(q, k, q_feat, k_feat, scale, chunk=chunk)
    assert abs(loss.item()) < 1e-6
    noisy = q_feat * torch.exp(0.5 * torch.randn_like(q_feat))
    off = transfer.attention_weight_kl(q, k, noisy, k_feat, scale, chunk=chunk)
    assert off.item() > 1e-3
    torch.testing.assert_close(off.double(), _kl_reference(q, k, noisy, k_feat, scale), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("chunk", [3, 5, 64])
def test_weight_xent_chunks_match_full_matrices_and_chunked_backward(chunk):
    layer = _layer()
    q, k, _ = _qkv(T=13)
    scale = q.shape[-1] ** -0.5
    q_feat, k_feat = layer.features(q, k)
    reference = _kl_reference(q, k, q_feat, k_feat, scale)
    loss = transfer.attention_weight_kl(q, k, q_feat, k_feat, scale, chunk=chunk)
    torch.testing.assert_close(loss.double(), reference, rtol=1e-4, atol=1e-6)
    grads = torch.autograd.grad(reference, [layer.q_map.weight, layer.k_map.weight])

    q_feat, k_feat = layer.features(q, k)
    detached = transfer.attention_weight_kl(q, k, q_feat, k_feat, scale, chunk=chunk, backward_scale=2.0)
    assert not detached.requires_grad
    for grad, param in zip(grads, (layer.q_map.weight, layer.k_map.weight)):
        torch.testing.assert_close(param.grad, 2.0 * grad.float(), rtol=1e-4, atol=1e-6)


def test_weight_xent_gradient_reaches_only_the_feature_maps():
    layer = _layer()
    layer.requires_grad_(True)
    q, k, v = (x.requires_grad_(True) for x in _qkv())
    hook = transfer.TeacherForcing(OmegaConf.create(dict(mse_weight=0.0, xent_weight=1.0, xent_chunk=4)))
    hook.backward = True
    teacher = hook(layer, q, k, v, q.shape[-1] ** -0.5)
    assert not teacher.requires_grad
    assert layer.q_map.weight.grad.abs().sum() > 0 and layer.k_map.weight.grad.abs().sum() > 0
    assert layer.theta.grad is None
    assert q.grad is None and k.grad is None and v.grad is None
    losses = hook.collect()
    assert set(losses) == {"mse", "xent"} and losses["xent"].item() > 0


@pytest.mark.parametrize("kind,softmax,span", [("hybrid", True, "outside"), ("linear", False, "all")])
def test_output_mse_follows_attention_kind(kind, softmax, span):
    layer = _layer(kind)
    q, k, v = _qkv()
    scale = q.shape[-1] ** -0.5
    hook = transfer.TeacherForcing(OmegaConf.create(dict(mse_weight=1.0, xent_weight=0.0, xent_chunk=4)))
    hook(layer, q, k, v, scale)
    teacher = transfer.softmax_heads(q, k, v, scale)
    expected = torch.nn.functional.mse_loss(_reference(layer, q, k, v, softmax, span), teacher)
    torch.testing.assert_close(hook.collect()["mse"][0], expected)


# ---------------------------------------------------------------- inference-time hybridisation


def test_attention_kind_switches_and_restores():
    model, _ = _tiny()
    convert(model, _attn("linear", 4), _fm())
    layer = hybrid_layers(model)[0]
    q, k, v = _qkv(heads=4, kv_heads=2, D=16)
    layer_ref = _reference(layer, q, k, v, softmax=True, linear="outside")
    with attention_kind(model, "hybrid"):
        assert {x.kind for x in hybrid_layers(model)} == {"hybrid"}
        torch.testing.assert_close(layer(q, k, v, 16**-0.5), layer_ref, rtol=0, atol=1e-6)
    assert {x.kind for x in hybrid_layers(model)} == {"linear"}
    from linearize.evaluate import kind_rows

    assert kind_rows(model, ["hybrid", "hybrid_overlap", "linear"]) == {
        "hybrid@linear": "hybrid",
        "hybrid_overlap@linear": "hybrid_overlap",
    }
    with pytest.raises(ValueError, match="softmax"):
        with attention_kind(model, "softmax"):
            pass


# ---------------------------------------------------------------- presets


def _compose(overrides):
    from hydra import compose, initialize_config_dir

    from linearize.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _tiny():
    from linearize.models import byte_tokenizer, tiny_model

    tiny = OmegaConf.create(dict(arch="llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256, seed=0))  # fmt: skip
    tok = byte_tokenizer()
    return tiny_model(tiny, vocab_size=len(tok)).eval(), tok


@pytest.mark.parametrize("method", METHODS)
def test_preset_header_is_its_command(method):
    lines = (CONF_DIR / "method" / f"{method}.yaml").read_text().splitlines()
    assert lines[0] == "# @package _global_"
    assert lines[1] == f"# python -m linearize.train method={method}"


def test_presets_compose_as_documented():
    from linearize.config import validate

    cfgs = {m: _compose([f"method={m}", "model=tiny_llama"]) for m in METHODS}
    for cfg in cfgs.values():
        validate(cfg)
    assert cfgs["lolcats"].transfer.mse_weight == 1000 and cfgs["lolcats"].transfer.xent_weight == 0
    assert not cfgs["lolcats"].ssd.enabled and cfgs["lolcats"].attention.kind == "hybrid"
    hc = cfgs["hedgecats"]
    assert hc.transfer.mse_weight == 0 and hc.transfer.xent_weight > 0
    assert list(hc.finetune.lora.target_modules) == ["q_proj", "k_proj", "v_proj"] and hc.finetune.patience == 1
    s = cfgs["ssd"]
    assert s.ssd.enabled and list(s.ssd.probs) == [0.9, 0.75, 0.5] and list(s.ssd.stages) == ["transfer", "finetune"]
    ih = cfgs["inference_hybrid"]
    assert ih.attention.kind == "linear" and list(ih.eval.kinds) == ["hybrid", "hybrid_overlap"]
    # composes with the other axes; the command line wins over the preset
    over = _compose(["method=hedgecats", "transfer=lolcats", "feature_map=exp", "attention.window=32", "ssd=default"])
    assert over.transfer.seq_len == 1024 and over.transfer.xent_weight > 0 and over.feature_map.activation == "exp"
    assert over.attention.window == 32 and over.ssd.enabled
    # SSD on top of the default method, as DESIGN.md and the entrypoint's docstring write it
    default = _compose(["model=mistral7b", "ssd=default"])
    validate(default)
    assert default.ssd.enabled and default.method.name == "lolcats" and default.model.name == "mistral7b"


def test_validate_names_bad_method_values():
    from linearize.config import validate

    with pytest.raises(ValueError, match="eval.kinds"):
        validate(_compose(["model=tiny_llama", "eval.kinds=[softmax]"]))
    with pytest.raises(ValueError, match="xent_weight"):
        validate(_compose(["model=tiny_llama", "transfer.mse_weight=0"]))
    with pytest.raises(ValueError, match="ssd.enabled"):
        validate(_compose(["model=tiny_llama", "method=inference_hybrid", "ssd=default"]))


def _random_data(seq_len=32, n_train=8, n_val=2):
    g = torch.Generator().manual_seed(0)
    return PackedData(
        train=torch.randint(0, 256, (n_train, seq_len), generator=g),
        val=torch.randint(0, 256, (n_val, seq_len), generator=g),
        source="random",
    )


@pytest.mark.parametrize("method", METHODS)
def test_preset_runs_a_few_steps(method, tmp_path):
    budget = [f"{stage}.{key}={value}" for stage in ("transfer", "finetune")
              for key, value in (("max_steps", 2), ("batch_size", 2), ("grad_accum", 2), ("eval_every", 1),
                                 ("val_batches", 1), ("seq_len", 32))]  # fmt: skip
    cfg = _compose([f"method={method}", "model=tiny_llama", "attention.window=8", "ssd.granularity=sequence", *budget])
    model, _ = _tiny()
    convert(model, cfg.attention, cfg.feature_map)
    before = {n: p.clone() for n, p in model.named_parameters() if ".hybrid." in n}
    logged = []
    data = _random_data()
    metrics = transfer.run(model, cfg, data, out_dir=tmp_path, log_fn=logged.append)
    assert metrics["transfer/steps"] == 2 and math.isfinite(metrics["transfer/best_val_loss"])
    changed = {n for n, p in model.named_parameters() if ".hybrid." in n and not torch.equal(p, before[n])}
    assert any("q_map" in n for n in changed) and any("k_map" in n for n in changed)
    # gamma moves only through the output MSE of a layer that has a window (xent and linear-only never use it)
    assert any("theta" in n for n in changed) == (cfg.transfer.mse_weight > 0 and cfg.attention.kind != "linear")
    keys = set().union(*logged)
    assert "transfer/mse" in keys and ("transfer/xent" in keys) == (cfg.transfer.xent_weight > 0)
    peft_model, fmetrics = finetune.run(model, cfg, data, out_dir=tmp_path, log_fn=logged.append)
    assert fmetrics["finetune/steps"] >= 1
    ssd_logs = [m for m in logged if "ssd/p" in m]
    if method == "ssd":
        assert len(ssd_logs) == 4 and all(0.0 <= m["ssd/drop_rate"] <= 1.0 for m in ssd_logs)  # 2 steps x 2 stages
    else:
        assert not ssd_logs
    for layer in hybrid_layers(peft_model):  # nothing leaks into evaluation
        assert not layer.drop_swa and layer.drop_mask is None and layer.window == 8
        assert layer.kind == cfg.attention.kind
