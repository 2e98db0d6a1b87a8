"""The merged SmolLM2-135M GGUF read back by transformers' own GGUF loader (an implementation independent of the
writer, which undoes llama.cpp's q/k permutation): f16 gives the merged model's logits, q8_0 its greedy tokens;
the tokenizer and chat template travel in the file. SmolLM2 is loaded and merged once for the module (the CLI
path through lorakit.export.merged runs on tiny models in test_export_cli.py)."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch

from export_support import gguf_fields, saved_adapter, tokenizer_metadata
from support import one_thread  # noqa: F401  (autouse: one torch thread; two spin against each other here)
from lorakit import unload
from lorakit.export.command import write_merged_gguf
from lorakit.loading.models import BUILTIN_MODEL, bundled_model_path, builtin_gguf_path, load_model, load_tokenizer

PROMPTS = ["What is the capital of France?", "Write a short poem about the sea."]


@pytest.fixture(scope="module", autouse=True)
def shared_gguf_parsing():
    """transformers' GGUF loader builds gguf's tensor-name map once per submodule (~400 times for SmolLM2) and
    parses each file twice (config, then weights; 100k tokenizer strings each time). Both depend only on their
    inputs (arch and layers; the unchanged file), so the module shares them. Results are unchanged."""
    import gguf

    originals = gguf.get_tensor_name_map, gguf.GGUFReader
    readers = {}

    def reader(path, mode="r"):
        key = (str(path), mode, Path(path).stat().st_mtime_ns)
        if key not in readers:
            readers[key] = originals[1](path, mode)
        return readers[key]

    gguf.get_tensor_name_map = functools.lru_cache(maxsize=8)(originals[0])
    gguf.GGUFReader = reader
    yield
    gguf.get_tensor_name_map, gguf.GGUFReader = originals


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """(merged HF model, tokenizer, base path, output folder, base logits on the first prompt): a LoRA with
    random factors on SmolLM2, merged by lorakit."""
    root = tmp_path_factory.mktemp("smollm2-export")
    torch.manual_seed(0)  # lora_A's initialisation: the same adapter every run
    path = str(bundled_model_path())
    model, tokenizer = load_model(path, "causal").eval(), load_tokenizer(path)
    with torch.no_grad():
        base_logits = model(_prompts(tokenizer)[0]).logits
    saved_adapter(model, root / "adapter", r=8, lora_alpha=16, std=0.002, base_model_name_or_path=BUILTIN_MODEL)
    unload(model, merge=True)
    return model, tokenizer, path, root, base_logits


def _prompts(tokenizer):
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in PROMPTS]
    return [tokenizer(t, return_tensors="pt").input_ids for t in texts]


def _export_and_load(merged, outtype):
    from transformers import AutoModelForCausalLM

    model, tokenizer, path, root, _ = merged
    out, count = write_merged_gguf(model, tokenizer, path, BUILTIN_MODEL, root / f"merged-{outtype}.gguf", outtype,
                                   name="smollm2 + adapter")
    assert count == 272  # 30 blocks × 9 tensors + token_embd + output_norm (the output head is tied)
    loaded = AutoModelForCausalLM.from_pretrained(str(root), gguf_file=out.name, dtype=torch.float32).eval()
    return out, loaded


def test_f16_gguf_gives_the_merged_models_logits(merged):
    model, tokenizer, _, _, base_logits = merged
    out, loaded = _export_and_load(merged, "f16")
    with torch.no_grad():
        for ids in _prompts(tokenizer):
            want, got = model(ids).logits, loaded(ids).logits
            assert float((got - want).abs().max() / want.abs().max()) <= 1e-2
        # the adapter changed what the file holds: far more than the f16 rounding
        assert float((base_logits - model(_prompts(tokenizer)[0]).logits).abs().max()) > 0.1
    fields = gguf_fields(out)
    assert fields["general.architecture"] == "llama" and fields["general.file_type"] == 1  # MOSTLY_F16
    assert fields["llama.attention.head_count_kv"] == 3 and fields["llama.rope.freq_base"] == 100000.0


def test_q8_0_gguf_gives_the_same_greedy_tokens(merged):
    model, tokenizer, _, _, _ = merged
    out, loaded = _export_and_load(merged, "q8_0")
    for ids in _prompts(tokenizer):
        want = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        # The loaded model's greedy choice at every step of that sequence (one forward pass, teacher-forced):
        # all equal means its own greedy generation is the same 8 tokens.
        with torch.no_grad():
            picks = loaded(want).logits[0, ids.shape[1] - 1:-1].argmax(-1)
        assert torch.equal(picks, want[0, ids.shape[1]:])
    import gguf

    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert kinds["blk.0.attn_q.weight"] == "Q8_0" and kinds["blk.0.attn_norm.weight"] == "F32"
    # The tokenizer and chat template are the base GGUF's, as llama.cpp's converter wrote them.
    ours, reference = tokenizer_metadata(out), tokenizer_metadata(builtin_gguf_path(BUILTIN_MODEL))
    assert ours == reference
    assert "<|im_start|>" in ours["tokenizer.chat_template"] and len(ours["tokenizer.ggml.tokens"]) == 49152
