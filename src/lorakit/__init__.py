"""lorakit: low-rank adaptation of any PyTorch model, in place, with PEFT-compatible files."""

from . import lora  # noqa: F401  (registers the LoRA variant)
from .config import AdapterConfig, LoraConfig
from .errors import (AdapterFormatError, AdapterNameError, ConfigError, LorakitError, ShapeMismatchError,
                     TargetError)
from .io import adapter_state_dict, load_adapter, read_config, save_adapter
from .model import (active_adapters, add_adapter, adapted_layers, delete_adapter, disabled, get_config,
                    list_adapters, merge, set_active, trainable_report, training_hooks, unload, unmerge)

# --- variants (issue 4): one import line per variant module ---
# --- many adapters: per_row, hot_swap, combine (issue 6) ---
# --- speed: optimize (issue 5) ---
# --- quantized base: quantize (issue 7) ---
# --- training: train (issue 3) ---
# --- analysis: analyze (issue 8) ---

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig", "LoraConfig", "LorakitError", "ConfigError", "TargetError", "AdapterNameError",
    "AdapterFormatError", "ShapeMismatchError", "add_adapter", "set_active", "active_adapters", "disabled",
    "merge", "unmerge", "unload", "delete_adapter", "list_adapters", "get_config", "adapted_layers",
    "trainable_report", "training_hooks", "save_adapter", "load_adapter", "adapter_state_dict", "read_config",
]
