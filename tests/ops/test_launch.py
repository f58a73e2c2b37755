"""Launch plans (kernels/launch.py) against Triton's own launch path, with a stand-in for a @triton.jit function.

The stand-in records what Triton's ``fn[grid](...)`` would receive and returns a compiled-kernel stand-in whose
``run`` records what the launcher receives, in the launcher's calling convention (grid, stream, function, packed
metadata, launch metadata, two hooks, then every bound argument in signature order, constexprs included). The
replayed launches of real kernels are compared with Triton's path on the GPU (test_hybrid_attention.py).
"""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch

from linearize.kernels.launch import Plans, direct


class FakeCompiled:
    def __init__(self, log):
        self.log, self.function, self.packed_metadata = log, object(), ("packed",)

    def run(self, *args):
        self.log.append(("launcher", args))


class FakeJit:
    """Stands for ``triton.jit(kernel)``: ``fn`` is the Python signature, ``fn[grid](...)`` the full launch."""

    def __init__(self, log):
        self.log, self.compiled = log, FakeCompiled(log)

        def kernel(X, Y, n, scale, BLOCK: int, FLAG: bool = False):  # constexprs last, one with a default
            pass

        self.fn = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append(("triton", grid, args, kwargs))
            return self.compiled

        return launch


def rest_of(log, scalars, meta):
    def rest():
        log.append("rest")
        return scalars, meta

    return rest


def test_first_call_records_through_triton_then_replays_through_the_launcher():
    log = []
    fn, plans = FakeJit(log), Plans()
    x, y = torch.zeros(4), torch.ones(4)
    launch = plans.start(("k", 1), stream=lambda: 77)
    launch(fn, (3, 2), (x, y), rest_of(log, (5, 0.5), dict(BLOCK=16, num_warps=4)))
    launch.done()
    assert log == ["rest", ("triton", (3, 2), (x, y, 5, 0.5), dict(BLOCK=16, num_warps=4))]
    assert len(plans) == 1 and plans.replays == 0

    log.clear()
    x2, y2 = torch.zeros(4), torch.ones(4)
    launch = plans.start(("k", 1), stream=lambda: 77)
    launch(fn, (3, 2), (x2, y2), rest_of(log, (5, 0.5), dict(BLOCK=16, num_warps=4)))
    launch.done()
    (name, args), = log  # rest() was not called: the arguments come from the plan
    assert name == "launcher" and plans.replays == 1
    g0, g1, g2, stream, function, packed, meta, enter, exit_, *bound = args
    assert (g0, g1, g2, stream) == (3, 2, 1, 77)
    assert function is fn.compiled.function and packed == fn.compiled.packed_metadata
    assert (meta, enter, exit_) == (None, None, None)
    # this call's tensors (as their addresses), then the recorded scalars and constexprs in signature order, the
    # default applied and the launch options (num_warps) left out
    assert bound[0] == x2.data_ptr() and bound[1] == y2.data_ptr() and bound[2:] == [5, 0.5, 16, False]


def test_a_replay_sends_each_launch_to_the_stream_current_at_that_launch():
    """The op sends some launches to a second stream: a replay reads the stream at every launch, not once."""
    log = []
    fn, plans = FakeJit(log), Plans()
    x = torch.zeros(2)
    launch = plans.start("k", stream=lambda: 0)
    for _ in range(3):
        launch(fn, (1,), (x, x), rest_of(log, (1, 1.0), dict(BLOCK=1)))
    launch.done()
    log.clear()
    current = iter([5, 9, 5])
    launch = plans.start("k", stream=lambda: next(current))
    for _ in range(3):
        launch(fn, (1,), (x, x), rest_of(log, (1, 1.0), dict(BLOCK=1)))
    launch.done()
    assert [args[3] for _, args in log] == [5, 9, 5]


def test_bind_gives_every_argument_in_signature_order_without_launch_options():
    fn, x, y = FakeJit([]), torch.zeros(1), torch.ones(1)
    bound = Plans().bind(fn, (x, y), (5, 0.5), dict(BLOCK=16, num_warps=4, num_stages=2))
    assert bound[0] is x and bound[1] is y and bound[2:] == (5, 0.5, 16, False)


def test_other_keys_record_their_own_plan_and_the_least_recent_goes_past_the_limit():
    log = []
    fn, plans = FakeJit(log), Plans(limit=2)
    x = torch.zeros(2)
    for key in ("a", "b", "a", "c"):
        launch = plans.start(key, stream=lambda: 0)
        launch(fn, (1,), (x, x), rest_of(log, (1, 1.0), dict(BLOCK=1)))
        launch.done()
    assert [e[0] if isinstance(e, tuple) else e for e in log].count("triton") == 3  # a, b, c recorded; a replayed
    assert len(plans) == 2
    log.clear()
    launch = plans.start("b", stream=lambda: 0)  # "b" was used least recently: dropped for "c"
    launch(fn, (1,), (x, x), rest_of(log, (1, 1.0), dict(BLOCK=1)))
    assert log[0] == "rest"


def test_plan_is_kept_only_when_the_call_finished():
    log = []
    fn, plans = FakeJit(log), Plans()
    x = torch.zeros(2)
    launch = plans.start("k", stream=lambda: 0)
    launch(fn, (1,), (x, x), rest_of(log, (1, 1.0), dict(BLOCK=1)))
    # the op raised before its last launch: done() is never called
    assert len(plans) == 0
    assert plans.start("k", stream=lambda: 0).__class__.__name__ == "_Record"


def test_replay_out_of_step_raises():
    log = []
    fn, other, plans = FakeJit(log), FakeJit(log), Plans()
    x = torch.zeros(2)
    launch = plans.start("k", stream=lambda: 0)
    for _ in range(2):
        launch(fn, (1,), (x, x), rest_of(log, (1, 1.0), dict(BLOCK=1)))
    launch.done()
    launch = plans.start("k", stream=lambda: 0)
    with pytest.raises(RuntimeError, match="out of step: launch 0"):
        launch(other, (1,), (x, x), rest_of(log, (1, 1.0), dict(BLOCK=1)))
    launch = plans.start("k", stream=lambda: 0)
    with pytest.raises(RuntimeError, match=r"on grid \(2,\), the plan recorded .* on grid \(1,\)"):
        launch(fn, (2,), (x, x), rest_of(log, (1, 1.0), dict(BLOCK=1)))
    launch = plans.start("k", stream=lambda: 0)
    launch(fn, (1,), (x, x), rest_of(log, (1, 1.0), dict(BLOCK=1)))
    with pytest.raises(RuntimeError, match="1 launches, the plan recorded 2"):
        launch.done()


def test_without_a_key_every_launch_goes_through_triton():
    log = []
    fn, plans = FakeJit(log), Plans()
    x = torch.zeros(2)
    for _ in range(3):
        launch = plans.start(None, stream=lambda: 0)
        launch(fn, (1,), (x, x), rest_of(log, (1, 1.0), dict(BLOCK=1)))
        launch.done()
    assert sum(isinstance(e, tuple) and e[0] == "triton" for e in log) == 3 and len(plans) == 0
    log.clear()
    assert direct(fn, (2,), (x,), rest_of(log, (x, 3, 1.0), dict(BLOCK=2))) is fn.compiled


def test_launches_that_return_no_kernel_are_not_recorded():
    """Triton's interpreter returns no compiled kernel: nothing to replay, so no plan is kept."""
    log = []
    fn, plans = FakeJit(log), Plans()
    fn.compiled = None
    x = torch.zeros(2)
    launch = plans.start("k", stream=lambda: 0)
    launch(fn, (1,), (x, x), rest_of(log, (1, 1.0), dict(BLOCK=1)))
    launch.done()
    assert len(plans) == 0


def test_plan_key_of_the_hybrid_op(monkeypatch):
    """The op's key covers shapes, strides, dtype and settings, and is None for inputs off 16-byte alignment, with
    plans switched off, while torch.compile traces and under the interpreter."""
    from linearize.kernels.hybrid_attention import chunk

    monkeypatch.setattr(chunk, "INTERPRETED", False)
    q, k = torch.randn(1, 70, 2, 16), torch.randn(1, 70, 1, 16)
    key = chunk._plan_key("fwd", q, k, extra=(64,))
    assert key is not None and key == chunk._plan_key("fwd", q.clone(), k.clone(), extra=(64,))
    assert key != chunk._plan_key("fwd", q[:, :69], k[:, :69], extra=(64,))  # another T
    assert key != chunk._plan_key("fwd", q.transpose(1, 2).contiguous().transpose(1, 2), k, extra=(64,))  # strides
    assert key != chunk._plan_key("fwd", q, k, extra=(32,))  # another window
    assert key != chunk._plan_key("fwd", q.bfloat16(), k.bfloat16(), extra=(64,))
    monkeypatch.setattr(chunk, "Q_SPLIT", not chunk.Q_SPLIT)
    assert key != chunk._plan_key("fwd", q, k, extra=(64,))  # a module setting
    off = torch.randn(1 + 70 * 2 * 16)[1:].view(1, 70, 2, 16)  # 4 bytes past an aligned address
    assert chunk._plan_key("fwd", off, k, extra=(64,)) is None
    if torch.cuda.is_available():  # a host tensor beside a GPU one: Triton's path raises, a replay would not check
        assert chunk._plan_key("fwd", q.cuda(), k, extra=(64,)) is None
    monkeypatch.setattr(chunk, "LAUNCH_PLANS", False)
    assert chunk._plan_key("fwd", q, k, extra=(64,)) is None
    monkeypatch.setattr(chunk, "LAUNCH_PLANS", True)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert chunk._plan_key("fwd", q, k, extra=(64,)) is None
    monkeypatch.undo()
    monkeypatch.setattr(chunk, "INTERPRETED", True)
    assert chunk._plan_key("fwd", q, k, extra=(64,)) is None


def test_plan_key_covers_every_setting_of_the_op(monkeypatch):
    """A replayed plan launches the kernels its first call compiled, with the buffers that call allocated: a setting
    of chunk.py missing from the key would replay a plan of other settings (e.g. window blocks read as block pairs).
    Every setting the benchmark knows (bench.KNOBS) and LAUNCH, changed alone, must change the key."""
    from linearize.kernels import bench
    from linearize.kernels.hybrid_attention import chunk

    monkeypatch.setattr(chunk, "INTERPRETED", False)
    q, k = torch.randn(1, 70, 2, 16), torch.randn(1, 70, 1, 16)
    key = chunk._plan_key("fwd", q, k, extra=(64,))
    for name in (*bench.KNOBS, "LAUNCH"):
        if name == "LAUNCH_PLANS":  # (off: no key at all, checked above)
            continue
        value = getattr(chunk, name)
        if isinstance(value, bool):
            other = not value
        elif isinstance(value, int):
            other = value * 2 or 1
        elif value is None:
            other = (32, 32)
        elif isinstance(value, Mapping):
            other = {**value, "fwd": (8, 1)}
        else:
            other = tuple(2 * x for x in value)
        with monkeypatch.context() as m:
            m.setattr(chunk, name, other)
            assert chunk._plan_key("fwd", q, k, extra=(64,)) != key, f"{name} is not part of the plan key"


def test_settings_object_of_the_key_follows_assignments_and_launch_settings_are_read_only(monkeypatch):
    """The key's settings part (``_switches``) is cached between calls: an assignment to the module (monkeypatch, the
    benchmark's variants) must rebuild it, settings equal to earlier ones must give the same object (keys equal by
    identity, plans found again), and LAUNCH / MAXNREG cannot change in place, where no assignment would be seen."""
    from linearize.kernels.hybrid_attention import chunk

    first = chunk._switches()
    assert chunk._switches() is first
    with monkeypatch.context() as m:
        m.setattr(chunk, "REV_SEG", chunk.REV_SEG * 2)
        assert chunk._switches() is not first and chunk._switches().values != first.values
        m.setattr(chunk, "LAUNCH", {**chunk.LAUNCH, "fwd": (8, 1)})  # a plain dict, kept as a read-only copy
        assert chunk.LAUNCH["fwd"] == (8, 1) and tuple(chunk.LAUNCH.items()) in chunk._switches().values
        with pytest.raises(TypeError):
            chunk.LAUNCH["fwd"] = (4, 2)
        with pytest.raises(TypeError):
            chunk.MAXNREG["fwd"] = 168
    assert chunk._switches() is first  # the same settings again: the same object


def test_state_geometry_cache_follows_the_settings(monkeypatch):
    """The state pass's geometry is cached per (T, F, Dv, direction, side): a setting assigned afterwards (the
    stride of the stored states, the tiles, segments) must not be answered from the cache."""
    from linearize.kernels.hybrid_attention import chunk

    T = 64 * 40
    NS, BF, BDV, blocks, L, nseg = chunk._state_geometry(T, 128, 128, False, False)
    assert (NS, BF, BDV, L, nseg) == (chunk._n_states(T, False), 128, 128, NS, 1)
    assert blocks == (128 // chunk.STATE_BF) * (128 // chunk.STATE_BV)
    monkeypatch.setattr(chunk, "STATE_STRIDE", chunk.STATE_STRIDE * 2)
    assert chunk._state_geometry(T, 128, 128, False, False)[0] == -(-40 // chunk.STATE_STRIDE)
    monkeypatch.setattr(chunk, "STATE_SEG", 4)
    assert chunk._state_geometry(T, 128, 128, False, False)[4:] == (4, -(-NS // 2 // 4))
    monkeypatch.setattr(chunk, "STATE_BF", 32)
    assert chunk._state_geometry(T, 128, 128, False, False)[3] == 4 * (128 // chunk.STATE_BV)


def test_output_geometry_cache_follows_the_settings(monkeypatch):
    """The output kernel's geometry (padded dims, Dv block, grid) is cached per shape: a setting assigned afterwards
    (the grid's head grouping, the Dv block) must not be answered from the cache."""
    from linearize.kernels.hybrid_attention import chunk

    monkeypatch.setattr(chunk, "GROUP_HEADS", True)
    BD, BDV, BF, ndw, BV, grid = chunk._output_geometry(2, 64 * 10, 8, 4, 96, 128, 64, 1, 64)
    assert (BD, BDV, BF, BV) == (128, 128, 64, min(chunk.OUT_BV, 128))
    assert ndw == chunk._ndw(1, 64) and grid == (10 * 4, 128 // BV, 2 * 8 // 4)
    monkeypatch.setattr(chunk, "GROUP_HEADS", False)
    assert chunk._output_geometry(2, 64 * 10, 8, 4, 96, 128, 64, 1, 64)[5] == (10, 128 // BV, 16)
    monkeypatch.setattr(chunk, "OUT_BV", 64)
    assert chunk._output_geometry(2, 64 * 10, 8, 4, 96, 128, 64, 1, 64)[4:] == (64, (10, 2, 16))
