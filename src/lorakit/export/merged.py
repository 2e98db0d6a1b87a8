"""The merged model behind `lorakit export --format gguf` and `lorakit merge`: base + adapter → one dense model.

An adapter trained on a 4-bit base (`lorakit train --bits 4`, recorded as "bits": 4 in the run's options.json)
learned its change against the dequantised NF4 weights, not the original ones. Merging it end to end therefore
re-creates that base (the same lorakit.quantize the run applied, in float32), attaches the adapter on top,
dequantises every NF4 layer to a dense float32 linear (lorakit.dequantize: exactly the weight the 4-bit layer
multiplied by) and merges there: the merged model computes what the trained model computed.

Memory: the base is held once in float32 (4 bytes a parameter) while it is quantised, and again after
dequantisation (the NF4 copy, about 0.56 bytes a parameter, exists only between the two); `memory_needed`
states the figure before anything loads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from ..core.api import unload
from ..core.files import load_adapter, read_config
from ..errors import ConfigError
from ..loading.models import BUILTIN_GGUF, BUILTIN_MODEL, builtin_gguf_path, load_model, load_tokenizer, resolve_model
from ..train.layout import ADAPTER_DIR

NF4_BYTES_PER_PARAM = 0.5 + 4 / 64 + 1 / 256  # 4-bit codes, double-quantised absmax per 64, its scales (approx.)


def base_model_name(adapter: Path, model: Optional[str]) -> str:
    """--model when given, else the adapter's base_model_name_or_path (a bundled name, a local path or a hub
    name), else the bundled model."""
    if model:
        return model
    return read_config(adapter).base_model_name_or_path or BUILTIN_MODEL


def source_gguf(name: str) -> Optional[Path]:
    """The GGUF file a base model name loads from (the bundled model, or a .gguf path), if any."""
    if name in BUILTIN_GGUF:
        return builtin_gguf_path(name)
    if name.lower().endswith(".gguf") and Path(name).is_file():
        return Path(name)
    return None


def base_config(adapter: Path, model: Optional[str], log: Callable[[str], None]):
    """The transformers config of the adapter's base model (read alone: no weights load)."""
    from transformers import AutoConfig

    path = resolve_model(base_model_name(adapter, model), log)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"could not read the base model's config.json at {path}: {e}") from None
    from .gguf_model import family_of

    family_of(config)
    return config


def trained_bits(adapter: Path) -> int:
    """4 when the adapter comes from a `lorakit train --bits 4` run (its options.json, next to adapter/), else 32."""
    options = adapter.parent / "options.json"
    if adapter.name != ADAPTER_DIR or not options.is_file():
        return 32
    try:
        bits = json.loads(options.read_text()).get("bits", 32)
    except ValueError as e:
        raise ConfigError(f"{options} is not valid JSON: {e}") from None
    if bits not in (4, 32):
        raise ConfigError(f"{options}: field bits is {bits!r}; expected 4 or 32")
    return int(bits)


def count_parameters(model_dir: Path) -> int:
    """Parameters stored in a model directory's safetensors files (read from their headers, nothing loaded)."""
    from safetensors import safe_open

    total = 0
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                n = 1
                for d in f.get_slice(key).get_shape():
                    n *= d
                total += n
    return total


@dataclass
class MemoryNeed:
    """What a merge holds at its peak, in bytes, and why."""

    parameters: int
    bits: int
    extra_bytes_per_param: float  # e.g. the GGUF buffers of an export

    @property
    def peak_bytes(self) -> int:
        """Dense fp32 base + (NF4 copy while it exists) + the caller's extra buffers."""
        per = 4.0 + (NF4_BYTES_PER_PARAM if self.bits == 4 else 0.0) + self.extra_bytes_per_param
        return int(self.parameters * per)

    def describe(self) -> str:
        """One line: the estimate and its parts."""
        parts = [f"{self.parameters:,} parameters × 4 B (the float32 base)"]
        if self.bits == 4:
            parts.append(f"its NF4 copy (~{NF4_BYTES_PER_PARAM:.2f} B each) while the trained base is rebuilt")
        if self.extra_bytes_per_param:
            parts.append(f"{self.extra_bytes_per_param:g} B each for the output buffers")
        return f"memory: about {self.peak_bytes / 2**30:.2f} GiB of RAM at the peak: " + " + ".join(parts)


def memory_needed(base_path: str, bits: int, extra_bytes_per_param: float = 0.0) -> Optional[MemoryNeed]:
    """The peak memory of merging onto `base_path` (None for a hub name, whose size is unknown here)."""
    path = Path(base_path)
    if not path.is_dir():
        return None
    return MemoryNeed(count_parameters(path), bits, extra_bytes_per_param)


def load_adapted(adapter: Path, base_path: str, bits: int, name: str = "adapter-0"):
    """The base model on the CPU in float32 with the adapter attached and active; bits=4 re-creates the NF4 base
    the adapter was trained on (see the module docstring). Returns (model, tokenizer)."""
    from ..quant import quantize

    model = load_model(base_path, "causal", device="cpu")
    if bits == 4:
        quantize(model, compute_dtype=torch.float32)
    load_adapter(model, adapter, name=name)
    model.eval()
    return model, load_tokenizer(base_path)


def merge_into_base(model, bits: int) -> None:
    """Merge the attached adapter into the weights and drop lorakit's modules; a 4-bit base is dequantised to
    float32 first (the adapter then merges exactly as on any dense model)."""
    from ..quant import dequantize

    if bits == 4:
        dequantize(model, dtype=torch.float32)
    unload(model, merge=True)


def merged_model(adapter: Path, model: Optional[str], log: Callable[[str], None], output_bytes: float = 0.0):
    """The adapter merged into its base, after a line stating the memory that takes.

    Args:
        adapter: the adapter directory.
        model: the base model (None: the one base_model_name picks).
        log: where the memory line (and a first GGUF conversion's progress) goes.
        output_bytes: bytes a parameter the caller's output buffers will hold (e.g. 2 for an f16 GGUF).

    Returns:
        (merged model, tokenizer, resolved base path, base name, bits the adapter was trained on).
    """
    name = base_model_name(adapter, model)
    path = resolve_model(name, log)
    bits = trained_bits(adapter)
    need = memory_needed(path, bits, extra_bytes_per_param=output_bytes)
    if need is not None:
        log(need.describe())
    merged, tokenizer = load_adapted(adapter, path, bits)
    merge_into_base(merged, bits)
    return merged, tokenizer, path, name, bits
