"""Activation checkpointing per transformer block, optionally with the block inputs offloaded to CPU.

Both modes run a block's forward without autograd (no graph recorded, no activation saved) and keep only its
input; the block's backward recomputes it with autograd and backpropagates through it at once (reentrant
checkpointing). Recording the graph in the forward and hooking every saved tensor, as torch's non-reentrant
checkpoint does, cost ~30% more host time per step (a 32-layer model whose step is all host time: 247-270 ms
against 185-195 ms), which is what a batch-1 step on a fast GPU waits on.
checkpoint=True: each block's input stays on the device (saved for backward: autograd refuses it if it was
changed in place since).
checkpoint="offload": each block's input goes to pinned CPU memory instead, and comes back for the block's
recompute. On a GPU the copies run on a side stream (one per device) and overlap compute: the device→host copy
of block i's input runs while block i computes (the caching allocator keeps the input's memory until the copy
ends: record_stream), and during block i's backward the input of block i − 1 is already coming back
(a prefetch, for inputs up to PREFETCH_BYTES: beyond that, at hundreds of thousands of tokens, the copy
takes a few percent of the block's quadratic attention time, and the memory is worth more than the overlap).
A block's first call copies before computing and checks that the block leaves its input unchanged (its
version counter); only then do its later copies overlap its compute.
Without CUDA the copies are plain ones.
The block's parameters that need gradients are inputs of its autograd node, so their gradients flow out of it
as anywhere else (loss.backward(), torch.autograd.grad, DDP's hooks); a trained tensor the block reads without
owning it (not among block.parameters()) gets no gradient. A block call that takes another argument needing a
gradient, or hands out more than its output (router logits for a MoE's auxiliary loss, recorded hidden states),
runs under torch's non-reentrant checkpoint instead (on the device, in both modes), which carries those gradients.
"""

from __future__ import annotations

import contextlib
import sys

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
    hidden, rest = (args[0], args[1:]) if args else (kwargs.get("hidden_states"), ())
    if (not isinstance(hidden, torch.Tensor) or _needs_grad(rest) or _needs_grad(kwargs.values(), skip=hidden)
            or _hands_out_more(block, kwargs)):
        return checkpoint(original, *args, use_reentrant=False, **kwargs)  # it carries the other gradients
    if not args:
        del kwargs["hidden_states"]
    tail: list = []  # a block returning a tuple: its other outputs (no gradient flows through them)

    def run(h):
        out = original(h, *rest, **kwargs)
        if isinstance(out, torch.Tensor):
            return out
        tail[:] = out[1:]
        return out[0]

    anchor = torch.empty((), device=hidden.device, requires_grad=True)  # keeps the block in the graph
    trained = [p for p in block.parameters() if p.requires_grad]  # inputs of the block's node: their gradients
    if not offload:  # flow out of it, so torch.autograd.grad and DDP's hooks see them as usual
        out = _RecomputedBlock.apply(hidden, anchor, run, *trained)
        return (out, *tail) if tail else out
    stashed: list = []
    version = hidden._version
    out = _OffloadedBlock.apply(hidden, anchor, run, stashed, block.__dict__.get(OVERLAP_ATTR, False), *trained)
    if version == hidden._version:  # the block leaves its input alone: its copy may overlap its compute
        block.__dict__.setdefault(OVERLAP_ATTR, True)
    else:  # the copy must finish before the block runs (the block writes its input in place)
        block.__dict__[OVERLAP_ATTR] = False
    if isinstance(out, torch.Tensor):  # the next block's input: its backward prefetches this block's input
        out.__dict__[STASH_ATTR] = stashed[0]
    return (out, *tail) if tail else out


def _needs_grad(values, skip=None) -> bool:
    """Whether a tensor among `values` (or inside a tuple or list among them), other than `skip`, needs a
    gradient."""
    for v in values:
        if isinstance(v, (tuple, list)):
            if _needs_grad(v, skip):
                return True
        elif isinstance(v, torch.Tensor) and v is not skip and v.requires_grad:
            return True
    return False


def _hands_out_more(block, kwargs: dict) -> bool:
    """Whether the block's call hands out more than its output for a loss to use (MoE router logits for the
    auxiliary loss, hidden states, attention weights): an output_* flag among its arguments, or transformers
    recording layer outputs through its hooks (in transformers 5 while a recording is active; before, while the
    hooks are on the block). What a forward without autograd hands out carries no gradient."""
    if any(k.startswith("output_") and v for k, v in kwargs.items()):
        return True
    capture = sys.modules.get("transformers.utils.output_capturing")
    if capture is None:
        return any(m._forward_hooks for m in block.modules())
    collector = getattr(capture, "_active_collector", None)
    return collector is None or bool(collector.get())


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
    def forward(ctx, hidden, anchor, run, stashed, overlap, *params):
        ctx.run, ctx.device, ctx.params = run, hidden.device, params
        ctx.rng, ctx.autocast = device_rng_state(hidden.device), autocast_state(hidden.device)
        ctx.stash = _Stash(hidden)
        if not overlap:  # a block's first call, or one that writes its input: the copy first
            ctx.stash.wait()
        ctx.previous = hidden.__dict__.get(STASH_ATTR)  # the block before's input, when it fed this one
        stashed.append(ctx.stash)
        with torch.no_grad():
            return run(hidden)

    @staticmethod
    def backward(ctx, dout):
        hidden = ctx.stash.take()
        if ctx.previous is not None:
            ctx.previous.prefetch()  # comes back while this block recomputes and backpropagates
        ctx.stash = ctx.previous = None
        d_hidden, *d_params = _recompute_and_backprop(ctx, hidden, dout, 5)
        return d_hidden, None, None, None, None, *d_params


class _RecomputedBlock(torch.autograd.Function):
    """checkpoint=True: the block runs without autograd; its input stays on the device for the recompute."""

    @staticmethod
    def forward(ctx, hidden, anchor, run, *params):
        ctx.run, ctx.device, ctx.params = run, hidden.device, params
        ctx.rng, ctx.autocast = device_rng_state(hidden.device), autocast_state(hidden.device)
        ctx.save_for_backward(hidden)
        with torch.no_grad():
            return run(hidden)

    @staticmethod
    def backward(ctx, dout):
        hidden, = ctx.saved_tensors
        d_hidden, *d_params = _recompute_and_backprop(ctx, hidden.detach(), dout, 3)
        return d_hidden, None, None, *d_params


def _recompute_and_backprop(ctx, hidden: torch.Tensor, dout: torch.Tensor, first_param: int) -> list:
    """Run the block (ctx.run) again on its input with autograd, under the RNG state and autocast its forward ran
    under, and backpropagate dout through it. Returns the gradients of the input and of ctx.params (None where
    autograd asks for none); ctx.needs_input_grad[first_param:] are the parameters'."""
    hidden.requires_grad_(True)
    run, ctx.run = ctx.run, None  # the closure holds the block's call arguments: released with this backward
    with torch.random.fork_rng(devices=[ctx.device] if ctx.device.type == "cuda" else []), torch.enable_grad(), \
            _autocast(ctx.autocast):
        restore_device_rng(ctx.device, ctx.rng)
        out = run(hidden)
    _drop_values_if_unread(out)
    wanted = [ctx.needs_input_grad[0]] + list(ctx.needs_input_grad[first_param:])
    inputs = [t for t, want in zip((hidden, *ctx.params), wanted) if want]
    ctx.params = ()
    got = iter(torch.autograd.grad(out, inputs, dout, allow_unused=True) if inputs else ())
    return [next(got) if want else None for want in wanted]


def _drop_values_if_unread(out: torch.Tensor) -> None:
    """Free the recomputed block output's memory (one hidden state per token) before its backward, when the op
    that made it is an addition (the residual), which keeps neither operand nor result for its backward:
    autograd then needs only the output's shape."""
    if type(out.grad_fn).__name__ == "AddBackward0" and out._base is None:
        out.untyped_storage().resize_(0)


def autocast_state(device: torch.device) -> tuple:
    """The autocast a block's forward ran under, for its recompute (backward runs outside the caller's autocast):
    (device type, enabled, dtype) for the block's device and the CPU, and whether autocast caches casts."""
    kinds = dict.fromkeys((device.type, "cpu"))
    return tuple((k, torch.is_autocast_enabled(k), torch.get_autocast_dtype(k)) for k in kinds), \
        torch.is_autocast_cache_enabled()


def _autocast(state: tuple) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    for kind, enabled, dtype in state[0]:
        stack.enter_context(torch.autocast(kind, dtype=dtype, enabled=enabled, cache_enabled=state[1]))
    return stack


def device_rng_state(device: torch.device):
    """What dropout inside a recomputed region draws from: the CPU generator's state and, on a GPU, that
    device's (no Python RNG); restore_device_rng puts it back before the recompute."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def restore_device_rng(device: torch.device, state) -> None:
    """Set the generators back to a device_rng_state."""
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
