"""Bad input: a clear lorakit error, and the model (and files) exactly as before."""

import copy
import json

import pytest
import torch
from torch import nn

import lorakit
from lorakit.errors import (AdapterFormatError, AdapterNameError, ConfigError, LorakitError, ShapeMismatchError,
                            TargetError)


def _net(hidden=32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, hidden), nn.ReLU(), nn.Linear(hidden, 8))


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [type(m) for m in model.modules()],
            {n: p.requires_grad for n, p in model.named_parameters()},
            lorakit.list_adapters(model))


def _assert_untouched(model, snap):
    sd, types, grads, adapters = snap
    now = model.state_dict()
    assert now.keys() == sd.keys()
    assert all(torch.equal(now[k], sd[k]) for k in sd)
    assert [type(m) for m in model.modules()] == types
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert lorakit.list_adapters(model) == adapters


@pytest.fixture
def saved(tmp_path):
    """A valid adapter directory for _net()."""
    model = _net()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, target_modules=["0", "2"], init_lora_weights=False))
    lorakit.save_adapter(model, tmp_path / "good")
    return tmp_path / "good"


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


@pytest.fixture(params=["plain", "already adapted"])
def victim(request):
    """The model a bad load is tried on: plain, or already holding another adapter."""
    model = _net()
    if request.param == "already adapted":
        lorakit.add_adapter(model, lorakit.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False), name="x")
    return model


def _expect(model, error, fn, match=None):
    snap = _snapshot(model)
    with pytest.raises(error, match=match):
        fn()
    _assert_untouched(model, snap)


def test_missing_directory(victim, tmp_path):
    _expect(victim, AdapterFormatError, lambda: lorakit.load_adapter(victim, tmp_path / "nope"), "no adapter directory")


def test_truncated_safetensors(victim, saved, tmp_path):
    bad = _copy(saved, tmp_path / "bad")
    data = (bad / "adapter_model.safetensors").read_bytes()
    (bad / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    _expect(victim, AdapterFormatError, lambda: lorakit.load_adapter(victim, bad, name="b"), "truncated or corrupt")


def test_garbage_safetensors(victim, saved, tmp_path):
    bad = _copy(saved, tmp_path / "bad")
    (bad / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 40)
    _expect(victim, AdapterFormatError, lambda: lorakit.load_adapter(victim, bad, name="b"))


def test_config_not_json(victim, saved, tmp_path):
    bad = _copy(saved, tmp_path / "bad")
    (bad / "adapter_config.json").write_text("{not json")
    _expect(victim, AdapterFormatError, lambda: lorakit.load_adapter(victim, bad, name="b"), "not valid JSON")


def test_unknown_peft_type(victim, saved, tmp_path):
    bad = _copy(saved, tmp_path / "bad")
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["peft_type"] = "PROMPT_TUNING_XL"
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    _expect(victim, ConfigError, lambda: lorakit.load_adapter(victim, bad, name="b"), "unknown peft_type")


def test_unsupported_option_is_refused(victim, saved, tmp_path):
    bad = _copy(saved, tmp_path / "bad")
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["layer_replication"] = [[0, 1]]
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    _expect(victim, ConfigError, lambda: lorakit.load_adapter(victim, bad, name="b"), "layer_replication")


def test_keys_that_match_no_module(victim, saved, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = _copy(saved, tmp_path / "bad")
    tensors = load_file(bad / "adapter_model.safetensors")
    tensors["base_model.model.7.lora_A.weight"] = torch.zeros(4, 16)
    save_file(tensors, bad / "adapter_model.safetensors")
    _expect(victim, AdapterFormatError, lambda: lorakit.load_adapter(victim, bad, name="b"), "match no module")


def test_missing_tensor(victim, saved, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = _copy(saved, tmp_path / "bad")
    tensors = load_file(bad / "adapter_model.safetensors")
    del tensors["base_model.model.2.lora_B.weight"]
    save_file(tensors, bad / "adapter_model.safetensors")
    _expect(victim, AdapterFormatError, lambda: lorakit.load_adapter(victim, bad, name="b"), "lacks")


def test_shape_mismatch_from_another_base_model(saved):
    other = _net(hidden=48)  # same module names, different width
    _expect(other, ShapeMismatchError, lambda: lorakit.load_adapter(other, saved), "shape")


def test_target_modules_of_another_model(saved, minilm_cls):
    _expect(minilm_cls, TargetError, lambda: lorakit.load_adapter(minilm_cls, saved), "cannot adapt|match no module")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights(victim, saved, tmp_path, value):
    from safetensors.torch import load_file, save_file

    bad = _copy(saved, tmp_path / "bad")
    tensors = load_file(bad / "adapter_model.safetensors")
    tensors["base_model.model.0.lora_A.weight"][1, 3] = value
    save_file(tensors, bad / "adapter_model.safetensors")
    _expect(victim, AdapterFormatError, lambda: lorakit.load_adapter(victim, bad, name="b"), "NaN or inf")


def test_duplicate_adapter_name(saved):
    model = _net()
    lorakit.load_adapter(model, saved, name="a")
    _expect(model, AdapterNameError, lambda: lorakit.load_adapter(model, saved, name="a"), "already exists")
    cfg = lorakit.LoraConfig(target_modules=["0"])
    _expect(model, AdapterNameError, lambda: lorakit.add_adapter(model, cfg, name="a"), "already exists")


@pytest.mark.parametrize("name", ["", "a.b", "x y", None])
def test_invalid_adapter_name(victim, name):
    cfg = lorakit.LoraConfig(target_modules=["0"])
    _expect(victim, AdapterNameError, lambda: lorakit.add_adapter(victim, cfg, name=name))


def test_pickle_with_code_is_refused(victim, saved, tmp_path):
    bad = _copy(saved, tmp_path / "bad")
    (bad / "adapter_model.safetensors").unlink()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, bad / "adapter_model.bin")
    _expect(victim, AdapterFormatError, lambda: lorakit.load_adapter(victim, bad, name="b"), "could not be read safely")


def test_config_matching_nothing_names_the_closest_modules(minilm_cls):
    cfg = lorakit.LoraConfig(target_modules=["querry", "valeu"])
    _expect(minilm_cls, TargetError, lambda: lorakit.add_adapter(minilm_cls, cfg), r"closest module names: .*query")


def test_unsupported_layer_type_is_named():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    cfg = lorakit.LoraConfig(target_modules=["1"])
    _expect(model, TargetError, lambda: lorakit.add_adapter(model, cfg), "LayerNorm")


@pytest.mark.parametrize("bad", [dict(r=0), dict(r=2.5), dict(lora_dropout=1.5), dict(bias="some"),
                                 dict(init_lora_weights="magic"), dict(target_modules=3)])
def test_invalid_config_values(bad):
    kwargs = dict(target_modules=["0"]) | bad
    with pytest.raises(ConfigError):
        lorakit.LoraConfig(**kwargs)


def test_unknown_adapter_names_in_api(victim):
    for call in (lambda: lorakit.set_active(victim, "nope"), lambda: lorakit.delete_adapter(victim, "nope"),
                 lambda: lorakit.merge(victim, ["nope"]), lambda: lorakit.save_adapter(victim, "/tmp/x", name="nope")):
        _expect(victim, AdapterNameError, call)


def test_failed_save_leaves_the_old_files(saved, monkeypatch):
    import safetensors.torch

    before = {f.name: f.read_bytes() for f in saved.iterdir()}
    model = _net()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, target_modules=["0", "2"], init_lora_weights=False))

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(lorakit.OutputPathError, match="disk full") as raised:  # names the path, keeps the cause
        lorakit.save_adapter(model, saved)
    assert str(saved) in str(raised.value) and isinstance(raised.value.__cause__, OSError)
    assert {f.name: f.read_bytes() for f in saved.iterdir()} == before  # no partial file, no temp file left


def test_all_errors_share_one_base_class():
    for err in (ConfigError, TargetError, AdapterNameError, AdapterFormatError, ShapeMismatchError):
        assert issubclass(err, LorakitError)
    assert copy.copy(LorakitError("x")).args == ("x",)


def test_a_failing_init_midway_leaves_the_model_as_it_was(monkeypatch):
    from lorakit.variants.lora import LoraDelta

    model = _net()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False), name="x")
    calls = []

    def fails_on_second_layer(self, layer):
        calls.append(self.module_name)
        if len(calls) == 2:
            raise RuntimeError("init failed")

    monkeypatch.setattr(LoraDelta, "on_attach", fails_on_second_layer)
    cfg = lorakit.LoraConfig(r=2, target_modules=["0", "2"], modules_to_save=["1"])
    _expect(model, RuntimeError, lambda: lorakit.add_adapter(model, cfg, name="y"), "init failed")
    assert len(calls) == 2
    calls.clear()
    fresh = _net()
    _expect(fresh, RuntimeError, lambda: lorakit.add_adapter(fresh, cfg, name="y"), "init failed")
    assert not hasattr(fresh, "lorakit_state")
