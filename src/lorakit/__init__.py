"""lorakit: low-rank adaptation of any PyTorch model, in place, with PEFT-compatible files."""

from . import lora  # noqa: F401  (registers the LoRA variant)
from .config import AdapterConfig, LoraConfig
from .errors import (AdapterFormatError, AdapterNameError, ConfigError, LorakitError, ShapeMismatchError,
                     TargetError)
from .io import adapter_state_dict, load_adapter, read_config, save_adapter
from .model import (active_adapters, add_adapter, adapted_layers, delete_adapter, disabled, get_config,
                    list_adapters, merge, set_active, trainable_report, training_hooks, unload, unmerge)

# --- variants (issue 4): one import line per variant module ---
from . import dora  # noqa: F401  (registers DoRA: LoraConfig(use_dora=True))
from .adalora import AdaLoraConfig
from .loha import LoHaConfig
from .lokr import LoKrConfig
# --- many adapters: per_row, hot_swap, combine (issue 6) ---
from .compose import combine, lorahub_search, weighted  # noqa: E402
from .hotswap import hot_swap  # noqa: E402
from .mixed import per_row  # noqa: E402
# --- speed: optimize (issue 5) ---
from .fast import optimize, unoptimize  # noqa: E402
# --- quantized base: quantize (issue 7) ---
from .quant import NF4Linear, QuantizedBaseError, dequantize, merge_requantized, quantize  # noqa: E402
# --- training: train (issue 3) ---
from .train import train  # noqa: E402  (transformers is imported only when it runs)
# --- analysis: analyze (issue 8) ---
from .analysis import analyze  # noqa: E402  (matplotlib and transformers are imported only when used)

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig", "LoraConfig", "LorakitError", "ConfigError", "TargetError", "AdapterNameError",
    "AdapterFormatError", "ShapeMismatchError", "add_adapter", "set_active", "active_adapters", "disabled",
    "merge", "unmerge", "unload", "delete_adapter", "list_adapters", "get_config", "adapted_layers",
    "trainable_report", "training_hooks", "save_adapter", "load_adapter", "adapter_state_dict", "read_config",
]
__all__ += ["quantize", "dequantize", "merge_requantized", "NF4Linear", "QuantizedBaseError"]  # issue 7
__all__ += ["train"]  # training (issue 3)
__all__ += ["AdaLoraConfig", "LoHaConfig", "LoKrConfig"]  # variants (issue 4)
__all__ += ["optimize", "unoptimize"]  # speed (issue 5)
__all__ += ["analyze"]  # analysis (issue 8)
__all__ += ["per_row", "hot_swap", "combine", "lorahub_search", "weighted"]  # many adapters (issue 6)
