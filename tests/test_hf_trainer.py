"""transformers' Trainer and TRL's SFTTrainer on a lorakit-adapted model: checkpoints are adapter-only and resume
exactly, a classifier head is trained and restored, the best checkpoint is restored at the end, and a Trainer
imported after the adapter was added is patched when it loads."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

import lorakit
from hf_support import _adapter_tensors, _load_file, _logits, _lora, _llama, llama_dir  # noqa: F401  (fixture)
from test_train_support import copy_task_rows, one_thread  # noqa: F401  (fixture)


def _args(out, **kw):
    from transformers import TrainingArguments

    base = dict(max_steps=4, save_steps=2, per_device_train_batch_size=2, learning_rate=2e-2, use_cpu=True,
                report_to=[], disable_tqdm=True, logging_steps=100, seed=0)
    return TrainingArguments(str(out), **(base | kw))



def _lm_rows(n=8):
    import datasets

    return datasets.Dataset.from_list([{"input_ids": [3 + i, 7, 11 + i, 19, 23, 29], "labels": [3 + i, 7, 11 + i, 19,
                                                                                            23, 29]} for i in range(n)])



def snapshot_callback():
    """A TrainerCallback that records the adapter's tensors when training begins (after a resume has loaded)."""
    from transformers import TrainerCallback

    class Snapshot(TrainerCallback):
        at_begin = None

        def on_train_begin(self, args, state, control, model=None, **kw):
            self.at_begin = _adapter_tensors(model)

    return Snapshot()



def test_trainer_checkpoints_are_adapter_only_and_resume_exactly(llama_dir, tmp_path):
    import peft
    from transformers import AutoModelForCausalLM, Trainer

    def run(resume=None):
        torch.manual_seed(0)
        model = lorakit.add_adapter(_llama(llama_dir), _lora())
        snap = snapshot_callback()
        trainer = Trainer(model=model, args=_args(tmp_path / "run"), train_dataset=_lm_rows(), callbacks=[snap])
        trainer.train(resume_from_checkpoint=resume)
        return model, snap, trainer

    model, _, trainer = run()
    ckpt = tmp_path / "run" / "checkpoint-2"
    assert (ckpt / "adapter_model.safetensors").is_file() and (ckpt / "adapter_config.json").is_file()
    assert not {"model.safetensors", "pytorch_model.bin", "config.json"} & set(os.listdir(ckpt))
    base_bytes = sum(p.numel() * p.element_size() for p in _llama(llama_dir).parameters())
    assert (ckpt / "adapter_model.safetensors").stat().st_size < base_bytes / 10
    config = json.loads((ckpt / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and Path(config["base_model_name_or_path"]) == llama_dir
    final = _adapter_tensors(model)
    assert final.keys() == _load_file(tmp_path / "run" / "checkpoint-4" / "adapter_model.safetensors").keys()

    resumed, snap, _ = run(resume=str(ckpt))
    saved = _load_file(ckpt / "adapter_model.safetensors")
    assert snap.at_begin.keys() == saved.keys() and all(torch.equal(snap.at_begin[k], saved[k]) for k in saved)
    after = _adapter_tensors(resumed)
    assert not all(torch.equal(after[k], saved[k]) for k in saved)  # training went on from the checkpoint ...
    assert all(torch.equal(after[k], final[k]) for k in final)  # ... to exactly where the whole run ended

    trainer.save_model(str(tmp_path / "final"))
    expected = _logits(model)
    loaded = lorakit.load_adapter(_llama(llama_dir), tmp_path / "final")
    torch.testing.assert_close(_logits(loaded), expected)
    via_peft = peft.PeftModel.from_pretrained(_llama(llama_dir), str(tmp_path / "final")).eval()
    torch.testing.assert_close(_logits(via_peft), expected, atol=1e-5, rtol=1e-5)
    via_transformers = AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval()  # base + adapter
    torch.testing.assert_close(_logits(via_transformers), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(_logits(_llama(llama_dir)), expected)



def _tiny_bert_dir(root: Path) -> Path:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=32, num_labels=2)
    BertForSequenceClassification(cfg).save_pretrained(root / "bert")
    return root / "bert"



def test_trainer_trains_and_restores_a_classifier_head(tmp_path):
    import datasets
    import peft
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoModelForSequenceClassification, Trainer

    bert = _tiny_bert_dir(tmp_path)
    rows = datasets.Dataset.from_list([{"input_ids": [1, 5 + i % 7, 9, 2], "attention_mask": [1] * 4,
                                        "labels": i % 2} for i in range(8)])
    config = lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")

    def run(resume=None):
        model = lorakit.add_adapter(AutoModelForSequenceClassification.from_pretrained(bert), config)
        Trainer(model=model, args=_args(tmp_path / "run", learning_rate=5e-2), train_dataset=rows).train(
            resume_from_checkpoint=resume)
        return model.eval()

    model = run()
    head = "base_model.model.classifier.weight"
    saved = _load_file(tmp_path / "run" / "checkpoint-4" / "adapter_model.safetensors")
    untrained = AutoModelForSequenceClassification.from_pretrained(bert).classifier.weight
    assert head in saved and not torch.equal(saved[head], untrained)  # the trained head is in the checkpoint
    assert json.loads((tmp_path / "run" / "checkpoint-4" / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    resumed = run(resume=str(tmp_path / "run" / "checkpoint-2"))
    assert torch.equal(resumed.classifier.copies["default"].weight, model.classifier.copies["default"].weight)

    ids = torch.tensor([[1, 6, 9, 2], [1, 8, 9, 2]])
    expected = _logits(model, ids)
    ckpt = str(tmp_path / "run" / "checkpoint-4")
    loaded = lorakit.load_adapter(AutoModelForSequenceClassification.from_pretrained(bert).eval(), ckpt)
    torch.testing.assert_close(_logits(loaded, ids), expected)
    via_peft = peft.PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(bert), ckpt).eval()
    torch.testing.assert_close(_logits(via_peft, ids), expected, atol=1e-5, rtol=1e-5)
    auto = AutoPeftModelForSequenceClassification.from_pretrained(ckpt).eval()
    torch.testing.assert_close(_logits(auto, ids), expected, atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path / "merged", merged=True)  # the trained head replaces the untrained one
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(_logits(merged, ids), expected, atol=1e-5, rtol=1e-5)



def test_sft_trainer_end_to_end(llama_dir, tmp_path):
    import datasets
    import peft
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    data = datasets.Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]}
                                       for r in copy_task_rows(8)])

    def run(resume=None):
        torch.manual_seed(0)
        model = lorakit.add_adapter(_llama(llama_dir), _lora(target_modules="all-linear"))
        args = SFTConfig(str(tmp_path / "sft"), max_steps=4, save_steps=2, per_device_train_batch_size=2,
                         learning_rate=2e-2, use_cpu=True, report_to=[], disable_tqdm=True, logging_steps=100,
                         max_length=32, seed=0, bf16=False)  # bf16 autocast would stay on model.forward
        SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer).train(
            resume_from_checkpoint=resume)
        return model

    model = run()
    ckpt = tmp_path / "sft" / "checkpoint-2"
    assert (ckpt / "adapter_model.safetensors").is_file() and not (ckpt / "model.safetensors").exists()
    final = _adapter_tensors(model)
    resumed = run(resume=str(ckpt))
    assert all(torch.equal(v, final[k]) for k, v in _adapter_tensors(resumed).items())
    last = str(tmp_path / "sft" / "checkpoint-4")
    via_peft = peft.PeftModel.from_pretrained(_llama(llama_dir), last).eval()
    torch.testing.assert_close(_logits(via_peft), _logits(model.eval()), atol=1e-5, rtol=1e-5)



def test_load_best_model_at_end_restores_the_best_checkpoint(llama_dir, tmp_path):
    from transformers import Trainer

    model = lorakit.add_adapter(_llama(llama_dir), _lora())
    # "best" = the higher eval loss: training lowers it, so the best checkpoint is the earlier one, not the last
    args = _args(tmp_path / "run", eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                 metric_for_best_model="loss", greater_is_better=True)
    trainer = Trainer(model=model, args=args, train_dataset=_lm_rows(), eval_dataset=_lm_rows(4))
    trainer.train()
    best = Path(trainer.state.best_model_checkpoint)
    assert best.name == "checkpoint-2"  # not the last one: the loaded adapter differs from the trained one
    saved = _load_file(best / "adapter_model.safetensors")
    live = _adapter_tensors(model)
    assert all(torch.equal(live[k], saved[k]) for k in saved)



def test_trainer_imported_after_the_adapter_is_patched_when_it_loads():
    import subprocess
    import sys

    code = ("import sys, lorakit\n"
            "from transformers import LlamaConfig, LlamaForCausalLM\n"
            "m = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,"
            " num_attention_heads=2, num_key_value_heads=1))\n"
            "lorakit.add_adapter(m, lorakit.LoraConfig(r=2, target_modules=['q_proj']))\n"
            "assert 'transformers.trainer' not in sys.modules\n"
            "from transformers import Trainer\n"
            "print(Trainer._lorakit_patched)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(lorakit.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"

