"""Helpers for the training/CLI tests (no tests here): a tiny byte-level BPE tokenizer with a ChatML template and
tiny Hugging Face models saved next to it, so every command can run end to end in a second or two."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from support import one_thread  # noqa: F401  (the training tests import it from here)

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def tiny_tokenizer(corpus: list[str], vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token="<|im_start|>")
    fast.chat_template = CHATML
    return fast


def corpus() -> list[str]:
    from lorakit.train import task

    train, held = task.builtin_rows(200, 20, seed=0)
    texts = [m["content"] for row in train + held for m in row["messages"]]
    return texts + ["The quick brown fox jumps over the lazy dog.", "hello world"] * 5


def save_tiny_llama(directory: Path, seed: int = 0) -> Path:
    """A 2-layer Llama (hidden 64) with the tiny tokenizer, saved as a normal HF model directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer(corpus())
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.3,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def copy_task_rows(n: int, seed: int = 0) -> list[dict]:
    """prompt/completion rows: "copy: <3 colors> =>" → the first color. Learnable in a few dozen steps."""
    import random

    rng = random.Random(seed)
    words = "red blue green gold pink gray teal navy".split()
    rows = []
    for _ in range(n):
        picked = [rng.choice(words) for _ in range(3)]
        rows.append({"prompt": "copy: " + " ".join(picked) + " =>", "completion": " " + picked[0]})
    return rows


