"""Keep freed CPU memory in the process's heap during training (glibc): `keep_freed_memory()`.

Why: a training step allocates and frees the same multi-MiB activations every step. glibc's malloc serves
each one above its mmap threshold with a fresh mmap, and gives the freed top of its heap back to the kernel
past its trim threshold; either way the next step touches new pages, and each first touch is a page fault
(~0.5 µs a 4 KiB page on the project's 2-core box: a 12 MiB product 2.3 ms fresh against 0.7 ms into reused
memory). glibc raises its mmap threshold by itself after the first free of such a block, yet still trims the
heap's freed top every step. Measured on that box (MiniLM classifier B32 T64, r8
all-linear, every case optimize()d; BENCHMARKS.md, "CPU: freed memory kept in the heap"): DoRA's step, which
allocates an output and two gradients of the output's size per layer, 1.08–1.11× faster and its spread over
rounds from ~235 to 21-73 ms; LoRA's and lora_dropout's steps, whose large tensors were already reused, as before.

What it sets (process-wide, through mallopt): the mmap threshold to glibc's largest, 32 MiB (larger blocks are
still mmapped and given back when freed), and the trim threshold to 1 GiB (up to that much free memory at the
heap's top stays with the process, as jemalloc or tcmalloc would keep it). The usual advice for CPU training
(LD_PRELOAD of jemalloc or tcmalloc) asks the user to restart the process; this asks nothing. Another libc, or a
process that cannot load glibc's mallopt, is left as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
from typing import Optional

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
MMAP_THRESHOLD = 32 * 2**20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: mallopt refuses more
TRIM_THRESHOLD = 2**30
_STATE: dict = {}  # "done": the outcome of the first call (mallopt is called once per process)


def _mallopt() -> Optional[object]:
    """glibc's mallopt, or None on another libc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.mallopt
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return fn


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds for training (see the module docstring); once per process.

    Returns:
        True when the thresholds are set (now or by an earlier call), False on another libc or when glibc
        refused them.
    """
    if "done" not in _STATE:
        fn = _mallopt()
        _STATE["done"] = bool(fn is not None and fn(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                              and fn(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1)
    return _STATE["done"]
