"""Activation checkpointing per transformer block, optionally with the block inputs offloaded to CPU.

checkpoint=True: torch's non-reentrant checkpoint around each block (activations recomputed in the
backward; only each block's input stays on the device).
checkpoint="offload": each block's input goes to pinned CPU memory as well (copied on the current stream,
so later kernels that reuse its memory run after the copy), and comes back for the block's recompute.
Only the gradients of parameters that are leaves (LoRA factors, trained biases) are accumulated, through
`.grad`, as with reentrant checkpointing: use loss.backward(), not torch.autograd.grad.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def checkpointed_forward(block, original, offload: bool, *args, **kwargs):
    """A block's forward under activation checkpointing (install with core.patching.patch_forward).

    Args:
        block: the patched block; checkpointing applies only while it trains with grad enabled.
        original: the block's forward before the patch.
        offload: also keep the block's input in (pinned) CPU memory until the recompute.
        args, kwargs: the block's own call arguments.

    Returns:
        What `original` returns.
    """
    if not (block.training and torch.is_grad_enabled()):
        return original(*args, **kwargs)
    # A KV cache would see the block twice (forward and recompute) and serve the recompute stale,
    # gradient-less keys: training blocks run without one, as HF's own checkpointing does.
    for name in ("past_key_values", "layer_past", "past_key_value"):
        if kwargs.get(name) is not None:
            kwargs[name] = None
    if kwargs.get("use_cache"):
        kwargs["use_cache"] = False
    if not offload:
        return checkpoint(original, *args, use_reentrant=False, **kwargs)
    hidden, rest = (args[0], args[1:]) if args else (kwargs.pop("hidden_states"), ())
    tail: list = []  # a block returning a tuple: its other outputs (no gradient flows through them)

    def run(h):
        out = original(h, *rest, **kwargs)
        if isinstance(out, torch.Tensor):
            return out
        tail[:] = out[1:]
        return out[0]

    anchor = torch.empty((), device=hidden.device, requires_grad=True)  # keeps the block in the graph
    out = _OffloadedBlock.apply(hidden, anchor, run)
    return (out, *tail) if tail else out


class _OffloadedBlock(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, anchor, run):
        ctx.run, ctx.device = run, hidden.device
        ctx.rng = _device_rng_state(hidden.device)
        cpu = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=hidden.is_cuda)
        cpu.copy_(hidden, non_blocking=True)
        ctx.cpu = cpu
        with torch.no_grad():
            return run(hidden)

    @staticmethod
    def backward(ctx, dout):
        hidden = ctx.cpu.to(ctx.device, non_blocking=True).requires_grad_(True)
        ctx.cpu = None
        with torch.random.fork_rng(devices=[ctx.device] if ctx.device.type == "cuda" else []), torch.enable_grad():
            _restore_device_rng(ctx.device, ctx.rng)
            out = ctx.run(hidden)
        torch.autograd.backward(out, dout)
        return hidden.grad, None, None


def _device_rng_state(device: torch.device):
    # what a block's dropout draws from: the CPU generator and, on a GPU, that device's (no Python RNG)
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _restore_device_rng(device: torch.device, state) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
