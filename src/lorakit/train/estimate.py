"""How much memory fine-tuning takes, before you try (the library behind `lorakit estimate`, cli/estimate.py).

    total = frozen weights · bytes/param            (fp32 4, bf16 2, int8 1, NF4 ≈ 4.127 bits = 0.516 B)
          + trainable params · 16 bytes              (weight 2 + grad 2 + AdamW fp32 master 4 + two moments 8;
                                                      in fp32 training: 4 + 4 + 8, the same 16)
          + activations saved for backward           (per layer and token, see `activation_elements`)
Full fine-tuning is the same sum with every parameter trainable. Shapes come from the model's config: the
model is built on the meta device (no memory, no weights), so every architecture transformers knows works.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..errors import ConfigError
from ..quant.nf4 import ABSMAX_BLOCK, DEFAULT_BLOCK_SIZE

# Bits per frozen weight. NF4 (double-quantized, as lorakit.quant stores it) keeps 4 bits per weight, an 8-bit
# absmax code per block of NF4_BLOCK weights, and an fp32 scale per ABSMAX_BLOCK absmax codes.
NF4_BLOCK = DEFAULT_BLOCK_SIZE  # the block size quantize_nf4 and lorakit.quantize use by default
NF4_BITS = 4 + 8 / NF4_BLOCK + 32 / (NF4_BLOCK * ABSMAX_BLOCK)
BYTES_PER_WEIGHT = {32: 4.0, 16: 2.0, 8: 1.0, 4: NF4_BITS / 8}
TRAINABLE_BYTES = 16

# Well-known shapes (from each model's published config.json), for estimating without a download.
KNOWN_SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "smollm2-360m": dict(model_type="llama", hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                         num_attention_heads=15, num_key_value_heads=5, vocab_size=49152, tie_word_embeddings=True),
    "smollm2-1.7b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=49152, tie_word_embeddings=True),
    "llama-2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "llama-2-13b": dict(model_type="llama", hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                        num_attention_heads=40, num_key_value_heads=40, vocab_size=32000),
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "llama-3-70b": dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, vocab_size=128256),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32000),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064),
    "gpt2": dict(model_type="gpt2", n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024),
}


@dataclass
class Shape:
    """What the arithmetic needs to know of a model."""

    name: str
    params: int  # all parameters (tied weights once)
    linears: dict[str, tuple[int, int]]  # module path → (in, out) of every linear-like layer
    hidden: int
    intermediate: int
    kv_dim: int
    layers: int
    heads: int
    vocab: int


def load_config(model: str):
    """A transformers config from a known shape name, a model directory or a config.json file."""
    from transformers import AutoConfig, CONFIG_MAPPING

    key = model.lower()
    if key in KNOWN_SHAPES:
        values = dict(KNOWN_SHAPES[key])
        return CONFIG_MAPPING[values.pop("model_type")](**values), key
    path = Path(model).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return AutoConfig.from_pretrained(path), path.name
    if path.is_file() and path.suffix == ".json":
        data = json.loads(path.read_text())
        if "model_type" not in data:
            raise ConfigError(f"{path} has no model_type: not a transformers config.json")
        return CONFIG_MAPPING[data.pop("model_type")](**data), path.stem
    raise ConfigError(f"{model!r} is not a known shape ({', '.join(sorted(KNOWN_SHAPES))}), a model directory or "
                      "a config.json")


def shape_of(model: str) -> Shape:
    """Parameter counts and linear-layer shapes, from the model built on the meta device."""
    from transformers import AutoModelForCausalLM, AutoModel

    config, name = load_config(model)
    with torch.device("meta"):
        try:
            net = AutoModelForCausalLM.from_config(config)
        except ValueError:
            net = AutoModel.from_config(config)
    linears = {}
    for path, m in net.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(m, nn.Linear):
            linears[path] = (m.in_features, m.out_features)
        elif type(m).__name__ == "Conv1D" and w is not None:  # GPT-2 stores [in, out]
            linears[path] = (w.shape[0], w.shape[1])
    get = lambda *names: next((getattr(config, n) for n in names if getattr(config, n, None)), 0)  # noqa: E731
    hidden = get("hidden_size", "n_embd", "d_model")
    heads = get("num_attention_heads", "n_head")
    kv = get("num_key_value_heads") or heads
    head_dim = get("head_dim") or hidden // max(1, heads)
    return Shape(name=name, params=sum(p.numel() for p in net.parameters()), linears=linears, hidden=hidden,
                 intermediate=get("intermediate_size", "n_inner", "ffn_dim") or 4 * hidden,
                 kv_dim=kv * head_dim, layers=get("num_hidden_layers", "n_layer"), heads=heads,
                 vocab=get("vocab_size"))


def lora_targets(shape: Shape, targets: list[str]) -> dict[str, tuple[int, int]]:
    """The targeted linear layers (PEFT's matching: a name, a `.`-suffix or a regex; 'all-linear' skips the
    output head)."""
    hits = {}
    for path, dims in shape.linears.items():
        leaf = path.rsplit(".", 1)[-1]
        if targets == ["all-linear"]:
            hit = leaf not in ("lm_head", "score", "classifier")
        else:
            hit = any(path == t or path.endswith("." + t) or re.fullmatch(t, path) for t in targets)
        if hit:
            hits[path] = dims
    return hits


def activation_elements(shape: Shape, tokens: int, lora_modules_per_layer: int, r: int,
                        checkpointing: bool = False) -> tuple[float, float]:
    """(elements autograd keeps for backward in the blocks, fp32 elements of the loss) for `tokens` tokens.

    Per layer and token, what a pre-norm decoder block with SDPA attention (no seq x seq matrix) saves,
    counted with autograd's saved-tensor hooks on transformers' Llama: five hidden-sized tensors (both
    norms' inputs and outputs, the attention output), k and v (2·kv), the MLP's gate, up and their product
    (3·intermediate), and r per LoRA module (its down-projection; its input is the base layer's, already kept).
    With checkpointing only each layer's input is kept, plus one layer's worth while it is recomputed.
    The loss: log-softmax kept in fp32 and, in backward, its gradient and the logits' gradient (3·vocab).
    """
    h, i, kv = shape.hidden, shape.intermediate, shape.kv_dim
    per_token_layer = 5 * h + 2 * kv + 3 * i + lora_modules_per_layer * r
    if checkpointing:
        blocks = tokens * (shape.layers * h + per_token_layer)
    else:
        blocks = tokens * shape.layers * per_token_layer
    return float(blocks), float(3 * tokens * shape.vocab)


@dataclass
class Estimate:
    """Bytes of LoRA fine-tuning (frozen weights + trainable states + activations) and of full fine-tuning."""

    shape: Shape
    trainable: int
    weights_bytes: float
    trainable_bytes: float
    activation_bytes: float
    full_ft_bytes: float

    @property
    def total_bytes(self) -> float:
        """Everything LoRA fine-tuning holds: frozen weights + trainable states + activations."""
        return self.weights_bytes + self.trainable_bytes + self.activation_bytes


def estimate(model: str, r: int = 8, targets: Optional[list[str]] = None, bits: int = 16, batch: int = 1,
             seq: int = 512, activation_bytes: int = 0, gradient_checkpointing: bool = False) -> Estimate:
    """The memory of fine-tuning `model` with LoRA, and of fine-tuning all of it.

    Args:
        model: a known shape name (KNOWN_SHAPES), a model directory or a config.json.
        r: LoRA rank.
        targets: adapted modules (names, suffixes or regexes), or ['all-linear']; default q_proj, v_proj.
        bits: bits per frozen weight: 32, 16, 8 or 4 (NF4).
        batch, seq: sequences per step and tokens per sequence.
        activation_bytes: bytes per saved activation element; 0: 4 for fp32 weights, else 2 (bf16 autocast).
        gradient_checkpointing: count only each layer's input (plus one layer being recomputed).

    Returns:
        An Estimate (its total_bytes is the LoRA total; full_ft_bytes the full fine-tuning one).
    """
    if bits not in BYTES_PER_WEIGHT:
        raise ConfigError(f"--bits must be one of {sorted(BYTES_PER_WEIGHT)}, got {bits}")
    shape = shape_of(model)
    targets = targets or ["q_proj", "v_proj"]
    hits = lora_targets(shape, targets)
    trainable = sum(r * (fan_in + fan_out) for fan_in, fan_out in hits.values())
    if not hits:
        names = sorted({p.rsplit(".", 1)[-1] for p in shape.linears})
        raise ConfigError(f"--targets {targets} match no linear layer of {shape.name}; its layers: {names}")
    per_layer_modules = round(len(hits) / max(1, shape.layers))
    act_bytes = activation_bytes or (4 if bits == 32 else 2)
    blocks, logits = activation_elements(shape, batch * seq, per_layer_modules, r, gradient_checkpointing)
    activations = blocks * act_bytes + logits * 4
    weights = shape.params * BYTES_PER_WEIGHT[bits]
    full = shape.params * TRAINABLE_BYTES + activations  # every weight trainable: 16 B each, nothing frozen
    return Estimate(shape, trainable, weights, trainable * TRAINABLE_BYTES, activations, full)


def weights_table(params: int) -> list[tuple[str, float]]:
    """[(precision, bytes)] of `params` frozen weights in fp32, bf16/fp16, int8 and NF4."""
    return [("fp32", params * 4), ("bf16/fp16", params * 2), ("int8", params * 1),
            ("int4 (NF4)", params * NF4_BITS / 8)]

