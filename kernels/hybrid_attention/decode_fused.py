"""One fused Triton kernel for a single-token decode step of hybrid attention against a ring-buffer cache.

The reference is ``decode.py`` (``hybrid_attention_decode`` with Tq = 1 over the w cached keys plus the new key, then
``hybrid_state_update`` with the oldest key), as ``linearize.cache.attend_recurrent`` calls it. This kernel computes the
same step in one launch per layer; the cache layout it works on is:

    ring keys [B, Hkv, R, D], values [B, Hkv, R, Dv], valid [B, R] (bool), R = w + 1 slots: the key of position p
    (tokens counted from the start, padding included) lives in slot p % R;
    pos [B, H] int64: the number n of tokens before the new one (one copy per program, so that each program
    increments its own: no race, no extra launch);
    state S [B, H, F, Dv], z [B, H, F] float32: the sums over keys at positions <= n - w - 1.

Per (batch b, query head h; kv head h // G), with the new query q at position n, new key k_n, v_n:

    slots (n + 1 + i) % R, i = 0 .. w-1, hold positions n - w + i: i = 0 is the key leaving the window (k_o, v_o),
    i >= 1 the w - 1 other window keys; slot n % R is free (it held position n - w - 1, already in the state).

    state update:  S' = S + [valid_o] phi_k(k_o) v_o^T,   z' = z + [valid_o] phi_k(k_o)          (always, every mode)
    softmax:       s_i = q . k_i * scale on the window W = {i >= 1, valid} and the new key (if valid),
                   c = max s (0 if every key is padding),  p_i = gamma exp(s_i - c),  gamma = sigmoid(theta_h)
    linear:        "outside": phi_q(q) . S', phi_q(q) . z' (k_o is now in the state, as the reference sums it
                   explicitly: same terms);  "all": plus a_i = phi_q(q) . phi_k(k_i) on W and the new key
    output:        y = (sum_i (p_i + a_i) v_i + phi_q(q)^T S') / (sum_i (p_i + a_i) + phi_q(q) . z' + eps)

then k_n, v_n, valid_n go to the free slot n % R (written by one program per kv head, no other program reads that
slot) and pos becomes n + 1. The feature maps phi_q, phi_k (linearize.attention.FeatureMap: z = x W_h + b_h,
phi = act(z) or [act(z), act(-z)] when signed) are evaluated inside the kernel on the raw (post-RoPE) vectors, with
W_h [D, f] per query head; the k map reads the kv head's key (GQA repeat). All math is float32; the output is stored
in the dtype of v. ``no_attention`` (output zero) still updates the state and the ring, as the reference does.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .chunk import _p2
from .naive import LINEAR_SPANS

# As in chunk.py: TRITON_INTERPRET=1 at import time turns the kernel into the CPU interpreter (tests).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
ACTIVATIONS = {"softmax": 0, "exp": 1, "relu": 2, "elu": 3}  # anything else: identity (as FeatureMap.forward)
_LINEAR_CODE = {"none": 0, "outside": 1, "all": 2}
MAX_TILE = 128 * 64  # largest [window, f] fp32 tile (phi of the window keys, overlap layout) held at once


@triton.jit
def _phi(z, fmask, ACT: tl.constexpr, SIGNED: tl.constexpr, NEG: tl.constexpr):
    """act(z) (NEG False) or act(-z) (NEG True, the second half of a signed map) on the valid lanes of z [M, BF],
    zero elsewhere. softmax: normalised over the half's own f lanes; exp: minus the max over both halves when SIGNED
    (FeatureMap's max over the concatenated 2f features); relu / elu (1 + elu) / identity: elementwise."""
    x = -z if NEG else z
    if ACT == 0:
        a = tl.where(fmask, x, float("-inf"))
        a = tl.exp(a - tl.max(a, axis=1)[:, None])
        a = a / tl.sum(a, axis=1)[:, None]
    elif ACT == 1:
        m = tl.max(tl.where(fmask, x, float("-inf")), axis=1)
        if SIGNED:
            m = tl.maximum(m, tl.max(tl.where(fmask, -x, float("-inf")), axis=1))
        a = tl.exp(x - m[:, None])
    elif ACT == 2:
        a = tl.maximum(x, 0.0)
    elif ACT == 3:
        a = tl.where(x > 0, 1.0 + x, tl.exp(x))
    else:
        a = x
    return tl.where(fmask, a, 0.0)


@triton.jit
def _project(x_ptr, w_ptr, b_ptr, h, D, FH, rc, rf, BC: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """z = x W_h + b_h [1, BF] for one vector x read from x_ptr (D contiguous values; without W: z = x, FH = D).
    D is walked in chunks of BC so that no [D, f] tile is ever live."""
    if HAS_W:
        z = tl.zeros([rf.shape[0]], dtype=tl.float32)
        for d0 in range(0, D, BC):
            cd = d0 + rc
            x = tl.load(x_ptr + cd, mask=cd < D, other=0.0).to(tl.float32)
            Wc = tl.load(w_ptr + h * D * FH + cd[:, None] * FH + rf[None, :],
                         mask=(cd[:, None] < D) & (rf[None, :] < FH), other=0.0)  # fmt: skip
            z += tl.sum(x[:, None] * Wc.to(tl.float32), axis=0)
    else:
        z = tl.load(x_ptr + rf, mask=rf < D, other=0.0).to(tl.float32)
    if HAS_B:
        z += tl.load(b_ptr + h * FH + rf, mask=rf < FH, other=0.0).to(tl.float32)
    return z[None, :]


# fmt: off
@triton.jit
def _decode_step_kernel(
    Q, KN, VN, NVALID,  # new token: q [B, 1, H, D], k/v [B, 1, Hkv, D(v)], valid [B] (uint8, stride snv)
    K, V, VALID, POS,  # ring: [B, Hkv, R, D], [B, Hkv, R, Dv], [B, R] uint8, [B, H] int64
    S, Z, THETA, QW, QB, KW, KB, OUT,
    snv, sqb, sqh, sknb, sknh, svnb, svnh, skb, skh, skr, svb, svh, svr,
    H, G, D, DV, FH, W, R, scale, eps,
    BW: tl.constexpr, BC: tl.constexpr, BF: tl.constexpr, BDV: tl.constexpr,
    SOFTMAX: tl.constexpr, LINEAR: tl.constexpr, ZERO: tl.constexpr, HAS_NVALID: tl.constexpr,
    HAS_GAMMA: tl.constexpr, ACT: tl.constexpr, SIGNED: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
):
    # fmt: on
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    kvh = h // G
    F = 2 * FH if SIGNED else FH
    n = tl.load(POS + b * H + h)

    i = tl.arange(0, BW)
    rc = tl.arange(0, BC)
    rf = tl.arange(0, BF)
    rv = tl.arange(0, BDV)
    wmask = i < W
    fmask = (rf < FH)[None, :]
    slot = (n + 1 + i) % R  # i = 0: the key leaving the window; i >= 1: the rest of the window
    kbase = K + b * skb + kvh * skh
    vbase = V + b * svb + kvh * svh
    qp = Q + b * sqb + h * sqh
    knp = KN + b * sknb + kvh * sknh
    valid = (tl.load(VALID + b * R + slot, mask=wmask, other=0) != 0) & wmask
    in_win = valid & (i >= 1)
    if HAS_NVALID:
        new_valid = tl.load(NVALID + b * snv) != 0
    else:
        new_valid = n >= 0  # always true, but a tensor (stored below)

    # weights of the window rows (wt [BW]) and of the new key (wt_n); D in chunks of BC
    wt = tl.zeros([BW], dtype=tl.float32)
    wt_n = 0.0
    if SOFTMAX:
        s = tl.zeros([BW], dtype=tl.float32)
        s_n = 0.0
        for d0 in range(0, D, BC):
            cd = d0 + rc
            dm = cd < D
            qc = tl.load(qp + cd, mask=dm, other=0.0).to(tl.float32)
            kc = tl.load(kbase + slot[:, None] * skr + cd[None, :], mask=wmask[:, None] & dm[None, :], other=0.0)
            s += tl.sum(qc[None, :] * kc.to(tl.float32), axis=1)
            s_n += tl.sum(qc * tl.load(knp + cd, mask=dm, other=0.0).to(tl.float32), axis=0)
        s = tl.where(in_win, s * scale, float("-inf"))
        s_n = tl.where(new_valid, s_n * scale, float("-inf"))
        c = tl.maximum(tl.max(s, axis=0), s_n)
        c = tl.where(c == float("-inf"), 0.0, c)  # every key is padding: exp(-inf) = 0, not NaN
        gamma = 1.0
        if HAS_GAMMA:
            gamma = 1.0 / (1.0 + tl.exp(-tl.load(THETA + h).to(tl.float32)))
        wt += gamma * tl.exp(s - c)
        wt_n += gamma * tl.exp(s_n - c)

    # the key leaving the window enters the state (every mode: the mode may change between steps)
    slot0 = (n + 1) % R
    old_valid = (tl.load(VALID + b * R + slot0) != 0).to(tl.float32)
    zo = _project(kbase + slot0 * skr, KW, KB, h, D, FH, rc, rf, BC, HAS_W, HAS_B)
    po_a = _phi(zo, fmask, ACT, SIGNED, False) * old_valid
    zbase = Z + (b * H + h) * F
    za = tl.load(zbase + rf[None, :], mask=fmask, other=0.0) + po_a
    tl.store(zbase + rf[None, :], za, mask=fmask)
    if SIGNED:
        po_b = _phi(zo, fmask, ACT, SIGNED, True) * old_valid
        zb = tl.load(zbase + FH + rf[None, :], mask=fmask, other=0.0) + po_b
        tl.store(zbase + FH + rf[None, :], zb, mask=fmask)

    den = eps
    if LINEAR != 0:
        zq = _project(qp, QW, QB, h, D, FH, rc, rf, BC, HAS_W, HAS_B)
        pq_a = _phi(zq, fmask, ACT, SIGNED, False)
        den += tl.sum(tl.sum(pq_a * za, axis=1), axis=0)
        if SIGNED:
            pq_b = _phi(zq, fmask, ACT, SIGNED, True)
            den += tl.sum(tl.sum(pq_b * zb, axis=1), axis=0)
        if LINEAR == 2:  # the window keys and the new key also enter through their features
            if HAS_W:
                zk = tl.zeros([BW, BF], dtype=tl.float32)
                for d0 in range(0, D, BC):
                    cd = d0 + rc
                    dm = cd < D
                    kc = tl.load(kbase + slot[:, None] * skr + cd[None, :], mask=wmask[:, None] & dm[None, :],
                                 other=0.0)  # fmt: skip
                    Wc = tl.load(KW + h * D * FH + cd[:, None] * FH + rf[None, :], mask=dm[:, None] & fmask,
                                 other=0.0)  # fmt: skip
                    zk = tl.dot(kc.to(tl.float32), Wc.to(tl.float32), zk, input_precision="ieee")
            else:
                zk = tl.load(kbase + slot[:, None] * skr + rf[None, :], mask=wmask[:, None] & fmask, other=0.0)
                zk = zk.to(tl.float32)
            if HAS_B:
                zk += tl.load(KB + h * FH + rf[None, :], mask=fmask, other=0.0).to(tl.float32)
            zn = _project(knp, KW, KB, h, D, FH, rc, rf, BC, HAS_W, HAS_B)
            a = tl.sum(_phi(zk, fmask, ACT, SIGNED, False) * pq_a, axis=1)
            a_n = tl.sum(tl.sum(_phi(zn, fmask, ACT, SIGNED, False) * pq_a, axis=1), axis=0)
            if SIGNED:
                a += tl.sum(_phi(zk, fmask, ACT, SIGNED, True) * pq_b, axis=1)
                a_n += tl.sum(tl.sum(_phi(zn, fmask, ACT, SIGNED, True) * pq_b, axis=1), axis=0)
            wt += tl.where(in_win, a, 0.0)
            wt_n += tl.where(new_valid, a_n, 0.0)
    den += tl.sum(wt, axis=0) + wt_n

    # values, state rows and the output, Dv in blocks of BDV
    writer = (h % G) == 0  # one program per kv head writes the new key/value into the free slot
    wslot = n % R
    sbase = S + (b * H + h) * F * DV
    ob = OUT + (b * H + h) * DV
    fcol = (rf < FH)[:, None]
    po_a = tl.reshape(po_a, [BF])
    if SIGNED:
        po_b = tl.reshape(po_b, [BF])
    if LINEAR != 0:
        pq_a = tl.reshape(pq_a, [BF])
        if SIGNED:
            pq_b = tl.reshape(pq_b, [BF])
    for v0 in range(0, DV, BDV):
        cv = v0 + rv
        vm = cv < DV
        vt = tl.load(vbase + slot[:, None] * svr + cv[None, :], mask=wmask[:, None] & vm[None, :], other=0.0)
        vn_raw = tl.load(VN + b * svnb + kvh * svnh + cv, mask=vm, other=0.0)
        v_old = tl.load(vbase + slot0 * svr + cv, mask=vm, other=0.0).to(tl.float32)
        sm = fcol & vm[None, :]
        sp = sbase + rf[:, None] * DV + cv[None, :]
        Sa = tl.load(sp, mask=sm, other=0.0) + po_a[:, None] * v_old[None, :]
        tl.store(sp, Sa, mask=sm)
        if SIGNED:
            Sb = tl.load(sp + FH * DV, mask=sm, other=0.0) + po_b[:, None] * v_old[None, :]
            tl.store(sp + FH * DV, Sb, mask=sm)
        if ZERO:
            y = tl.zeros([BDV], dtype=tl.float32)
        else:
            num = tl.sum(wt[:, None] * vt.to(tl.float32), axis=0) + wt_n * vn_raw.to(tl.float32)
            if LINEAR != 0:
                num += tl.sum(pq_a[:, None] * Sa, axis=0)
                if SIGNED:
                    num += tl.sum(pq_b[:, None] * Sb, axis=0)
            y = num / den
        tl.store(ob + cv, y.to(OUT.dtype.element_ty), mask=vm)
        if writer:
            tl.store(vbase + wslot * svr + cv, vn_raw, mask=vm)
    if writer:
        for d0 in range(0, D, BC):
            cd = d0 + rc
            tl.store(kbase + wslot * skr + cd, tl.load(knp + cd, mask=cd < D), mask=cd < D)
    if h == 0:
        tl.store(VALID + b * R + wslot, new_valid.to(tl.uint8))
    tl.store(POS + b * H + h, n + 1)


def supported(q: torch.Tensor, ring_keys: torch.Tensor, window: int, q_map, activation: str) -> str | None:
    """None when the fused step handles these inputs, else the reason (the caller then takes the reference path)."""
    if not q.is_cuda and not INTERPRETED:
        return "inputs are not on a CUDA device"
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"dtype {q.dtype} is not supported"
    D = q.shape[-1]
    weight, _ = q_map
    FH = D if weight is None else weight.shape[-1]
    if _p2(window) * _p2(FH) > MAX_TILE:
        return f"window {window}, head dim {D}, features {FH} exceed the register tiles of the fused step"
    if ring_keys.shape[2] != window + 1:
        return f"the ring buffer has {ring_keys.shape[2]} slots, expected window + 1 = {window + 1}"
    return None


def hybrid_decode_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_valid: torch.Tensor | None,
    ring: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    state: tuple[torch.Tensor, torch.Tensor],
    q_map: tuple[torch.Tensor | None, torch.Tensor | None],
    k_map: tuple[torch.Tensor | None, torch.Tensor | None],
    theta: torch.Tensor | None,
    *,
    window: int,
    activation: str,
    signed: bool,
    softmax: bool = True,
    linear: str = "outside",
    attend: bool = True,
    scale: float | None = None,
    eps: float = 1e-12,
) -> torch.Tensor:
    """One decode step (see the module docstring); updates the ring, the position counter and the state in place.

    Args:
        q: [B, 1, H, D] post-RoPE query; k: [B, 1, Hkv, D] and v: [B, 1, Hkv, Dv] the new key and value.
        key_valid: [B] bool (False: the new token is padding) or None (real).
        ring: (keys [B, Hkv, w + 1, D], values [B, Hkv, w + 1, Dv], valid [B, w + 1] bool, pos [B, H] int64).
        state: (S [B, H, F, Dv], z [B, H, F]) float32, contiguous.
        q_map, k_map: (weight [H, D, f] or None, bias [H, f] or None) of linearize.attention.FeatureMap;
            ``activation`` and ``signed`` as there (F = 2f when signed).
        theta: [H] gamma logits (gamma = sigmoid(theta)) or None (gamma = 1).
        window, softmax, linear, scale, eps: as ``hybrid_attention_decode``; ``attend=False`` (mode no_attention)
            outputs zeros but still updates the state and the ring.

    Returns:
        [B, 1, H, Dv] in the dtype of ``v``.
    """
    if linear not in LINEAR_SPANS:
        raise ValueError(f"linear must be one of {LINEAR_SPANS}, got {linear!r}")
    if attend and not softmax and linear == "none":
        raise ValueError("softmax=False with linear='none' leaves no attention terms")
    keys, values, valid, pos = ring
    S, z = state
    B, Tq, H, D = q.shape
    assert Tq == 1 and k.shape[1] == 1, "the fused step takes one new token"
    Hkv, Dv, R = keys.shape[1], values.shape[-1], keys.shape[2]
    assert R == window + 1 and pos.shape == (B, H) and S.is_contiguous() and z.is_contiguous()
    assert keys.stride(-1) == 1 and values.stride(-1) == 1 and valid.is_contiguous() and pos.is_contiguous()
    qw, qb = q_map
    kw, kb = k_map
    FH = D if qw is None else qw.shape[-1]
    assert S.shape == (B, H, (2 if signed else 1) * FH, Dv), (S.shape, FH, signed)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    out = torch.empty(B, 1, H, Dv, device=q.device, dtype=v.dtype)
    nvalid = key_valid.view(torch.uint8) if key_valid is not None else valid  # (dummy pointer when absent)
    dummy = S
    scale = D**-0.5 if scale is None else scale
    _decode_step_kernel[(B, H)](
        q, k, v, nvalid, keys, values, valid.view(torch.uint8), pos,
        S, z, dummy if theta is None else theta,
        dummy if qw is None else qw.contiguous(), dummy if qb is None else qb.contiguous(),
        dummy if kw is None else kw.contiguous(), dummy if kb is None else kb.contiguous(), out,
        nvalid.stride(0), q.stride(0), q.stride(2), k.stride(0), k.stride(2), v.stride(0), v.stride(2),
        keys.stride(0), keys.stride(1), keys.stride(2), values.stride(0), values.stride(1), values.stride(2),
        H, H // Hkv, D, Dv, FH, window, R, scale, eps,
        BW=_p2(window), BC=min(_p2(D), 32), BF=_p2(FH), BDV=min(_p2(Dv), 32),
        SOFTMAX=attend and softmax, LINEAR=_LINEAR_CODE[linear] if attend else 0, ZERO=not attend,
        HAS_NVALID=key_valid is not None, HAS_GAMMA=theta is not None,
        ACT=ACTIVATIONS.get(activation, 4), SIGNED=signed, HAS_W=qw is not None, HAS_B=qb is not None,
        num_warps=8,  # ptxas (sm_90a, bf16, w=64, f=64, D=64 or 128): 4 warps spill, 8 warps use 166-172 registers
    )  # fmt: skip
    return out
