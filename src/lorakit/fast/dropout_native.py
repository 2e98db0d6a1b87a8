"""dropout_hash.py's dropout terms in one compiled pass each way (dropout_hash.c), on CPU in fp32.

torch's ops write each term's x ⊙ m to memory and read it back for the rank-r GEMM; on a 2-core box those passes
run at memory speed. The C kernel keeps a few rows' masks and x ⊙ m in L1 and feeds the rank-r products from
there, and backward draws the masks again instead of keeping them (nothing of x's size is kept). The masks are
dropout_hash.py's bit for bit (tests/test_fast_dropout_native.py holds the masks, h, dX and dA to the torch-op
path). Its parallel regions are OpenMP's, in the libgomp that torch already loaded (one soname), so they run on
torch's own warm threads: pthreads of its own shared the second core with torch's spinning OpenMP thread and gained
1.0-1.4x from it, where the kernels now gain 1.7-2.2x. Measured on the project's 2-core box
(`python benchmarks/fast_variants.py --cpu`, BENCHMARKS.md).

The source is compiled once per machine with the system's C compiler (`$CC`, else `cc`; -O3 -march=native
-fopenmp) into $LORAKIT_CACHE/native (default ~/.cache/lorakit/native), under a name that hashes the source, the
flags, the compiler's version and the CPU's feature flags, written to a temporary file and renamed into place.
Where that fails (no compiler or no OpenMP, another OS, a CPU without AVX2: the loops are measured on AVX2 and
AVX-512 only), or with LORAKIT_NATIVE=0, `library()` is None and dropout_hash.py runs its torch ops; `why_not()`
says why, and a warning says it once.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Optional

import torch

_SOURCE = Path(__file__).with_name("dropout_hash.c")
_LOCK = threading.Lock()
_STATE: dict = {}  # "lib": the loaded library or None, "why": why not
_M64 = 2**64 - 1


def _flags() -> list[str]:
    flags = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        flags.append("-mprefer-vector-width=512")  # where AVX-512 exists, its full width (ignored elsewhere)
    return flags


def _cpu_flags() -> str:
    """The CPU's feature flags (Linux), so that a cache shared between machines never loads -march=native code
    built for another CPU."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    from ..loading.models import cache_root  # the one definition of lorakit's cache; imported at build time only

    return cache_root() / "native"


def _build() -> ctypes.CDLL:
    """Compile (or find compiled) and load the library; raises OSError/CalledProcessError on failure."""
    if sys.platform not in ("linux", "darwin"):
        raise OSError(f"no build recipe for {sys.platform}")
    cc = os.environ.get("CC", "cc")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30, check=True).stdout
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(_flags()).encode(), version.encode(),
                                     _cpu_flags().encode(), platform.machine().encode()])).hexdigest()[:16]
    target = _cache_dir() / f"dropout_hash-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
        os.close(fd)
        try:
            subprocess.run([cc, *_flags(), "-o", tmp, str(_SOURCE)], capture_output=True, text=True,
                           timeout=300, check=True)
            os.replace(tmp, target)  # atomic: another process sees the whole library or none
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(target))
    p, i64, u64, i, f = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_int, ctypes.c_float
    lib.lk_drop_down.argtypes = [p, i64, i64, i, i, p, p, i64, i64, u64, i64, i, f, i]
    lib.lk_drop_back.argtypes = [p, i64, i64, i, i, p, p, i64, i64, p, p, p, u64, i64, i, f, i]
    for fn in (lib.lk_drop_down, lib.lk_drop_back, lib.lk_tuned):
        fn.restype = ctypes.c_int
    if not lib.lk_tuned():
        raise OSError("the C kernel is tuned for AVX2 or AVX-512, which this CPU lacks: the torch ops are faster")
    return lib


def library() -> Optional[ctypes.CDLL]:
    """The compiled kernels, or None (LORAKIT_NATIVE=0, or the build failed: why_not()). Built on first use."""
    if os.environ.get("LORAKIT_NATIVE", "1") == "0":
        return None
    if "lib" in _STATE:  # every fused call asks: no lock once built (or refused)
        return _STATE["lib"]
    with _LOCK:
        if "lib" not in _STATE:
            try:
                _STATE["lib"], _STATE["why"] = _build(), None
            except (OSError, subprocess.SubprocessError) as exc:
                detail = getattr(exc, "stderr", None) or str(exc)
                _STATE["lib"], _STATE["why"] = None, f"{type(exc).__name__}: {detail.strip()[:300]}"
                logging.getLogger("lorakit.fast").warning(
                    "lorakit: CPU lora_dropout runs on torch ops, not the C kernel (%s); LORAKIT_NATIVE=0 silences "
                    "this", _STATE["why"])
    return _STATE["lib"]


def why_not() -> Optional[str]:
    """Why library() is None (after it was asked), else None."""
    if os.environ.get("LORAKIT_NATIVE", "1") == "0":
        return "LORAKIT_NATIVE=0"
    return _STATE.get("why")


def takes(x2: torch.Tensor, params, runs) -> bool:
    """Whether these dropout terms run here: CPU, fp32, x and every A contiguous, the library built."""
    if x2.device.type != "cpu" or x2.dtype != torch.float32 or not x2.is_contiguous():
        return False
    for _, _, _, a_idx, _ in runs:
        if any(params[ai].dtype != torch.float32 or not params[ai].is_contiguous() for ai in a_idx):
            return False
    return library() is not None


def _a_pointers(params, a_idx):
    return (ctypes.c_void_p * len(a_idx))(*[params[ai].data_ptr() for ai in a_idx])


def run_down(x2, h, col: int, r: int, p: float, a_idx, stream: int, params, seed: int, cut: int) -> None:
    """One run's columns of h: h[:, col + t·r + j] = (x ⊙ m_t)·A_tᵀ / (1 − p), in place (dropout_hash.runs_down).

    Args:
        x2: the input [N, in], fp32 contiguous; h: the call's h [N, R] (any strides, fp32).
        col, r, p, a_idx, stream: the run (dropout_hash.runs_down); params: the call's parameters (each A_t
            fp32 contiguous [r, in]).
        seed: the call's seed; cut: the int16 keep threshold (dropout_hash._threshold(p) − 32768).
    """
    n, k = x2.shape
    hv = h[:, col:col + len(a_idx) * r]
    status = library().lk_drop_down(x2.data_ptr(), n, k, len(a_idx), r, _a_pointers(params, a_idx), hv.data_ptr(),
                                    hv.stride(0), hv.stride(1), seed & _M64, stream, cut, 1.0 / (1.0 - p),
                                    torch.get_num_threads())
    _check(status)


def run_back(x2, rstd, g, dx2, r: int, p: float, a_idx, stream: int, params, need_a, seed: int,
             cut: int) -> Optional[torch.Tensor]:
    """One run's backward: dx2 += Σ_t ((g_tᵀ·A_t) ⊙ m_t) / (1 − p) in place (when dx2 is given) and the terms'
    Σ_n g_t[:, n]·rstd[n]·(m_t ⊙ x)[n] (unscaled; the caller applies 1/(1 − p) and an RMSNorm's columns).

    Args:
        x2: the saved input [N, in] fp32 contiguous; rstd: None or the rows' 1/rms [N] (fp32).
        g: the run's rows of gH, rank-major [T·r, N] (any strides, fp32); dx2: [N, in] contiguous fp32 or None.
        need_a: per term, whether its dA is wanted; the rest as run_down.
    Returns:
        dA sums [T, r, in] (fp32), or None when no term wants one.
    """
    n, k = x2.shape
    t = len(a_idx)
    da = torch.empty(t, r, k) if any(need_a) else None
    rstd = None if rstd is None else rstd.reshape(n).to(torch.float32).contiguous()
    status = library().lk_drop_back(x2.data_ptr(), n, k, t, r, _a_pointers(params, a_idx), g.data_ptr(),
                                    g.stride(0), g.stride(1), None if dx2 is None else dx2.data_ptr(),
                                    None if rstd is None else rstd.data_ptr(), None if da is None else da.data_ptr(),
                                    seed & _M64, stream, cut, 1.0 / (1.0 - p), torch.get_num_threads())
    _check(status)
    return da


def _check(status: int) -> None:
    if status != 0:  # the kernels allocate everything before writing anything
        raise MemoryError("lorakit: the CPU dropout kernel could not allocate its scratch buffers")
