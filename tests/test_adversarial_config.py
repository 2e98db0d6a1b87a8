"""Bad config values, in Python, in adapter_config.json and on the command line: each is refused with a ConfigError
(or another LorakitError) whose message names the field (and the file), before the model changes; the CLI exits 2
with one line. Also the PEFT conveniences next to them: PEFT config objects, PEFT's default target_modules, and
typed booleans in --adapter-options."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from torch import nn

import lorakit
from lorakit import AdaLoraConfig, LoHaConfig, LoKrConfig, LoraConfig
from lorakit.cli import app as cli
from lorakit.core import registry
from lorakit.errors import AdapterFormatError, ConfigError
from lorakit.train.adapter_options import build_adapter_config
from test_train_support import copy_task_rows, one_thread, save_tiny_llama, write_jsonl  # noqa: F401

# Valid settings of each config class on _net(); a case changes one field.
BASE = {
    LoraConfig: dict(r=4, target_modules=["0", "2"]),
    LoHaConfig: dict(r=4, target_modules=["0", "2"]),
    LoKrConfig: dict(r=4, target_modules=["0", "2"]),
    AdaLoraConfig: dict(init_r=4, target_r=2, total_step=100, target_modules=["0", "2"]),
}
NAN, INF = float("nan"), float("inf")

# (config class, field, bad value): every value has the wrong type or is out of range.
CASES = [
    (LoraConfig, "r", True), (LoraConfig, "r", 0), (LoraConfig, "r", -4), (LoraConfig, "r", 2.0),
    (LoraConfig, "r", "8"), (LoraConfig, "r", None), (LoraConfig, "r", 10**9),
    (LoraConfig, "lora_alpha", "16"), (LoraConfig, "lora_alpha", None), (LoraConfig, "lora_alpha", NAN),
    (LoraConfig, "lora_alpha", INF), (LoraConfig, "lora_alpha", -INF), (LoraConfig, "lora_alpha", [8]),
    (LoraConfig, "lora_alpha", 10**400),
    (LoraConfig, "lora_dropout", 1.0), (LoraConfig, "lora_dropout", -0.1), (LoraConfig, "lora_dropout", "0.1"),
    (LoraConfig, "lora_dropout", NAN),
    (LoraConfig, "use_rslora", "false"), (LoraConfig, "use_rslora", "true"), (LoraConfig, "use_dora", "False"),
    (LoraConfig, "use_dora", 1), (LoraConfig, "use_dora", None), (LoraConfig, "fan_in_fan_out", "no"),
    (LoraConfig, "init_lora_weights", "true"), (LoraConfig, "init_lora_weights", 0),
    (LoraConfig, "init_lora_weights", "magic"), (LoraConfig, "bias", None), (LoraConfig, "bias", "lora"),
    (LoraConfig, "target_modules", 3), (LoraConfig, "target_modules", "(unclosed"),
    (LoraConfig, "target_modules", ["0", 3]), (LoraConfig, "target_modules", {"0": 1}),
    (LoraConfig, "target_modules", [["0"]]), (LoraConfig, "exclude_modules", "[z-a]"),
    (LoraConfig, "exclude_modules", 0),
    (LoraConfig, "task_type", "SEQ_CLASSIFICATION"), (LoraConfig, "task_type", 1),
    (LoraConfig, "task_type", ["SEQ_CLS"]),
    (LoraConfig, "rank_pattern", {"0": 0}), (LoraConfig, "rank_pattern", {"0": True}),
    (LoraConfig, "rank_pattern", {"0": 2.5}), (LoraConfig, "rank_pattern", {"(": 2}),
    (LoraConfig, "rank_pattern", [["0", 2]]), (LoraConfig, "rank_pattern", {"0": 10**9}),
    (LoraConfig, "alpha_pattern", {"0": NAN}), (LoraConfig, "alpha_pattern", {"0": "8"}),
    (LoraConfig, "alpha_pattern", "0=8"),
    (LoraConfig, "layers_to_transform", -1), (LoraConfig, "layers_to_transform", ["0"]),
    (LoraConfig, "layers_to_transform", 1.5),
    (LoraConfig, "layers_pattern", "(("), (LoraConfig, "layers_pattern", 3),
    (LoraConfig, "layers_pattern", ["a", None]),
    (LoraConfig, "modules_to_save", 5), (LoraConfig, "modules_to_save", ["head", 1]),
    (LoraConfig, "inference_mode", "no"), (LoraConfig, "base_model_name_or_path", 7),
    (LoraConfig, "revision", ["main"]),
    (LoHaConfig, "r", -3), (LoHaConfig, "alpha", INF), (LoHaConfig, "alpha", "8"), (LoHaConfig, "rank_dropout", 1.5),
    (LoHaConfig, "module_dropout", "0"), (LoHaConfig, "use_effective_conv2d", "true"),
    (LoHaConfig, "init_weights", "false"), (LoHaConfig, "rank_pattern", {"0": -1}),
    (LoKrConfig, "r", False), (LoKrConfig, "decompose_factor", 0), (LoKrConfig, "decompose_factor", -2),
    (LoKrConfig, "decompose_both", "yes"), (LoKrConfig, "init_weights", "lyco"), (LoKrConfig, "rank_dropout_scale", 0),
    (LoKrConfig, "alpha", NAN),
    (AdaLoraConfig, "init_r", 0), (AdaLoraConfig, "target_r", True), (AdaLoraConfig, "beta1", 1.0),
    (AdaLoraConfig, "beta2", 0), (AdaLoraConfig, "orth_reg_weight", NAN), (AdaLoraConfig, "orth_reg_weight", -1),
    (AdaLoraConfig, "total_step", "100"), (AdaLoraConfig, "total_step", 0), (AdaLoraConfig, "tinit", -1),
    (AdaLoraConfig, "tfinal", 0.5), (AdaLoraConfig, "total_step", 10**20), (AdaLoraConfig, "deltaT", 0), (AdaLoraConfig, "init_lora_weights", "gaussian"),
    (AdaLoraConfig, "rank_pattern", {"0.lora_E": [1, 0, 1, 1]}), (AdaLoraConfig, "rank_pattern", {"0.lora_E": True}),
]
IDS = [f"{cls.__name__}-{name}={value!r}"[:60] for cls, name, value in CASES]


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def _snapshot(model: nn.Module):
    return ([(n, type(m)) for n, m in model.named_modules()],
            {k: v.clone() for k, v in model.state_dict().items()},
            {n: (p.requires_grad, p.data_ptr()) for n, p in model.named_parameters()},
            lorakit.list_adapters(model), lorakit.active_adapters(model))


def assert_untouched(model: nn.Module, snap) -> None:
    """The module tree, every tensor, every parameter (object and flag) and the adapters are as before."""
    modules, sd, params, adapters, active = snap
    now = _snapshot(model)
    assert now[0] == modules
    assert now[1].keys() == sd.keys() and all(torch.equal(now[1][k], sd[k]) for k in sd)
    assert now[2] == params and now[3] == adapters and now[4] == active


@pytest.fixture(params=["plain", "already adapted"])
def victim(request):
    model = _net()
    if request.param == "already adapted":
        lorakit.add_adapter(model, LoraConfig(r=2, target_modules=["0"], init_lora_weights=False), "x")
    return model


def _json_value(value):
    return json.loads(json.dumps(value))  # what the value reads back as from a file (NaN/Infinity included)


def _tampered_dir(tmp_path, cls, field, value):
    """An adapter directory whose adapter_config.json is a valid `cls` config with `field` set to `value`."""
    d = tmp_path / "adapter"
    d.mkdir()
    data = cls(**BASE[cls]).to_peft_dict()
    data[field] = value
    (d / "adapter_config.json").write_text(json.dumps(data))
    model = _net()
    lorakit.add_adapter(model, LoraConfig(r=4, target_modules=["0", "2"]))
    lorakit.save_adapter(model, tmp_path / "good")
    (d / "adapter_model.safetensors").write_bytes((tmp_path / "good" / "adapter_model.safetensors").read_bytes())
    return d


# --- Python ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls, field, value", CASES, ids=IDS)
def test_bad_value_is_refused_on_construction(cls, field, value):
    with pytest.raises(ConfigError) as e:
        cls(**(BASE[cls] | {field: value}))
    assert f"'{field}'" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("cls, field, value", CASES, ids=IDS)
def test_bad_value_set_after_construction_is_refused_by_add_adapter(victim, cls, field, value):
    config = cls(**BASE[cls])
    setattr(config, field, value)
    snap = _snapshot(victim)
    with pytest.raises(ConfigError) as e:
        lorakit.add_adapter(victim, config, "new")
    assert f"'{field}'" in str(e.value)
    assert_untouched(victim, snap)


# --- adapter_config.json ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls, field, value", CASES, ids=IDS)
def test_bad_value_in_adapter_config_json_names_file_and_field(victim, tmp_path, cls, field, value):
    d = _tampered_dir(tmp_path, cls, field, _json_value(value))
    snap = _snapshot(victim)
    with pytest.raises(ConfigError) as e:
        lorakit.load_adapter(victim, d, "new")
    assert str(d / "adapter_config.json") in str(e.value) and f"'{field}'" in str(e.value)
    assert_untouched(victim, snap)


def _run_cli(capsys, *argv):
    code = cli.main(list(argv))
    err = capsys.readouterr().err
    return code, err


def _one_line(err: str) -> str:
    assert err.endswith("\n") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("cls, field, value", CASES, ids=IDS)
def test_cli_info_of_a_bad_config_exits_2_with_one_line(capsys, tmp_path, cls, field, value):
    d = _tampered_dir(tmp_path, cls, field, _json_value(value))
    code, err = _run_cli(capsys, "info", str(d))
    assert code == 2
    line = _one_line(err)
    assert str(d / "adapter_config.json") in line and f"'{field}'" in line


@pytest.mark.parametrize("text, error, words", [
    ('{"peft_type": ["LORA"], "r": 4, "target_modules": ["0"]}', ConfigError, ["peft_type"]),
    ('{"peft_type": null, "r": 4, "target_modules": ["0"]}', ConfigError, ["peft_type"]),
    ('{"peft_type": "LORA", "r": 1e999, "target_modules": ["0"]}', ConfigError, ["'r'"]),
    ('{"peft_type": "LORA", "r": NaN, "target_modules": ["0"]}', ConfigError, ["'r'"]),
    ('{"peft_type": "LORA", "r": ' + "9" * 5000 + ', "target_modules": ["0"]}', AdapterFormatError, ["not valid JSON"]),
    ("[" * 100_000 + "]" * 100_000, AdapterFormatError, ["nested too deeply"]),
    ('{"peft_type": "LORA", "target_modules": ' + "[" * 100_000 + "]" * 100_000 + "}", AdapterFormatError,
     ["nested too deeply"]),
    ('{"peft_type": "LORA", "r": 4, "target_modules": ["0"], "lora_bias": true}', ConfigError, ["lora_bias"]),
], ids=["peft_type-list", "peft_type-null", "r-overflow", "r-NaN", "r-5000-digits", "100k-deep", "100k-deep-field",
        "unsupported-option"])
def test_malformed_adapter_config_json(victim, capsys, tmp_path, text, error, words):
    d = _tampered_dir(tmp_path, LoraConfig, "r", 4)
    (d / "adapter_config.json").write_text(text)
    snap = _snapshot(victim)
    with pytest.raises(error) as e:
        lorakit.load_adapter(victim, d, "new")
    assert str(d / "adapter_config.json") in str(e.value) and all(w in str(e.value) for w in words)
    assert_untouched(victim, snap)
    code, err = _run_cli(capsys, "info", str(d))
    assert code == 2 and str(d / "adapter_config.json") in _one_line(err)


def test_null_patterns_in_a_file_mean_none():
    """PEFT's rank_pattern / alpha_pattern are Optional: null loads as 'no overrides'."""
    config = registry.config_from_peft_dict({**LoraConfig(**BASE[LoraConfig]).to_peft_dict(),
                                             "rank_pattern": None, "alpha_pattern": None})
    model = _net()
    lorakit.add_adapter(model, config)
    assert all(layer.deltas["default"].r == 4 for _, layer in lorakit.adapted_layers(model))


def test_every_config_field_has_a_check():
    """A new field cannot slip in unchecked: every dataclass field of every registered config declares one."""
    for cls in {v.config for v in registry.VARIANTS.values()}:
        checks = {}
        for klass in cls.__mro__:
            checks = vars(klass).get("field_checks", {}) | checks
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in checks]
        assert not missing, f"{cls.__name__}: {missing}"


# --- ranks against the layers -------------------------------------------------------------------------------------
@pytest.mark.parametrize("settings", [dict(r=60_000), dict(r=4, rank_pattern={"0": 65_536})], ids=["r", "rank_pattern"])
def test_absurd_rank_for_the_layer_is_refused_before_allocating(settings, monkeypatch):
    model = nn.Sequential(nn.Linear(300, 300))
    allocations = []
    monkeypatch.setattr(torch, "empty", lambda *a, **k: allocations.append(a) or torch.zeros(0))
    snap = _snapshot(model)
    with pytest.raises(ConfigError, match=r"'r' .*rank \d+, far above the layer's 300×300"):
        lorakit.add_adapter(model, LoraConfig(target_modules=["0"], **settings))
    assert allocations == []
    assert_untouched(model, snap)


def test_rank_above_a_small_layer_is_allowed_as_in_peft():
    model = nn.Sequential(nn.Linear(4, 2))
    lorakit.add_adapter(model, LoraConfig(r=64, target_modules=["0"]))
    assert model[0].deltas["default"].lora_A.shape == (64, 4)


# --- PEFT config objects -------------------------------------------------------------------------------------
def _adapted_copy(model, config, seed=3):
    model = copy.deepcopy(model)
    torch.manual_seed(seed)
    lorakit.add_adapter(model, config)
    return model


@pytest.mark.parametrize("kind", ["lora", "dora", "loha", "lokr", "adalora"])
def test_peft_config_object_gives_the_same_adapter(kind):
    peft = pytest.importorskip("peft")
    common = dict(r=4, target_modules=["0", "2"])
    pairs = {
        "lora": (peft.LoraConfig(lora_alpha=16, lora_dropout=0.1, use_rslora=True, **common),
                 LoraConfig(lora_alpha=16, lora_dropout=0.1, use_rslora=True, **common)),
        "dora": (peft.LoraConfig(use_dora=True, **common), LoraConfig(use_dora=True, **common)),
        "loha": (peft.LoHaConfig(alpha=8, rank_dropout=0.1, **common), LoHaConfig(alpha=8, rank_dropout=0.1, **common)),
        "lokr": (peft.LoKrConfig(alpha=8, decompose_both=True, **common),
                 LoKrConfig(alpha=8, decompose_both=True, **common)),
        "adalora": (peft.AdaLoraConfig(init_r=4, target_r=2, total_step=50, target_modules=["0", "2"]),
                    AdaLoraConfig(init_r=4, target_r=2, total_step=50, target_modules=["0", "2"])),
    }
    theirs, ours = pairs[kind]
    base = _net()
    from_peft, from_lorakit = _adapted_copy(base, theirs), _adapted_copy(base, ours)
    assert lorakit.get_config(from_peft, "default") == lorakit.get_config(from_lorakit, "default")
    a, b = lorakit.adapter_state_dict(from_peft), lorakit.adapter_state_dict(from_lorakit)
    assert a.keys() == b.keys() and len(a) > 0 and all(torch.equal(a[k], b[k]) for k in a)
    assert not hasattr(theirs, "lorakit_state") and isinstance(theirs.target_modules, set)  # PEFT's object unchanged


def test_peft_config_object_with_an_unsupported_option_is_refused(victim):
    peft = pytest.importorskip("peft")
    snap = _snapshot(victim)
    with pytest.raises(ConfigError, match="lora_bias"):
        lorakit.add_adapter(victim, peft.LoraConfig(r=4, target_modules=["0"], lora_bias=True), "new")
    with pytest.raises(ConfigError, match="PEFT config"):
        lorakit.add_adapter(victim, {"r": 4, "target_modules": ["0"]}, "new")
    assert_untouched(victim, snap)


# --- PEFT's default target_modules ------------------------------------------------------------------------------
def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


def _tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                    num_hidden_layers=2, num_attention_heads=4)).eval()


def test_default_target_tables_are_peft_s():
    from peft.utils import constants

    from lorakit.core.default_targets import PEFT_DEFAULT_TARGETS

    assert PEFT_DEFAULT_TARGETS == constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    assert LoHaConfig.default_target_modules == constants.TRANSFORMERS_MODELS_TO_LOHA_TARGET_MODULES_MAPPING
    assert LoKrConfig.default_target_modules == constants.TRANSFORMERS_MODELS_TO_LOKR_TARGET_MODULES_MAPPING
    assert AdaLoraConfig.default_target_modules == constants.TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING


@pytest.mark.parametrize("build", [_tiny_llama, _tiny_bert], ids=["llama", "bert"])
@pytest.mark.parametrize("kind", ["lora", "adalora"])
def test_omitted_target_modules_adapt_what_peft_adapts(build, kind, tmp_path):
    peft = pytest.importorskip("peft")
    if kind == "lora":
        ours, theirs = LoraConfig(r=2), peft.LoraConfig(r=2)
    else:
        ours, theirs = AdaLoraConfig(init_r=2, total_step=10), peft.AdaLoraConfig(init_r=2, total_step=10)
    model = build()
    lorakit.add_adapter(model, ours)
    adapted = sorted(path for path, _ in lorakit.adapted_layers(model))
    reference = peft.get_peft_model(build(), theirs)
    expected = sorted(n.removeprefix("base_model.model.") for n, m in reference.named_modules()
                      if hasattr(m, "base_layer") and not n.endswith("base_layer"))
    assert adapted == expected and adapted
    assert ours.target_modules is None  # the user's config is left as given; the model's copy holds the names
    saved = json.loads((lorakit.save_adapter(model, tmp_path / "a") / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == sorted(theirs.target_modules)


def test_omitted_target_modules_without_a_model_type_is_refused(victim):
    snap = _snapshot(victim)
    with pytest.raises(ConfigError, match="'target_modules' is not set"):
        lorakit.add_adapter(victim, LoraConfig(r=2), "new")
    assert_untouched(victim, snap)


# --- the command line -------------------------------------------------------------------------------------------
def _cli_config(*argv):
    """The adapter config `lorakit train ARGV` builds (parsed exactly as the command line parses it)."""
    command = cli.COMMANDS["train"]
    args = cli.build_parser().parse_args(["train", *argv])
    options = cli.parse_options(command, args)
    return build_adapter_config(options, options.task, steps=10)


@pytest.mark.parametrize("text, variant, field, value", [
    ("use_dora=False", "LORA", "use_dora", False), ("use_dora=false", "LORA", "use_dora", False),
    ("use_dora=True", "DORA", "use_dora", True), ("use_rslora=False", "LORA", "use_rslora", False),
    ("use_rslora=yes", "LORA", "use_rslora", True), ('{"use_rslora": "false"}', "LORA", "use_rslora", False),
    ("init_lora_weights=False", "LORA", "init_lora_weights", False),
    ("init_lora_weights=gaussian", "LORA", "init_lora_weights", "gaussian"),
])
def test_adapter_options_typed_as_text_are_read_as_meant(text, variant, field, value):
    config = _cli_config("--adapter-options", text)
    assert config.variant == variant and getattr(config, field) == value and type(getattr(config, field)) is type(value)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    save_tiny_llama(root / "tiny")
    write_jsonl(root / "train.jsonl", copy_task_rows(8))
    return root


@pytest.mark.parametrize("flags, field", [
    (["--adapter-options", "use_dora=maybe"], "use_dora"),
    (["--adapter-options", '{"use_rslora": 2}'], "use_rslora"),
    (["--adapter-options", "lora_alpha=NaN"], "lora_alpha"),
    (["--lora-alpha", "inf"], "lora_alpha"),
    (["--adapter-options", "task_type=SEQ_CLASSIFICATION"], "task_type"),
    (["--adapter-options", "rank_pattern=[1]"], "rank_pattern"),
    (["--adapter-options", "r=1000000000"], "r"),
    (["--target-modules", "(", "--adapter", "loha", "--adapter-options", "init_weights=2"], "init_weights"),
    (["--adapter-options", "modules_to_save=[lm_head]"], "modules_to_save"),  # unquoted: not a list of one name
], ids=["use_dora-word", "rslora-number", "alpha-NaN", "alpha-inf", "task_type", "rank_pattern", "huge-r",
        "loha-init", "unquoted-list"])
def test_cli_train_with_a_bad_adapter_option_exits_2_with_one_line(capsys, workspace, flags, field):
    out = workspace / f"run-{field}"
    code, err = _run_cli(capsys, "train", "--model", str(workspace / "tiny"), "--data", str(workspace / "train.jsonl"),
                         "--max-steps", "1", "--quiet", "--score", "none", "--output-dir", str(out), *flags)
    assert code == 2 and f"'{field}'" in _one_line(err)
    assert not (out / "adapter").exists()


def test_absurd_rank_names_the_variants_own_rank_field():
    model = nn.Sequential(nn.Linear(300, 300))
    snap = _snapshot(model)
    with pytest.raises(ConfigError, match=r"field 'init_r' .*rank 60000, far above"):
        lorakit.add_adapter(model, lorakit.AdaLoraConfig(init_r=60_000, target_r=4, total_step=10,
                                                         target_modules=["0"]))
    assert_untouched(model, snap)
