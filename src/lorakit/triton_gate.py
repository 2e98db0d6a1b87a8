"""The one gate for every Triton kernel in lorakit (fast paths, mixed-batch kernels, NF4 dequantisation):
whether a kernel may run on a tensor. Kernel modules import Triton only through here.

LORAKIT_TRITON=0 forces the pure-torch fallbacks everywhere (to measure a kernel's gain); with
TRITON_INTERPRET=1 Triton's interpreter runs the kernels on CPU tensors (how CI tests them without a GPU).
"""

from __future__ import annotations

import os

import torch

try:  # pragma: no cover - depends on the install
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only installs: every kernel has a torch fallback
    triton = tl = None
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def enabled() -> bool:
    """Triton is installed and not switched off (LORAKIT_TRITON=0). Reads the environment: call it once per
    block of work, not per kernel launch."""
    return HAS_TRITON and os.environ.get("LORAKIT_TRITON", "1") != "0"


def runs_on(device: torch.device) -> bool:
    """True when a Triton kernel may run on `device`: Triton enabled, and the device is CUDA (or any device under
    the interpreter)."""
    return enabled() and (device.type == "cuda" or INTERPRET)


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when a Triton kernel may run on all of these tensors (see runs_on). Asked per launch by the fast
    paths (~1,400 times a 1B DoRA step): the environment is read once, not once per tensor."""
    return enabled() and (INTERPRET or all(t.is_cuda for t in tensors))


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ for launch grids on the host. Not triton.cdiv: a constexpr-function wrapper there, ~2.5 µs a call,
    and a launch computes several."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ≥ n (0 for n ≤ 0), as triton.next_power_of_2 but a plain function (see cdiv)."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


def row_block(n: int) -> int:
    """A power-of-two block covering a row of n elements."""
    return next_power_of_2(n)


def warps_for(block: int) -> int:
    """Warps for a row kernel over `block` elements."""
    return 16 if block >= 16384 else 8 if block >= 4096 else 4 if block >= 1024 else 2
