"""Subspace similarity between two adapters, and between an adapter's ΔW and the base weight W.

The LoRA paper (Hu et al. 2021, §7.2) compares two adapters of one layer with the normalised subspace
similarity based on the Grassmann distance

    φ(A₁, A₂, i, j) = ‖U_{A₁}^{i ᵀ} U_{A₂}^{j}‖_F² / min(i, j)  ∈ [0, 1]

where U^i are the top-i right singular vectors of the factor A (paper's Figure 3: r=8 vs r=64). lorakit
computes it on that basis (A's right singular vectors, for adapters with low-rank factors) and, for every
variant, on ΔW's own right (input-space) and left (output-space) singular vectors.

§7.3 asks how ΔW relates to W. With ΔW = U Σ Vᵀ and U, V its top-r singular vectors (r = ΔW's rank), it
projects W onto ΔW's r-dimensional subspace, ‖Uᵀ W V‖_F (the paper writes UᵀWVᵀ, its V holding the right
singular vectors as rows), and compares it with the same projection onto W's own top-r directions
(= sqrt(Σ_{i≤r} σ_i(W)²)) and onto random directions. The amplification factor is ‖ΔW‖_F / ‖Uᵀ W V‖_F:
how strongly ΔW amplifies directions that W already has (the paper, GPT-3 W_q of layer 48: 6.91/0.32 ≈ 21.5
at r=4 and 3.57/1.90 ≈ 1.9 at r=64).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .spectrum import Spectrum, top_singular


def subspace_similarity(u1: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
    """φ [k1, k2] with φ[i-1, j-1] = ‖U1[:, :i]ᵀ U2[:, :j]‖_F² / min(i, j), for orthonormal columns U1 [d, k1],
    U2 [d, k2]. One product and two running sums: every (i, j) at once."""
    overlap = (u1.double().t() @ u2.double()).pow(2)  # [k1, k2]
    total = overlap.cumsum(0).cumsum(1)
    i = torch.arange(1, u1.shape[1] + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, u2.shape[1] + 1, dtype=torch.float64)[None, :]
    return (total / torch.minimum(i, j)).clamp(max=1.0)  # rounding can overshoot 1 by ~1e-15


def phi_summary(phi: torch.Tensor) -> dict[str, float]:
    """φ(1,1) (the top directions), φ(k,k) for k = min(k1, k2) (the smaller subspace inside the larger one's
    top k), and the mean of φ(i, i) over i ≤ k."""
    k = min(phi.shape)
    diag = torch.diagonal(phi)[:k]
    return {"phi_1_1": float(phi[0, 0]), "phi_k_k": float(phi[k - 1, k - 1]), "k": k,
            "phi_diag_mean": float(diag.mean())}


def base_similarity(spectrum: Spectrum, w: torch.Tensor, w_top=None) -> Optional[dict[str, float]]:
    """How ΔW relates to W [out, n] (canonical orientation), after §7.3 of the LoRA paper; None for ΔW = 0.

    r = ΔW's numerical rank; U, V = ΔW's top-r singular vectors; U_W, V_W = W's top-r singular vectors.
      proj_delta     ‖Uᵀ W V‖_F                    W inside ΔW's subspace
      proj_w_top     ‖U_Wᵀ W V_W‖_F = sqrt(Σ_{i≤r} σ_i(W)²)
      proj_random    ‖W‖_F · r / sqrt(out·n): the root-mean-square of ‖Uᵀ W V‖_F over independent random
                     r-dimensional subspaces (E‖UᵀWV‖² = tr(E[UUᵀ] W E[VVᵀ] Wᵀ) = (r/out)(r/n)‖W‖_F²)
      amplification  ‖ΔW‖_F / proj_delta
      overlap_out    φ(U, U_W, r, r) = ‖Uᵀ U_W‖_F² / r      (random: r/out)
      overlap_in     φ(V, V_W, r, r) = ‖Vᵀ V_W‖_F² / r      (random: r/n)
    w_top: W's top singular triplets (U [out, ≥r], s, V [n, ≥r]) if already computed (top_singular).
    """
    r = spectrum.rank
    if r == 0:
        return None
    out, n = spectrum.shape
    u, _, v = spectrum.top(r)
    wd = w.detach()
    work = torch.float64 if wd.numel() <= (1 << 22) else torch.float32
    wd = wd.to(work)
    proj = ((u.to(wd.device, work).t() @ wd) @ v.to(wd.device, work)).double()  # [r, r]
    proj_delta = float(torch.linalg.matrix_norm(proj))
    u_w, s_w, v_w = w_top if w_top is not None else top_singular(wd, r)
    u_w, s_w, v_w = u_w[:, :r], s_w[:r], v_w[:, :r]
    w_norm = float(torch.linalg.matrix_norm(wd.double() if work == torch.float64 else wd))
    return {
        "k": r,
        "w_fro_norm": w_norm,
        "delta_fro_norm": spectrum.fro_norm,
        "proj_delta": proj_delta,
        "proj_w_top": float(s_w.pow(2).sum().sqrt()),
        "proj_random": w_norm * r / math.sqrt(out * n),
        "amplification": spectrum.fro_norm / proj_delta if proj_delta > 0 else math.inf,
        "overlap_out": float((u.t() @ u_w).pow(2).sum()) / r,
        "overlap_in": float((v.t() @ v_w).pow(2).sum()) / r,
        "overlap_out_random": r / out,
        "overlap_in_random": r / n,
    }
