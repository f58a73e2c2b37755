"""Quadratic float32 reference for hybrid attention. It defines correctness for every faster path.

Per head, query n, keys j <= n, window w, scores s_nj = q_n . k_j * scale, c_n = max_{j in W(n)} s_nj:

    A_n = sum_{j in W(n)} gamma exp(s_nj - c_n) v_j  +  sum_{j in L(n)} (phi(q_n) . phi(k_j)) v_j
    Z_n = sum_{j in W(n)} gamma exp(s_nj - c_n)      +  sum_{j in L(n)}  phi(q_n) . phi(k_j)
    y_n = A_n / Z_n

with W(n) = {n-w < j <= n} and L(n) = {j <= n-w} ("outside", LoLCATs non-overlap), L(n) = {j <= n}
("all": overlap layout and linear-only) or L(n) = {} ("none": sliding-window softmax only).
"""

from __future__ import annotations

import torch

LINEAR_SPANS = ("outside", "all", "none")


def repeat_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[B, T, Hkv, D] -> [B, T, H, D] by repeating each kv head for its query group."""
    groups = n_heads // x.shape[2]
    return x if groups == 1 else x.repeat_interleave(groups, dim=2)


def hybrid_attention_naive(
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
) -> torch.Tensor:
    """Hybrid attention output, computed with full T x T score matrices in float32.

    Args:
        q: [B, T, H, D] post-RoPE queries.
        k: [B, T, Hkv, D] post-RoPE keys (H % Hkv == 0, GQA).
        v: [B, T, Hkv, Dv] values.
        q_feat: [B, T, H, F] feature-mapped queries phi(q) (non-negative), or None when ``linear == "none"``.
        k_feat: [B, T, H, F] feature-mapped keys phi(k), one map per *query* head (applied after the GQA repeat).
        gamma: [H] weight of the softmax term, in (0, 1); None means 1.
        window: w, number of most recent keys (the query's own included) under softmax.
        softmax: include the sliding-window softmax terms.
        linear: which keys the linear terms cover: "outside" the window, "all" of the prefix, or "none".
        scale: softmax score scale, default 1/sqrt(D). Linear attention has no scale.
        eps: added to the shared normaliser.

    Returns:
        [B, T, H, Dv] in the dtype of ``v``.
    """
    if linear not in LINEAR_SPANS:
        raise ValueError(f"linear must be one of {LINEAR_SPANS}, got {linear!r}")
    if not softmax and linear == "none":
        raise ValueError("softmax=False with linear='none' leaves no attention terms")
    B, T, H, D = q.shape
    scale = D**-0.5 if scale is None else scale
    kf = repeat_kv(k, H).float()
    vf = repeat_kv(v, H).float()
    pos = torch.arange(T, device=q.device)
    offset = pos[:, None] - pos[None, :]  # n - j
    causal = offset >= 0
    in_window = causal & (offset < window)

    numer = torch.zeros(B, H, T, vf.shape[-1], device=q.device, dtype=torch.float32)
    denom = torch.zeros(B, H, T, 1, device=q.device, dtype=torch.float32)
    if softmax:
        s = torch.einsum("bnhd,bjhd->bhnj", q.float(), kf) * scale
        s = s.masked_fill(~in_window, float("-inf"))
        p = torch.exp(s - s.amax(dim=-1, keepdim=True))  # window row max; every row holds its own key
        if gamma is not None:
            p = p * gamma.float().view(1, H, 1, 1)
        numer = numer + torch.einsum("bhnj,bjhd->bhnd", p, vf)
        denom = denom + p.sum(-1, keepdim=True)
    if linear != "none":
        lin_mask = causal & (offset >= window) if linear == "outside" else causal
        a = torch.einsum("bnhf,bjhf->bhnj", q_feat.float(), k_feat.float()) * lin_mask
        numer = numer + torch.einsum("bhnj,bjhd->bhnd", a, vf)
        denom = denom + a.sum(-1, keepdim=True)
    return (numer / (denom + eps)).transpose(1, 2).to(v.dtype)
