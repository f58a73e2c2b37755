"""Triton launches without Triton's per-call argument binding: what decides the host time of short sequences.

``fn[grid](*args, **meta)`` goes through ``JITFunction.run`` on every call: it binds the arguments to the signature,
specialises each one, builds and hashes a cache key, checks the kernel's globals, then calls the compiled kernel's
launcher. With 20-40 arguments that is most of the ~100 us a launch of the hybrid-attention kernels cost on the
H200 machines' host (2K tokens: nine launches, 1.7 ms host time for 0.34 ms of kernels).

``launch(fn, grid, *args, **meta)`` does the same launch. The first call of each *launch signature* goes through
``fn[grid]`` (compiling if needed), which returns the compiled kernel; it is cached, and later calls with the same
signature call its launcher directly, with exactly the arguments ``JITFunction.run`` passes it (every parameter of
the kernel in signature order, constexprs and defaults included, after the grid, stream, function handle, packed
metadata, launch metadata and the launch hooks).

Tensors reach the launcher as their addresses (Python ints), which it takes as they are: the check it otherwise
makes of every pointer (``cuPointerGetAttribute``, which rejects CPU tensors) was made by the signature's first
launch, and the signature holds each tensor's device.

The signature is a superset of what Triton specialises a kernel on: every int argument's exact value (Triton keys
on ==1, divisibility by 16 and the integer width), every tensor's dtype, device and 16-byte alignment, the
types of the other arguments, and every keyword (constexprs, num_warps, num_stages). So a cached kernel is always
the one ``fn[grid]`` would run for these arguments. Float arguments are not specialised by Triton and enter by type
only. Not cached: the interpreter's functions (``TRITON_INTERPRET=1``), which compile nothing. Not checked on a
cached launch: that the kernel's module globals kept the values it was compiled with (Triton raises when they
change; nothing in ``kernels/`` changes them).
``ENABLED = False`` sends every launch through ``fn[grid]``.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict

import torch
from triton import knobs
from triton.runtime import driver
from triton.runtime.jit import JITFunction

ENABLED = True
MAX_SIGNATURES = 256  # per kernel; least recently used signatures are dropped beyond it

_params: dict[int, tuple[tuple[str, ...], dict]] = {}
_cache: dict[int, OrderedDict] = {}


def _signature_of(fn) -> tuple[tuple[str, ...], dict]:
    """(parameter names in order, {name: default} for parameters with defaults) of a JIT function."""
    got = _params.get(id(fn))
    if got is None:
        sig = inspect.signature(fn.fn)
        names = tuple(sig.parameters)
        defaults = {n: p.default for n, p in sig.parameters.items() if p.default is not inspect.Parameter.empty}
        got = _params[id(fn)] = (names, defaults)
    return got


def _arg_key(x):
    if isinstance(x, torch.Tensor):
        return (x.dtype, x.device, x.data_ptr() % 16 == 0)
    if isinstance(x, int):  # bool included, as its own type
        return (type(x), x)
    return type(x)


def launch_key(device: int, args: tuple, meta: dict) -> tuple:
    """The launch signature of fn(*args, **meta) on the current device: see the module docstring. Keywords enter
    in the order given (the same launch site always gives them in the same order; another order is only a miss)."""
    return (device, tuple(map(_arg_key, args)), tuple(meta.items()))


def bound_values(fn, args: tuple, meta: dict) -> list:
    """Every parameter of fn in signature order, as JITFunction.run binds them: positional args, then keywords,
    then defaults (options such as num_warps are not parameters and are left out)."""
    names, defaults = _signature_of(fn)
    vals = list(args)
    for name in names[len(args):]:
        vals.append(meta[name] if name in meta else defaults[name])
    return vals


def launch(fn, grid: tuple, *args, **meta):
    """fn[grid](*args, **meta), through the compiled kernel's launcher when this signature was launched before."""
    if not ENABLED or not isinstance(fn, JITFunction):  # the interpreter's functions are not JITFunctions
        return fn[grid](*args, **meta)
    device = driver.active.get_current_device()
    key = launch_key(device, args, meta)
    cache = _cache.setdefault(id(fn), OrderedDict())
    kernel = cache.get(key)
    if kernel is None:
        kernel = fn[grid](*args, **meta)
        if all(hasattr(kernel, a) for a in ("run", "function", "packed_metadata", "launch_metadata")):
            cache[key] = kernel
            if len(cache) > MAX_SIGNATURES:
                cache.popitem(last=False)
        return kernel
    cache.move_to_end(key)
    vals = bound_values(fn, args, meta)
    stream = driver.active.get_current_stream(device)
    g = tuple(grid) + (1,) * (3 - len(grid))
    md = kernel.launch_metadata(grid, stream, *vals)  # None unless a launch hook (a profiler) is set
    # tensors as their addresses: the launcher then skips its per-pointer cuPointerGetAttribute check, which the
    # first launch of this signature made (the key pins every tensor's device)
    vals = [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in vals]
    kernel.run(g[0], g[1], g[2], stream, kernel.function, kernel.packed_metadata, md,
               knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *vals)
    return kernel
