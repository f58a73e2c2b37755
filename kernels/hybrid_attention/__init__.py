"""Hybrid sliding-window softmax + linear attention (LoLCATs eq. 7). The math is in README.md beside this file.

``hybrid_attention`` is the entry point the model code calls; it picks the implementation:

- ``"triton"``: fused Triton forward + backward (``chunk.py``), CUDA only, window <= 64 when softmax is on.
- ``"chunked"``: chunked PyTorch reference (``chunked.py``), memory linear in T, any device.
- ``"naive"``: quadratic float32 reference (``naive.py``), the definition of correctness.
- ``"auto"`` (default): Triton on CUDA when it imports and supports the inputs, else chunked; falling back on a
  CUDA tensor warns once per reason. On the CPU, short sequences whose T x T scores fit in ``NAIVE_CPU_BYTES``
  take the naive path, which is faster there than the chunked one (measured: 27 s vs 70 s per teacher-forced
  transfer micro-batch of SmolLM2-135M at T=256 on 2 shared cores); longer ones take the chunked path.
"""

from __future__ import annotations

import warnings

import torch

from .chunked import hybrid_attention_chunked
from .naive import LINEAR_SPANS, hybrid_attention_naive

__all__ = ["BACKENDS", "LINEAR_SPANS", "hybrid_attention", "hybrid_attention_chunked", "hybrid_attention_naive"]

BACKENDS = ("auto", "triton", "chunked", "naive")
NAIVE_CPU_BYTES = 256 * 2**20  # largest float32 [B, H, T, T] score tensor the CPU "auto" path materialises
_warned: set[str] = set()


def triton_module(name: str):
    """(the Triton implementation module ``name`` of this package, None), or (None, the reason it cannot be imported).

    Used for the training op (``chunk``) here and the fused decode step (``decode_fused``) in ``linearize.cache``.
    """
    import importlib

    try:
        return importlib.import_module(f"{__name__}.{name}"), None
    except Exception as err:  # triton missing or broken: any import error means "no fast path"
        return None, f"the Triton module {name} failed to import ({type(err).__name__}: {err})"


def hybrid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_feat: torch.Tensor | None,
    k_feat: torch.Tensor | None,
    gamma: torch.Tensor | None,
    *,
    window: int,
    softmax: bool = True,
    linear: str = "outside",
    scale: float | None = None,
    eps: float = 1e-12,
    backend: str = "auto",
) -> torch.Tensor:
    """Hybrid attention output; semantics of ``hybrid_attention_naive``, differentiable in all tensor inputs.

    Args:
        q: [B, T, H, D] post-RoPE queries; k: [B, T, Hkv, D]; v: [B, T, Hkv, Dv] (GQA: H % Hkv == 0).
        q_feat, k_feat: [B, T, H, F] feature-mapped queries / keys (None when ``linear == "none"``).
        gamma: [H] softmax weight in (0, 1), or None (= 1).
        window: sliding window w (the query's own key included).
        softmax: include the sliding-window softmax terms.
        linear: linear terms over keys "outside" the window (hybrid), "all" keys (overlap / linear-only), "none".
        scale: softmax scale, default 1/sqrt(D). eps: added to the shared normaliser.
        backend: one of ``BACKENDS``.

    Returns:
        [B, T, H, Dv] in the dtype of ``v``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    kwargs = dict(window=window, softmax=softmax, linear=linear, scale=scale, eps=eps)
    B, T, H, _ = q.shape
    if backend == "naive" or (backend == "auto" and not q.is_cuda and 4 * B * H * T * T <= NAIVE_CPU_BYTES):
        return hybrid_attention_naive(q, k, v, q_feat, k_feat, gamma, **kwargs)
    if backend == "chunked":
        return hybrid_attention_chunked(q, k, v, q_feat, k_feat, gamma, **kwargs)
    if backend == "triton" or q.is_cuda:
        chunk, why = triton_module("chunk")
        if chunk is not None:
            why = chunk.supported(q, k, v, q_feat, k_feat, window=window, softmax=softmax, linear=linear)
            if why is None:
                return chunk.hybrid_attention_chunk(q, k, v, q_feat, k_feat, gamma, **kwargs)
        if backend == "triton":
            raise ValueError(f"backend='triton' cannot run: {why}")
        if why not in _warned:
            _warned.add(why)
            warnings.warn(
                f"hybrid_attention: falling back to the chunked PyTorch reference on {q.device} because {why}; "
                "this is much slower than the fused Triton kernel.",
                RuntimeWarning,
                stacklevel=2,
            )
    return hybrid_attention_chunked(q, k, v, q_feat, k_feat, gamma, **kwargs)
