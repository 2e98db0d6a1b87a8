"""Activation checkpointing per transformer block, optionally with the block inputs offloaded to CPU.

checkpoint=True: torch's non-reentrant checkpoint around each block (activations recomputed in the
backward; only each block's input stays on the device).
checkpoint="offload": each block's input goes to pinned CPU memory instead, and comes back for the block's
recompute. On a GPU the copies run on a side stream (one per device) and overlap compute: the device→host copy
of block i's input runs while block i computes (the caching allocator keeps the input's memory until the copy
ends: record_stream), and during block i's backward the input of block i − 1 is already coming back
(a prefetch, for inputs up to PREFETCH_BYTES: beyond that, at hundreds of thousands of tokens, the copy
takes a few percent of the block's quadratic attention time, and the memory is worth more than the overlap).
A block's first call copies before computing and checks that the block leaves its input unchanged (its
version counter); only then do its later copies overlap its compute.
Without CUDA the copies are plain ones.
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
    stashed: list = []
    version = hidden._version
    out = _OffloadedBlock.apply(hidden, anchor, run, stashed, block.__dict__.get(OVERLAP_ATTR, False))
    if version == hidden._version:  # the block leaves its input alone: its copy may overlap its compute
        block.__dict__.setdefault(OVERLAP_ATTR, True)
    else:  # the copy must finish before the block runs (the block writes its input in place)
        block.__dict__[OVERLAP_ATTR] = False
    if isinstance(out, torch.Tensor):  # the next block's input: its backward prefetches this block's input
        out.__dict__[STASH_ATTR] = stashed[0]
    return (out, *tail) if tail else out


OVERLAP_ATTR = "_lorakit_offload_overlap"  # on a block: its input is not written in place, copies may overlap
PREFETCH_BYTES = 2**30  # largest block input that is brought back ahead of its backward (Llama-3-8B: 131k tokens)
STASH_ATTR = "_lorakit_offloaded_input"  # on a block's output: the _Stash of that block's input


class _Stash:
    """A block input kept in host memory: `cpu` (pinned on a GPU), `copied` (the event ending the copy to the
    host), and once prefetched `fetched` (back on the device) with `ready` (the event ending that copy)."""

    __slots__ = ("cpu", "device", "copied", "fetched", "ready")

    def __init__(self, hidden: torch.Tensor):
        self.device, self.copied, self.fetched, self.ready = hidden.device, None, None, None
        self.cpu = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=hidden.is_cuda)
        if not hidden.is_cuda:
            self.cpu.copy_(hidden)
            return
        side = _side_stream(hidden.device)
        side.wait_stream(torch.cuda.current_stream(hidden.device))  # hidden is written by then
        with torch.cuda.stream(side):
            self.cpu.copy_(hidden, non_blocking=True)
            self.copied = torch.cuda.Event()
            self.copied.record(side)
        hidden.record_stream(side)  # its memory is not reused before the copy ends

    def wait(self) -> None:
        """Make the compute stream wait until the copy to the host has ended."""
        if self.copied is not None:
            torch.cuda.current_stream(self.device).wait_event(self.copied)

    def prefetch(self) -> None:
        """Start copying the input back to the device on the side stream (nothing without CUDA or beyond
        PREFETCH_BYTES)."""
        if self.cpu is None or self.fetched is not None or self.device.type != "cuda":
            return
        if self.cpu.numel() * self.cpu.element_size() > PREFETCH_BYTES:
            return
        side = _side_stream(self.device)
        gpu = torch.empty(self.cpu.shape, dtype=self.cpu.dtype, device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))  # gpu's memory is free for the side stream
        with torch.cuda.stream(side):
            gpu.copy_(self.cpu, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record(side)
        gpu.record_stream(side)
        self.fetched = gpu

    def take(self) -> torch.Tensor:
        """The input on its device (prefetched or copied now); the host copy is released."""
        if self.fetched is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready)
            gpu = self.fetched
        else:
            if self.copied is not None:
                torch.cuda.current_stream(self.device).wait_event(self.copied)
            gpu = self.cpu.to(self.device, non_blocking=True)
        self.cpu = self.fetched = self.ready = self.copied = None
        return gpu


_SIDE_STREAMS: dict = {}


def _side_stream(device: torch.device):
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
    return _SIDE_STREAMS[index]


class _OffloadedBlock(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, anchor, run, stashed, overlap):
        ctx.run, ctx.device = run, hidden.device
        ctx.rng = device_rng_state(hidden.device)
        ctx.stash = _Stash(hidden)
        if not overlap:  # a block's first call, or one that writes its input: the copy first
            ctx.stash.wait()
        ctx.previous = hidden.__dict__.get(STASH_ATTR)  # the block before's input, when it fed this one
        stashed.append(ctx.stash)
        with torch.no_grad():
            return run(hidden)

    @staticmethod
    def backward(ctx, dout):
        hidden = ctx.stash.take().requires_grad_(True)
        if ctx.previous is not None:
            ctx.previous.prefetch()  # comes back while this block recomputes and backpropagates
        ctx.stash = ctx.previous = None
        with torch.random.fork_rng(devices=[ctx.device] if ctx.device.type == "cuda" else []), torch.enable_grad():
            restore_device_rng(ctx.device, ctx.rng)
            out = ctx.run(hidden)
        _drop_values_if_unread(out)
        torch.autograd.backward(out, dout)
        return hidden.grad, None, None, None, None


def _drop_values_if_unread(out: torch.Tensor) -> None:
    """Free the recomputed block output's memory (one hidden state per token) before its backward, when the op
    that made it is an addition (the residual), which keeps neither operand nor result for its backward:
    autograd then needs only the output's shape."""
    if type(out.grad_fn).__name__ == "AddBackward0" and out._base is None:
        out.untyped_storage().resize_(0)


def device_rng_state(device: torch.device):
    """What dropout inside a recomputed region draws from: the CPU generator's state and, on a GPU, that
    device's (no Python RNG); restore_device_rng puts it back before the recompute."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def restore_device_rng(device: torch.device, state) -> None:
    """Set the generators back to a device_rng_state."""
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
