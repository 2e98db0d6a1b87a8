"""Activation checkpointing per transformer block, optionally with the block inputs offloaded to CPU.

Both modes run a block's forward without autograd (no graph recorded, no activation saved) and keep only its
input; the block's backward recomputes it with autograd and backpropagates through it at once (reentrant
checkpointing). Recording the graph in the forward and hooking every saved tensor, as torch's non-reentrant
checkpoint does, costs host time, which is what a batch-1 step on a fast GPU waits on: a 32-layer model whose
step is all host time took 247-270 ms a step that way against 177-210 ms, and the host-bound 8B B1 T2048 step on
an H200 12-15% more (BENCHMARKS.md).
checkpoint=True: each block's input stays on the device (saved for backward: autograd refuses it if it was
changed in place since).
checkpoint="offload": each block's input goes to pinned CPU memory instead, and comes back for the block's
recompute. A 4-bit base's dense weights are written once per block in its forward and once in its recompute, whose
copies serve the backward too (scratch.kept_dense: one block's dense weights held, ~0.4 GiB at 8B, for one
dequantisation a step fewer; the sequence tiles of its MLP share them). On a GPU the copies run on a side stream
(one per device) and overlap compute: the device→host copy of block i's input runs while block i computes (the
caching allocator keeps the input's memory until the copy ends: record_stream), and during block i's backward the
input of block i − 1 is already coming back
(a prefetch, for inputs up to PREFETCH_BYTES: beyond that, at hundreds of thousands of tokens, the copy
takes a few percent of the block's quadratic attention time, and the memory is worth more than the overlap).
A block's first call copies before computing and checks that the block leaves its input unchanged (its
version counter); only then do its later copies overlap its compute.
Without CUDA the copies are plain ones.
The block's parameters that need gradients are inputs of its autograd node, and the tensors it returns (a tuple's
too, such as T5's position bias) are its outputs, so gradients flow through it as anywhere else (loss.backward(),
torch.autograd.grad, several backwards with retain_graph, DDP's hooks); a trained tensor the block reads without
owning it (not among block.parameters()) gets no gradient. Another argument of the call that needs a gradient, a
tensor of its own (not inside a tuple, list or dict: T5's position bias from block 1 on, a decoder's encoder
output), is an input of the node too: saved for backward like the hidden state (on the device in both modes), and
a fresh leaf of the recompute (block_args.py sorts the call). torch's non-reentrant checkpoint runs the block
instead (on the device, in both modes), since it carries every gradient, where the block's call
- takes another argument that needs a gradient inside a tuple, list or dict, or one sharing the hidden state's
  memory (the hidden state again, or a view of it),
- holds trained parameters that are still sharded when it is called (an FSDP2 unit inside the block gathers them
  only when its own call comes; the node would take the shards as its inputs and their gradients would be lost),
- hands out more than it returns (router logits recorded for a MoE's auxiliary loss, recorded hidden states), or
- returns neither a tensor nor a tuple or list that starts with one (known after its first call).
The recompute runs inside thread_scope.SINGLE_BACKWARD: its graph runs one backward and is dropped, so the SwiGLU and
the down projection there write their gradients over activations only they read (swiglu.py, lora_linear.py). It
names its block (thread_scope.RECOMPUTED_BLOCK): a Llama-form layer's down projection, whose output only the
block's residual addition reads, then skips its base product (families.py).
A cache that already holds keys (a prefix the block attends to) runs the block unchecked. A block whose adapters
changed between forward and backward (a per_row block left, adapters switched) raises at its recompute.
"""

from __future__ import annotations

import contextlib
import sys

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..core.adapted import AdaptedLayer
from .scratch import kept_dense
from .thread_scope import RECOMPUTED_BLOCK, SINGLE_BACKWARD, ThreadScope
from .block_args import at_slots, grad_slots, tensors_of, with_args, with_tensors, without_caches

try:  # a sharded parameter (FSDP2) is one
    from torch.distributed.tensor import DTensor as _DTENSOR
except ImportError:  # torch without distributed
    _DTENSOR = None


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
    if not (block.training and torch.is_grad_enabled()) or RUN_PLAIN.active():
        return original(*args, **kwargs)
    args, kwargs, reads_cache = without_caches(args, kwargs)
    if reads_cache:
        return original(*args, **kwargs)
    by_name = not args
    hidden = kwargs.get("hidden_states") if by_name else args[0]
    rest = args[1:]
    named = {k: v for k, v in kwargs.items() if not (by_name and k == "hidden_states")}
    slots = grad_slots(hidden, rest, named) if isinstance(hidden, torch.Tensor) else None
    if slots is None or _hands_out_more(block, kwargs) or block.__dict__.get(OTHER_FORM_ATTR):
        return checkpoint(original, *args, use_reentrant=False, **kwargs)  # it carries the other gradients
    trained, state = block_state(block)
    if _DTENSOR is not None and any(isinstance(p, _DTENSOR) for p in trained):  # an FSDP2 unit inside the block
        return checkpoint(original, *args, use_reentrant=False, **kwargs)  # gathers these later: not node inputs
    if not (trained or hidden.requires_grad or slots):
        return original(*args, **kwargs)  # nothing in or before this block trains: nothing to recompute
    extras = at_slots(rest, named, slots)  # inputs of the node, as the hidden state is
    held = with_args(rest, named, slots, [None] * len(slots))  # the node holds those (saved, version-checked)
    form = []  # the forward's output, taken at once (a kept one would outlive offloading)

    def run(h, *extra):
        a, kw = with_args(*held, slots, extra) if slots else held
        out = original(h, *a, **kw)
        if not torch.is_grad_enabled():  # the forward, not the recompute
            form.append(out)
        return tensors_of(out) or (torch.empty(0, device=h.device),)  # another form: a placeholder

    run.block, run.state = block, state  # the recompute checks that the adapters are as they were
    run.rng = device_rng_state(hidden.device)  # what the forward draws from; the recompute draws it again
    outs = _run_node(block, offload, hidden, run, extras, trained)
    out = form.pop()
    if tensors_of(out) is not None:
        return with_tensors(out, outs)
    block.__dict__[OTHER_FORM_ATTR] = True  # e.g. a dict: that ran without autograd; again, drawing as it drew
    restore_device_rng(hidden.device, run.rng)
    return checkpoint(original, hidden, *rest, use_reentrant=False, **named)


def _run_node(block, offload: bool, hidden: torch.Tensor, run, extras: list, trained: list) -> tuple:
    """The block's output tensors from its autograd node (the other arguments that need gradients and the trained
    parameters are its inputs, so their gradients flow out of it)."""
    if not offload:
        return _RecomputedBlock.apply(hidden, len(extras), run, *extras, *trained)
    stashed: list = []
    version = hidden._version
    outs = _OffloadedBlock.apply(hidden, len(extras), run, stashed, block.__dict__.get(OVERLAP_ATTR, False),
                                 *extras, *trained)
    if version == hidden._version:  # the block leaves its input alone: its copy may overlap its compute
        block.__dict__.setdefault(OVERLAP_ATTR, True)
    else:  # the copy must finish before the block runs (the block writes its input in place)
        block.__dict__[OVERLAP_ATTR] = False
    outs[0].__dict__[STASH_ATTR] = stashed[0]  # the next block's input: its backward prefetches this one's
    return outs


def block_state(block: nn.Module) -> tuple:
    """(the block's parameters that need gradients, once each; what its adapted layers compute with: active
    adapters, disabled, merged, per_row routing)."""
    trained, seen, state = [], set(), []
    for m in block.modules():
        for p in m._parameters.values():
            if p is not None and p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                trained.append(p)
        if isinstance(m, AdaptedLayer):
            state.append((m.active, m.disabled, tuple(m.merged), m.routing))
    return trained, tuple(state)


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


CHECKPOINT_SLOT = "checkpoint"  # the patch slot of a checkpointed block's forward (optimize.py; core/patching.py)
# Entered by checkpoint_graphs.py while it captures a block's recompute: the block's plain forward runs, with autograd.
RUN_PLAIN = ThreadScope()
OVERLAP_ATTR = "_lorakit_offload_overlap"  # on a block: its input is not written in place, copies may overlap
OTHER_FORM_ATTR = "_lorakit_other_output_form"  # on a block: it returned neither a tensor nor a tuple or list
# starting with one, so it runs under torch's checkpoint
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
    """checkpoint="offload": as _RecomputedBlock, with the hidden state in host memory until the recompute (the
    other arguments that need gradients stay on the device)."""

    @staticmethod
    def forward(ctx, hidden, n_extra, run, stashed, overlap, *inputs):
        ctx.stash = _Stash(hidden)
        if not overlap:  # a block's first call, or one that writes its input: the copy first
            ctx.stash.wait()
        ctx.previous = hidden.__dict__.get(STASH_ATTR)  # the block before's input, when it fed this one
        stashed.append(ctx.stash)
        ctx.save_for_backward(*inputs[:n_extra])
        return _forward_node(ctx, hidden, run, inputs[:n_extra], inputs[n_extra:], keep_dense=True)

    @staticmethod
    def backward(ctx, *douts):
        if ctx.stash is None:
            raise RuntimeError("lorakit: a block checkpointed with checkpoint='offload' was backpropagated twice; its "
                               "input left host memory at the first backward (checkpoint=True allows several)")
        hidden = ctx.stash.take()
        if ctx.previous is not None:
            ctx.previous.prefetch()  # comes back while this block recomputes and backpropagates
        ctx.stash = ctx.previous = None
        d_hidden, *d_inputs = _recompute_and_backprop(ctx, hidden, ctx.saved_tensors, douts, 5, keep_dense=True)
        return d_hidden, None, None, None, None, *d_inputs


class _RecomputedBlock(torch.autograd.Function):
    """checkpoint=True: the block runs without autograd; its input stays on the device for the recompute. Inputs:
    the hidden state, how many other arguments that need gradients follow the run, those, the trained parameters."""

    @staticmethod
    def forward(ctx, hidden, n_extra, run, *inputs):
        ctx.save_for_backward(hidden, *inputs[:n_extra])  # autograd refuses them if changed in place since
        return _forward_node(ctx, hidden, run, inputs[:n_extra], inputs[n_extra:])

    @staticmethod
    def backward(ctx, *douts):
        hidden, *extras = ctx.saved_tensors
        d_hidden, *d_inputs = _recompute_and_backprop(ctx, hidden.detach(), extras, douts, 3)
        return d_hidden, None, None, *d_inputs


def _forward_node(ctx, hidden: torch.Tensor, run, extras: tuple, params: tuple, keep_dense: bool = False) -> tuple:
    """Both nodes' forward: the block without autograd; what the recompute needs kept on ctx. keep_dense: a 4-bit
    base's dense weights written once for the whole block (its MLP's sequence tiles share them)."""
    ctx.run, ctx.device, ctx.params = run, hidden.device, params
    ctx.rng, ctx.autocast = run.rng, autocast_state(hidden.device)
    ctx.set_materialize_grads(False)  # outputs no gradient reaches get None, not zeros
    with torch.no_grad(), kept_dense(keep_dense):
        return tuple(t.detach() for t in run(hidden, *extras))  # fresh tensors: a returned buffer stays untouched


def _recompute_and_backprop(ctx, hidden: torch.Tensor, extras, douts: tuple, first: int,
                            keep_dense: bool = False) -> list:
    """Run the block (ctx.run) again on its input and `extras` (the other arguments that need gradients, saved)
    with autograd, under the RNG state and autocast its forward ran under, and backpropagate the gradients of its
    output tensors (douts, None where none came) through it. keep_dense: a 4-bit base's dense weights, written
    once in the recompute, serve its backward too, and the recomputes inside that backward (an MLP's sequence
    tiles; scratch.kept_dense).
    Returns the gradients of the input, the extras and ctx.params (None where autograd asks for none);
    ctx.needs_input_grad[first:] are the extras' and the parameters'."""
    if block_state(ctx.run.block)[1] != ctx.run.state:
        raise RuntimeError("lorakit: a checkpointed block's adapters changed between its forward and its backward "
                           "(active, disabled or merged adapters, or a per_row block left): backpropagate where the "
                           "forward ran, or optimize without checkpoint")
    hidden.requires_grad_(ctx.needs_input_grad[0])  # not wanted: its dX is not computed
    extras = [e.detach().requires_grad_(True) for e in extras]  # leaves: each backward (retain_graph) gets its own
    with kept_dense(keep_dense):  # through the backward's own recomputes too
        with torch.random.fork_rng(devices=[ctx.device] if ctx.device.type == "cuda" else []), torch.enable_grad(), \
                _autocast(ctx.autocast), SINGLE_BACKWARD.entered(), RECOMPUTED_BLOCK.holding(ctx.run.block):
            restore_device_rng(ctx.device, ctx.rng)  # the graph runs one backward (below), then goes
            outs = ctx.run(hidden, *extras)  # ctx (and the call's other arguments in this closure) lives as the graph
        if len(outs) == 1:  # another output's op may have saved it
            _drop_values_if_unread(outs[0])
        pairs = [(o, d) for o, d in zip(outs, douts) if d is not None and o.requires_grad]
        wanted = [ctx.needs_input_grad[0]] + list(ctx.needs_input_grad[first:])
        inputs = [t for t, want in zip((hidden, *extras, *ctx.params), wanted) if want]
        got = iter(torch.autograd.grad([o for o, _ in pairs], inputs, [d for _, d in pairs], allow_unused=True)
                   if inputs and pairs else [None] * len(inputs))
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
