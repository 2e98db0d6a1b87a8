"""Training under torch.distributed on CPU (gloo, 2 processes started by `--nproc 2`, i.e. torchrun): the same
adapter as one process with the same global batch, for DDP and FSDP2; resume of a 2-process run, also on one
process; the adapter saved once, gathered, in PEFT's layout."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit.errors import ConfigError
from test_train_support import copy_task_rows, save_tiny_llama, write_jsonl

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    model = save_tiny_llama(root / "tiny")
    data = write_jsonl(root / "train.jsonl", copy_task_rows(64))
    return root, model, data


def _run(setup, name: str, **kw) -> dict[str, torch.Tensor]:
    root, model, data = setup
    # dropout 0: the processes draw their own dropout masks, so only a dropout-free run can match bit for bit
    options = dict(model=str(model), data=str(data), eval_examples=4, output_dir=str(root / name), max_steps=4,
                   batch_size=8, grad_accum=2, lr=1e-2, warmup=1, lora_dropout=0.0, score="none", quiet=True,
                   device="cpu", target_modules=["all-linear"])
    options.update(kw)
    lorakit.train(**options)
    return load_file(root / name / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def one_process(setup):
    return _run(setup, "single")


def _assert_same_adapter(a: dict, b: dict, atol: float = 2e-6) -> None:
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=1e-4, msg=key)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_train_the_one_process_adapter(setup, one_process, strategy):
    two = _run(setup, f"two-{strategy}", nproc=2, strategy=strategy)
    _assert_same_adapter(one_process, two)
    root = setup[0]
    metrics = json.loads((root / f"two-{strategy}" / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["strategy"] == strategy
    # the adapter moved away from its init: the comparison above is not between two untrained adapters
    assert any(k.endswith("lora_B.weight") and one_process[k].abs().max() > 0 for k in one_process)
    config = json.loads((root / f"two-{strategy}" / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_resume_a_killed_two_process_run(setup, strategy):
    root = setup[0] / f"resume-{strategy}"
    whole = _run(setup, f"resume-{strategy}/whole", nproc=2, strategy=strategy, checkpoint_every=2)
    # what a run killed after its step-2 checkpoint leaves behind
    shutil.copytree(root / "whole" / "checkpoints", root / "killed" / "checkpoints")
    shutil.rmtree(root / "killed" / "checkpoints" / "step-0000004", ignore_errors=True)
    assert sorted(p.name for p in (root / "killed" / "checkpoints").iterdir()) == ["step-0000002"]
    resumed = _run(setup, f"resume-{strategy}/killed", nproc=2, strategy=strategy, checkpoint_every=2, resume=True)
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    # the checkpoint holds whole tensors: one process can finish what two started
    shutil.copytree(root / "killed" / "checkpoints" / "step-0000002", root / "on-one" / "checkpoints" / "step-0000002")
    _assert_same_adapter(whole, _run(setup, f"resume-{strategy}/on-one", checkpoint_every=2, resume=True))


def test_global_batch_smaller_than_the_processes_is_refused(setup):
    from lorakit.train.distributed import Distributed, check_options
    from lorakit.train.options import TrainOptions

    with pytest.raises(ConfigError, match="global micro-batch"):
        check_options(TrainOptions(batch_size=1), Distributed(rank=0, world_size=2, in_group=True))
    with pytest.raises(ConfigError, match="model as a name or path"):
        lorakit.train(model=torch.nn.Linear(2, 2), tokenizer=object(), nproc=2, data=str(setup[2]))


LOAD_INTO_SHARDED = '''
import sys, torch, lorakit
from transformers import AutoModelForCausalLM
from lorakit.train import distributed
model_dir, adapter_dir, out = sys.argv[1:4]
dist, device = distributed.setup("cpu")
model = AutoModelForCausalLM.from_pretrained(model_dir)
lorakit.add_adapter(model, lorakit.LoraConfig(r=4, target_modules=["q_proj"]))  # being trained, say
distributed.wrap_model(model, dist, "fsdp", device, bf16=False)                 # the base is sharded now
lorakit.load_adapter(model, adapter_dir, name="loaded")
lorakit.set_active(model, "loaded")
ids = torch.arange(24).reshape(2, 12) % 50
with torch.no_grad():
    logits = model(input_ids=ids).logits
distributed.save_adapter(model, out + "/resaved", dist, name="loaded")
if dist.is_main:
    torch.save(logits, out + "/logits.pt")
dist.close()
'''


def test_adapter_loads_into_and_saves_from_a_sharded_model(setup, one_process, tmp_path):
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    root, model_dir, _ = setup
    script = tmp_path / "load.py"
    script.write_text(LOAD_INTO_SHARDED)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                          str(script), str(model_dir), str(root / "single" / "adapter"), str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    reference = AutoModelForCausalLM.from_pretrained(model_dir)
    lorakit.load_adapter(reference, root / "single" / "adapter")
    with torch.no_grad():
        want = reference(input_ids=torch.arange(24).reshape(2, 12) % 50).logits
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), want, atol=1e-5, rtol=1e-5)
    _assert_same_adapter(load_file(tmp_path / "resaved" / "adapter_model.safetensors"), one_process, atol=0)
