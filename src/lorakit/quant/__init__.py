"""QLoRA: a frozen 4-bit NF4 base under any adapter (see nf4.py for the format and why it is our own)."""

from . import bnb, weight
from .linear import NF4Linear
from .dequant import dequantize_nf4
from .nf4 import NF4Tensor, quantize_nf4
from .quantize import dequantize, merge_requantized, quantize
from ..errors import QuantizedBaseError
from .weight import Requantization

weight.register()
bnb.register()

__all__ = ["quantize", "dequantize", "merge_requantized", "NF4Linear", "NF4Tensor", "quantize_nf4", "dequantize_nf4",
           "QuantizedBaseError", "Requantization"]
