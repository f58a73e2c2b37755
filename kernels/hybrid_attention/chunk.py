"""Triton forward + backward for hybrid attention (sliding-window softmax + linear attention), memory linear in T.

Semantics are those of ``naive.hybrid_attention_naive``; README.md beside this file has the math and the scheme.
In short: chunks of BT = 64 >= w tokens. For query chunk i the softmax window and the "local" linear terms live
in key chunks i-1 and i (exact [BT, BT] blocks); all older keys (chunks <= i-2, outside any window) enter through
the state S = sum phi(k) v^T, z = sum phi(k). As in flash-linear-attention's chunk kernels the work is split in two:

  * a state pass (``_chunk_state_kernel``, grid (F blocks x Dv blocks, B*H, segments of STATE_SEG steps; one
    segment by default), a sequential loop holding one [BK, BV] fp32 state tile) writes one state per
    STATE_STRIDE = SC chunks to memory: h[p] = S_{SC p - 2} `[F, Dv]` in the dtype of the dots and z[p] `[F]` in
    fp32, each step adding SC chunks;
  * the output / gradient kernels are then fully parallel over (chunk, [Dv block,] batch*head) and carry no state:
    chunk i reads h[i // SC] right before its dot and adds the i % SC key chunks between that state and its own
    window (S_{i-2} - S_{SC p - 2}) as exact linear blocks. In the hybrid with w >= BT the linear terms of a
    query's own key chunk are all masked and their dots are skipped (CUR_LIN = 0).

Backward (FlashAttention-style recomputation; o, the row max m and the normaliser Zd are saved, h is recomputed
unless KEEP_STATES, p0 unless FWD_P):
  dA = do / Zd, dZ = -(do . o) / Zd, dW_nj = dA_n . v_j + dZ_n for the combined weight W = gamma exp(s - m) + a.
  _delta_kernel writes delta = do . o, dZ and, for the reverse state pass, dA in the dtype of do (DELTA_Q: only dZ
  and dA, on the side stream; the query side's first launch computes delta itself).
  The state pass, run in reverse on phi(q) and dA, gives dh[p] = sum_{query chunks >= SC p + SC + 1} phi(q)^T dA
  and dz[p]; key chunk i adds the query chunks i+2 .. SC p + SC exactly. From SIDE_STREAM_MIN_CHUNKS chunks the
  state passes run on a second CUDA stream, beside the delta kernel and the query side's softmax launch.
  Query side (_bwd_q_kernel): dq, dq_feat, dgamma and the row term of the max (from h). Its softmax side stores the
  [BT, BT] blocks of ds, gamma p0 (SAVE_P) and the local linear terms' dW (SAVE_DW) of its two key chunks in the
  dtype of the dots, for the kernels after it (WINDOW_BLOCKS, the default: ds and gamma p0 in one window block per
  query chunk, its two score blocks merged before the softmax work). With FWD_P (the default) a forward that needs
  gradients stores each chunk's window block of p0 and the rows' arg maxes, and the softmax side reads them instead
  of computing its scores again.
  Key side: dk, dv and dgamma's sum over the chunks (_bwd_kv_kernel) and dk_feat (_bwd_kf_kernel), from dh and
  those blocks (no scores computed again there). With REV_LIN (the default) no dh goes to memory: the reverse scan
  (_bwd_rev_kernel, in segments that start from the totals of phase 1 of the state pass) holds dh in registers and
  writes dk_feat and each head's linear terms of dv itself; the key side then adds those and computes the softmax
  terms only, and _bwd_kf_kernel is not launched.
GQA: k/v are read through the kv head h // G; the key-side program of a kv head sums dk/dv over its G query heads
in registers and writes them once, in the dtype of k/v.
"""

from __future__ import annotations

import functools
import math
import os
import sys
import types

import torch
import triton
import triton.language as tl
from triton import knobs

from ..launch import Plans, direct
from .naive import LINEAR_SPANS

# Triton turns @triton.jit into its CPU interpreter when TRITON_INTERPRET=1 at the time this module is imported;
# the kernels then also accept CPU tensors.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
BT = 64  # chunk size: the kernel needs window <= BT when softmax terms or linear terms "outside" it are on
_LINEAR_CODE = {"none": 0, "outside": 1, "all": 2}

# Launch settings, for D = F = Dv = 128 (smaller head dims take 4 warps and 1 stage everywhere). Every value below
# comes from `python -m linearize.kernels.bench --tune` on an H100 and was timed again against its variants on an
# H200 (kernels/bench_tune_h100_*.json, kernels/bench_tune_h200*.json; the kernel README has the tables); `python -m linearize.kernels.spills` shows the register use of any setting without a GPU; the
# tests set the blocks small and switch every option on to exercise them.
#
# STATE_BF x STATE_BV: the fp32 state tile of one state-pass program. OUT_BV: the forward's Dv block (128: the whole
# Dv in one program, so the [BT, BT] weights are computed once; 3.95 -> 2.60 ms forward at 32K).
STATE_BF = 64
STATE_BV = 64
OUT_BV = 128
# STATE_SEG > 0 scans the sequence in segments of STATE_SEG chunks (two levels: segment totals, then each segment
# from the sum of the totals before it): a chain of 2 STATE_SEG steps instead of NT. 0 = one pass. At 32 heads one
# pass is faster (H100: 9.27 vs 9.68 ms forward+backward at 32K with segments of 32; H200: 128 x 128 tiles in
# segments of 16, 6.91 vs 5.85 ms): the pass is bound by the work of each step, which segments do not shorten
# (the same 0.62 ms per pass on the H200 as on the H100); segments may pay off with few heads.
STATE_SEG = 0
# STATE_STRIDE (SC, a power of two): the state pass stores one state per SC chunks and adds SC chunks per step (one
# dot over SC BT rows); chunk i of group p = i // SC adds the i % SC key chunks after the state exactly, in the
# output / query-side kernels, and the SC - 1 - i % SC query chunks before the reverse state, in the key-side ones.
# SC times fewer states written and read (at 32 heads and 32K, 512 MB of bf16 per pass at SC = 1) and steps in the
# chain, for (SC - 1) / 2 more [BT, BT] linear blocks per chunk on average. STATE_STRIDE is that of the forward
# states (state pass, output and query-side kernels), REV_STATE_STRIDE that of the reverse ones (key side).
# H200, 32K: SC = 2 took the forward from 1.30 to 1.01 ms (state pass 0.42 -> 0.31, _fwd_kernel 0.75 -> 0.70), but
# at SC = 2 the key-side _bwd_kv_kernel spills more (ptxas: 140 / 224 B a thread against 60 / 76) and took 1.58
# against 1.33 ms, so the reverse states stay one per chunk.
STATE_STRIDE = 2
REV_STATE_STRIDE = 1
# GROUP_HEADS: the output, query-side and dk_feat kernels run the G query heads of a kv head as adjacent programs
# (their chunk axis is chunk * G + head in group), so that they read its k / v tiles from L2 close together; off, the
# programs of one head run over all its chunks before the next head starts. H200, 32K: 0.977 / 4.742 ms forward /
# forward+backward against 1.007 / 4.804 apart (the overlap mode's _fwd_kernel spills 120 B a thread grouped, 72
# apart; not timed).
GROUP_HEADS = True
# KEEP_STATES: the forward's states stay alive for the backward: one state pass fewer per step, for NT / SC F Dv per
# head more saved memory per layer (2 / SC times the size of q at F = Dv = D: the size of q at SC = 2, bf16). On by
# default since the tenth pass: faster at 32K in each of the 13 tune runs that timed it (sessions 5-10; 0.10-0.25 ms
# since the eighth pass, 4.23 against 4.41 ms forward+backward in the tenth's interleaved run, H200), and the target
# is the speed at long context; the peak of one layer's forward+backward does not change (the states are alive in
# the forward either way). Off: recompute them, as FlashAttention and fla do, for the smallest activation memory.
KEEP_STATES = True
# STATE_Z_DOT: the state pass sums phi(k) (forward) or rb phi(q) (reverse) for z with a dot instead of a column sum
# per step (the weighted one in fp32 operands): 5.97 -> 5.51 ms forward+backward at 32K on an H200.
STATE_Z_DOT = True
# Q_SPLIT / KV_SPLIT: the query-side / key-side backward as two launches (linear side and softmax side; dk and dv),
# fewer live registers per program for a few recomputed dots. Q_SPLIT with 4 warps: 9.68 -> 8.96 ms at 32K. Since
# session 20 KV_SPLIT's dk launch goes first, before the main stream waits for the side stream's reverse pass, and
# runs beside it: H100, 32K, interleaved, 3.881 against 3.910 ms forward+backward (3 rounds) and 3.934 against 3.965
# (6 rounds); 1.099 against 1.097 at 8K. On since then (off before: one launch, with the wait before it).
Q_SPLIT = True
KV_SPLIT = True
# SIDE_STREAM: in the backward of a sequence of at least SIDE_STREAM_MIN_CHUNKS chunks with linear terms, the state
# passes (the forward states again unless KEEP_STATES, then the reverse ones once delta is written) run on a second
# CUDA stream, beside the delta kernel and the softmax side of the query-side backward on the op's stream. A state
# pass is a sequential chain of small dots on B H (F / STATE_BF) (Dv / STATE_BV) programs (128 at 32 heads: about
# one per SM, mostly waiting on its chain), so the parallel kernels fill the SMs around it. Off under torch.compile
# and CUDA graph capture, and below SIDE_STREAM_MIN_CHUNKS: the kernels beside a state pass lose occupancy (its
# programs hold registers on most SMs; at 32K the query-side kernels took 1.54 ms against 0.96 alone), so the overlap
# pays only when the passes are long. H200, forward+backward against one stream: 32K 4.32 against 4.52 ms, 16K 2.39
# against 2.34, 8K 1.41 against 1.38 (slower, as in two earlier calls).
# SIDE_KF: _bwd_kf_kernel too runs on the side stream, after the reverse states and the first launch of the query
# side (its softmax side, which stores the dW blocks dk_feat reads), beside the rest of the query side and the key
# side. (Before the tenth pass it ran before the query side, recomputing dW: no faster, H200 32K 4.605 vs 4.606 ms.)
# SAVE_P: the query side's softmax side stores its blocks of softmax weights gamma p0 as well as those of ds (always
# stored), and the key side's dv pass reads them instead of computing the scores again. ptxas: the softmax side
# spills 84 B a thread with the stores, 20 without; the key side 0 with, 96 / 120 without. H200, 32K: 4.40 against
# 4.54 ms forward+backward, for one more buffer of the size of q in the backward (peak 2.40 against 2.15 GiB).
SAVE_P = True
# SAVE_DW: the softmax side also stores the blocks of the local linear terms' gradient da (dW on L(n)), read by the
# linear side (Q_SPLIT) and by dk_feat (unless SIDE_KF: it runs before the query side) instead of computing dW again.
# H200, one run: 32K 4.32 against 4.41 ms forward+backward, 8K 1.41 against 1.37 (peak at 32K 2.65 against 2.40 GiB).
SAVE_DW = True
# WINDOW_BLOCKS: ds and gamma p0 as one [BT, BT] block per query chunk instead of two: with w <= BT the two blocks of
# a query chunk's softmax terms have disjoint supports (the previous chunk's keys above the diagonal, its own on and
# below it). The softmax side merges its two score blocks into that window block before any softmax work (one block
# of p0, dW and ds live, each stored once and whole; ptxas: 28 B of spills a thread against 112) and the key side
# loads a window block whole and keeps its part in registers. Half the bytes of both buffers (0.5 GiB at 32K, 32
# heads). H200, 32K, interleaved (eleventh pass): 3.936 against 4.195 ms forward+backward, 8K 1.284 against 1.330.
# (The ninth pass wrote and read the two parts with triangular masks, one predicate an element: no faster.) False:
# the pair layout, two blocks per query chunk.
WINDOW_BLOCKS = True
# FWD_P: a forward whose inputs want gradients stores, for the backward, each query chunk's window block of p0 and
# each row's arg max (the first maximum in key order, as the backward took it): the softmax side then computes no
# scores (no q, no key tiles for them, two [BT, BT, D] dots and a block of exp less) and stores no gamma p0, and the
# key side reads p0 from there. Needs WINDOW_BLOCKS. A forward without gradients (torch.no_grad, inference) stores
# nothing. 16-bit inputs: p0 enters ds and r_n rounded to their dtype, as gamma p0 entered dv before (dq, dk vs the
# naive reference at T = 1000: 3.5e-3 against 3.0e-3). H200, 32K, three interleaved runs (twelfth pass): 3.854 /
# 3.891 / 3.900 against 3.914 / 3.932 / 3.953 ms forward+backward (profile, one stream: the query side's two
# launches 0.899 against 1.062 ms, _fwd_kernel 0.771 against 0.665 with the stores); 8K 1.297 / 1.329 / 1.223
# against 1.321 / 1.307 / 1.288 (noise); peak memory the same (the p0 blocks replace the backward's gamma p0 ones).
FWD_P = True
# FWD_LIN: that forward also stores the local linear terms a = phi(q).phi(k) on L(n) of its one or two key chunks
# (the layout of the softmax side's dW blocks), which the key side's dv pass reads instead of computing them again
# (no phi(q) tiles, one [BT, BT, F] dot less per query chunk and head). H200, 32K, interleaved: with FWD_P 3.864 /
# 3.898 / 3.867 against 3.854 / 3.891 / 3.900 ms (alone 3.944 against 3.914), 0.13 GiB more; the key side took
# 0.762 ms against 0.772 (profile): its linear dots were not what bounds it. Off.
FWD_LIN = False
# KF_IN_KV: dk_feat in the key side's dv pass instead of a kernel of its own (_bwd_kf_kernel): that pass already
# loads each head's reverse state and the query rows with linear terms on its keys, which _bwd_kf_kernel loads again
# (at 32K, 32 heads: the reverse states alone are 0.5 GB at REV_STATE_STRIDE = 1), and v once for the G heads of the
# group; for a second fp32 accumulator live in the pass. H200, 32K, interleaved: 4.739 (4 warps, 452 B of spills a
# thread) and 5.185 ms (8 warps) against 4.445 forward+backward. (SIDE_KF then has no kernel to move.)
KF_IN_KV = False
# KF_DV: dv's linear terms on a key chunk (phi(k) dh through the reverse state, and the local linear blocks) in the
# dk_feat kernel, which then runs per kv head over its G query heads (_bwd_kfdv_kernel) and writes them to an fp32
# buffer [B, T, Hkv, Dv] that the key side's dv pass starts from; the key side then reads no reverse state, phi(k) or
# phi(q) (at 32K, 32 heads: 0.5 GB of reverse states and 0.27 GB each of phi(k) and phi(q) tiles fewer), for that
# buffer (0.13 GB written and read) and do read by dk_feat. Without softmax terms the kernel writes dv itself and the
# key side is not launched. (KF_IN_KV, SIDE_KF: ignored.) H100, 32K, interleaved (3 rounds): 4.303 ms forward+backward
# at 4 warps (ptxas then: 255 registers, 236 B of spills a thread; 328 B now), 4.543 at 8 warps, against 4.289; per
# kernel (one stream, 8 warps): the key side 0.902 -> 0.484 ms, but this kernel 1.127 against dk_feat's 0.443. Its
# dv half alone takes 254 registers (ptxas). Split into 2 or 4 programs per (key chunk, kv head), each with a part
# of dk_feat's F columns and of dv's Dv columns (fewer spills), it was slower still: H200, 32K, 3 rounds, 4.091 (2
# parts), 4.672 (4 parts) and 6.016 ms (4 parts, 8 warps) against 3.822; that layout was removed (kernel README,
# fifteenth pass). Off.
KF_DV = False
# REV_DO: the reverse state pass reads do itself and scales the rows of phi(q) by 1 / Zd in registers (its dot's A
# operand), so that the delta kernel writes no dA = do / Zd (at 32K, 32 heads: 0.27 GB written and read fewer). The
# delta kernel's docstring has why dA exists: the pass once scaled do's rows (the dot's B operand, through shared
# memory) and took 1.9x as long.
REV_DO = False
# REV_LIN: the key side's linear terms in the reverse scan itself (_bwd_rev_kernel): one program per (segment of
# REV_SEG key chunks, batch * head) holds the whole reverse state [F, Dv] in registers and, for each key chunk of its
# segment, writes dk_feat whole (the state term v dh^T + dz and the local terms) and this head's linear terms of dv
# (phi(k) dh and the local ones), which the key side adds over the G heads of a kv head. No reverse state goes
# through memory (at 32K, 32 heads: 0.54 GB written and read twice by the key side and dk_feat) and neither
# _bwd_kf_kernel nor the key side's linear blocks run; the scan's chain is cut into segments whose starting states
# come from a first pass of segment totals (``_chunk_state_kernel`` phase 1), for NT / REV_SEG (B H) programs.
# (REV_DO, KF_DV, KF_IN_KV, SIDE_KF, FWD_LIN and REV_STATE_STRIDE are ignored.) H100, 32K, interleaved, 3 rounds
# (session 16): 4.114 against 4.199 ms forward+backward; per kernel on one stream, _bwd_rev_kernel 0.892 ms and the
# segment totals ~0.27 in place of the reverse pass (~0.50), dk_feat's kernel (0.443) and the key side's linear terms
# (the key side 0.540 against 0.903); peak memory 2.05 against 2.28 GiB. Segments of 64: 4.124, of 16: 4.235. On.
# REV_SEG: key chunks per segment. 64 since session 19: with z by dots (REV_ZDOT) a step is shorter, and at 32K on an
# H100 (interleaved, 3 rounds) segments of 64 took 3.941 against 4.009 ms forward+backward for 32 in one call and
# 4.014 against 4.084 in another, segments of 16 4.134, of 128 3.946 (one call; one segment at 8K). Not timed at 8K
# or 2K (2K has one segment either way).
REV_LIN = True
REV_SEG = 64
# REV_SEG_LONG: (chunks, segment length): from that many key chunks the reverse scan takes segments of that length
# instead of REV_SEG (None: REV_SEG at every T). Session 27, H100, 32K, with the side stream at high priority
# (SIDE_PRIORITY), where the reverse scan runs nearly alone for its first ~1 ms: segments of 128 were 0.030-0.035 ms
# faster forward+backward than 64 in two interleaved calls (kernels/bench_tune_h100_session27_priority_{5,6}*); at 8K
# 128 chunks make one segment a head (the twentieth pass measured 128 there 7% slower), hence a threshold. Session 29,
# H100, 32K, 6 interleaved rounds in this form: 3.806 against 3.845 ms forward+backward, peak 2.03 against 2.04 GiB
# (kernels/bench_tune_h100_session29.*). Session 30, H100, 32K, 5 interleaved rounds: one segment a head (512) 3.785,
# two (256) 3.826, 128 3.889 ms forward+backward (kernels/bench_tune_h100_session30.*); one segment also drops the
# totals pass. On from 512 chunks (32K at BT = 64). Tuned at B = 1, H = 32: 128 programs of the reverse scan (4
# parts a segment and head) on 132 SMs.
REV_SEG_LONG: tuple[int, int] | None = (512, 512)
# REV_MIN_SEGMENTS: REV_SEG_LONG's length is halved (not below REV_SEG) while the (segment, batch x head) pairs are
# fewer than this. A program's steps run one after another, so with fewer heads than the tuned shape one segment a
# head would leave most SMs idle for as long as 32 heads take (9 heads at 32K: 36 programs of 512 steps; with the
# floor 144 of 128). 32: the tuned shape, B H = 32, keeps one segment a head. Session 30, H100, 32K, H = 8 on 2 kv heads,
# 4 interleaved rounds: 1.507 ms forward+backward with the floor (segments of 128) against 2.091 without (one of 512)
# (kernels/bench_tune_h100_session30_floor.*).
REV_MIN_SEGMENTS = 32
# REV_SPLIT: the programs of a (segment, head) in REV_LIN: REV_SPLIT for dv's Dv columns and REV_SPLIT for dk_feat's
# F columns, each holding its block of the reverse state (the dv programs all of F and their Dv columns, the dk_feat
# ones their F rows and all of Dv) and running the scan on it. H100, 32K: one program for both (the whole state, 8
# warps: 255 registers and 252 B of spills a thread) took 1.18 ms for the kernel; split (241 registers at 4 warps, no
# spills) 1.17 with the parts of a segment far apart on the grid, 0.89 with them adjacent (they share their tiles).
REV_SPLIT = 2
# REV_PREFIX: the segment totals of REV_LIN summed once into inclusive prefixes (``_prefix_kernel``, in place) after
# they are written, so that a program of segment s starts from one load (the prefix of segment s - 1) instead of
# summing the s totals before it, a chain of s dependent loads at its start. H100, 32K, interleaved, 3 rounds
# (session 17): 4.132 against 4.217 ms forward+backward in one call, no faster in the next three (4.252 against
# 4.250, 4.227 against 4.212 with 5 rounds, 4.194 against 4.146 with the totals in 128 x 128 tiles): the prefix
# launches take 0.03-0.05 ms. Off.
# (Tried in session 17 and dropped: each program of _bwd_rev_kernel summing its own block of its segment's total
# first, publishing it through flags and waiting for the segments before its own (tickets, as FUSED_FWD), in place
# of the totals pass: the kernel took 1.515 ms against 0.914 + 0.26 for the totals, 4.372 against 4.217 ms
# forward+backward; its GPU check at T = 1000 in segments of 2 also failed, not looked into.)
REV_PREFIX = False
# REV_ZDOT: the dk_feat parts of REV_LIN carry z (sum rb phi(q) over the query rows already in the reverse state) as a
# [BT, F / REV_SPLIT] fp32 block of identical rows, added to by dots whose A operand holds the row weights rb in every
# row (``_row_sum_dot``; in 16-bit dtypes rb split into a high and a low part, two dots, fp32-accurate), instead of a
# cross-warp column sum of rb phi(q) per step and its broadcast. H100, 32K, interleaved, 3 rounds (session 18):
# 3.985 against 4.080 and 4.025 against 4.118 ms forward+backward in two calls, _bwd_rev_kernel 0.819 against 0.924
# ms; with fp32 operands at 3xTF32 in place of the split, 4.419. On.
# REV_ZDOT_MIN_COLS: the split's dots gave wrong dk_feat on the H100 (Triton 3.6; 16-bit, every mode with the same
# chunk's linear block, CUR_LIN) where a dk_feat part holds 32 columns or fewer (F <= 64), and right ones at 64
# (F = 128) in every mode and dtype tried (`experiments/rev_zdot_repro.py`; the cause was not found, fp32 operands at
# 3xTF32 were right everywhere): below this many columns the 16-bit parts keep the column sum.
REV_ZDOT = True
REV_ZDOT_MIN_COLS = 64
# REV_ZDOT_BF16_ONE: in bf16, z's dots take the row weights rounded to bf16, one dot a step instead of the split's two
# (each product then off by at most half a bf16 ulp, the rounding dk_feat's bf16 output applies anyway). dk_feat's
# error against the naive reference was the split's (H100, session 19, `experiments/rev_zdot_repro.py --one`); at 32K
# (interleaved, one call) 4.053 against 4.084 ms with segments of 32 and 4.075 against 4.014 with segments of 64:
# no gain shown. Off.
REV_ZDOT_BF16_ONE = False
# DELTA_TOTALS: with REV_LIN in more than one segment, the delta kernel and the reverse scan's segment totals in one
# pass (_delta_totals_kernel): its programs compute delta, rb and dA for a run of chunks and add phi(q)^T dA and rb
# phi(q) into the totals as they go, so that the totals pass (0.19-0.23 ms at 32K on an H100) reads neither dA nor
# phi(q) again. Its parts hold REV_SEG / KS chunks, KS the power of two (from 1, down to DELTA_TOTALS_MIN_CHUNKS
# chunks a part) that first gives DELTA_TOTALS_PROGRAMS programs; the reverse scan sums KS totals a segment. Only
# where one program holds the whole [F, Dv] total (both <= 128). H100, interleaved, 3 rounds (session 20): 4.030
# against 4.029 ms forward+backward at 32K (4.004 at 256 programs, 4.051 at 1024, 4.148 at 1 stage), 1.179 against
# 1.151 at 8K: the merged pass holds up the main stream about as long as the totals pass ran beside it. Off.
DELTA_TOTALS = False
DELTA_TOTALS_PROGRAMS = 512
DELTA_TOTALS_MIN_CHUNKS = 8
# DELTA_Q: the query side's first launch (the softmax side under Q_SPLIT) computes delta = do . o for its rows itself,
# from o, and stores it for the launches after it; the delta kernel (or DELTA_TOTALS' pass) writes only the reverse
# scan's inputs rb and dA, and goes to the side stream, ahead of the reverse scan. Without it the delta kernel runs on
# the op's stream before both streams fork (0.28 ms at 32K on an H100, at the bandwidth of its 0.8 GB), so that
# neither the softmax side nor the reverse scan starts before it ends. Where it applies: a backward whose reverse scan
# goes to the side stream (from SIDE_STREAM_MIN_CHUNKS chunks; where no side stream is taken, the same launches on
# one stream, for the same bits), and a backward without linear terms, which then launches no delta kernel. H100,
# 32K, interleaved (session 25, kernels/bench_tune_h100_session25_delta_q*): 3.968 against 3.907 ms forward+backward (3
# rounds), 3.948 against 3.891 (6 rounds), 3.976 with DELTA_TOTALS too: the side stream, longer by the delta
# kernel, then holds up the key side's dv launch. Off.
DELTA_Q = False
# SIDE_DA: with REV_LIN in more than one segment, from SIDE_STREAM_MIN_CHUNKS chunks (whether or not the side stream is
# taken, for the same bits), the delta kernel writes only delta and rb (0.54 GB read, 4 MB written at 32K, 32 heads,
# against 0.81 GB with dA) on the op's stream before the fork, and dA = do / Zd is written on the side stream by
# DELTA_TOTALS' pass, which loads delta in place of o (FROM_DELTA) and sums the reverse scan's totals from the dA it
# computes, in place of the totals pass (which read phi(q) and dA: that pass reads phi(q) and do and writes dA, 0.27
# GB more on the side stream). The dA write (~0.08 ms of the H100's bandwidth) moves from the stream the key side's
# dv launch is on to the one it waits for. (Under DELTA_Q, ignored.) H100, 32K, interleaved, 4 rounds (session 26,
# kernels/bench_tune_h100_session26_side_dv_da.*): 4.011 against 3.932 ms forward+backward; the streams overlap by
# sharing the GPU's bandwidth and SMs, so bytes moved between them are not saved. Off.
SIDE_DA = False
# SIDE_DV: with REV_LIN and KV_SPLIT, from SIDE_STREAM_MIN_CHUNKS chunks, the key side's dv pass goes to the side
# stream, after the reverse scan (whose per-head linear terms of dv it sums) and the query side's first launch (whose
# dW blocks it reads), beside the query side's linear launch and the dk pass; the op's stream then waits for it at
# the end. At the defaults the side stream is done 0.17-0.39 ms before the op's stream reaches its wait (H100, 32K,
# session 26, bench --stream-probe, two calls: 1.970 / 2.201 against 2.364 / 2.368 ms from the fork), and the dv pass
# (~0.3 ms) then runs alone. On one stream (under torch.compile, or without SIDE_STREAM) the same launch order. H100,
# 32K, interleaved (session 26): 3.898 against 3.932 ms forward+backward (4 rounds), 3.836 against 3.793 (6 rounds,
# kernels/bench_tune_h100_session26_side_dv_6rounds.*): no gain shown; with it the side stream is the longer one (the
# dv pass took ~0.47 ms beside the query side's linear launch and the dk pass). Off.
SIDE_DV = False
# SIDE_PRIORITY: the CUDA priority of the side stream (lower is higher; 0, the default streams' priority, the lowest;
# CUDA clamps it to the device's range). Above the op's stream, the block scheduler places the side stream's pending
# programs (its totals pass and the reverse scan) first wherever both streams have work waiting, instead of in the
# order the launches reached the GPU: at 32K the reverse scan is done 1.30 ms after the fork instead of 1.77-2.21, and
# the op's stream reaches its wait 0.03-0.06 ms sooner (bench --stream-probe). H100, 32K, interleaved, 6 calls (session
# 27, kernels/bench_tune_h100_session27_priority*): 3.784 / 3.779 / 3.793 / 3.819 / 3.874 / 3.795 against 3.827 /
# 3.820 / 3.835 / 3.914 / 3.875 / 3.854 ms forward+backward (below SIDE_STREAM_MIN_CHUNKS there is no side stream). On:
# -1. It changes only the order in which the GPU starts the two streams' programs (the side-stream GPU test checks the
# bits); other high-priority streams of a job (communication, say) share that level with it.
SIDE_PRIORITY = -1
# SIDE_QLIN: the query side's linear launch (Q_SPLIT) on the side stream, after the reverse scan and after the softmax
# launch whose dW blocks it reads, beside the key side's passes; the op's stream joins it at the end. Not with SIDE_DV
# or SIDE_KF, whose launches take that place on the side stream. On one stream the same launch order. H100, 32K,
# interleaved, 6 rounds (session 27): 3.886 against 3.914 ms forward+backward at the side stream's default priority,
# 3.898 against 3.819 at high priority. Off.
SIDE_QLIN = False
# REV_SCALE_DO: with REV_LIN (and neither DELTA_TOTALS, DELTA_Q nor SIDE_DA, whose passes write dA), the reverse scan
# and its totals pass read do itself and divide by Zd in registers, so that the delta kernel writes no dA = do / Zd
# (at 32K, 32 heads: 0.27 GB written fewer, on the op's stream before the fork). The scan multiplies a's and da's
# query columns (accumulators in registers) by 1 / Zd, and one operand of its state's update: do's rows in the dv parts,
# phi(q)'s in the dk_feat parts through a dot with the diagonal matrix of 1 / Zd (scaled in registers they spilled 156
# B a thread); its totals pass divides phi(q)'s rows (HAS_RS). REV_DO did the same in the old reverse state pass and was slower (its loop at 223
# registers against 184). ptxas (Triton 3.9, sm_90a, bf16): the kernel at 255 registers and 36 B of spills a thread in
# hybrid mode (239 and none without). H100, 32K, interleaved, 4 rounds (session 26,
# kernels/bench_tune_h100_session26_rev_scale_do.*): 4.030 against 3.785 ms forward+backward. Off.
REV_SCALE_DO = False
# REV_ST: the reverse scan's dk_feat parts hold their block of dh transposed (S^T, [Dv, F / NF]): the update dA^T phi(q)
# takes phi(q) as the dot's B operand, whose rows REV_SCALE_DO divides by Zd in registers before it goes to shared
# memory (no transposed operand in registers), and v S^T needs no transpose.
REV_ST = False
# FUSED_FWD: the forward's state pass and output kernel as one launch (_fwd_fused_kernel) in which the output
# programs start while the state pass runs: each takes a ticket at its start (the first B H (F / STATE_BF) (Dv /
# STATE_BV) run the state pass, the rest the output chunks, in chunk order), computes its local blocks and then waits
# for its state to be counted in a per-state flag. Tickets follow the order in which programs start, so no output
# program can wait on a state pass that is not running (the scheme of decoupled look-back scans). Apart, the output
# kernel cannot start before the state pass ends (0.31 + 0.67 ms at 32K on an H200); fused, its programs use the
# SMs the state pass leaves idle. One segment only (STATE_SEG = 0). H200, interleaved: 1.306 against 1.113 ms forward
# at 32K, 0.478 against 0.372 at 8K: every SM that runs a state program also runs an output program (one footprint,
# two programs an SM), and the state chain, bound by the latency of its steps, slows beside them.
FUSED_FWD = False
SIDE_STREAM = True
SIDE_STREAM_MIN_CHUNKS = 512
SIDE_KF = False
# STREAM_PROBE: a list (bench --stream-probe), or None. A list gets, per backward call that takes the side stream, a
# dict of timing events: "fork" (the op's stream at the backward's start), "side" (the side stream after its reverse
# pass), "main" (the op's stream where it waits for that pass, or under SIDE_DV for the side stream's dv pass after it)
# and "end" (after its last launch): their times show which stream the key side's dv launch waits for. No launch
# depends on it (it is not part of a plan's key).
STREAM_PROBE: list | None = None
# SIDE_STATE_BLOCKS: (F block, Dv block) of the backward's state passes where they go to the side stream (None: those
# of the forward, STATE_BF x STATE_BV), launched with LAUNCH["side_state"]: larger tiles take fewer SMs from the
# kernels beside them, for a longer chain of their own. (With REV_LIN the backward's one state pass is the segment
# totals.) H100, 32K, interleaved (session 17): (128, 128) at 8 warps, 4.147 against 4.252 ms forward+backward (3
# rounds) and 4.181 against 4.227 (5 rounds); the totals pass 0.19 against 0.28 ms. On.
SIDE_STATE_BLOCKS = (128, 128)
# (num_warps, num_stages) per kernel. 4 warps spill in the key-side backward (a [64, 128] fp32 tile is 64 registers
# a thread; the forward no longer does, since the same chunk's linear block is skipped at w >= BT) and are still
# faster at 32K: forward 2.48 -> 1.89 ms (H100), forward+backward with a 4-warp _bwd_kv_kernel 8.02 -> 6.81 ms (H100),
# 6.36 -> 5.46 ms against 8 warps (H200). The forward's state pass at 5 stages (session 22; 3 before): at 32K, batch 1,
# its 128 programs run one an SM, so the 160 KB of shared memory of 5 stages of [128, 64] tiles cost no occupancy and
# keep more loads in flight. H100, interleaved, 5 rounds (kernels/bench_tune_h100_session22_state_stages.*): forward
# 1.025 against 1.072 ms, forward+backward 3.898 against 3.953 at 32K; 0.312 / 1.096 against 0.322 / 1.104 at 8K; 4
# stages 1.048 / 3.941, 6 stages 1.039 / 3.911. More programs than SMs (batch > 1): "state_wide" below.
# "state_wide": a state pass (not on the side stream) whose programs outnumber the SMs (batch > 1 at 32 heads and
# these tiles), where the stages decide how many programs an SM holds and so how many waves the scan takes: 3 stages
# (96 KB) fit two an SM, 5 (160 KB) one. H200, batch 2, interleaved, 3 rounds (session 23,
# kernels/bench_tune_h200_session23_batch2.*): forward 1.753 against 1.857 ms at 32K, 0.478 against 0.500 at 8K;
# forward+backward the same (6.964 / 6.975, 1.825 / 1.850). At batch 1, 2K and 8K, 3 and 5 stages time alike.
LAUNCH = types.MappingProxyType({
    "state": (4, 5), "state_wide": (4, 3), "side_state": (8, 3), "fwd": (4, 2), "fwd_fused": (4, 3), "bwd_q": (4, 1),
    "bwd_kv": (4, 1), "bwd_kf": (4, 1), "bwd_kfdv": (4, 1), "delta": (4, 1), "bwd_rev": (4, 2), "delta_totals": (8, 2)})
# fp32 inputs at these head dims: IEEE fp32 dots are FMA code, not tensor-core code; at 4 warps ptxas reports 63-162 KB
# of spills a thread and compiling the kernels takes minutes (479 s for all of them on a 2-core host), at 8 warps
# 9-76 KB and 154 s. fp32 is the path of correctness checks, not of speed: 8 warps, 1 stage everywhere.
LAUNCH_FP32 = (8, 1)
# MAXNREG: a cap on the registers a thread of a kernel's 16-bit launch may use (ptxas .maxnreg; none by default).
# With 4 warps a program, an SM holds 2 programs of up to 255 registers, 3 of up to 168 and 4 of up to 128 (64K
# registers an SM): a cap trades spills (local memory, cached in L1) for more programs in flight to hide the
# latency of their loads. `python -m linearize.kernels.spills --maxnreg N` shows what a cap spills. The query side at
# 168 (its softmax side 203 registers uncapped; 168 and 92 / 96 B of spills a thread capped, its linear side 166
# either way): H100, 32K, interleaved, 3 rounds, 4.185 against 4.262 and 4.297 against 4.499 ms forward+backward in
# two calls (session 16). Capped at 168 and slower there: the key side (255 registers, 460 B of spills; with the query
# side's cap 4.602 against 4.297) and the forward (255, 444 B; forward 1.604 against 1.053 ms).
MAXNREG = types.MappingProxyType({"bwd_q": 168})
# Launch plans (kernels/launch.py): the first forward / backward call of a key (shapes, strides, dtype, mode and the
# settings above) launches through Triton and records every compiled kernel with its arguments; later calls of that
# key hand only the tensors to the launchers. LAUNCH_PLANS = False launches every kernel through fn[grid](...).
LAUNCH_PLANS = True
PLANS = Plans()


# --------------------------------------------------------------------------------------------------------------
# helpers (inlined by Triton): tile loads, the [BT, BT] blocks of scores and weights, the row gradients


@triton.jit
def _head(ptr, b, h, sb, sh):
    """Base pointer of batch b, head h of a [B, T, H, ...] tensor."""
    return ptr + b.to(tl.int64) * sb + h.to(tl.int64) * sh


@triton.jit
def _chunk_and_head(chunk_axis: tl.constexpr, head_axis: tl.constexpr, G, GROUP: tl.constexpr):
    """(chunk, batch * head) of this program. GROUP: the chunk axis runs over chunk * G + (head in its kv group) and
    the head axis over batch * kv head, so that the G query heads sharing a kv head are adjacent programs and read its
    k / v tiles close together in time (b H + hk G + g = (b Hkv + hk) G + g)."""
    pid = tl.program_id(chunk_axis)
    if GROUP:
        return pid // G, tl.program_id(head_axis) * G + pid % G
    return pid, tl.program_id(head_axis)


@triton.jit
def _load_tile(ptr, rows, cols, T, NC, stride_t):
    """[len(rows), len(cols)] tile of a [T, NC] slice with row stride stride_t; zeros outside."""
    mask = (rows[:, None] >= 0) & (rows[:, None] < T) & (cols[None, :] < NC)
    return tl.load(ptr + rows[:, None].to(tl.int64) * stride_t + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _store_tile(ptr, x, rows, cols, T, NC, stride_t):
    mask = (rows[:, None] < T) & (cols[None, :] < NC)
    tl.store(ptr + rows[:, None].to(tl.int64) * stride_t + cols[None, :], x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_row(ptr, rows, T, other):
    return tl.load(ptr + rows, mask=(rows >= 0) & (rows < T), other=other)


@triton.jit
def _state_ptr(HS, bh, p, NS, BF: tl.constexpr, BDV: tl.constexpr, ff, vv):
    """[len(ff), len(vv)] pointers into state p of a [B*H, NS, BF, BDV] tensor."""
    return HS + (bh.to(tl.int64) * NS + p) * (BF * BDV) + ff[:, None] * BDV + vv[None, :]


@triton.jit
def _pair_ptr(PB, bh, c, slot, NT, BT: tl.constexpr, NSLOT: tl.constexpr = 2):
    """[BT, BT] pointers to block ``slot`` of query chunk c in a [B*H, NT, NSLOT, BT, BT] tensor of score-shaped
    blocks: slot 0 holds the keys of chunk c - 1, slot 1 (NSLOT = 2) those of chunk c (rows: queries, columns: keys)."""
    r = tl.arange(0, BT)
    return PB + ((bh.to(tl.int64) * NT + c) * NSLOT + slot) * (BT * BT) + r[:, None] * BT + r[None, :]


@triton.jit
def _win_part(slot, BT: tl.constexpr):
    """[BT, BT] mask of block ``slot``'s entries in a window block (WINDOW_BLOCKS): row r (query c BT + r) holds in
    column u its weight for key c BT + u where u <= r (slot 1, its own chunk) and for key (c - 1) BT + u where u > r
    (slot 0). With w <= BT these are all the keys of its window: the other key of a column is more than w back."""
    r = tl.arange(0, BT)
    return (r[None, :] <= r[:, None]) == (slot == 1)


@triton.jit
def _blk_load(PB, bh, c, slot, NT, mask, BT: tl.constexpr, WIN: tl.constexpr):
    """Load block ``slot`` of query chunk c's softmax terms, 0 outside ``mask``: its own [BT, BT] block of a
    [B*H, NT, 2, BT, BT] tensor, or (WIN) its part of the chunk's window block of a [B*H, NT, BT, BT] one. (The
    query side stores them inline: through a helper its softmax side spills 140 B a thread, against 112.)"""
    if WIN:  # the whole block, then the slot's part in registers: a triangular mask on the load would cost its
        # vector width (one predicate per element)
        x = tl.load(_pair_ptr(PB, bh, c, 0, NT, BT, 1), mask=mask, other=0.0)
        x = tl.where(_win_part(slot, BT), x, 0.0)
    else:
        x = tl.load(_pair_ptr(PB, bh, c, slot, NT, BT), mask=mask, other=0.0)
    return x


@triton.jit
def _scores(q, kp, n, j, T, window, scale, skt,
            D: tl.constexpr, BD: tl.constexpr, SOFTMAX: tl.constexpr, PREC: tl.constexpr):
    """Scaled scores of query rows n (tile q) against key rows j (loaded here), -inf outside W(n) = {n-w < j <= n}."""
    if SOFTMAX:
        k = _load_tile(kp, j, tl.arange(0, BD), T, D, skt)
        off = n[:, None] - j[None, :]
        win = (j[None, :] >= 0) & (j[None, :] < T) & (n[:, None] < T) & (off >= 0) & (off < window)
        s = tl.where(win, tl.dot(q, tl.trans(k), input_precision=PREC) * scale, float("-inf"))
    else:
        s = tl.full([n.shape[0], j.shape[0]], float("-inf"), dtype=tl.float32)
    return s


@triton.jit
def _lin_mask(n, j, T, window, LINEAR: tl.constexpr):
    """Where the local linear terms apply: keys outside the window (LINEAR=1) or all causal keys (LINEAR=2); rows
    are the queries n, columns the keys j."""
    return _lin_valid(n[:, None], j[None, :], T, window, LINEAR)


@triton.jit
def _lin_valid(n, j, T, window, LINEAR: tl.constexpr):
    """``_lin_mask`` of query and key indices already laid out to broadcast (n[None, :] against j[:, None] gives it
    transposed: keys as rows)."""
    off = n - j
    valid = (j >= 0) & (j < T) & (n < T) & (off >= 0)
    if LINEAR == 1:
        valid = valid & (off >= window)
    return valid


@triton.jit
def _softmax_weights(s, m, gamma, SOFTMAX: tl.constexpr):
    """gamma p0 = gamma exp(s - m) of a block of scores (zero outside the window; all zero without softmax terms)."""
    if SOFTMAX:
        w = gamma * tl.exp(s - m[:, None])
    else:
        w = tl.zeros(s.shape, dtype=tl.float32)
    return w


@triton.jit
def _lin_block(qf, kfp, n, j, T, window, sft, F: tl.constexpr, BF: tl.constexpr, LINEAR: tl.constexpr,
               PREC: tl.constexpr):
    """The local linear terms a_nj = phi(q_n).phi(k_j) of query rows n (tile qf) and key rows j (loaded here), zero
    off L(n)."""
    a = tl.dot(qf, tl.trans(_load_tile(kfp, j, tl.arange(0, BF), T, F, sft)), input_precision=PREC)
    return tl.where(_lin_mask(n, j, T, window, LINEAR), a, 0.0)


@triton.jit
def _dw_block(do, inv, dZ, vp, j, vv, T, DV: tl.constexpr, svt, PREC: tl.constexpr):
    """dW_nj = dA_n . v_j + dZ_n of the rows of (do, 1 / Zd, dZ) from ``_row_grads`` against value rows j (v_j loaded
    here): do v_j^T with its rows scaled by 1 / Zd."""
    dw = tl.dot(do, tl.trans(_load_tile(vp, j, vv, T, DV, svt)), input_precision=PREC) * inv[:, None]
    dw += dZ[:, None]
    return dw


@triton.jit
def _row_grads(dop, sdt, ZD, DELTA, rowp, n, T, DV: tl.constexpr, BDV: tl.constexpr, DT: tl.constexpr, op=None,
               FROM_OUT: tl.constexpr = False):
    """The row gradients dA_n = do_n / Zd_n and dZ_n = -(do_n . o_n) / Zd_n of query rows n, as (do `[BT, BDV]` in
    the dtype of the dots, 1 / Zd `[BT]`, dZ `[BT]`): dA enters every dot linearly in its rows, so the dots take do
    itself and scale their rows by 1 / Zd afterwards (no fp32 [BT, BDV] tile, no second rounding of dA). delta_n =
    do_n . o_n is read from DELTA, or (FROM_OUT, DELTA_Q) summed here from o at ``op`` (the strides of do) over the
    delta kernel's [BT, BDV] tile and stored into DELTA for the launches after this one."""
    inv = 1.0 / _load_row(ZD + rowp, n, T, 1.0)
    vv = tl.arange(0, BDV)
    if FROM_OUT:
        do = _load_tile(dop, n, vv, T, DV, sdt)
        delta = tl.sum(_load_tile(op, n, vv, T, DV, sdt).to(tl.float32) * do.to(tl.float32), axis=1)
        tl.store(DELTA + rowp + n, delta, mask=n < T)
        do = do.to(DT)
    else:
        do = _load_tile(dop, n, vv, T, DV, sdt).to(DT)
        delta = _load_row(DELTA + rowp, n, T, 0.0)
    return do, inv, -delta * inv


# --------------------------------------------------------------------------------------------------------------
# state pass: one state per SC chunks (STATE_STRIDE). HS[bh, p] = sum X_c'^T Y_c', ZS[bh, p] = sum X_c'^T rb over the
# chunks c' <= SC p - 2 (forward; what chunk SC p needs) or c' >= SC p + SC + 1 (reverse; what chunk SC p + SC - 1
# needs). A chunk i of the state's group p = i // SC adds the chunks between exactly, as [BT, BT] blocks:
# forward the key chunks SC p - 1 .. i - 2, reverse the query chunks i + 2 .. SC p + SC.


@triton.jit
def _chunk_state_kernel(
    X, Y, RB, RS, HS, ZS, TOT, ZTOT,
    sxb, sxt, sxh, syb, syt, syh,
    T, H, GY, NS, L, NTOT,
    F: tl.constexpr, DV: tl.constexpr, BF: tl.constexpr, BDV: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr, PHASE: tl.constexpr,
    REVERSE: tl.constexpr, HAS_RB: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
    Z_DOT: tl.constexpr = False, ZPREC: tl.constexpr = "ieee", SC: tl.constexpr = 1, HAS_RS: tl.constexpr = False,
    RS_Y: tl.constexpr = False,
):
    """One [BK, BV] block of the states of one head over the steps [seg L, seg L + L) of the scan (step t stores
    state p = t, or NS-1-t in reverse, then adds the SC chunks that separate it from the next state: one [SC BT, BK]
    x [SC BT, BV] dot). PHASE 0: one segment, the whole sequence. PHASE 1: the segment's total only,
    into TOT[bh, seg] (fp32). PHASE 2: start from the sum of the totals of the earlier segments and write the states.
    Splitting the scan in segments cuts its sequential chain from NS steps to 2 L, at the price of reading the inputs
    twice (~1.2 us per step for one 64 x 64 tile on an H100 or an H200 at 32 heads).
    Z_DOT: z is accumulated by a dot of x with a [16, BT] block whose 16 identical rows are the row weights RB (or
    ones), so that every row of the [16, BK] result holds z (row 0 is stored), instead of a cross-warp column sum of
    x every step (0.62 -> 0.48 ms per forward pass at 32K on an H200). The weighted dot runs in fp32 operands at
    ZPREC (3xTF32 for 16-bit inputs: fp32-accurate, as the column sum was; two bf16 dots of x with rb split in a
    high and a low bf16 part were no faster on an H200).
    HAS_RS: the rows of X enter the state (not z) divided by RS[bh, t] (REV_DO: phi(q) / Zd against do); RS_Y: the
    same division applied to Y's rows, the dot's B operand (REV_ST), in place of X's, its transposed A operand."""
    _state_scan(X, Y, RB, HS, ZS, TOT, ZTOT, X, tl.program_id(0), tl.program_id(1), tl.program_id(2),
                sxb, sxt, sxh, syb, syt, syh, T, H, GY, NS, L, NTOT,
                F, DV, BF, BDV, BK, BV, BT, PHASE, REVERSE, HAS_RB, DT, PREC, Z_DOT, ZPREC, SC, False,
                RS=RS, HAS_RS=HAS_RS, RS_Y=RS_Y)


@triton.jit
def _signal(flag, NTHREADS: tl.constexpr):
    """Add NTHREADS to the counter at ``flag``, one release at GPU scope from each thread of the program (a
    [NTHREADS] block has one element a thread): each orders that thread's own earlier stores before the count. A
    barrier and one thread's release would order them all as well, but the barrier stops Triton from pipelining the
    state pass's loop."""
    tl.atomic_add(flag + tl.zeros([NTHREADS], dtype=tl.int32), tl.full([NTHREADS], 1, dtype=tl.int32), sem="release",
                  scope="gpu")


@triton.jit
def _state_scan(
    X, Y, RB, HS, ZS, TOT, ZTOT, READY, pid_kv, pid_bh, seg,
    sxb, sxt, sxh, syb, syt, syh,
    T, H, GY, NS, L, NTOT,
    F: tl.constexpr, DV: tl.constexpr, BF: tl.constexpr, BDV: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr, PHASE: tl.constexpr,
    REVERSE: tl.constexpr, HAS_RB: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
    Z_DOT: tl.constexpr, ZPREC: tl.constexpr, SC: tl.constexpr, SIGNAL: tl.constexpr, NTHREADS: tl.constexpr = 128,
    RS=None, HAS_RS: tl.constexpr = False, RS_Y: tl.constexpr = False,
):
    """The body of ``_chunk_state_kernel`` for one (state block, batch * head, segment). SIGNAL (the fused forward,
    one segment, forward only): once state p's block is stored, READY[bh, p] counts it (``_signal``), one step late,
    so that each release waits for the stores of the step before rather than those just issued."""
    pid_k = pid_kv // (BDV // BV)
    pid_v = pid_kv % (BDV // BV)
    b = pid_bh // H
    h = pid_bh % H
    r = tl.arange(0, SC * BT)
    ff = pid_k * BK + tl.arange(0, BK)
    vv = pid_v * BV + tl.arange(0, BV)
    xp = _head(X, b, h, sxb, sxh)
    yp = _head(Y, b, h // GY, syb, syh)
    rowp = pid_bh.to(tl.int64) * T
    S = tl.zeros([BK, BV], dtype=tl.float32)
    zr = tl.arange(0, 16)
    # z, as one row ([BK]) or, with Z_DOT, as 16 identical rows ([16, BK]); written from row 0
    if Z_DOT:
        z = tl.zeros([16, BK], dtype=tl.float32)
        ones = tl.full([16, SC * BT], 1.0, dtype=DT)
        zoff = zr[:, None] * 0 + ff[None, :]
    else:
        z = tl.zeros([BK], dtype=tl.float32)
        zoff = ff
    # z does not depend on the Dv block: block 0 writes it (the mask is false for pid_v > 0)
    z_owner = ff + pid_v * BF < BF
    if Z_DOT:
        z_owner = (zr[:, None] == 0) & z_owner[None, :]
    if PHASE == 2:  # carry in: the totals of the segments before this one
        for s in range(0, seg):
            S += tl.load(_state_ptr(TOT, pid_bh, s, NTOT, BF, BDV, ff, vv))
            z += tl.load(ZTOT + (pid_bh.to(tl.int64) * NTOT + s) * BF + zoff)
    for t in range(seg * L, tl.minimum(seg * L + L, NS)):
        # state p covers chunks <= SC p - 2 (reverse: >= SC p + SC + 1); the next one adds chunks SC p - 1 ..
        # SC p + SC - 2 (reverse: SC p + SC .. SC p + 1), SC BT rows from (SC p - 1) BT (reverse: (SC p + 1) BT)
        if REVERSE:
            p = NS - 1 - t
            start = p * SC * BT + BT
        else:
            p = t
            start = p * SC * BT - BT
        if SIGNAL:
            if t > 0:
                _signal(READY + pid_bh.to(tl.int64) * NS + p - 1, NTHREADS)
        if PHASE != 1:
            tl.store(_state_ptr(HS, pid_bh, p, NS, BF, BDV, ff, vv), S.to(HS.dtype.element_ty))
            tl.store(ZS + (pid_bh.to(tl.int64) * NS + p) * BF + zoff, z, mask=z_owner)
        rows = start + r
        x = _load_tile(xp, rows, ff, T, F, sxt)
        y = _load_tile(yp, rows, vv, T, DV, syt)
        if Z_DOT and HAS_RB:
            rbw = tl.zeros([16, SC * BT], dtype=tl.float32) + _load_row(RB + rowp, rows, T, 0.0)[None, :]
            z = tl.dot(rbw, x.to(tl.float32), z, input_precision=ZPREC)
        elif Z_DOT:
            z = tl.dot(ones, x, z, input_precision=PREC)
        elif HAS_RB:
            z += tl.sum(x.to(tl.float32) * _load_row(RB + rowp, rows, T, 0.0)[:, None], axis=0)
        else:
            z += tl.sum(x.to(tl.float32), axis=0)
        if HAS_RS and RS_Y:  # y's rows scaled in registers: the dot's B operand, through shared memory
            y = (y.to(tl.float32) / _load_row(RS + rowp, rows, T, 1.0)[:, None]).to(DT)
        elif HAS_RS:  # x's rows scaled in registers: the dot's A operand, no round trip through shared memory
            x = (x.to(tl.float32) / _load_row(RS + rowp, rows, T, 1.0)[:, None]).to(DT)
        S = tl.dot(tl.trans(x), y.to(DT), S, input_precision=PREC)
    if SIGNAL:
        _signal(READY + pid_bh.to(tl.int64) * NS + NS - 1, NTHREADS)
    if PHASE == 1:
        tl.store(_state_ptr(TOT, pid_bh, seg, NTOT, BF, BDV, ff, vv), S)
        tl.store(ZTOT + (pid_bh.to(tl.int64) * NTOT + seg) * BF + zoff, z, mask=z_owner)


# --------------------------------------------------------------------------------------------------------------
# forward: one program per (query chunk, Dv block, batch * head): the exact local part (key chunks i-1 and i),
# then the older keys through the state S_{i-2} read from memory


@triton.jit
def _fwd_local(Q, K, V, KF, GAMMA, qf, b, h, G, i, vv, PB, ARG, LB, pid_bh, keep,
               sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sfb, sft, sfh, T, NT, window, scale,
               D: tl.constexpr, DV: tl.constexpr, F: tl.constexpr, BD: tl.constexpr, BF: tl.constexpr,
               BT: tl.constexpr, SOFTMAX: tl.constexpr, LINEAR: tl.constexpr, CUR_LIN: tl.constexpr,
               DT: tl.constexpr, PREC: tl.constexpr, WIN: tl.constexpr = False, FWD_P: tl.constexpr = False,
               FWD_LIN: tl.constexpr = False, NDW: tl.constexpr = 1):
    """Numerator [BT, len(vv)], normaliser and window row max of query chunk i from the key chunks i-1 and i.
    CUR_LIN = 0: the linear terms of key chunk i are all masked (hybrid with w >= BT) and their dot is skipped.
    WIN (WINDOW_BLOCKS): p0 of both key chunks from one window block of scores. For the backward (where ``keep``
    [BT]: in the first Dv block's program), FWD_P: the chunk's window block of p0 into PB and each row's arg max (the first maximum in key order) into ARG; FWD_LIN: the local linear blocks a on L(n) into
    LB (slot 0: keys of chunk i-1; slot 1, if CUR_LIN: its own), each in the dtype of the dots."""
    n = i * BT + tl.arange(0, BT)
    jp = n - BT
    kp = _head(K, b, h // G, skb, skh)
    vp = _head(V, b, h // G, svb, svh)
    kfp = _head(KF, b, h, sfb, sfh)
    gamma = tl.load(GAMMA + h).to(tl.float32)
    q = tl.zeros([BT, BD], dtype=DT)
    if SOFTMAX:
        q = _load_tile(_head(Q, b, h, sqb, sqh), n, tl.arange(0, BD), T, D, sqt)
    s_p = _scores(q, kp, n, jp, T, window, scale, skt, D, BD, SOFTMAX, PREC)
    s_c = _scores(q, kp, n, n, T, window, scale, skt, D, BD, SOFTMAX, PREC)
    # the row max runs over the window only; rows past T (all -inf) get 0
    m = tl.where(n < T, tl.maximum(tl.max(s_p, axis=1), tl.max(s_c, axis=1)), 0.0)
    if SOFTMAX and WIN:
        # the window block: one exp for both key chunks; every entry either block drops is exp(-inf) = 0 there, so W
        # and the sums below are those of the two blocks, bit for bit under the interpreter
        own = _win_part(1, BT)
        s = tl.where(own, s_c, s_p)
        if FWD_P:
            key = tl.where(own, n[None, :], jp[None, :])
            tl.store(ARG + pid_bh.to(tl.int64) * T + n,
                     tl.min(tl.where(s == tl.max(s, axis=1)[:, None], key, 2147483647), axis=1), mask=(n < T) & keep)
        p0 = tl.exp(s - m[:, None])
        if FWD_P:
            tl.store(_pair_ptr(PB, pid_bh, i, 0, NT, BT, 1), p0.to(DT), mask=keep[:, None])
        w = tl.where(own, 0.0, gamma * p0)
    else:
        w = _softmax_weights(s_p, m, gamma, SOFTMAX)
    if LINEAR != 0:
        a = _lin_block(qf, kfp, n, jp, T, window, sft, F, BF, LINEAR, PREC)
        if FWD_LIN:
            tl.store(_pair_ptr(LB, pid_bh, i, 0, NT, BT, NDW), a.to(DT), mask=keep[:, None])
        w += a
    acc = tl.dot(w.to(DT), _load_tile(vp, jp, vv, T, DV, svt), input_precision=PREC)
    zacc = tl.sum(w, axis=1)
    if SOFTMAX and WIN:
        w = tl.where(own, gamma * p0, 0.0)
    else:
        w = _softmax_weights(s_c, m, gamma, SOFTMAX)
    if LINEAR * CUR_LIN != 0:
        a = _lin_block(qf, kfp, n, n, T, window, sft, F, BF, LINEAR, PREC)
        if FWD_LIN:
            tl.store(_pair_ptr(LB, pid_bh, i, 1, NT, BT, NDW), a.to(DT), mask=keep[:, None])
        w += a
    acc = tl.dot(w.to(DT), _load_tile(vp, n, vv, T, DV, svt), acc, input_precision=PREC)
    zacc += tl.sum(w, axis=1)
    return acc, zacc, m


@triton.jit
def _fwd_store(OUT, M, ZD, acc, zacc, m, eps, b, h, pid_bh, pid_v, n, vv, T, sob, sot, soh, DV: tl.constexpr):
    zd = zacc + eps
    _store_tile(_head(OUT, b, h, sob, soh), acc / zd[:, None], n, vv, T, DV, sot)
    rowp = pid_bh.to(tl.int64) * T
    first = n + pid_v * T < T  # n < T in Dv block 0: every Dv block has the same row statistics, one writes them
    tl.store(M + rowp + n, m, mask=first)
    tl.store(ZD + rowp + n, zd, mask=first)


@triton.jit
def _fwd_kernel(
    Q, K, V, QF, KF, GAMMA, HS, ZS, OUT, M, ZD, PB, ARG, LB,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sfb, sft, sfh, sob, sot, soh,
    T, H, G, NT, window, scale, eps,
    D: tl.constexpr, DV: tl.constexpr, F: tl.constexpr,
    BD: tl.constexpr, BDV: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
    SOFTMAX: tl.constexpr, LINEAR: tl.constexpr, CUR_LIN: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
    SC: tl.constexpr = 1, GROUP: tl.constexpr = False, WIN: tl.constexpr = False, FWD_P: tl.constexpr = False,
    FWD_LIN: tl.constexpr = False, NDW: tl.constexpr = 1,
):
    """One program per (query chunk, Dv block, batch * head); the state of its group is read from HS (state pass).
    FWD_P / FWD_LIN: blocks for the backward (``_fwd_local``)."""
    i, pid_bh = _chunk_and_head(0, 2, G, GROUP)
    _fwd_chunk(Q, K, V, QF, KF, GAMMA, HS, ZS, OUT, M, ZD, Q, PB, ARG, LB, i, tl.program_id(1), pid_bh, 0,
               sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sfb, sft, sfh, sob, sot, soh, T, H, G, NT, window, scale,
               eps, D, DV, F, BD, BDV, BF, BV, BT, SOFTMAX, LINEAR, CUR_LIN, DT, PREC, SC, False, WIN, FWD_P, FWD_LIN,
               NDW)


@triton.jit
def _fwd_chunk(
    Q, K, V, QF, KF, GAMMA, HS, ZS, OUT, M, ZD, READY, PB, ARG, LB, i, pid_v, pid_bh, need,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sfb, sft, sfh, sob, sot, soh,
    T, H, G, NT, window, scale, eps,
    D: tl.constexpr, DV: tl.constexpr, F: tl.constexpr,
    BD: tl.constexpr, BDV: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
    SOFTMAX: tl.constexpr, LINEAR: tl.constexpr, CUR_LIN: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
    SC: tl.constexpr, WAIT: tl.constexpr, WIN: tl.constexpr, FWD_P: tl.constexpr, FWD_LIN: tl.constexpr,
    NDW: tl.constexpr,
):
    """The body of ``_fwd_kernel`` for query chunk i, Dv block pid_v, batch * head pid_bh. WAIT (the fused
    forward): after the local blocks, wait until READY[bh, p] counts ``need`` blocks of its state (an acquire at GPU
    scope), and read the state past L1 (an SM may hold lines of an earlier call's states at the same address)."""
    b = pid_bh // H
    h = pid_bh % H
    n = i * BT + tl.arange(0, BT)
    vv = pid_v * BV + tl.arange(0, BV)
    ff = tl.arange(0, BF)
    qf = tl.zeros([BT, BF], dtype=DT)
    if LINEAR != 0:
        qf = _load_tile(_head(QF, b, h, sfb, sfh), n, ff, T, F, sft)
    keep = tl.arange(0, BT) + pid_v * BT < BT  # [BT]: all True in the first Dv block's program, else all False
    acc, zacc, m = _fwd_local(Q, K, V, KF, GAMMA, qf, b, h, G, i, vv, PB, ARG, LB, pid_bh, keep,
                              sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sfb, sft, sfh, T, NT, window, scale,
                              D, DV, F, BD, BF, BT, SOFTMAX, LINEAR, CUR_LIN, DT, PREC, WIN, FWD_P, FWD_LIN, NDW)
    if LINEAR != 0:  # keys of chunks <= SC p - 2 through the state, read right before its dot
        p = i // SC
        NS = tl.cdiv(NT, SC)
        if WAIT:
            rp = READY + pid_bh.to(tl.int64) * NS + p
            while tl.atomic_add(rp, 0, sem="acquire", scope="gpu") < need:
                pass
            tl.debug_barrier()
            hs = tl.load(_state_ptr(HS, pid_bh, p, NS, BF, BDV, ff, vv), cache_modifier=".cg")
            acc = tl.dot(qf, hs, acc, input_precision=PREC)
            z = tl.load(ZS + (pid_bh.to(tl.int64) * NS + p) * BF + ff, cache_modifier=".cg")
        else:
            acc = tl.dot(qf, tl.load(_state_ptr(HS, pid_bh, p, NS, BF, BDV, ff, vv)), acc, input_precision=PREC)
            z = tl.load(ZS + (pid_bh.to(tl.int64) * NS + p) * BF + ff)
        zacc += tl.sum(qf.to(tl.float32) * z[None, :], axis=1)
        # key chunks SC p - 1 .. i - 2, between the state and the local blocks: more than BT >= w tokens back, so
        # every term is linear and unmasked
        if SC > 1:  # (not software-pipelined: its buffers would cost the kernel its occupancy)
            kfp = _head(KF, b, h, sfb, sfh)
            vp = _head(V, b, h // G, svb, svh)
            for c in tl.range(tl.maximum(p * SC - 1, 0), i - 1, num_stages=1):
                j = c * BT + tl.arange(0, BT)
                a = tl.dot(qf, tl.trans(_load_tile(kfp, j, ff, T, F, sft)), input_precision=PREC)
                acc = tl.dot(a.to(DT), _load_tile(vp, j, vv, T, DV, svt), acc, input_precision=PREC)
                zacc += tl.sum(a, axis=1)
    _fwd_store(OUT, M, ZD, acc, zacc, m, eps, b, h, pid_bh, pid_v, n, vv, T, sob, sot, soh, DV)


@triton.jit
def _fwd_fused_kernel(
    Q, K, V, QF, KF, GAMMA, HS, ZS, OUT, M, ZD, READY, PB, ARG, LB,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sfb, sft, sfh, sob, sot, soh,
    T, H, G, NT, window, scale, eps, NPROD, NKV, NV, BHKV,
    D: tl.constexpr, DV: tl.constexpr, F: tl.constexpr,
    BD: tl.constexpr, BDV: tl.constexpr, BF: tl.constexpr, BV: tl.constexpr, BT: tl.constexpr,
    SOFTMAX: tl.constexpr, LINEAR: tl.constexpr, CUR_LIN: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
    SC: tl.constexpr, SBK: tl.constexpr, SBV: tl.constexpr, Z_DOT: tl.constexpr, ZPREC: tl.constexpr,
    NTHREADS: tl.constexpr, WIN: tl.constexpr = False, FWD_P: tl.constexpr = False, FWD_LIN: tl.constexpr = False,
    NDW: tl.constexpr = 1,
):
    """The forward in one launch (FUSED_FWD): the state pass and the output programs side by side. Each program
    takes a ticket from the counter after READY's per-state counts (tickets follow the order in which programs
    start, so every producer is running before any output program can wait on it): tickets < NPROD run the state
    pass of one (state block, batch * head), adding NTHREADS (= 32 num_warps) to READY[bh, p] once their block of
    state p is stored; the others are output programs in chunk-major order (the G heads of a kv head adjacent), each
    waiting, after its local blocks, until its state's count reaches NKV NTHREADS."""
    NS = tl.cdiv(NT, SC)
    ticket = tl.atomic_add(READY + BHKV * G * NS, 1)
    if ticket < NPROD:
        _state_scan(KF, V, ZS, HS, ZS, ZS, ZS, READY, ticket % NKV, ticket // NKV, 0,
                    sfb, sft, sfh, svb, svt, svh, T, H, G, NS, NS, 1,
                    F, DV, BF, BDV, SBK, SBV, BT, 0, False, False, DT, PREC, Z_DOT, ZPREC, SC, True, NTHREADS)
    else:
        c = ticket - NPROD
        g = c % G
        c = c // G
        bhk = c % BHKV
        c = c // BHKV
        _fwd_chunk(Q, K, V, QF, KF, GAMMA, HS, ZS, OUT, M, ZD, READY, PB, ARG, LB, c // NV, c % NV, bhk * G + g,
                   NKV * NTHREADS, sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sfb, sft, sfh, sob, sot, soh, T, H, G,
                   NT, window, scale, eps, D, DV, F, BD, BDV, BF, BV, BT, SOFTMAX, LINEAR, CUR_LIN, DT, PREC, SC, True,
                   WIN, FWD_P, FWD_LIN, NDW)


# --------------------------------------------------------------------------------------------------------------
# backward preprocessing: the row statistics of do, one program per (chunk, batch * head)


@triton.jit
def _delta_kernel(
    OUT, DO, ZD, DELTA, RB, DA,
    sob, sot, soh, sdb, sdt, sdh, sab, sat, sah,
    T, H,
    DV: tl.constexpr, BDV: tl.constexpr, BT: tl.constexpr, HAS_DA: tl.constexpr, HAS_DELTA: tl.constexpr = True,
):
    """delta_n = do_n . o_n and, for the reverse state pass, its row weights rb_n = -delta_n / Zd_n and (HAS_DA)
    dA_n = do_n / Zd_n in the dtype of do: the rounding the state pass's dot applied to it when the pass scaled do
    itself, which made the reverse pass 1.9x as long as the forward one (H200, 32K: 0.81 vs 0.43 ms; 0.50 ms reading
    dA, for 0.06 ms more here)."""
    i = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    n = i * BT + tl.arange(0, BT)
    vv = tl.arange(0, BDV)
    o = _load_tile(_head(OUT, b, h, sob, soh), n, vv, T, DV, sot).to(tl.float32)
    do = _load_tile(_head(DO, b, h, sdb, sdh), n, vv, T, DV, sdt).to(tl.float32)
    rowp = pid_bh.to(tl.int64) * T
    delta = tl.sum(o * do, axis=1)
    inv = 1.0 / _load_row(ZD + rowp, n, T, 1.0)
    if HAS_DELTA:  # (DELTA_Q: the query side's first launch stores delta)
        tl.store(DELTA + rowp + n, delta, mask=n < T)
    tl.store(RB + rowp + n, -delta * inv, mask=n < T)
    if HAS_DA:
        _store_tile(_head(DA, b, h, sab, sah), do * inv[:, None], n, vv, T, DV, sat)


@triton.jit
def _delta_totals_kernel(
    OUT, DO, ZD, QF, DELTA, RB, DA, TOT, ZTOT,
    sob, sot, soh, sdb, sdt, sdh, sfb, sft, sfh, sab, sat, sah,
    T, H, NT, LS, NTOT,
    DV: tl.constexpr, F: tl.constexpr, BDV: tl.constexpr, BF: tl.constexpr, BT: tl.constexpr,
    DT: tl.constexpr, PREC: tl.constexpr, HAS_DELTA: tl.constexpr = True, FROM_DELTA: tl.constexpr = False,
):
    """``_delta_kernel`` and the reverse scan's segment totals in one pass (DELTA_TOTALS): program (part, bh) takes
    the LS key chunks that part ``part`` of the reverse scan's order covers, chunks NT - part LS - j for j in
    [0, LS), and adds phi(q)^T dA and z = sum rb phi(q) over them into TOT[bh, part] / ZTOT[bh, part] (the totals
    the state pass's phase 1 writes for the reverse scan, at LS chunks a part), from dA and rb as it computes them,
    so that neither is read back. It stores delta, rb and dA for chunks NT - part LS - j, j in [1, LS]: with j = 0
    (the chunk below the previous part's last, which that part stores) every chunk is stored once. Parts from NTOT on
    write no total and load no phi(q): no segment of the reverse scan starts after them. FROM_DELTA (SIDE_DA): delta
    and rb are in memory already (the delta kernel wrote them); the pass loads delta instead of o and stores only
    dA."""
    part = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    r = tl.arange(0, BT)
    vv = tl.arange(0, BDV)
    ff = tl.arange(0, BF)
    op = _head(OUT, b, h, sob, soh)
    dop = _head(DO, b, h, sdb, sdh)
    qp = _head(QF, b, h, sfb, sfh)
    ap = _head(DA, b, h, sab, sah)
    rowp = pid_bh.to(tl.int64) * T
    total = part < NTOT  # (a part past the totals only stores delta, rb and dA)
    total_r = (r * 0 + part) < NTOT  # (as a row mask: the interpreter takes no scalar in a mask)
    S = tl.zeros([BF, BDV], dtype=tl.float32)
    zacc = tl.zeros([BT, BF], dtype=tl.float32)  # z's terms, summed over the rows once at the end
    for j in range(0, LS + 1):
        n = (NT - part * LS - j) * BT + r
        do = _load_tile(dop, n, vv, T, DV, sdt).to(tl.float32)
        inv = 1.0 / _load_row(ZD + rowp, n, T, 1.0)
        if FROM_DELTA:
            delta = _load_row(DELTA + rowp, n, T, 0.0)
        else:
            o = _load_tile(op, n, vv, T, DV, sot).to(tl.float32)
            delta = tl.sum(o * do, axis=1)
        rb = -delta * inv
        da = (do * inv[:, None]).to(DA.dtype.element_ty)
        jr = r * 0 + j  # (j in every row: the masks below stay tensors in the interpreter)
        keep = (n >= 0) & (n < T) & (jr > 0)
        if HAS_DELTA and not FROM_DELTA:
            tl.store(DELTA + rowp + n, delta, mask=keep)
        if not FROM_DELTA:
            tl.store(RB + rowp + n, rb, mask=keep)
        tl.store(ap + n[:, None].to(tl.int64) * sat + vv[None, :], da, mask=keep[:, None] & (vv[None, :] < DV))
        # phi(q) of the rows in this part's total (none for j = LS, nor in a part without a total: no loads)
        qrow = (n >= 0) & (n < T) & (jr < LS) & total_r
        qmask = qrow[:, None] & (ff[None, :] < F)
        qf = tl.load(qp + n[:, None].to(tl.int64) * sft + ff[None, :], mask=qmask, other=0.0)
        zacc += qf.to(tl.float32) * rb[:, None]
        S = tl.dot(tl.trans(qf.to(DT)), da.to(DT), S, input_precision=PREC)
    if total:
        tl.store(_state_ptr(TOT, pid_bh, part, NTOT, BF, BDV, ff, vv), S)
        tl.store(ZTOT + (pid_bh.to(tl.int64) * NTOT + part) * BF + ff, tl.sum(zacc, axis=0))


# --------------------------------------------------------------------------------------------------------------
# backward, query side: dq, dq_feat, dgamma, and for the key side the row sum r_n = sum_j p_nj dW_nj and arg max


@triton.jit
def _bwd_q_kernel(
    Q, K, V, QF, KF, GAMMA, DO, M, ZD, DELTA, HS, ZS,
    DQ, DQF, PS, DS, DWL, DG, ARG, OUT,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sfb, sft, sfh, sdb, sdt, sdh,
    T, H, G, NT, window, scale,
    D: tl.constexpr, DV: tl.constexpr, F: tl.constexpr,
    BD: tl.constexpr, BDV: tl.constexpr, BF: tl.constexpr, BT: tl.constexpr,
    SOFTMAX: tl.constexpr, LINEAR: tl.constexpr, CUR_LIN: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
    DO_LIN: tl.constexpr = True, DO_SM: tl.constexpr = True, SC: tl.constexpr = 1, GROUP: tl.constexpr = False,
    SAVE_P: tl.constexpr = False, SAVE_DW: tl.constexpr = False, WIN: tl.constexpr = False, NDW: tl.constexpr = 2,
    FWD_P: tl.constexpr = False, DELTA_Q: tl.constexpr = False,
):
    """DO_LIN / DO_SM: the linear side (dq_feat) and the softmax side (dq, dgamma); one launch with both, or one
    launch each (Q_SPLIT: fewer live registers per program, dW computed twice). The softmax side also stores, for the
    key side, its two [BT, BT] blocks of score gradients ds (DS) and, with SAVE_P, of softmax weights gamma p0 (PS),
    in the dtype of the dots: the key side reads them instead of computing the scores and dW again. SAVE_DW: it also
    stores the local linear terms' gradient blocks da = dW on L(n) (DWL; the same chunk's only if CUR_LIN), which the
    linear side of a split launch and dk_feat read instead of computing dW again. FWD_P (with WIN): the window
    block of p0 and the arg maxes come from the forward (PS, ARG): no scores are computed and nothing is stored in
    PS. DELTA_Q: this launch computes delta = do . o itself from the output OUT (strides of DO) and stores it in
    DELTA, which the delta kernel (on the side stream, or not launched) then leaves alone."""
    i, pid_bh = _chunk_and_head(0, 1, G, GROUP)
    b = pid_bh // H
    h = pid_bh % H
    n = i * BT + tl.arange(0, BT)
    jp = n - BT
    dd = tl.arange(0, BD)
    vv = tl.arange(0, BDV)
    ff = tl.arange(0, BF)
    kp = _head(K, b, h // G, skb, skh)
    vp = _head(V, b, h // G, svb, svh)
    kfp = _head(KF, b, h, sfb, sfh)
    rowp = pid_bh.to(tl.int64) * T
    do, inv, dZ = _row_grads(_head(DO, b, h, sdb, sdh), sdt, ZD, DELTA, rowp, n, T, DV, BDV, DT,
                             _head(OUT, b, h, sdb, sdh), DELTA_Q)
    # dW_nj = dA_n . v_j + dZ_n for every weight W_nj of the shared numerator / normaliser
    if LINEAR != 0 and DO_LIN and not (SAVE_DW and not DO_SM):  # (the softmax side alone computes each block where
        # it uses it; the linear side alone with SAVE_DW reads the local blocks)
        dW_p = _dw_block(do, inv, dZ, vp, jp, vv, T, DV, svt, PREC)
        dW_c = _dw_block(do, inv, dZ, vp, n, vv, T, DV, svt, PREC)
    # the linear side first: its accumulator dies before the softmax side's score blocks are live
    if LINEAR != 0 and DO_LIN:
        # keys of chunks <= SC p - 2: S dA_n + z dZ_n from the state of the group, then key chunks SC p - 1 .. i - 2
        # exactly (all terms linear and unmasked)
        p = i // SC
        NS = tl.cdiv(NT, SC)
        hs = tl.load(_state_ptr(HS, pid_bh, p, NS, BF, BDV, ff, vv))
        z = tl.load(ZS + (pid_bh.to(tl.int64) * NS + p) * BF + ff)
        dqf = tl.dot(do, tl.trans(hs), input_precision=PREC) * inv[:, None] + dZ[:, None] * z[None, :]
        if SC > 1:  # (not software-pipelined: its buffers would cost the kernel its occupancy)
            for c in tl.range(tl.maximum(p * SC - 1, 0), i - 1, num_stages=1):
                j = c * BT + tl.arange(0, BT)
                da = _dw_block(do, inv, dZ, vp, j, vv, T, DV, svt, PREC)
                dqf = tl.dot(da.to(DT), _load_tile(kfp, j, ff, T, F, sft), dqf, input_precision=PREC)
        if SAVE_DW and not DO_SM:  # the softmax side of this call stored them (launched first)
            da = tl.load(_pair_ptr(DWL, pid_bh, i, 0, NT, BT, NDW))
        else:
            da = tl.where(_lin_mask(n, jp, T, window, LINEAR), dW_p, 0.0).to(DT)
        dqf = tl.dot(da, _load_tile(kfp, jp, ff, T, F, sft), dqf, input_precision=PREC)
        if CUR_LIN:
            if SAVE_DW and not DO_SM:
                da = tl.load(_pair_ptr(DWL, pid_bh, i, 1, NT, BT, NDW))
            else:
                da = tl.where(_lin_mask(n, n, T, window, LINEAR), dW_c, 0.0).to(DT)
            dqf = tl.dot(da, _load_tile(kfp, n, ff, T, F, sft), dqf, input_precision=PREC)
        _store_tile(_head(DQF, b, h, sfb, sfh), dqf, n, ff, T, F, sft)
    if SOFTMAX and DO_SM and WIN:
        # window blocks (w <= BT): row r sees key iBT + u of its own chunk for u <= r and key (i-1)BT + u for u > r
        # (every other key of a column is more than w back, its score -inf), so the two score blocks merge into one
        # window block before the softmax work: one block of p0, dW and ds live instead of two, each stored once
        # and whole. Every term is the pair layout's, added in its order: under the interpreter the bits are the same
        # (compiled, the pair layout's row sums fuse each product into its addition, these do not).
        gamma = tl.load(GAMMA + h).to(tl.float32)
        own = _win_part(1, BT)
        key = tl.where(own, n[None, :], jp[None, :])
        if FWD_P:  # (rows past T: p0 = 0, their arg max unused)
            p0 = tl.load(_pair_ptr(PS, pid_bh, i, 0, NT, BT, 1)).to(tl.float32)
            idx = _load_row(ARG + rowp, n, T, 0)
        else:
            m = _load_row(M + rowp, n, T, 0.0)
            q = _load_tile(_head(Q, b, h, sqb, sqh), n, dd, T, D, sqt)
            s = tl.where(own, _scores(q, kp, n, n, T, window, scale, skt, D, BD, SOFTMAX, PREC),
                         _scores(q, kp, n, jp, T, window, scale, skt, D, BD, SOFTMAX, PREC))
            # the arg max: the first maximum in key order (chunk i - 1's keys first), as the pair layout takes it
            idx = tl.min(tl.where(s == tl.max(s, axis=1)[:, None], key, 2147483647), axis=1)
            p0 = tl.exp(s - m[:, None])
            if SAVE_P:
                tl.store(_pair_ptr(PS, pid_bh, i, 0, NT, BT, 1), (gamma * p0).to(DT))
        if LINEAR == 0 or not DO_LIN:
            dW_p = _dw_block(do, inv, dZ, vp, jp, vv, T, DV, svt, PREC)
        if LINEAR != 0 and SAVE_DW:
            tl.store(_pair_ptr(DWL, pid_bh, i, 0, NT, BT, NDW),
                     tl.where(_lin_mask(n, jp, T, window, LINEAR), dW_p, 0.0).to(DT))
        if LINEAR == 0 or not DO_LIN:
            dW_c = _dw_block(do, inv, dZ, vp, n, vv, T, DV, svt, PREC)
        if LINEAR != 0 and SAVE_DW and CUR_LIN:
            tl.store(_pair_ptr(DWL, pid_bh, i, 1, NT, BT, NDW),
                     tl.where(_lin_mask(n, n, T, window, LINEAR), dW_c, 0.0).to(DT))
        pw0 = p0 * tl.where(own, dW_c, dW_p)
        # the row sums block by block, as the pair layout adds them (the other block's entries are exact zeros)
        row = tl.sum(tl.where(own, 0.0, pw0), axis=1) + tl.sum(tl.where(own, pw0, 0.0), axis=1)
        rsum = gamma * row
        ds = (gamma * pw0 - tl.where(key == idx[:, None], rsum[:, None], 0.0)).to(DT)
        tl.store(_pair_ptr(DS, pid_bh, i, 0, NT, BT, 1), ds)
        dq = tl.dot(tl.where(own, 0.0, ds).to(DT), _load_tile(kp, jp, dd, T, D, skt), input_precision=PREC)
        dq = tl.dot(tl.where(own, ds, 0.0).to(DT), _load_tile(kp, n, dd, T, D, skt), dq, input_precision=PREC)
        _store_tile(_head(DQ, b, h, sqb, sqh), dq * scale, n, dd, T, D, sqt)
        tl.store(DG + pid_bh.to(tl.int64) * NT + i, tl.sum(row, axis=0))
    if SOFTMAX and DO_SM and not WIN:
        gamma = tl.load(GAMMA + h).to(tl.float32)
        m = _load_row(M + rowp, n, T, 0.0)
        q = _load_tile(_head(Q, b, h, sqb, sqh), n, dd, T, D, sqt)
        # c_n = max_j s_nj is differentiated too (the linear terms do not rescale with it): its gradient
        # -sum_j p_nj dW_nj goes to the arg max (first one on ties). Each score block is reduced right away.
        s = _scores(q, kp, n, jp, T, window, scale, skt, D, BD, SOFTMAX, PREC)
        mp = tl.max(s, axis=1)
        ap = (i - 1) * BT + tl.argmax(s, axis=1)
        p0 = tl.exp(s - m[:, None])
        if SAVE_P:
            tl.store(_pair_ptr(PS, pid_bh, i, 0, NT, BT), (gamma * p0).to(DT))
        if LINEAR == 0 or not DO_LIN:
            dW_p = _dw_block(do, inv, dZ, vp, jp, vv, T, DV, svt, PREC)
        if LINEAR != 0 and SAVE_DW:
            tl.store(_pair_ptr(DWL, pid_bh, i, 0, NT, BT, NDW),
                     tl.where(_lin_mask(n, jp, T, window, LINEAR), dW_p, 0.0).to(DT))
        pw0_p = p0 * dW_p
        s = _scores(q, kp, n, n, T, window, scale, skt, D, BD, SOFTMAX, PREC)
        idx = tl.where(mp >= tl.max(s, axis=1), ap, i * BT + tl.argmax(s, axis=1))
        p0 = tl.exp(s - m[:, None])
        if SAVE_P:
            tl.store(_pair_ptr(PS, pid_bh, i, 1, NT, BT), (gamma * p0).to(DT))
        if LINEAR == 0 or not DO_LIN:
            dW_c = _dw_block(do, inv, dZ, vp, n, vv, T, DV, svt, PREC)
        if LINEAR != 0 and SAVE_DW and CUR_LIN:
            tl.store(_pair_ptr(DWL, pid_bh, i, 1, NT, BT, NDW),
                     tl.where(_lin_mask(n, n, T, window, LINEAR), dW_c, 0.0).to(DT))
        pw0_c = p0 * dW_c
        row = tl.sum(pw0_p, axis=1) + tl.sum(pw0_c, axis=1)
        rsum = gamma * row
        ds = (gamma * pw0_p - tl.where(jp[None, :] == idx[:, None], rsum[:, None], 0.0)).to(DT)
        tl.store(_pair_ptr(DS, pid_bh, i, 0, NT, BT), ds)
        # the key tiles are reloaded (L2) rather than kept live across the score / softmax work
        dq = tl.dot(ds, _load_tile(kp, jp, dd, T, D, skt), input_precision=PREC)
        ds = (gamma * pw0_c - tl.where(n[None, :] == idx[:, None], rsum[:, None], 0.0)).to(DT)
        tl.store(_pair_ptr(DS, pid_bh, i, 1, NT, BT), ds)
        dq = tl.dot(ds, _load_tile(kp, n, dd, T, D, skt), dq, input_precision=PREC)
        _store_tile(_head(DQ, b, h, sqb, sqh), dq * scale, n, dd, T, D, sqt)
        tl.store(DG + pid_bh.to(tl.int64) * NT + i, tl.sum(row, axis=0))


# --------------------------------------------------------------------------------------------------------------
# backward, key side, one program per (key chunk, batch * head): queries of the same chunk and of the next one see
# these keys exactly, those of chunks >= i+2 through dh. The softmax weights gamma p0 and the score gradients ds of
# those two query chunks come from the query side (PS, DS: no scores computed again here). Two kernels, so that
# each holds two accumulators at most: dk and dv (per kv head, fp32); dk_feat from the linear terms alone.


@triton.jit
def _bwd_dv_block(
    qp, qfp, dop, rowp, sqt, sft, sdt, M, ZD, PS, LB, kp, skt, kfp, gamma, pid_bh, c, t, n, j, lin_on, T, NT, window,
    scale, dv,
    D: tl.constexpr, DV: tl.constexpr, F: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BF: tl.constexpr,
    BT: tl.constexpr, SOFTMAX: tl.constexpr, LINEAR: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
    SAVE_P: tl.constexpr, WIN: tl.constexpr, FWD_P: tl.constexpr, FWD_LIN: tl.constexpr, NDW: tl.constexpr,
):
    """dv_j += sum_n W_nj dA_n over the query rows n of query chunk c = i + t; W = gamma p0 (SAVE_P: the query side's
    block, slot 1 - t of chunk c, none for t >= 2, past the window; FWD_P: the forward's block of p0; else from the
    scores) plus the linear weights where lin_on (a runtime flag, so that the caller's loop over the query chunks
    stays a loop: unrolled, the blocks spill; FWD_LIN: the forward's blocks for t < 2)."""
    if SOFTMAX and (SAVE_P or FWD_P):
        w = _blk_load(PS, pid_bh, c, 1 - t, NT, (n < T)[:, None] & (t < 2), BT, WIN)
        w = w.to(tl.float32)
        if FWD_P:
            w = gamma * w
    elif SOFTMAX:
        q = _load_tile(qp, n, tl.arange(0, BD), T, D, sqt)
        s = _scores(q, kp, n, j, T, window, scale, skt, D, BD, SOFTMAX, PREC)
        w = gamma * tl.exp(s - _load_row(M + rowp, n, T, 0.0)[:, None])
    else:
        w = tl.zeros([BT, BT], dtype=tl.float32)
    if LINEAR != 0:
        if lin_on:
            if FWD_LIN:
                if t < 2:
                    w += tl.load(_pair_ptr(LB, pid_bh, c, 1 - t, NT, BT, NDW), mask=(n < T)[:, None],
                                 other=0.0).to(tl.float32)
                else:
                    w += _lin_block(_load_tile(qfp, n, tl.arange(0, BF), T, F, sft), kfp, n, j, T, window, sft, F, BF,
                                    LINEAR, PREC)
            else:
                w += _lin_block(_load_tile(qfp, n, tl.arange(0, BF), T, F, sft), kfp, n, j, T, window, sft, F, BF,
                                LINEAR, PREC)
    w = w * (1.0 / _load_row(ZD + rowp, n, T, 1.0))[:, None]  # W_nj dA_n = (W_nj / Zd_n) do_n
    do = _load_tile(dop, n, tl.arange(0, BDV), T, DV, sdt).to(DT)
    return tl.dot(tl.trans(w.to(DT)), do, dv, input_precision=PREC)


@triton.jit
def _kf_block(qfp, dop, rowp, sft, sdt, ZD, DELTA, DWL, v, pid_bh, c, t, n, j, T, NT, window, dkf,
              DV: tl.constexpr, F: tl.constexpr, BDV: tl.constexpr, BF: tl.constexpr, BT: tl.constexpr,
              LINEAR: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, SAVE_DW: tl.constexpr, NDW: tl.constexpr):
    """dkf_j += sum_n da_nj phi(q_n) over the rows n of query chunk c = i + t (``_lin_da``)."""
    da = _lin_da(dop, rowp, sdt, ZD, DELTA, DWL, v, pid_bh, c, t, n, j, T, NT, window, DV, BDV, BT, LINEAR, DT, PREC,
                 SAVE_DW, NDW)
    return tl.dot(tl.trans(da), _load_tile(qfp, n, tl.arange(0, BF), T, F, sft), dkf, input_precision=PREC)


@triton.jit
def _lin_da(dop, rowp, sdt, ZD, DELTA, DWL, v, pid_bh, c, t, n, j, T, NT, window, DV: tl.constexpr,
            BDV: tl.constexpr, BT: tl.constexpr, LINEAR: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
            SAVE_DW: tl.constexpr, NDW: tl.constexpr):
    """da = dW on L(n) of the rows n of query chunk c = i + t against key rows j, in the dtype of the dots: the query
    side's block (SAVE_DW, t < 2: slot 1 - t of chunk c) or computed from do and v_j."""
    if SAVE_DW and t < 2:
        da = tl.load(_pair_ptr(DWL, pid_bh, c, 1 - t, NT, BT, NDW), mask=(n < T)[:, None], other=0.0)
    else:
        do, inv, dZ = _row_grads(dop, sdt, ZD, DELTA, rowp, n, T, DV, BDV, DT)
        dw = tl.dot(do, tl.trans(v), input_precision=PREC) * inv[:, None] + dZ[:, None]
        da = tl.where(_lin_mask(n, j, T, window, LINEAR), dw, 0.0).to(DT)
    return da


@triton.jit
def _bwd_dv_pass(
    Q, K, V, QF, KF, GAMMA, DO, M, ZD, DELTA, PS, DWL, DHS, DZS, DV_, DKF, LB, DVL, b, hk, i, j,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sfb, sft, sfh, sdb, sdt, sdh, T, H, G, NT, window, scale,
    D: tl.constexpr, DV: tl.constexpr, F: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BF: tl.constexpr,
    BT: tl.constexpr, SOFTMAX: tl.constexpr, LINEAR: tl.constexpr, CUR_LIN: tl.constexpr, DT: tl.constexpr,
    PREC: tl.constexpr, SC: tl.constexpr, SAVE_P: tl.constexpr, WIN: tl.constexpr, WITH_KF: tl.constexpr,
    SAVE_DW: tl.constexpr, NDW: tl.constexpr, FWD_P: tl.constexpr, FWD_LIN: tl.constexpr, DV_INIT: tl.constexpr,
    DVL_HEADS: tl.constexpr = False,
):
    """dv_j of key chunk i of kv head hk, summed over its G query heads; written in the dtype of v. WITH_KF
    (KF_IN_KV): dk_feat of each of those heads too, from the reverse state and the query rows this pass reads, in
    place of _bwd_kf_kernel (written per query head, in the dtype of the features). DV_INIT (KF_DV; the host then
    passes LINEAR = 0): dv starts from its linear terms, written to DVL by _bwd_kfdv_kernel. DVL_HEADS (REV_LIN; LINEAR
    = 0 too): dv adds each query head's linear terms, written per query head to DVL (laid out as do) by
    _bwd_rev_kernel."""
    vv = tl.arange(0, BDV)
    ff = tl.arange(0, BF)
    kp = _head(K, b, hk, skb, skh)
    NS = tl.cdiv(NT, SC)
    p = i // SC
    nq = 2  # query chunks seen exactly: i, i + 1 and, for SC > 1, i + 2 .. SC p + SC (linear terms only)
    if LINEAR != 0 and SC > 1:
        nq = tl.maximum(tl.minimum(p * SC + SC + 1, NT) - i, 2)
    if not SOFTMAX and LINEAR == 0:  # (REV_LIN, linear-only: dv is the sum of DVL's heads)
        nq = 0
    if DV_INIT:
        dv = _load_tile(_head(DVL, b, hk, svb, svh), j, vv, T, DV, svt).to(tl.float32)
    else:
        dv = tl.zeros([BT, BDV], dtype=tl.float32)
    if WITH_KF:
        v = _load_tile(_head(V, b, hk, svb, svh), j, vv, T, DV, svt)
    for g in range(G):
        h = hk * G + g
        pid_bh = b * H + h
        qp = _head(Q, b, h, sqb, sqh)
        qfp = _head(QF, b, h, sfb, sfh)
        dop = _head(DO, b, h, sdb, sdh)
        rowp = pid_bh.to(tl.int64) * T
        gamma = tl.load(GAMMA + h).to(tl.float32)
        kfp = _head(KF, b, h, sfb, sfh)
        if DVL_HEADS:
            dv += _load_tile(_head(DVL, b, h, sdb, sdh), j, vv, T, DV, sdt).to(tl.float32)
        if LINEAR != 0:  # queries of chunks >= SC p + SC + 1 through the reverse state of the group: dh^T phi(k_j)
            kf = _load_tile(kfp, j, ff, T, F, sft)
            dh = tl.load(_state_ptr(DHS, pid_bh, p, NS, BF, BDV, ff, vv))
            dv = tl.dot(kf, dh, dv, input_precision=PREC)
            if WITH_KF:  # v_j dh^T + dz, then the rows of the query chunks below
                dkf = tl.dot(v, tl.trans(dh), input_precision=PREC)
                dkf += tl.load(DZS + (pid_bh.to(tl.int64) * NS + p) * BF + ff)[None, :]
        # one loop over the query chunks, not a second one for those past the window (a second copy of the block's
        # code made the kernel spill). The same chunk's linear terms only if CUR_LIN.
        for t in range(nq):
            dv = _bwd_dv_block(qp, qfp, dop, rowp, sqt, sft, sdt, M, ZD, PS, LB, kp, skt, kfp, gamma, pid_bh, i + t,
                               t, j + t * BT, j, t + CUR_LIN > 0, T, NT, window, scale, dv,
                               D, DV, F, BD, BDV, BF, BT, SOFTMAX, LINEAR, DT, PREC, SAVE_P, WIN, FWD_P, FWD_LIN, NDW)
            if WITH_KF:
                if t + CUR_LIN > 0:  # the query chunks with linear terms on these keys: as lin_on above
                    dkf = _kf_block(qfp, dop, rowp, sft, sdt, ZD, DELTA, DWL, v, pid_bh, i + t, t, j + t * BT, j, T,
                                    NT, window, dkf, DV, F, BDV, BF, BT, LINEAR, DT, PREC, SAVE_DW, NDW)
        if WITH_KF:
            _store_tile(_head(DKF, b, h, sfb, sfh), dkf, j, ff, T, F, sft)
    _store_tile(_head(DV_, b, hk, svb, svh), dv, j, vv, T, DV, svt)


@triton.jit
def _bwd_dk_pass(
    Q, DS, DK, b, hk, i, j, sqb, sqt, sqh, skb, skt, skh, T, H, G, NT, scale,
    D: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr, PREC: tl.constexpr, WIN: tl.constexpr,
):
    """dk_j = scale sum_n ds_nj q_n of key chunk i of kv head hk over the query rows of chunks i and i + 1 and its G
    query heads (ds from the query side: gamma p0 dW - [j = argmax_n] r_n); written in the dtype of k."""
    dd = tl.arange(0, BD)
    dk = tl.zeros([BT, BD], dtype=tl.float32)
    for g in range(G):
        h = hk * G + g
        pid_bh = b * H + h
        qp = _head(Q, b, h, sqb, sqh)
        for t in range(2):
            n = j + t * BT
            ds = _blk_load(DS, pid_bh, i + t, 1 - t, NT, (n < T)[:, None], BT, WIN)
            dk = tl.dot(tl.trans(ds), _load_tile(qp, n, dd, T, D, sqt), dk, input_precision=PREC)
    _store_tile(_head(DK, b, hk, skb, skh), dk * scale, j, dd, T, D, skt)


@triton.jit
def _bwd_kv_kernel(
    Q, K, V, QF, KF, GAMMA, DO, M, ZD, DELTA, PS, DS, DWL, DHS, DZS,
    DK, DV_, DKF, DG, DGS, LB, DVL,
    sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sfb, sft, sfh, sdb, sdt, sdh,
    T, H, G, NT, window, scale,
    D: tl.constexpr, DV: tl.constexpr, F: tl.constexpr,
    BD: tl.constexpr, BDV: tl.constexpr, BF: tl.constexpr, BT: tl.constexpr,
    SOFTMAX: tl.constexpr, LINEAR: tl.constexpr, CUR_LIN: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
    DO_DV: tl.constexpr = True, DO_DK: tl.constexpr = True, SC: tl.constexpr = 1, SAVE_P: tl.constexpr = False,
    WIN: tl.constexpr = False, WITH_KF: tl.constexpr = False, SAVE_DW: tl.constexpr = False,
    NDW: tl.constexpr = 2, DG_SUM: tl.constexpr = False, FWD_P: tl.constexpr = False, FWD_LIN: tl.constexpr = False,
    DV_INIT: tl.constexpr = False, DVL_HEADS: tl.constexpr = False,
):
    """dv, then dk, of key chunk i of one kv head, summed over the G query heads that share it (written once, in
    the dtype of k / v, at the strides of k / v). Two passes over the query blocks, so that one fp32 accumulator is
    live at a time. DO_DV / DO_DK: both passes in one launch, or one launch each (KV_SPLIT). WITH_KF: the dv pass
    also writes dk_feat (KF_IN_KV). FWD_P / FWD_LIN: the dv pass reads the forward's blocks of p0 (in PS) and of the
    local linear terms (LB)."""
    i = tl.program_id(0)
    pid_bk = tl.program_id(1)  # batch * kv head
    Hkv = H // G
    b = pid_bk // Hkv
    hk = pid_bk % Hkv
    j = i * BT + tl.arange(0, BT)
    if DO_DV:
        _bwd_dv_pass(Q, K, V, QF, KF, GAMMA, DO, M, ZD, DELTA, PS, DWL, DHS, DZS, DV_, DKF, LB, DVL, b, hk, i, j,
                     sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sfb, sft, sfh, sdb, sdt, sdh, T, H, G, NT, window,
                     scale, D, DV, F, BD, BDV, BF, BT, SOFTMAX, LINEAR, CUR_LIN, DT, PREC, SC, SAVE_P, WIN,
                     WITH_KF and LINEAR != 0, SAVE_DW, NDW, FWD_P, FWD_LIN, DV_INIT, DVL_HEADS)
    if SOFTMAX and DO_DK:
        _bwd_dk_pass(Q, DS, DK, b, hk, i, j, sqb, sqt, sqh, skb, skt, skh, T, H, G, NT, scale, D, BD, BT, PREC, WIN)
    if SOFTMAX and DO_DK and DG_SUM:
        if i == 0:  # dgamma of the group's heads from the query side's chunk partials DG (written before this
            # launch): DGS[b H + h] = sum over the chunks, here rather than in a torch launch of its own (host time)
            for g in range(G):
                bh = (b * H + hk * G + g).to(tl.int64)
                acc = tl.zeros([BT], dtype=tl.float32)
                for c0 in range(0, NT, BT):
                    cc = c0 + tl.arange(0, BT)
                    acc += tl.load(DG + bh * NT + cc, mask=cc < NT, other=0.0)
                tl.store(DGS + bh, tl.sum(acc, axis=0))


@triton.jit
def _bwd_kf_kernel(
    QF, V, DO, ZD, DELTA, DHS, DZS, DWL, DKF,
    svb, svt, svh, sfb, sft, sfh, sdb, sdt, sdh,
    T, H, G, NT, window,
    DV: tl.constexpr, F: tl.constexpr, BDV: tl.constexpr, BF: tl.constexpr, BT: tl.constexpr,
    LINEAR: tl.constexpr, CUR_LIN: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, SC: tl.constexpr = 1,
    GROUP: tl.constexpr = False, SAVE_DW: tl.constexpr = False, NDW: tl.constexpr = 2,
):
    """dphi(k_j) = sum_n da_nj phi(q_n) (queries of chunks i, i+1 on L(n); those of chunk i only if CUR_LIN)
    + v_j dh_j^T + dz_j."""
    i, pid_bh = _chunk_and_head(0, 1, G, GROUP)
    b = pid_bh // H
    h = pid_bh % H
    j = i * BT + tl.arange(0, BT)
    vv = tl.arange(0, BDV)
    ff = tl.arange(0, BF)
    qfp = _head(QF, b, h, sfb, sfh)
    dop = _head(DO, b, h, sdb, sdh)
    rowp = pid_bh.to(tl.int64) * T
    v = _load_tile(_head(V, b, h // G, svb, svh), j, vv, T, DV, svt)
    p = i // SC
    NS = tl.cdiv(NT, SC)
    dkf = tl.dot(v, tl.trans(tl.load(_state_ptr(DHS, pid_bh, p, NS, BF, BDV, ff, vv))), input_precision=PREC)
    dkf += tl.load(DZS + (pid_bh.to(tl.int64) * NS + p) * BF + ff)[None, :]
    for t in tl.static_range(1 - CUR_LIN, 2):
        dkf = _kf_block(qfp, dop, rowp, sft, sdt, ZD, DELTA, DWL, v, pid_bh, i + t, t, j + t * BT, j, T, NT, window,
                        dkf, DV, F, BDV, BF, BT, LINEAR, DT, PREC, SAVE_DW, NDW)
    # query chunks i + 2 .. SC p + SC, between these keys and the reverse state: all linear
    if SC > 1:  # (not software-pipelined: its buffers would cost the kernel its occupancy)
        for c in tl.range(i + 2, tl.minimum(p * SC + SC + 1, NT), num_stages=1):
            dkf = _kf_block(qfp, dop, rowp, sft, sdt, ZD, DELTA, DWL, v, pid_bh, c, 2, c * BT + tl.arange(0, BT), j, T,
                            NT, window, dkf, DV, F, BDV, BF, BT, LINEAR, DT, PREC, SAVE_DW, NDW)
    _store_tile(_head(DKF, b, h, sfb, sfh), dkf, j, ff, T, F, sft)


@triton.jit
def _kfdv_block(qfp, dop, rowp, sft, sdt, ZD, DELTA, DWL, v, kf, pid_bh, c, t, j, T, NT, window, dkf, dv,
                DV: tl.constexpr, F: tl.constexpr, BDV: tl.constexpr, BF: tl.constexpr, BT: tl.constexpr,
                LINEAR: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, SAVE_DW: tl.constexpr, NDW: tl.constexpr):
    """The rows n of query chunk c = i + t against key rows j (phi(k_j): kf): dkf_j += sum_n da_nj phi(q_n)
    (``_lin_da``) and dv_j += sum_n a_nj dA_n on L(n).
    a^T = phi(k) phi(q)^T is computed as such: phi(k) is the first operand of both of the kernel's dots with it, and
    a^T enters the dv dot untransposed."""
    n = c * BT + tl.arange(0, BT)
    da = _lin_da(dop, rowp, sdt, ZD, DELTA, DWL, v, pid_bh, c, t, n, j, T, NT, window, DV, BDV, BT, LINEAR, DT, PREC,
                 SAVE_DW, NDW)
    qf = _load_tile(qfp, n, tl.arange(0, BF), T, F, sft)
    dkf = tl.dot(tl.trans(da), qf, dkf, input_precision=PREC)
    aT = tl.dot(kf, tl.trans(qf), input_precision=PREC)
    aT = tl.where(_lin_valid(n[None, :], j[:, None], T, window, LINEAR), aT, 0.0)
    aT = aT * (1.0 / _load_row(ZD + rowp, n, T, 1.0))[None, :]  # a_nj dA_n = (a_nj / Zd_n) do_n
    do = _load_tile(dop, n, tl.arange(0, BDV), T, DV, sdt).to(DT)
    return dkf, tl.dot(aT.to(DT), do, dv, input_precision=PREC)


@triton.jit
def _bwd_kfdv_kernel(
    QF, KF, V, DO, ZD, DELTA, DHS, DZS, DWL, DKF, DVL,
    svb, svt, svh, sfb, sft, sfh, sdb, sdt, sdh,
    T, H, G, NT, window,
    DV: tl.constexpr, F: tl.constexpr, BDV: tl.constexpr, BF: tl.constexpr, BT: tl.constexpr,
    LINEAR: tl.constexpr, CUR_LIN: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, SC: tl.constexpr = 1,
    SAVE_DW: tl.constexpr = False, NDW: tl.constexpr = 2,
):
    """KF_DV: dk_feat of the G query heads of kv head hk for key chunk i (as _bwd_kf_kernel) and dv's linear terms
    on these keys, summed over the G heads: phi(k_j) dh (the queries past the reverse state) and sum_n a_nj dA_n over
    the query rows with local linear terms (a = phi(q_n).phi(k_j) on L(n)), into DVL [B, T, Hkv, Dv] (fp32 where the
    key side adds its softmax terms, in the dtype of v without them). Each head's reverse state, phi(k) and phi(q)
    tiles are read here, instead of once by the key side and again by dk_feat."""
    i = tl.program_id(0)
    pid_bk = tl.program_id(1)  # batch * kv head
    Hkv = H // G
    b = pid_bk // Hkv
    hk = pid_bk % Hkv
    j = i * BT + tl.arange(0, BT)
    vv = tl.arange(0, BDV)
    ff = tl.arange(0, BF)
    v = _load_tile(_head(V, b, hk, svb, svh), j, vv, T, DV, svt)
    p = i // SC
    NS = tl.cdiv(NT, SC)
    c_end = tl.minimum(p * SC + SC + 1, NT)  # query chunks i + 2 .. SC p + SC: between the keys and the state
    dv = tl.zeros([BT, BDV], dtype=tl.float32)
    for g in range(G):
        h = hk * G + g
        pid_bh = b * H + h
        qfp = _head(QF, b, h, sfb, sfh)
        dop = _head(DO, b, h, sdb, sdh)
        rowp = pid_bh.to(tl.int64) * T
        kf = _load_tile(_head(KF, b, h, sfb, sfh), j, ff, T, F, sft)
        dh = tl.load(_state_ptr(DHS, pid_bh, p, NS, BF, BDV, ff, vv))
        dv = tl.dot(kf, dh, dv, input_precision=PREC)
        dkf = tl.dot(v, tl.trans(dh), input_precision=PREC)
        dkf += tl.load(DZS + (pid_bh.to(tl.int64) * NS + p) * BF + ff)[None, :]
        # the query chunks with linear terms on these keys: i (if CUR_LIN) and i + 1 (their dW blocks stored by the
        # query side, SAVE_DW), then i + 2 .. SC p + SC
        for t in tl.static_range(1 - CUR_LIN, 2):
            dkf, dv = _kfdv_block(qfp, dop, rowp, sft, sdt, ZD, DELTA, DWL, v, kf, pid_bh, i + t, t, j, T, NT, window,
                                  dkf, dv, DV, F, BDV, BF, BT, LINEAR, DT, PREC, SAVE_DW, NDW)
        if SC > 1:  # (not software-pipelined: its buffers would cost the kernel its occupancy)
            for c in tl.range(i + 2, c_end, num_stages=1):
                dkf, dv = _kfdv_block(qfp, dop, rowp, sft, sdt, ZD, DELTA, DWL, v, kf, pid_bh, c, 2, j, T, NT, window,
                                      dkf, dv, DV, F, BDV, BF, BT, LINEAR, DT, PREC, SAVE_DW, NDW)
        _store_tile(_head(DKF, b, h, sfb, sfh), dkf, j, ff, T, F, sft)
    _store_tile(_head(DVL, b, hk, svb, svh), dv, j, vv, T, DV, svt)


# --------------------------------------------------------------------------------------------------------------
# backward, the key side's linear terms in the reverse scan (REV_LIN): one program per (segment of REV_SEG key chunks,
# batch * head) holding the whole reverse state [F, Dv], so that no reverse state goes through memory


@triton.jit
def _rev_dv(qf, da, kf, n, j, T, window, dv, LINEAR: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, inv=None,
            SCALE: tl.constexpr = False):
    """dv_j += sum_n a_nj dA_n over query rows n (tiles phi(q), dA) on key rows j (tile phi(k)), a = phi(q) phi(k)^T on
    L(n). a is computed transposed (keys as rows): its accumulator then feeds the next dot's A operand without a
    transpose through shared memory. SCALE (REV_SCALE_DO): da is do's tile, and a's query columns are multiplied by
    inv (1 / Zd of the rows n) instead."""
    aT = tl.where(_lin_valid(n[None, :], j[:, None], T, window, LINEAR),
                  tl.dot(kf, tl.trans(qf), input_precision=PREC), 0.0)
    if SCALE:
        aT = aT * inv[None, :]
    return tl.dot(aT.to(DT), da, dv, input_precision=PREC)


@triton.jit
def _rev_dkf(qf, da, rb, v, n, j, T, window, dkf, LINEAR: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
             inv=None, SCALE: tl.constexpr = False):
    """dkf_j += sum_n da_nj phi(q_n) over query rows n (tiles phi(q), dA, dZ) on key rows j (tile v), da = dA v^T + dZ
    on L(n); computed transposed, as in ``_rev_dv`` (SCALE: da is do's tile, its products times inv)."""
    daT = tl.dot(v, tl.trans(da), input_precision=PREC)
    if SCALE:
        daT = daT * inv[None, :]
    daT = daT + rb[None, :]
    daT = tl.where(_lin_valid(n[None, :], j[:, None], T, window, LINEAR), daT, 0.0)
    return tl.dot(daT.to(DT), qf, dkf, input_precision=PREC)


@triton.jit
def _rows_over_zd(qf, inv, DT: tl.constexpr, SCALE: tl.constexpr, ST: tl.constexpr):
    """phi(q)'s rows times inv (1 / Zd) under SCALE and ST, where both the local dk_feat term and the transposed
    state's update take them divided (one tile for both); else qf as it is."""
    if SCALE and ST:
        return (qf.to(tl.float32) * inv[:, None]).to(DT)
    return qf


@triton.jit
def _rev_dkf_scaled(qs, da, rb, inv, v, n, j, T, window, dkf, LINEAR: tl.constexpr, DT: tl.constexpr,
                    PREC: tl.constexpr, SCALE: tl.constexpr, ST: tl.constexpr):
    """``_rev_dkf``, with do's tile in place of dA's under SCALE (inv = 1 / Zd of the rows n): under ST, qs is phi(q)
    already divided (``_rows_over_zd``; the dot's B operand, as in the transposed state's update) and dZ's weights are
    multiplied back by Zd; otherwise da's products are scaled in registers."""
    if SCALE and ST:
        return _rev_dkf(qs, da, rb / inv, v, n, j, T, window, dkf, LINEAR, DT, PREC)
    return _rev_dkf(qs, da, rb, v, n, j, T, window, dkf, LINEAR, DT, PREC, inv, SCALE)


@triton.jit
def _rev_carry_in(TOT, ZTOT, pid_bh, seg, NTOT, ff, vv, BF: tl.constexpr, BDV: tl.constexpr, PREFIX: tl.constexpr):
    """This program's block of the reverse state and of z at the start of segment seg: the sum of the totals of the
    segments before it (PREFIX: the totals are inclusive prefixes already, and that sum is entry seg - 1)."""
    S = tl.zeros([ff.shape[0], vv.shape[0]], dtype=tl.float32)
    z = tl.zeros([ff.shape[0]], dtype=tl.float32)
    for s in range(tl.maximum(seg - 1, 0) if PREFIX else 0, seg):
        S += tl.load(_state_ptr(TOT, pid_bh, s, NTOT, BF, BDV, ff, vv))
        z += tl.load(ZTOT + (pid_bh.to(tl.int64) * NTOT + s) * BF + ff)
    return S, z


@triton.jit
def _row_sum_dot(w, x, acc, BT: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, SPLIT: tl.constexpr = True):
    """acc[j, :] + sum_n w_n x[n, :] in every row j (w: [BT] fp32 row weights, x: a [BT, N] tile in DT), as dots whose
    A operand holds w in each of its BT rows, so that the result has the layout of any [BT, N] dot accumulator.
    16-bit DT with SPLIT: w as a high and a low DT part, two dots; x is exact in DT, so the sum is as accurate as in
    fp32 operands. Without SPLIT: w rounded to DT, one dot (each product off by at most half an ulp of DT, as a
    16-bit output rounds)."""
    wb = tl.zeros([BT, BT], dtype=tl.float32) + w[None, :]
    if DT == tl.float32:
        return tl.dot(wb, x, acc, input_precision=PREC)
    hi = wb.to(DT)
    acc = tl.dot(hi, x, acc, input_precision=PREC)
    if SPLIT:
        acc = tl.dot((wb - hi.to(tl.float32)).to(DT), x, acc, input_precision=PREC)
    return acc


@triton.jit
def _rev_state_add(S, qf, da, inv, BT: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, SCALE: tl.constexpr,
                   ON_DA: tl.constexpr = False):
    """S + phi(q)^T dA over a query chunk. SCALE (REV_SCALE_DO): da is do's tile, times inv = 1 / Zd: ON_DA, do's
    rows in registers (the dot's B operand); otherwise phi(q)^T's columns, by a dot with the diagonal matrix of inv
    (in DT) whose accumulator is the next dot's A operand in registers (phi(q)'s rows scaled in registers spilled:
    ptxas, 156 B a thread in the dk_feat parts)."""
    if SCALE and ON_DA:
        da = (da.to(tl.float32) * inv[:, None]).to(DT)
    elif SCALE:
        r = tl.arange(0, BT)
        dm = tl.where(r[:, None] == r[None, :], inv[None, :], 0.0).to(DT)
        qT = tl.dot(tl.trans(qf), dm, input_precision=PREC)
        return tl.dot(qT.to(DT), da, S, input_precision=PREC)
    return tl.dot(tl.trans(qf), da, S, input_precision=PREC)


@triton.jit
def _prefix_kernel(X, N, NSEG, BLOCK: tl.constexpr):
    """In place over a [B H, NSEG, N] fp32 buffer: X[bh, s] becomes the sum of X[bh, 0 .. s] (REV_PREFIX), for
    BLOCK of the N entries of one bh."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    p = X + tl.program_id(1).to(tl.int64) * NSEG * N + offs
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(0, NSEG):
        acc += tl.load(p + s * N, mask=mask)
        tl.store(p + s * N, acc, mask=mask)


@triton.jit
def _bwd_rev_kernel(
    QF, KF, V, DA, RB, TOT, ZTOT, DKF, DVH, ZD,
    svb, svt, svh, sfb, sft, sfh, sab, sat, sah,
    T, H, G, NT, L, NTOT, window,
    DV: tl.constexpr, F: tl.constexpr, BDV: tl.constexpr, BF: tl.constexpr, BT: tl.constexpr,
    LINEAR: tl.constexpr, CUR_LIN: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
    NV: tl.constexpr, NF: tl.constexpr, PREFIX: tl.constexpr = False, ZDOT: tl.constexpr = False,
    ZSPLIT: tl.constexpr = True, KS: tl.constexpr = 1, SCALE: tl.constexpr = False, ST: tl.constexpr = False,
):
    """Key chunks i = NT-1-t for the steps t of segment seg (t in [seg L, seg L + L)), of one query head, with the
    reverse state dh = sum phi(q)^T dA, dz = sum phi(q) dZ over the query chunks >= i + 2 in registers, then chunk
    i + 1 into the state. Parts 0 .. NV-1 (grid axis 0) hold dh's Dv columns of their part and write those columns of this
    head's linear terms of dv_j: phi(k_j) dh + the local terms of query chunks i + 1 (and i if CUR_LIN), per query
    head into DVH (the key side sums the G heads of a kv head). Parts NV .. NV+NF-1 hold dh's F rows of their part
    and write those columns of dk_feat_j: v_j dh^T + dz + the local terms, in the dtype of the features. A part's
    block of the state starts from the totals of the segments before this one (TOT, ZTOT: ``_chunk_state_kernel``'s
    phase 1 over the same segments, or ``_delta_totals_kernel``'s over KS parts a segment; PREFIX: their inclusive
    prefixes). SCALE (REV_SCALE_DO): DA is do, and the kernel divides by Zd (ZD) itself. ST (REV_ST): the dk_feat parts
    hold their block of dh transposed."""
    part = tl.program_id(0)  # (the parts of a segment and head run next to each other and share their tiles in L2)
    seg = tl.program_id(1)
    pid_bh = tl.program_id(2)
    if part < NV:
        _rev_dv_part(QF, KF, DA, TOT, ZTOT, DVH, ZD, sft, sfb, sfh, sab, sat, sah, T, H, NT, L, NTOT, window, seg,
                     pid_bh, part, DV, F, BDV, BF, BT, LINEAR, CUR_LIN, DT, PREC, NV, PREFIX, KS, SCALE)
    else:
        _rev_dkf_part(QF, V, DA, RB, TOT, ZTOT, DKF, ZD, svb, svt, svh, sfb, sft, sfh, sab, sat, sah, T, H, G, NT, L,
                      NTOT, window, seg, pid_bh, part - NV, DV, F, BDV, BF, BT, LINEAR, CUR_LIN, DT, PREC, NF, PREFIX,
                      ZDOT, ZSPLIT, KS, SCALE, ST)


@triton.jit
def _rev_dv_part(QF, KF, DA, TOT, ZTOT, DVH, ZD, sft, sfb, sfh, sab, sat, sah, T, H, NT, L, NTOT, window, seg, pid_bh,
                 part, DV: tl.constexpr, F: tl.constexpr, BDV: tl.constexpr, BF: tl.constexpr, BT: tl.constexpr,
                 LINEAR: tl.constexpr, CUR_LIN: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
                 NV: tl.constexpr, PREFIX: tl.constexpr, KS: tl.constexpr, SCALE: tl.constexpr):
    """``_bwd_rev_kernel``'s dv part ``part``: dv's columns vv, the local weights a over all F against dA's columns."""
    b = pid_bh // H
    h = pid_bh % H
    qfp = _head(QF, b, h, sfb, sfh)
    kfp = _head(KF, b, h, sfb, sfh)
    dap = _head(DA, b, h, sab, sah)
    rowp = pid_bh.to(tl.int64) * T
    ff = tl.arange(0, BF)
    vv = part * (BDV // NV) + tl.arange(0, BDV // NV)
    S, z = _rev_carry_in(TOT, ZTOT, pid_bh, seg * KS, NTOT, ff, vv, BF, BDV, PREFIX)
    for t in range(seg * L, tl.minimum(seg * L + L, NT)):
        j = (NT - 1 - t) * BT + tl.arange(0, BT)
        n = j + BT  # query chunk i + 1: its local terms, then into the state
        kf = _load_tile(kfp, j, ff, T, F, sft)
        qf = _load_tile(qfp, n, ff, T, F, sft)
        da = _load_tile(dap, n, vv, T, DV, sat)
        inv = 1.0 / _load_row(ZD + rowp, n, T, 1.0) if SCALE else None
        dv = _rev_dv(qf, da, kf, n, j, T, window, tl.dot(kf, S.to(DT), input_precision=PREC), LINEAR, DT, PREC, inv,
                     SCALE)
        if CUR_LIN:
            dv = _rev_dv(_load_tile(qfp, j, ff, T, F, sft), _load_tile(dap, j, vv, T, DV, sat), kf, j, j, T, window,
                         dv, LINEAR, DT, PREC, 1.0 / _load_row(ZD + rowp, j, T, 1.0) if SCALE else None, SCALE)
        _store_tile(_head(DVH, b, h, sab, sah), dv, j, vv, T, DV, sat)
        S = _rev_state_add(S, qf, da, inv, BT, DT, PREC, SCALE, ON_DA=NV > 1)


@triton.jit
def _rev_dkf_part(QF, V, DA, RB, TOT, ZTOT, DKF, ZD, svb, svt, svh, sfb, sft, sfh, sab, sat, sah, T, H, G, NT, L,
                  NTOT, window, seg, pid_bh, part,
                  DV: tl.constexpr, F: tl.constexpr, BDV: tl.constexpr, BF: tl.constexpr, BT: tl.constexpr,
                  LINEAR: tl.constexpr, CUR_LIN: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
                  NF: tl.constexpr, PREFIX: tl.constexpr, ZDOT: tl.constexpr, ZSPLIT: tl.constexpr,
                  KS: tl.constexpr, SCALE: tl.constexpr, ST: tl.constexpr = False):
    """``_bwd_rev_kernel``'s dk_feat part ``part``: dk_feat's columns ff, the local weights da over all Dv against
    phi(q)'s columns. ST: the state block is held as S^T [Dv, F / NF], updated by dA^T phi(q) (phi(q)'s rows times
    1 / Zd under SCALE, the dot's B operand) and read by v S^T without a transpose."""
    b = pid_bh // H
    h = pid_bh % H
    qfp = _head(QF, b, h, sfb, sfh)
    dap = _head(DA, b, h, sab, sah)
    vp = _head(V, b, h // G, svb, svh)
    rowp = pid_bh.to(tl.int64) * T
    ff = part * (BF // NF) + tl.arange(0, BF // NF)
    vv = tl.arange(0, BDV)
    S, z = _rev_carry_in(TOT, ZTOT, pid_bh, seg * KS, NTOT, ff, vv, BF, BDV, PREFIX)
    if ST:
        S = tl.trans(S)
    if ZDOT:  # z in every row of a dot accumulator (REV_ZDOT)
        zb = tl.zeros([BT, BF // NF], dtype=tl.float32) + z[None, :]
    for t in range(seg * L, tl.minimum(seg * L + L, NT)):
        j = (NT - 1 - t) * BT + tl.arange(0, BT)
        n = j + BT
        v = _load_tile(vp, j, vv, T, DV, svt)
        qf = _load_tile(qfp, n, ff, T, F, sft)
        da = _load_tile(dap, n, vv, T, DV, sat)
        rb = _load_row(RB + rowp, n, T, 0.0)
        inv = 1.0 / _load_row(ZD + rowp, n, T, 1.0) if SCALE else None
        St = S.to(DT) if ST else tl.trans(S.to(DT))
        if ZDOT:
            dkf = tl.dot(v, St, input_precision=PREC) + zb
        else:
            dkf = tl.dot(v, St, input_precision=PREC) + z[None, :]
        qs = _rows_over_zd(qf, inv, DT, SCALE, ST)
        dkf = _rev_dkf_scaled(qs, da, rb, inv, v, n, j, T, window, dkf, LINEAR, DT, PREC, SCALE, ST)
        if CUR_LIN:
            inv_j = 1.0 / _load_row(ZD + rowp, j, T, 1.0) if SCALE else None
            dkf = _rev_dkf_scaled(_rows_over_zd(_load_tile(qfp, j, ff, T, F, sft), inv_j, DT, SCALE, ST),
                                  _load_tile(dap, j, vv, T, DV, sat), _load_row(RB + rowp, j, T, 0.0), inv_j, v, j, j,
                                  T, window, dkf, LINEAR, DT, PREC, SCALE, ST)
        _store_tile(_head(DKF, b, h, sfb, sfh), dkf, j, ff, T, F, sft)
        if ZDOT:
            zb = _row_sum_dot(rb, qf, zb, BT, DT, PREC, ZSPLIT)
        else:
            z += tl.sum(qf.to(tl.float32) * rb[:, None], axis=0)
        if ST:  # (qs: phi(q) over Zd under SCALE, the local term's tile)
            S = tl.dot(tl.trans(da), qs, S, input_precision=PREC)
        else:
            S = _rev_state_add(S, qf, da, inv, BT, DT, PREC, SCALE)


# --------------------------------------------------------------------------------------------------------------
# host side


def _p2(x: int) -> int:
    """Block size of a head dim: the next power of two, at least 16 (triton.next_power_of_2 costs microseconds)."""
    return max(16, 1 << (x - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _dot_dtype(dtype: torch.dtype):
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}[dtype]


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _options(name: str, big: bool, dtype: torch.dtype) -> dict:
    if not big:
        warps, stages = 4, 1
    elif dtype == torch.float32:
        warps, stages = LAUNCH_FP32
    else:
        warps, stages = LAUNCH[name]
        if MAXNREG.get(name):
            return dict(num_warps=warps, num_stages=stages, maxnreg=MAXNREG[name])
    return dict(num_warps=warps, num_stages=stages)


def supported(q, k, v, q_feat, k_feat, *, window: int, softmax: bool, linear: str) -> str | None:
    """None when the Triton path handles these inputs, else the reason it does not."""
    if not q.is_cuda and not _interpreting():
        return "inputs are not on a CUDA device"
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"dtype {q.dtype} is not supported"
    if k.dtype != q.dtype or v.dtype != q.dtype:
        return f"q, k, v have different dtypes ({q.dtype}, {k.dtype}, {v.dtype})"
    if (softmax or linear == "outside") and window > BT:
        return f"window {window} > chunk size {BT}"
    D, Dv = q.shape[-1], v.shape[-1]
    F = q_feat.shape[-1] if linear != "none" else 16
    if max(D, Dv, F) > 256:
        return f"head dims (D={D}, Dv={Dv}, F={F}) above 256"
    return None


def _interpreting() -> bool:
    return INTERPRETED


def _c(x):
    """x with its last dim contiguous; a copy is detached (an input's copy is made for the kernels, outside autograd's
    graph: the op's Function takes the inputs themselves)."""
    return x if x.stride(-1) == 1 else x.detach().contiguous()


def _state_tiles(F: int, Dv: int, side: bool = False) -> tuple[int, int, int, int]:
    """(BF, BDV, BK, BV): the padded head dims and the state tile of one state-pass program (side: of the backward's
    passes when they go to the side stream, SIDE_STATE_BLOCKS)."""
    BF, BDV = _p2(F), _p2(Dv)
    bf, bv = SIDE_STATE_BLOCKS if side and SIDE_STATE_BLOCKS else (STATE_BF, STATE_BV)
    return BF, BDV, min(bf, BF), min(bv, BDV)


def _state_meta(F: int, Dv: int, dtype: torch.dtype, big: bool, reverse: bool, side: bool = False,
                wide: bool = False) -> dict:
    """Constexprs and launch options shared by every state-pass launch in one direction (wide: the launch has more
    programs than the device has SMs, ``_wide``)."""
    BF, BDV, BK, BV = _state_tiles(F, Dv, side)
    name = "side_state" if side and SIDE_STATE_BLOCKS else ("state_wide" if wide else "state")
    return dict(F=F, DV=Dv, BF=BF, BDV=BDV, BK=BK, BV=BV, BT=BT, DT=_dot_dtype(dtype), PREC=_prec(dtype),
                Z_DOT=STATE_Z_DOT, ZPREC="ieee" if dtype == torch.float32 else "tf32x3", SC=_stride(reverse),
                **_options(name, big, dtype))


def _wide(programs: int, device: torch.device) -> bool:
    """Whether a launch of ``programs`` programs outnumbers the SMs of ``device`` (never off CUDA). Asked only when a
    launch is bound (recorded into a plan, or LAUNCH_PLANS off), not on a plan's replay."""
    return device.type == "cuda" and programs > torch.cuda.get_device_properties(device).multi_processor_count


def _n_states(T: int, reverse: bool) -> int:
    """Number of stored states (= steps of the state pass) of a sequence of T tokens: ceil(NT / SC)."""
    return _cdiv(_cdiv(T, BT), _stride(reverse))


def _stride(reverse: bool) -> int:
    """Chunks per stored state of the forward (reverse=False) or the reverse state pass."""
    sc = REV_STATE_STRIDE if reverse else STATE_STRIDE
    if sc < 1 or sc & (sc - 1):
        raise ValueError(f"{'REV_' if reverse else ''}STATE_STRIDE must be a power of two, got {sc}")
    return sc


@functools.lru_cache(maxsize=256)
def _state_geometry(T: int, F: int, Dv: int, reverse: bool, side: bool) -> tuple[int, int, int, int, int, int]:
    """(NS, BF, BDV, blocks, L, nseg) of a state pass over T tokens: its stored states (``_n_states``), padded head
    dims, state tiles a head, steps a segment (STATE_SEG, or the whole scan) and segments. Cached (a forward asks for
    it on the way to its first launch); assigning a setting of the module clears the cache (``_SettingsModule``)."""
    NS = _n_states(T, reverse)
    BF, BDV, BK, BV = _state_tiles(F, Dv, side)
    L = STATE_SEG if STATE_SEG > 0 else NS
    return NS, BF, BDV, (BF // BK) * (BDV // BV), L, _cdiv(NS, L)


def chunk_states(x, y, rb, *, heads_per_y: int, reverse: bool, dtype: torch.dtype, big: bool, launch=direct,
                 side: bool = False, rs=None):
    """The states of the linear terms, one per SC chunks (STATE_STRIDE, or REV_STATE_STRIDE in reverse), from the
    state pass.

    x: [B, T, H, F]; y: [B, T, H / heads_per_y, Dv]; rb: [B*H, T] fp32 row weights of z or None (= 1); rs: [B*H, T]
    fp32 row divisors of the state (x_t / rs_t in place of x_t in hs, not in zs) or None (= 1).
    Forward (reverse=False): hs[bh, p] = sum_{t in chunks <= SC p - 2} x_t^T y_t, zs[bh, p] = sum x_t rb_t;
    reverse: the same over chunks >= SC p + SC + 1.
    Returns hs [B*H, NS, BF, BDV] in ``dtype`` (zero padded to powers of two) and zs [B*H, NS, BF] fp32,
    NS = ceil(NT / SC).
    ``launch``: the op call's launch function (kernels/launch.py). ``side``: a backward pass meant for the side stream
    (its tiles are SIDE_STATE_BLOCKS).
    """
    B, T, H, F = x.shape
    Dv = y.shape[-1]
    NS, BF, BDV, blocks, L, nseg = _state_geometry(T, F, Dv, reverse, side)
    hs = torch.empty(B * H, NS, BF, BDV, device=x.device, dtype=dtype)
    zs = torch.empty(B * H, NS, BF, device=x.device, dtype=torch.float32)
    has_rb, has_rs = rb is not None, rs is not None
    rb = zs if rb is None else rb  # dummies, never read
    rs = zs if rs is None else rs

    def rest(phase):  # the arguments after the tensors, bound only when the launch is not replayed
        return lambda: (
            (x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1), y.stride(2),
             T, H, heads_per_y, NS, L, max(nseg - 1, 1)),
            dict(_state_meta(F, Dv, dtype, big, reverse, side, _wide(blocks * B * H * nseg, x.device)),
                 REVERSE=reverse, HAS_RB=has_rb, PHASE=phase, HAS_RS=has_rs),
        )

    if nseg == 1:
        launch(_chunk_state_kernel, (blocks, B * H, 1), (x, y, rb, rs, hs, zs, zs, zs), rest(0))
        return hs, zs
    # two levels: the totals of segments 0 .. nseg-2 (the last one's is never needed), then every segment's
    # states from the sum of the totals before it
    tot = torch.empty(B * H, nseg - 1, BF, BDV, device=x.device, dtype=torch.float32)
    ztot = torch.empty(B * H, nseg - 1, BF, device=x.device, dtype=torch.float32)
    for phase, n in ((1, nseg - 1), (2, nseg)):
        launch(_chunk_state_kernel, (blocks, B * H, n), (x, y, rb, rs, hs, zs, tot, ztot), rest(phase))
    return hs, zs


def _rev_segments(T: int, BH: int) -> tuple[int, int]:
    """(steps per segment, segments) of REV_LIN's reverse scan over the NT key chunks of T tokens for B * H = ``BH``
    heads (REV_SEG, or REV_SEG_LONG's length from its number of chunks, halved down to REV_SEG while the segments
    of all heads are fewer than REV_MIN_SEGMENTS)."""
    NT = _cdiv(T, BT)
    seg = REV_SEG
    if REV_SEG_LONG and NT >= REV_SEG_LONG[0]:
        seg = REV_SEG_LONG[1]
        while seg // 2 >= REV_SEG and _cdiv(NT, seg) * BH < REV_MIN_SEGMENTS:
            seg //= 2
    L = max(1, min(seg, NT))
    return L, _cdiv(NT, L)


def _rev_zdot(dtype: torch.dtype, cols: int) -> bool:
    """Whether the reverse scan's dk_feat parts of ``cols`` columns take z by dots (REV_ZDOT, REV_ZDOT_MIN_COLS)."""
    return bool(REV_ZDOT and (dtype == torch.float32 or cols >= REV_ZDOT_MIN_COLS))


def _rev_zsplit(dtype: torch.dtype) -> bool:
    """Whether z's dots split the row weights in a high and a low part (``_row_sum_dot``): always but in bf16 under
    REV_ZDOT_BF16_ONE (fp16 keeps the split: its range would lose small weights)."""
    return not (REV_ZDOT_BF16_ONE and dtype == torch.bfloat16)


def _delta_parts(NT: int, L: int, BH: int) -> tuple[int, int]:
    """(KS, parts) of DELTA_TOTALS' pass over NT chunks for reverse-scan segments of L chunks and B * H heads: KS
    parts a segment, parts of L / KS chunks down to the first chunk."""
    ks = 1
    while (L % (2 * ks) == 0 and L // (2 * ks) >= DELTA_TOTALS_MIN_CHUNKS
           and _cdiv(NT, L // ks) * BH < DELTA_TOTALS_PROGRAMS):
        ks *= 2
    return ks, _cdiv(NT, L // ks)


def _totals_pass_fits(T: int, BH: int, F: int, Dv: int, rev_lin: bool) -> bool:
    """Whether ``_delta_totals_kernel`` can take the reverse scan's totals: REV_LIN in more than one segment, the whole
    [F, Dv] total in one program."""
    return rev_lin and _rev_segments(T, BH)[1] > 1 and _p2(F) <= 128 and _p2(Dv) <= 128


def _delta_totals_wanted(T: int, BH: int, F: int, Dv: int, rev_lin: bool) -> bool:
    """Whether DELTA_TOTALS applies (``_totals_pass_fits``)."""
    return bool(DELTA_TOTALS and _totals_pass_fits(T, BH, F, Dv, rev_lin))


def _side_da(T: int, BH: int, F: int, Dv: int, rev_lin: bool, delta_q: bool) -> bool:
    """Whether SIDE_DA applies: from SIDE_STREAM_MIN_CHUNKS chunks (as DELTA_Q, whether or not a side stream is
    taken), where the totals pass fits, and not under DELTA_Q."""
    return bool(SIDE_DA and not delta_q and _cdiv(T, BT) >= SIDE_STREAM_MIN_CHUNKS
                and _totals_pass_fits(T, BH, F, Dv, rev_lin))


def _delta_q(lin: int, NT: int, o: torch.Tensor, do: torch.Tensor) -> bool:
    """Whether DELTA_Q applies to this backward: from SIDE_STREAM_MIN_CHUNKS chunks (where the reverse scan's inputs
    go to the side stream; whether or not SIDE_STREAM is on, so that both give the same bits) or without linear
    terms (no delta kernel at all), and o with the strides of do (the query side reads both with one set)."""
    return bool(DELTA_Q and (NT >= SIDE_STREAM_MIN_CHUNKS or not lin) and o.stride() == do.stride())


def delta_totals(o, do, ZD, q_feat, delta, rb, dA, *, dtype: torch.dtype, big: bool, launch=direct,
                 has_delta: bool = True, from_delta: bool = False):
    """DELTA_TOTALS: delta (unless not ``has_delta``), rb and dA into the given buffers, and the reverse scan's totals
    over KS parts a segment; returns (tot, ztot, KS). from_delta (SIDE_DA): delta and rb are written already; only dA
    and the totals, o not read."""
    B, T, H, F = q_feat.shape
    Dv = do.shape[-1]
    NT = _cdiv(T, BT)
    L, nseg = _rev_segments(T, B * H)
    ks, parts = _delta_parts(NT, L, B * H)
    ntot = (nseg - 1) * ks
    BF, BDV = _p2(F), _p2(Dv)
    tot = torch.empty(B * H, ntot, BF, BDV, device=do.device, dtype=torch.float32)
    ztot = torch.empty(B * H, ntot, BF, device=do.device, dtype=torch.float32)
    launch(_delta_totals_kernel, (parts, B * H), (o, do, ZD, q_feat, delta, rb, dA, tot, ztot), lambda: (
        (o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2), q_feat.stride(0),
         q_feat.stride(1), q_feat.stride(2), dA.stride(0), dA.stride(1), dA.stride(2), T, H, NT, L // ks, ntot),
        dict(DV=Dv, F=F, BDV=BDV, BF=BF, BT=BT, DT=_dot_dtype(dtype), PREC=_prec(dtype), HAS_DELTA=has_delta,
             FROM_DELTA=from_delta, **_options("delta_totals", big, dtype)),
    ))  # fmt: skip
    return tot, ztot, ks


def rev_linear_backward(q_feat, k_feat, v, dA, rb, *, G: int, window: int, lin: int, dtype: torch.dtype, big: bool,
                        launch=direct, side: bool = False, totals=None, zd=None):
    """REV_LIN: (dk_feat [B, T, H, F] in the dtype of the features, the linear terms of dv per query head
    [B, T, H, Dv] in the dtype of dA, the segment totals) from the reverse scan in segments; the first segment (the
    last key chunks) starts from zero, every other one from the totals of the segments before it. The caller keeps
    the totals alive until the stream that ran the launches is joined. side: the launches go to the side stream
    (the totals pass then takes the tiles of SIDE_STATE_BLOCKS). totals: (tot, ztot, KS) from ``delta_totals``
    (DELTA_TOTALS), KS totals a segment, in place of the totals pass. zd (REV_SCALE_DO): dA is do, and both passes
    divide by zd (Zd, [B H, T]) themselves."""
    B, T, H, F = q_feat.shape
    Dv = dA.shape[-1]
    NT = _cdiv(T, BT)
    L, nseg = _rev_segments(T, B * H)
    BF, BDV, BK, BV = _state_tiles(F, Dv, side)
    prefix = REV_PREFIX and nseg > 2  # (one or two segments: the sum of the totals before one is one load already)
    if totals is not None:
        tot, ztot, ks = totals
    else:
        ks = 1
        tot = torch.empty(B * H, max(nseg - 1, 1), BF, BDV, device=q_feat.device, dtype=torch.float32)
        ztot = torch.empty(B * H, max(nseg - 1, 1), BF, device=q_feat.device, dtype=torch.float32)
    ntot = tot.shape[1]
    if nseg > 1 and totals is None:  # the totals of segments 0 .. nseg-2 (phase 1 of the state pass, one state per chunk)
        grid = ((BF // BK) * (BDV // BV), B * H, nseg - 1)
        launch(_chunk_state_kernel, grid, (q_feat, dA, rb, rb if zd is None else zd, tot, ztot, tot, ztot), lambda: (
            (q_feat.stride(0), q_feat.stride(1), q_feat.stride(2), dA.stride(0), dA.stride(1), dA.stride(2),
             T, H, 1, NT, L, nseg - 1),
            dict(_state_meta(F, Dv, dtype, big, True, side, _wide(math.prod(grid), q_feat.device)),
                 SC=1, REVERSE=True, HAS_RB=True, PHASE=1, HAS_RS=zd is not None, RS_Y=REV_ST),
        ))  # fmt: skip
    if nseg > 1 and prefix:  # the totals into inclusive prefixes, in place
        for buf, n in ((tot, BF * BDV), (ztot, BF)):
            block = min(1024, _p2(n))
            launch(_prefix_kernel, (_cdiv(n, block), B * H), (buf,), lambda n=n, block=block: (
                (n, ntot), dict(BLOCK=block, num_warps=4, num_stages=1)))
    dkf = torch.empty_like(k_feat)
    dvh = torch.empty_like(dA)
    nv, nf = (REV_SPLIT if BDV // REV_SPLIT >= 16 else 1), (REV_SPLIT if BF // REV_SPLIT >= 16 else 1)
    launch(_bwd_rev_kernel, (nv + nf, nseg, B * H), (q_feat, k_feat, v, dA, rb, tot, ztot, dkf, dvh,
                                                      rb if zd is None else zd), lambda: (
        (v.stride(0), v.stride(1), v.stride(2), q_feat.stride(0), q_feat.stride(1), q_feat.stride(2),
         dA.stride(0), dA.stride(1), dA.stride(2), T, H, G, NT, L, ntot, window),
        dict(DV=Dv, F=F, BDV=BDV, BF=BF, BT=BT, LINEAR=lin, CUR_LIN=_cur_lin(lin, window),
             DT=_dot_dtype(dtype), PREC=_prec(dtype), NV=nv, NF=nf, PREFIX=prefix, ZDOT=_rev_zdot(dtype, BF // nf),
             ZSPLIT=_rev_zsplit(dtype), KS=ks, SCALE=zd is not None, ST=REV_ST,
             **_options("bwd_rev", big, dtype)),
    ))  # fmt: skip
    return dkf, dvh, (tot, ztot)


def _grid(NT: int, B: int, H: int, G: int, *middle: int) -> tuple:
    """Grid of a kernel whose programs take (chunk, batch * head) from ``_chunk_and_head`` (GROUP_HEADS)."""
    if GROUP_HEADS:
        return (NT * G, *middle, B * H // G)
    return (NT, *middle, B * H)


def _cur_lin(lin: int, window: int) -> int:
    """1 when the linear terms of a query chunk's own key chunk can be non-zero (overlap / linear-only, or a hybrid
    with w < BT: keys of the same chunk at distance >= w), 0 when they are all masked (hybrid with w >= BT)."""
    return int(lin == 2 or (lin == 1 and window < BT))


def _ndw(lin: int, window: int) -> int:
    """Slots per query chunk of the blocks of local linear terms (the softmax side's dW, the forward's a): one per
    key chunk with such terms under WINDOW_BLOCKS (the own chunk's only if CUR_LIN), else always two."""
    return 1 + _cur_lin(lin, window) if WINDOW_BLOCKS else 2


def _fwd_blocks(softmax: bool, lin: int, grad: bool) -> tuple[bool, bool]:
    """(FWD_P, FWD_LIN) as a forward applies them: p0's window blocks where there are softmax terms and window blocks,
    the local linear blocks where there are linear terms, both only where a gradient is wanted."""
    return bool(FWD_P and softmax and WINDOW_BLOCKS and grad), bool(FWD_LIN and lin and grad)


def _switches() -> _Switches:
    """The module settings the launches depend on (the benchmark and the tests change them), as one object: part of a
    plan's key. Equal settings give the same object (hashed and compared by identity, so a plan's key costs no hash of
    ~50 settings a call); it is built again only after a setting of the module was assigned (``_SettingsModule``)."""
    sw = _SW
    if sw is None:
        sw = _settle()
    return sw


class _Switches:
    """One set of the module's settings (``values``), made once per distinct set by ``_settle``."""

    __slots__ = ("values",)

    def __init__(self, values: tuple):
        self.values = values

    def __repr__(self):
        return f"_Switches{self.values}"


_SW: _Switches | None = None
_SW_MADE: dict[tuple, _Switches] = {}


def _settle() -> _Switches:
    global _SW
    values = (BT, STATE_BF, STATE_BV, OUT_BV, STATE_SEG, STATE_STRIDE, REV_STATE_STRIDE, GROUP_HEADS, KEEP_STATES,
              STATE_Z_DOT, Q_SPLIT, KV_SPLIT, SAVE_P, SAVE_DW, WINDOW_BLOCKS, FWD_P, FWD_LIN, KF_IN_KV, KF_DV,
              FUSED_FWD, SIDE_STREAM, SIDE_STREAM_MIN_CHUNKS, SIDE_KF, SIDE_STATE_BLOCKS, tuple(LAUNCH.items()),
              LAUNCH_FP32, REV_DO, REV_LIN, REV_SEG, REV_SPLIT, REV_PREFIX, REV_ZDOT, REV_ZDOT_MIN_COLS,
              REV_ZDOT_BF16_ONE, DELTA_TOTALS, DELTA_TOTALS_PROGRAMS, DELTA_TOTALS_MIN_CHUNKS, DELTA_Q, SIDE_DA,
              SIDE_DV, REV_SCALE_DO, REV_ST, SIDE_PRIORITY, SIDE_QLIN, REV_SEG_LONG, REV_MIN_SEGMENTS,
              tuple(MAXNREG.items()))
    sw = _SW_MADE.get(values)
    if sw is None:
        sw = _SW_MADE[values] = _Switches(values)
    _SW = sw
    return sw


def _plan_key(kind: str, *tensors, extra: tuple):
    """Key of the launch plan of one forward / backward call, or None (no plan: interpreter, launch hooks set, an
    input not 16-byte aligned, which Triton would compile another kernel for, inputs on the host and a GPU mixed,
    or torch.compile tracing the op, which needs Triton's own launches to see the kernels)."""
    if INTERPRETED or not LAUNCH_PLANS or _hooked(knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook):
        return None
    if torch.compiler.is_compiling():
        return None
    addr = 0
    cuda = tensors[0].is_cuda
    for t in tensors:
        addr |= t.data_ptr()
        if t.is_cuda is not cuda:  # (Triton's own path raises for a host tensor; a replay would not check it)
            return None
    if addr & 15:
        return None
    # the current device too: the launches go to its stream, with kernels loaded for it
    current = _cuda_device() if cuda else -1
    return (kind, current, tensors[0].device.index, tensors[0].dtype, *[(t.shape, t.stride()) for t in tensors],
            *extra, _switches())


def _hooked(*hooks) -> bool:
    """Whether a launch hook is set: a callable (Triton 3.6) or a non-empty HookChain (later versions)."""
    return any(getattr(h, "calls", h) for h in hooks)


# the current CUDA device and its current raw stream, as torch.cuda.current_device() and Triton's driver read them,
# without their Python wrappers (a replayed launch reads the stream each time); absent from CPU builds of torch,
# where no plan replays
_cuda_device = getattr(torch._C, "_cuda_getDevice", None)
_cuda_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _stream():
    return _cuda_raw_stream(_cuda_device())


class _Side:
    """The side stream of one device (SIDE_STREAM) and the events of a backward call's fork and joins, kept for the
    next calls: a wait takes the event as last recorded before it, so recording it again later is safe."""

    def __init__(self, device: torch.device, priority: int = 0):
        self.stream = torch.cuda.Stream(device, priority=priority)
        self.fork, self.delta, self.states, self.reverse, self.q0, self.kf, self.dv, self.ql = (
            torch.cuda.Event() for _ in range(8))

    def wait_for(self, stream, event):
        """The side stream waits for the work queued on ``stream`` so far (``event`` recorded there)."""
        event.record(stream)
        self.stream.wait_event(event)

    def launch(self, launch):
        """``launch`` with its kernels sent to the side stream; tensors stay allocated on the op's stream."""

        def on_side(fn, grid, tensors, rest):
            with torch.cuda.stream(self.stream):
                return launch(fn, grid, tensors, rest)

        return on_side


_SIDES: dict = {}


def _side_wanted(NT: int, lin: int) -> bool:
    """Whether the settings send this backward's state passes to the side stream (SIDE_STREAM): what the launches
    depend on (SIDE_STATE_BLOCKS), also where no side stream can be taken (torch.compile, graph capture)."""
    return bool(SIDE_STREAM and lin and NT >= SIDE_STREAM_MIN_CHUNKS)


def _side(x: torch.Tensor, wanted: bool) -> _Side | None:
    """The side stream for this backward call, or None (see SIDE_STREAM); ``wanted``: ``_side_wanted``."""
    if not (wanted and x.is_cuda) or INTERPRETED:
        return None
    if torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
        return None
    key = (x.device.index, SIDE_PRIORITY)
    side = _SIDES.get(key)
    if side is None:
        side = _SIDES[key] = _Side(x.device, SIDE_PRIORITY)
    return side


class _Prelude:
    """A forward call's launches (``_prelude``): its inputs as the kernels take them, the launch plan's key and launch
    function, the block sizes, the forward states from the state pass, the output and the blocks kept for the
    backward, all launched."""

    __slots__ = ("q", "k", "v", "q_feat", "k_feat", "gam", "F", "fwd_p", "fwd_lin", "key", "launch", "big", "NT",
                 "fused", "hs", "zs", "o", "M", "ZD", "pb", "arg", "lb")


def _prelude(q, k, v, q_feat, k_feat, gamma, window, softmax, lin, scale, eps, grad) -> _Prelude:
    """The forward's launches: the state pass, then the output kernel. ``hybrid_attention_chunk`` calls it before the
    autograd Function, whose apply (~9 us of host time a call on the 2-core CPU of the tests, for a Function of these
    13 arguments that does nothing) would otherwise stand between the two launches while the GPU runs the state pass,
    and before the first while the GPU waits; the Function's forward then saves what the backward needs. While
    torch.compile traces the op, the Function's forward calls it. Nothing here enters autograd's graph: copies of the
    inputs are detached, the buffers are fresh."""
    B, T, H, D = q.shape
    G = H // k.shape[2]
    Dv = v.shape[-1]
    r = _Prelude()
    r.q, r.k, r.v = _c(q), _c(k), _c(v)
    if lin == 0:  # no features: pass q as a dummy pointer, never read
        r.q_feat, r.k_feat, r.F = r.q, r.q, 16
    else:
        r.q_feat, r.k_feat, r.F = _c(q_feat), _c(k_feat), q_feat.shape[-1]
        assert r.q_feat.stride() == r.k_feat.stride()
    gam = gamma if gamma is not None else torch.ones(H, device=q.device, dtype=torch.float32)
    r.gam = gam.detach().float().contiguous()
    # the blocks the backward reads from the forward (FWD_P, FWD_LIN), only where a gradient is wanted (grad: the
    # caller's grad mode and inputs; ctx.needs_input_grad is set under torch.no_grad too)
    r.fwd_p, r.fwd_lin = _fwd_blocks(softmax, lin, grad)
    r.key = _plan_key("fwd", r.q, r.k, r.v, r.q_feat, r.k_feat, r.gam,
                      extra=(window, softmax, lin, scale, eps, r.fwd_p, r.fwd_lin))
    r.launch = PLANS.start(r.key, _stream)
    r.big = max(D, Dv, r.F) > 64  # (a padded head dim, _p2, of 128 or more)
    r.NT = _cdiv(T, BT)
    r.fused = FUSED_FWD and bool(lin) and STATE_SEG == 0
    r.hs = r.zs = None
    # the state pass first: it needs none of the forward's buffers, and the GPU starts on it while they are allocated
    if lin and not r.fused:
        r.hs, r.zs = chunk_states(r.k_feat, r.v, None, heads_per_y=G, reverse=False, dtype=q.dtype, big=r.big,
                                  launch=r.launch)
    _output(r, B, T, H, D, G, Dv, window, softmax, lin, scale, eps)
    return r


@functools.lru_cache(maxsize=256)
def _output_geometry(B: int, T: int, H: int, G: int, D: int, Dv: int, F: int, lin: int, window: int) -> tuple:
    """(BD, BDV, BF, ndw, BV, grid) of a forward's output kernel: the padded head dims, the slots of the local linear
    blocks (``_ndw``), the Dv block and the grid. Cached like ``_state_geometry``."""
    BD, BDV, BF = _p2(D), _p2(Dv), _p2(F)
    BV = min(OUT_BV, BDV)
    return BD, BDV, BF, _ndw(lin, window), BV, _grid(_cdiv(T, BT), B, H, G, BDV // BV)


def _output(r: _Prelude, B: int, T: int, H: int, D: int, G: int, Dv: int, window, softmax, lin, scale, eps):
    """The forward's output kernel (or the fused forward) launched, its buffers (o, M, ZD, the blocks kept for the
    backward) into ``r``."""
    q, k, v, q_feat_t, k_feat_t, gam, F = r.q, r.k, r.v, r.q_feat, r.k_feat, r.gam, r.F
    fwd_p, fwd_lin, launch = r.fwd_p, r.fwd_lin, r.launch
    big, NT, fused, hs, zs = r.big, r.NT, r.fused, r.hs, r.zs
    Hkv = H // G
    BD, BDV, BF, ndw, BV, grid = _output_geometry(B, T, H, G, D, Dv, F, lin, window)
    dev = q.device
    o = torch.empty(B, T, H, Dv, device=dev, dtype=v.dtype)
    M = torch.empty(B * H, T, device=dev, dtype=torch.float32)
    ZD = torch.empty(B * H, T, device=dev, dtype=torch.float32)
    if not lin:
        hs = zs = M  # dummies when there is no linear term
    # p0's window blocks and the arg maxes for the softmax side and the key side, the local linear blocks for the
    # key side: [BT, BT] blocks in the dtype of q
    pb = torch.empty(B * H, NT, BT, BT, device=dev, dtype=q.dtype) if fwd_p else M
    arg = torch.empty(B * H, T, device=dev, dtype=torch.int32) if fwd_p else M
    lb = torch.empty(B * H, NT, ndw, BT, BT, device=dev, dtype=q.dtype) if fwd_lin else M

    def rest(*scalars, **switches):  # the launch's arguments after the tensors, bound only when it is not
        # replayed (its strides and constexprs took ~20 us of host time a call when they were bound every call)
        strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                   v.stride(0), v.stride(1), v.stride(2), q_feat_t.stride(0), q_feat_t.stride(1),
                   q_feat_t.stride(2), o.stride(0), o.stride(1), o.stride(2))
        meta = dict(D=D, DV=Dv, F=F, BD=BD, BDV=BDV, BF=BF, BV=BV, BT=BT, SOFTMAX=softmax, LINEAR=lin,
                    CUR_LIN=_cur_lin(lin, window), DT=_dot_dtype(q.dtype), PREC=_prec(q.dtype),
                    SC=_stride(False), WIN=WINDOW_BLOCKS, FWD_P=fwd_p, FWD_LIN=fwd_lin, NDW=ndw)
        return (*strides, T, H, G, NT, window, scale, eps, *scalars), dict(meta, **switches)

    if fused:  # the state pass and the output programs in one launch, the latter waiting on READY
        NS = _n_states(T, False)
        _, _, BK, BVS = _state_tiles(F, Dv)
        nkv = (BF // BK) * (BDV // BVS)
        hs = torch.empty(B * H, NS, BF, BDV, device=dev, dtype=q.dtype)
        zs = torch.empty(B * H, NS, BF, device=dev, dtype=torch.float32)
        ready = torch.zeros(B * H * NS + 1, device=dev, dtype=torch.int32)  # per-state counts, then the ticket
        options = _options("fwd_fused", big, q.dtype)
        launch(_fwd_fused_kernel, (nkv * B * H + NT * (BDV // BV) * B * H,),
               (q, k, v, q_feat_t, k_feat_t, gam, hs, zs, o, M, ZD, ready, pb, arg, lb), lambda: rest(
            nkv * B * H, nkv, BDV // BV, B * Hkv, SBK=BK, SBV=BVS, Z_DOT=STATE_Z_DOT,
            ZPREC="ieee" if q.dtype == torch.float32 else "tf32x3", NTHREADS=32 * options["num_warps"], **options,
        ))  # fmt: skip
    else:
        launch(_fwd_kernel, grid, (q, k, v, q_feat_t, k_feat_t, gam, hs, zs, o, M, ZD, pb, arg, lb),
               lambda: rest(GROUP=GROUP_HEADS, **_options("fwd", big, q.dtype)))
    launch.done()
    r.o, r.M, r.ZD, r.hs, r.zs, r.pb, r.arg, r.lb = o, M, ZD, hs, zs, pb, arg, lb


class HybridAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, q_feat, k_feat, gamma, window, softmax, linear, scale, eps, grad, pre=None):
        lin = _LINEAR_CODE[linear]
        if pre is None:  # (torch.compile: the whole forward traced inside the Function)
            pre = _prelude(q, k, v, q_feat, k_feat, gamma, window, softmax, lin, scale, eps, grad)
        fwd_p, fwd_lin = pre.fwd_p, pre.fwd_lin
        # unless KEEP_STATES the states are recomputed in the backward: [NT / SC, F, Dv] per head is 2 / SC times
        # the size of q
        saved = (pre.hs, pre.zs) if lin and KEEP_STATES else ()
        blocks = ((pre.pb, pre.arg) if fwd_p else ()) + ((pre.lb,) if fwd_lin else ())
        ctx.save_for_backward(pre.q, pre.k, pre.v, pre.q_feat, pre.k_feat, pre.gam, pre.o, pre.M, pre.ZD, *saved,
                              *blocks)
        ctx.cfg = (window, softmax, lin, scale, pre.NT, pre.F, gamma is not None, pre.key, len(saved), fwd_p, fwd_lin)
        ctx.gamma_dtype = None if gamma is None else gamma.dtype
        return pre.o

    @staticmethod
    def backward(ctx, do):
        q, k, v, q_feat, k_feat, gam, o, M, ZD, *rest = ctx.saved_tensors
        window, softmax, lin, scale, NT, F, has_gamma, fkey, n_kept, fwd_p, fwd_lin = ctx.cfg
        kept, rest = rest[:n_kept], rest[n_kept:]
        pb, arg = rest[:2] if fwd_p else (M, M)  # (dummies, never read)
        lb = rest[-1] if fwd_lin else M
        B, T, H, D = q.shape
        Hkv, Dv = k.shape[2], v.shape[-1]
        G = H // Hkv
        do = _c(do)
        # the forward's key covers every saved input; o and the buffers below are fresh (aligned) allocations
        key = None if fkey is None else _plan_key("bwd", do, extra=(fkey,))
        launch = PLANS.start(key, _stream)
        BD, BDV, BF = _p2(D), _p2(Dv), _p2(F)
        big = max(BD, BDV, BF) >= 128
        DT, PREC = _dot_dtype(q.dtype), _prec(q.dtype)
        cur_lin = _cur_lin(lin, window)
        dev = q.device
        # the state passes go to a side stream, beside the delta kernel and the softmax side of the query side
        side_wanted = _side_wanted(NT, lin)
        side = _side(q, side_wanted)
        main = torch.cuda.current_stream(dev) if side else None
        state_launch = side.launch(launch) if side else launch
        marks = None if side is None or STREAM_PROBE is None else {
            name: torch.cuda.Event(enable_timing=True) for name in ("fork", "side", "main", "end")}
        if side:  # the side stream starts after everything queued so far (do, the saved tensors)
            side.wait_for(main, side.fork)
            if marks:
                marks["fork"].record(main)
        delta = torch.empty(B * H, T, device=dev, dtype=torch.float32)
        rb = torch.empty_like(delta)
        rev_lin = REV_LIN and bool(lin)  # the key side's linear terms in the reverse scan
        # dA = do / Zd for the reverse pass, unless it scales phi(q) itself (REV_DO); do is the dummy without it
        has_da = bool(lin) and (rev_lin or not REV_DO)
        delta_q = _delta_q(lin, NT, o, do)
        # SIDE_DA: the delta kernel writes delta and rb; dA and the totals come from a pass on the side stream
        side_da = _side_da(T, B * H, F, Dv, rev_lin, delta_q)
        # REV_SCALE_DO: the reverse scan and its totals divide do by Zd themselves: no dA
        # DELTA_TOTALS: delta and the reverse scan's totals in one pass (SIDE_DA's pass on the side stream instead)
        merged_totals = _delta_totals_wanted(T, B * H, F, Dv, rev_lin) and not side_da
        rev_scale = bool(REV_SCALE_DO and rev_lin and not delta_q and not side_da and not merged_totals)
        has_da = has_da and not rev_scale
        dA = torch.empty(B, T, H, Dv, device=dev, dtype=do.dtype) if has_da else do
        hs = zs = dhs = dzs = M  # dummies when there is no linear term
        if lin and not kept:  # (before delta: it needs none of the backward's buffers)
            hs, zs = chunk_states(k_feat, v, None, heads_per_y=G, reverse=False, dtype=q.dtype, big=big,
                                  launch=state_launch, side=side_wanted)
            if side:
                side.states.record(side.stream)
        elif lin:
            hs, zs = kept
        totals = None
        # DELTA_Q: the query side's first launch computes delta; rb and dA for the reverse scan on the side stream
        delta_launch = state_launch if delta_q else launch
        if merged_totals:
            totals = delta_totals(o, do, ZD, q_feat, delta, rb, dA, dtype=q.dtype, big=big, launch=delta_launch,
                                  has_delta=not delta_q)
        elif lin or not delta_q:  # (dA bound as a default: the name is deleted below, before the gradient buffers)
            delta_launch(_delta_kernel, (NT, B * H), (o, do, ZD, delta, rb, dA), lambda dA=dA: (
                (o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2),
                 dA.stride(0), dA.stride(1), dA.stride(2), T, H),
                dict(DV=Dv, BDV=BDV, BT=BT, HAS_DA=has_da and not side_da, HAS_DELTA=not delta_q,
                     **_options("delta", big, q.dtype)),
            ))  # fmt: skip
        if lin:
            if side and not delta_q:  # (with DELTA_Q the side stream ran the delta kernel itself)
                side.wait_for(main, side.delta)
            if side_da:
                totals = delta_totals(o, do, ZD, q_feat, delta, rb, dA, dtype=q.dtype, big=big, launch=state_launch,
                                      has_delta=False, from_delta=True)
            if rev_lin:  # dk_feat and dv's linear terms per query head, no reverse states in memory
                dkf, dvh, rev_totals = rev_linear_backward(q_feat, k_feat, v, dA, rb, G=G, window=window, lin=lin,
                                                        dtype=q.dtype, big=big, launch=state_launch,
                                                        side=side_wanted, totals=totals, zd=ZD if rev_scale else None)
            else:  # queries of chunks >= i+2: dh[i] = sum phi(q)^T dA, dz[i] = sum phi(q) dZ
                dhs, dzs = chunk_states(q_feat, dA, rb, heads_per_y=1, reverse=True, dtype=q.dtype, big=big,
                                        launch=state_launch, side=side_wanted, rs=ZD if REV_DO else None)
            if side:
                side.reverse.record(side.stream)
                if marks:
                    marks["side"].record(side.stream)
                dA.record_stream(side.stream)  # read there: not reused before the reverse pass is done
        del dA  # before the gradient buffers: it is not alive at their peak
        dq = torch.empty_like(q)  # every buffer below is written in full by the kernels of the terms that use it
        dqf = torch.empty_like(q_feat) if lin else q
        if not rev_lin:
            dkf = torch.empty_like(k_feat) if lin else q
        # k / v are contiguous (_c), so dk / dv share their strides
        dk = torch.empty_like(k)
        dv = torch.empty_like(v)
        dg = torch.empty(B * H, NT, device=dev, dtype=torch.float32)
        dg_sum = has_gamma and softmax
        dgs = torch.empty(B * H, device=dev, dtype=torch.float32) if dg_sum else dg  # (a dummy without dgamma)
        # the query side's softmax weights gamma p0 and score gradients ds for the key side, in the dtype of q: two
        # [BT, BT] blocks per query chunk (the size of q at D = 2 BT), or one window block (WINDOW_BLOCKS); the local
        # linear terms' dW: one block per query chunk, two if CUR_LIN
        ps = ds = dwl = dg  # dummies, never read
        save_dw = SAVE_DW and softmax and bool(lin)
        # (two slots unless the window blocks are on: the pointers of all three buffers then share their offsets,
        # which the softmax side's registers need: ptxas, 112 B of spills a thread against 124 with one slot)
        ndw = _ndw(lin, window)
        if softmax:
            ds = torch.empty(B * H, NT, *(() if WINDOW_BLOCKS else (2,)), BT, BT, device=dev, dtype=q.dtype)
            ps = pb if fwd_p else torch.empty_like(ds) if SAVE_P else ps
            dwl = torch.empty(B * H, NT, ndw, BT, BT, device=dev, dtype=q.dtype) if save_dw else dwl

        def strides():  # of q, k, v, the features and do; bwd_kf takes the last three
            return (
                q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                v.stride(0), v.stride(1), v.stride(2), q_feat.stride(0), q_feat.stride(1), q_feat.stride(2),
                do.stride(0), do.stride(1), do.stride(2),
            )

        def rest(options: str, sc: int, **switches):  # the arguments of _bwd_q_kernel / _bwd_kv_kernel after the
            # tensors; sc: the stride of the states the kernel reads (forward ones on the query side, reverse ones on
            # the key side)
            return lambda: ((*strides(), T, H, G, NT, window, scale), dict(
                dict(D=D, DV=Dv, F=F, BD=BD, BDV=BDV, BF=BF, BT=BT, SOFTMAX=softmax, LINEAR=lin, CUR_LIN=cur_lin,
                     DT=DT, PREC=PREC, SC=sc), **switches, **_options(options, big, q.dtype)))

        group = dict(GROUP=GROUP_HEADS)
        kf_dv = KF_DV and bool(lin) and not rev_lin  # dk_feat and dv's linear terms in one kernel, per kv head
        kf_in_kv = KF_IN_KV and bool(lin) and not kf_dv and not rev_lin  # dk_feat in the key side's dv pass
        side_kf = SIDE_KF and lin and not kf_in_kv and not kf_dv and not rev_lin
        # KF_DV: dv's linear terms, fp32, for the key side's dv pass to start from (dv itself without softmax terms)
        dvl = torch.empty(B, T, Hkv, Dv, device=dev, dtype=torch.float32) if kf_dv and softmax else dv
        if rev_lin:  # (REV_LIN: the per-head linear terms of dv, which the key side sums)
            dvl = dvh

        def kf(launch):  # dk_feat, from the reverse states
            launch(_bwd_kf_kernel, _grid(NT, B, H, G), (q_feat, v, do, ZD, delta, dhs, dzs, dwl, dkf), lambda: (
                (*strides()[6:], T, H, G, NT, window),
                dict(DV=Dv, F=F, BDV=BDV, BF=BF, BT=BT, LINEAR=lin, CUR_LIN=cur_lin, DT=DT, PREC=PREC, SC=_stride(True),
                     **group, SAVE_DW=save_dw, NDW=ndw, **_options("bwd_kf", big, q.dtype)),
            ))  # fmt: skip

        # the key side reads the query side's blocks: its launches go after the query side's (SIDE_DV's dv pass after
        # the first). KV_SPLIT: dk, then dv; the dk pass reads only the query side's blocks, so it goes before the
        # main stream waits for the side stream's reverse pass and runs beside it (unless KF_DV, whose kernel reads
        # the reverse states and goes first)
        kv_split = KV_SPLIT and softmax
        kv_parts = [dict(DO_DV=False, DO_DK=True), dict(DO_DV=True, DO_DK=False)] if kv_split else [{}]
        if kf_dv and not softmax:  # _bwd_kfdv_kernel writes dv: nothing is left for the key side
            kv_parts = []
        early = kv_parts[:1] if kv_split and not kf_dv else []
        # SIDE_DV: the dv pass on the side stream after the reverse scan (whose terms of dv it adds), beside the query
        # side and the dk pass; from SIDE_STREAM_MIN_CHUNKS chunks, where the launch order is the same on one stream
        side_dv = bool(SIDE_DV and kv_split and rev_lin and not kf_dv and NT >= SIDE_STREAM_MIN_CHUNKS)
        # (its only input from the query side: gamma p0 under SAVE_P without FWD_P; otherwise it goes before the query
        # side, right after the reverse scan on the side stream)
        dv_after_q0 = side_dv and SAVE_P and not fwd_p
        # (KF_DV, REV_LIN: the dv pass has no linear terms left)
        kv_lin = dict(LINEAR=0, CUR_LIN=0, FWD_LIN=False) if kf_dv or rev_lin else dict(FWD_LIN=fwd_lin)

        def kv(part, launch=launch):
            launch(_bwd_kv_kernel, (NT, B * Hkv),
                   (q, k, v, q_feat, k_feat, gam, do, M, ZD, delta, ps, ds, dwl, dhs, dzs, dk, dv, dkf, dg, dgs, lb,
                    dvl),
                   rest("bwd_kv", _stride(True), **part, SAVE_P=SAVE_P, WIN=WINDOW_BLOCKS,
                        WITH_KF=kf_in_kv and part.get("DO_DV", True), SAVE_DW=save_dw, NDW=ndw, DG_SUM=dg_sum,
                        FWD_P=fwd_p, DV_INIT=kf_dv and part.get("DO_DV", True),
                        DVL_HEADS=rev_lin and part.get("DO_DV", True), **kv_lin))

        # the softmax side first: it needs no state, and runs beside the state passes on the side stream
        if Q_SPLIT and softmax and lin:
            q_parts = [dict(DO_LIN=False, DO_SM=True), dict(DO_LIN=True, DO_SM=False)]
        else:
            q_parts = [{}]

        # SIDE_QLIN: the linear launch on the side stream, after the softmax launch
        side_qlin = bool(SIDE_QLIN and len(q_parts) == 2 and not side_dv and not side_kf
                         and NT >= SIDE_STREAM_MIN_CHUNKS)

        def side_dv_launch(after_q0: bool):  # SIDE_DV's dv pass, on the side stream where one is taken
            if side and after_q0:
                side.wait_for(main, side.q0)
            kv(kv_parts[-1], state_launch)
            if side:
                side.dv.record(side.stream)

        for i, part in enumerate(q_parts):
            if side_dv and not dv_after_q0 and i == 0:
                side_dv_launch(False)
            q_launch = launch
            if side_qlin and i == 1:
                q_launch = state_launch
                if side:
                    side.wait_for(main, side.q0)
                    hs.record_stream(side.stream)  # (read there after this function lets go of them)
                    zs.record_stream(side.stream)
            elif side and not kept and part.get("DO_LIN", True):
                main.wait_event(side.states)
            q_launch(_bwd_q_kernel, _grid(NT, B, H, G),
                   (q, k, v, q_feat, k_feat, gam, do, M, ZD, delta, hs, zs, dq, dqf, ps, ds, dwl, dg, arg, o),
                   rest("bwd_q", _stride(False), **part, **group, SAVE_P=SAVE_P, SAVE_DW=save_dw,
                        WIN=WINDOW_BLOCKS, NDW=ndw, FWD_P=fwd_p, DELTA_Q=delta_q and i == 0))
            if side_qlin and i == 1 and side:
                side.ql.record(side.stream)
            # SIDE_KF: once the first query-side launch has stored its dW blocks, on the side stream after the
            # reverse states (the launch order depends on the settings alone, not on whether this call has a side
            # stream: a launch plan replays it)
            if side_kf and i == 0:
                if side:
                    side.wait_for(main, side.q0)
                kf(state_launch)
                if side:
                    side.kf.record(side.stream)
            if dv_after_q0 and i == 0:
                side_dv_launch(True)
        del hs, zs, kept
        for part in early:
            kv(part)
        if side:
            if marks:
                marks["main"].record(main)
            main.wait_event(side.dv if side_dv else side.reverse)  # (SIDE_DV: the join)
        if kf_dv:  # before the key side's dv pass, which starts from dvl
            launch(_bwd_kfdv_kernel, (NT, B * Hkv), (q_feat, k_feat, v, do, ZD, delta, dhs, dzs, dwl, dkf, dvl),
                   lambda: ((*strides()[6:], T, H, G, NT, window), dict(
                       DV=Dv, F=F, BDV=BDV, BF=BF, BT=BT, LINEAR=lin, CUR_LIN=cur_lin, DT=DT, PREC=PREC,
                       SC=_stride(True), SAVE_DW=save_dw, NDW=ndw, **_options("bwd_kfdv", big, q.dtype))))
        for part in kv_parts[len(early):len(kv_parts) - side_dv]:
            kv(part)
        if lin and not side_kf and not kf_in_kv and not kf_dv and not rev_lin:
            kf(launch)
        elif side and side_kf:
            main.wait_event(side.kf)  # the join: every tensor the side stream used outlives this point
        if side and side_qlin:
            main.wait_event(side.ql)  # the join (SIDE_QLIN)
        if marks:
            marks["end"].record(main)
            STREAM_PROBE.append(marks)
        launch.done()
        # terms absent from the function get None, as autograd gives for unused inputs of the reference
        dgamma = (dgs.view(B, H).sum(0) if B > 1 else dgs) if dg_sum else None
        if dgamma is not None and dgamma.dtype != ctx.gamma_dtype:
            dgamma = dgamma.to(ctx.gamma_dtype)
        if not softmax:
            dq = dk = None
        dqf_out, dkf_out = (dqf, dkf) if lin else (None, None)
        return dq, dk, dv, dqf_out, dkf_out, dgamma, None, None, None, None, None, None, None


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
        q_feat = q_feat if q_feat.dtype == q.dtype else q_feat.to(q.dtype)
        k_feat = k_feat if k_feat.dtype == q.dtype else k_feat.to(q.dtype)
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad or (
        q_feat is not None and (q_feat.requires_grad or k_feat.requires_grad)) or (
        gamma is not None and gamma.requires_grad))
    pre = None
    if not torch.compiler.is_compiling():  # both launches before the autograd Function's overhead
        pre = _prelude(q, k, v, q_feat, k_feat, gamma, window, softmax, _LINEAR_CODE[linear], scale, eps, grad)
    return HybridAttentionFunction.apply(q, k, v, q_feat, k_feat, gamma, window, softmax, linear, scale, eps, grad,
                                         pre)


class _SettingsModule(types.ModuleType):
    """This module's class: assigning any of its names (``chunk.REV_SEG = 128``, monkeypatch, the benchmark's
    variants) drops the cached settings object of the plan keys (``_switches``) and the geometry caches built from
    the settings (``_state_geometry``, ``_output_geometry``). LAUNCH and MAXNREG are read-only mappings, so that a
    setting cannot change in place unseen: assign a new dict (kept as a read-only copy)."""

    def __setattr__(self, name, value):
        if name in ("LAUNCH", "MAXNREG") and isinstance(value, dict):
            value = types.MappingProxyType(dict(value))
        super().__setattr__(name, value)
        if name != "_SW":
            super().__setattr__("_SW", None)
            _state_geometry.cache_clear()
            _output_geometry.cache_clear()


sys.modules[__name__].__class__ = _SettingsModule
