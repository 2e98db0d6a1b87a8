"""Fast paths for training: fused LoRA linears, kernels for the frozen parts, model-family patches.

Everything here is an optional replacement of reference math, each held to the reference by a test;
`optimize(model)` installs them and falls back to the reference wherever a fast path does not apply.
"""

from .optimize import optimize, unoptimize
from .report import fusion_report

__all__ = ["optimize", "unoptimize", "fusion_report"]
