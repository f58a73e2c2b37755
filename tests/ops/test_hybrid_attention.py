"""Hybrid attention: chunked PyTorch reference and Triton kernels against the quadratic naive reference.

Outputs and every gradient (q, k, v, q_feat, k_feat, gamma) on random non-zero inputs. Three tiers:
- chunked torch vs naive on CPU (fast);
- Triton under TRITON_INTERPRET=1 on CPU at small shapes (the env var is set before this module imports the
  kernels; on a machine with CUDA these skip, the GPU tier covers the same code compiled);
- Triton on CUDA (``-m gpu``), bf16 and fp32, T in {63, 500, 1000, 4096}.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import load_triton_module

from linearize.kernels.hybrid_attention import hybrid_attention, hybrid_attention_chunked, hybrid_attention_naive

from ._testing import assert_close

CUDA = torch.cuda.is_available()
MODES = {  # name -> (softmax, linear)
    "hybrid": (True, "outside"),
    "overlap": (True, "all"),
    "la_only": (False, "all"),
    "swa_only": (True, "none"),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
GRAD_NAMES = ("dq", "dk", "dv", "dq_feat", "dk_feat", "dgamma")





chunk = load_triton_module("chunk", interpret=not CUDA)


def make_inputs(B, T, H, KV, D, F, dtype, device="cpu", seed=0, gamma=True):
    """Random q, k, v (normal), Hedgehog-like features (positive, rows sum to 1), gamma in (0.1, 0.9), do."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    q, k, v = rand(B, T, H, D), rand(B, T, KV, D), rand(B, T, KV, D)
    qf, kf = rand(B, T, H, F).softmax(-1), rand(B, T, H, F).softmax(-1)
    gam = 0.1 + 0.8 * torch.rand(H, generator=g) if gamma else None
    do = rand(B, T, H, D)
    inputs = [x.to(device=device, dtype=dtype).requires_grad_() for x in (q, k, v, qf, kf)]
    inputs.append(None if gam is None else gam.to(device).requires_grad_())
    return inputs, do.to(device=device, dtype=dtype)


def run(fn, inputs, do, **kw):
    out = fn(*inputs, **kw)
    leaves = [x for x in inputs if x is not None]
    grads = iter(torch.autograd.grad(out, leaves, do, allow_unused=True))
    return out, [None if x is None else next(grads) for x in inputs]


def assert_same_bits(out, grads, ref_out, ref_grads):
    """Two runs of the op gave bit-identical outputs and gradients (None where the reference has None)."""
    assert torch.equal(out, ref_out)
    for name, g, ref in zip(GRAD_NAMES, grads, ref_grads):
        assert (g is None) == (ref is None) and (g is None or torch.equal(g, ref)), name


def record_results(monkeypatch, name: str) -> list:
    """Wrap chunk.<name> so that each call's result is appended to the returned list (and still returned)."""
    results, real = [], getattr(chunk, name)
    monkeypatch.setattr(chunk, name, lambda *a: results.append(real(*a)) or results[-1])
    return results


def check_against_naive(fn, inputs, do, dtype, label, **kw):
    ref_inputs = [None if x is None else x.detach().float().requires_grad_() for x in inputs]
    ref_out, ref_grads = run(hybrid_attention_naive, ref_inputs, do.float(), **kw)
    out, grads = run(fn, inputs, do, **kw)
    assert out.dtype == inputs[2].dtype
    assert_close(f"{label} out", ref_out, out, dtype)
    for name, r, o in zip(GRAD_NAMES, ref_grads, grads):
        scale = dgamma_term_magnitude(inputs, do, **kw) if name == "dgamma" and r is not None else None
        assert_close(f"{label} {name}", r, o, dtype, scale=scale)


def dgamma_term_magnitude(inputs, do, *, window, softmax=True, linear="outside", scale=None, eps=1e-12):
    """max_h sum_{b, n, j} |p0_nj dW_nj|: the magnitude of the terms summed into dgamma_h (float64, quadratic).

    dgamma_h = sum_{n, j in W(n)} p0_nj dW_nj with p0 = exp(s - c_n), dW_nj = (do_n . v_j - do_n . y_n) / Zd_n.
    """
    q, k, v, qf, kf, gam = [x.detach().double() for x in inputs]
    B, T, H, D = q.shape
    G = H // k.shape[2]
    k, v = k.repeat_interleave(G, 2), v.repeat_interleave(G, 2)
    q, k, v, qf, kf, dy = [x.transpose(1, 2) for x in (q, k, v, qf, kf, do.double())]
    pos = torch.arange(T, device=q.device)
    off = pos[:, None] - pos[None, :]
    causal, win = off >= 0, (off >= 0) & (off < window)
    s = (q @ k.transpose(-1, -2)) * (D**-0.5 if scale is None else scale)
    s = s.masked_fill(~win, float("-inf"))
    p0 = torch.exp(s - s.amax(-1, keepdim=True))
    w = gam.view(1, H, 1, 1) * p0
    if linear != "none":
        w = w + (qf @ kf.transpose(-1, -2)) * (causal & (off >= window) if linear == "outside" else causal)
    zd = w.sum(-1, keepdim=True) + eps
    y = (w @ v) / zd
    dw = (dy @ v.transpose(-1, -2) - (dy * y).sum(-1, keepdim=True)) / zd
    return (p0 * dw).abs().sum((0, 2, 3)).max().item()


def settings_ids(cases):
    """Test ids of (mode, window, settings) cases."""
    return [f"{m}-w{w}-" + ("-".join(f"{k}={v}" for k, v in o.items()) or "defaults") for m, w, o in cases]


def case_id(B, T, H, KV, D, w, dtype, mode):
    return f"B{B}-T{T}-H{H}-KV{KV}-D{D}-w{w}-{dtype}-{mode}"


# ---------------------------------------------------------------------------------------------------------------
# chunked torch reference vs naive (CPU)

CHUNKED_CASES = [(2, T, 3 * G, 3, 16, w, m) for T in (63, 500) for w in (1, 16, 64) for G in (1, 3) for m in MODES]
CHUNKED_CASES += [(1, 1000, 2 * G, 2, 16, 64, m) for G in (1, 3) for m in MODES]
CHUNKED_CASES += [(2, 10, 6, 2, 16, 64, m) for m in MODES]  # T < window


@pytest.mark.parametrize("B,T,H,KV,D,w,mode", CHUNKED_CASES, ids=[case_id(*c[:6], "fp32", c[6]) for c in CHUNKED_CASES])
def test_chunked_matches_naive(B, T, H, KV, D, w, mode):
    softmax, linear = MODES[mode]
    inputs, do = make_inputs(B, T, H, KV, D, 8, torch.float32, seed=T + w + H)
    check_against_naive(hybrid_attention_chunked, inputs, do, torch.float32, "chunked",
                        window=w, softmax=softmax, linear=linear)


def test_chunked_chunk_size_and_no_gamma():
    inputs, do = make_inputs(1, 200, 4, 2, 16, 8, torch.float32, seed=3, gamma=False)
    kw = dict(window=20, softmax=True, linear="outside")
    check_against_naive(lambda *a, **k: hybrid_attention_chunked(*a, chunk_size=32, **k), inputs, do,
                        torch.float32, "chunked C=32", **kw)
    with pytest.raises(ValueError, match="chunk_size"):
        hybrid_attention_chunked(*inputs, chunk_size=16, **kw)


def test_short_sequence_is_softmax_attention():
    """T <= w: the linear terms are empty and gamma cancels, so the layer is causal softmax attention."""
    (q, k, v, qf, kf, gam), _ = make_inputs(2, 40, 6, 2, 16, 8, torch.float32, seed=5)
    out = hybrid_attention_chunked(q, k, v, qf, kf, gam, window=64)
    rep = lambda x: x.repeat_interleave(3, dim=2).transpose(1, 2)  # noqa: E731
    ref = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), rep(k), rep(v), is_causal=True)
    ref = ref.transpose(1, 2)
    assert_close("T<w vs SDPA", ref, out, torch.float32)


def test_dispatcher_auto_on_cpu_picks_naive_for_short_and_chunked_for_long(monkeypatch):
    import linearize.kernels.hybrid_attention as ops

    calls = []
    monkeypatch.setattr(ops, "hybrid_attention_naive", lambda *a, **k: calls.append("naive"))
    monkeypatch.setattr(ops, "hybrid_attention_chunked", lambda *a, **k: calls.append("chunked"))
    inputs, _ = make_inputs(1, 70, 4, 2, 16, 8, torch.float32, seed=7)
    ops.hybrid_attention(*inputs, window=16)
    monkeypatch.setattr(ops, "NAIVE_CPU_BYTES", 4 * 4 * 70 * 70 - 1)  # one byte short of the score tensor
    ops.hybrid_attention(*inputs, window=16)
    assert calls == ["naive", "chunked"]


def test_dispatcher_backends_and_errors():
    inputs, _ = make_inputs(1, 70, 4, 2, 16, 8, torch.float32, seed=7)
    kw = dict(window=16, softmax=True, linear="outside")
    ref = hybrid_attention_naive(*inputs, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # CPU tensors take a PyTorch path silently
        assert_close("auto", ref, hybrid_attention(*inputs, **kw), torch.float32)
    assert_close("naive", ref, hybrid_attention(*inputs, backend="naive", **kw), torch.float32)
    assert_close("chunked", ref, hybrid_attention(*inputs, backend="chunked", **kw), torch.float32)
    with pytest.raises(ValueError, match="backend"):
        hybrid_attention(*inputs, backend="flash", **kw)
    with pytest.raises(ValueError, match="linear"):
        hybrid_attention(*inputs, window=16, linear="inside")
    with pytest.raises(ValueError, match="no attention terms"):
        hybrid_attention(*inputs, window=16, softmax=False, linear="none")


# ---------------------------------------------------------------------------------------------------------------
# Triton under the CPU interpreter

needs_interpreter = pytest.mark.skipif(
    CUDA or chunk is None,
    reason="CUDA present: the gpu tests cover the compiled kernels" if CUDA else "triton is not installed",
)


@pytest.fixture
def interpret(monkeypatch):
    """Triton reads TRITON_INTERPRET again when a launch first imports its gluon modules: keep it set meanwhile."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
# (B, T, H, KV, D, F, w, mode, blocks): blocks = 16 sets the state pass's F and Dv blocks and the forward's Dv
# block to 16, so that several programs share one head's state and output (the default blocks cover these head
# dims in one program), stores one forward state per 4 chunks and one reverse state per 2 (the defaults: 2 and
# 1), and has the key side compute the softmax weights and the linear side and dk_feat the local dW again (SAVE_P,
# SAVE_DW off)
INTERP_CASES = [
    (1, 130, 6, 2, 32, 16, 64, "hybrid", None),
    (2, 63, 2, 2, 16, 16, 16, "hybrid", None),
    (1, 100, 3, 3, 16, 16, 1, "hybrid", None),
    (1, 130, 6, 2, 16, 16, 16, "overlap", None),
    (1, 130, 2, 1, 32, 16, 64, "la_only", None),
    (1, 130, 6, 2, 16, 16, 64, "swa_only", None),
    (2, 10, 6, 2, 16, 16, 64, "hybrid", None),  # T < window
    (1, 200, 6, 2, 16, 16, 64, "hybrid", 16),
    (1, 260, 3, 1, 16, 32, 16, "overlap", 16),
    (1, 500, 4, 2, 32, 32, 64, "hybrid", 16),  # 8 chunks: states of chunks far from the start, F and Dv split
    (2, 63, 4, 1, 32, 48, 32, "la_only", 16),  # GQA 4, F padded (48 -> 64), one chunk: empty states
    (1, 191, 2, 2, 48, 16, 33, "overlap", None),  # D padded (48 -> 64), odd window
]


def _set_blocks(monkeypatch, blocks):
    """Small tiles, the two-level state scan and strides for the cases with ``blocks``, through the reverse states in
    memory (REV_LIN off); the other cases take the default REV_LIN, in segments of 2 chunks."""
    monkeypatch.setattr(chunk, "REV_SEG", 2)
    if blocks is not None:
        monkeypatch.setattr(chunk, "REV_LIN", False)
        for name in ("STATE_BF", "STATE_BV", "OUT_BV"):
            monkeypatch.setattr(chunk, name, blocks)
        monkeypatch.setattr(chunk, "STATE_SEG", 2)  # the two-level state scan, in segments of 2 steps
        monkeypatch.setattr(chunk, "STATE_STRIDE", 4)
        monkeypatch.setattr(chunk, "REV_STATE_STRIDE", 2)
        monkeypatch.setattr(chunk, "SAVE_P", False)
        monkeypatch.setattr(chunk, "SAVE_DW", False)


@needs_interpreter
@pytest.mark.parametrize(
    "B,T,H,KV,D,F,w,mode,blocks", INTERP_CASES,
    ids=[case_id(*c[:5], c[6], "fp32", c[7]) + f"-F{c[5]}" + ("" if c[8] is None else f"-blk{c[8]}")
         for c in INTERP_CASES],
)
def test_triton_interpreter_matches_naive(B, T, H, KV, D, F, w, mode, blocks, monkeypatch, interpret):
    _set_blocks(monkeypatch, blocks)
    softmax, linear = MODES[mode]
    inputs, do = make_inputs(B, T, H, KV, D, F, torch.float32, seed=T + H)
    check_against_naive(chunk.hybrid_attention_chunk, inputs, do, torch.float32, "triton-interp",
                        window=w, softmax=softmax, linear=linear)


@needs_interpreter
@pytest.mark.parametrize("mode", ["hybrid", "overlap", "la_only", "swa_only"])
def test_triton_interpreter_split_launches_and_kept_states(mode, monkeypatch, interpret):
    """The launch variants the benchmark tunes compute the same function: states kept from the forward, the
    query-side and key-side backward in two launches each, the two-level state scan, z by column sums, a forward
    state for every chunk and a reverse one per 4 chunks, the programs of one head's chunks in a row (GROUP_HEADS
    off), dk_feat launched right after the query side's softmax side, from its stored dW blocks (SIDE_KF; the
    streams themselves need a GPU), the backward's state passes in tiles of their own (SIDE_STATE_BLOCKS)."""
    for name in ("KEEP_STATES", "Q_SPLIT", "KV_SPLIT", "SIDE_KF"):
        monkeypatch.setattr(chunk, name, True)
    monkeypatch.setattr(chunk, "SIDE_STREAM_MIN_CHUNKS", 1)
    monkeypatch.setattr(chunk, "SIDE_STATE_BLOCKS", (32, 16))
    monkeypatch.setattr(chunk, "STATE_Z_DOT", False)  # z of the forward states as a column sum
    _set_blocks(monkeypatch, 16)  # (REV_LIN off: the reverse states per 4 chunks and dk_feat's own kernel)
    monkeypatch.setattr(chunk, "STATE_STRIDE", 1)
    monkeypatch.setattr(chunk, "REV_STATE_STRIDE", 4)
    monkeypatch.setattr(chunk, "GROUP_HEADS", False)
    softmax, linear = MODES[mode]
    inputs, do = make_inputs(1, 330, 4, 2, 32, 32, torch.float32, seed=5)
    check_against_naive(chunk.hybrid_attention_chunk, inputs, do, torch.float32, "triton-interp",
                        window=24, softmax=softmax, linear=linear)


@needs_interpreter
@pytest.mark.parametrize("mode,w", [("hybrid", 64), ("hybrid", 33), ("la_only", 64)])
def test_triton_interpreter_recomputed_states(mode, w, monkeypatch, interpret):
    """KEEP_STATES off (the states are not kept from the forward but recomputed by the backward's first state
    pass, on the side stream where it is on): the path of the smallest saved memory."""
    monkeypatch.setattr(chunk, "KEEP_STATES", False)
    monkeypatch.setattr(chunk, "SIDE_STREAM_MIN_CHUNKS", 1)
    softmax, linear = MODES[mode]
    inputs, do = make_inputs(1, 330, 4, 2, 32, 32, torch.float32, seed=w + 29)
    check_against_naive(chunk.hybrid_attention_chunk, inputs, do, torch.float32, "triton-interp",
                        window=w, softmax=softmax, linear=linear)


def check_bits_kept(monkeypatch, mode, w, seed, base, change, label, decision=None, between=None):
    """Under the interpreter, the op at settings ``base`` and then with ``change`` on top: every output and gradient
    must keep its bits, and the changed run is checked against the naive reference too (a buffer never written would
    leave a later launch reading an empty one). decision: the chunk function deciding whether the change applies to a
    backward, which must say True once; between: called after the reference run (spies on the changed run)."""
    softmax, linear = MODES[mode]
    kw = dict(window=w, softmax=softmax, linear=linear)
    inputs, do = make_inputs(1, 330, 4, 2, 32, 32, torch.float32, seed=seed)
    for name, value in base.items():
        monkeypatch.setattr(chunk, name, value)
    ref_out, ref_grads = run(chunk.hybrid_attention_chunk, inputs, do, **kw)
    for name, value in change.items():
        monkeypatch.setattr(chunk, name, value)
    launched = record_results(monkeypatch, decision) if decision else None
    if between:
        between()
    out, grads = run(chunk.hybrid_attention_chunk, inputs, do, **kw)
    if decision:
        assert launched == [True]
    assert_same_bits(out, grads, ref_out, ref_grads)
    check_against_naive(chunk.hybrid_attention_chunk, inputs, do, torch.float32, label, **kw)


@needs_interpreter
@pytest.mark.parametrize("mode", ["hybrid", "overlap", "la_only", "swa_only"])
@pytest.mark.parametrize("totals", [False, True], ids=["delta-kernel", "totals-in-the-delta-pass"])
def test_triton_interpreter_delta_in_the_query_side_gives_the_same_bits(mode, totals, monkeypatch, interpret):
    """DELTA_Q: the query side's first launch sums delta = do . o over the same [BT, Dv] tile as the delta kernel and
    stores it; the delta kernel (or DELTA_TOTALS' pass, 2 parts a segment) then writes only rb and dA (none at all in
    sliding-window-only mode). Under the interpreter every output and gradient must keep its bits; the naive
    reference checks the DELTA_Q run too (a delta never stored would leave the linear side reading an empty
    buffer)."""
    check_bits_kept(monkeypatch, mode, 33, 41, {"SIDE_STREAM_MIN_CHUNKS": 1, "DELTA_TOTALS": totals,
                                                "DELTA_TOTALS_MIN_CHUNKS": 1, "REV_SEG": 2, "DELTA_Q": False},
                    {"DELTA_Q": True}, "triton-interp-delta-q", decision="_delta_q")


@needs_interpreter
@pytest.mark.parametrize("mode,w", [("hybrid", 33), ("hybrid", 64), ("overlap", 64), ("la_only", 64)])
def test_triton_interpreter_da_on_the_side_stream_gives_the_same_bits(mode, w, monkeypatch, interpret):
    """SIDE_DA: the delta kernel writes delta and rb only, and DELTA_TOTALS' pass, loading delta in place of o, writes
    dA and the reverse scan's totals. It computes delta's row weights and dA by the delta kernel's formulas, so under
    the interpreter every output and gradient must keep the bits of DELTA_TOTALS' one pass (which keeps the
    default's, the DELTA_Q test above); the naive reference checks the SIDE_DA run too (a dA never written would
    leave the reverse scan reading an empty buffer)."""
    check_bits_kept(monkeypatch, mode, w, w + 43, {"SIDE_STREAM_MIN_CHUNKS": 1, "DELTA_TOTALS_MIN_CHUNKS": 1,
                                                   "REV_SEG": 2, "DELTA_TOTALS": True},
                    {"DELTA_TOTALS": False, "SIDE_DA": True}, "triton-interp-side-da", decision="_side_da")


@needs_interpreter
@pytest.mark.parametrize("mode,w,fwd_p", [("hybrid", 33, True), ("hybrid", 33, False), ("overlap", 64, True),
                                          ("la_only", 64, True)])
def test_triton_interpreter_dv_on_the_side_stream_gives_the_same_bits(mode, w, fwd_p, monkeypatch, interpret):
    """SIDE_DV moves the key side's dv launch ahead of the query side's launches (FWD_P: it reads p0 from the
    forward) or between them (without FWD_P: gamma p0 from the query side's first launch), to the side stream where
    one is taken; here one stream, in that order. The same kernels on the same inputs, so every output and gradient
    must keep its bits. la_only has no dv pass of its own to move: the same launches."""
    order = []  # the query side's and the key side's launches of the SIDE_DV run, in order

    def spy():
        for name, tag in (("_bwd_q_kernel", "q"), ("_bwd_kv_kernel", "kv")):
            real = getattr(chunk, name)
            monkeypatch.setattr(chunk, name, type("Spy", (), {
                "__getitem__": lambda self, grid, real=real, tag=tag: order.append(tag) or real[grid]})())

    check_bits_kept(monkeypatch, mode, w, w + 47, {"SIDE_STREAM_MIN_CHUNKS": 1, "REV_SEG": 2, "FWD_P": fwd_p},
                    {"SIDE_DV": True}, "triton-interp-side-dv", between=spy)
    if MODES[mode][0]:  # (softmax terms) the dv launch first or between the query side's two, then the dk launch,
        # in the bit check's run and in the naive check's
        assert order == 2 * (["kv", "q", "q", "kv"] if fwd_p else ["q", "kv", "q", "kv"]), order


@needs_interpreter
@pytest.mark.parametrize("mode,w", [("hybrid", 33), ("overlap", 64)])
def test_triton_interpreter_query_side_linear_launch_on_the_side_stream_gives_the_same_bits(mode, w, monkeypatch,
                                                                                           interpret):
    """SIDE_QLIN sends the query side's linear launch through the side stream's launch function, in the same place
    of the launch order (here one stream): the same kernels on the same inputs, so every output and gradient keeps
    its bits, and the naive reference checks the run."""
    check_bits_kept(monkeypatch, mode, w, w + 45, {"SIDE_STREAM_MIN_CHUNKS": 1, "REV_SEG": 2}, {"SIDE_QLIN": True},
                    "triton-interp-side-qlin")


# (mode, window): the hybrid at w = BT (no linear terms in the own chunk) and below it (CUR_LIN), the overlap and
# sliding-window-only modes (no local dW blocks)
WINDOW_BLOCK_CASES = [("hybrid", 64), ("hybrid", 33), ("overlap", 64), ("swa_only", 20)]


@needs_interpreter
@pytest.mark.parametrize("mode,w", WINDOW_BLOCK_CASES, ids=[f"{m}-w{w}" for m, w in WINDOW_BLOCK_CASES])
def test_triton_interpreter_window_blocks_give_the_bits_of_block_pairs(mode, w, monkeypatch, interpret):
    """WINDOW_BLOCKS (the default) packs a query chunk's two blocks of ds and gamma p0 into one, and the softmax side
    merges its two score blocks into it: every entry it drops is an exact zero of the pair layout (outside the
    window), and its row sums, arg max and dq add the same terms in the same order, so under the interpreter (no
    fused multiply-adds) outputs and gradients must be bit-identical to the pair layout's."""
    softmax, linear = MODES[mode]
    kw = dict(window=w, softmax=softmax, linear=linear)
    inputs, do = make_inputs(1, 330, 4, 2, 32, 32, torch.float32, seed=w + 3)
    monkeypatch.setattr(chunk, "WINDOW_BLOCKS", False)
    ref_out, ref_grads = run(chunk.hybrid_attention_chunk, inputs, do, **kw)
    monkeypatch.setattr(chunk, "WINDOW_BLOCKS", True)
    out, grads = run(chunk.hybrid_attention_chunk, inputs, do, **kw)
    assert_same_bits(out, grads, ref_out, ref_grads)


# (mode, window, settings): the hybrid at w = BT and below it (CUR_LIN: two linear blocks a query chunk), the overlap
# mode (softmax and linear terms on the same keys), linear-only (no p0 blocks) and sliding-window-only (no linear
# blocks), with a reverse state per 2 chunks (the key side's query chunks past the stored blocks) and the key side
# split, with the fused forward, and without the query side's stored blocks (SAVE_P, SAVE_DW off)
FWD_BLOCK_CASES = [
    ("hybrid", 64, {}),
    ("hybrid", 33, {"REV_STATE_STRIDE": 2}),
    ("overlap", 64, {"KV_SPLIT": True}),
    ("la_only", 64, {}),
    ("swa_only", 20, {}),
    ("hybrid", 64, {"FUSED_FWD": True, "SAVE_P": False, "SAVE_DW": False}),
]


@needs_interpreter
@pytest.mark.parametrize("mode,w,settings", FWD_BLOCK_CASES,
                         ids=[f"{m}-w{w}-{'-'.join(s) or 'defaults'}" for m, w, s in FWD_BLOCK_CASES])
def test_triton_interpreter_forward_blocks_give_the_bits_of_recomputation(mode, w, settings, monkeypatch,
                                                                          interpret):
    """FWD_P / FWD_LIN: the forward stores p0's window blocks, the arg maxes and the local linear blocks, and the
    backward reads them instead of computing them again. In fp32 each stored value is the one the backward would have
    computed from the same operands (one exp of the merged window block is the exp of each block's entries; the arg
    max the first maximum in the same key order), so outputs and gradients must be bit-identical to recomputation;
    a forward under torch.no_grad stores nothing and gives the same output."""
    softmax, linear = MODES[mode]
    kw = dict(window=w, softmax=softmax, linear=linear)
    # (REV_LIN off: with it the key side has no linear terms, and FWD_LIN's blocks are not read)
    for name, value in {**settings, "FWD_P": False, "FWD_LIN": False, "REV_LIN": False}.items():
        monkeypatch.setattr(chunk, name, value)
    inputs, do = make_inputs(1, 330, 4, 2, 32, 32, torch.float32, seed=w + 7)
    ref_out, ref_grads = run(chunk.hybrid_attention_chunk, inputs, do, **kw)
    monkeypatch.setattr(chunk, "FWD_P", True)
    monkeypatch.setattr(chunk, "FWD_LIN", True)
    out, grads = run(chunk.hybrid_attention_chunk, inputs, do, **kw)
    assert_same_bits(out, grads, ref_out, ref_grads)
    with torch.no_grad():
        assert torch.equal(chunk.hybrid_attention_chunk(*inputs, **kw), ref_out)


# (mode, window, settings): dk_feat in the key side's dv pass (KF_IN_KV) with the stored dW blocks (hybrid at w = BT
# and below it: CUR_LIN), without them (overlap: SAVE_DW off), in linear-only mode (no softmax, no stored blocks), at
# reverse strides 1, 2 and 4 (the query chunks between the keys and the reverse state), with the key side split
KF_IN_KV_CASES = [
    ("hybrid", 64, {}),
    ("hybrid", 33, {"REV_STATE_STRIDE": 2}),
    ("overlap", 64, {"SAVE_DW": False, "REV_STATE_STRIDE": 2}),
    ("la_only", 64, {"REV_STATE_STRIDE": 4}),
    ("hybrid", 64, {"KV_SPLIT": True, "SIDE_KF": True, "REV_STATE_STRIDE": 2}),
]


def check_settings_against_naive(monkeypatch, mode, w, settings, seed):
    """Set chunk's ``settings`` (in order), then check the op against the naive reference under the interpreter at
    T = 330 (6 chunks, the last partial), 4 query heads on 2 kv heads, D = F = 32, fp32."""
    for name, value in settings.items():
        monkeypatch.setattr(chunk, name, value)
    softmax, linear = MODES[mode]
    inputs, do = make_inputs(1, 330, 4, 2, 32, 32, torch.float32, seed=seed)
    check_against_naive(chunk.hybrid_attention_chunk, inputs, do, torch.float32, "triton-interp",
                        window=w, softmax=softmax, linear=linear)


@needs_interpreter
@pytest.mark.parametrize("mode,w,settings", KF_IN_KV_CASES,
                         ids=settings_ids(KF_IN_KV_CASES))
def test_triton_interpreter_dk_feat_in_the_key_side(mode, w, settings, monkeypatch, interpret):
    check_settings_against_naive(monkeypatch, mode, w, {"REV_LIN": False, "KF_IN_KV": True, **settings}, w + 11)


def spy_launches(monkeypatch, *names):
    """Replace chunk's kernels of these names by spies that launch them and record each launch's grid by name."""
    launched = {}
    for name in names:
        real = getattr(chunk, name)
        monkeypatch.setattr(chunk, name, type("Spy", (), {
            "__getitem__": lambda self, grid, real=real, name=name:
                launched.setdefault(name, []).append(grid) or real[grid]})())
    return launched


# dk_feat and dv's linear terms in one kernel per kv head (KF_DV), the key side's dv pass starting from them: the
# cases above (with KF_IN_KV and SIDE_KF set too in the last, which KF_DV overrides)
@needs_interpreter
@pytest.mark.parametrize("mode,w,settings", KF_IN_KV_CASES,
                         ids=settings_ids(KF_IN_KV_CASES))
def test_triton_interpreter_dk_feat_and_linear_dv_in_one_kernel(mode, w, settings, monkeypatch, interpret):
    launched = spy_launches(monkeypatch, "_bwd_kfdv_kernel", "_bwd_kf_kernel", "_bwd_kv_kernel")
    check_settings_against_naive(
        monkeypatch, mode, w, {"REV_LIN": False, "KF_DV": True, "KF_IN_KV": "KV_SPLIT" in settings, **settings}, w + 12)
    assert [grid[0] for grid in launched["_bwd_kfdv_kernel"]] == [-(-330 // chunk.BT)]  # one program per key chunk
    assert "_bwd_kf_kernel" not in launched
    assert ("_bwd_kv_kernel" in launched) == MODES[mode][0]


# (mode, window, settings): the fused forward (FUSED_FWD) with one state block per head and the whole Dv per output
# program (the defaults at these head dims), with state and output blocks of 16 (4 state blocks counted per state,
# 2 Dv blocks per chunk), at forward strides 1, 2 and 4, with the states kept for the backward
FUSED_CASES = [
    ("hybrid", 64, {}),
    ("hybrid", 33, {"STATE_BF": 16, "STATE_BV": 16, "OUT_BV": 16, "STATE_STRIDE": 4}),
    ("overlap", 64, {"STATE_STRIDE": 1, "KEEP_STATES": True}),
    ("la_only", 64, {"STATE_BF": 16, "OUT_BV": 16}),
]


@needs_interpreter
@pytest.mark.parametrize("mode,w,settings", FUSED_CASES,
                         ids=settings_ids(FUSED_CASES))
def test_triton_interpreter_fused_forward(mode, w, settings, monkeypatch, interpret):
    """The interpreter runs the programs one after the other in ticket order: this checks the fused forward's
    arithmetic and its mapping of tickets to state blocks and output chunks, not the waiting (a GPU test does)."""
    launched = spy_launches(monkeypatch, "_fwd_fused_kernel")
    check_settings_against_naive(monkeypatch, mode, w, {"FUSED_FWD": True, **settings}, w + 23)
    assert len(launched.get("_fwd_fused_kernel", [])) == 1, "the forward did not take the fused kernel"


# (mode, window): w = 64 = BT, the same chunk's linear block is all masked in the hybrid and skipped (CUR_LIN = 0);
# w = 63 keeps it (the diagonal blocks have keys at distance 63 on L(n)); 7 chunks
SKIP_CASES = [("hybrid", 64), ("hybrid", 63), ("overlap", 64), ("la_only", 64)]


@needs_interpreter
@pytest.mark.parametrize("mode,w", SKIP_CASES, ids=[f"{m}-w{w}" for m, w in SKIP_CASES])
def test_triton_interpreter_same_chunk_linear_block(mode, w, monkeypatch, interpret):
    """Skipping the same chunk's linear block (hybrid, w >= BT) changes nothing, and w = BT - 1 still needs it."""
    assert chunk._cur_lin(chunk._LINEAR_CODE[MODES[mode][1]], w) == (0 if (mode, w) == ("hybrid", 64) else 1)
    softmax, linear = MODES[mode]
    inputs, do = make_inputs(1, 420, 4, 2, 32, 32, torch.float32, seed=w + 7)
    check_against_naive(chunk.hybrid_attention_chunk, inputs, do, torch.float32, "triton-interp",
                        window=w, softmax=softmax, linear=linear)


def chunk_states_reference(x, y, rb, heads_per_y, reverse, stride=1, chunk_size=64):
    """float64 states, one per `stride` chunks: hs[bh, p] = sum over chunks <= stride p - 2 (reverse:
    >= stride p + stride + 1) of x^T y, zs = x^T rb. At stride 1: chunks <= p - 2 (>= p + 2)."""
    B, T, H, F = x.shape
    y = y.double().repeat_interleave(heads_per_y, dim=2)
    x = x.double().permute(0, 2, 1, 3).reshape(B * H, T, F)
    y = y.permute(0, 2, 1, 3).reshape(B * H, T, -1)
    rb = torch.ones(B * H, T, dtype=torch.float64) if rb is None else rb.double()
    NS = -(-T // (chunk_size * stride))
    chunk = torch.arange(T) // chunk_size
    hs = torch.zeros(B * H, NS, F, y.shape[-1], dtype=torch.float64)
    zs = torch.zeros(B * H, NS, F, dtype=torch.float64)
    for p in range(NS):
        keep = chunk >= stride * p + stride + 1 if reverse else chunk <= stride * p - 2
        hs[:, p] = torch.einsum("btf,btv->bfv", x[:, keep], y[:, keep])
        zs[:, p] = torch.einsum("btf,bt->bf", x[:, keep], rb[:, keep])
    return hs, zs


# (B, T, H, heads_per_y, F, Dv, reverse, row weights of z, block, segment, stride): several F / Dv blocks, padded
# F / Dv, T < one chunk; the scan in one pass (segment 0) or in segments of 1-3 steps (8 chunks at stride 1:
# 3 + 3 + 2); a state per chunk, per 2 chunks (4 + 1 steps at T = 500 in segments of 4; the last group is partial)
# or per 4 chunks
STATE_CASES = [
    (1, 500, 2, 2, 32, 48, False, False, 16, 0, 1),
    (1, 500, 2, 2, 32, 48, False, False, 16, 3, 1),
    (1, 500, 2, 2, 32, 48, False, False, 16, 4, 2),
    (2, 300, 3, 1, 16, 32, True, True, 16, 0, 1),
    (2, 300, 3, 1, 16, 32, True, True, 16, 2, 1),
    (1, 520, 3, 1, 16, 32, True, True, 16, 1, 2),
    (1, 63, 2, 1, 16, 16, True, True, 64, 1, 1),
    (1, 63, 2, 1, 16, 16, False, True, 64, 0, 2),
    (1, 257, 4, 4, 48, 16, False, True, 32, 1, 1),
    (1, 700, 1, 1, 16, 16, True, False, 16, 4, 1),
    (1, 700, 1, 1, 16, 16, False, False, 16, 0, 4),
    (1, 700, 2, 2, 16, 16, True, True, 16, 2, 4),
]


@needs_interpreter
@pytest.mark.parametrize("B,T,H,GY,F,DV,reverse,weights,blk,seg,stride", STATE_CASES,
                         ids=[f"B{c[0]}-T{c[1]}-H{c[2]}-G{c[3]}-F{c[4]}-Dv{c[5]}-{'rev' if c[6] else 'fwd'}"
                              f"{'-rb' if c[7] else ''}-blk{c[8]}-seg{c[9]}-sc{c[10]}" for c in STATE_CASES])
def test_triton_state_pass_matches_reference(B, T, H, GY, F, DV, reverse, weights, blk, seg, stride, monkeypatch,
                                             interpret):
    """The states the output and gradient kernels read: exact prefix (suffix) sums, two chunks apart from the
    first chunk of their group, from one sequential pass or from the two-level scan over segments."""
    monkeypatch.setattr(chunk, "STATE_BF", blk)
    monkeypatch.setattr(chunk, "STATE_BV", blk)
    monkeypatch.setattr(chunk, "STATE_SEG", seg)
    monkeypatch.setattr(chunk, "REV_STATE_STRIDE" if reverse else "STATE_STRIDE", stride)
    g = torch.Generator().manual_seed(T + F)
    x = torch.randn(B, T, H, F, generator=g).softmax(-1)
    y = torch.randn(B, T, H // GY, DV, generator=g)
    rb = torch.randn(B * H, T, generator=g) if weights else None
    hs, zs = chunk.chunk_states(x, y, rb, heads_per_y=GY, reverse=reverse, dtype=torch.float32, big=False)
    ref_hs, ref_zs = chunk_states_reference(x, y, rb, GY, reverse, stride)
    assert_close("state h", ref_hs, hs[:, :, :F, :DV], torch.float32)
    assert_close("state z", ref_zs, zs[:, :, :F], torch.float32)
    assert (hs[:, :, F:] == 0).all() and (hs[:, :, :, DV:] == 0).all(), "padding of the states must be zero"


@needs_interpreter
@pytest.mark.parametrize("seg,stride", [(0, 1), (2, 2)], ids=["one-pass-sc1", "seg2-sc2"])
def test_triton_state_pass_row_divisors_scale_the_state_not_z(seg, stride, monkeypatch, interpret):
    """REV_DO's reverse pass: x's rows divided by rs enter the state h, the undivided rows z (against rb); over two
    F / Dv blocks, padded head dims and a partial last chunk, in one pass and in segments."""
    monkeypatch.setattr(chunk, "STATE_BF", 16)
    monkeypatch.setattr(chunk, "STATE_BV", 16)
    monkeypatch.setattr(chunk, "STATE_SEG", seg)
    monkeypatch.setattr(chunk, "REV_STATE_STRIDE", stride)
    B, T, H, F, DV = 1, 330, 2, 24, 20
    g = torch.Generator().manual_seed(5)
    x = torch.randn(B, T, H, F, generator=g).softmax(-1)
    y = torch.randn(B, T, H, DV, generator=g)
    rb = torch.randn(B * H, T, generator=g)
    rs = torch.rand(B * H, T, generator=g) * 4 + 0.5
    hs, zs = chunk.chunk_states(x, y, rb, heads_per_y=1, reverse=True, dtype=torch.float32, big=False, rs=rs)
    scaled = x / rs.view(B, H, T).permute(0, 2, 1)[..., None]
    ref_hs, _ = chunk_states_reference(scaled, y, rb, 1, True, stride)
    _, ref_zs = chunk_states_reference(x, y, rb, 1, True, stride)
    assert_close("state h", ref_hs, hs[:, :, :F, :DV], torch.float32)
    assert_close("state z", ref_zs, zs[:, :, :F], torch.float32)


# (mode, window, settings): the reverse pass on do with phi(q) divided by Zd in the pass (REV_DO; no dA buffer), at
# reverse strides 1, 2 and 4, with recomputed states and in segments
REV_DO_CASES = [
    ("hybrid", 64, {}),
    ("overlap", 33, {"REV_STATE_STRIDE": 2, "KEEP_STATES": False}),
    ("la_only", 64, {"REV_STATE_STRIDE": 4, "STATE_SEG": 2}),
]


@needs_interpreter
@pytest.mark.parametrize("mode,w,settings", REV_DO_CASES, ids=settings_ids(REV_DO_CASES))
def test_triton_interpreter_reverse_pass_on_do(mode, w, settings, monkeypatch, interpret):
    check_settings_against_naive(monkeypatch, mode, w, {"REV_LIN": False, "REV_DO": True, **settings}, w + 31)


# (mode, window, settings): the key side's linear terms in the reverse scan (REV_LIN): hybrid at w = BT and below it
# (CUR_LIN: the same chunk's linear block), overlap and linear-only (no key-side softmax terms: the key side only
# sums the heads' dv), the scan in one segment or in segments of 2 or 4 chunks (T = 330: 6 chunks), with the flags
# REV_LIN ignores set
REV_LIN_CASES = [
    # the scan and its totals on do, divided by Zd themselves (REV_SCALE_DO): in segments, with the same chunk's
    # linear block, overlap, linear-only in one segment
    ("hybrid", 64, {"REV_SEG": 2, "REV_SCALE_DO": True}),
    ("hybrid", 33, {"REV_SEG": 4, "REV_SCALE_DO": True}),
    ("overlap", 64, {"REV_SEG": 2, "REV_SCALE_DO": True}),
    ("la_only", 64, {"REV_SEG": 32, "REV_SCALE_DO": True}),
    # the dk_feat parts' state held transposed (REV_ST), with phi(q)'s rows divided by Zd as its update's B operand
    # and the totals pass dividing do's rows under REV_SCALE_DO; alone (no division) too
    ("hybrid", 64, {"REV_SEG": 2, "REV_SCALE_DO": True, "REV_ST": True}),
    ("hybrid", 33, {"REV_SEG": 4, "REV_SCALE_DO": True, "REV_ST": True}),
    ("overlap", 64, {"REV_SEG": 2, "REV_SCALE_DO": True, "REV_ST": True}),
    ("la_only", 64, {"REV_SEG": 32, "REV_SCALE_DO": True, "REV_ST": True}),
    ("hybrid", 33, {"REV_SEG": 2, "REV_ST": True}),
    ("overlap", 64, {"REV_SEG": 4, "REV_ST": True}),
    ("hybrid", 64, {"REV_SEG": 2}),
    ("hybrid", 33, {"REV_SEG": 4, "KF_DV": True, "REV_STATE_STRIDE": 2}),
    ("overlap", 64, {"REV_SEG": 32, "REV_DO": True}),
    ("la_only", 64, {"REV_SEG": 2, "KF_IN_KV": True, "SIDE_KF": True}),
    # the totals summed into prefixes first (REV_PREFIX): 3 and 6 segments; and each segment summing the totals
    # before it (the default)
    ("hybrid", 64, {"REV_SEG": 2, "REV_PREFIX": True}),
    ("hybrid", 33, {"REV_SEG": 1, "REV_PREFIX": True}),
    ("hybrid", 64, {"REV_SEG": 1, "REV_PREFIX": False}),
    # z of the dk_feat parts by dots (REV_ZDOT): in segments (z carried in from the totals), with the same chunk's
    # linear block (w < BT), linear-only
    ("hybrid", 64, {"REV_SEG": 2, "REV_ZDOT": True}),
    ("hybrid", 33, {"REV_SEG": 4, "REV_ZDOT": True}),
    ("la_only", 64, {"REV_SEG": 32, "REV_ZDOT": True}),
    ("hybrid", 64, {"REV_SEG": 2, "REV_ZDOT": False}),
    # the totals from the delta pass (DELTA_TOTALS): a part a segment (3 segments), 2 or 4 parts a segment (parts of
    # 2 or 1 chunks, KS = 2 / 4), with the prefixes of the totals, every mode
    ("hybrid", 64, {"REV_SEG": 2, "DELTA_TOTALS": True}),
    ("hybrid", 33, {"REV_SEG": 4, "DELTA_TOTALS": True, "DELTA_TOTALS_MIN_CHUNKS": 1}),
    ("la_only", 64, {"REV_SEG": 4, "DELTA_TOTALS": True, "DELTA_TOTALS_MIN_CHUNKS": 2}),
    ("overlap", 64, {"REV_SEG": 1, "DELTA_TOTALS": True, "REV_PREFIX": True}),
    ("hybrid", 64, {"REV_SEG": 2, "DELTA_TOTALS": True, "DELTA_TOTALS_MIN_CHUNKS": 1, "REV_PREFIX": True}),
    ("hybrid", 64, {"REV_SEG": 2, "DELTA_TOTALS": False}),
]


@pytest.mark.skipif(chunk is None, reason="triton is not installed")
def test_reverse_scan_segments_by_length(monkeypatch):
    """REV_SEG_LONG = (chunks, length): segments of that length from that many key chunks (the default: 512 from 512,
    one segment a head at 32K), REV_SEG below it and at every T when it is None; the length halved (not below REV_SEG)
    while the segments of all B H heads are fewer than REV_MIN_SEGMENTS."""
    assert chunk.REV_SEG_LONG == (512, 512) and chunk.REV_MIN_SEGMENTS == 32
    assert chunk._rev_segments(32768, 32) == (512, 1)  # the tuned shape: B = 1, H = 32
    assert chunk._rev_segments(32768, 9) == (128, 4)  # SmolLM2's 9 heads: 36 segments
    assert chunk._rev_segments(32768, 2) == (64, 8)  # not below REV_SEG
    monkeypatch.setattr(chunk, "REV_MIN_SEGMENTS", 0)
    monkeypatch.setattr(chunk, "REV_SEG", 64)
    monkeypatch.setattr(chunk, "REV_SEG_LONG", None)
    assert chunk._rev_segments(32768, 1) == (64, 8)
    monkeypatch.setattr(chunk, "REV_SEG_LONG", (512, 128))
    assert chunk._rev_segments(32768, 1) == (128, 4)  # 512 chunks
    assert chunk._rev_segments(32768 - 64, 1) == (64, 8)  # 511 chunks: REV_SEG
    assert chunk._rev_segments(40000, 1) == (128, 5)  # 625 chunks
    assert chunk._rev_segments(8192, 1) == (64, 2)
    monkeypatch.setattr(chunk, "REV_SEG_LONG", (512, 512))
    assert chunk._rev_segments(32768, 1) == (512, 1)  # one segment a head
    assert chunk._rev_segments(40000, 1) == (512, 2)
    monkeypatch.setattr(chunk, "REV_MIN_SEGMENTS", 16)
    assert chunk._rev_segments(32768, 8) == (256, 2)
    assert chunk._rev_segments(32768, 4) == (128, 4)
    assert chunk._rev_segments(32768, 16) == (512, 1)
    monkeypatch.setattr(chunk, "REV_SEG", 1024)  # REV_SEG_LONG's length already below REV_SEG: kept
    assert chunk._rev_segments(32768, 1) == (512, 1)


@needs_interpreter
@pytest.mark.parametrize("mode,w,long,floor,nseg", [("hybrid", 64, (6, 2), 0, 3), ("hybrid", 33, (7, 2), 0, 2),
                                                    ("overlap", 64, (6, 1), 0, 6), ("hybrid", 64, (6, 8), 0, 1),
                                                    ("hybrid", 64, (6, 8), 8, 2), ("la_only", 64, (6, 8), 5, 2)])
def test_triton_interpreter_reverse_scan_segments_by_length(mode, w, long, floor, nseg, monkeypatch, interpret):
    """The reverse scan at REV_SEG_LONG's length from its threshold (T = 330: 6 chunks; REV_SEG = 4 below it), halved
    where the 4 heads' segments would be fewer than REV_MIN_SEGMENTS = ``floor``, against the naive reference, with the
    grid of segments it launches."""
    launched = spy_launches(monkeypatch, "_bwd_rev_kernel")
    check_settings_against_naive(monkeypatch, mode, w, {"REV_LIN": True, "REV_SEG": 4, "REV_SEG_LONG": long,
                                                        "REV_MIN_SEGMENTS": floor}, w + 49)
    assert launched["_bwd_rev_kernel"] == [(4, nseg, 4)]


@pytest.mark.skipif(chunk is None, reason="triton is not installed")
def test_reverse_scan_z_by_dots_only_where_it_was_right(monkeypatch):
    """REV_ZDOT's 16-bit split runs from REV_ZDOT_MIN_COLS columns a dk_feat part (below them it gave wrong dk_feat on
    an H100); fp32 takes one fp32 dot at any width; REV_ZDOT off keeps the column sum everywhere."""
    assert chunk.REV_ZDOT and chunk.REV_ZDOT_MIN_COLS == 64
    assert chunk._rev_zdot(torch.bfloat16, 64) and chunk._rev_zdot(torch.float16, 128)
    assert not chunk._rev_zdot(torch.bfloat16, 32) and not chunk._rev_zdot(torch.float16, 16)
    assert chunk._rev_zdot(torch.float32, 16)
    monkeypatch.setattr(chunk, "REV_ZDOT", False)
    assert not chunk._rev_zdot(torch.float32, 64) and not chunk._rev_zdot(torch.bfloat16, 64)


@pytest.mark.skipif(chunk is None, reason="triton is not installed")
def test_reverse_scan_z_by_one_dot_in_bf16_only(monkeypatch):
    """REV_ZDOT_BF16_ONE drops the split of z's row weights in bf16 alone: fp16 keeps it (its range would flush small
    weights), fp32 has no split to drop."""
    monkeypatch.setattr(chunk, "REV_ZDOT_BF16_ONE", True)
    assert not chunk._rev_zsplit(torch.bfloat16)
    assert chunk._rev_zsplit(torch.float16) and chunk._rev_zsplit(torch.float32)
    monkeypatch.setattr(chunk, "REV_ZDOT_BF16_ONE", False)
    assert chunk._rev_zsplit(torch.bfloat16)


@needs_interpreter
@pytest.mark.parametrize("mode,w,settings", REV_LIN_CASES, ids=settings_ids(REV_LIN_CASES))
def test_triton_interpreter_linear_backward_in_the_reverse_scan(mode, w, settings, monkeypatch, interpret):
    launched = spy_launches(monkeypatch, "_bwd_rev_kernel", "_bwd_kf_kernel", "_bwd_kfdv_kernel", "_bwd_kv_kernel",
                            "_prefix_kernel", "_chunk_state_kernel", "_delta_kernel", "_delta_totals_kernel")
    check_settings_against_naive(monkeypatch, mode, w, {"REV_LIN": True, **settings}, w + 41)
    L = min(settings["REV_SEG"], 6)
    nseg = -(-6 // L)
    assert launched["_bwd_rev_kernel"] == [(4, nseg, 4)]  # (2 dv parts + 2 dk_feat parts, segments, batch * heads)
    # (the prefixes of the totals [BF BDV] and of z [BF], BF = BDV = 32, for each of 4 batch * heads)
    prefix = settings.get("REV_PREFIX", chunk.REV_PREFIX) and nseg > 2
    assert launched.get("_prefix_kernel", []) == ([(1, 4), (1, 4)] if prefix else [])
    if settings.get("DELTA_TOTALS", chunk.DELTA_TOTALS) and nseg > 1:
        # (the totals in the delta pass, in parts of L / KS chunks down to the first: no totals pass)
        ks = 1
        while L % (2 * ks) == 0 and L // (2 * ks) >= settings.get("DELTA_TOTALS_MIN_CHUNKS", 8):
            ks *= 2
        assert launched["_delta_totals_kernel"] == [(-(-6 // (L // ks)), 4)] and "_delta_kernel" not in launched
        assert launched["_chunk_state_kernel"] == [(1, 4, 1)]
    else:
        # (the forward's state pass, then the totals of nseg - 1 segments, F / 32 x Dv / 32 blocks)
        assert launched["_chunk_state_kernel"] == [(1, 4, 1)] + ([(1, 4, nseg - 1)] if nseg > 1 else [])
        assert "_delta_totals_kernel" not in launched and len(launched["_delta_kernel"]) == 1
    assert "_bwd_kf_kernel" not in launched and "_bwd_kfdv_kernel" not in launched
    assert len(launched["_bwd_kv_kernel"]) == (2 if chunk.KV_SPLIT and MODES[mode][0] else 1)  # (dk, dv: KV_SPLIT)


def _ptxas_missing() -> str | None:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        get_ptxas(90)
    except Exception as err:  # no NVIDIA backend or no bundled ptxas: nothing to compile with
        return f"triton cannot compile for sm_90a here: {type(err).__name__}: {err}"
    return None


# spills arguments -> (kernel name, rows expected): the backward kernels at a forward state per 4 chunks and a
# reverse one per 2, with window blocks (the default) and with block pairs; the key side with dk_feat in its dv pass
# (then no _bwd_kf_kernel)
COMPILE_SETS = {
    "strides-window-blocks": (["--stride", "4", "--rev-stride", "2", "--reverse-states", "--kernels", "bwd"],
                              "bwd_kf", 2),
    "strides-block-pairs": (["--stride", "4", "--rev-stride", "2", "--pair-blocks", "--reverse-states", "--kernels",
                             "bwd"], "bwd_kf", 2),
    "dk_feat-in-the-key-side": (["--rev-stride", "2", "--kf-in-kv", "--reverse-states", "--kernels", "bwd_kv",
                                 "bwd_kf"], "bwd_kv", 6),
    "fused-forward": (["--stride", "1", "2", "--fused-fwd", "--kernels", "fwd fused"], "fwd fused", 4),
    # the forward that stores p0, the arg maxes and the linear blocks, and the key side that reads both (FWD_LIN is
    # off by default) at a reverse state per 2 chunks (the query chunks past the stored blocks)
    "forward-blocks": (["--rev-stride", "2", "--fwd-blocks", "--reverse-states", "--kernels", "fwd, blocks",
                        "bwd_kv"], "fwd, blocks", 2),
    # the default backward: the linear terms in the reverse scan (REV_LIN), the key side without them
    "reverse-scan": (["--kernels", "bwd_rev", "bwd_kv", "state"], "bwd_rev", 2),
    # delta with the reverse scan's totals (DELTA_TOTALS)
    "totals-in-the-delta-pass": (["--delta-totals", "--kernels", "delta"], "delta_totals", 2),
}


@pytest.mark.skipif(chunk is None, reason="triton is not installed")
@pytest.mark.slow
@pytest.mark.parametrize("options", list(COMPILE_SETS))
def test_kernels_compile_for_sm90_under_the_tuned_options(options):
    """The interpreter runs the kernels as Python and checks none of what the compiler checks (e.g. that a value
    carried through a loop keeps its type: dk_feat at REV_STATE_STRIDE = 2 with the stored dW blocks did not
    compile). Compile the backward kernels for an H100 (no GPU needed), hybrid and overlap, with the strides and
    stored-block options that the benchmark's tune variants set."""
    import subprocess
    import sys

    why = _ptxas_missing()
    if why:
        pytest.skip(why)
    args, name, rows = COMPILE_SETS[options]
    cmd = [sys.executable, "-m", "linearize.kernels.spills", "--modes", "hybrid", "overlap", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    failed = [line for line in res.stdout.splitlines() if "failed" in line]
    assert res.returncode == 0 and not failed, "\n".join(failed) or res.stderr[-3000:]
    assert res.stdout.count(f"| {name}") == rows, res.stdout
    if options == "dk_feat-in-the-key-side":
        assert "| bwd_kf |" not in res.stdout, "KF_IN_KV still compiles _bwd_kf_kernel"


@needs_interpreter
def test_triton_interpreter_no_gamma_custom_scale(interpret):
    inputs, do = make_inputs(1, 90, 2, 1, 16, 16, torch.float32, seed=11, gamma=False)
    check_against_naive(chunk.hybrid_attention_chunk, inputs, do, torch.float32, "triton-interp",
                        window=32, softmax=True, linear="outside", scale=0.3, eps=1e-6)


@needs_interpreter
def test_triton_interpreter_features_and_gamma_in_another_dtype(interpret):
    """float64 features and gamma with fp32 q / k / v: the op casts the features to fp32 and hands back gradients in
    the dtype of each input, equal to those of the all-fp32 call on the same values."""
    inputs, do = make_inputs(1, 100, 2, 1, 16, 16, torch.float32, seed=12)
    mixed = [x.detach().clone().requires_grad_() for x in inputs[:3]]
    mixed += [x.detach().double().requires_grad_() for x in inputs[3:]]
    out, grads = run(chunk.hybrid_attention_chunk, inputs, do, window=16)
    out_m, grads_m = run(chunk.hybrid_attention_chunk, mixed, do, window=16)
    assert torch.equal(out, out_m)
    for name, g, gm, x in zip(GRAD_NAMES, grads, grads_m, mixed):
        assert gm.dtype == x.dtype, f"{name}: {gm.dtype} for a {x.dtype} input"
        torch.testing.assert_close(gm.float(), g, rtol=0, atol=0, msg=name)


@needs_interpreter
def test_triton_interpreter_forward_prelude_in_and_out_of_the_function(monkeypatch, interpret):
    """The forward's prelude (the inputs as the kernels take them, the plan, the state pass and the output kernel)
    runs before the autograd Function, and inside it while torch.compile traces: the same bits either way. With inputs whose last dim is not
    contiguous and a bf16 gamma, the prelude's copies stay out of autograd's graph: the output's only node is the op's,
    and every gradient matches the call on contiguous inputs."""
    inputs, do = make_inputs(1, 130, 2, 1, 16, 16, torch.float32, seed=14)
    where = []  # grad mode at each prelude: on outside the Function (the inputs want gradients), off inside it
    real = chunk._prelude
    monkeypatch.setattr(chunk, "_prelude", lambda *a: where.append(torch.is_grad_enabled()) or real(*a))
    out, grads = run(chunk.hybrid_attention_chunk, inputs, do, window=16)
    with monkeypatch.context() as m:
        m.setattr(torch.compiler, "is_compiling", lambda: True)
        out_c, grads_c = run(chunk.hybrid_attention_chunk, inputs, do, window=16)
    assert where == [True, False]
    assert_same_bits(out_c, grads_c, out, grads)
    # the same values in [B, T, H, D] views whose last dim has stride 2 (every other element of a wider tensor)
    strided = []
    for x in inputs[:5]:
        wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1])
        wide[..., ::2] = x.detach()
        strided.append(wide[..., ::2].requires_grad_())
    gamma = inputs[5].detach().bfloat16().float().bfloat16().requires_grad_()
    pre = real(*strided, gamma, 16, True, 1, 0.25, 1e-12, True)
    assert all(x.grad_fn is None and not x.requires_grad for x in (pre.o, pre.M, pre.ZD, pre.hs, pre.zs))
    assert all(x.grad_fn is None for x in (pre.q, pre.k, pre.v, pre.q_feat, pre.k_feat, pre.gam))
    out_s = chunk.hybrid_attention_chunk(*strided, gamma, window=16)
    assert out_s.grad_fn.name() == "HybridAttentionFunctionBackward"
    grads_s = torch.autograd.grad(out_s, [*strided, gamma], do)
    ref_out, ref_grads = run(chunk.hybrid_attention_chunk, [*[x.detach().clone().requires_grad_() for x in inputs[:5]],
                                                            gamma.detach().float().requires_grad_()], do, window=16)
    assert torch.equal(out_s, ref_out)
    for name, g, r in zip(GRAD_NAMES, grads_s, ref_grads):
        assert torch.equal(g, r.to(g.dtype)), name  # (dgamma: the fp32 call's, rounded to gamma's bf16)


@needs_interpreter
def test_triton_rejects_unsupported(interpret):
    inputs, _ = make_inputs(1, 20, 2, 1, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="window"):
        chunk.hybrid_attention_chunk(*inputs, window=65)
    # the state holds keys at distance > BT only: linear terms "outside" a wider window need it without softmax too
    with pytest.raises(ValueError, match="window"):
        chunk.hybrid_attention_chunk(*inputs, window=65, softmax=False, linear="outside")
    assert chunk.supported(*inputs[:5], window=200, softmax=False, linear="all") is None  # no window involved


@needs_interpreter
@pytest.mark.parametrize("name", ["STATE_STRIDE", "REV_STATE_STRIDE"])
def test_triton_state_stride_must_be_a_power_of_two(name, monkeypatch, interpret):
    monkeypatch.setattr(chunk, name, 3)
    inputs, _ = make_inputs(1, 200, 2, 1, 16, 16, torch.float32)
    with pytest.raises(ValueError, match=f"{name} must be a power of two"):
        chunk.hybrid_attention_chunk(*inputs, window=16).sum().backward()  # the reverse stride: in the backward


# ---------------------------------------------------------------------------------------------------------------
# Triton on the GPU

gpu = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA device (run it through the device tool)")]
# (B, T, H, KV, D, F, w). Compiling dominates (up to six kernels per dtype x mode x shape specialisation, ~30 s per
# new combination on an H100), so the hybrid runs at every length, the other modes at 63 (T < w) and 1000.
GPU_SHAPES = {63: (2, 63, 4, 2, 64, 128, 64), 500: (2, 500, 4, 2, 64, 128, 64), 1000: (1, 1000, 9, 3, 64, 128, 64),
              4096: (1, 4096, 4, 1, 128, 128, 64)}
GPU_CASES = [(*GPU_SHAPES[T], dt, "hybrid") for dt in DTYPES for T in GPU_SHAPES]
# fp32 at T=4096 with d=64: compiling the IEEE-fp32 kernels at d=128 took 93 s of a 106 s tier on an H200; fp32 at
# d=128 stays covered by T=777 below, T=4096 at d=128 by bf16
GPU_CASES = [(*c[:4], 64, *c[5:]) if (c[1], c[7]) == (4096, "fp32") else c for c in GPU_CASES]
GPU_CASES += [(*GPU_SHAPES[T], dt, m) for dt in DTYPES for T in (63, 1000) for m in MODES if m != "hybrid"]
GPU_CASES += [(1, 777, 6, 2, 128, 128, 16, dt, "hybrid") for dt in DTYPES]


@pytest.mark.parametrize("B,T,H,KV,D,F,w,dt,mode", GPU_CASES,
                         ids=[case_id(*c[:5], c[6], c[7], c[8]) + f"-F{c[5]}" for c in GPU_CASES])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (run it through the device tool)")
def test_triton_gpu_matches_naive(B, T, H, KV, D, F, w, dt, mode):
    softmax, linear = MODES[mode]
    dtype = DTYPES[dt]
    inputs, do = make_inputs(B, T, H, KV, D, F, dtype, device="cuda", seed=T + H + D)
    check_against_naive(chunk.hybrid_attention_chunk, inputs, do, dtype, f"triton-gpu-{dt}",
                        window=w, softmax=softmax, linear=linear)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (run it through the device tool)")
def test_triton_gpu_state_pass_bf16_keeps_z_fp32_accurate():
    """bf16 inputs (the interpreter does not emulate bf16 dots): h is stored in bf16, but the reverse pass's weighted
    z keeps fp32 accuracy (its row weights enter the dot as fp32 operands at 3xTF32). Rounding rb to bf16 would give a
    relative error of ~1e-3 (bf16 keeps 8 bits; an estimate, not run), 100x the bound here."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 1000, 4, 128, generator=g).softmax(-1).bfloat16()
    y = torch.randn(1, 1000, 4, 128, generator=g).bfloat16()
    rb = torch.randn(4, 1000, generator=g) * 3
    hs, zs = chunk.chunk_states(x.cuda(), y.cuda(), rb.cuda(), heads_per_y=1, reverse=True, dtype=torch.bfloat16,
                                big=True)
    ref_hs, ref_zs = chunk_states_reference(x, y, rb, 1, True, chunk.REV_STATE_STRIDE)
    assert_close("state h", ref_hs, hs.cpu().float(), torch.bfloat16)
    err = ((zs.cpu().double() - ref_zs).norm() / ref_zs.norm()).item()
    assert err < 1e-5, f"z relative RMS error {err:.2e}"


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (run it through the device tool)")
@pytest.mark.parametrize("mode", ["hybrid", "la_only", "swa_only"])
def test_triton_gpu_launch_plans_replay_the_bits_of_tritons_path(mode, monkeypatch):
    """Calls after the first of a key replay its recorded launches (kernels/launch.py) and give the bits of Triton's
    own path; an input off 16-byte alignment takes Triton's path (another specialisation) and records no plan."""
    softmax, linear = MODES[mode]
    kw = dict(window=64, softmax=softmax, linear=linear)
    inputs, do = make_inputs(1, 300, 4, 2, 64, 64, torch.bfloat16, device="cuda", seed=3)
    monkeypatch.setattr(chunk, "LAUNCH_PLANS", False)
    ref_out, ref_grads = run(chunk.hybrid_attention_chunk, inputs, do, **kw)
    monkeypatch.setattr(chunk, "LAUNCH_PLANS", True)
    chunk.PLANS.clear()
    replays = chunk.PLANS.replays
    for _ in range(3):
        out, grads = run(chunk.hybrid_attention_chunk, inputs, do, **kw)
        assert_same_bits(out, grads, ref_out, ref_grads)
    assert chunk.PLANS.replays - replays == 4, "calls 2 and 3 did not replay their forward and backward"
    assert len(chunk.PLANS) == 2

    q = inputs[0].detach()
    off = torch.empty(q.numel() + 1, device="cuda", dtype=q.dtype)[1:].view_as(q).copy_(q)  # 2 bytes off
    assert off.data_ptr() % 16
    out = chunk.hybrid_attention_chunk(off, *[x.detach() if x is not None else None for x in inputs[1:]], **kw)
    assert_close("misaligned q", ref_out.float(), out.float(), torch.bfloat16)
    assert len(chunk.PLANS) == 2, "a misaligned input recorded a plan"


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (run it through the device tool)")
@pytest.mark.parametrize("mode", ["hybrid", "overlap", "la_only"])
@pytest.mark.parametrize("side_kf,keep,kv_split,delta", [
    (False, False, False, None), (True, False, False, None), (False, True, False, None),
    (True, True, False, None), (False, True, True, None), (False, True, True, "DELTA_Q"),
    (False, True, True, "SIDE_DA"), (False, True, True, "SIDE_DV"), (False, True, True, "SIDE_DV+SIDE_DA"),
    (False, True, True, "LOW_PRIORITY"), (False, True, True, "SIDE_QLIN")],
    ids=["states", "states-and-dk_feat", "kept-states", "kept-states-and-dk_feat", "kept-states-key-side-split",
         "kept-states-key-side-split-delta-in-the-query-side", "kept-states-key-side-split-da-on-the-side-stream",
         "kept-states-key-side-split-dv-on-the-side-stream", "kept-states-key-side-split-dv-and-da-on-the-side-stream",
         "kept-states-key-side-split-side-stream-at-the-default-streams-priority",
         "kept-states-key-side-split-query-side-linear-on-the-side-stream"])
def test_triton_gpu_side_stream_gives_the_bits_of_one_stream(mode, side_kf, keep, kv_split, delta, monkeypatch):
    """SIDE_STREAM runs the same kernels with the state passes (and, SIDE_KF, dk_feat) on a second stream: every
    output and gradient must be bit-identical to the one-stream run, through Triton's path and through replayed
    launch plans. A missing wait would let a kernel read a buffer before it is written; so that such a read cannot
    find the numbers of the run before, the allocator's cache is filled with NaN before every run, and each run
    holds every launch of one stream back by ~1 ms (the op's stream and the side stream in turn), so that a kernel
    whose wait is missing runs before its producer instead of after it by chance (session 10: with the dk_feat
    kernel's wait on the query side removed, the test without these passed). kv_split: the key side's dk launch
    goes before the wait for the side stream's reverse pass (KV_SPLIT). delta: DELTA_Q (the delta kernel on the side
    stream, delta from the query side's first launch), SIDE_DA (dA written on the side stream by the totals' pass,
    in segments of 16 chunks: four) and / or SIDE_DV (the key side's dv pass on the side stream), or SIDE_QLIN (the query
    side's linear launch on the side stream); the side stream at SIDE_PRIORITY's high priority, or (LOW_PRIORITY) at
    the default streams' 0."""
    softmax, linear = MODES[mode]
    kw = dict(window=64, softmax=softmax, linear=linear)
    inputs, do = make_inputs(1, 4096, 8, 2, 128, 128, torch.bfloat16, device="cuda", seed=11)
    for name in ("DELTA_Q", "SIDE_DA", "SIDE_DV", "SIDE_QLIN"):
        monkeypatch.setattr(chunk, name, name in (delta or "").split("+"))
    monkeypatch.setattr(chunk, "SIDE_PRIORITY", 0 if delta == "LOW_PRIORITY" else -1)
    if chunk.SIDE_DA:
        monkeypatch.setattr(chunk, "REV_SEG", 16)
    monkeypatch.setattr(chunk, "KEEP_STATES", keep)
    monkeypatch.setattr(chunk, "KV_SPLIT", kv_split)
    monkeypatch.setattr(chunk, "SIDE_KF", side_kf)
    monkeypatch.setattr(chunk, "REV_LIN", not side_kf)  # (SIDE_KF: the reverse states and dk_feat's own kernel)
    # (the threshold in both runs: DELTA_Q goes by it, on one stream too)
    monkeypatch.setattr(chunk, "SIDE_STREAM_MIN_CHUNKS", 1)
    monkeypatch.setattr(chunk, "SIDE_STREAM", False)
    ref_out, ref_grads = run(chunk.hybrid_attention_chunk, inputs, do, **kw)
    monkeypatch.setattr(chunk, "SIDE_STREAM", True)
    sides = record_results(monkeypatch, "_side")
    held = []  # the stream held back in this run: "op" or "side"
    start = chunk.PLANS.start

    def holding_start(key, stream):
        launch, op_stream = start(key, stream), torch.cuda.current_stream()

        def held_launch(fn, grid, tensors, rest):
            if (torch.cuda.current_stream() == op_stream) == (held[-1] == "op"):
                torch.cuda._sleep(2_000_000)
            return launch(fn, grid, tensors, rest)

        held_launch.done = launch.done
        return held_launch

    monkeypatch.setattr(chunk.PLANS, "start", holding_start)
    for stream in ("op", "side", "op", "side"):  # recorded, then replayed
        held.append(stream)
        _poison_cuda_cache()
        out, grads = run(chunk.hybrid_attention_chunk, inputs, do, **kw)
        assert_same_bits(out, grads, ref_out, ref_grads)
    assert len(sides) == 4 and all(s is not None for s in sides), "the backward did not take the side stream"
    # (a priority above the default streams' 0 where SIDE_PRIORITY asks for one: CUDA clamps it to the device's range)
    prios = {s.stream.priority for s in sides}
    assert prios == {0} if not chunk.SIDE_PRIORITY else len(prios) == 1 and min(prios) < 0, prios


def _poison_cuda_cache():
    """Fill every free block of the CUDA caching allocator with NaN bytes (0xFF), after adding free segments to it
    (one of 1 GiB for allocations of 1 MB and more, 2 MB ones for the smaller ones): the free parts of the segments
    still in use hold the buffers of the last run."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    fresh = [torch.empty(1 << 30, dtype=torch.uint8, device="cuda")]
    fresh += [torch.empty(1 << 19, dtype=torch.uint8, device="cuda") for _ in range(256)]  # 4 per 2 MB segment
    del fresh
    sizes = [b["size"] for seg in torch.cuda.memory_snapshot() for b in seg["blocks"] if b["state"] == "inactive"]
    # (exact sizes, largest first: the allocator's best fit then hands out each free block whole)
    fill = [torch.empty(n, dtype=torch.uint8, device="cuda") for n in sorted(sizes, reverse=True)]
    for x in fill:
        x.fill_(0xFF)
    del fill
    torch.cuda.synchronize()


def assert_near(label, inputs, do, kw, out, grads, ref_out, ref_grads, tol):
    """Two compiled runs of the op within ``tol`` relative RMS of each other, output and every gradient; dgamma
    relative to the magnitude of the terms it sums (in sliding-window-only mode they cancel: dgamma is 0 up to their
    rounding, and two roundings differ by their own size)."""
    pairs = [("out", out, ref_out)] + list(zip(GRAD_NAMES, grads, ref_grads))
    for name, g, ref in pairs:
        assert (g is None) == (ref is None), name
        if g is None:
            continue
        norm = ref.float().norm().item()
        if name == "dgamma":
            norm = max(norm, dgamma_term_magnitude(inputs, do, **kw))
        rel = (g.float() - ref.float()).norm().item() / norm
        print(f"{label} {name}: rel RMS difference {rel:.2e}, {(g != ref).sum().item()} of {g.numel()} differ")
        assert rel <= tol, f"{label} {name}: rel RMS difference {rel:.2e}"


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (run it through the device tool)")
@pytest.mark.parametrize("mode", ["hybrid", "overlap", "swa_only"])
def test_triton_gpu_window_blocks_match_block_pairs(mode, monkeypatch):
    """As the interpreter test, compiled, in bf16, at the benchmark's head dims. Compiled, the two layouts' sums fuse
    different products into their additions (FMA): the pair layout's forward computes each block's p0 and W, the
    window block's forward selects them from one block first, and likewise the backward's row sums r_n; so every
    result may differ in its last bits, within 1e-3 relative RMS (bf16's tolerance against the naive reference is
    2e-2). The forward's p0 blocks (FWD_P, which need window blocks) are off in both runs: they round p0 to bf16,
    which moves dq and dk by ~3.6e-3 relative RMS (the test below)."""
    softmax, linear = MODES[mode]
    kw = dict(window=64, softmax=softmax, linear=linear)
    inputs, do = make_inputs(1, 4096, 8, 2, 128, 128, torch.bfloat16, device="cuda", seed=13)
    monkeypatch.setattr(chunk, "FWD_P", False)
    monkeypatch.setattr(chunk, "WINDOW_BLOCKS", False)
    ref_out, ref_grads = run(chunk.hybrid_attention_chunk, inputs, do, **kw)
    monkeypatch.setattr(chunk, "WINDOW_BLOCKS", True)
    out, grads = run(chunk.hybrid_attention_chunk, inputs, do, **kw)
    assert_near(mode, inputs, do, kw, out, grads, ref_out, ref_grads, 1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (run it through the device tool)")
@pytest.mark.parametrize("mode", ["hybrid", "overlap", "la_only", "swa_only"])
def test_triton_gpu_forward_blocks_match_recomputation(mode, monkeypatch):
    """As the interpreter test, compiled, in bf16, at the benchmark's head dims: with the forward's blocks the
    backward reads p0 and a rounded to bf16 where it computed them in fp32 (and the forward's arg max, from the
    forward's scores), so the gradients may differ in their last bits: within 1e-2 relative RMS of recomputation
    (bf16's tolerance against the naive reference is 2e-2); the output is bit-identical (the stores change no
    value), and so is a forward under torch.no_grad, which stores nothing."""
    softmax, linear = MODES[mode]
    kw = dict(window=64, softmax=softmax, linear=linear)
    inputs, do = make_inputs(1, 4096, 8, 2, 128, 128, torch.bfloat16, device="cuda", seed=19)
    for value in (False, True):
        monkeypatch.setattr(chunk, "FWD_P", value)
        monkeypatch.setattr(chunk, "FWD_LIN", value)
        got = run(chunk.hybrid_attention_chunk, inputs, do, **kw)
        if not value:
            ref_out, ref_grads = got
    out, grads = got
    assert torch.equal(out, ref_out)
    with torch.no_grad():
        assert torch.equal(chunk.hybrid_attention_chunk(*inputs, **kw), ref_out)
    assert_near(mode, inputs, do, kw, out, grads, ref_out, ref_grads, 1e-2)


# the benchmark's tune variants that change what the kernels compute, at the benchmark's head dims (the bf16 tier
# above runs the defaults): reverse states per 2 chunks with the stored blocks (whose dk_feat kernel did not
# compile before session 9), kept states, window blocks, together; block pairs (the layout before the eleventh
# pass); dk_feat in the key side and the fused forward (if the fused forward's waiting were wrong this case would
# hang: after a change to it, run it alone under `timeout` first; it passed on an H200 in session 10)
OFF = {"REV_LIN": False}  # the reverse states in memory, which the options below change
OPTION_SETS = {"rev-stride-2": {**OFF, "REV_STATE_STRIDE": 2},
               "kept-window-rev2": {**OFF, "KEEP_STATES": True, "WINDOW_BLOCKS": True, "REV_STATE_STRIDE": 2},
               "block-pairs-rev2": {**OFF, "WINDOW_BLOCKS": False, "REV_STATE_STRIDE": 2},
               "block-pairs": {"WINDOW_BLOCKS": False},
               "dk_feat-in-the-key-side-8-warps": {**OFF, "KF_IN_KV": True, "LAUNCH": {"bwd_kv": (8, 1)}},
               "dk_feat-and-linear-dv-per-kv-head": {**OFF, "KF_DV": True},
               "dk_feat-and-linear-dv-per-kv-head-8-warps-rev2": {
                   **OFF, "KF_DV": True, "LAUNCH": {"bwd_kfdv": (8, 1)}, "REV_STATE_STRIDE": 2},
               "fused-forward": {"FUSED_FWD": True},
               "forward-blocks": {**OFF, "FWD_P": True, "FWD_LIN": True},
               "forward-blocks-rev2-fused": {**OFF, "FWD_P": True, "FWD_LIN": True, "REV_STATE_STRIDE": 2,
                                             "FUSED_FWD": True},
               "reverse-pass-on-do": {**OFF, "REV_DO": True},
               "reverse-pass-on-do-rev2": {**OFF, "REV_DO": True, "REV_STATE_STRIDE": 2},
               "register-caps-168": {"MAXNREG": {"bwd_q": 168, "state": 168, "bwd_kv": 168, "fwd": 168}},
               "reverse-states-in-memory": OFF,
               "linear-backward-in-the-reverse-scan-seg8": {"REV_SEG": 8},
               "linear-backward-in-the-reverse-scan-unsplit-8-warps": {"REV_SPLIT": 1, "LAUNCH": {"bwd_rev": (8, 2)}},
               "reverse-scan-sums-of-totals-seg2": {"REV_PREFIX": False, "REV_SEG": 2},
               "reverse-scan-from-prefixes-seg2-4-parts": {"REV_PREFIX": True, "REV_SEG": 2, "REV_SPLIT": 4},
               "reverse-scan-side-totals-128x128": {"REV_SEG": 2, "SIDE_STREAM_MIN_CHUNKS": 1,
                                                    "SIDE_STATE_BLOCKS": (128, 128)},
               # (bf16: z's row weights split in a high and a low part, which the interpreter's fp32 cases do not
               # reach)
               "reverse-scan-z-by-dots-seg2": {"REV_ZDOT": True, "REV_SEG": 2},
               "reverse-scan-z-by-dots": {"REV_ZDOT": True},
               # (bf16: the row weights rounded to bf16, one dot a step)
               "reverse-scan-z-by-one-bf16-dot-seg2": {"REV_ZDOT": True, "REV_ZDOT_BF16_ONE": True, "REV_SEG": 2},
               "reverse-scan-z-by-one-bf16-dot": {"REV_ZDOT": True, "REV_ZDOT_BF16_ONE": True},
               # the key side's dk launch beside the reverse scan on the side stream
               "key-side-split-side-stream": {"KV_SPLIT": True, "SIDE_STREAM_MIN_CHUNKS": 1},
               # the totals in the delta pass: a part a segment, 4 parts of 2 chunks a segment, on the side stream
               "totals-in-the-delta-pass-seg2": {"DELTA_TOTALS": True, "REV_SEG": 2},
               "totals-in-the-delta-pass-seg8-parts-of-2": {"DELTA_TOTALS": True, "REV_SEG": 8,
                                                            "DELTA_TOTALS_MIN_CHUNKS": 2},
               "totals-in-the-delta-pass-side-stream": {"DELTA_TOTALS": True, "REV_SEG": 4,
                                                        "SIDE_STREAM_MIN_CHUNKS": 1},
               # delta from the query side's first launch, the delta kernel / the totals' pass on the side stream
               "delta-in-the-query-side-side-stream": {"DELTA_Q": True, "SIDE_STREAM_MIN_CHUNKS": 1},
               "delta-in-the-query-side-totals-in-the-delta-pass": {"DELTA_Q": True, "DELTA_TOTALS": True,
                                                                    "REV_SEG": 4, "SIDE_STREAM_MIN_CHUNKS": 1},
               # dA written by the totals' pass on the side stream, from delta (SIDE_DA)
               "da-on-the-side-stream": {"SIDE_DA": True, "REV_SEG": 4, "SIDE_STREAM_MIN_CHUNKS": 1},
               "da-on-the-side-stream-parts-of-2": {"SIDE_DA": True, "REV_SEG": 8, "DELTA_TOTALS_MIN_CHUNKS": 2,
                                                    "SIDE_STREAM_MIN_CHUNKS": 1},
               # the key side's dv pass on the side stream (SIDE_DV): before the query side, or after its first
               # launch (gamma p0 from there, without FWD_P); with SIDE_DA
               "dv-on-the-side-stream": {"SIDE_DV": True, "SIDE_STREAM_MIN_CHUNKS": 1},
               "dv-on-the-side-stream-p0-from-the-query-side": {"SIDE_DV": True, "FWD_P": False,
                                                                "SIDE_STREAM_MIN_CHUNKS": 1},
               "dv-and-da-on-the-side-stream": {"SIDE_DV": True, "SIDE_DA": True, "REV_SEG": 4,
                                                "SIDE_STREAM_MIN_CHUNKS": 1},
               # the reverse scan and its totals on do, divided by Zd themselves (REV_SCALE_DO): no dA
               "reverse-scan-on-do-seg4": {"REV_SCALE_DO": True, "REV_SEG": 4},
               "reverse-scan-on-do-side-stream": {"REV_SCALE_DO": True, "REV_SEG": 4, "SIDE_STREAM_MIN_CHUNKS": 1},
               # the same with the dk_feat parts' state transposed (REV_ST), and REV_ST alone
               "reverse-scan-on-do-state-transposed": {"REV_SCALE_DO": True, "REV_ST": True, "REV_SEG": 4,
                                                       "SIDE_STREAM_MIN_CHUNKS": 1},
               "reverse-scan-state-transposed": {"REV_ST": True, "REV_SEG": 4},
               # segments of REV_SEG_LONG's length from its number of chunks
               "reverse-scan-segments-by-length": {"REV_SEG_LONG": (8, 2), "SIDE_STREAM_MIN_CHUNKS": 1},
               # REV_SEG_LONG's 16 halved to 4 chunks a segment: 4 segments of the 8 heads reach REV_MIN_SEGMENTS
               "reverse-scan-segments-by-length-floor": {"REV_SEG_LONG": (8, 16), "REV_SEG": 2, "REV_MIN_SEGMENTS": 32,
                                                         "SIDE_STREAM_MIN_CHUNKS": 1}}


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (run it through the device tool)")
@pytest.mark.parametrize("mode,w", [("la_only", 64), ("overlap", 64), ("hybrid", 33), ("hybrid", 64)])
@pytest.mark.parametrize("D", [64, 128])
def test_triton_gpu_reverse_scan_z_by_dots_where_it_is_on(mode, w, D):
    """REV_ZDOT at the defaults, 16-bit, with and without the same chunk's linear block: the split's dots where a
    dk_feat part holds REV_ZDOT_MIN_COLS columns or more (D = 128), the column sum below (D = 64, where the split gave
    wrong dk_feat on an H100 with CUR_LIN: experiments/rev_zdot_repro.py)."""
    assert chunk._rev_zdot(torch.bfloat16, D // chunk.REV_SPLIT) == (D == 128)
    softmax, linear = MODES[mode]
    inputs, do = make_inputs(1, 300, 4, 2, D, D, torch.bfloat16, device="cuda", seed=29)
    check_against_naive(chunk.hybrid_attention_chunk, inputs, do, torch.bfloat16, f"triton-gpu-zdot-{mode}-{D}",
                        window=w, softmax=softmax, linear=linear)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (run it through the device tool)")
@pytest.mark.parametrize("options", list(OPTION_SETS))
def test_triton_gpu_options_match_naive(options, monkeypatch):
    for name, value in OPTION_SETS[options].items():  # (a dict updates the setting's dict, as bench.with_settings)
        monkeypatch.setattr(chunk, name, {**getattr(chunk, name), **value} if isinstance(value, dict) else value)
    inputs, do = make_inputs(1, 1000, 8, 2, 128, 128, torch.bfloat16, device="cuda", seed=17)
    check_against_naive(chunk.hybrid_attention_chunk, inputs, do, torch.bfloat16, f"triton-gpu-{options}",
                        window=64, softmax=True, linear="outside")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (run it through the device tool)")
@pytest.mark.parametrize("setting", ["REV_PREFIX", "DELTA_TOTALS"])
def test_triton_gpu_reverse_scan_starts_at_scale(setting, monkeypatch):
    """The reverse scan's segment starts at the benchmark's shapes (16K tokens, 32 heads: 8 segments of 32 chunks)
    with ``setting`` on against off: from the prefixes of the totals (REV_PREFIX) against each segment summing the
    totals before it; from the totals of the delta pass (DELTA_TOTALS, 2 parts a segment) against the totals pass.
    The same output, and every gradient within bf16 rounding of the other (the sums run in another order), in each
    of three calls (the later ones replay the launch plan)."""
    inputs, do = make_inputs(1, 16384, 32, 8, 128, 128, torch.bfloat16, device="cuda", seed=23)
    kw = dict(window=64, softmax=True, linear="outside")
    monkeypatch.setattr(chunk, "REV_SEG", 32)
    monkeypatch.setattr(chunk, "DELTA_TOTALS_PROGRAMS", 512)
    monkeypatch.setattr(chunk, setting, False)
    ref_out, ref_grads = run(chunk.hybrid_attention_chunk, inputs, do, **kw)
    monkeypatch.setattr(chunk, setting, True)
    for _ in range(3):
        out, grads = run(chunk.hybrid_attention_chunk, inputs, do, **kw)
        assert torch.equal(out, ref_out)  # (the forward is untouched)
        for name, g, r in zip(GRAD_NAMES, grads, ref_grads):
            if r is not None:
                err = ((g.float() - r.float()).norm() / r.float().norm()).item()
                assert err < 5e-3, f"{name}: {err:.2e} from {setting} off"


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (run it through the device tool)")
def test_gpu_dispatcher_uses_triton_and_warns_once_on_fallback(monkeypatch):
    import linearize.kernels.hybrid_attention as ha

    inputs, _ = make_inputs(1, 300, 4, 2, 64, 64, torch.bfloat16, device="cuda")
    calls = []
    real = chunk.hybrid_attention_chunk
    monkeypatch.setattr(chunk, "hybrid_attention_chunk", lambda *a, **k: calls.append(1) or real(*a, **k))
    hybrid_attention(*inputs, window=64)
    assert calls, "auto backend on CUDA did not take the Triton path"
    monkeypatch.setattr(ha, "_warned", set())
    with pytest.warns(RuntimeWarning, match="window 128"):
        hybrid_attention(*inputs, window=128)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hybrid_attention(*inputs, window=128)  # second fallback for the same reason: silent


@pytest.mark.skipif(chunk is None, reason="triton is not installed")
def test_state_pass_takes_its_wide_launch_options_when_its_programs_outnumber_the_sms(monkeypatch):
    """The forward's state pass and the reverse scan's totals pass (off the side stream) launch with
    LAUNCH["state_wide"] when their grid (F / BK x Dv / BV blocks x B H x segments) has more programs than the device
    has SMs, else with LAUNCH["state"]; the backward's side-stream pass keeps LAUNCH["side_state"]; off CUDA a launch
    is never wide."""
    import types

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(
        multi_processor_count=132))
    monkeypatch.setattr(chunk, "LAUNCH", {**chunk.LAUNCH, "state": (4, 5), "state_wide": (4, 3), "side_state": (8, 2)})
    monkeypatch.setattr(chunk, "STATE_SEG", 0)
    gpu = torch.device("cuda", 0)
    assert not chunk._wide(132, gpu) and chunk._wide(133, gpu)
    assert not chunk._wide(10**6, torch.device("cpu"))

    def meta(wide, side=False, big=True, dtype=torch.bfloat16):
        return chunk._state_meta(128, 128, dtype, big, False, side, wide)

    assert (meta(False)["num_stages"], meta(True)["num_stages"]) == (5, 3)
    assert meta(True, side=True)["num_warps"] == 8 and meta(True, side=True)["num_stages"] == 2
    assert meta(True, big=False)["num_stages"] == 1 and meta(True, dtype=torch.float32)["num_stages"] == 1

    # the grid chunk_states launches is the count it asks about
    asked, stages = [], []
    monkeypatch.setattr(chunk, "_wide", lambda programs, device: asked.append(programs) or programs > 132)

    def record(fn, grid, tensors, rest):
        stages.append((grid, rest()[1]["num_stages"]))

    for batch in (1, 2):
        x = torch.zeros(batch, 256, 32, 128, dtype=torch.bfloat16)
        y = torch.zeros(batch, 256, 8, 128, dtype=torch.bfloat16)
        chunk.chunk_states(x, y, None, heads_per_y=4, reverse=False, dtype=torch.bfloat16, big=True, launch=record)
    blocks = (128 // chunk.STATE_BF) * (128 // chunk.STATE_BV)
    assert asked == [blocks * 32, blocks * 64]
    assert stages == [((blocks, 32, 1), 5 if blocks * 32 <= 132 else 3), ((blocks, 64, 1), 3)]

    # the reverse scan's totals pass off the side stream (2 segments: one totals launch), then the scan itself
    monkeypatch.setattr(chunk, "REV_SEG", 2)
    asked.clear(), stages.clear()
    for batch in (1, 2):
        qf = torch.zeros(batch, 256, 32, 128, dtype=torch.bfloat16)
        v = torch.zeros(batch, 256, 8, 128, dtype=torch.bfloat16)
        chunk.rev_linear_backward(qf, qf, v, torch.zeros_like(qf), torch.zeros(batch * 32, 256), G=4, window=64,
                                  lin=1, dtype=torch.bfloat16, big=True, launch=record)
    assert asked == [blocks * 32, blocks * 64]
    assert [s for s in stages if s[0][0] == blocks and s[0][2] == 1] == [
        ((blocks, 32, 1), 5 if blocks * 32 <= 132 else 3), ((blocks, 64, 1), 3)]
