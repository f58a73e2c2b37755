"""Triton forward + backward for hybrid attention (sliding-window softmax + linear attention), memory linear in T.

Semantics are those of ``naive.hybrid_attention_naive``; README.md beside this file has the math and the scheme.
In short: chunks of BT = 64 >= w tokens. For query chunk i the softmax window and the "local" linear terms live
in key chunks i-1 and i (exact [BT, BT] blocks); all older keys (chunks <= i-2, outside any window) enter through
the state S = sum phi(k) v^T, z = sum phi(k). The sequence of chunks is cut into segments; a first kernel sums
each segment's state contribution, torch takes the exclusive prefix over segments, and the main kernels then run
in parallel over (segment, batch * head), carrying S in registers through the segment's chunks.

Backward (FlashAttention-style recomputation; o, the row max m and the normaliser Zd are saved):
  dA = do / Zd, dZ = -(do . o) / Zd, dW_nj = dA_n . v_j + dZ_n for the combined weight W = gamma exp(s - m) + a.
  Query side (_bwd_q_kernel, forward over chunks, state S): dq, dq_feat, dgamma and the row term of the max.
  Key side (_bwd_k_kernel, backward over chunks, state dS = sum phi(q) dA^T, dz = sum phi(q) dZ): dk, dv, dk_feat.
GQA: k/v are read through the kv head h // G; dk/dv are produced per query head in fp32 and summed over the group.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from .naive import LINEAR_SPANS

# Triton turns @triton.jit into its CPU interpreter when TRITON_INTERPRET=1 at the time this module is imported;
# the kernels then also accept CPU tensors.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
BT = 64  # chunk size: the kernel needs window <= BT when softmax terms are on
_LINEAR_CODE = {"none": 0, "outside": 1, "all": 2}


# --------------------------------------------------------------------------------------------------------------
# helpers (inlined by Triton)


@triton.jit
def _load_tile(ptr, rows, cols, T, NC, stride_t):
    """[len(rows), len(cols)] tile of a [T, NC] slice with row stride stride_t; zeros outside."""
    mask = (rows[:, None] >= 0) & (rows[:, None] < T) & (cols[None, :] < NC)
    return tl.load(ptr + rows[:, None].to(tl.int64) * stride_t + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _load_row(ptr, rows, T, other):
    return tl.load(ptr + rows, mask=(rows >= 0) & (rows < T), other=other)


@triton.jit
def _scores(q, k, n, j, T, window, scale, SOFTMAX: tl.constexpr, PREC: tl.constexpr):
    """Scaled scores of one [BT query, BT key] block, -inf outside the window W(n) = {n-w < j <= n}."""
    off = n[:, None] - j[None, :]
    win = (j[None, :] >= 0) & (j[None, :] < T) & (n[:, None] < T) & (off >= 0) & (off < window)
    if SOFTMAX:
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
        s = tl.where(win, s, float("-inf"))
    else:
        s = tl.full([n.shape[0], j.shape[0]], float("-inf"), dtype=tl.float32)
    return s


@triton.jit
def _lin_mask(n, j, T, window, LINEAR: tl.constexpr):
    """Where the local linear terms apply: keys outside the window (LINEAR=1) or all causal keys (LINEAR=2)."""
    off = n[:, None] - j[None, :]
    valid = (j[None, :] >= 0) & (j[None, :] < T) & (n[:, None] < T) & (off >= 0)
    if LINEAR == 1:
        valid = valid & (off >= window)
    return valid


@triton.jit
def _weights(s, qf, kf, m, n, j, gamma, T, window,
             SOFTMAX: tl.constexpr, LINEAR: tl.constexpr, PREC: tl.constexpr):
    """p0 = exp(s - m) (zero outside the window) and W = gamma * p0 + phi(q).phi(k) on the local linear span."""
    if SOFTMAX:
        p0 = tl.exp(s - m[:, None])
    else:
        p0 = tl.zeros([n.shape[0], j.shape[0]], dtype=tl.float32)
    w = gamma * p0
    if LINEAR != 0:
        a = tl.dot(qf, tl.trans(kf), input_precision=PREC)
        w += tl.where(_lin_mask(n, j, T, window, LINEAR), a, 0.0)
    return p0, w


# --------------------------------------------------------------------------------------------------------------
# segment state sums: out_S[bh, seg] = sum_{chunks c in seg, shifted} X_c^T (ra * Y_c), out_z = sum X_c^T rb


@triton.jit
def _segment_state_kernel(
    X, Y, RA, RB, OS, OZ,
    sxb, sxt, sxh, syb, syt, syh,
    T, H, GY, NT, CPS, SHIFT, NSEG,
    F: tl.constexpr, DV: tl.constexpr, BF: tl.constexpr, BDV: tl.constexpr, BT: tl.constexpr,
    HAS_RA: tl.constexpr, HAS_RB: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    r = tl.arange(0, BT)
    ff = tl.arange(0, BF)
    vv = tl.arange(0, BDV)
    xp = X + b.to(tl.int64) * sxb + h * sxh
    yp = Y + b.to(tl.int64) * syb + (h // GY) * syh
    rowp = pid_bh.to(tl.int64) * T
    S = tl.zeros([BF, BDV], dtype=tl.float32)
    z = tl.zeros([BF], dtype=tl.float32)
    lo = tl.maximum(pid_s * CPS + SHIFT, 0)
    hi = tl.minimum((pid_s + 1) * CPS + SHIFT, NT)
    for c in range(lo, hi):
        n = c * BT + r
        x = _load_tile(xp, n, ff, T, F, sxt)
        y = _load_tile(yp, n, vv, T, DV, syt).to(tl.float32)
        if HAS_RA:
            y = y * _load_row(RA + rowp, n, T, 0.0)[:, None]
        if HAS_RB:
            z += tl.sum(x.to(tl.float32) * _load_row(RB + rowp, n, T, 0.0)[:, None], axis=0)
        else:
            z += tl.sum(x.to(tl.float32), axis=0)
        S += tl.dot(tl.trans(x), y.to(DT), input_precision=PREC)
    base = (pid_bh.to(tl.int64) * NSEG + pid_s)
    tl.store(OS + base * BF * BDV + ff[:, None] * BDV + vv[None, :], S)
    tl.store(OZ + base * BF + ff, z)


# --------------------------------------------------------------------------------------------------------------
# forward


@triton.jit
def _fwd_kernel(
    Q, K, V, QF, KF, GAMMA, OUT, M, ZD, S0, Z0,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sfb, sft, sfh, sob, sot, soh,
    T, H, G, NT, CPS, NSEG, window, scale, eps,
    D: tl.constexpr, DV: tl.constexpr, F: tl.constexpr,
    BD: tl.constexpr, BDV: tl.constexpr, BF: tl.constexpr, BT: tl.constexpr,
    SOFTMAX: tl.constexpr, LINEAR: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // G
    r = tl.arange(0, BT)
    dd = tl.arange(0, BD)
    vv = tl.arange(0, BDV)
    ff = tl.arange(0, BF)
    qp = Q + b.to(tl.int64) * sqb + h * sqh
    kp = K + b.to(tl.int64) * skb + hk * skh
    vp = V + b.to(tl.int64) * svb + hk * svh
    qfp = QF + b.to(tl.int64) * sfb + h * sfh
    kfp = KF + b.to(tl.int64) * sfb + h * sfh
    op = OUT + b.to(tl.int64) * sob + h * soh
    rowp = pid_bh.to(tl.int64) * T
    gamma = tl.load(GAMMA + h).to(tl.float32)
    if LINEAR != 0:
        base = pid_bh.to(tl.int64) * NSEG + pid_s
        S = tl.load(S0 + base * BF * BDV + ff[:, None] * BDV + vv[None, :])
        z = tl.load(Z0 + base * BF + ff)
    c0 = pid_s * CPS
    c1 = tl.minimum(c0 + CPS, NT)
    for i in range(c0, c1):
        n = i * BT + r
        jp = n - BT
        v_prev = _load_tile(vp, jp, vv, T, DV, svt)
        v_cur = _load_tile(vp, n, vv, T, DV, svt)
        q = tl.zeros([BT, BD], dtype=DT)
        k_prev = q
        k_cur = q
        qf = tl.zeros([BT, BF], dtype=DT)
        kf_prev = qf
        kf_cur = qf
        if SOFTMAX:
            q = _load_tile(qp, n, dd, T, D, sqt)
            k_prev = _load_tile(kp, jp, dd, T, D, skt)
            k_cur = _load_tile(kp, n, dd, T, D, skt)
        s_prev = _scores(q, k_prev, n, jp, T, window, scale, SOFTMAX, PREC)
        s_cur = _scores(q, k_cur, n, n, T, window, scale, SOFTMAX, PREC)
        # the row max runs over the window only; rows past T (all -inf) get 0
        m = tl.maximum(tl.max(s_prev, axis=1), tl.max(s_cur, axis=1))
        m = tl.where(n < T, m, 0.0)
        if LINEAR != 0:
            qf = _load_tile(qfp, n, ff, T, F, sft)
            kf_prev = _load_tile(kfp, jp, ff, T, F, sft)
            kf_cur = _load_tile(kfp, n, ff, T, F, sft)
        _, w_prev = _weights(s_prev, qf, kf_prev, m, n, jp, gamma, T, window, SOFTMAX, LINEAR, PREC)
        _, w_cur = _weights(s_cur, qf, kf_cur, m, n, n, gamma, T, window, SOFTMAX, LINEAR, PREC)
        acc = tl.dot(w_prev.to(DT), v_prev, input_precision=PREC)
        acc = tl.dot(w_cur.to(DT), v_cur, acc, input_precision=PREC)
        zacc = tl.sum(w_prev, axis=1) + tl.sum(w_cur, axis=1)
        if LINEAR != 0:
            # keys of chunks <= i-2, then chunk i-1 joins the state for chunk i+1
            acc = tl.dot(qf, S.to(DT), acc, input_precision=PREC)
            zacc += tl.sum(qf.to(tl.float32) * z[None, :], axis=1)
            S = tl.dot(tl.trans(kf_prev), v_prev, S, input_precision=PREC)
            z += tl.sum(kf_prev.to(tl.float32), axis=0)
        zd = zacc + eps
        o = acc / zd[:, None]
        omask = (n[:, None] < T) & (vv[None, :] < DV)
        tl.store(op + n[:, None].to(tl.int64) * sot + vv[None, :], o.to(OUT.dtype.element_ty), mask=omask)
        tl.store(M + rowp + n, m, mask=n < T)
        tl.store(ZD + rowp + n, zd, mask=n < T)


# --------------------------------------------------------------------------------------------------------------
# backward, query side: dq, dq_feat, dgamma, and for the key side the row sum r_n = sum_j p_nj dW_nj and arg max


@triton.jit
def _bwd_q_kernel(
    Q, K, V, QF, KF, GAMMA, DO, M, ZD, DELTA, S0, Z0,
    DQ, DQF, R, IDX, DG,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sfb, sft, sfh, sdb, sdt, sdh,
    T, H, G, NT, CPS, NSEG, window, scale,
    D: tl.constexpr, DV: tl.constexpr, F: tl.constexpr,
    BD: tl.constexpr, BDV: tl.constexpr, BF: tl.constexpr, BT: tl.constexpr,
    SOFTMAX: tl.constexpr, LINEAR: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // G
    r = tl.arange(0, BT)
    dd = tl.arange(0, BD)
    vv = tl.arange(0, BDV)
    ff = tl.arange(0, BF)
    qp = Q + b.to(tl.int64) * sqb + h * sqh
    kp = K + b.to(tl.int64) * skb + hk * skh
    vp = V + b.to(tl.int64) * svb + hk * svh
    kfp = KF + b.to(tl.int64) * sfb + h * sfh
    dop = DO + b.to(tl.int64) * sdb + h * sdh
    dqp = DQ + b.to(tl.int64) * sqb + h * sqh
    dqfp = DQF + b.to(tl.int64) * sfb + h * sfh
    rowp = pid_bh.to(tl.int64) * T
    gamma = tl.load(GAMMA + h).to(tl.float32)
    if LINEAR != 0:
        base = pid_bh.to(tl.int64) * NSEG + pid_s
        S = tl.load(S0 + base * BF * BDV + ff[:, None] * BDV + vv[None, :])
        z = tl.load(Z0 + base * BF + ff)
    dg = tl.zeros([BT], dtype=tl.float32)
    c0 = pid_s * CPS
    c1 = tl.minimum(c0 + CPS, NT)
    for i in range(c0, c1):
        n = i * BT + r
        jp = n - BT
        inv = 1.0 / _load_row(ZD + rowp, n, T, 1.0)
        dA = _load_tile(dop, n, vv, T, DV, sdt).to(tl.float32) * inv[:, None]
        dZ = -_load_row(DELTA + rowp, n, T, 0.0) * inv
        v_prev = _load_tile(vp, jp, vv, T, DV, svt)
        v_cur = _load_tile(vp, n, vv, T, DV, svt)
        # dW_nj = dA_n . v_j + dZ_n for every weight W_nj of the shared numerator / normaliser
        dW_p = tl.dot(dA.to(DT), tl.trans(v_prev), input_precision=PREC) + dZ[:, None]
        dW_c = tl.dot(dA.to(DT), tl.trans(v_cur), input_precision=PREC) + dZ[:, None]
        if SOFTMAX:
            m = _load_row(M + rowp, n, T, 0.0)
            q = _load_tile(qp, n, dd, T, D, sqt)
            k_prev = _load_tile(kp, jp, dd, T, D, skt)
            k_cur = _load_tile(kp, n, dd, T, D, skt)
            s_p = _scores(q, k_prev, n, jp, T, window, scale, SOFTMAX, PREC)
            s_c = _scores(q, k_cur, n, n, T, window, scale, SOFTMAX, PREC)
            pw0_p = tl.exp(s_p - m[:, None]) * dW_p
            pw0_c = tl.exp(s_c - m[:, None]) * dW_c
            row = tl.sum(pw0_p, axis=1) + tl.sum(pw0_c, axis=1)
            dg += row
            rsum = gamma * row
            # c_n = max_j s_nj is differentiated too (the linear terms do not rescale with it): its gradient
            # -sum_j p_nj dW_nj goes to the arg max (first one on ties)
            mp = tl.max(s_p, axis=1)
            mc = tl.max(s_c, axis=1)
            idx = tl.where(mp >= mc, (i - 1) * BT + tl.argmax(s_p, axis=1), i * BT + tl.argmax(s_c, axis=1))
            ds_p = gamma * pw0_p - tl.where(jp[None, :] == idx[:, None], rsum[:, None], 0.0)
            ds_c = gamma * pw0_c - tl.where(n[None, :] == idx[:, None], rsum[:, None], 0.0)
            dq = tl.dot(ds_p.to(DT), k_prev, input_precision=PREC)
            dq = tl.dot(ds_c.to(DT), k_cur, dq, input_precision=PREC) * scale
            tl.store(dqp + n[:, None].to(tl.int64) * sqt + dd[None, :], dq.to(DQ.dtype.element_ty),
                     mask=(n[:, None] < T) & (dd[None, :] < D))
            tl.store(R + rowp + n, rsum, mask=n < T)
            tl.store(IDX + rowp + n, idx.to(tl.int32), mask=n < T)
        if LINEAR != 0:
            kf_prev = _load_tile(kfp, jp, ff, T, F, sft)
            kf_cur = _load_tile(kfp, n, ff, T, F, sft)
            da_p = tl.where(_lin_mask(n, jp, T, window, LINEAR), dW_p, 0.0)
            da_c = tl.where(_lin_mask(n, n, T, window, LINEAR), dW_c, 0.0)
            dqf = tl.dot(da_p.to(DT), kf_prev, input_precision=PREC)
            dqf = tl.dot(da_c.to(DT), kf_cur, dqf, input_precision=PREC)
            dqf = tl.dot(dA.to(DT), tl.trans(S.to(DT)), dqf, input_precision=PREC)
            dqf += dZ[:, None] * z[None, :]
            tl.store(dqfp + n[:, None].to(tl.int64) * sft + ff[None, :], dqf.to(DQF.dtype.element_ty),
                     mask=(n[:, None] < T) & (ff[None, :] < F))
            S = tl.dot(tl.trans(kf_prev), v_prev, S, input_precision=PREC)
            z += tl.sum(kf_prev.to(tl.float32), axis=0)
    tl.store(DG + pid_bh.to(tl.int64) * NSEG + pid_s, tl.sum(dg, axis=0))


# --------------------------------------------------------------------------------------------------------------
# backward, key side: dk, dv (per query head, fp32), dk_feat


@triton.jit
def _bwd_k_block(
    qp, qfp, dop, rowp, sqt, sft, sdt, M, ZD, DELTA, R, IDX,
    k, v, kf, n, j, gamma, T, window, scale,
    D: tl.constexpr, DV: tl.constexpr, F: tl.constexpr,
    BT: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BF: tl.constexpr,
    SOFTMAX: tl.constexpr, LINEAR: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    """Contributions of query rows n to the gradients of key chunk j: (ds^T q, da^T phi(q), W^T dA)."""
    dd = tl.arange(0, BD)
    vv = tl.arange(0, BDV)
    ff = tl.arange(0, BF)
    inv = 1.0 / _load_row(ZD + rowp, n, T, 1.0)
    dA = (_load_tile(dop, n, vv, T, DV, sdt).to(tl.float32) * inv[:, None]).to(DT)
    dZ = -_load_row(DELTA + rowp, n, T, 0.0) * inv
    q = tl.zeros([BT, BD], dtype=DT)
    qf = tl.zeros([BT, BF], dtype=DT)
    m = tl.zeros([BT], dtype=tl.float32)
    if SOFTMAX:
        q = _load_tile(qp, n, dd, T, D, sqt)
        m = _load_row(M + rowp, n, T, 0.0)
    if LINEAR != 0:
        qf = _load_tile(qfp, n, ff, T, F, sft)
    s = _scores(q, k, n, j, T, window, scale, SOFTMAX, PREC)
    p0, w = _weights(s, qf, kf, m, n, j, gamma, T, window, SOFTMAX, LINEAR, PREC)
    dW = tl.dot(dA, tl.trans(v), input_precision=PREC) + dZ[:, None]
    dv = tl.dot(tl.trans(w.to(DT)), dA, input_precision=PREC)
    dk = tl.zeros([BT, BD], dtype=tl.float32)
    dkf = tl.zeros([BT, BF], dtype=tl.float32)
    if SOFTMAX:
        rsum = _load_row(R + rowp, n, T, 0.0)
        idx = _load_row(IDX + rowp, n, T, -1)
        ds = gamma * p0 * dW - tl.where(j[None, :] == idx[:, None], rsum[:, None], 0.0)
        dk = tl.dot(tl.trans(ds.to(DT)), q, input_precision=PREC)
    if LINEAR != 0:
        da = tl.where(_lin_mask(n, j, T, window, LINEAR), dW, 0.0)
        dkf = tl.dot(tl.trans(da.to(DT)), qf, input_precision=PREC)
    return dk, dkf, dv


@triton.jit
def _bwd_k_kernel(
    Q, K, V, QF, KF, GAMMA, DO, M, ZD, DELTA, R, IDX, DS0, DZ0,
    DK, DV_, DKF,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sfb, sft, sfh, sdb, sdt, sdh,
    spb, spt, sph, svpb, svpt, svph,
    T, H, G, NT, CPS, NSEG, window, scale,
    D: tl.constexpr, DV: tl.constexpr, F: tl.constexpr,
    BD: tl.constexpr, BDV: tl.constexpr, BF: tl.constexpr, BT: tl.constexpr,
    SOFTMAX: tl.constexpr, LINEAR: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // G
    r = tl.arange(0, BT)
    dd = tl.arange(0, BD)
    vv = tl.arange(0, BDV)
    ff = tl.arange(0, BF)
    qp = Q + b.to(tl.int64) * sqb + h * sqh
    kp = K + b.to(tl.int64) * skb + hk * skh
    vp = V + b.to(tl.int64) * svb + hk * svh
    qfp = QF + b.to(tl.int64) * sfb + h * sfh
    kfp = KF + b.to(tl.int64) * sfb + h * sfh
    dop = DO + b.to(tl.int64) * sdb + h * sdh
    dkp = DK + b.to(tl.int64) * spb + h * sph
    dvp = DV_ + b.to(tl.int64) * svpb + h * svph
    dkfp = DKF + b.to(tl.int64) * sfb + h * sfh
    rowp = pid_bh.to(tl.int64) * T
    gamma = tl.load(GAMMA + h).to(tl.float32)
    if LINEAR != 0:
        base = pid_bh.to(tl.int64) * NSEG + pid_s
        dS = tl.load(DS0 + base * BF * BDV + ff[:, None] * BDV + vv[None, :])
        dz = tl.load(DZ0 + base * BF + ff)
    c0 = pid_s * CPS
    c1 = tl.minimum(c0 + CPS, NT)
    for ii in range(c0, c1):
        i = c1 - 1 - ii + c0  # key chunks in reverse order
        j = i * BT + r
        nn = j + BT
        v = _load_tile(vp, j, vv, T, DV, svt)
        k = tl.zeros([BT, BD], dtype=DT)
        kf = tl.zeros([BT, BF], dtype=DT)
        if SOFTMAX:
            k = _load_tile(kp, j, dd, T, D, skt)
        if LINEAR != 0:
            kf = _load_tile(kfp, j, ff, T, F, sft)
        # queries of the same chunk and of the next one see these keys exactly
        dk, dkf, dv = _bwd_k_block(qp, qfp, dop, rowp, sqt, sft, sdt, M, ZD, DELTA, R, IDX,
                                   k, v, kf, j, j, gamma, T, window, scale, D, DV, F, BT, BD, BDV, BF,
                                   SOFTMAX, LINEAR, DT, PREC)
        dk2, dkf2, dv2 = _bwd_k_block(qp, qfp, dop, rowp, sqt, sft, sdt, M, ZD, DELTA, R, IDX,
                                      k, v, kf, nn, j, gamma, T, window, scale, D, DV, F, BT, BD, BDV, BF,
                                      SOFTMAX, LINEAR, DT, PREC)
        dk += dk2
        dkf += dkf2
        dv += dv2
        if LINEAR != 0:
            # queries of chunks >= i+2 through dS, dz; then chunk i+1 joins them for key chunk i-1
            dkf = tl.dot(v, tl.trans(dS.to(DT)), dkf, input_precision=PREC)
            dkf += dz[None, :]
            dv = tl.dot(kf, dS.to(DT), dv, input_precision=PREC)
            inv = 1.0 / _load_row(ZD + rowp, nn, T, 1.0)
            dA = (_load_tile(dop, nn, vv, T, DV, sdt).to(tl.float32) * inv[:, None]).to(DT)
            dZ = -_load_row(DELTA + rowp, nn, T, 0.0) * inv
            qf1 = _load_tile(qfp, nn, ff, T, F, sft)
            dS = tl.dot(tl.trans(qf1), dA, dS, input_precision=PREC)
            dz += tl.sum(qf1.to(tl.float32) * dZ[:, None], axis=0)
            tl.store(dkfp + j[:, None].to(tl.int64) * sft + ff[None, :], dkf.to(DKF.dtype.element_ty),
                     mask=(j[:, None] < T) & (ff[None, :] < F))
        jm = j[:, None] < T
        tl.store(dkp + j[:, None].to(tl.int64) * spt + dd[None, :], dk * scale, mask=jm & (dd[None, :] < D))
        tl.store(dvp + j[:, None].to(tl.int64) * svpt + vv[None, :], dv, mask=jm & (vv[None, :] < DV))


# --------------------------------------------------------------------------------------------------------------
# host side


def _p2(x: int) -> int:
    return max(16, triton.next_power_of_2(x))


def _dot_dtype(dtype: torch.dtype):
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}[dtype]


# Chunks per segment; None picks it from the shape. Tests set it small to exercise the state hand-over.
SEGMENT_CHUNKS: int | None = None


def _num_segments(NT: int, BH: int) -> int:
    """Segments per (batch, head): enough programs to fill the GPU (~1024), at least 4 chunks each."""
    if SEGMENT_CHUNKS is not None:
        return triton.cdiv(NT, SEGMENT_CHUNKS)
    want = max(1, math.ceil(1024 / BH))
    return max(1, min(want, NT // 4 if NT >= 4 else 1))


def supported(q, k, v, q_feat, k_feat, *, window: int, softmax: bool, linear: str) -> str | None:
    """None when the Triton path handles these inputs, else the reason it does not."""
    if not q.is_cuda and not _interpreting():
        return "inputs are not on a CUDA device"
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"dtype {q.dtype} is not supported"
    if len({q.dtype, k.dtype, v.dtype}) != 1:
        return f"q, k, v have different dtypes ({q.dtype}, {k.dtype}, {v.dtype})"
    if softmax and window > BT:
        return f"window {window} > chunk size {BT}"
    D, Dv = q.shape[-1], v.shape[-1]
    F = q_feat.shape[-1] if linear != "none" else 16
    if max(D, Dv, F) > 256:
        return f"head dims (D={D}, Dv={Dv}, F={F}) above 256"
    return None


def _interpreting() -> bool:
    return INTERPRETED


def _c(x):
    return x if x.stride(-1) == 1 else x.contiguous()


class HybridAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, q_feat, k_feat, gamma, window, softmax, linear, scale, eps):
        B, T, H, D = q.shape
        Hkv, Dv = k.shape[2], v.shape[-1]
        G = H // Hkv
        lin = _LINEAR_CODE[linear]
        q, k, v = _c(q), _c(k), _c(v)
        if lin == 0:  # no features: pass q as a dummy pointer, never read
            q_feat_t, k_feat_t, F = q, q, 16
        else:
            q_feat_t, k_feat_t, F = _c(q_feat), _c(k_feat), q_feat.shape[-1]
            assert q_feat_t.stride() == k_feat_t.stride()
        gam = gamma if gamma is not None else torch.ones(H, device=q.device, dtype=torch.float32)
        gam = gam.float().contiguous()
        BD, BDV, BF = _p2(D), _p2(Dv), _p2(F)
        NT = triton.cdiv(T, BT)
        NSEG = _num_segments(NT, B * H)
        CPS = triton.cdiv(NT, NSEG)
        NSEG = triton.cdiv(NT, CPS)
        DT = _dot_dtype(q.dtype)
        PREC = "ieee" if q.dtype == torch.float32 else "tf32"
        dev = q.device
        o = torch.empty(B, T, H, Dv, device=dev, dtype=v.dtype)
        M = torch.empty(B * H, T, device=dev, dtype=torch.float32)
        ZD = torch.empty(B * H, T, device=dev, dtype=torch.float32)
        S0 = Z0 = M  # dummies when there is no linear term
        if lin:
            Sseg = torch.empty(B * H, NSEG, BF, BDV, device=dev, dtype=torch.float32)
            zseg = torch.empty(B * H, NSEG, BF, device=dev, dtype=torch.float32)
            _segment_state_kernel[(NSEG, B * H)](
                k_feat_t, v, M, M, Sseg, zseg,
                k_feat_t.stride(0), k_feat_t.stride(1), k_feat_t.stride(2), v.stride(0), v.stride(1), v.stride(2),
                T, H, G, NT, CPS, -1, NSEG,
                F=F, DV=Dv, BF=BF, BDV=BDV, BT=BT, HAS_RA=False, HAS_RB=False, DT=DT, PREC=PREC,
                num_warps=8 if BF * BDV >= 128 * 128 else 4,
            )
            S0 = (torch.cumsum(Sseg, 1) - Sseg).contiguous()  # keys of chunks <= first chunk - 2
            Z0 = (torch.cumsum(zseg, 1) - zseg).contiguous()
        warps = 8 if max(BD, BDV, BF) >= 128 else 4
        _fwd_kernel[(NSEG, B * H)](
            q, k, v, q_feat_t, k_feat_t, gam, o, M, ZD, S0, Z0,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), q_feat_t.stride(0), q_feat_t.stride(1), q_feat_t.stride(2),
            o.stride(0), o.stride(1), o.stride(2),
            T, H, G, NT, CPS, NSEG, window, scale, eps,
            D=D, DV=Dv, F=F, BD=BD, BDV=BDV, BF=BF, BT=BT,
            SOFTMAX=softmax, LINEAR=lin, DT=DT, PREC=PREC, num_warps=warps, num_stages=1,
        )
        ctx.save_for_backward(q, k, v, q_feat_t, k_feat_t, gam, o, M, ZD, S0, Z0)
        ctx.cfg = (window, softmax, lin, scale, NT, NSEG, CPS, F, gamma is not None)
        ctx.gamma_dtype = None if gamma is None else gamma.dtype
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, q_feat, k_feat, gam, o, M, ZD, S0, Z0 = ctx.saved_tensors
        window, softmax, lin, scale, NT, NSEG, CPS, F, has_gamma = ctx.cfg
        B, T, H, D = q.shape
        Hkv, Dv = k.shape[2], v.shape[-1]
        G = H // Hkv
        do = _c(do)
        BD, BDV, BF = _p2(D), _p2(Dv), _p2(F)
        DT = _dot_dtype(q.dtype)
        PREC = "ieee" if q.dtype == torch.float32 else "tf32"
        dev = q.device
        delta = (do.float() * o.float()).sum(-1).permute(0, 2, 1).reshape(B * H, T).contiguous()
        dq = torch.zeros_like(q)
        dqf = torch.empty_like(q_feat) if lin else q
        dkf = torch.empty_like(k_feat) if lin else q
        dk_h = torch.empty(B, T, H, D, device=dev, dtype=torch.float32)
        dv_h = torch.empty(B, T, H, Dv, device=dev, dtype=torch.float32)
        rsum = torch.zeros(B * H, T, device=dev, dtype=torch.float32)
        idx = torch.full((B * H, T), -1, device=dev, dtype=torch.int32)
        dg = torch.zeros(B * H, NSEG, device=dev, dtype=torch.float32)
        dS0 = dz0 = M
        if lin:
            dSseg = torch.empty(B * H, NSEG, BF, BDV, device=dev, dtype=torch.float32)
            dzseg = torch.empty(B * H, NSEG, BF, device=dev, dtype=torch.float32)
            inv = 1.0 / ZD
            _segment_state_kernel[(NSEG, B * H)](
                q_feat, do, inv, -delta * inv, dSseg, dzseg,
                q_feat.stride(0), q_feat.stride(1), q_feat.stride(2), do.stride(0), do.stride(1), do.stride(2),
                T, H, 1, NT, CPS, 1, NSEG,
                F=F, DV=Dv, BF=BF, BDV=BDV, BT=BT, HAS_RA=True, HAS_RB=True, DT=DT, PREC=PREC,
                num_warps=8 if BF * BDV >= 128 * 128 else 4,
            )
            # queries of chunks >= last chunk + 2: exclusive suffix sums over segments
            dS0 = (dSseg.sum(1, keepdim=True) - torch.cumsum(dSseg, 1)).contiguous()
            dz0 = (dzseg.sum(1, keepdim=True) - torch.cumsum(dzseg, 1)).contiguous()
        warps = 8 if max(BD, BDV, BF) >= 128 else 4
        strides = (
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), q_feat.stride(0), q_feat.stride(1), q_feat.stride(2),
            do.stride(0), do.stride(1), do.stride(2),
        )
        meta = dict(D=D, DV=Dv, F=F, BD=BD, BDV=BDV, BF=BF, BT=BT, SOFTMAX=softmax, LINEAR=lin, DT=DT, PREC=PREC,
                    num_warps=warps, num_stages=1)
        _bwd_q_kernel[(NSEG, B * H)](
            q, k, v, q_feat, k_feat, gam, do, M, ZD, delta, S0, Z0, dq, dqf, rsum, idx, dg,
            *strides, T, H, G, NT, CPS, NSEG, window, scale, **meta,
        )
        _bwd_k_kernel[(NSEG, B * H)](
            q, k, v, q_feat, k_feat, gam, do, M, ZD, delta, rsum, idx, dS0, dz0, dk_h, dv_h, dkf,
            *strides, dk_h.stride(0), dk_h.stride(1), dk_h.stride(2), dv_h.stride(0), dv_h.stride(1), dv_h.stride(2),
            T, H, G, NT, CPS, NSEG, window, scale, **meta,
        )
        dk = dk_h.view(B, T, Hkv, G, D).sum(3).to(k.dtype)
        dv = dv_h.view(B, T, Hkv, G, Dv).sum(3).to(v.dtype)
        # terms absent from the function get None, as autograd gives for unused inputs of the reference
        dgamma = dg.view(B, H, NSEG).sum((0, 2)).to(ctx.gamma_dtype) if has_gamma and softmax else None
        if not softmax:
            dq = dk = None
        dqf_out, dkf_out = (dqf, dkf) if lin else (None, None)
        return dq, dk, dv, dqf_out, dkf_out, dgamma, None, None, None, None, None


def hybrid_attention_chunk(
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
    """Triton hybrid attention, forward and backward. Arguments and result as ``hybrid_attention_naive``.

    q: [B, T, H, D]; k: [B, T, Hkv, D]; v: [B, T, Hkv, Dv]; q_feat, k_feat: [B, T, H, F]; gamma: [H] -> [B, T, H, Dv].
    q_feat / k_feat are cast to the dtype of q. Raises ValueError for inputs the kernel does not handle
    (see ``supported``).
    """
    if linear not in LINEAR_SPANS:
        raise ValueError(f"linear must be one of {LINEAR_SPANS}, got {linear!r}")
    if not softmax and linear == "none":
        raise ValueError("softmax=False with linear='none' leaves no attention terms")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"query heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]})")
    why = supported(q, k, v, q_feat, k_feat, window=window, softmax=softmax, linear=linear)
    if why is not None:
        raise ValueError(f"hybrid_attention_chunk cannot run: {why}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if linear == "none":
        q_feat = k_feat = None
    else:  # feature maps often run in fp32; the dots take them in the dtype of q (bf16 tensor cores)
        q_feat, k_feat = q_feat.to(q.dtype), k_feat.to(q.dtype)
    return HybridAttentionFunction.apply(q, k, v, q_feat, k_feat, gamma, window, softmax, linear, scale, eps)
