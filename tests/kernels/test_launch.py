"""kernels/launch.py: the cached launch passes a compiled kernel's launcher exactly what JITFunction.run would, and
misses whenever anything Triton specialises on changes. No GPU: a real JITFunction whose compile-and-launch step
(``run``) and the driver are replaced by recorders; the GPU tier runs every kernel through the real thing."""

from __future__ import annotations

import inspect
import types

import pytest
import torch
import triton.language as tl
from triton.runtime.jit import JITFunction

from linearize.kernels import launch as L


def _kernel(X, Y, n, scale, BLOCK: tl.constexpr, MODE: tl.constexpr = 2, FLAG: tl.constexpr = False):
    pass


class _Compiled:
    def __init__(self):
        self.function, self.packed_metadata, self.calls = object(), object(), []

    def launch_metadata(self, grid, stream, *args):
        self.md_args = args  # a launch hook (profiler) gets the tensors themselves
        return ("md", grid, stream)

    def run(self, *args):
        self.calls.append(args)


@pytest.fixture
def fn(monkeypatch):
    jf = JITFunction(_kernel)
    jf.compiled, jf.slow = [], []

    def run(*args, grid, warmup, **kwargs):  # what fn[grid](...) reaches: bind, specialise, compile, launch
        jf.slow.append((grid, args, kwargs))
        jf.compiled.append(_Compiled())
        return jf.compiled[-1]

    jf.run = run
    active = types.SimpleNamespace(get_current_device=lambda: 0, get_current_stream=lambda device: 1234 + device)
    monkeypatch.setattr(L, "driver", types.SimpleNamespace(active=active))
    monkeypatch.setattr(L, "_cache", {})
    monkeypatch.setattr(L, "ENABLED", True)
    return jf


def _bound(args, meta):
    """The reference: Python's own binding of the call to the kernel's signature, defaults applied, as Triton's
    binder does (launch options such as num_warps are not parameters)."""
    params = {k: v for k, v in meta.items() if k in inspect.signature(_kernel).parameters}
    b = inspect.signature(_kernel).bind(*args, **params)
    b.apply_defaults()
    return list(b.arguments.values())


def test_second_launch_goes_to_the_launcher_with_every_parameter(fn):
    x, y = torch.randn(64), torch.randn(64)
    args, meta = (x, y, 48, 0.5), dict(BLOCK=16, FLAG=True, num_warps=4, num_stages=2)
    L.launch(fn, (3, 2), *args, **meta)
    assert len(fn.slow) == 1 and fn.slow[0] == ((3, 2), args, meta)
    L.launch(fn, (5,), *args, **meta)
    assert len(fn.slow) == 1, "the same signature compiled again"
    (call,) = fn.compiled[0].calls
    grid, stream, function, packed, md, enter, exit_ = call[:3], call[3], call[4], call[5], call[6], call[7], call[8]
    assert grid == (5, 1, 1) and stream == 1234
    assert function is fn.compiled[0].function and packed is fn.compiled[0].packed_metadata
    assert md == ("md", (5,), 1234) and fn.compiled[0].md_args[:2] == (x, y)
    assert (enter, exit_) == (L.knobs.runtime.launch_enter_hook, L.knobs.runtime.launch_exit_hook)
    # the launcher gets tensors as addresses (it does not check ints); everything else as bound
    ref = [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in _bound(args, meta)]
    assert list(call[9:]) == ref == [x.data_ptr(), y.data_ptr(), 48, 0.5, 16, 2, True]


@pytest.mark.parametrize(
    "change",
    ["int value", "tensor dtype", "tensor alignment", "constexpr", "num_warps", "keyword order", "device"],
)
def test_anything_triton_specialises_on_is_a_miss(fn, monkeypatch, change):
    x, y = torch.randn(64), torch.randn(64)
    args, meta = [x, y, 48, 0.5], dict(BLOCK=16, num_warps=4)
    L.launch(fn, (1,), *args, **meta)
    if change == "int value":
        args[2] = 49
    elif change == "tensor dtype":
        args[1] = y.double()
    elif change == "tensor alignment":
        args[0] = x[1:]  # 4 bytes off a 16-byte boundary
    elif change == "constexpr":
        meta["BLOCK"] = 32
    elif change == "num_warps":
        meta["num_warps"] = 8
    elif change == "keyword order":
        meta = dict(num_warps=4, BLOCK=16)
    else:
        monkeypatch.setattr(L.driver.active, "get_current_device", lambda: 1)
    L.launch(fn, (1,), *args, **meta)
    assert len(fn.slow) == 2, f"a changed {change} reused the kernel compiled before"
    assert not fn.compiled[0].calls


def test_a_float_value_is_not_a_signature(fn):
    """Triton does not specialise on float arguments: a new scale reuses the kernel (and is passed on)."""
    x, y = torch.randn(64), torch.randn(64)
    L.launch(fn, (1,), x, y, 48, 0.5, BLOCK=16)
    L.launch(fn, (1,), x, y, 48, 0.25, BLOCK=16)
    assert len(fn.slow) == 1 and fn.compiled[0].calls[0][9 + 3] == 0.25


def test_disabled_and_uncompiled_launches_take_the_normal_path(fn, monkeypatch):
    x, y = torch.randn(64), torch.randn(64)
    monkeypatch.setattr(L, "ENABLED", False)
    for _ in range(2):
        L.launch(fn, (1,), x, y, 48, 0.5, BLOCK=16)
    assert len(fn.slow) == 2
    monkeypatch.setattr(L, "ENABLED", True)
    fn.run = lambda *a, grid, warmup, **k: fn.slow.append(grid)  # returns None, as the interpreter does
    for _ in range(2):
        L.launch(fn, (1,), x, y, 48, 0.5, BLOCK=16)
    assert len(fn.slow) == 4


def test_least_recently_used_signatures_are_dropped(fn, monkeypatch):
    monkeypatch.setattr(L, "MAX_SIGNATURES", 3)
    x, y = torch.randn(64), torch.randn(64)
    for n in (1, 2, 3, 1, 4):  # 1 is used again before 4 arrives: 2 is the one dropped
        L.launch(fn, (1,), x, y, n + 16, 0.5, BLOCK=16)
    assert len(fn.slow) == 4
    for n in (1, 3, 4):
        L.launch(fn, (1,), x, y, n + 16, 0.5, BLOCK=16)
    assert len(fn.slow) == 4
    L.launch(fn, (1,), x, y, 2 + 16, 0.5, BLOCK=16)
    assert len(fn.slow) == 5
