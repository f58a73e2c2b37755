"""Recurrent (cached) hybrid attention: queries at the end of a short key context plus a linear-attention state.

This is the decode op of DESIGN.md section 7. Keys older than the context are summarised by the state

    S = sum_j phi(k_j) v_j^T  [B, H, F, Dv],    z = sum_j phi(k_j)  [B, H, F]   (float32, one per query head)

and the context holds the most recent raw keys (the cached window followed by the new keys). For the new queries it
computes exactly what ``naive.py`` computes for the same positions of the whole sequence, provided every key in the
state is outside the window of every query (the context holds at least w - 1 keys before the first query, which the
hybrid cache guarantees by keeping the last w keys). ``key_valid`` marks padding: a padded key enters neither the
softmax window nor the linear terms, so left-padded batches give the logits of their unpadded rows.

Decoding one token is ``hybrid_attention_decode`` with Tq = 1 over w + 1 context keys (O(w + F Dv) per head, flat in
the context length), then ``hybrid_state_update`` with the oldest key. Both are plain PyTorch; the in-place state
update keeps tensor addresses fixed, so a decode step can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch

from .naive import LINEAR_SPANS


def hybrid_attention_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_feat: torch.Tensor | None,
    k_feat: torch.Tensor | None,
    gamma: torch.Tensor | None,
    state: tuple[torch.Tensor, torch.Tensor] | None = None,
    key_valid: torch.Tensor | None = None,
    *,
    window: int,
    softmax: bool = True,
    linear: str = "outside",
    scale: float | None = None,
    eps: float = 1e-12,
) -> torch.Tensor:
    """Hybrid attention of the last Tq positions of a key context, with older keys in a linear-attention state.

    Args:
        q: [B, Tq, H, D] post-RoPE queries; query i sits at context index L - Tq + i (its own key).
        k: [B, L, Hkv, D] post-RoPE context keys, oldest first (L >= Tq); v: [B, L, Hkv, Dv].
        q_feat: [B, Tq, H, F] phi(q); k_feat: [B, L, H, F] phi(k) of the GQA-repeated context keys (None when
            ``linear == "none"``).
        gamma: [H] softmax weight in (0, 1), or None (= 1).
        state: (S [B, H, F, Dv], z [B, H, F]) sums over keys older than the context, or None (there are none).
        key_valid: [B, L] bool, False for padding keys; None means all keys are real.
        window, softmax, linear, scale, eps: as ``hybrid_attention_naive``.

    Returns:
        [B, Tq, H, Dv] in the dtype of ``v``. A query whose keys are all padding gets 0.
    """
    if linear not in LINEAR_SPANS:
        raise ValueError(f"linear must be one of {LINEAR_SPANS}, got {linear!r}")
    if not softmax and linear == "none":
        raise ValueError("softmax=False with linear='none' leaves no attention terms")
    B, Tq, H, D = q.shape
    L, Hkv, Dv = k.shape[1], k.shape[2], v.shape[-1]
    assert L >= Tq, f"the context ({L} keys) must end with the {Tq} query positions"
    G = H // Hkv
    scale = D**-0.5 if scale is None else scale
    device = q.device

    off = torch.arange(L - Tq, L, device=device)[:, None] - torch.arange(L, device=device)[None, :]  # [Tq, L]
    allowed = (off >= 0)[None]  # [1, Tq, L]
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, :]
    vf = v.float()
    numer = torch.zeros(B, Hkv, G, Tq, Dv, device=device, dtype=torch.float32)
    denom = torch.zeros(B, Hkv, G, Tq, device=device, dtype=torch.float32)
    if softmax:
        qf = q.float().view(B, Tq, Hkv, G, D)
        s = torch.einsum("bnkgd,bjkd->bkgnj", qf, k.float()) * scale
        s = s.masked_fill(~(allowed & (off < window)[None])[:, None, None], float("-inf"))
        m = s.amax(dim=-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # all-padding rows: exp(-inf - 0) = 0, not NaN
        p = torch.exp(s - m)
        if gamma is not None:
            p = p * gamma.float().view(Hkv, G, 1, 1)
        numer = numer + torch.einsum("bkgnj,bjkd->bkgnd", p, vf)
        denom = denom + p.sum(-1)
    if linear != "none":
        F = q_feat.shape[-1]
        phq = q_feat.float().view(B, Tq, Hkv, G, F)
        phk = k_feat.float().view(B, L, Hkv, G, F)
        lin = allowed & (off >= window)[None] if linear == "outside" else allowed
        a = torch.einsum("bnkgf,bjkgf->bkgnj", phq, phk) * lin[:, None, None]
        numer = numer + torch.einsum("bkgnj,bjkd->bkgnd", a, vf)
        denom = denom + a.sum(-1)
        if state is not None:
            S, z = state
            numer = numer + torch.einsum("bnkgf,bkgfd->bkgnd", phq, S.view(B, Hkv, G, F, Dv))
            denom = denom + torch.einsum("bnkgf,bkgf->bkgn", phq, z.view(B, Hkv, G, F))
    y = numer / (denom + eps)[..., None]
    return y.permute(0, 3, 1, 2, 4).reshape(B, Tq, H, Dv).to(v.dtype)


def hybrid_state_update(
    S: torch.Tensor,
    z: torch.Tensor,
    k_feat: torch.Tensor,
    v: torch.Tensor,
    key_valid: torch.Tensor | None = None,
) -> None:
    """Adds keys to the linear-attention state in place: S += sum_j phi(k_j) v_j^T, z += sum_j phi(k_j).

    Args:
        S: [B, H, F, Dv] float32; z: [B, H, F] float32.
        k_feat: [B, N, H, F] phi of the GQA-repeated keys; v: [B, N, Hkv, Dv].
        key_valid: [B, N] bool; padding keys (False) add nothing. None means all keys are real.
    """
    B, N, H, F = k_feat.shape
    Hkv, Dv = v.shape[2], v.shape[-1]
    phk = k_feat.float()
    if key_valid is not None:
        phk = phk * key_valid[:, :, None, None]
    S.add_(torch.einsum("bjkgf,bjkd->bkgfd", phk.view(B, N, Hkv, H // Hkv, F), v.float()).reshape(B, H, F, Dv))
    z.add_(phk.sum(1))
