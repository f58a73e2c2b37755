"""Constant-memory generation for converted models: the hybrid cache, through transformers' cache extension points.

Per layer, :class:`HybridCacheLayer` keeps the last w post-RoPE keys and values (raw, for the softmax window, with a
validity flag per slot so that left padding never counts as a key) and the linear-attention state of every older key,

    S = sum_j phi(k_j) v_j^T  [B, H, F, Dv],    z = sum_j phi(k_j)  [B, H, F]   (float32, phi = the layer's k map
                                                                              on the GQA-repeated key),

so its size depends on the batch, the window and the feature dimension, never on the number of tokens. Because the
window keys are kept raw, every attention kind and ablation that needs no other keys (hybrid, hybrid_overlap, linear;
modes hybrid, swa_only, la_only, no_attention) is served by the same cache: the overlap and linear-only layouts add
phi(k) of the window keys on the fly. ``sinks_only`` needs the first tokens of the sequence and is not supported.

How it plugs into transformers: the attention module calls ``cache.update(k, v, layer_idx)``; the layer returns the
context (window + new keys) and hands itself to the layer's :class:`~linearize.attention.HybridAttention`, whose
attention-interface function (``linearize.attention.hybrid_attention_forward``) then calls :meth:`attend`: the new
queries are processed in chunks against the context and the state (``kernels/hybrid_attention/decode.py``), keys
leaving the window enter the state, and the last w keys are written into their ring slots in place. A prompt is
therefore prefilled in chunks, exactly and with memory linear in its length.

Single-token decode steps on CUDA take one fused Triton kernel per layer instead
(``kernels/hybrid_attention/decode_fused.py``: window softmax, feature maps, state read and update, ring write and
counter advance in one launch); ``update`` then returns the ring buffer itself as the context (w + 1 slots, the shape
the attention op expects) and keeps a reference to the new key/value for the kernel. The PyTorch path above stays the
reference and serves prefill, multi-token steps, the CPU and shapes the kernel does not take. ``generate`` uses the cache automatically once
:func:`use_hybrid_cache` has hooked the model (``linearize.attention.convert`` does it); ``HybridCache(model)`` can also
be passed explicitly (``cache_kwargs`` gives the keyword the installed transformers takes for it).
"""

from __future__ import annotations

import functools
import inspect
import types
import warnings

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache

from linearize.attention import HybridAttention, hybrid_layers
from linearize.kernels.hybrid_attention import triton_module
from linearize.kernels.hybrid_attention.decode import hybrid_attention_decode, hybrid_state_update
from linearize.kernels.hybrid_attention.naive import repeat_kv

PREFILL_CHUNK = 1024  # queries per step of the chunked prefill: memory O(chunk * (chunk + w)) per layer


def attend_recurrent(
    hyb: HybridAttention,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_valid: torch.Tensor | None,
    S: torch.Tensor,
    z: torch.Tensor,
    scale: float,
    chunk: int = PREFILL_CHUNK,
) -> tuple[torch.Tensor, int]:
    """Attention of the Tq new queries against ``n_before = L - Tq`` earlier context keys and the state (S, z).

    Args:
        q: [B, Tq, H, D]; k: [B, L, Hkv, D]; v: [B, L, Hkv, Dv]: the context, whose last Tq keys are the queries' own.
        key_valid: [B, L] bool or None (all real).
        S: [B, H, F, Dv], z: [B, H, F] float32, summing every key older than the context; updated in place with the
            context keys that leave the window of the last query.

    Returns:
        ([B, Tq, H, Dv] output, number of leading context keys moved into the state).
    """
    if hyb.mode == "sinks_only":
        raise ValueError(
            "attention mode 'sinks_only' needs the first tokens of the sequence, which the hybrid cache does not keep;"
            " evaluate it without a cache (use_cache=False)"
        )
    Tq, L = q.shape[1], k.shape[1]
    n_before, w = L - Tq, hyb.window
    softmax, linear = hyb.spans()

    def commit(a: int, b: int) -> None:
        if b > a:
            kf = hyb.k_map(repeat_kv(k[:, a:b], hyb.n_heads))
            hybrid_state_update(S, z, kf, v[:, a:b], None if key_valid is None else key_valid[:, a:b])

    outs, committed = [], 0
    for c0 in range(0, Tq, chunk):
        c1 = min(c0 + chunk, Tq)
        start = max(0, n_before + c0 - w)  # keys before `start` are outside every window of this chunk
        commit(committed, start)
        committed = max(committed, start)
        if hyb.mode == "no_attention":
            outs.append(torch.zeros_like(q[:, c0:c1, :, :1]).expand(-1, -1, -1, v.shape[-1]).to(v.dtype))
            continue
        kc, vc = k[:, start : n_before + c1], v[:, start : n_before + c1]
        q_feat = k_feat = None
        if linear != "none":
            q_feat = hyb.q_map(q[:, c0:c1])
            k_feat = hyb.k_map(repeat_kv(kc, hyb.n_heads))
        valid = None if key_valid is None else key_valid[:, start : n_before + c1]
        outs.append(
            hybrid_attention_decode(
                q[:, c0:c1], kc, vc, q_feat, k_feat, hyb.gamma, (S, z), valid,
                window=w, softmax=softmax, linear=linear, scale=scale,
            )
        )  # fmt: skip
    end = max(committed, L - w)
    commit(committed, end)
    return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)), end


class HybridCacheLayer(CacheLayerMixin):
    """One layer's cache: a ring buffer of the last w keys/values and the state S, z of older keys.

    Ring: keys [B, Hkv, w + 1, D], values [B, Hkv, w + 1, Dv], valid [B, w + 1] bool; the key of position p (tokens
    counted from the start, padding included) lives in slot p % (w + 1), so a step writes its key at a slot given by
    a device counter (``pos`` [B, H] int64, one copy per query head: the fused kernel's programs each advance their
    own) and no tensor ever moves: static shapes and addresses for CUDA graphs. The extra slot is the free one the
    fused step writes while its other programs still read the key leaving the window.

    ``fused``: None (default) runs single-token steps on CUDA through the fused Triton kernel
    (``kernels/hybrid_attention/decode_fused.py``) and everything else (prefill, T > 1, CPU) through the PyTorch
    reference; True requires the fused kernel for every single-token step (CPU too, when it is interpreted:
    TRITON_INTERPRET=1; raises when it cannot run); False always takes the reference.
    """

    # generate()'s automatic torch.compile stays off: the layer keeps Python-side state (``seen``, the hand-over to
    # the attention op through ``hybrid.cache_layer``) that a compiled graph would freeze. A decode step is CUDA-graph
    # capturable as is (experiments/bench_decode.py captures one).
    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, hybrid: HybridAttention, fused: bool | None = None):
        super().__init__()
        self.hybrid = hybrid
        self.window = hybrid.window
        self.fused = fused
        self.valid = self.S = self.z = self.pos = None
        self.seen = 0
        self._step = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, Hkv, _, D = key_states.shape
        R, H, F = self.window + 1, self.hybrid.n_heads, self.hybrid.k_map.out_features
        self.device, self.batch_size = key_states.device, B
        self.keys = key_states.new_zeros(B, Hkv, R, D)
        self.values = value_states.new_zeros(B, Hkv, R, value_states.shape[-1])
        self.valid = torch.zeros(B, R, dtype=torch.bool, device=self.device)  # empty slots count as padding
        self.pos = torch.zeros(B, H, dtype=torch.int64, device=self.device)
        self.S = torch.zeros(B, H, F, value_states.shape[-1], dtype=torch.float32, device=self.device)
        self.z = torch.zeros(B, H, F, dtype=torch.float32, device=self.device)
        self.is_initialized = True

    def _slots(self, start: int, stop: int) -> torch.Tensor:
        """Ring slots of the positions pos + start .. pos + stop - 1 (device arithmetic: no host sync)."""
        return (self.pos[0, :1] + torch.arange(start, stop, device=self.device)) % (self.window + 1)

    def _fused_kernel(self, key_states: torch.Tensor):
        """The fused-step module when this update is a single-token step it should take, else None."""
        if self.fused is False or key_states.shape[-2] != 1 or (self.fused is None and not key_states.is_cuda):
            return None
        hyb = self.hybrid
        if hyb.mode == "sinks_only":
            return None  # the reference path raises the explanation
        mod, why = triton_module("decode_fused")
        if mod is not None:
            q_map = (hyb.q_map.weight, hyb.q_map.bias)
            why = mod.supported(key_states, self.keys, self.window, q_map, hyb.q_map.activation)
            if why is None:
                return mod
        if self.fused:
            raise ValueError(f"HybridCacheLayer(fused=True): the fused decode step cannot run: {why}")
        _warn_once(why)
        return None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """key/value_states [B, Hkv, T, D] -> the context for :meth:`attend`, [B, Hkv, w + T, D].

        T = 1 on the fused path: the ring buffer itself (w + 1 slots; the kernel writes the new key into its free
        slot); otherwise the window in order (oldest first) followed by the new keys.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.seen += key_states.shape[-2]
        # The attention op that follows in the same module forward picks this layer up (and clears the link).
        self.hybrid.cache_layer = self
        mod = self._fused_kernel(key_states)
        if mod is not None:
            self._step = (mod, key_states.transpose(1, 2), value_states.transpose(1, 2))
            return self.keys, self.values
        self._step = None
        idx = self._slots(-self.window, 0)
        return (
            torch.cat([self.keys.index_select(2, idx), key_states], dim=-2),
            torch.cat([self.values.index_select(2, idx), value_states], dim=-2),
        )

    def attend(self, q, k, v, new_valid: torch.Tensor | None, scale: float) -> torch.Tensor:
        """q [B, T, H, D], context k/v [B, w + T, Hkv, D] (from :meth:`update`), new_valid [B, T] bool or None."""
        hyb, w = self.hybrid, self.window
        if self._step is not None:
            mod, k_new, v_new = self._step
            self._step = None
            softmax, linear = hyb.spans()
            return mod.hybrid_decode_step(
                q, k_new, v_new, None if new_valid is None else new_valid[:, 0].to(torch.bool),
                (self.keys, self.values, self.valid, self.pos), (self.S, self.z),
                (hyb.q_map.weight, hyb.q_map.bias), (hyb.k_map.weight, hyb.k_map.bias), hyb.theta,
                window=w, activation=hyb.q_map.activation, signed=hyb.q_map.signed, softmax=softmax, linear=linear,
                attend=hyb.mode != "no_attention", scale=scale,
            )  # fmt: skip
        B, T = q.shape[:2]
        if new_valid is None:
            new_valid = torch.ones(B, T, dtype=torch.bool, device=q.device)
        old_valid = self.valid.index_select(1, self._slots(-w, 0))
        valid = torch.cat([old_valid, new_valid.to(self.valid.device, torch.bool)], dim=1)
        out, moved = attend_recurrent(hyb, q, k, v, valid, self.S, self.z, scale)
        assert moved == T, (moved, T)
        # The last w context keys go to their ring slots, in place (fixed addresses, constant size).
        idx = self._slots(T - w, T)
        self.keys.index_copy_(2, idx, k[:, moved:].transpose(1, 2))
        self.values.index_copy_(2, idx, v[:, moved:].transpose(1, 2))
        self.valid.index_copy_(1, idx, valid[:, moved:])
        self.pos.add_(T)
        return out

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        """Tokens seen so far (padding included): generate derives positions from it."""
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = self.valid = self.pos = self.S = self.z = None
        self._step = None
        self.is_initialized = False
        self.seen = 0

    def _tensors(self) -> list[str]:
        return ["keys", "values", "valid", "pos", "S", "z"]

    def _apply(self, fn) -> None:
        if self.is_initialized:
            for name in self._tensors():
                setattr(self, name, fn(getattr(self, name)))
            self.batch_size = self.keys.shape[0]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("The hybrid cache cannot be cropped: keys that left the window are summed in S, z")

    def nbytes(self) -> int:
        if not self.is_initialized:
            return 0
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in self._tensors())


class HybridCache(Cache):
    """Cache of a converted model: one :class:`HybridCacheLayer` per decoder layer. Size independent of length.

    Usage: ``model.generate(**inputs, **cache_kwargs(model, HybridCache(model)))``, or just ``model.generate(**inputs)``
    once the model is hooked by :func:`use_hybrid_cache`. ``fused``: see :class:`HybridCacheLayer`.
    """

    def __init__(self, model: nn.Module, fused: bool | None = None):
        by_idx = {getattr(h, "layer_idx", None): h for h in hybrid_layers(model)}
        if not by_idx:
            raise ValueError(f"{type(model).__name__} has no converted attention layers (linearize.attention.convert)")
        if None in by_idx or sorted(by_idx) != list(range(len(by_idx))):
            raise ValueError(f"converted layers have unexpected layer indices {sorted(by_idx, key=str)}")
        super().__init__(layers=[HybridCacheLayer(by_idx[i], fused) for i in range(len(by_idx))])

    def nbytes(self) -> int:
        """Bytes held by all cache tensors."""
        return sum(layer.nbytes() for layer in self.layers)


@functools.cache
def _cache_keyword(forward) -> str:
    params = inspect.signature(forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model: nn.Module, cache: Cache) -> dict:
    """``{name: cache}`` for ``model(...)`` / ``model.generate(...)``: transformers >= 5.2x names the argument ``cache``
    (``past_key_values`` is deprecated there and goes in 5.40), earlier versions ``past_key_values``."""
    return {_cache_keyword(type(model).forward): cache}


def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
    """``GenerationMixin._prepare_cache_for_generation`` that swaps the default DynamicCache for a HybridCache."""
    type(self)._prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs)
    for name in ("cache", "past_key_values"):  # transformers >= 5.2x calls it `cache`
        cache = model_kwargs.get(name)
        if cache is None or isinstance(cache, HybridCache) or getattr(cache, "_is_user_defined", False):
            continue
        if type(cache) is not DynamicCache:
            raise ValueError(
                f"generate(cache_implementation={generation_config.cache_implementation!r}) made a "
                f"{type(cache).__name__}; converted models decode with the hybrid cache (leave cache_implementation "
                "unset) or without one (use_cache=False)"
            )
        model_kwargs[name] = HybridCache(self)


def use_hybrid_cache(model: nn.Module) -> nn.Module:
    """Makes ``model.generate`` create a :class:`HybridCache` instead of transformers' DynamicCache.

    Hooks the instance's ``_prepare_cache_for_generation`` (the method generate calls to build its cache); a cache the
    caller passes is left alone. ``model`` may be a peft model; the hook goes on the underlying transformers model.
    """
    base = model
    while hasattr(base, "get_base_model") and base.get_base_model() is not base:
        base = base.get_base_model()
    if not hasattr(type(base), "_prepare_cache_for_generation"):
        raise ValueError(f"{type(base).__name__} is not a transformers generation model")
    base._prepare_cache_for_generation = types.MethodType(_prepare_cache_for_generation, base)
    return model


_warned = False
_warned_fused: set[str] = set()


def _warn_once(why: str) -> None:
    if why not in _warned_fused:
        _warned_fused.add(why)
        warnings.warn(
            f"hybrid cache: single-token decode steps take the unfused PyTorch path because {why}; "
            "it launches ~100 kernels per layer and step instead of one.",
            RuntimeWarning,
            stacklevel=4,
        )


def warn_growing_cache() -> None:
    """Called by the attention op when it decodes from a cache that is not a HybridCache (correct, but grows)."""
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            "hybrid attention: decoding with a cache that keeps every key (e.g. a DynamicCache passed explicitly); "
            "results are exact but memory grows with the sequence. Pass linearize.cache.HybridCache(model) instead.",
            RuntimeWarning,
            stacklevel=3,
        )
