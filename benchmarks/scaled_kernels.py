"""The output-scaled term's stages (DoRA's magnitude over a row norm) on the GPU: lorakit.fast.scaled_kernels
against the torch math they replace, per Llama-3.2-1B output width at B8 T1024 (N = 8192 rows), bf16, r = 16.
Each pair is checked to agree before it is timed; the table gives ms per call and the DRAM GB/s of the kernel (of
the torch op on the LoRA addmm_ row).

    python benchmarks/scaled_kernels.py [--rows 8192] [--append BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import train_step  # noqa: E402  (puts src/ on the path)
from timing import median_ms  # noqa: E402

from lorakit.fast import scaled_kernels as sk  # noqa: E402

WIDTHS = {"q/o (2048)": (2048, 2048), "k/v (512)": (512, 2048), "gate/up (8192)": (8192, 2048),
          "down (2048, in 8192)": (2048, 8192)}  # name → (out, in)


def torch_norm(w, a, b, s, w_sq):
    """The torch path's row norm (‖W‖² cached, as the variant caches it)."""
    a32, b32 = a.float(), b.float()
    wa = F.linear(w.float(), a32)
    bat = b32 @ F.linear(a32, a32)
    return (w_sq + (2 * s) * (b32 * wa).sum(1) + (s * s) * (bat * b32).sum(1)).clamp_min(0).sqrt()


def _close(u, v, tol=2e-2) -> None:
    err = ((u.double() - v.double()).norm() / v.double().norm()).item()
    assert err <= tol, f"kernel and torch disagree: {err:.2e}"


def stages(n: int, out: int, k: int) -> list[tuple[str, float, float, float]]:
    """(stage, torch ms, kernel ms, kernel GB/s) for one width. The forward's torch side is LoRA's own addmm_ of
    the term plus the scale; "LoRA addmm_" times that addmm_ alone (what a LoRA output costs beyond its GEMM)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    dev, dt, s, r = "cuda", torch.bfloat16, 2.0, 16
    base, dy = (torch.randn(n, out, device=dev, dtype=dt, generator=g) for _ in range(2))
    w = torch.randn(out, k, device=dev, dtype=dt, generator=g) / k ** 0.5
    a = torch.randn(r, k, device=dev, dtype=dt, generator=g) / k ** 0.5
    b = torch.randn(out, r, device=dev, dtype=dt, generator=g) / 4
    h = torch.randn(n, r, device=dev, dtype=dt, generator=g)
    w_sq = w.float().pow(2).sum(1)
    norm = sk.row_norm(w, a, b, s)
    m = (norm * 1.1).to(dt)
    up = (h, b, s)
    assert sk.takes_up(base, h, b)
    z = torch.addmm(base, h, b.t(), alpha=s)
    _close(norm, torch_norm(w, a, b, s, w_sq), 1e-5)
    _close(sk.scale_output(base, m, norm, None, up), sk._torch_output(z, m, norm, None))
    for u, v in zip(sk.scale_grads(dy, base, m, norm, True, None, up), sk._torch_grads(dy, z, m, norm, True, False)):
        if v is not None:
            _close(u, v)
    scratch = base.clone()

    def torch_forward():
        sk._torch_output(scratch.addmm_(h, b.t(), alpha=s), m, norm, None)

    elem = n * out * 2  # bytes of one [N, out] bf16 pass
    rows = [("row norm", median_ms(lambda: torch_norm(w, a, b, s, w_sq)), median_ms(lambda: sk.row_norm(w, a, b, s)),
             w.numel() * 2),
            ("LoRA addmm_ (reference)", median_ms(lambda: scratch.addmm_(h, b.t(), alpha=s)), float("nan"), 2 * elem),
            ("forward s·h·Bᵀ + f ⊙ z", median_ms(torch_forward),
             median_ms(lambda: sk.scale_output(base, m, norm, None, up)), 2 * elem),
            ("backward dZ, dm", median_ms(lambda: sk._torch_grads(dy, z, m, norm, True, False)),
             median_ms(lambda: sk.scale_grads(dy, base, m, norm, True, None, up)), 3 * elem)]
    return [(name, t, kk, nbytes / (kk if kk == kk else t) / 1e6) for name, t, kk, nbytes in rows]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=8192, help="tokens per call (B·T)")
    ap.add_argument("--append", default=None, help="append a section (command, device, date, table) to this file")
    args = ap.parse_args(argv)
    lines = ["| width | stage | torch ms | kernel ms | × faster | kernel GB/s |", "|---|---|---|---|---|---|"]
    for name, (out, k) in WIDTHS.items():
        for stage, t, kk, gbs in stages(args.rows, out, k):
            kernel, ratio = ("–", "–") if kk != kk else (f"{kk:.3f}", f"{t / kk:.2f}")
            lines.append(f"| {name} | {stage} | {t:.3f} | {kernel} | {ratio} | {gbs:,.0f} |")
    text = f"{train_step.environment('cuda')}\n\n" + "\n".join(lines)
    print(text)
    if args.append:
        command = "python benchmarks/scaled_kernels.py " + " ".join(sys.argv[1:] if argv is None else argv)
        with open(args.append, "a") as f:
            f.write(f"\n### Output-scaled term kernels, N={args.rows} ({datetime.date.today()})\n\n"
                    f"`{command}` · {text}\n")


if __name__ == "__main__":
    main()
