"""A Hugging Face causal LM (Llama family, Qwen2, Qwen3) written as one GGUF file for llama.cpp / Ollama.

Everything in the file goes through gguf-py (the `gguf` package, llama.cpp's own Python writer): the tensor
names come from `gguf.get_tensor_name_map(MODEL_ARCH, n_layers)`, the keys from GGUFWriter's add_* methods, the
q8_0 / bf16 blocks from `gguf.quants.quantize`. What is decided here follows llama.cpp's `convert_hf_to_gguf.py`
(conversion/base.py TextModel.set_gguf_parameters and prepare_tensors, conversion/llama.py LlamaModel,
conversion/qwen.py Qwen2Model / Qwen3Model):

- Llama-architecture q_proj / k_proj rows are permuted from Hugging Face's rotate-half RoPE layout to
  llama.cpp's interleaved one (LlamaModel.permute: reshape [heads, 2, d/2, in] → swap axes 1, 2; k uses the
  key-value head count). transformers' GGUF loader undoes exactly this (LlamaTensorProcessor
  ._reverse_permute_weights). Qwen2/Qwen3 are written as they are.
- 1-D tensors, norms and anything not named *.weight are F32; other weights take --outtype, and a tensor
  whose rows q8_0 cannot split into 32-blocks falls back to F16 (as the converter does on QuantError).
- A tied output head is not written (llama.cpp reuses token_embd).
- rope_type "linear" writes the scaling keys; "llama3" writes the rope_freqs tensor of per-frequency factors.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from ..errors import ConfigError

BYTES_PER_WEIGHT = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32}  # q8_0: 32 int8 + an f16 scale a block


@dataclass(frozen=True)
class Family:
    """How one Hugging Face model_type is written: its gguf MODEL_ARCH name and whether q/k are permuted."""

    arch: str  # a gguf.MODEL_ARCH member name
    permute_qk: bool


FAMILIES = {
    "llama": Family("LLAMA", True),
    "mistral": Family("LLAMA", True),
    "qwen2": Family("QWEN2", False),
    "qwen3": Family("QWEN3", False),
}


def family_of(config: Any) -> Family:
    """The Family of a transformers config (ConfigError naming config.json's model_type if unsupported)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ConfigError(f"config.json: model_type {model_type!r} has no GGUF export in lorakit; supported: "
                          f"{sorted(FAMILIES)}")
    return FAMILIES[model_type]


def model_arch(config: Any):
    """The gguf.MODEL_ARCH of a transformers config."""
    import gguf

    return getattr(gguf.MODEL_ARCH, family_of(config).arch)


def permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's q/k row order: rows [n_head, 2, d/2] → [n_head, d/2, 2] (w: [n_head·d, ...])."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def qk_heads(config: Any, hf_name: str) -> Optional[int]:
    """The head count to permute a Llama q_proj/k_proj tensor with, or None for any other tensor."""
    if not family_of(config).permute_qk:
        return None
    if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        return config.num_attention_heads
    if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return None


def gguf_tensor_name(name_map: Any, hf_name: str) -> str:
    """The GGUF name of a Hugging Face parameter (gguf's tensor-name map), e.g.
    model.layers.0.self_attn.q_proj.weight → blk.0.attn_q.weight."""
    new = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if new is None:
        raise ConfigError(f"no GGUF tensor name for {hf_name} in gguf's tensor-name map")
    return new


def tensor_qtype(gguf_name: str, data: np.ndarray, outtype: str):
    """The GGML type a tensor is stored in (see the module docstring)."""
    import gguf

    t = gguf.GGMLQuantizationType
    stored_as_is = not gguf_name.endswith((".weight", ".lora_a", ".lora_b"))  # biases, and any other tensor
    if data.ndim <= 1 or gguf_name.endswith("_norm.weight") or stored_as_is:
        return t.F32
    return {"f32": t.F32, "f16": t.F16, "bf16": t.BF16, "q8_0": t.Q8_0}[outtype]


def add_tensor(writer: Any, gguf_name: str, data: np.ndarray, outtype: str) -> None:
    """Quantize `data` (float32, torch layout) to its type and add it to the writer; ConfigError if it holds
    NaN or inf, or overflows f16 (nothing non-finite is written)."""
    import gguf

    if not np.isfinite(data).all():  # numpy's check: ~10x faster than torch's on a 28M-element embedding
        raise ConfigError(f"{gguf_name} holds NaN or inf values; nothing was written")
    qtype = tensor_qtype(gguf_name, data, outtype)
    try:
        packed = gguf.quants.quantize(data, qtype)
    except gguf.QuantError:  # rows not a multiple of the block: F16, as llama.cpp's converter falls back
        qtype = gguf.GGMLQuantizationType.F16
        packed = gguf.quants.quantize(data, qtype)
    if packed.dtype == np.float16 and not np.isfinite(packed).all():
        raise ConfigError(f"{gguf_name} has values beyond f16's range (±65504); use --outtype bf16 or f32")
    writer.add_tensor(gguf_name, packed, raw_dtype=qtype)


def file_type(outtype: str):
    """general.file_type for --outtype."""
    import gguf

    f = gguf.LlamaFileType
    return {"f32": f.ALL_F32, "f16": f.MOSTLY_F16, "bf16": f.MOSTLY_BF16, "q8_0": f.MOSTLY_Q8_0}[outtype]


# --- hyperparameters -------------------------------------------------------------------------------------
def rope_parameters(config: Any) -> dict:
    """transformers 5's rope_parameters (older configs: rope_scaling + rope_theta), as one dict."""
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope.setdefault("rope_theta", getattr(config, "rope_theta", None))
    return rope


def head_dim(config: Any) -> int:
    """Per-head width: config.head_dim, else hidden_size / num_attention_heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def add_hparams(writer: Any, config: Any, outtype: str) -> None:
    """The model's shape keys (llama.cpp's TextModel.set_gguf_parameters and LlamaModel's additions)."""
    import gguf

    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    rope = rope_parameters(config)
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif rope_type not in ("default", "llama3"):
        raise ConfigError(f"config.json: rope_parameters.rope_type {rope_type!r} is not exported to GGUF by lorakit "
                          "(default, linear and llama3 are)")
    if rope.get("rope_theta") is not None:
        writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if getattr(config, "head_dim", None) is not None:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    writer.add_file_type(file_type(outtype))
    if family_of(config).arch == "LLAMA":
        writer.add_vocab_size(config.vocab_size)
        writer.add_rope_dimension_count(head_dim(config))


def llama3_rope_factors(config: Any) -> Optional[torch.Tensor]:
    """The rope_freqs tensor [head_dim/2] of a Llama 3.1-style "llama3" RoPE scaling (None for other RoPE):
    1 for high frequencies, `factor` for low ones, a smooth blend between (LlamaModel.generate_extra_tensors)."""
    rope = rope_parameters(config)
    if (rope.get("rope_type") or rope.get("type")) != "llama3":
        return None
    dim = head_dim(config)
    base = rope.get("rope_theta") or 10000.0
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


# --- tensors -------------------------------------------------------------------------------------------
def model_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, float32 CPU tensor) of every weight the GGUF holds, q/k permuted where needed."""
    config = model.config
    skip = ("rotary_emb.inv_freq",)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for name, t in model.state_dict().items():
        if name.endswith(skip) or (tied and name == "lm_head.weight"):
            continue
        if not t.is_floating_point():
            raise ConfigError(f"{name} is {t.dtype}: dequantize the model before GGUF export")
        data = t.detach().to("cpu", torch.float32)
        heads = qk_heads(config, name)
        if heads is not None:
            data = permute_rows(data, heads)
        yield name, data


def fill_writer(writer: Any, model: torch.nn.Module, outtype: str, name: str,
                add_tokenizer: Callable[[Any], None]) -> int:
    """Add metadata, hyperparameters, tokenizer and every tensor of `model` to a GGUFWriter; returns the
    number of tensors. Non-finite weights are refused (add_tensor) before anything is written."""
    import gguf

    config = model.config
    name_map = gguf.get_tensor_name_map(model_arch(config), config.num_hidden_layers)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    add_hparams(writer, config, outtype)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(writer)
    count = 0
    factors = llama3_rope_factors(config)
    if factors is not None:
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors.numpy())
        count += 1
    for hf_name, data in model_tensors(model):
        add_tensor(writer, gguf_tensor_name(name_map, hf_name), data.numpy(), outtype)
        count += 1
    return count


def check_gguf_output(output: Path) -> None:
    """The GGUF output path: a file name ending in .gguf whose directory is not an existing file."""
    if output.suffix.lower() != ".gguf":
        raise ConfigError(f"--output {output}: a GGUF file name must end in .gguf")
    if output.is_dir():
        raise ConfigError(f"--output {output} is a directory; give a .gguf file name")


def write_gguf(writer: Any, path: Path) -> None:
    """Write a filled GGUFWriter to `path` (header, keys, tensors) and close it."""
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def copy_tokenizer_fields(source_gguf: Path, writer: Any) -> None:
    """Copy every tokenizer.* key of a GGUF file (tokens, merges, special ids, chat template) into `writer`:
    the tokenizer of a base model that was itself loaded from a GGUF (e.g. the bundled SmolLM2), as the file's
    llama.cpp converter wrote it."""
    fields = tokenizer_fields(source_gguf)
    if not fields:
        raise ConfigError(f"{source_gguf} holds no tokenizer.* metadata to copy")
    for key, value, vtype, sub_type in fields:
        writer.add_key_value(key, value, vtype, sub_type=sub_type)


def tokenizer_fields(path: Path) -> tuple:
    """(key, value, gguf value type, array item type or None) of every tokenizer.* key of a GGUF file, read with
    gguf's reader; cached per file version (the reader parses a 50k-token list element by element)."""
    stat = Path(path).stat()
    return _read_tokenizer_fields(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _read_tokenizer_fields(path: str, size: int, mtime_ns: int) -> tuple:
    import gguf

    reader = gguf.GGUFReader(path)
    out = []
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            main = field.types[0]
            sub = field.types[-1] if main == gguf.GGUFValueType.ARRAY else None
            out.append((key, field.contents(), main, sub))
    return tuple(out)
