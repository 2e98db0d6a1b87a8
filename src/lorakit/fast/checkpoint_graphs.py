"""Checkpointed blocks replayed from CUDA graphs (`optimize(model, checkpoint=True, cuda_graphs=True)`).

Why: a large model trained at batch 1 on one GPU checkpoints its blocks to fit, and its step is then bound by the
host: at the Llama-3-8B shape, B1 T2048, r16 all-linear, on an H200 the bf16 step's kernels take ~155 ms of a
~207 ms step and the NF4 (QLoRA) step's ~176 ms of ~261 ms (BENCHMARKS.md). checkpoint.py's blocks run their
forward without autograd and recompute it in their backward, and both passes are host work per kernel.

How (block_graphs.graph_for_call decides when a call may run from a graph: the same signature, eager cases and
first call as block_graphs.py's form): at a signature's second call two graphs are captured, after a warm-up on
the pool's side stream:
- forward: the block's plain forward without autograd (checkpoint.py's forward does the same);
- backward: the block's plain forward again with autograd (the recompute), then torch.autograd.grad over the
  call's tensors that need a gradient and the block's trained parameters (stand-ins on the same memory while
  capturing, as block_graphs.py's).
Each replay copies the call's tensors into static inputs; the forward graph copies its outputs into static
outputs and its replay returns copies; the autograd node keeps the call's tensors (the block input, as
checkpoint=True keeps it) and its backward copies them in again with the output gradients, replays, and returns
copies of the gradients. The static inputs, outputs and gradients of the same role and shape are one tensor
shared by every block of the model, and nothing a graph computes lives past its replay but its few dropout seeds
(below): the pool holds one block's recompute and backward at a time, which an eager step needs at its peak too.
So graphs may replay in any order, and a forward may run twice before its backwards (a sequence-tiled MLP runs
eagerly: graph_signature.py).
Dropout: lorakit's in-kernel masks take their seeds from device tensors the forward graph draws
(dropout.draw_seed); the recompute's capture reads the same tensors (dropout.seed_tape), and each replay keeps a
copy of its seeds for its backward, so the recompute drops what the forward dropped. A block that draws from
torch's CUDA generator (attention dropout) runs eagerly: its recompute, another graph, would draw anew.
A 4-bit base dequantises into scratch.py's buffer inside each graph, as the eager path does; a graph keeps the
buffer it captured (block_graphs.graph_for_call).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..errors import LorakitError
from .block_graphs import STATE_ATTR, copied_outputs, graph_for_call, no_collection, stand_ins, wide_marks
from .checkpoint import RUN_PLAIN, block_state
from .dropout import seed_tape
from .thread_scope import RECOMPUTED_BLOCK, SINGLE_BACKWARD


class _Graph:
    """One block's graphs for one signature: static tensors (shared by role and shape across the model's blocks)
    and what the replays need to know."""

    def __init__(self, pool, block: nn.Module):
        self.pool, self.block = pool, weakref.ref(block)  # the block holds its graphs: no reference cycle
        self.fwd, self.bwd = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        self.inputs: list = []  # static input per tensor of the call
        self.needs: list = []  # per tensor of the call: whether it needs a gradient
        self.params: tuple = ()  # the block's trained parameters (inputs of the replay's node)
        self.outputs: list = []  # per output leaf: its static tensor, or the plain value it always is
        self.out_spec = None
        self.differentiable: list = []  # per output leaf: whether a gradient flows back through it
        self.grad_outputs: list = []  # static output gradients (differentiable outputs only)
        self.input_grads: list = []  # per tensor of the call: its static gradient, or None (none wanted or none flows)
        self.param_grads: list = []  # per trained parameter: its static gradient, or None (unused)
        self.seeds: list = []  # dropout seed tensors the forward graph draws and the backward graph reads
        self.adapters = None  # block_state's adapter state when captured
        self.wide_marks: list = []
        self.kept_buffers: list = []


def checkpointed_graphed_forward(block: nn.Module, original, *args, **kwargs):
    """A checkpointed block's forward from its graphs where they apply, else `original` (checkpoint.py's
    forward: patched beneath this one).

    Args:
        block: the patched block (block_graphs.install gave it its state, in a Pool with checkpointed=True).
        original: the forward beneath this patch. args, kwargs: the block's own call arguments.
    Returns:
        What `original` returns (copies of the graph's outputs when replayed).
    """
    graph, got, _ = graph_for_call(block, original, args, kwargs, _capture)
    if graph is None:
        return got
    tensors = [t for t in got if isinstance(t, torch.Tensor)]
    block.__dict__[STATE_ATTR].replays += 1
    outs = _ReplayRecomputed.apply(graph, len(tensors), *tensors, *graph.params)
    return tree_unflatten(list(outs), graph.out_spec)


def _shared(pool, role: str, index: int, like: torch.Tensor) -> torch.Tensor:
    """The model's static tensor for (role, index) in like's shape, dtype, device and strides (made outside any
    capture; kept while a graph holds it)."""
    key = (role, index, tuple(like.shape), like.stride(), like.dtype, like.device)
    static = pool.statics.get(key)  # (a weak mapping: the graphs that hold a static keep it)
    if static is None:
        static = pool.statics[key] = torch.empty_like(like, memory_format=torch.preserve_format)
    return static


def _capture(state, block: nn.Module, original, leaves: list, spec):
    """Capture the block's forward (without autograd) and its recompute with backward for this signature (see
    the module docstring). A failed capture raises LorakitError, as block_graphs.py's does; None where the block
    runs eagerly (state.refused says why)."""
    pool = state.pool
    graph = _Graph(pool, block)
    slots = [i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor)]
    graph.inputs = [_shared(pool, "in", n, leaves[i]) for n, i in enumerate(slots)]
    for static, i in zip(graph.inputs, slots):
        static.copy_(leaves[i])
    graph.needs = [leaves[i].requires_grad for i in slots]
    graph.params, graph.adapters = block_state(block)
    graph.params = tuple(graph.params)
    if not (any(graph.needs) or graph.params):
        state.refused = "nothing in it or before it needs a gradient"
        return None

    def call(grad: bool) -> list:
        filled = list(leaves)
        wrt = []
        for n, i in enumerate(slots):
            filled[i] = graph.inputs[n]
            if grad and graph.needs[n]:
                filled[i] = graph.inputs[n].detach().requires_grad_(True)
                wrt.append(filled[i])
        args, kwargs = tree_unflatten(filled, spec)
        if not grad:
            with torch.no_grad():
                return tree_flatten(original(*args, **kwargs)), wrt
        with torch.enable_grad(), RUN_PLAIN.entered(), SINGLE_BACKWARD.entered(), RECOMPUTED_BLOCK.holding(block):
            return tree_flatten(original(*args, **kwargs)), wrt

    def recompute_and_backward(params: list, grad_outputs=None) -> tuple:
        (outs, _), wrt = call(grad=True)
        diff = [o for o, d in zip(outs, graph.differentiable) if d]
        if grad_outputs is None:  # the warm-up
            grad_outputs = [torch.ones_like(o) for o in diff]
        return torch.autograd.grad(diff, wrt + params, grad_outputs, allow_unused=True)

    with stand_ins(block, graph.params) as params:
        torch.cuda.synchronize()
        with torch.cuda.stream(pool.stream):  # a warm-up on a side stream (as torch's make_graphed_callables)
            (outs, _), _ = call(grad=False)
            (recomputed, _), _ = call(grad=True)
            graph.differentiable = [isinstance(o, torch.Tensor) and o.requires_grad for o in recomputed]
            del recomputed
            if any(graph.differentiable):
                recompute_and_backward(params)
        torch.cuda.synchronize()
        if not any(graph.differentiable):
            state.refused = "no output of it carries a gradient"
            return None
        graph.outputs = [_shared(pool, "out", n, o) if isinstance(o, torch.Tensor) else o for n, o in enumerate(outs)]
        graph.grad_outputs = [_shared(pool, "grad_out", n, o) for n, (o, d)
                              in enumerate(zip(outs, graph.differentiable)) if d]
        graph.input_grads = [_shared(pool, "grad_in", n, graph.inputs[n]) if need else None
                             for n, need in enumerate(graph.needs)]
        graph.param_grads = [_shared(pool, "grad_param", k, p.detach()) for k, p in enumerate(graph.params)]
        del outs
        if not _record(graph, call, recompute_and_backward, params):
            state.refused = "its recompute draws other dropout seeds than its forward"
            return None
    graph.wide_marks = wide_marks(block)
    return graph


def _record(graph: _Graph, call, recompute_and_backward, params: list) -> bool:
    """Capture both graphs; their results go into the shared statics, so the pool keeps nothing of theirs but the
    forward's dropout seeds.
    Returns False when the recompute drew another number of dropout seeds than the forward (the graphs are then
    not used: the block runs eagerly)."""
    pool = graph.pool
    try:
        with no_collection(), torch.cuda.graph(graph.fwd, pool=pool.handle), seed_tape(graph.seeds, replay=False):
            (outs, graph.out_spec), _ = call(grad=False)
            for static, o in zip(graph.outputs, outs):
                if isinstance(o, torch.Tensor):
                    static.copy_(o)
            del outs
        with no_collection(), torch.cuda.graph(graph.bwd, pool=pool.handle), \
                seed_tape(graph.seeds, replay=True) as taken:
            grads = list(recompute_and_backward(params, graph.grad_outputs))
            n_in = sum(graph.needs)
            wanted = [n for n, need in enumerate(graph.needs) if need]
            for n, g in zip(wanted, grads[:n_in]):
                if g is None:  # an input the block's outputs do not depend on: no gradient, as eagerly
                    graph.input_grads[n] = None
                else:
                    graph.input_grads[n].copy_(g)
            for k, g in enumerate(grads[n_in:]):
                if g is None:  # a parameter the block does not use: its gradient stays None
                    graph.param_grads[k] = None
                else:
                    graph.param_grads[k].copy_(g)
            del grads
            asked = taken()
    except Exception as error:  # torch's generator and allocator are left mid-capture
        raise LorakitError(f"capturing a checkpointed block as CUDA graphs failed ({type(error).__name__}: "
                           f"{str(error).splitlines()[0][:200]}); use optimize(model, cuda_graphs=False) for this "
                           "model") from error
    return asked == len(graph.seeds)


class _ReplayRecomputed(torch.autograd.Function):
    """The forward graph's replay as one autograd node over the call's tensors and the trained parameters; its
    backward replays the recompute-and-backward graph on the tensors it kept."""

    @staticmethod
    def forward(ctx, graph: _Graph, n_tensors: int, *inputs):
        tensors = inputs[:n_tensors]
        _fill(graph.inputs, tensors)
        graph.fwd.replay()
        for mark in graph.wide_marks:  # the replay wrote these spare columns: the next eager call zeroes them first
            mark[2] = None
        # This replay's seeds, for its recompute. They lie in the pool, where graphs captured before this one keep
        # temporaries, so another block's replay may overwrite them before this backward: it copies them back.
        ctx.seeds = torch.cat(graph.seeds) if graph.seeds else None
        ctx.graph = graph
        ctx.set_materialize_grads(False)  # an output no gradient reaches: None, a zeroed static below
        ctx.save_for_backward(*tensors)  # the block's input, as checkpoint=True keeps it (version-checked)
        return copied_outputs(ctx, graph)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        graph = ctx.graph
        block = graph.block()
        if block is None:
            raise LorakitError("a checkpointed block replayed from a CUDA graph was freed before its backward")
        if block_state(block)[1] != graph.adapters:
            raise RuntimeError("lorakit: a checkpointed block's adapters changed between its forward and its "
                               "backward (active, disabled or merged adapters, or a per_row block left): "
                               "backpropagate where the forward ran, or optimize without checkpoint")
        _fill(graph.inputs, ctx.saved_tensors)
        _fill(graph.grad_outputs, [g for g, d in zip(grads, graph.differentiable) if d])
        if ctx.seeds is not None:
            _fill(graph.seeds, ctx.seeds.split(1))
        graph.bwd.replay()
        for mark in graph.wide_marks:
            mark[2] = None
        d_inputs = [g.clone() if g is not None else None for g in graph.input_grads]
        d_params = [g.clone() if g is not None else None for g in graph.param_grads]
        return None, None, *d_inputs, *d_params


def _fill(statics: list, values) -> None:
    """Copy each value into its static tensor (an output gradient that autograd did not materialise: zeros)."""
    for static, value in zip(statics, values):
        if value is None:
            static.zero_()
        else:
            static.copy_(value)
