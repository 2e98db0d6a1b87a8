"""Helpers shared by several test modules (no tests here). Import `one_thread` into a module to use it there."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorakit


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors run fastest on one thread, and on a busy 2-core box two threads spin against each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def randomise_adapters(module, seed: int = 0, std: float = 0.3) -> None:
    """Random adapter tensors (and magnitudes scaled around 1), so that no delta is a no-op."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in module.named_parameters():
            if "magnitude" in n:
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif ".deltas." in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def rel_norm(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def rel_max(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b|."""
    return float((a - b).abs().max().detach() / b.abs().max().detach().clamp_min(1e-12))


def small_lora(**kw) -> lorakit.LoraConfig:
    """A small LoRA config with random (non-zero) B, so that every adapter changes the output."""
    return lorakit.LoraConfig(**({"r": 4, "lora_alpha": 8, "init_lora_weights": False} | kw))


def only(model, keep):
    """A copy of the model with adapter `keep` alone, active (None: no adapter at all)."""
    single = copy.deepcopy(model)
    for name in lorakit.list_adapters(single):
        if name != keep:
            lorakit.delete_adapter(single, name)
    if keep is not None:
        lorakit.set_active(single, keep)
    return single


class Siblings(nn.Module):
    """Three linears that read one input, as q/k/v do: q [n_in → q_out], k (no bias) and v [n_in → kv_out]."""

    def __init__(self, dtype=None, n_in: int = 24, q_out: int = 16, kv_out: int = 8):
        super().__init__()
        self.q = nn.Linear(n_in, q_out)
        self.k = nn.Linear(n_in, kv_out, bias=False)
        self.v = nn.Linear(n_in, kv_out)
        if dtype is not None:
            self.to(dtype)
