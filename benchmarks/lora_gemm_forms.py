"""Times each rank-r product of a LoRA step in its two layouts (natural vs rank-major), to choose
lorakit.fast.lora_linear.RANK_MAJOR per device type. Same math either way.

    python benchmarks/lora_gemm_forms.py            # CPU, fp32, MiniLM shapes, 1 thread
    python benchmarks/lora_gemm_forms.py --cuda     # bf16, Llama-8B/1B shapes
"""

from __future__ import annotations

import argparse
import time

import torch


def timed(fn, device, n=20) -> float:
    for _ in range(3):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[n // 2] * 1e3


def forms(n, i, o, r, device, dtype) -> dict[str, float]:
    x, g = torch.randn(n, i, device=device, dtype=dtype), torch.randn(n, o, device=device, dtype=dtype)
    a, b = torch.randn(r, i, device=device, dtype=dtype), torch.randn(o, r, device=device, dtype=dtype)
    h, gh = torch.randn(n, r, device=device, dtype=dtype), torch.randn(n, r, device=device, dtype=dtype)
    w = torch.randn(o, i, device=device, dtype=dtype)
    return {
        "x·Aᵀ": timed(lambda: x @ a.t(), device), "(A·xᵀ)ᵀ": timed(lambda: (a @ x.t()).t(), device),
        "g·B": timed(lambda: g @ b, device), "(Bᵀ·gᵀ)ᵀ": timed(lambda: (b.t().contiguous() @ g.t()).t(), device),
        "gHᵀ·x": timed(lambda: gh.t() @ x, device), "(xᵀ·gH)ᵀ": timed(lambda: (x.t() @ gh).t(), device),
        "gᵀ·h": timed(lambda: g.t() @ h, device), "(hᵀ·g)ᵀ": timed(lambda: (h.t() @ g).t(), device),
        "y+=h·Bᵀ": timed(lambda: g.addmm_(h, b.t()), device), "dX+=gH·A": timed(lambda: x.addmm_(gh, a), device),
        # the exact calls of lora_linear's backward: gH rank-major in place, dB as [r, out] and as [out, r]
        "gHᵀ[r]=s·Bᵀ·gᵀ": timed(lambda: gh.t().contiguous().addmm_(b.t(), g.t(), beta=0, alpha=2.0), device),
        "dBᵀ=s·hᵀ·g": timed(lambda: g.new_empty(r, o).addmm_(h.t(), g, beta=0, alpha=2.0), device),
        "dB=s·gᵀ·h": timed(lambda: g.new_empty(o, r).addmm_(g.t(), h, beta=0, alpha=2.0), device),
        "base x·Wᵀ": timed(lambda: x @ w.t(), device),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cuda", action="store_true")
    args = ap.parse_args()
    if args.cuda:
        device, dtype = "cuda", torch.bfloat16
        shapes = [(4096, 4096, 4096, 16), (4096, 4096, 14336, 16), (4096, 14336, 4096, 16), (8192, 2048, 8192, 16)]
    else:
        torch.set_num_threads(1)
        device, dtype = "cpu", torch.float32
        shapes = [(2048, 384, 384, 8), (2048, 384, 1536, 8), (2048, 1536, 384, 8)]
    for shape in shapes:
        res = forms(*shape, device, dtype)
        print(f"N,in,out,r={shape}: " + "  ".join(f"{k} {v:.3f}" for k, v in res.items()) + "  (ms)")


if __name__ == "__main__":
    main()
