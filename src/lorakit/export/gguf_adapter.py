"""The adapter alone as a llama.cpp LoRA GGUF (`llama-cli -m base.gguf --lora adapter.gguf`).

The layout is the one llama.cpp's `convert_lora_to_gguf.py` writes and `src/llama-adapter.cpp` reads:

- keys: general.architecture = the base's arch, general.type = "adapter", adapter.type = "lora",
  adapter.lora.alpha = float32 alpha (llama.cpp scales each pair by alpha / rank, rank = lora_b's ne[0]:
  llama_adapter_lora_weight::get_scale);
- tensors: `<GGUF name of the base weight>.lora_a` holding PEFT's A [r, in] and `.lora_b` holding B [out, r],
  each in torch layout (GGUF's ne is reversed: lora_a ne = (in, r), lora_b ne = (r, out); llama-adapter.cpp
  checks model ne[0] == a ne[0], model ne[1] == b ne[1], a ne[1] == b ne[0]);
- Llama-architecture q_proj / k_proj: the base weights' rows are permuted for llama.cpp's RoPE layout, so B's
  rows get the same permutation and A stays (LoraTorchTensor.permute in the converter permutes B only);
- only lora_a / lora_b tensors: modules_to_save copies and bias tensors are refused (the converter exits on any
  other tensor but mergekit's norms), as is a LoRA on a tied lm_head (it would be ignored).

The factors come through the Delta protocol (`low_rank_factors`: ΔW = s·B·A), so any variant whose ΔW is a plain
low-rank product exports; others (DoRA, LoHa, ...) are refused with what to do instead. Layers whose scale s is
not alpha / r for the one alpha written (rsLoRA, alpha_pattern, rank_pattern with rsLoRA) get s folded into B so
that llama.cpp's alpha / r gives exactly s·B·A.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from ..analysis.adapters import from_directory
from ..core.atomic import write_file
from ..errors import ConfigError
from .gguf_model import add_tensor, check_gguf_output, gguf_tensor_name, model_arch, permute_rows, qk_heads, write_gguf
from .merged import base_config


def lora_pairs(adapter: Path) -> tuple[list[tuple[str, torch.Tensor, torch.Tensor, float]], object]:
    """[(module path, B [out, r], A [r, in], s)] of every adapted layer of an adapter directory, and its view.
    ConfigError (naming the layer or tensor) where llama.cpp's LoRA format cannot hold the adapter."""
    view = from_directory(adapter)
    if view.extra_tensors:
        names = ", ".join(sorted(view.extra_tensors)[:3])
        raise ConfigError(f"{adapter}: tensors {names} are not LoRA factors (modules_to_save copies or biases); "
                          "llama.cpp's LoRA GGUF holds only lora_a / lora_b: export the merged model instead "
                          "(lorakit export --format gguf)")
    pairs = []
    for path, entry in view.layers.items():
        factors = entry.delta.low_rank_factors()
        if factors is None:
            raise ConfigError(f"{adapter}: layer {path} is {view.variant}, whose change is not a plain low-rank "
                              "product; llama.cpp's LoRA GGUF cannot hold it. Convert it to a plain LoRA first "
                              "(lorakit export --for vllm fits one by SVD) or export the merged model (--format gguf)")
        if type(entry.layer.base_layer) is not nn.Linear:
            raise ConfigError(f"{adapter}: layer {path} is not a linear layer; lorakit's llama.cpp adapter export "
                              "handles linear layers only")
        b, a, s = factors
        pairs.append((path, b.float(), a.float(), float(s)))
    return pairs, view


def common_alpha(pairs: list[tuple[str, torch.Tensor, torch.Tensor, float]]) -> float:
    """The alpha to write: the most common s·r over the layers (PEFT's lora_alpha for a plain LoRA)."""
    products = Counter(round(s * a.shape[0], 9) for _, _, a, s in pairs)
    return float(products.most_common(1)[0][0])


def export_adapter_gguf(adapter: Path, output: Path, model: Optional[str], outtype: str = "f32",
                        log: Callable[[str], None] = print) -> tuple[Path, int]:
    """Write the adapter as a llama.cpp LoRA GGUF (atomically); see the module docstring.

    Args:
        adapter: the adapter directory.
        output: the .gguf file to write.
        model: the base model (only its config is read: architecture, layer and head counts).
        outtype: f32 (llama.cpp's converter default), f16, bf16 or q8_0 (rows that q8_0 cannot block → f16).
        log: progress lines.

    Returns:
        (the written path, the number of tensors).
    """
    import gguf

    check_gguf_output(output)
    config = base_config(adapter, model, log)
    pairs, view = lora_pairs(adapter)
    name_map = gguf.get_tensor_name_map(model_arch(config), config.num_hidden_layers)
    if getattr(config, "tie_word_embeddings", False) and any(p == "lm_head" for p, *_ in pairs):
        raise ConfigError(f"{adapter}: a LoRA on lm_head of a model with tied embeddings; llama.cpp ignores it "
                          "(no output.weight): export the merged model instead")
    alpha = common_alpha(pairs)
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[model_arch(config)])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(f"{view.label} (LoRA)")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for path, b, a, s in pairs:
        b = b * (s * a.shape[0] / alpha)  # 1 unless this layer's scale differs from alpha / r
        heads = qk_heads(config, f"{path}.weight")
        if heads is not None:
            b = permute_rows(b, heads)
        base = gguf_tensor_name(name_map, f"{path}.weight")
        add_tensor(writer, base + ".lora_a", a.contiguous().numpy(), outtype)
        add_tensor(writer, base + ".lora_b", b.contiguous().numpy(), outtype)
    out = write_file(output, lambda tmp: write_gguf(writer, tmp))
    return out, 2 * len(pairs)
