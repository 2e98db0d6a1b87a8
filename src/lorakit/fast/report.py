"""Which adapted layers do not run fused, and why: `fusion_report(model)` and `optimize(model, report=True)`.

A layer's reason is either static (its state now: merged, disabled, an adapter without a fused form, adapters
in another dtype, a trained base weight, a weight source that cannot dequantise into a buffer, ...) or the
reason its fast path fell back at its last call (input dtype or device, extra arguments, autocast over a
4-bit base). The static part depends on the mode: call it in the mode you train in (model.train()).
"""

from __future__ import annotations

import logging

from torch import nn

from ..core.api import adapted_layers
from .lora_linear import lora_linear_fast_path
from .spec import FALLBACK_ATTR, spec_or_reason

log = logging.getLogger("lorakit.fast")


def fusion_report(model: nn.Module) -> list[tuple[str, str]]:
    """Every adapted layer of `model` that will not run the fused path, with the reason.

    Args:
        model: a model with adapters (optimize() applied or not).

    Returns:
        [(module path, reason), ...] in module order; empty when every adapted layer runs fused.
    """
    rows = []
    for path, layer in adapted_layers(model):
        if layer.fast_path is not lora_linear_fast_path:
            kind = layer.ops.kind
            rows.append((path, "optimize() not applied" if kind == "linear" else f"not a linear layer ({kind})"))
            continue
        got = spec_or_reason(layer)
        if type(got) is str:
            rows.append((path, got))
        elif not got[2]:
            rows.append((path, "no active adapter on this layer"))
        elif FALLBACK_ATTR in layer.__dict__:
            rows.append((path, f"at its last call: {layer.__dict__[FALLBACK_ATTR]}"))
    return rows


def format_report(rows: list[tuple[str, str]]) -> str:
    """The report as text, one `path: reason` line per layer (or a line saying every layer is fused)."""
    if not rows:
        return "lorakit.optimize: every adapted layer runs fused"
    lines = [f"lorakit.optimize: {len(rows)} adapted layer(s) take the reference path:"]
    return "\n".join(lines + [f"  {path}: {reason}" for path, reason in rows])


def log_report(rows: list[tuple[str, str]]) -> None:
    """Write the report through the `lorakit.fast` logger (WARNING when a layer is not fused, else INFO)."""
    log.log(logging.WARNING if rows else logging.INFO, "%s", format_report(rows))
