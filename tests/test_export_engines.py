"""`lorakit export --for vllm|sglang`: the converted directory satisfies the engines' loader rules (as cited in
lorakit/export/engines.py from vLLM's peft_helper.py and SGLang's lora/utils.py), keeps the adapter's change
where it can (exactly, or as the best fit of the allowed rank, with the reported error measured here
independently), and is read by PEFT."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from export_support import save_base, saved_adapter, tiny_causal
from support import one_thread  # noqa: F401  (autouse: one torch thread)
from lorakit.errors import ConfigError
from lorakit.export.engines import convert_for_engine, engine_problems, engine_support


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_base(tiny_causal("llama"), tmp_path_factory.mktemp("tiny-llama"))


def _adapter(base_dir, directory, **config):
    from lorakit.loading.models import load_model

    model = load_model(str(base_dir), "causal")
    return saved_adapter(model, directory, base_model_name_or_path=str(base_dir), **config)


def _delta_weights(directory) -> dict[str, torch.Tensor]:
    """{module path: scale · B · A} computed from a PEFT LoRA directory's files with PEFT's scale rules."""
    config = json.loads((directory / "adapter_config.json").read_text())
    tensors = load_file(directory / "adapter_model.safetensors")
    out = {}
    for key, a in tensors.items():
        if key.endswith("lora_A.weight"):
            path = key[len("base_model.model."):-len(".lora_A.weight")]
            b = tensors[key.replace("lora_A", "lora_B")]
            r = a.shape[0]
            scale = config["lora_alpha"] / (r ** 0.5 if config.get("use_rslora") else r)
            out[path] = scale * b.double() @ a.double()
    return out


def _peft_loads(base_dir, directory) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(directory))
    assert model.peft_config["default"].r == json.loads((directory / "adapter_config.json").read_text())["r"]


def test_a_plain_lora_within_limits_is_copied_with_leaf_targets(tmp_path, base_dir):
    adapter = _adapter(base_dir, tmp_path / "a", target_modules=["q_proj", "v_proj"])
    assert engine_support(adapter) == {"vllm": [], "sglang": []}
    report = convert_for_engine(adapter, "sglang", tmp_path / "out", log=lambda _: None)
    data = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert data["target_modules"] == ["q_proj", "v_proj"] and not report.refitted and not report.errors
    before, after = _delta_weights(adapter), _delta_weights(tmp_path / "out")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_rank_above_vllms_limit_is_truncated_with_the_reported_error(tmp_path, base_dir):
    adapter = _adapter(base_dir, tmp_path / "a", r=24, lora_alpha=48, std=0.3)
    problems = engine_support(adapter)["vllm"]
    assert any("rank 24 is above --max-lora-rank 16" in p for p in problems)
    report = convert_for_engine(adapter, "vllm", tmp_path / "out", log=lambda _: None)
    out = tmp_path / "out"
    data = json.loads((out / "adapter_config.json").read_text())
    assert data["r"] == 16 and engine_problems(data, "vllm") == [] and not data.get("modules_to_save")
    assert all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in load_file(out / "adapter_model.safetensors"))
    before, after = _delta_weights(adapter), _delta_weights(out)
    for path, dw in before.items():
        s = torch.linalg.svdvals(dw)
        best = float((s[16:] ** 2).sum().sqrt() / (s ** 2).sum().sqrt())  # Eckart–Young
        measured = float((dw - after[path]).norm() / dw.norm())
        assert measured == pytest.approx(best, rel=1e-3, abs=1e-5)
        assert report.errors[path] == pytest.approx(measured, rel=1e-3, abs=1e-5)
    assert max(report.errors.values()) > 0.01  # rank 24 → 16 really loses something here
    assert "truncated" in report.describe() and "--max-lora-rank 16" in report.describe()
    _peft_loads(base_dir, out)


def test_dora_becomes_a_plain_lora_fitted_to_its_delta(tmp_path, base_dir):
    """DoRA's ΔW depends on W: read with the base model, refitted at the same rank, error reported."""
    adapter = _adapter(base_dir, tmp_path / "a", use_dora=True, std=0.2)
    assert all(any("DORA" in p for p in problems) for problems in engine_support(adapter).values())
    from lorakit import load_adapter, unload
    from lorakit.loading.models import load_model

    base, merged = load_model(str(base_dir), "causal"), load_model(str(base_dir), "causal")
    load_adapter(merged, adapter)
    unload(merged, merge=True)
    report = convert_for_engine(adapter, "vllm", tmp_path / "out", model=str(base_dir), log=lambda _: None)
    data = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert data["use_dora"] is False and data["r"] == 4 and engine_problems(data, "vllm") == []
    fitted = _delta_weights(tmp_path / "out")
    w0, w1 = dict(base.named_parameters()), dict(merged.named_parameters())
    for path, lora_dw in fitted.items():
        dora_dw = (w1[path + ".weight"] - w0[path + ".weight"]).detach().double()
        s = torch.linalg.svdvals(dora_dw)
        best = float((s[4:] ** 2).sum().sqrt() / (s ** 2).sum().sqrt())
        measured = float((dora_dw - lora_dw).norm() / dora_dw.norm())
        assert measured == pytest.approx(best, rel=1e-2, abs=1e-4)
        assert report.errors[path] == pytest.approx(measured, rel=1e-2, abs=1e-4)
    _peft_loads(base_dir, tmp_path / "out")


def test_modules_to_save_are_explained_or_dropped(tmp_path, base_dir):
    adapter = _adapter(base_dir, tmp_path / "a", modules_to_save=["lm_head"])
    assert any("modules_to_save" in p for p in engine_support(adapter)["vllm"])
    with pytest.raises(ConfigError, match="modules_to_save .*--drop-modules-to-save"):
        convert_for_engine(adapter, "vllm", tmp_path / "out", log=lambda _: None)
    assert not (tmp_path / "out").exists()
    report = convert_for_engine(adapter, "vllm", tmp_path / "out", drop_modules_to_save=True, log=lambda _: None)
    keys = set(load_file(tmp_path / "out" / "adapter_model.safetensors"))
    assert not any("lm_head" in k for k in keys) and any("dropped" in c for c in report.changes)


def test_sglang_target_strings_and_rank_patterns(tmp_path, base_dir):
    regex = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": r".*\.(q|v)_proj"}
    assert any("'all' or 'all-linear'" in p for p in engine_problems(regex, "sglang"))
    assert engine_problems(dict(regex, target_modules="all-linear"), "sglang") == []
    assert engine_problems(dict(regex, target_modules="all-linear"), "sglang", max_rank=4) != []
    adapter = _adapter(base_dir, tmp_path / "a", r=8, lora_alpha=8, target_modules=r".*\.(q|v)_proj",
                       rank_pattern={"v_proj": 2}, use_rslora=True)
    assert any("rank_pattern" in p for p in engine_support(adapter)["vllm"])
    report = convert_for_engine(adapter, "vllm", tmp_path / "out", log=lambda _: None)
    data = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert data["target_modules"] == ["q_proj", "v_proj"] and not data["rank_pattern"] and data["r"] == 8
    before, after = _delta_weights(adapter), _delta_weights(tmp_path / "out")
    for path in before:  # same ΔW at one rank and scale: only padding and the scale moved
        torch.testing.assert_close(after[path], before[path], rtol=1e-5, atol=1e-7)
    assert max(report.errors.values()) < 1e-5
