"""Chunked PyTorch reference for hybrid attention: same result as ``naive.py``, memory linear in T.

The sequence is cut into chunks of C >= w tokens. For a query in chunk i every window key lies in chunk i-1 or i,
so the softmax terms and the linear terms of those two chunks are computed exactly on a [C, 2C] block; the linear
terms of all older keys (chunks <= i-2, all outside the window because C >= w) come from the running state

    S = sum_j phi(k_j) v_j^T  [F, Dv],    z = sum_j phi(k_j)  [F].

Nothing is ever T x T, plain torch autograd differentiates it (every intermediate is O(T C) in total), and GQA
keys/values are never repeated: queries are viewed as [B, C, Hkv, G, D] against [B, 2C, Hkv, D] keys.
It is the CPU fallback of ``hybrid_attention`` and the long-sequence reference of the tests.
"""

from __future__ import annotations

import torch

from .naive import LINEAR_SPANS


def hybrid_attention_chunked(
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
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Hybrid attention in float32, chunk by chunk. Arguments and result as ``hybrid_attention_naive``.

    Args:
        q: [B, T, H, D]; k: [B, T, Hkv, D]; v: [B, T, Hkv, Dv]; q_feat, k_feat: [B, T, H, F] or None;
        gamma: [H] or None (= 1).
        chunk_size: C, default max(64, window); must be >= window when softmax terms are used.

    Returns:
        [B, T, H, Dv] in the dtype of ``v``.
    """
    if linear not in LINEAR_SPANS:
        raise ValueError(f"linear must be one of {LINEAR_SPANS}, got {linear!r}")
    if not softmax and linear == "none":
        raise ValueError("softmax=False with linear='none' leaves no attention terms")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    B, T, H, D = q.shape
    Hkv, Dv = k.shape[2], v.shape[-1]
    if H % Hkv:
        raise ValueError(f"query heads ({H}) must be a multiple of kv heads ({Hkv})")
    G = H // Hkv
    C = max(64, window) if chunk_size is None else chunk_size
    if softmax and C < window:
        raise ValueError(f"chunk_size ({C}) must be >= window ({window})")
    scale = D**-0.5 if scale is None else scale
    use_lin = linear != "none"

    qf32 = q.float().view(B, T, Hkv, G, D)
    kf32, vf32 = k.float(), v.float()
    if use_lin:
        F = q_feat.shape[-1]
        phq = q_feat.float().view(B, T, Hkv, G, F)
        phk = k_feat.float().view(B, T, Hkv, G, F)
        S = torch.zeros(B, Hkv, G, F, Dv, device=q.device, dtype=torch.float32)
        z = torch.zeros(B, Hkv, G, F, device=q.device, dtype=torch.float32)
    g = None if gamma is None else gamma.float().view(Hkv, G, 1, 1)

    outs = []
    for c0 in range(0, T, C):
        c1 = min(c0 + C, T)
        p0 = max(c0 - C, 0)  # keys of the previous and the current chunk: [p0, c1)
        n = torch.arange(c0, c1, device=q.device)
        j = torch.arange(p0, c1, device=q.device)
        off = n[:, None] - j[None, :]
        causal = off >= 0
        vb = vf32[:, p0:c1]  # [B, L, Hkv, Dv]
        numer = torch.zeros(B, Hkv, G, c1 - c0, Dv, device=q.device, dtype=torch.float32)
        denom = torch.zeros(B, Hkv, G, c1 - c0, device=q.device, dtype=torch.float32)
        if softmax:
            s = torch.einsum("bnkgd,bjkd->bkgnj", qf32[:, c0:c1], kf32[:, p0:c1]) * scale
            s = s.masked_fill(~(causal & (off < window)), float("-inf"))
            p = torch.exp(s - s.amax(dim=-1, keepdim=True))
            if g is not None:
                p = p * g
            numer = numer + torch.einsum("bkgnj,bjkd->bkgnd", p, vb)
            denom = denom + p.sum(-1)
        if use_lin:
            lin_mask = causal & (off >= window) if linear == "outside" else causal
            a = torch.einsum("bnkgf,bjkgf->bkgnj", phq[:, c0:c1], phk[:, p0:c1]) * lin_mask
            qc = phq[:, c0:c1]
            numer = numer + torch.einsum("bkgnj,bjkd->bkgnd", a, vb) + torch.einsum("bnkgf,bkgfd->bkgnd", qc, S)
            denom = denom + a.sum(-1) + torch.einsum("bnkgf,bkgf->bkgn", qc, z)
            # Keys of chunk i-1 enter the state now: from chunk i+1 on they are all outside the window.
            if c0 > 0:
                S = S + torch.einsum("bjkgf,bjkd->bkgfd", phk[:, p0:c0], vf32[:, p0:c0])
                z = z + phk[:, p0:c0].sum(1)
        outs.append(numer / (denom + eps)[..., None])
    y = torch.cat(outs, dim=3)  # [B, Hkv, G, T, Dv]
    return y.permute(0, 3, 1, 2, 4).reshape(B, T, H, Dv).to(v.dtype)
