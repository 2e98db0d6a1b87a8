"""Shared pieces of the transformers-integration tests (test_hf_integration.py, test_hf_trainer.py): a tiny
Llama saved once per module, a small LoRA config, logits and adapter tensors."""

from __future__ import annotations

import pytest
import torch

import lorakit
from test_train_support import save_tiny_llama

IDS = torch.tensor([[5, 9, 33, 71, 2, 17]])


def _lora(**kw):
    return lorakit.LoraConfig(**({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]} | kw))


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def _adapter_tensors(model, name="default"):
    return {k: v.detach().clone() for k, v in lorakit.adapter_state_dict(model, name).items()}


def _load_file(path):
    from safetensors.torch import load_file

    return load_file(path)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


def _llama(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()

