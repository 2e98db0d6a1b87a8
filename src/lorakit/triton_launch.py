"""Launching lorakit's Triton kernels with less host time per launch.

Triton's own launch, `kernel[grid](*args, **meta)` (JITFunction.run), binds and specialises every argument, builds
its cache key, reads its knobs and asks the driver for the device and stream on every call. On the lent GPU hosts
that is 20–30 µs of CPU per launch, and lorakit launches many small kernels: 112 in a 32-adapter `per_row`
forward of a 1B Llama (host-bound at 32×128 tokens), about 2,000 in a fused 1B DoRA step.

`cached_launch` wraps a launched `@triton.jit` kernel. The first launch of each specialisation goes through
Triton as before (compiling if needed) and keeps the compiled kernel; later launches with the same
specialisation call that kernel's launcher directly. The specialisation key is built from what Triton
specialises on, each at least as finely: per tensor its dtype and whether its address is 16-byte aligned, per
int whether it is 1, whether it is a multiple of 16 and its integer width, the constexpr values and launch
options. So a launch never runs a kernel compiled for other argument properties. Triton options read from
the environment on each of its launches (TRITON_DEBUG and the like) are taken at a specialisation's first launch.

Call sites pass the kernel's runtime arguments positionally (all of them, in signature order) and its
constexprs and launch options by keyword; any other form, the Triton interpreter, a Triton without the
needed internals or LORAKIT_TRITON_LAUNCH=triton take Triton's own launch.
"""

from __future__ import annotations

import os

import torch

from .triton_gate import HAS_TRITON, INTERPRET, triton

_I32 = (-(2**31), 2**31)


def _usable() -> bool:
    """Triton ≥ 3.2 with knobs (its launcher takes every bound argument, constexprs included)."""
    if not HAS_TRITON or INTERPRET or os.environ.get("LORAKIT_TRITON_LAUNCH", "cached") == "triton":
        return False
    if getattr(triton, "knobs", None) is None:
        return False
    major, minor = (int(p) for p in triton.__version__.split(".")[:2])
    return (major, minor) >= (3, 2)


USABLE = _usable()


def _arg_key(args) -> tuple | None:
    """What Triton specialises on in the runtime arguments (finer is fine); None for a kind not handled here.
    An int becomes -1 when it is 1, else (multiple of 16) + 2·(fits int32) + 4·(needs uint64)."""
    key = []
    for a in args:
        kind = type(a)
        if kind is int:
            key.append(-1 if a == 1 else (not a & 15) + 2 * (_I32[0] <= a < _I32[1]) + 4 * (a >= 2**63))
        elif isinstance(a, torch.Tensor):
            key.append(a.dtype)
            key.append(not a.data_ptr() & 15)
        elif kind is float:
            key.append(float)
        elif a is None:
            key.append(None)
        elif kind is bool:  # not an int here: Triton types it i1
            key.append("i1" if a else "i0")
        else:
            return None
    return tuple(key)


def _hook(hook):
    """A launch hook as the launcher should get it: None when it calls nothing. Triton ≥ 3.5 keeps an empty
    HookChain there rather than None, so its own launch builds the launch metadata and calls both chains on every
    launch (6.7 ms of host time over the 613 launches of a 1B DoRA step on the lent H200 host, BENCHMARKS.md),
    for hooks that a profiler such as proton installs only while it runs."""
    calls = getattr(hook, "calls", None)
    return None if hook is None or (type(calls) is list and not calls) else hook


class CachedLaunch:
    """A launched @triton.jit kernel: `kernel[grid](*runtime_args, **constexprs_and_options)` as with Triton.
    The JITFunction stays reachable as `.fn` (for `@triton.jit` callers and tests)."""

    def __init__(self, fn):
        self.fn = fn
        self._compiled: dict = {}  # (device, keyword args with types, arg key) → (kernel, constexpr values)
        self._n_runtime = None  # number of leading runtime params, when every constexpr follows them

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self._launch(grid, args, kwargs)

    def _launch(self, grid, args, kwargs):
        if not USABLE or type(grid) is not tuple:
            return self.fn[grid](*args, **kwargs)
        arg_key = _arg_key(args)
        device = torch.cuda.current_device()  # a compiled kernel is loaded per device (CUDA is initialised here)
        key = (device, tuple((k, v, type(v)) for k, v in kwargs.items()), arg_key)  # True, 1 and 1.0 differ
        hit = self._compiled.get(key) if arg_key is not None else None
        if hit is None:
            kernel = self.fn[grid](*args, **kwargs)
            consts = self._constexprs(args, kwargs)
            if arg_key is not None and hasattr(kernel, "packed_metadata") and consts is not None:  # a compiled kernel
                self._compiled[key] = (kernel, consts)
            return kernel
        kernel, consts = hit
        stream = torch._C._cuda_getCurrentRawStream(device)
        g0, g1, g2 = (*grid, 1, 1)[:3]
        runtime = triton.knobs.runtime  # profiler hooks (proton) are honoured as Triton's launch would
        enter, leave = _hook(runtime.launch_enter_hook), _hook(runtime.launch_exit_hook)
        every = args + consts  # Triton ≥ 3.2 hands its launcher every bound argument, constexprs included
        meta = kernel.launch_metadata(grid, stream, *every) if enter is not None else None
        kernel.run(g0, g1, g2, stream, kernel.function, kernel.packed_metadata, meta, enter, leave, *every)
        return kernel

    def _constexprs(self, args, kwargs) -> tuple | None:
        """The constexpr values in signature order, when the call has the supported form; else None."""
        params = self.fn.params
        if self._n_runtime is None:
            flags = [p.is_constexpr for p in params]
            first = flags.index(True) if True in flags else len(flags)
            self._n_runtime = first if not any(not f for f in flags[first:]) else -1
        if len(args) != self._n_runtime:
            return None
        names = [p.name for p in params[self._n_runtime:]]
        if any(n not in kwargs for n in names):  # a default left to Triton: not replayed here
            return None
        return tuple(kwargs[n] for n in names)


def cached_launch(fn) -> CachedLaunch:
    """Decorator for a @triton.jit kernel launched from the host (see the module docstring)."""
    return CachedLaunch(fn)
