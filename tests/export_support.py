"""Helpers of the export tests (no tests here): the SmolLM2 tokenizer as a Hugging Face directory, tiny models
saved with it, adapters with random factors, and GGUF fields read back with gguf's reader."""

from __future__ import annotations

import json
from pathlib import Path

import torch

import lorakit
from lorakit.loading.models import builtin_gguf_path


def gguf_fields(path) -> dict:
    """{key: value} of a GGUF file's metadata (gguf's own reader)."""
    import gguf

    reader = gguf.GGUFReader(path)
    return {key: field.contents() for key, field in reader.fields.items()}


def tokenizer_metadata(path) -> dict:
    """{key: value} of a GGUF file's tokenizer.* keys (gguf's reader; cached per file version)."""
    from lorakit.export.gguf_model import tokenizer_fields

    return {key: value for key, value, _, _ in tokenizer_fields(Path(path))}


def gguf_tensors(path) -> dict:
    """{name: (float32 array in torch layout, ggml type name, ne shape)} of a GGUF file (gguf's reader)."""
    import gguf

    out = {}
    for t in gguf.GGUFReader(path).tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type)
        out[t.name] = (torch.from_numpy(data.copy()).float().reshape(tuple(reversed(t.shape.tolist()))),
                       t.tensor_type.name, tuple(int(n) for n in t.shape))
    return out


def smollm_tokenizer_dir(target: Path) -> Path:
    """SmolLM2's byte-level BPE tokenizer rebuilt from the bundled GGUF (tokens, merges, specials, chat template)
    with the `tokenizers` library and saved as a Hugging Face tokenizer directory: what a SmolLM2 checkpoint from
    the hub ships (digits split one by one, then GPT-2's byte-level split)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    fields = tokenizer_metadata(builtin_gguf_path("smollm2-135m-instruct"))
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
    bpe = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    bpe.decoder = decoders.ByteLevel()
    specials = [t for t, kind in zip(tokens, types) if kind == 3]  # CONTROL tokens of the llama.cpp file
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=tokens[fields["tokenizer.ggml.bos_token_id"]],
                                  eos_token=tokens[fields["tokenizer.ggml.eos_token_id"]],
                                  unk_token=tokens[fields["tokenizer.ggml.unknown_token_id"]],
                                  pad_token=tokens[fields["tokenizer.ggml.padding_token_id"]],
                                  additional_special_tokens=specials, add_prefix_space=False)
    tok.chat_template = fields["tokenizer.chat_template"]
    tok.save_pretrained(target)
    return target


def byte_tokenizer_dir(target: Path) -> Path:
    """A byte-level BPE tokenizer of 256 byte tokens and two specials (ids 256, 257), no merges: small enough
    for tiny models whose GGUFs must still carry a tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    bpe = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(alphabet)}, merges=[]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>")
    tok.chat_template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    tok.save_pretrained(target)
    return target


def tiny_causal(model_type: str, vocab_size: int = 128, seed: int = 0, head_dim: int = 8):
    """A small Llama (GQA: 4 heads, 2 key-value heads) or Qwen2 / Qwen3 causal LM from a config."""
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, head_dim=head_dim,
                  tie_word_embeddings=False)
    classes = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
               "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}
    config_cls, model_cls = (getattr(transformers, n) for n in classes[model_type])
    return model_cls(config_cls(**common)).eval()


def save_base(model, directory: Path, tokenizer_dir: Path = None) -> Path:
    """A model directory (config + safetensors), with the tokenizer files of `tokenizer_dir` copied in."""
    model.save_pretrained(directory)
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            if f.is_file():
                (directory / f.name).write_bytes(f.read_bytes())
    return directory


def saved_adapter(model, directory: Path, seed: int = 0, std: float = 0.05, **config) -> Path:
    """Add a LoRA (any LoraConfig fields) with random factors to `model`, save it, and return the directory."""
    kw = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                      "up_proj", "down_proj"]} | config
    lorakit.add_adapter(model, lorakit.LoraConfig(**kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".deltas." in name:
                p.add_(torch.randn(p.shape, generator=g) * std)
    lorakit.save_adapter(model, directory)
    return directory


def set_base_name(adapter: Path, base) -> None:
    """Point the adapter's base_model_name_or_path at `base` (a path or bundled name)."""
    path = adapter / "adapter_config.json"
    data = json.loads(path.read_text())
    data["base_model_name_or_path"] = str(base)
    path.write_text(json.dumps(data))
