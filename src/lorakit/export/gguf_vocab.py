"""The tokenizer and chat template as GGUF metadata, the way llama.cpp's converter writes them.

llama.cpp's `convert_hf_to_gguf.py` (TextModel._set_vocab_gpt2 / get_vocab_base, LlamaModel.set_vocab) writes a
byte-level BPE tokenizer (Llama 3, SmolLM, Qwen2/3, ...) as:

    tokenizer.ggml.model = "gpt2", tokenizer.ggml.pre = <pre-tokenizer name>,
    tokenizer.ggml.tokens = every id's token text (missing ids: "[PAD<id>]", type UNUSED),
    tokenizer.ggml.token_type = NORMAL, or CONTROL for special added tokens, USER_DEFINED for other added ones,
    then gguf.SpecialVocab(dir, load_merges=True): merges, bos/eos/unk/pad ids, add_bos/eos, chat template.

A sentencepiece-style BPE tokenizer.json (byte fallback, Llama 2 / Mistral) goes through gguf.LlamaHfVocab
("llama" model, scores and types from gguf-py itself). The token lists come from the Hugging Face tokenizer;
every GGUF field is written with gguf-py's GGUFWriter.

The pre-tokenizer name tells llama.cpp how to split text before BPE. llama.cpp's converter recognises it by
hashing the tokens of a probe text; lorakit reads it off tokenizer.json's `pre_tokenizer` instead (the names
are llama.cpp's, see llama-vocab.cpp's LLAMA_VOCAB_PRE_TYPE_* table): an unknown splitter is refused rather
than guessed, since a wrong one silently changes tokenization in llama.cpp.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import ConfigError

# Vocab sizes for which llama.cpp's LlamaModel.set_vocab writes add_bos_token = False (SmolLM / Granite small:
# "Apply to granite small models only" in convert_hf_to_gguf.py).
NO_BOS_LLAMA_VOCAB = 49152

# The digit-splitting rule of each pre-tokenizer regex, as tokenizer.json writes it (JSON-unescaped).
_QWEN2_DIGITS = r"\p{N}|"  # Qwen2/Qwen3: one digit per token
_LLAMA3_DIGITS = r"\p{N}{1,3}"  # Llama 3: up to three digits


def pre_tokenizer_name(tokenizer_json: dict, model_type: str) -> str:
    """llama.cpp's name for the pre-tokenizer of a byte-level BPE tokenizer.json.

    Args:
        tokenizer_json: the parsed tokenizer.json.
        model_type: the model's config.model_type (qwen2 / qwen3 models always use the "qwen2" splitter).

    Returns:
        "qwen2", "llama-bpe", "smollm" or "gpt-2".

    Raises:
        ConfigError: a splitter llama.cpp's names do not cover (the file and field are named).
    """
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    regexes = [((p.get("pattern") or {}).get("Regex") or "") for p in parts if p.get("type") == "Split"]
    if model_type in ("qwen2", "qwen3") or any(_QWEN2_DIGITS in r and "{1,3}" not in r for r in regexes):
        return "qwen2"
    if any(_LLAMA3_DIGITS in r for r in regexes):
        return "llama-bpe"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"  # SmolLM / SmolLM2: single digits, then GPT-2's byte-level split
    if kinds == ["ByteLevel"]:
        return "gpt-2"
    raise ConfigError(f"tokenizer.json: field pre_tokenizer ({json.dumps(pre)[:200]}) is not a splitter that "
                      "llama.cpp names (qwen2, llama-bpe, smollm, gpt-2); the GGUF would tokenize differently")


def _looks_special(text: str) -> bool:
    """llama.cpp's does_token_look_special: added tokens like <|im_start|> are control tokens even if the
    tokenizer does not mark them special."""
    return (text.startswith("<|") and text.endswith("|>")) or text in ("<pad>", "<mask>")


def bpe_tokens(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """(token texts, gguf token types) for ids 0..vocab_size-1 of a byte-level BPE HF tokenizer."""
    import gguf

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if by_id and max(by_id) >= vocab_size:
        raise ConfigError(f"the tokenizer has id {max(by_id)}, beyond the model's vocab_size {vocab_size}")
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        if text in added:
            entry = decoder.get(i)
            if entry is not None and not entry.normalized:  # llama.cpp expects added tokens pre-normalized
                text = tokenizer.decode(tokenizer.encode(text, add_special_tokens=False))
            special = (entry is not None and entry.special) or _looks_special(text)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
            if not special:
                text = text.replace("\u2581", " ")  # user-defined tokens with sentencepiece spaces
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(text)
    return tokens, types


def add_vocab(writer: Any, tokenizer: Any, tokenizer_dir: Path, model_type: str, vocab_size: int,
              llama_arch: bool) -> str:
    """Write the tokenizer (tokens, types, merges, special ids) and the chat template into `writer`.

    Args:
        writer: a gguf.GGUFWriter.
        tokenizer: the Hugging Face tokenizer of the model.
        tokenizer_dir: the directory holding its tokenizer.json / tokenizer_config.json / chat template.
        model_type: config.model_type.
        vocab_size: config.vocab_size (the embedding rows; ids past the tokenizer's are padding).
        llama_arch: written as llama.cpp's LLAMA architecture (its LlamaModel.set_vocab extras apply).

    Returns:
        The tokenizer.ggml.model written ("gpt2" or "llama").
    """
    import gguf

    path = tokenizer_dir / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(f"{tokenizer_dir} has no tokenizer.json: GGUF export needs a fast (tokenizers) tokenizer")
    if llama_arch:
        _add_prefix_space(writer, tokenizer_dir)
    tokenizer_json = json.loads(path.read_text(encoding="utf-8"))
    vocab = None
    if not _byte_level(tokenizer_json):
        try:
            vocab = gguf.LlamaHfVocab(tokenizer_dir)  # sentencepiece-style BPE; raises for byte-level BPE
        except (FileNotFoundError, TypeError):
            pass
    if vocab is not None:
        tokens, scores, types = zip(*vocab.all_tokens())
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(list(tokens))
        writer.add_token_scores(list(scores))
        writer.add_token_types(list(types))
        gguf.SpecialVocab(tokenizer_dir, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
        return "llama"
    if (tokenizer_json.get("model") or {}).get("type") != "BPE":
        raise ConfigError(f"{path}: field model.type is {(tokenizer_json.get('model') or {}).get('type')!r}; "
                          "GGUF export handles BPE tokenizers (byte-level or sentencepiece-style)")
    pre = pre_tokenizer_name(tokenizer_json, model_type)
    tokens, types = bpe_tokens(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(tokenizer_dir, load_merges=True).add_to_gguf(writer, quiet=True)
    if llama_arch and vocab_size == NO_BOS_LLAMA_VOCAB:
        writer.add_add_bos_token(False)
    return "gpt2"


def _byte_level(tokenizer_json: dict) -> bool:
    """A ByteLevel pre-tokenizer splits text into GPT-2 byte symbols: a byte-level BPE whatever its decoder says
    (transformers' GGUF-converted tokenizers add a byte-fallback decoder to byte-level vocabularies)."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    return any(p.get("type") == "ByteLevel" for p in parts)


def _add_prefix_space(writer: Any, tokenizer_dir: Path) -> None:
    """tokenizer_config.json's add_prefix_space, as llama.cpp's LlamaModel.set_vocab copies it."""
    config = tokenizer_dir / "tokenizer_config.json"
    if not config.is_file():
        return
    try:
        value = json.loads(config.read_text(encoding="utf-8")).get("add_prefix_space")
    except ValueError as e:
        raise ConfigError(f"{config} is not valid JSON: {e}") from None
    if isinstance(value, bool):
        writer.add_add_space_prefix(value)
