"""Launch plans: Triton launches whose arguments are bound once per key, then replayed through the launcher alone.

Triton's ``fn[grid](*args, **meta)`` binds every argument to the signature, specialises each one (pointer alignment,
integers equal to 1 or divisible by 16), hashes the result to find the compiled kernel and only then calls its
launcher: ~30 us of host time per launch on the benchmark's H200 host, of which the launcher is ~10 us
(``bench --host-breakdown``). An op whose launches are fixed by a key of its own (shapes, strides, dtype, mode,
module switches) needs that work once per key. The first call with a key goes through ``fn[grid]`` and records each
launch's compiled kernel, grid and non-tensor arguments; later calls hand the tensors straight to the launchers.

The key is the caller's promise: equal keys mean equal grids, scalars, constexprs and launch sequence, and tensors of
the same alignment class on the same kind of device (a replay hands the launcher the tensors' addresses, which it
does not check the way it checks a tensor's). Callers put every input's shape and strides in it and leave plans off
(``key=None``) for inputs whose addresses are not 16-byte aligned, under the interpreter and while launch hooks
(profilers) are set.

A launch site reads ``launch(fn, grid, tensors, rest)``: ``tensors`` are the kernel's leading tensor arguments and
``rest()`` returns ``(scalars, meta)``, the remaining positional arguments and the keyword ones (constexprs and
``num_warps`` / ``num_stages``). ``rest`` is called only when a launch is not replayed.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Hashable, Sequence

_OPTIONS = frozenset({"num_warps", "num_stages", "num_ctas", "maxnreg"})


def direct(fn, grid, tensors: Sequence, rest: Callable[[], tuple[tuple, dict]]):
    """Launch through Triton's own path (no plan)."""
    scalars, meta = rest()
    return fn[grid](*tensors, *scalars, **meta)


class _Record:
    """Launches through Triton's path and records them; the plan is kept only once the op call finished."""

    __slots__ = ("plans", "key", "entries")

    def __init__(self, plans: Plans, key: Hashable):
        self.plans, self.key, self.entries = plans, key, []

    def __call__(self, fn, grid, tensors, rest):
        scalars, meta = rest()
        kernel = fn[grid](*tensors, *scalars, **meta)
        if kernel is None or self.entries is None:  # not compiled (warmup) or not a real kernel: record nothing
            self.entries = None
            return kernel
        tail = self.plans.bind(fn, tensors, scalars, meta)[len(tensors):]
        g = tuple(grid) + (1,) * (3 - len(grid))
        self.entries.append((fn, grid, kernel.run, kernel.function, kernel.packed_metadata, g[0], g[1], g[2], tail))
        return kernel

    def done(self):
        if self.entries is not None:
            self.plans.store(self.key, tuple(self.entries))


class _Replay:
    """Calls the recorded launchers in the recorded order with this call's tensors, each on the stream current at
    its launch (as Triton's own launches are): an op may send some of its launches to another stream."""

    __slots__ = ("entries", "i", "stream")

    def __init__(self, entries, stream: Callable[[], int]):
        self.entries, self.i, self.stream = entries, 0, stream

    def __call__(self, fn, grid, tensors, rest):
        fn0, grid0, run, function, packed, g0, g1, g2, tail = self.entries[self.i]
        if fn0 is not fn or grid0 != grid:  # a key that misses something the launches depend on
            raise RuntimeError(f"launch plan out of step: launch {self.i} is {fn} on grid {grid}, the plan recorded "
                               f"{fn0} on grid {grid0}")
        self.i += 1
        # the tensors as their addresses: the launcher takes an int as the pointer itself, where for a tensor it calls
        # data_ptr() and asks the driver whether the address is a device one (cuPointerGetAttribute, a driver call
        # per pointer argument and launch), which the recording launch already checked for these tensors' key
        run(g0, g1, g2, self.stream(), function, packed, None, None, None, *[t.data_ptr() for t in tensors], *tail)

    def done(self):
        if self.i != len(self.entries):
            raise RuntimeError(f"launch plan out of step: {self.i} launches, the plan recorded {len(self.entries)}")


class _Direct:
    __slots__ = ()

    def __call__(self, fn, grid, tensors, rest):
        return direct(fn, grid, tensors, rest)

    def done(self):
        pass


_DIRECT = _Direct()


class Plans:
    """Launch plans of one op by key, the ``limit`` most recently used ones kept.

    ``start(key, stream)`` returns the launch function of one op call: a replay when a finished plan has this key,
    otherwise a recorder (or Triton's plain path when ``key`` is None); call its ``done()`` after the
    op's last launch. ``stream`` is a callable returning the raw CUDA stream current at a launch (read at every
    replayed launch).
    """

    def __init__(self, limit: int = 256):
        self.limit = limit
        # key -> [last use, entries]: a replay finds its plan with one hash of the key and marks its use in place
        # (an OrderedDict's move_to_end would hash the key again, on the way to the op's first launch)
        self._plans: dict = {}
        self._clock = 0
        self._signatures: dict = {}
        self.replays = 0  # replayed op calls, for tests and the benchmark

    def start(self, key: Hashable | None, stream: Callable[[], int]):
        if key is None:
            return _DIRECT
        slot = self._plans.get(key)
        if slot is None:
            return _Record(self, key)
        self._clock += 1
        slot[0] = self._clock
        self.replays += 1
        return _Replay(slot[1], stream)

    def store(self, key, entries):
        self._clock += 1
        self._plans[key] = [self._clock, entries]
        if len(self._plans) > self.limit:  # (the least recently used out: a scan, only when a new plan is stored)
            for old, _ in sorted(self._plans.items(), key=lambda item: item[1][0])[:len(self._plans) - self.limit]:
                del self._plans[old]

    def signature(self, fn) -> inspect.Signature:
        sig = self._signatures.get(fn)
        if sig is None:
            sig = self._signatures[fn] = inspect.signature(fn.fn)
        return sig

    def bind(self, fn, tensors: Sequence, scalars: Sequence, meta: dict) -> tuple:
        """Every argument of ``fn`` in signature order, as its compiled launcher takes them after the launch
        metadata: the tensors, the scalars, then the constexprs of ``meta`` (launch options left out), defaults
        applied."""
        consts = {k: v for k, v in meta.items() if k not in _OPTIONS}
        bound = self.signature(fn).bind(*tensors, *scalars, **consts)
        bound.apply_defaults()
        return tuple(bound.arguments.values())

    def clear(self):
        self._plans.clear()

    def __len__(self):
        return len(self._plans)
