"""LoRA+: B factors train at `loraplus_lr_ratio` × the base rate, as PEFT's create_loraplus_optimizer groups them."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

import lorakit
from lorakit.errors import ConfigError
from lorakit.train.loraplus import build_optimizer
from test_train_support import copy_task_rows, one_thread, save_tiny_llama, write_jsonl  # noqa: F401

TARGETS = ["q_proj", "v_proj", "down_proj", "embed_tokens"]


def _rates_by_key(model, optimizer) -> dict[str, float]:
    """{module path.PEFT tensor suffix: learning rate of its group} for every adapter tensor."""
    rate = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    return {f"{path}.{suffix}": rate[id(p)] for path, layer in lorakit.adapted_layers(model)
            for delta in layer.deltas.values() for suffix, p in delta.peft_tensors().items()}


def test_groups_match_peft_create_loraplus_optimizer(tiny_llama):
    from peft import LoraConfig, get_peft_model
    from peft.optimizers import create_loraplus_optimizer

    peft_model = get_peft_model(copy.deepcopy(tiny_llama), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    peft_opt = create_loraplus_optimizer(peft_model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)
    peft_rates = {}
    for group in peft_opt.param_groups:
        for p in group["params"]:
            name = next(n for n, q in peft_model.named_parameters() if q is p)
            key = name.removeprefix("base_model.model.").replace(".default", "")
            peft_rates[key] = group["lr"]

    lorakit.add_adapter(tiny_llama, lorakit.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    params = [p for p in tiny_llama.parameters() if p.requires_grad]
    opt = build_optimizer(tiny_llama, params, SimpleNamespace(lr=1e-3, weight_decay=0.0, loraplus_lr_ratio=16))
    ours = _rates_by_key(tiny_llama, opt)
    assert ours == pytest.approx(peft_rates)
    assert set(ours.values()) == {1e-3, 1.6e-2, 1e-6}  # A, B (×16), embedding deltas (PEFT's 1e-6)
    assert opt.param_groups[0]["lr"] == 1e-3  # the base group first: the loop logs its rate


def test_variant_without_factors_trains_at_the_base_rate(tiny_llama):
    lorakit.add_adapter(tiny_llama, lorakit.LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    params = [p for p in tiny_llama.parameters() if p.requires_grad]
    opt = build_optimizer(tiny_llama, params, SimpleNamespace(lr=1e-3, weight_decay=0.0, loraplus_lr_ratio=16))
    assert {g["lr"] for g in opt.param_groups for _ in g["params"]} == {1e-3}


def test_negative_ratio_is_refused(tiny_llama):
    lorakit.add_adapter(tiny_llama, lorakit.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="loraplus-lr-ratio"):
        build_optimizer(tiny_llama, list(tiny_llama.parameters()),
                        SimpleNamespace(lr=1e-3, weight_decay=0.0, loraplus_lr_ratio=-1.0))


@pytest.mark.parametrize("ratio", [0.0, 16.0])
def test_the_loop_moves_b_by_ratio_times_the_rate(tmp_path, ratio):
    # Adam's first step moves every parameter by lr·g/|g| = lr: B (zero at init) ends at exactly ±lr·ratio
    tiny = save_tiny_llama(tmp_path / "m")
    data = write_jsonl(tmp_path / "d.jsonl", copy_task_rows(8))
    result = lorakit.train(model=str(tiny), data=str(data), output_dir=str(tmp_path / "run"), max_steps=1,
                           batch_size=4, lr=1e-3, warmup=0, schedule="constant", r=4, target_modules=["q_proj"],
                           loraplus_lr_ratio=ratio, quiet=True, score="none", eval_examples=2, packing=False)
    b = [p for path, layer in lorakit.adapted_layers(result.model) for d in layer.deltas.values()
         for p in [d.linear_factors()[1].detach()]]
    expected = 1e-3 * (ratio or 1.0)
    assert max(float(t.abs().max()) for t in b) == pytest.approx(expected, rel=1e-3)


def test_a_resumed_loraplus_run_is_bit_exact(tmp_path):
    """LoRA+ groups put every B after every A: the checkpoint keys the moments by name, so they come back to
    their own parameters and the resumed run ends exactly where an uninterrupted one does."""
    import json
    import shutil

    tiny = save_tiny_llama(tmp_path / "m")
    data = write_jsonl(tmp_path / "d.jsonl", copy_task_rows(32))
    options = dict(model=str(tiny), data=str(data), max_steps=4, checkpoint_every=2, batch_size=4, lr=1e-3,
                   r=4, target_modules=["q_proj", "v_proj"], loraplus_lr_ratio=16.0, quiet=True, score="none",
                   eval_examples=2, lora_dropout=0.1)
    whole = lorakit.train(output_dir=str(tmp_path / "whole"), **options)
    run = tmp_path / "killed"  # what a kill after the step-2 checkpoint leaves
    shutil.copytree(tmp_path / "whole" / "checkpoints", run / "checkpoints")
    (run / "options.json").write_text((tmp_path / "whole" / "options.json").read_text())
    resumed = lorakit.train(output_dir=str(run), resume=True, **options)
    a, b = lorakit.adapter_state_dict(whole.model), lorakit.adapter_state_dict(resumed.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = json.loads((run / "checkpoints" / "step-0000002" / "trainer_state.json").read_text())
    assert set(state["optimizer"]["state"]) == {n for n, p in whole.model.named_parameters() if p.requires_grad}
