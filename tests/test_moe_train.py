"""`lorakit train --target-parameters` on a tiny MoE built from a config: the experts learn, the router does not
move unless modules_to_save names it, and the adapter is PEFT's."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit.cli import app as cli
from moe_support import EXPERTS, effect_error
from test_train_support import copy_task_rows, corpus, one_thread, tiny_tokenizer, write_jsonl  # noqa: F401


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A 2-layer, 4-expert Qwen3-MoE with the tiny tokenizer, saved as an HF model directory, and copy-task data."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    root = tmp_path_factory.mktemp("moe")
    tok = tiny_tokenizer(corpus())
    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, moe_intermediate_size=48,
                         num_experts=4, num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, max_position_embeddings=256, initializer_range=0.3,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    model = Qwen3MoeForCausalLM(cfg)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    write_jsonl(root / "train.jsonl", copy_task_rows(96))
    write_jsonl(root / "eval.jsonl", copy_task_rows(16, seed=1))
    return root


def _train(capsys, root, name, *extra):
    argv = ["train", "--model", str(root / "model"), "--data", str(root / "train.jsonl"), "--eval-data",
            str(root / "eval.jsonl"), "--output-dir", str(root / name), "--max-steps", "16", "--batch-size", "8",
            "--lr", "2e-2", "--r", "4", "--warmup", "2", "--score", "none", "--quiet", *extra]
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 0, err
    return json.loads((root / name / "metrics.json").read_text())


def test_cli_trains_the_experts_alone_and_peft_loads_the_adapter(capsys, workspace):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    metrics = _train(capsys, workspace, "experts", "--target-parameters", *EXPERTS)
    assert metrics["after"]["eval_loss"] < 0.8 * metrics["before"]["eval_loss"]
    adapter = workspace / "experts" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["target_modules"] == [] and sorted(config["target_parameters"]) == sorted(EXPERTS)
    tensors = load_file(adapter / "adapter_model.safetensors")
    assert tensors and all(".experts." in k for k in tensors)  # no attention layer, no router
    assert any(t.abs().max() > 0 for k, t in tensors.items() if "lora_B" in k)  # B moved off its zero init

    base = AutoModelForCausalLM.from_pretrained(workspace / "model").eval()
    x = torch.randint(0, base.config.vocab_size, (2, 12))
    with torch.no_grad():
        y_base = base(x).logits
        ours = lorakit.load_adapter(copy.deepcopy(base), adapter)
        theirs = PeftModel.from_pretrained(copy.deepcopy(base), adapter).eval()
        assert effect_error(ours(x).logits, theirs(x).logits, y_base) <= 1e-5


def test_the_router_trains_only_when_modules_to_save_names_it(capsys, workspace):
    from transformers import AutoModelForCausalLM

    _train(capsys, workspace, "routed", "--target-parameters", *EXPERTS, "--adapter-options", '{"modules_to_save": ["gate"]}')
    tensors = load_file(workspace / "routed" / "adapter" / "adapter_model.safetensors")
    router = {k: t for k, t in tensors.items() if k.endswith("mlp.gate.weight")}
    assert len(router) == 2  # one trained router copy per layer, under PEFT's modules_to_save key
    base = AutoModelForCausalLM.from_pretrained(workspace / "model").state_dict()
    for key, t in router.items():
        assert not torch.equal(t, base[key.removeprefix("base_model.model.")]), key
