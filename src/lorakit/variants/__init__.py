"""The built-in weight-delta variants, registered from one explicit list.

Each module owns its config and its `Delta` and declares a `VARIANT`; nothing outside a variant's module knows
its classes or parameter names. To add a variant, write its module and append its VARIANT here.
"""

from ..core.registry import register
from . import adalora, dora, loha, lokr, lora

BUILTIN = [lora.VARIANT, dora.VARIANT, loha.VARIANT, lokr.VARIANT, adalora.VARIANT]
for _variant in BUILTIN:
    register(_variant)

__all__ = ["BUILTIN"]
