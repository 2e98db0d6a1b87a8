"""An adapted transformers model behaves as with transformers' own PEFT integration: save_pretrained (adapter-only
or merged), PEFT / AutoPeftModel load what lorakit writes, and the model's adapter methods (set_adapter,
load_adapter, ...) work on lorakit adapters. Trainer and SFTTrainer: test_hf_trainer.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.core.hf.model import save_pretrained as lorakit_save_pretrained
from hf_support import _adapter_tensors, _load_file, _logits, _lora, _llama, llama_dir  # noqa: F401  (fixture)
from test_train_support import copy_task_rows, one_thread, write_jsonl  # noqa: F401  (fixture)


def test_save_pretrained_merged_writes_a_full_model_and_keeps_the_adapter(llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM
    from support import randomise_adapters

    model = lorakit.add_adapter(_llama(llama_dir), _lora(target_modules="all-linear"))
    randomise_adapters(model, std=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = _logits(model)
    model.save_pretrained(tmp_path / "merged", merged=True)
    assert (tmp_path / "merged" / "model.safetensors").is_file() and (tmp_path / "merged" / "config.json").is_file()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the model in memory is unchanged
    assert lorakit.list_adapters(model) == ["default"]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(_logits(merged), expected, atol=1e-5, rtol=1e-5)
    assert not any("lora" in k or "deltas" in k for k in merged.state_dict())
    model.save_pretrained(tmp_path / "adapter")  # the default stays adapter-only
    assert sorted(os.listdir(tmp_path / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]



def test_several_adapters_are_saved_in_peft_layout(llama_dir, tmp_path):
    model = _llama(llama_dir)
    lorakit.add_adapter(model, _lora(init_lora_weights=False), name="a")
    lorakit.add_adapter(model, _lora(r=2, init_lora_weights=False), name="b")
    lorakit.set_active(model, "b")
    model.save_pretrained(tmp_path)  # the active adapter at the top, the other in a subfolder named after it
    for directory, name in ((tmp_path, "b"), (tmp_path / "a", "a")):
        saved = _load_file(directory / "adapter_model.safetensors")
        assert all(torch.equal(saved[k], v) for k, v in _adapter_tensors(model, name).items())
    with pytest.raises(lorakit.AdapterNameError):
        model.save_pretrained(tmp_path / "x", selected_adapters=["nope"])



def test_transformers_adapter_api_on_a_lorakit_model(llama_dir, tmp_path):
    import peft

    model = _llama(llama_dir)
    base = _logits(model)
    lorakit.add_adapter(model, _lora(init_lora_weights=False), name="a")
    with_a = _logits(model)
    assert model.active_adapters() == ["a"] and model._hf_peft_config_loaded and set(model.peft_config) == {"a"}
    model.disable_adapters()
    torch.testing.assert_close(_logits(model), base)
    model.enable_adapters()
    torch.testing.assert_close(_logits(model), with_a)

    model.add_adapter(peft.LoraConfig(r=2, target_modules=["k_proj"], init_lora_weights=False), adapter_name="p")
    assert model.active_adapters() == ["p"] and lorakit.get_config(model, "p").r == 2  # transformers activates it
    model.add_adapter(_lora(r=3, init_lora_weights=False), adapter_name="k")
    assert model.active_adapters() == ["k"] and set(model.peft_config) == {"a", "p", "k"}

    model.set_adapter("a")
    torch.testing.assert_close(_logits(model), with_a)
    assert set(model.get_adapter_state_dict()) == {k[len("base_model.model."):] for k in lorakit.adapter_state_dict(model, "a")}
    lorakit.save_adapter(model, tmp_path / "a", "a")
    model.load_adapter(str(tmp_path / "a"), adapter_name="a2")
    model.set_adapter("a2")
    torch.testing.assert_close(_logits(model), with_a)
    with pytest.raises(ValueError):
        model.set_adapter("missing")

    model.delete_adapter(["p", "k", "a2"])
    assert list(model.peft_config) == ["a"]
    model.delete_adapter("a")
    assert not model._hf_peft_config_loaded and "save_pretrained" not in model.__dict__  # the class's own again
    torch.testing.assert_close(_logits(model), base)



def test_copies_and_pickles_keep_the_methods_bound_to_themselves(llama_dir, tmp_path):
    import copy
    import pickle

    model = lorakit.add_adapter(_llama(llama_dir), _lora(init_lora_weights=False))
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert clone.save_pretrained.args[0] is clone and clone.peft_config is lorakit.core.api.state(clone).configs
        clone.set_adapter([])  # acts on the clone only
        assert clone.active_adapters() == [] and model.active_adapters() == ["default"]



def test_unload_gives_back_the_class_save_pretrained(llama_dir, tmp_path):
    model = lorakit.add_adapter(_llama(llama_dir), _lora())
    assert model.save_pretrained.func is lorakit_save_pretrained
    lorakit.unload(model)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not (tmp_path / "adapter_config.json").exists()



def _cli(*argv) -> None:
    from lorakit.cli import app as cli

    assert cli.main(list(argv)) == 0



def test_auto_peft_model_loads_a_cli_run(llama_dir, tmp_path):
    from peft import AutoPeftModelForCausalLM

    write_jsonl(tmp_path / "train.jsonl", copy_task_rows(16))
    _cli("train", "--model", str(llama_dir), "--data", str(tmp_path / "train.jsonl"), "--max-steps", "3", "--lr",
         "0.02", "--quiet", "--score", "none", "--output-dir", str(tmp_path / "run"))
    adapter = tmp_path / "run" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and Path(config["base_model_name_or_path"]) == llama_dir.resolve()
    auto = AutoPeftModelForCausalLM.from_pretrained(str(adapter)).eval()
    expected = _logits(lorakit.load_adapter(_llama(llama_dir), adapter))
    torch.testing.assert_close(_logits(auto), expected, atol=1e-5, rtol=1e-5)



def test_auto_peft_model_loads_a_cli_classifier_run(minilm_path, tmp_path):
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rows = [{"sentence": f"a {w} film", "label": int(w in ("great", "superb"))} for w in ("great", "awful", "superb",
                                                                                         "bad") * 4]
    data = tmp_path / "cls.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"{r['sentence']}\t{r['label']}\n" for r in rows))
    _cli("train", "--model", minilm_path, "--data", str(data), "--task", "classify", "--target-modules", "query",
         "value", "--max-steps", "3", "--lr", "5e-3", "--batch-size", "8", "--quiet", "--score", "none",
         "--output-dir", str(tmp_path / "run"))
    adapter = tmp_path / "run" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    batch = AutoTokenizer.from_pretrained(minilm_path)(["a great film", "a bad film"], return_tensors="pt")
    auto = AutoPeftModelForSequenceClassification.from_pretrained(str(adapter)).eval()
    mine = lorakit.load_adapter(AutoModelForSequenceClassification.from_pretrained(minilm_path).eval(), adapter)
    with torch.no_grad():
        torch.testing.assert_close(auto(**batch).logits, mine(**batch).logits, atol=1e-5, rtol=1e-5)



def test_a_bundled_model_run_records_the_converted_directory(llama_dir):
    from lorakit.loading.models import BUILTIN_MODEL
    from lorakit.train.run import _model_reference

    loaded = _llama(llama_dir)  # stands in for the converted copy of the bundled GGUF this run loaded
    assert Path(_model_reference(BUILTIN_MODEL, loaded)) == llama_dir.resolve()
    assert _model_reference("HuggingFaceTB/SmolLM2-135M-Instruct", loaded) == "HuggingFaceTB/SmolLM2-135M-Instruct"



def test_merged_save_of_two_active_adapters_with_dora_matches_the_model(llama_dir, tmp_path):
    """A weight-normalised delta scales what was merged before it: the merged file chains the merges as
    lorakit.merge does, so it answers what the model in memory answers."""
    from transformers import AutoModelForCausalLM
    from support import randomise_adapters

    model = _llama(llama_dir)
    lorakit.add_adapter(model, _lora(), name="plain")
    lorakit.add_adapter(model, _lora(use_dora=True), name="dora")
    randomise_adapters(model, std=0.2)
    lorakit.set_active(model, ["plain", "dora"])
    lorakit.merge(model)
    expected = _logits(model)
    lorakit.unmerge(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "merged", merged=True)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(_logits(saved), expected, atol=1e-5, rtol=1e-5)
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before if ".deltas." not in k)  # restored bit for bit



def test_save_pretrained_takes_the_values_of_the_state_dict_passed(llama_dir, tmp_path):
    """A Trainer passes a gathered state dict (under ZeRO-3 / sharded FSDP the live parameters are empty): its
    values are written, matched by name, whatever their storage."""
    model = lorakit.add_adapter(_llama(llama_dir), _lora(init_lora_weights=False))
    gathered = {k: v.detach().clone() + 1.0 for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "a", state_dict=gathered)
    saved = _load_file(tmp_path / "a" / "adapter_model.safetensors")
    live = lorakit.adapter_state_dict(model)
    assert saved.keys() == live.keys()
    assert all(torch.equal(saved[k], live[k].detach() + 1.0) for k in live)
    from_api = model.get_adapter_state_dict(state_dict=gathered)
    assert all(torch.equal(from_api[k[len("base_model.model."):]], saved[k]) for k in saved)
    missing = {k: v for k, v in gathered.items() if "lora_A" not in k}
    with pytest.raises(lorakit.CheckpointError, match="lora_A"):
        model.save_pretrained(tmp_path / "b", state_dict=missing)
    assert not (tmp_path / "b").exists()



def test_transformers_add_and_delete_adapter_refuse_bad_input_before_changing_anything(llama_dir):
    model = _llama(llama_dir)
    lorakit.add_adapter(model, _lora(), name="a")
    lorakit.add_adapter(model, _lora(), name="b")
    with pytest.raises(lorakit.ConfigError, match="PEFT config"):
        model.add_adapter({"r": 4}, adapter_name="c")  # a dict is no config: lorakit's ConfigError, not TypeError
    with pytest.raises(lorakit.AdapterNameError, match="'a'"):
        model.delete_adapter(["a", "b", "a"])  # a name listed twice: nothing is deleted
    assert lorakit.list_adapters(model) == ["a", "b"]



def test_classifier_heads_are_one_constant():
    from lorakit.core import config
    from lorakit.core.hf import describe

    assert describe.CLASSIFIER_HEADS is config.CLASSIFIER_HEADS
    seq_cls = lorakit.LoraConfig(target_modules=["q"], task_type="SEQ_CLS")
    assert seq_cls.modules_to_save == list(config.CLASSIFIER_HEADS)

