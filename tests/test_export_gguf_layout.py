"""GGUF layout on tiny models: the tokenizer metadata against the llama.cpp-written SmolLM2 GGUF, the adapter GGUF
against llama.cpp's convert_lora_to_gguf.py layout, and the adapter GGUF against the merged GGUF by llama.cpp's
own arithmetic (W' = W + alpha/r · lora_b · lora_a on the files' tensors)."""

from __future__ import annotations

import json

import pytest
import torch

from export_support import (byte_tokenizer_dir, gguf_fields, gguf_tensors, save_base, saved_adapter,
                            smollm_tokenizer_dir, tiny_causal, tokenizer_metadata)
from support import one_thread  # noqa: F401  (autouse: one torch thread)
from lorakit import unload
from lorakit.errors import ConfigError
from lorakit.export.gguf_adapter import export_adapter_gguf
from lorakit.export.gguf_vocab import pre_tokenizer_name
from lorakit.export.command import write_merged_gguf
from lorakit.loading.models import builtin_gguf_path, load_tokenizer

VOCAB = 258  # byte_tokenizer_dir's 256 bytes and 2 specials


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return byte_tokenizer_dir(tmp_path_factory.mktemp("byte-tokenizer"))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tokenizer_dir):
    return save_base(tiny_causal("llama", VOCAB), tmp_path_factory.mktemp("tiny-llama"), tokenizer_dir)


def _write_base(model_dir, out):
    """The base model alone as a GGUF (f32): the reference W the adapter's tensors are added to."""
    from lorakit.loading.models import load_model

    model = load_model(str(model_dir), "causal")
    return write_merged_gguf(model, load_tokenizer(str(model_dir)), str(model_dir), str(model_dir), out, "f32",
                             name="base")[0]


@pytest.fixture(scope="module")
def base_tensors(llama_dir, tmp_path_factory):
    return gguf_tensors(_write_base(llama_dir, tmp_path_factory.mktemp("base") / "base.gguf"))


def test_tokenizer_metadata_matches_llama_cpps_converter(tmp_path):
    """The byte-level BPE path (tokens, token types, merges, pre-tokenizer, special ids, chat template) gives
    exactly the tokenizer.* keys llama.cpp's converter wrote into the bundled SmolLM2 GGUF (a Llama
    architecture with SmolLM2's vocabulary)."""
    import gguf

    from lorakit.export.gguf_model import write_gguf
    from lorakit.export.gguf_vocab import add_vocab

    tokenizer_dir = smollm_tokenizer_dir(tmp_path / "smollm-tokenizer")
    writer = gguf.GGUFWriter(path=None, arch="llama")
    add_vocab(writer, load_tokenizer(str(tokenizer_dir)), tokenizer_dir, "llama", 49152, llama_arch=True)
    write_gguf(writer, tmp_path / "vocab.gguf")
    ours = tokenizer_metadata(tmp_path / "vocab.gguf")
    reference = tokenizer_metadata(builtin_gguf_path("smollm2-135m-instruct"))
    assert ours["tokenizer.ggml.model"] == "gpt2" and ours["tokenizer.ggml.pre"] == "smollm"
    assert len(ours["tokenizer.ggml.tokens"]) == 49152
    assert ours["tokenizer.chat_template"].startswith("{% for message in messages %}")
    assert ours == reference


def test_pre_tokenizer_names_follow_the_split_rule():
    qwen = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
            r"|\s+(?!\S)|\s+")
    llama3 = qwen.replace(r"\p{N}|", r"\p{N}{1,3}|")
    split = lambda regex: {"type": "Sequence", "pretokenizers": [  # noqa: E731
        {"type": "Split", "pattern": {"Regex": regex}}, {"type": "ByteLevel"}]}
    assert pre_tokenizer_name({"pre_tokenizer": split(qwen)}, "llama") == "qwen2"
    assert pre_tokenizer_name({"pre_tokenizer": split(llama3)}, "llama") == "llama-bpe"
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "ByteLevel"}}, "llama") == "gpt-2"
    with pytest.raises(ConfigError, match="pre_tokenizer"):
        pre_tokenizer_name({"pre_tokenizer": {"type": "Whitespace"}}, "llama")


def _adapter_on(model_dir, directory, **config):
    from lorakit.loading.models import load_model

    model = load_model(str(model_dir), "causal")
    return saved_adapter(model, directory, base_model_name_or_path=str(model_dir), **config), model


@pytest.mark.parametrize("config", [{}, {"use_rslora": True, "r": 8, "rank_pattern": {"q_proj": 2}}],
                         ids=["lora", "rslora-rank-pattern"])
def test_adapter_gguf_layout_and_llama_cpp_arithmetic(tmp_path, llama_dir, base_tensors, config):
    """Keys and tensors as convert_lora_to_gguf.py writes them; and, on the files alone, the base GGUF's weight
    plus llama.cpp's alpha / rank · lora_b · lora_a is the merged GGUF's weight (q/k permutation included)."""
    adapter, model = _adapter_on(llama_dir, tmp_path / "adapter", **config)
    out, count = export_adapter_gguf(adapter, tmp_path / "adapter.gguf", model=None, outtype="f32")
    fields, tensors = gguf_fields(out), gguf_tensors(out)
    assert fields["general.architecture"] == "llama" and fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora"
    alpha = fields["adapter.lora.alpha"]
    assert count == len(tensors) == 2 * 7 * 2  # 7 modules × 2 blocks, an a and a b each
    names = {n.rsplit(".", 1)[0] for n in tensors}
    assert "blk.0.attn_q.weight" in names and "blk.1.ffn_down.weight" in names
    for name, (data, kind, ne) in tensors.items():
        assert kind == "F32" and name.endswith((".lora_a", ".lora_b"))
        if name.endswith(".lora_a"):
            b, _, ne_b = tensors[name[:-1] + "b"]
            assert ne[1] == ne_b[0]  # a ne = (in, r), b ne = (r, out): llama-adapter.cpp's shape check
    base = base_tensors
    unload(model, merge=True)
    merged = gguf_tensors(write_merged_gguf(model, load_tokenizer(str(llama_dir)), str(llama_dir), str(llama_dir),
                                            tmp_path / "merged.gguf", "f32", name="merged")[0])
    for stem in names:
        a, b = tensors[stem + ".lora_a"][0], tensors[stem + ".lora_b"][0]
        rank = b.shape[1]  # llama.cpp: rank = lora_b ne[0]
        want = base[stem][0] + (alpha / rank) * (b @ a)
        torch.testing.assert_close(merged[stem][0], want, rtol=1e-5, atol=1e-6)
    assert (merged["blk.0.attn_q.weight"][0] - base["blk.0.attn_q.weight"][0]).abs().max() > 1e-3


def test_qwen2_adapter_is_not_permuted(tmp_path, tokenizer_dir):
    """Qwen2's q/k rows are written as they are (llama.cpp permutes Llama only): lora_b is PEFT's B."""
    base_dir = save_base(tiny_causal("qwen2", VOCAB), tmp_path / "qwen", tokenizer_dir)
    adapter, _ = _adapter_on(base_dir, tmp_path / "adapter", target_modules=["q_proj", "k_proj"])
    out, _ = export_adapter_gguf(adapter, tmp_path / "a.gguf", model=None, outtype="f32")
    from safetensors.torch import load_file

    saved = load_file(adapter / "adapter_model.safetensors")
    b_key = next(k for k in saved if k.endswith("layers.0.self_attn.k_proj.lora_B.weight"))
    torch.testing.assert_close(gguf_tensors(out)["blk.0.attn_k.weight.lora_b"][0], saved[b_key].float())
    assert gguf_fields(out)["general.architecture"] == "qwen2"


def test_dora_and_modules_to_save_are_refused(tmp_path, llama_dir):
    dora, _ = _adapter_on(llama_dir, tmp_path / "dora", use_dora=True)
    with pytest.raises(ConfigError, match="not a plain low-rank"):
        export_adapter_gguf(dora, tmp_path / "d.gguf", model=None)
    saved, _ = _adapter_on(llama_dir, tmp_path / "saved", modules_to_save=["lm_head"])
    with pytest.raises(ConfigError, match="modules_to_save"):
        export_adapter_gguf(saved, tmp_path / "s.gguf", model=None)
    assert not (tmp_path / "d.gguf").exists() and not (tmp_path / "s.gguf").exists()
    assert json.loads((dora / "adapter_config.json").read_text())["use_dora"] is True


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_each_family_reads_back_through_transformers(tmp_path, tokenizer_dir, family):
    """The merged GGUF of every supported family, read by transformers' GGUF loader, is the merged model."""
    from transformers import AutoModelForCausalLM

    from lorakit.loading.models import load_model

    # 264 rows: ids past the tokenizer's (and any it adds for its family) are written as [PAD<id>] tokens.
    # transformers' GGUF loader ignores qwen3.attention.key_length (the file has it, as llama.cpp writes it) and
    # takes Qwen3's default head_dim, 128: the tiny Qwen3 uses that width.
    head_dim = 128 if family == "qwen3" else 8
    base_dir = save_base(tiny_causal(family, 264, head_dim=head_dim), tmp_path / family, tokenizer_dir)
    adapter, model = _adapter_on(base_dir, tmp_path / "adapter", std=0.2)
    unload(model, merge=True)
    out, _ = write_merged_gguf(model, load_tokenizer(str(base_dir)), str(base_dir), str(base_dir),
                               tmp_path / "m.gguf", "f32", name=family)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 7, 42, 250, 3, 99]])
    with torch.no_grad():
        want = model(ids).logits
        torch.testing.assert_close(loaded(ids).logits, want, rtol=1e-4, atol=1e-5)
        assert float((load_model(str(base_dir), "causal")(ids).logits - want).abs().max()) > 1e-3
    fields = gguf_fields(out)
    assert fields["tokenizer.ggml.pre"] == ("gpt-2" if family == "llama" else "qwen2")
    assert len(fields["tokenizer.ggml.tokens"]) == 264 and fields["tokenizer.ggml.tokens"][263] == "[PAD263]"
    assert fields[f"{family}.attention.key_length"] == head_dim


def test_bf16_and_q8_0_tensor_types(tmp_path, llama_dir):
    """bf16 / q8_0 weights as gguf.quants packs them (q8_0 rows that 32-blocks cannot split fall back to f16),
    norms in f32; transformers reads the bf16 file back to the model within bf16's rounding."""
    from transformers import AutoModelForCausalLM

    from lorakit.loading.models import load_model

    model = load_model(str(llama_dir), "causal")
    tokenizer = load_tokenizer(str(llama_dir))
    for outtype in ("bf16", "q8_0"):
        write_merged_gguf(model, tokenizer, str(llama_dir), str(llama_dir), tmp_path / f"{outtype}.gguf", outtype,
                          name=outtype)
    kinds = {n: kind for n, (_, kind, _) in gguf_tensors(tmp_path / "bf16.gguf").items()}
    assert kinds["blk.0.attn_q.weight"] == "BF16" and kinds["blk.0.attn_norm.weight"] == "F32"
    q8 = {n: (kind, ne) for n, (_, kind, ne) in gguf_tensors(tmp_path / "q8_0.gguf").items()}
    assert q8["blk.0.attn_q.weight"] == ("Q8_0", (32, 32))  # rows of 32: one block each
    assert q8["blk.0.ffn_down.weight"][0] == "Q8_0" and q8["output_norm.weight"][0] == "F32"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="bf16.gguf", dtype=torch.float32).eval()
    ids = torch.tensor([[1, 7, 42, 250, 3, 99]])
    with torch.no_grad():
        want = model(ids).logits
        assert float((loaded(ids).logits - want).abs().max() / want.abs().max()) <= 2e-2
    adapter, _ = _adapter_on(llama_dir, tmp_path / "adapter")  # r = 4: lora_b's rows (ne0 = r) cannot block
    out, _ = export_adapter_gguf(adapter, tmp_path / "a.gguf", model=None, outtype="q8_0")
    kinds = {n: kind for n, (_, kind, _) in gguf_tensors(out).items()}
    assert kinds["blk.0.attn_q.weight.lora_a"] == "Q8_0" and kinds["blk.0.attn_q.weight.lora_b"] == "F16"
