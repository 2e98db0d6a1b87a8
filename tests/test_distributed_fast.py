"""lorakit.optimize() under DDP and FSDP2 on CPU (gloo, 2 processes started by torchrun): the fused calls run
(grouped q/k/v and gate/up included) and the loss and every adapter gradient equal a one-process run of the
reference path on the whole batch; `lorakit train --optimize --nproc 2` trains the adapter of a one-process
`--optimize` run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from safetensors.torch import load_file

import lorakit
from distributed_fast_worker import CASES, STRATEGIES, adapter_grads, batch, build
from support import rel_max

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

HERE = Path(__file__).resolve().parent


def _torchrun_two(worker: str, out: Path) -> dict:
    """What rank 0 of `worker` (a file beside this one, run by torchrun in 2 processes) saved to `out`."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent / "src"), str(HERE), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / worker), str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out, weights_only=True)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> dict:
    """Every (strategy, adapter) case of the worker, run in one torchrun launch of 2 processes."""
    return _torchrun_two("distributed_fast_worker.py", tmp_path_factory.mktemp("dist_fast") / "rank0.pt")


@pytest.mark.parametrize("adapter", list(CASES))
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_processes_with_optimize_give_the_one_process_reference_gradients(strategy, adapter, two_processes):
    model = build(CASES[adapter])  # the reference path, one process, the whole batch
    ids = batch()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    ref = adapter_grads(model)
    got = two_processes[f"{strategy}-{adapter}"]
    per_pass = 8  # per decoder layer: q/k/v as one call, o, gate/up as one call, down
    assert got["calls"] == per_pass * (2 if "checkpoint" in adapter else 1)  # and the recompute's
    torch.testing.assert_close(got["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
    assert got["grads"].keys() == ref.keys() and len(ref) == 2 * 7 * (3 if adapter == "dora" else 2)
    for name, g in ref.items():
        assert g.abs().max() > 0, name  # a gradient that could differ
        torch.testing.assert_close(got["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_lorakit_train_optimize_on_two_processes_trains_the_one_process_adapter(tmp_path):
    from test_train_support import copy_task_rows, save_tiny_llama, write_jsonl

    model = save_tiny_llama(tmp_path / "tiny")
    data = write_jsonl(tmp_path / "train.jsonl", copy_task_rows(32))
    options = dict(model=str(model), data=str(data), eval_examples=4, max_steps=2, batch_size=8, lr=1e-2, warmup=1,
                   lora_dropout=0.0, score="none", quiet=True, device="cpu", target_modules=["all-linear"])
    lorakit.train(output_dir=str(tmp_path / "one"), optimize=True, **options)  # Adam magnifies rounding: like for like
    lorakit.train(output_dir=str(tmp_path / "two"), optimize=True, nproc=2, strategy="fsdp", **options)
    one, two = (load_file(tmp_path / d / "adapter" / "adapter_model.safetensors") for d in ("one", "two"))
    assert one.keys() == two.keys() and any(k.endswith("lora_B.weight") and one[k].abs().max() > 0 for k in one)
    for key in one:  # relative to the tensor's largest entry: Adam's first steps magnify rounding in near-zero
        # gradients to ~1e-4 (two processes without optimize differ from one by as much); a gradient left unsynced
        # or a sharded weight read as a whole would differ by O(1)
        assert rel_max(two[key], one[key]) < 1e-3, key


def test_fsdp_units_inside_checkpointed_blocks_keep_their_gradients(tmp_path):
    """A checkpointed block whose parameters FSDP2 gathers in units inside it (not at the block's own call) runs
    under torch's checkpoint: its sharded parameters cannot be inputs of the block's node (their gradients were
    silently lost: 12 of 12 None)."""
    from distributed_nested_worker import build as build_nested, inputs

    got = _torchrun_two("distributed_nested_worker.py", tmp_path / "rank0.pt")
    ref = build_nested()
    loss = ref(inputs()).square().mean()
    loss.backward()
    want = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    assert got["checkpointed"] == 3 and len(want) == 2 * 6
    torch.testing.assert_close(got["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
    assert got["grads"].keys() == want.keys()
    for name, g in want.items():
        torch.testing.assert_close(got["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)
