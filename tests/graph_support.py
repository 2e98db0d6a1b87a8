"""Helpers of the CUDA graph tests (test_fast_block_graphs.py, test_fast_checkpoint_graphs.py; no tests here)."""

from __future__ import annotations

import torch

import lorakit
from lorakit.fast import block_graphs


def graph_states(model):
    """Each patched block's graph state (block_graphs._BlockGraphs), in module order."""
    return [b.__dict__[block_graphs.STATE_ATTR] for b in model.modules() if block_graphs.STATE_ATTR in b.__dict__]


def train_steps(model, batches, mode: str = "plain", seeded: bool = False, **options):
    """optimize(model, **options), then one AdamW step per batch; returns (losses, last gradients, parameters
    after). mode "micro": gradients accumulated over two micro-batches; "twice": two forwards, then one backward
    through both. seeded: torch.manual_seed(100 + step) before each step."""
    lorakit.optimize(model, **options)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for step, ids in enumerate(batches):
        if seeded:
            torch.manual_seed(100 + step)
        if mode == "micro":
            loss = sum(_backward(model(input_ids=part, labels=part).loss) for part in ids.split(1))
        elif mode == "twice":
            loss = _backward(model(input_ids=ids, labels=ids).loss + model(input_ids=ids.flip(1), labels=ids).loss)
        else:
            loss = _backward(model(input_ids=ids, labels=ids).loss)
        losses.append(float(loss))
        grads = [p.grad.clone() for p in params]
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses, grads, [p.detach().clone() for p in params]


def _backward(loss):
    loss.backward()
    return loss.detach()
