"""Hybrid linear + sliding-window attention for Hugging Face decoders, through transformers' attention interface.

Conversion attaches a :class:`HybridAttention` (feature maps phi_q, phi_k and the per-head gamma) to every
attention module as ``self_attn.hybrid`` and switches the model's ``attn_implementation`` to ``"linearize_hybrid"``.
Projections, RoPE and the KV cache stay Hugging Face's own; only the attention op changes. The math is in
``kernels/hybrid_attention/README.md`` and DESIGN.md section 3.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from linearize.kernels.hybrid_attention import hybrid_attention
from linearize.kernels.hybrid_attention.naive import repeat_kv

IMPLEMENTATION = "linearize_hybrid"
MODES = ("hybrid", "swa_only", "la_only", "sinks_only", "no_attention")
KINDS = ("hybrid", "hybrid_overlap", "linear")


class FeatureMap(nn.Module):
    """phi(x) for one projection (q or k) of one layer, a separate map per head.

    z = x W_h (+ b_h), W_h: [D, f] initialised to the identity (first f coordinates);
    phi = [act(z), act(-z)] when ``signed`` (2f features, Hedgehog) else act(z) (f features).
    ``softmax`` normalises each half over its f features; ``exp`` subtracts the per-token max first.
    """

    def __init__(self, n_heads: int, head_dim: int, cfg: DictConfig):
        super().__init__()
        self.activation = cfg.activation
        self.signed = cfg.signed
        f = head_dim if cfg.match_head_dim or not cfg.projection else cfg.feature_dim
        self.weight = None
        if cfg.projection:
            self.weight = nn.Parameter(torch.empty(n_heads, head_dim, f))
            for h in range(n_heads):
                nn.init.eye_(self.weight.data[h])
        self.bias = nn.Parameter(torch.zeros(n_heads, f)) if cfg.bias else None
        self.out_features = 2 * f if self.signed else f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, H, D] -> [B, T, H, F] in float32."""
        z = x.float()
        if self.weight is not None:
            z = torch.einsum("bthd,hdf->bthf", z, self.weight.float())
        if self.bias is not None:
            z = z + self.bias.float()
        if self.signed:
            if self.activation == "softmax":  # two separate softmaxes, not one over 2f features
                return torch.cat([z.softmax(-1), (-z).softmax(-1)], dim=-1)
            z = torch.cat([z, -z], dim=-1)
        if self.activation == "softmax":
            return z.softmax(-1)
        if self.activation == "exp":
            return torch.exp(z - z.amax(-1, keepdim=True).detach())
        if self.activation == "relu":
            return F.relu(z)
        if self.activation == "elu":
            return 1.0 + F.elu(z)
        return z




def softmax_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal softmax attention (SDPA), [B, T, H, D] q and [B, T, Hkv, D] k/v -> [B, T, H, D]."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=scale, enable_gqa=True
    )
    return out.transpose(1, 2)


def _softmax_window_only(q, k, v, scale: float, n_keys: int) -> torch.Tensor:
    """Softmax attention restricted to the first ``n_keys`` keys (attention sinks). [B, T, H, D] layout."""
    H = q.shape[2]
    ks = repeat_kv(k[:, :n_keys], H).float()
    vs = repeat_kv(v[:, :n_keys], H).float()
    s = torch.einsum("bnhd,bjhd->bhnj", q.float(), ks) * scale
    pos = torch.arange(q.shape[1], device=q.device)
    s = s.masked_fill(pos[None, :n_keys] > pos[:, None], float("-inf"))
    return torch.einsum("bhnj,bjhd->bnhd", s.softmax(-1), vs).to(v.dtype)


class HybridAttention(nn.Module):
    """Trainable parts of one converted attention layer and the op that uses them.

    ``kind`` is what the layer was converted to (hybrid, hybrid_overlap, linear); ``mode`` is the inference
    switch for component ablations (hybrid = as converted). ``drop_swa`` is set by SSD during training: the
    layer then computes linear attention over the whole prefix.
    """

    def __init__(self, n_heads: int, n_kv_heads: int, head_dim: int, attn_cfg: DictConfig, fm_cfg: DictConfig):
        super().__init__()
        if attn_cfg.kind not in KINDS:
            raise ValueError(f"attention.kind={attn_cfg.kind!r} cannot be converted; expected one of {KINDS}")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.kind = attn_cfg.kind
        self.window = attn_cfg.window
        self.sinks = attn_cfg.sinks
        self.backend = attn_cfg.backend
        self.q_map = FeatureMap(n_heads, head_dim, fm_cfg)
        self.k_map = FeatureMap(n_heads, head_dim, fm_cfg)
        g = attn_cfg.gamma_init
        self.theta = nn.Parameter(torch.full((n_heads,), math.log(g / (1.0 - g))))
        self.mode = "hybrid"
        self.drop_swa = False
        # SSD at sequence granularity: [B] bool, True where that sequence's SWA branch is dropped (mode hybrid only)
        self.drop_mask: torch.Tensor | None = None
        self.transfer_hook = None  # set by the transfer stage: (module, q, k, v, scale) -> output

    @property
    def gamma(self) -> torch.Tensor:
        return torch.sigmoid(self.theta)

    def spans(self) -> tuple[bool, str]:
        """(softmax window on?, keys covered by the linear terms) for the current kind, mode and SSD state."""
        if self.mode == "swa_only":
            return True, "none"
        if self.mode == "la_only" or self.drop_swa or self.kind == "linear":
            return False, "all"
        return True, ("outside" if self.kind == "hybrid" else "all")

    def features(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """phi(q), phi(k) for q [B, T, H, D], k [B, T, Hkv, D]; the k map runs on GQA-repeated keys."""
        return self.q_map(q), self.k_map(repeat_kv(k, self.n_heads))

    def attend(self, q, k, v, scale: float, softmax: bool, linear: str) -> torch.Tensor:
        """Hybrid attention with explicit spans. q [B, T, H, D], k/v [B, T, Hkv, D] -> [B, T, H, D].

        At inference (no autograd), a sequence no longer than the window with the softmax terms on and no linear
        term (``linear`` "none", or "outside" where no key lies outside any query's window) is plain causal
        softmax attention: gamma multiplies the numerator and the normaliser alike, so it runs as SDPA instead of
        the op (the same values up to float rounding; on a CPU the op's T x T float32 path and the feature maps
        cost a short-sequence forward a quarter of its time). Training keeps the op, so gradients never change.
        """
        if softmax and q.shape[1] <= self.window and linear in ("none", "outside") and not torch.is_grad_enabled():
            return softmax_heads(q, k, v, scale)
        q_feat = k_feat = None
        if linear != "none":
            q_feat, k_feat = self.features(q, k)
        return hybrid_attention(
            q, k, v, q_feat, k_feat, self.gamma, window=self.window, softmax=softmax, linear=linear, scale=scale,
            backend=self.backend,
        )

    def converted(self, q, k, v, scale: float) -> torch.Tensor:
        """The converted output under the current kind, mode and SSD state, [B, T, H, D].

        With a per-sequence ``drop_mask`` (SSD, granularity ``sequence``) the batch is split: dropped sequences
        get linear attention over the whole prefix, the others the layer's own spans; each sequence is computed
        once and the outputs are put back in batch order.
        """
        mask = self.drop_mask
        if mask is None or self.mode != "hybrid" or self.drop_swa or self.kind == "linear":
            return self.attend(q, k, v, scale, *self.spans())
        if mask.shape != (q.shape[0],):
            raise ValueError(f"drop_mask has shape {tuple(mask.shape)}, expected [{q.shape[0]}] (one per sequence)")
        mask = mask.to(q.device)
        drop, keep = mask.nonzero().flatten(), (~mask).nonzero().flatten()
        parts = []
        if drop.numel():
            parts.append(self.attend(q[drop], k[drop], v[drop], scale, False, "all"))
        if keep.numel():
            parts.append(self.attend(q[keep], k[keep], v[keep], scale, *self.spans()))
        order = torch.cat([drop, keep]).argsort()
        return torch.cat(parts)[order]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        if self.mode == "no_attention":
            return torch.zeros_like(q[..., : v.shape[-1]])
        if self.mode == "sinks_only":
            return _softmax_window_only(q, k, v, scale, self.sinks)
        return self.converted(q, k, v, scale)


def hybrid_padding_mask(
    batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None, **kwargs
):
    """transformers AttentionMaskInterface entry for ``"linearize_hybrid"``: the 2D padding mask [B, S] (bool) when
    some token is padding, else None. No 4D mask is built: the op derives causality and the window from positions."""
    if attention_mask is None or attention_mask.ndim != 2 or bool(attention_mask.all()):
        return None
    return attention_mask.bool()


def _right_padded(mask: torch.Tensor) -> bool:
    """True when every row of a [B, S] bool mask is real tokens followed by padding (causal attention ignores it)."""
    return bool((mask[:, 1:] <= mask[:, :-1]).all())


def hybrid_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention-interface entry. query [B, H, T, D], key/value [B, Hkv, S, D] -> ([B, T, H, D], None).

    ``attention_mask`` is what :func:`hybrid_padding_mask` made of the 2D padding mask: None without padding, else
    [B, S_total] bool (a 4D mask passed by the caller is ignored). Paths:

    - hybrid cache (``linearize.cache``; its layer hands itself over in ``cache.update``): prefill or decode against
      the cached window and linear-attention state, padded keys entering neither;
    - no cache: the converted op (``HybridAttention``); padding before real tokens (left padding) takes the
      recurrent path with a temporary state instead, so padded keys are ignored (right padding needs nothing);
    - keys longer than queries without a hybrid cache (e.g. a DynamicCache passed explicitly): the recurrent path
      over all cached keys, exact, with a warning that memory grows.
    """
    hyb: HybridAttention = module.hybrid
    cache_layer = hyb.__dict__.pop("cache_layer", None)
    if cache_layer is not None and key.shape[2] != cache_layer.window + query.shape[2]:
        cache_layer = None  # a link left by an update whose forward failed: these keys are not its context
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    mask = attention_mask if attention_mask is not None and attention_mask.ndim == 2 else None
    if cache_layer is not None:
        return cache_layer.attend(q, k, v, None if mask is None else mask[:, -q.shape[1] :], scale), None
    if hyb.transfer_hook is not None:
        if q.shape[1] != k.shape[1]:
            raise ValueError("the transfer stage runs without a KV cache (use_cache=False)")
        return hyb.transfer_hook(hyb, q, k, v, scale), None
    if q.shape[1] == k.shape[1] and (mask is None or _right_padded(mask)):
        return hyb(q, k, v, scale), None
    from linearize.cache import attend_recurrent, warn_growing_cache

    if q.shape[1] != k.shape[1]:
        warn_growing_cache()
    B, H, Dv = q.shape[0], hyb.n_heads, v.shape[-1]
    F = hyb.k_map.out_features
    S = torch.zeros(B, H, F, Dv, device=q.device, dtype=torch.float32)
    z = torch.zeros(B, H, F, device=q.device, dtype=torch.float32)
    out, _ = attend_recurrent(hyb, q, k, v, None if mask is None else mask[:, -k.shape[1] :], S, z, scale)
    return out, None


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The softmax attention modules of a HF decoder (modules with q/k/v projections and a layer index)."""
    found = [
        m
        for m in model.modules()
        if all(hasattr(m, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")) and hasattr(m, "layer_idx")
    ]
    if not found:
        raise ValueError(f"No attention modules with q/k/v/o projections found in {type(model).__name__}")
    return found


def hybrid_layers(model: nn.Module) -> list[HybridAttention]:
    return [m for m in model.modules() if isinstance(m, HybridAttention)]


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if IMPLEMENTATION not in AttentionInterface._global_mapping:
        AttentionInterface.register(IMPLEMENTATION, hybrid_attention_forward)
    if IMPLEMENTATION not in AttentionMaskInterface._global_mapping:
        AttentionMaskInterface.register(IMPLEMENTATION, hybrid_padding_mask)


def convert(model: nn.Module, attn_cfg: DictConfig, fm_cfg: DictConfig) -> list[HybridAttention]:
    """Converts every attention layer of ``model`` in place; returns the new :class:`HybridAttention` modules.

    Only the added modules hold new parameters (``*.hybrid.q_map.weight``, ``*.hybrid.k_map.weight``,
    ``*.hybrid.theta``); they are created in float32 on the model's device and are frozen here.
    """
    _register()
    config = model.config
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    device = next(model.parameters()).device
    layers = []
    for module in attention_modules(model):
        head_dim = module.head_dim
        hyb = HybridAttention(n_heads, n_kv, head_dim, attn_cfg, fm_cfg).to(device)
        hyb.requires_grad_(False)
        hyb.layer_idx = module.layer_idx
        module.hybrid = hyb
        layers.append(hyb)
    set_implementation(model, IMPLEMENTATION)
    from linearize.cache import use_hybrid_cache  # generate() then decodes with the constant-size hybrid cache

    use_hybrid_cache(model)
    return layers


def set_implementation(model: nn.Module, name: str) -> None:
    """Switches between the hybrid op and HF's own softmax ("sdpa") without touching any weight."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.set_attn_implementation(name)


@contextmanager
def softmax_attention(model: nn.Module) -> Iterator[None]:
    """Temporarily run the original softmax attention (the base model, as long as LoRA is disabled too)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    previous = base.config._attn_implementation
    set_implementation(model, "sdpa")
    try:
        yield
    finally:
        set_implementation(model, previous)


def set_mode(model: nn.Module, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"attention mode {mode!r} is not one of {', '.join(MODES)}")
    for layer in hybrid_layers(model):
        layer.mode = mode


@contextmanager
def attention_mode(model: nn.Module, mode: str) -> Iterator[None]:
    """Component ablation switch: ``hybrid`` (as converted), ``swa_only``, ``la_only``, ``sinks_only``,
    ``no_attention``; no retraining."""
    layers = hybrid_layers(model)
    previous = [layer.mode for layer in layers]
    set_mode(model, mode)
    try:
        yield
    finally:
        for layer, m in zip(layers, previous):
            layer.mode = m


@contextmanager
def attention_kind(model: nn.Module, kind: str) -> Iterator[None]:
    """Temporarily evaluates every converted layer as another kind (inference-time hybridisation: a linear-only
    conversion run as ``hybrid`` or ``hybrid_overlap`` adds a sliding window it was never trained with)."""
    if kind not in KINDS:
        raise ValueError(f"attention kind {kind!r} is not one of {', '.join(KINDS)}")
    layers = hybrid_layers(model)
    previous = [layer.kind for layer in layers]
    for layer in layers:
        layer.kind = kind
    try:
        yield
    finally:
        for layer, k in zip(layers, previous):
            layer.kind = k


def hybrid_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The converted layers' own parameters (feature maps and gamma logits), keyed by module path."""
    return {
        name: p.detach().cpu().contiguous()
        for name, p in model.named_parameters()
        if ".hybrid." in name or name.startswith("hybrid.")
    }


def _canonical(name: str) -> str:
    """Strips peft's wrapper prefixes so a checkpoint loads into a model with or without LoRA."""
    return name.removeprefix("base_model.model.")


def save_hybrid(model: nn.Module, path) -> None:
    from safetensors.torch import save_file

    save_file({_canonical(k): v for k, v in hybrid_state_dict(model).items()}, str(path))


def load_hybrid(model: nn.Module, path) -> None:
    """Loads feature maps and gamma saved by :func:`save_hybrid`; every converted parameter must be present."""
    from safetensors.torch import load_file

    saved = load_file(str(path))
    params = {_canonical(n): p for n, p in model.named_parameters() if ".hybrid." in n}
    missing = sorted(set(params) - set(saved))
    unexpected = sorted(set(saved) - set(params))
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match this model's converted layers (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}): was it saved with another model, feature map or attention kind?"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name].to(p.device, p.dtype))
