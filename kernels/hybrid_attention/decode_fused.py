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

from .naive import LINEAR_SPANS

# As in chunk.py: TRITON_INTERPRET=1 at import time turns the kernel into the CPU interpreter (tests).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
ACTIVATIONS = {"softmax": 0, "exp": 1, "relu": 2, "elu": 3}  # anything else: identity (as FeatureMap.forward)
_LINEAR_CODE = {"none": 0, "outside": 1, "all": 2}
MAX_TILE = 128 * 128  # largest [rows, cols] fp32 tile held at once (window x D, D x f): no register spills


@triton.jit
def _phi(z, fmask, ACT: tl.constexpr, SIGNED: tl.constexpr):
    """(act(z), act(-z)) on the valid lanes of z [M, BF] (zero elsewhere); the second only means something when SIGNED.

    softmax: each half normalised over its own f lanes; exp: minus the max over both halves (FeatureMap's max over the
    concatenated 2f features); relu / elu (1 + elu) / identity: elementwise."""
    neg = -z
    if ACT == 0:
        a = tl.where(fmask, z, float("-inf"))
        a = tl.exp(a - tl.max(a, axis=1)[:, None])
        a = a / tl.sum(a, axis=1)[:, None]
        b = tl.where(fmask, neg, float("-inf"))
        b = tl.exp(b - tl.max(b, axis=1)[:, None])
        b = b / tl.sum(b, axis=1)[:, None]
    elif ACT == 1:
        m = tl.max(tl.where(fmask, z, float("-inf")), axis=1)
        if SIGNED:
            m = tl.maximum(m, tl.max(tl.where(fmask, neg, float("-inf")), axis=1))
        a = tl.exp(z - m[:, None])
        b = tl.exp(neg - m[:, None])
    elif ACT == 2:
        a = tl.maximum(z, 0.0)
        b = tl.maximum(neg, 0.0)
    elif ACT == 3:
        a = tl.where(z > 0, 1.0 + z, tl.exp(z))
        b = tl.where(neg > 0, 1.0 + neg, tl.exp(neg))
    else:
        a = z
        b = neg
    return tl.where(fmask, a, 0.0), tl.where(fmask, b, 0.0)


@triton.jit
def _project_vec(x, w_ptr, b_ptr, h, D, FH, rd, rf, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """z = x W_h + b_h for one vector x [BD] -> [1, BF] (without W: z = x, FH == D)."""
    if HAS_W:
        wm = (rd[:, None] < D) & (rf[None, :] < FH)
        W = tl.load(w_ptr + h * D * FH + rd[:, None] * FH + rf[None, :], mask=wm, other=0.0).to(tl.float32)
        z = tl.sum(x[:, None] * W, axis=0)
    else:
        z = x
    if HAS_B:
        z += tl.load(b_ptr + h * FH + rf, mask=rf < FH, other=0.0).to(tl.float32)
    return z[None, :]


@triton.jit
def _decode_step_kernel(
    Q, KN, VN, NVALID,  # new token: q [B, 1, H, D], k/v [B, 1, Hkv, D(v)], valid [B] (uint8, stride snv)
    K, V, VALID, POS,  # ring: [B, Hkv, R, D], [B, Hkv, R, Dv], [B, R] uint8, [B, H] int64
    S, Z, THETA, QW, QB, KW, KB, O,
    snv, sqb, sqh, sknb, sknh, svnb, svnh, skb, skh, skr, svb, svh, svr,
    H, G, D, DV, FH, W, R, scale, eps,
    BW: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr, BDV: tl.constexpr,
    SOFTMAX: tl.constexpr, LINEAR: tl.constexpr, ZERO: tl.constexpr, HAS_NVALID: tl.constexpr,
    HAS_GAMMA: tl.constexpr, ACT: tl.constexpr, SIGNED: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    kvh = h // G
    F = 2 * FH if SIGNED else FH
    n = tl.load(POS + b * H + h)

    i = tl.arange(0, BW)
    rd = tl.arange(0, BD)
    rf = tl.arange(0, BF)
    rv = tl.arange(0, BDV)
    wmask = i < W
    dmask = rd < D
    fmask = (rf < FH)[None, :]
    slot = (n + 1 + i) % R  # i = 0: the key leaving the window; i >= 1: the rest of the window
    kbase = K + b * skb + kvh * skh
    vbase = V + b * svb + kvh * svh
    kt = tl.load(kbase + slot[:, None] * skr + rd[None, :], mask=wmask[:, None] & dmask[None, :], other=0.0)
    kt = kt.to(tl.float32)
    valid = (tl.load(VALID + b * R + slot, mask=wmask, other=0) != 0) & wmask
    in_win = valid & (i >= 1)
    kn_raw = tl.load(KN + b * sknb + kvh * sknh + rd, mask=dmask, other=0.0)
    kn = kn_raw.to(tl.float32)
    if HAS_NVALID:
        new_valid = tl.load(NVALID + b * snv) != 0
    else:
        new_valid = n >= 0  # always true, but a tensor (stored below)

    # weights of the window rows (wt, [BW]) and of the new key (wt_n)
    wt = tl.zeros([BW], dtype=tl.float32)
    wt_n = 0.0
    if SOFTMAX:
        q = tl.load(Q + b * sqb + h * sqh + rd, mask=dmask, other=0.0).to(tl.float32)
        s = tl.where(in_win, tl.sum(q[None, :] * kt, axis=1) * scale, float("-inf"))
        s_n = tl.where(new_valid, tl.sum(q * kn, axis=0) * scale, float("-inf"))
        c = tl.maximum(tl.max(s, axis=0), s_n)
        c = tl.where(c == float("-inf"), 0.0, c)  # every key is padding: exp(-inf) = 0, not NaN
        gamma = 1.0
        if HAS_GAMMA:
            gamma = 1.0 / (1.0 + tl.exp(-tl.load(THETA + h).to(tl.float32)))
        wt += gamma * tl.exp(s - c)
        wt_n += gamma * tl.exp(s_n - c)

    # the key leaving the window enters the state (every mode: the mode may change between steps)
    first = (i == 0) & valid
    k_old = tl.sum(tl.where(first[:, None], kt, 0.0), axis=0)
    old_valid = tl.sum(first.to(tl.float32), axis=0)  # 1.0 or 0.0
    po_a, po_b = _phi(_project_vec(k_old, KW, KB, h, D, FH, rd, rf, HAS_W, HAS_B), fmask, ACT, SIGNED)
    po_a = po_a * old_valid
    po_b = po_b * old_valid
    zbase = Z + (b * H + h) * F
    za = tl.load(zbase + rf[None, :], mask=fmask, other=0.0) + po_a
    tl.store(zbase + rf[None, :], za, mask=fmask)
    if SIGNED:
        zb = tl.load(zbase + FH + rf[None, :], mask=fmask, other=0.0) + po_b
        tl.store(zbase + FH + rf[None, :], zb, mask=fmask)

    den = eps
    if LINEAR != 0:
        qr = tl.load(Q + b * sqb + h * sqh + rd, mask=dmask, other=0.0).to(tl.float32)
        pq_a, pq_b = _phi(_project_vec(qr, QW, QB, h, D, FH, rd, rf, HAS_W, HAS_B), fmask, ACT, SIGNED)
        den += tl.sum(tl.sum(pq_a * za, axis=1), axis=0)
        if SIGNED:
            den += tl.sum(tl.sum(pq_b * zb, axis=1), axis=0)
        if LINEAR == 2:  # the window keys and the new key also enter through their features
            if HAS_W:
                wkm = dmask[:, None] & fmask
                Wk = tl.load(KW + h * D * FH + rd[:, None] * FH + rf[None, :], mask=wkm, other=0.0)
                zk = tl.dot(kt, Wk.to(tl.float32), input_precision="ieee")
            else:
                zk = kt
            if HAS_B:
                zk += tl.load(KB + h * FH + rf[None, :], mask=fmask, other=0.0).to(tl.float32)
            pk_a, pk_b = _phi(zk, fmask, ACT, SIGNED)
            a = tl.sum(pk_a * pq_a, axis=1)
            pn_a, pn_b = _phi(_project_vec(kn, KW, KB, h, D, FH, rd, rf, HAS_W, HAS_B), fmask, ACT, SIGNED)
            a_n = tl.sum(tl.sum(pn_a * pq_a, axis=1), axis=0)
            if SIGNED:
                a += tl.sum(pk_b * pq_b, axis=1)
                a_n += tl.sum(tl.sum(pn_b * pq_b, axis=1), axis=0)
            wt += tl.where(in_win, a, 0.0)
            wt_n += tl.where(new_valid, a_n, 0.0)
    den += tl.sum(wt, axis=0) + wt_n

    # values, state rows and the output, Dv in blocks of BDV
    writer = (h % G) == 0  # one program per kv head writes the new key/value into the free slot
    wslot = n % R
    sbase = S + (b * H + h) * F * DV
    ob = O + (b * H + h) * DV
    pos_a = po_a.reshape(BF)
    pos_b = po_b.reshape(BF)
    for v0 in range(0, DV, BDV):
        cv = v0 + rv
        vm = cv < DV
        vt = tl.load(vbase + slot[:, None] * svr + cv[None, :], mask=wmask[:, None] & vm[None, :], other=0.0)
        vt = vt.to(tl.float32)
        vn_raw = tl.load(VN + b * svnb + kvh * svnh + cv, mask=vm, other=0.0)
        v_old = tl.sum(tl.where((i == 0)[:, None], vt, 0.0), axis=0)
        sm = fmask.reshape(BF)[:, None] & vm[None, :]
        sp = sbase + rf[:, None] * DV + cv[None, :]
        Sa = tl.load(sp, mask=sm, other=0.0) + pos_a[:, None] * v_old[None, :]
        tl.store(sp, Sa, mask=sm)
        if SIGNED:
            Sb = tl.load(sp + FH * DV, mask=sm, other=0.0) + pos_b[:, None] * v_old[None, :]
            tl.store(sp + FH * DV, Sb, mask=sm)
        if ZERO:
            y = tl.zeros([BDV], dtype=tl.float32)
        else:
            num = tl.sum(wt[:, None] * vt, axis=0) + wt_n * vn_raw.to(tl.float32)
            if LINEAR != 0:
                num += tl.sum(pq_a.reshape(BF)[:, None] * Sa, axis=0)
                if SIGNED:
                    num += tl.sum(pq_b.reshape(BF)[:, None] * Sb, axis=0)
            y = num / den
        tl.store(ob + cv, y.to(O.dtype.element_ty), mask=vm)
        if writer:
            tl.store(vbase + wslot * svr + cv, vn_raw, mask=vm)
    if writer:
        tl.store(kbase + wslot * skr + rd, kn_raw, mask=dmask)
    if h == 0:
        tl.store(VALID + b * R + wslot, new_valid.to(tl.uint8))
    tl.store(POS + b * H + h, n + 1)


def _block(x: int) -> int:
    return max(16, triton.next_power_of_2(x))


def supported(q: torch.Tensor, ring_keys: torch.Tensor, window: int, q_map, activation: str) -> str | None:
    """None when the fused step handles these inputs, else the reason (the caller then takes the reference path)."""
    if not q.is_cuda and not INTERPRETED:
        return "inputs are not on a CUDA device"
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"dtype {q.dtype} is not supported"
    D = q.shape[-1]
    weight, _ = q_map
    FH = D if weight is None else weight.shape[-1]
    if _block(window) * _block(D) > MAX_TILE or _block(D) * _block(FH) > MAX_TILE:
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
        BW=_block(window), BD=_block(D), BF=_block(FH), BDV=min(_block(Dv), 32),
        SOFTMAX=attend and softmax, LINEAR=_LINEAR_CODE[linear] if attend else 0, ZERO=not attend,
        HAS_NVALID=key_valid is not None, HAS_GAMMA=theta is not None,
        ACT=ACTIVATIONS.get(activation, 4), SIGNED=signed, HAS_W=qw is not None, HAS_B=qb is not None,
        num_warps=4,
    )  # fmt: skip
    return out
