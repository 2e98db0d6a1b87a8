"""ΔW's singular value decomposition, and the figures read off its spectrum.

For a low-rank ΔW = s·B·A (B [out, r], A [r, n], n = in·kernel) the SVD never forms the [out, n] matrix:

    B = Q_B R_B,  Aᵀ = Q_A R_A          reduced QR: Q_B [out, r], Q_A [n, r], R_B, R_A [r, r]
    ΔW = Q_B (s·R_B R_Aᵀ) Q_Aᵀ          the r×r core s·R_B·R_Aᵀ = U_c Σ V_cᵀ
       = (Q_B U_c) Σ (Q_A V_c)ᵀ         so U = Q_B U_c, V = Q_A V_c, same Σ

at O((out + n)·r²) instead of O(out·n·min(out, n)). Any other ΔW (DoRA, LoHa, LoKr, AdaLoRA, ...) is
decomposed densely from the Delta protocol's `delta_weight`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Dense SVDs up to this many elements run in float64 (e.g. 1024×1024); larger ones in float32.
DENSE_FP64_MAX = 1 << 20
# Larger W get a randomized top-k SVD (torch.svd_lowrank) instead of a full one.
EXACT_SVD_MAX_DIM = 2048
# Singular values at or below σ₁ · max(out, n) · eps(float32) count as zero (numpy's matrix_rank rule for
# fp32 data: adapters are stored in fp32 or lower, so smaller values are rounding noise).
RANK_EPS = torch.finfo(torch.float32).eps


@dataclass
class Spectrum:
    """ΔW = U·diag(s)·Vᵀ in the canonical orientation [out, n]. Tensors on the CPU, float64."""

    s: torch.Tensor  # [k] singular values, descending
    u: torch.Tensor  # [out, k] left singular vectors (output space)
    v: torch.Tensor  # [n, k] right singular vectors (input space)
    shape: tuple[int, int]  # (out, n)
    from_factors: bool  # True: from s·B·A without forming ΔW

    @property
    def fro_norm(self) -> float:
        """‖ΔW‖_F from the singular values."""
        return float(self.s.pow(2).sum().sqrt())

    @property
    def spectral_norm(self) -> float:
        """‖ΔW‖₂, the largest singular value."""
        return float(self.s[0]) if len(self.s) else 0.0

    @property
    def rank(self) -> int:
        """Numerical rank: singular values above σ₁ · max(out, n) · eps(float32)."""
        if not len(self.s) or self.s[0] == 0:
            return 0
        tol = float(self.s[0]) * max(self.shape) * RANK_EPS
        return int((self.s > tol).sum())

    @property
    def effective_rank(self) -> float:
        """Roy & Vetterli (2007): exp of the entropy of σ/Σσ. 1 for rank one, r for r equal singular values."""
        total = self.s.sum()
        if total <= 0:
            return 0.0
        p = self.s / total
        p = p[p > 0]
        return float(torch.exp(-(p * p.log()).sum()))

    @property
    def stable_rank(self) -> float:
        """‖ΔW‖_F² / ‖ΔW‖₂²: a rank that small singular values barely move."""
        return self.fro_norm ** 2 / self.spectral_norm ** 2 if self.spectral_norm > 0 else 0.0

    def energy(self) -> torch.Tensor:
        """[k]: the share of ‖ΔW‖_F² kept by the top 1, 2, ..., k directions."""
        sq = self.s.pow(2)
        total = sq.sum()
        return sq.cumsum(0) / total if total > 0 else torch.zeros_like(sq)

    def energy_rank(self, share: float) -> int:
        """The smallest k whose top-k directions keep `share` of ΔW's energy ‖ΔW‖_F² (0 for ΔW = 0)."""
        energy = self.energy()
        if not len(energy) or energy[-1] <= 0:
            return 0
        # A tiny tolerance so that share=1.0 is met by a sum that rounds to 1 - 1e-16.
        return min(int((energy < share - 1e-12).sum()) + 1, len(energy))

    def truncation_error(self, k: int) -> float:
        """Eckart–Young: ‖ΔW − ΔW_k‖_F / ‖ΔW‖_F = sqrt(Σ_{i>k} σ_i²) / sqrt(Σ σ_i²), ΔW_k the best rank-k fit."""
        sq = self.s.pow(2)
        total = float(sq.sum())
        return math.sqrt(float(sq[k:].sum()) / total) if total > 0 else 0.0

    def top(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(U_k [out, k], s_k [k], V_k [n, k])."""
        return self.u[:, :k], self.s[:k], self.v[:, :k]


def spectrum_from_factors(b: torch.Tensor, a: torch.Tensor, scale: float) -> Spectrum:
    """ΔW = scale·B·A with B [out, r], A [r, n], through QR of B and Aᵀ and the SVD of the small core."""
    b64, a64 = b.detach().double(), a.detach().double()
    q_b, r_b = torch.linalg.qr(b64)  # [out, m], [m, r], m = min(out, r)
    q_a, r_a = torch.linalg.qr(a64.t())  # [n, p], [p, r], p = min(n, r)
    core = scale * (r_b @ r_a.t())  # [m, p]
    u_c, s, vh_c = torch.linalg.svd(core, full_matrices=False)
    u, v = q_b @ u_c, q_a @ vh_c.t()
    return Spectrum(s.cpu(), u.cpu(), v.cpu(), (b.shape[0], a.shape[1]), from_factors=True)


def spectrum_dense(dw: torch.Tensor) -> Spectrum:
    """The SVD of a dense ΔW [out, n] (float64 when small, else float32 on ΔW's device)."""
    work = torch.float64 if dw.numel() <= DENSE_FP64_MAX else torch.float32
    u, s, vh = torch.linalg.svd(dw.detach().to(work), full_matrices=False)
    return Spectrum(s.double().cpu(), u.double().cpu(), vh.t().double().cpu(), tuple(dw.shape), from_factors=False)


def top_singular(w: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-k singular triplets (U [out, k], s [k], V [n, k]) of a dense matrix, float64 on the CPU.

    Exact for matrices up to EXACT_SVD_MAX_DIM on their short side; above that a randomized SVD with
    oversampling and power iterations (Halko et al. 2011), accurate for the leading directions."""
    k = min(k, *w.shape)
    if min(w.shape) <= EXACT_SVD_MAX_DIM:
        work = torch.float64 if w.numel() <= DENSE_FP64_MAX else torch.float32
        u, s, vh = torch.linalg.svd(w.detach().to(work), full_matrices=False)
        return u[:, :k].double().cpu(), s[:k].double().cpu(), vh[:k].t().double().cpu()
    q = min(k + 16, *w.shape)
    u, s, v = torch.svd_lowrank(w.detach().float(), q=q, niter=6)
    return u[:, :k].double().cpu(), s[:k].double().cpu(), v[:, :k].double().cpu()


def right_singular_vectors(a: torch.Tensor) -> torch.Tensor:
    """The right singular vectors of a factor A [r, n] as columns [n, r'] (r' = A's numerical rank), in
    A's own singular-value order: the basis of the LoRA paper's φ(A₁, A₂, i, j)."""
    _, s, vh = torch.linalg.svd(a.detach().double(), full_matrices=False)
    keep = int((s > s[0] * max(a.shape) * RANK_EPS).sum()) if len(s) and s[0] > 0 else 0
    return vh[:keep].t().cpu()
