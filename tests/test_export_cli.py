"""`lorakit export`, `lorakit info` (serving engines) and `lorakit merge` of an NF4-trained run from the command
line, on tiny models: bad input exits 2 with one line and writes nothing; good input writes whole files."""

from __future__ import annotations

import json

import pytest
import torch

from export_support import byte_tokenizer_dir, gguf_fields, save_base, saved_adapter, tiny_causal
from support import one_thread  # noqa: F401  (autouse: one torch thread)
from lorakit.cli import app as cli
from lorakit.loading.models import load_model


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    tokenizer = byte_tokenizer_dir(tmp_path_factory.mktemp("byte-tokenizer"))
    return save_base(tiny_causal("llama", vocab_size=258), tmp_path_factory.mktemp("tiny-llama"), tokenizer)


@pytest.fixture(scope="module")
def adapter(base_dir, tmp_path_factory):
    model = load_model(str(base_dir), "causal")
    return saved_adapter(model, tmp_path_factory.mktemp("run") / "adapter", base_model_name_or_path=str(base_dir))


def test_export_gguf_end_to_end(capsys, tmp_path, base_dir, adapter):
    """The adapter's base comes from its config; transformers reads the file back to the merged model."""
    from transformers import AutoModelForCausalLM

    from lorakit import load_adapter, unload

    code, out, err = run_cli(capsys, "export", adapter.parent, "--output", tmp_path / "m.gguf", "--outtype", "f32")
    assert code == 0, err
    assert "tensors, f32" in out and "memory: about" in err
    merged = load_model(str(base_dir), "causal")
    load_adapter(merged, adapter)
    unload(merged, merge=True)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 200, 31]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, merged(ids).logits, rtol=1e-4, atol=1e-5)
    code, out, err = run_cli(capsys, "export", adapter, "--format", "gguf-adapter", "--output", tmp_path / "a.gguf")
    assert code == 0 and "llama-cli --lora a.gguf" in out
    assert gguf_fields(tmp_path / "a.gguf")["general.type"] == "adapter"


def test_export_for_vllm_and_info(capsys, tmp_path, adapter):
    code, out, _ = run_cli(capsys, "info", adapter)
    assert code == 0 and "vllm: loads as is; sglang: loads as is" in out
    code, out, err = run_cli(capsys, "export", adapter, "--for", "vllm", "--max-rank", "2", "--output", tmp_path / "v")
    assert code == 0, err
    assert "rank 4 truncated to 2" in out and "refit error" in out
    assert json.loads((tmp_path / "v" / "adapter_config.json").read_text())["r"] == 2


@pytest.mark.parametrize("args, needle", [
    (["--output", "x.gguf"], "give the adapter directory"),
    (["{adapter}"], "give --output"),
    (["{adapter}", "--output", "{tmp}/model.bin"], "must end in .gguf"),
    (["{tmp}", "--output", "{tmp}/m.gguf"], "is not an adapter directory"),
    (["{adapter}", "--outtype", "q4_0", "--output", "{tmp}/m.gguf"], "outtype"),
    (["{adapter}", "--for", "tgi", "--output", "{tmp}/o"], "for_engine"),
    (["{adapter}", "--model", "{gpt2}", "--output", "{tmp}/m.gguf"], "model_type 'gpt2'"),
    (["{dora}", "--format", "gguf-adapter", "--output", "{tmp}/m.gguf"], "not a plain low-rank"),
    (["{saved}", "--for", "sglang", "--output", "{tmp}/o"], "modules_to_save"),
])
def test_bad_input_exits_2_with_one_line(capsys, tmp_path, base_dir, adapter, args, needle):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64)).save_pretrained(gpt2)
    model = load_model(str(base_dir), "causal")
    dora = saved_adapter(model, tmp_path / "dora", use_dora=True, base_model_name_or_path=str(base_dir))
    model = load_model(str(base_dir), "causal")
    saved = saved_adapter(model, tmp_path / "saved", modules_to_save=["lm_head"], base_model_name_or_path=str(base_dir))
    names = {"adapter": adapter, "tmp": tmp_path / "empty", "gpt2": gpt2, "dora": dora, "saved": saved}
    (tmp_path / "empty").mkdir()
    code, out, err = run_cli(capsys, "export", *[a.format(**names) for a in args])
    assert code == 2 and needle in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == []


def test_merge_of_an_nf4_trained_run_reproduces_the_trained_model(capsys, tmp_path, base_dir):
    """An adapter trained on the NF4 base (options.json: bits 4) is merged onto that base, dequantised: the
    merged model gives the NF4 + adapter model's logits, which merging onto the original weights would not."""
    from lorakit import load_adapter, quantize, unload
    from transformers import AutoModelForCausalLM

    model = quantize(load_model(str(base_dir), "causal"), compute_dtype=torch.float32)
    run = tmp_path / "run"
    adapter = saved_adapter(model, run / "adapter", std=0.3, base_model_name_or_path=str(base_dir))
    (run / "options.json").write_text(json.dumps({"bits": 4, "model": str(base_dir)}))
    ids = torch.tensor([[3, 14, 15, 92, 65, 35]])
    with torch.no_grad():
        trained = model(ids).logits
    code, out, err = run_cli(capsys, "merge", run, "--model", base_dir, "--output", tmp_path / "merged")
    assert code == 0, err
    assert "memory: about" in err and "NF4" in err and "NF4-quantised base" in out
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    dense = load_model(str(base_dir), "causal")
    load_adapter(dense, adapter)
    unload(dense, merge=True)
    with torch.no_grad():
        got, onto_original = merged(ids).logits, dense(ids).logits
    torch.testing.assert_close(got, trained, rtol=1e-4, atol=1e-5)
    assert float((onto_original - trained).abs().max()) > 100 * float((got - trained).abs().max()) + 1e-4
