"""Adversarial adapter files: every bad tensor is a LorakitError naming the file, raised before the model changes
(its state_dict and module names exactly as before); loaded base biases come back out with the adapter."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lorakit
from lorakit.errors import AdapterFormatError, LorakitError

WEIGHTS = "adapter_model.safetensors"
A0 = "base_model.model.0.lora_A.weight"
B0 = "base_model.model.0.lora_B.weight"


def _net(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).to(dtype)


def _save(tmp_path, name="good", **config):
    model = _net()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, target_modules=["0", "2"], init_lora_weights=False, **config))
    return lorakit.save_adapter(model, tmp_path / name)


def _rewrite(directory, change):
    """Apply `change` to the saved tensors (a dict) and write them back."""
    tensors = load_file(directory / WEIGHTS)
    change(tensors)
    save_file(tensors, directory / WEIGHTS)
    return directory


def _expect_refused(model, directory, match, name="bad"):
    """The load raises a LorakitError naming the weights file and matching `match`; the model is untouched."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [n for n, _ in model.named_modules()]
    with pytest.raises(LorakitError, match=match) as info:
        lorakit.load_adapter(model, directory, name=name)
    assert str(directory) in str(info.value)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert [n for n, _ in model.named_modules()] == modules
    assert lorakit.list_adapters(model) == []
    return info.value


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool, torch.uint8, torch.complex64,
                                   torch.float8_e4m3fn])
def test_non_float_dtypes_are_refused_not_cast(tmp_path, dtype):
    def to_dtype(t):
        t[A0] = (t[A0] * 4).to(dtype) if dtype != torch.complex64 else torch.complex(t[A0], t[A0])

    bad = _rewrite(_save(tmp_path), to_dtype)
    err = _expect_refused(_net(), bad, "saved as")
    assert str(dtype).replace("torch.", "") in str(err) and "0.lora_A.weight" in str(err)


def test_value_finite_in_fp32_but_not_in_the_fp16_model(tmp_path):
    def big(t):
        t[B0][0, 0] = 1e5  # fp32 file: finite; the fp16 model would hold inf

    bad = _rewrite(_save(tmp_path), big)
    lorakit.load_adapter(_net(), bad, name="fp32-ok")  # the same file loads into an fp32 model
    _expect_refused(_net(torch.float16), bad, "NaN or inf")


@pytest.mark.parametrize("scale,dtype", [(1e20, torch.float32), (300.0, torch.float16)])
def test_factors_whose_product_overflows_are_refused(tmp_path, scale, dtype):
    """Each factor is finite in the model's dtype; B·A·s is not (fp32: 1e40; fp16: 300·300·4·2 > 65504)."""
    def huge(t):
        t[A0] = torch.full_like(t[A0], scale)
        t[B0] = torch.full_like(t[B0], scale)

    bad = _rewrite(_save(tmp_path), huge)
    _expect_refused(_net(dtype), bad, "update for 0 is not finite")


def test_same_tensor_with_and_without_the_prefix_is_refused(tmp_path):
    def duplicate(t):
        t[A0.removeprefix("base_model.model.")] = torch.zeros_like(t[A0])  # last one would win silently

    bad = _rewrite(_save(tmp_path), duplicate)
    _expect_refused(_net(), bad, "saved twice")


def test_base_bias_under_bias_none_is_refused(tmp_path):
    def with_bias(t):
        t["base_model.model.0.bias"] = torch.full((32,), 7.0)

    bad = _rewrite(_save(tmp_path), with_bias)
    assert json.loads((bad / "adapter_config.json").read_text())["bias"] == "none"
    _expect_refused(_net(), bad, "bias='none'")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_weights_file_names_the_file(tmp_path, damage):
    bad = _save(tmp_path)
    data = (bad / WEIGHTS).read_bytes()
    (bad / WEIGHTS).write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x00garbage" * 50,
                                 "empty": b""}[damage])
    err = _expect_refused(_net(), bad, "truncated or corrupt")
    assert isinstance(err, AdapterFormatError) and WEIGHTS in str(err)


def test_damaged_pickle_file_names_the_file(tmp_path):
    bad = _save(tmp_path)
    (bad / WEIGHTS).unlink()
    (bad / "adapter_model.bin").write_bytes(b"PK\x03\x04 not a zip")
    err = _expect_refused(_net(), bad, "could not be read safely")
    assert "adapter_model.bin" in str(err)


def _bias_adapter(tmp_path, name, value, bias="all"):
    """An adapter saved with trained base biases set to `value`."""
    model = _net()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, target_modules=["0", "2"], init_lora_weights=False, bias=bias))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias") and ".deltas." not in n:
                p.fill_(value)
    return lorakit.save_adapter(model, tmp_path / name)


def _biases(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("bias") and ".deltas." not in n}


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_delete_adapter_restores_a_loaded_bias(tmp_path, bias):
    directory = _bias_adapter(tmp_path, "b", 3.0, bias)
    model = _net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lorakit.load_adapter(model, directory)
    loaded = _biases(model)
    assert any(torch.equal(v, torch.full_like(v, 3.0)) for v in loaded.values())  # the file's biases are in
    lorakit.delete_adapter(model, "default")
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_unload_without_merge_restores_and_with_merge_keeps_loaded_biases(tmp_path):
    directory = _bias_adapter(tmp_path, "b", 3.0)
    plain, merged = _net(), _net()
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    for model in (plain, merged):
        lorakit.load_adapter(model, directory)
    lorakit.unload(plain, merge=False)
    assert all(torch.equal(plain.state_dict()[k], before[k]) for k in before)
    lorakit.unload(merged, merge=True)
    assert torch.equal(merged[0].bias, torch.full_like(merged[0].bias, 3.0))  # part of the merged model


def test_two_loaded_biases_come_back_in_order(tmp_path):
    """Deleting the first of two bias-loading adapters keeps the second's biases; deleting both restores."""
    model = _net()
    original = _biases(model)
    lorakit.load_adapter(model, _bias_adapter(tmp_path, "one", 1.0), name="one")
    lorakit.load_adapter(model, _bias_adapter(tmp_path, "two", 2.0), name="two")
    lorakit.delete_adapter(model, "one")
    assert all(torch.equal(v, torch.full_like(v, 2.0)) for v in _biases(model).values())
    lorakit.delete_adapter(model, "two")
    now = _biases(model)
    assert all(torch.equal(now[k], original[k]) for k in original)


# --- lorakit merge: nothing non-finite is written -------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    from test_train_support import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("merge-base"))


def _llama_adapter(base, directory, a_value: float, b_value: float, alpha: float = 4.0, fill: bool = False):
    """A q_proj adapter whose ΔW[0, 0] = a·b (r = 4, alpha = 4: scale 1), everything else 0; fill: every
    entry of A is a and of B is b (ΔW = 4ab everywhere)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, lora_alpha=alpha, target_modules=["q_proj"]))
    lorakit.save_adapter(model, directory)

    def factors(t):
        for key in [k for k in t if "lora_" in k]:
            value = a_value if "lora_A" in key else b_value
            if fill:
                t[key] = torch.full_like(t[key], value)
            else:
                t[key] = torch.zeros_like(t[key])
                t[key][0, 0] = value

    return _rewrite(directory, factors)


def _merge(capsys, adapter, base, out, *extra):
    from lorakit import cli

    code = cli.main(["merge", str(adapter), "--model", str(base), "--output", str(out), *extra])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error" in line]  # (transformers' progress bars aside)
    return code, "\n".join(errors)


def test_merge_refuses_nan_logits_instead_of_comparing_nan(tiny_base, tmp_path, capsys):
    """ΔW entries of 4e36 are finite in fp32 (the adapter loads) but the logits overflow: the old check
    compared NaN with NaN, passed and wrote the model."""
    adapter = _llama_adapter(tiny_base, tmp_path / "a", 1e18, 1e18, fill=True)
    code, err = _merge(capsys, adapter, tiny_base, tmp_path / "merged")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "NaN or inf" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # nothing written, no temp left


def test_merge_refuses_weights_that_overflow_once_merged(tiny_base, tmp_path, capsys):
    """W[0, 0] = 3e38 in the base and ΔW[0, 0] = 3e38: each finite in fp32, their sum is not."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tmp_path / "big-base"
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = 3e38
    model.save_pretrained(base)
    AutoTokenizer.from_pretrained(tiny_base).save_pretrained(base)
    adapter = _llama_adapter(base, tmp_path / "a", 1.75e19, 1.75e19)
    code, err = _merge(capsys, adapter, base, tmp_path / "merged", "--no-check")
    assert code == 2 and "layers.0.self_attn.q_proj.weight" in err and "nothing was written" in err, err
    assert not (tmp_path / "merged").exists()


def test_merge_of_a_nan_alpha_adapter_writes_nothing(tiny_base, tmp_path, capsys):
    adapter = _llama_adapter(tiny_base, tmp_path / "a", 0.1, 0.1)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["lora_alpha"] = float("nan")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    code, err = _merge(capsys, adapter, tiny_base, tmp_path / "merged")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "merged").exists()


def _saved_with_head(tmp_path):
    model = _net()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, target_modules=["0"], modules_to_save=["2"], bias="all",
                                                  init_lora_weights=False))
    return lorakit.save_adapter(model, tmp_path / "head")


@pytest.mark.parametrize("tail", ["weight", "nope"])
def test_original_module_tensors_other_than_biases_are_refused(tmp_path, tail):
    """`<saved module>.original_module.<k>` may only restore a bias of the original (PEFT's bias="all" layout):
    a weight would overwrite the frozen base, an unknown name must be an AdapterFormatError, not AttributeError."""
    directory = _saved_with_head(tmp_path)
    _rewrite(directory, lambda t: t.update({f"base_model.model.2.original_module.{tail}": torch.full((8, 32), 7.0)}))
    err = _expect_refused(_net(), directory, "match no module")
    assert isinstance(err, AdapterFormatError) and f"original_module.{tail}" in str(err)


def test_original_module_biases_still_load(tmp_path):
    directory = _saved_with_head(tmp_path)
    _rewrite(directory, lambda t: t.update({"base_model.model.2.original_module.bias": torch.full((8,), 7.0)}))
    model = lorakit.load_adapter(_net(), directory)
    assert torch.equal(model[2].original_module.bias, torch.full((8,), 7.0))
