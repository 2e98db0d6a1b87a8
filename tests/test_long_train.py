"""`lorakit train --checkpoint offload`: a long row (past the model's max_position_embeddings) trains end to end,
giving the adapter of the same run without checkpointing; bad combinations are refused before anything runs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit.errors import ConfigError
from transformers import AutoTokenizer, LlamaForCausalLM
from lorakit.cli import app as cli
from test_train_support import corpus, one_thread, save_tiny_llama, write_jsonl  # noqa: F401

MAX_POSITIONS = 256  # save_tiny_llama's max_position_embeddings


@pytest.fixture(scope="module")
def long_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("long")
    model = save_tiny_llama(tmp / "tiny")
    text = " ".join(corpus())  # one row of ~ 2k tokens, cut to --max-length
    data = write_jsonl(tmp / "train.jsonl", [{"text": text}] * 3)
    options = dict(data=str(data), eval_data=str(data), eval_examples=1, max_steps=2, batch_size=1,
                   max_length=3 * MAX_POSITIONS, lr=1e-2, warmup=0, lora_dropout=0.0, score="none", samples=0,
                   quiet=True, device="cpu", target_modules=["all-linear"], packing=False)
    runs = {"lengths": []}
    for mode in ("offload", "none"):
        net = LlamaForCausalLM.from_pretrained(model)
        net.model.register_forward_pre_hook(
            lambda m, args, kw: runs["lengths"].append(kw["input_ids"].shape[-1]) if m.training else None,
            with_kwargs=True)
        out = tmp / mode
        lorakit.train(output_dir=str(out), checkpoint=mode, model=net, tokenizer=AutoTokenizer.from_pretrained(model),
                      **options)
        runs[mode] = out
    return runs


def test_offload_trains_a_row_longer_than_max_positions(long_run):
    out = long_run["offload"]
    assert long_run["lengths"] and min(long_run["lengths"]) == 3 * MAX_POSITIONS  # each step: one cut long row
    opts = json.loads((out / "options.json").read_text())
    assert opts["checkpoint"] == "offload" and opts["max_length"] > MAX_POSITIONS
    metrics = json.loads((out / "metrics.json").read_text())
    text = json.dumps(metrics)
    assert "NaN" not in text and "Infinity" not in text
    one, ref = (load_file(long_run[m] / "adapter" / "adapter_model.safetensors") for m in ("offload", "none"))
    assert one.keys() == ref.keys() and any(k.endswith("lora_B.weight") and ref[k].abs().max() > 0 for k in ref)
    for key in ref:  # checkpointing changes no math: the same adapter up to rounding (Adam's first steps)
        scale = ref[key].abs().max().clamp_min(1e-12)
        assert ((one[key] - ref[key]).abs().max() / scale) < 1e-3, key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_checkpointed_blocks_from_cuda_graphs_train_the_same_adapter(tmp_path):
    """`lorakit train --checkpoint recompute --cuda-graphs` on a GPU: the blocks replay from graphs (rows of one
    shape) and give the adapter of the run without graphs, up to rounding."""
    from lorakit.fast.block_graphs import STATE_ATTR

    model = save_tiny_llama(tmp_path / "tiny")
    data = write_jsonl(tmp_path / "train.jsonl", [{"text": " ".join(corpus()[:40])}] * 8)
    options = dict(data=str(data), eval_data=str(data), eval_examples=1, max_steps=4, batch_size=2, max_length=96,
                   lr=1e-2, warmup=0, lora_dropout=0.0, score="none", samples=0, quiet=True, device="cuda",
                   target_modules=["all-linear"], packing=False, checkpoint="recompute")
    adapters = {}
    for graphs in (False, True):
        net = LlamaForCausalLM.from_pretrained(model)
        lorakit.train(output_dir=str(tmp_path / str(graphs)), cuda_graphs=graphs, model=net,
                      tokenizer=AutoTokenizer.from_pretrained(model), **options)
        adapters[graphs] = load_file(tmp_path / str(graphs) / "adapter" / "adapter_model.safetensors")
        replays = [m.__dict__[STATE_ATTR].replays for m in net.modules() if STATE_ATTR in m.__dict__]
        assert (sum(replays) > 0) == graphs
    for key, ref in adapters[False].items():
        scale = ref.abs().max().clamp_min(1e-12)
        assert ((adapters[True][key] - ref).abs().max() / scale) < 1e-3, key


def test_checkpoint_and_gradient_checkpointing_together_exit_2(tmp_path, capsys):
    code = cli.main(["train", "--checkpoint", "offload", "--gradient-checkpointing", "--output-dir",
                     str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--gradient-checkpointing" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("other", [["--checkpoint", "offload"], ["--gradient-checkpointing"], ["--nproc", "2"]])
def test_cuda_graphs_with_offload_or_hf_checkpointing_or_several_processes_exits_2(tmp_path, capsys, other):
    code = cli.main(["train", "--cuda-graphs", *other, "--output-dir", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--cuda-graphs" in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_cuda_graphs_with_checkpoint_recompute_passes_the_option_checks():
    from lorakit.train import distributed, run
    from lorakit.train.options import TrainOptions

    run._check_run(TrainOptions(checkpoint="recompute", cuda_graphs=True), distributed.Distributed())
    with pytest.raises(ConfigError, match="--cuda-graphs"):
        run._check_run(TrainOptions(checkpoint="offload", cuda_graphs=True), distributed.Distributed())


def test_bad_checkpoint_mode_exits_2(tmp_path, capsys):
    code = cli.main(["train", "--checkpoint", "sometimes", "--output-dir", str(tmp_path / "run")])
    assert code == 2 and capsys.readouterr().err.strip()
