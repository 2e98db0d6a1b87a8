"""optimize()'s cpu_heap: glibc keeps the step's freed multi-MiB blocks in its heap (no fresh mmap, no trim), checked
through glibc's own accounting (mallinfo2) in a fresh process; "auto" is on for a model on the CPU only."""

import ctypes
import ctypes.util
import importlib
import platform
import subprocess
import sys

import pytest
import torch
from torch import nn

import lorakit

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
needs_mallinfo2 = pytest.mark.skipif(
    not GLIBC or not hasattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), "mallinfo2"),
    reason="glibc's mallinfo2 (glibc ≥ 2.33) reads the heap's accounting")

# In a fresh process: 16 MiB tensors allocated and freed (a step's activations), before and after the call.
# mallinfo2's hblkhd: bytes in mmapped blocks now; arena: bytes of the main heap (shrinks when it is trimmed). Prints
# the MiB mmapped while a 16 MiB tensor lives, and how much the heap grew over the whole probe.
_PROBE = r"""
import ctypes, ctypes.util, sys, torch
from lorakit.fast import cpu_heap

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
libc.mallinfo2.restype = Info
MIB = 2**20

def mapped_while_held():
    t = torch.ones(4 * MIB)  # 16 MiB
    held = libc.mallinfo2().hblkhd
    del t
    return held

if sys.argv[1] == "on":
    assert cpu_heap.keep_freed_memory() and cpu_heap.keep_freed_memory()  # once, then the same answer
before = libc.mallinfo2().arena
mapped = mapped_while_held()
blocks = [torch.ones(4 * MIB) for _ in range(12)]  # 192 MiB live
del blocks
print(mapped // MIB, (libc.mallinfo2().arena - before) // MIB)
"""


def _probe(mode: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    mapped, grown = map(int, out.stdout.split())
    return mapped, grown


@needs_mallinfo2
def test_freed_blocks_stay_in_the_heap_after_the_call_and_not_before():
    mapped, _ = _probe("off")
    assert mapped >= 16  # glibc's default: a fresh mmap (whether it trims the freed top varies run to run)
    mapped, grown = _probe("on")
    assert mapped < 16 and grown >= 160  # from the heap, and the 192 MiB freed stay there for the next step


def test_mallopt_gets_both_thresholds_once_and_a_refusal_reads_false(monkeypatch):
    from lorakit.fast import cpu_heap

    calls = []
    monkeypatch.setattr(cpu_heap, "_STATE", {})
    monkeypatch.setattr(cpu_heap, "_mallopt", lambda: lambda p, v: calls.append((p, v)) or 1)
    assert cpu_heap.keep_freed_memory() and cpu_heap.keep_freed_memory()
    assert calls == [(-3, 32 * 2**20), (-1, 2**30)]  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD; once per process
    monkeypatch.setattr(cpu_heap, "_STATE", {})
    monkeypatch.setattr(cpu_heap, "_mallopt", lambda: lambda p, v: 0)  # glibc refused
    assert cpu_heap.keep_freed_memory() is False
    monkeypatch.setattr(cpu_heap, "_STATE", {})
    monkeypatch.setattr(cpu_heap, "_mallopt", lambda: None)  # another libc
    assert cpu_heap.keep_freed_memory() is False


def test_auto_is_on_for_a_cpu_model_only_and_the_option_is_checked_first(monkeypatch):
    opt = importlib.import_module("lorakit.fast.optimize")  # the module (lorakit.fast.optimize is the function)
    calls = []
    monkeypatch.setattr(opt.heap, "keep_freed_memory", lambda: calls.append(1) or True)
    model = nn.Sequential(nn.Linear(8, 8))
    lorakit.add_adapter(model, lorakit.LoraConfig(r=2, target_modules=["0"]))
    with pytest.raises(lorakit.ConfigError, match="cpu_heap"):
        lorakit.optimize(model, cpu_heap="always")
    assert model[0].fast_path is None and not calls  # nothing changed
    assert lorakit.optimize(model, cpu_heap=False)["cpu_heap"] == 0 and not calls
    assert lorakit.optimize(model)["cpu_heap"] == 1 and calls == [1]
    monkeypatch.setattr(opt, "_on_device", lambda m, kind: kind == "cuda")  # as if on a GPU
    assert lorakit.optimize(model)["cpu_heap"] == 0 and calls == [1]
    assert lorakit.optimize(model, cpu_heap=True)["cpu_heap"] == 1 and calls == [1, 1]
    x = torch.randn(3, 8)
    torch.testing.assert_close(model(x), model[0].reference_forward(x))
