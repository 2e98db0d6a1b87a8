"""Training blocks replayed from CUDA graphs (`optimize(model, cuda_graphs=True)`): a host-bound step without the
host's work per kernel.

Why: a small model's training step is bound by the host, not the GPU. On an H200 the fused 1B Llama step (B8 T1024)
queues ~1,600 kernels, and torch's, transformers' and lorakit's Python around them takes about as long as the
device's work (BENCHMARKS.md); DoRA's extra kernels and their Python cost it more again. A CUDA graph replays a
block's kernels with one launch.

How, per block (core.blocks.checkpoint_units: the decoder layers) and per call signature (graph_for_call, which
checkpoint_graphs.py's form for checkpointed blocks shares):
- The signature: each tensor argument's shape, dtype, device and requires_grad; every other argument's value;
  the address, shape and strides of the block's parameters and buffers, and the version of the frozen ones (a
  weight written in place, merged or moved is another signature); what its adapted layers compute with (active
  adapters, disabled, merged, each delta's scalar settings such as scaling and its dropout's p, train or eval);
  autocast, the float32 matmul precision, deterministic algorithms, and whether lorakit's Triton kernels run.
- The first call with a signature runs as usual (kernels compile, caches fill). The second captures the block's
  forward and its backward (torch.autograd.grad over the block's inputs that need gradients and its trained
  parameters), after a warm-up on a side stream, in one memory pool per model. From then on the forward copies
  the call's tensors into the graph's static inputs, replays, and returns copies of the outputs; the backward
  copies the output gradients in, replays, and returns copies of the gradients. Copies, so that a gradient
  accumulated over micro-batches or an output the caller keeps never aliases memory that a later replay writes
  (one pass over the hidden states per block each way).
- Memory: each graph keeps its block's saved activations allocated (what an eager step holds at its peak, held
  between steps), and the pool's temporaries are shared by the graphs captured after them.
- The pool's order: a graph captured later may hold its saved activations where an earlier graph keeps
  temporaries. So a forward replays only while no block captured at or after it waits for its backward (two
  forwards before one backward: the second runs eagerly), and a backward that may have overwritten a waiting
  block's activations marks it: that block's backward then raises (lorakit.errors.LorakitError) rather than give
  wrong gradients. A second backward through one replay (retain_graph) raises too.
- Eager instead: outside training or without grad; under autocast with its cast cache (a capture would reuse a
  cast made before it, and replays would never cast the updated weights again), transformers' gradient
  checkpointing, torch.compile or another capture; a block where nothing trains and no input needs a gradient;
  process-wide module hooks or backward hooks in the block; a call that reads a key/value cache or asks for more
  than the output (output_* flags, transformers recording layer outputs); arguments other than tensors and plain
  values; a block with a weight source that cannot write its dense weight into a buffer (bitsandbytes'
  Linear4bit: its fused calls take the reference path), FSDP2 parameters, forward hooks, routed (per_row) layers
  or a sequence-tiled MLP (optimize's tile_mlp: its tiles read the generator's state) (graph_signature.py); a
  block that wrote an input in place or returned something other than tensors in its first call. A 4-bit base
  with lorakit's NF4 dequantises into scratch.py's buffer inside each graph; the graph keeps the buffer it
  captured. A capture that fails (an op that synchronises with the host inside the block) raises a LorakitError:
  torch's CUDA generator and allocator are left mid-capture, so the process cannot go on with that model.
- Randomness: torch's CUDA generator is graph-safe (each replay draws new numbers). lorakit's in-kernel dropout
  masks take a seed drawn on the host outside graphs; while capturing, the fused linear draws it into a device
  tensor with that generator instead, and the kernels read it there (dropout.draw_seed): every replay gets new
  masks, and forward and backward of one replay the same.
"""

from __future__ import annotations

import contextlib
import gc
import weakref
from collections import OrderedDict

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..errors import LorakitError
from . import scratch
from .block_args import without_caches
from .checkpoint import _hands_out_more, block_state
from .graph_signature import PLAIN, signature
from .wide import WIDE_ATTR

STATE_ATTR = "_lorakit_block_graphs"  # on a block: its _BlockGraphs
MAX_SIGNATURES = 2  # graphs kept per block (the oldest dropped): a fixed-shape loop needs one



class Pool:
    """One model's graphs: the memory pool, the capture stream, and the forwards whose backward is pending."""

    def __init__(self, device: torch.device, checkpointed: bool = False):
        self.checkpointed = checkpointed  # checkpoint_graphs.py's form: the blocks recompute in their backward
        # that form's static tensors, shared by its graphs: (role, index, shape, ...) → tensor, alive while a graph
        # holds it (graphs dropped for newer signatures free theirs)
        self.statics = weakref.WeakValueDictionary()
        self.handle = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream(device)
        self.captured = 0  # graphs captured so far: a graph's rank is its place in this order
        self.waiting: dict = {}  # rank of a forward graph → weakref to the token of its replay awaiting backward

    def newest_waiting(self) -> int:
        """The highest rank among forwards still awaiting their backward, or -1."""
        for rank in [r for r, ref in self.waiting.items() if ref() is None]:  # dropped without a backward
            del self.waiting[rank]
        return max(self.waiting, default=-1)


class _Token:
    """Held by one replay's autograd node until its backward; `overwritten` when another replay may have
    written over its saved activations."""

    overwritten = False


class _Graph:
    """A block's forward and backward graphs for one signature, with their static tensors."""

    def __init__(self, pool: Pool):
        self.pool = pool
        self.fwd, self.bwd = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        self.inputs: list = []  # static copies of the call's tensors
        self.params: tuple = ()  # the block's trained parameters (inputs of the replay's autograd node)
        self.outputs: list = []  # static outputs (flattened), kept with their autograd graph
        self.out_spec = None
        self.differentiable: list = []  # per output: whether it carries a gradient
        self.grad_outputs: list = []  # static output gradients (differentiable outputs only)
        self.grads: list = []  # static gradients: inputs that need one, then params (None: unused)
        self.wants: list = []  # per input (then per param): whether a gradient is returned
        self.fwd_rank = self.bwd_rank = -1
        self.wide_marks: list = []  # wide.py's host records of the block's widened weights
        self.kept_buffers: list = []  # scratch.py's buffers when captured (a 4-bit base's dense weights go there)


class _BlockGraphs:
    """Per block: the signatures seen once (run eagerly) and the captured graphs."""

    def __init__(self, pool: Pool):
        self.pool = pool
        self.seen: OrderedDict = OrderedDict()  # signature → None (seen once) or a _Graph
        self.refused = None  # why this block never runs from a graph (found at a call)
        self.replays = 0  # forwards replayed from a graph


def install(block: nn.Module, pool: Pool) -> None:
    """Give `block` its graph state (the forward patch is core.patching's, with graphed_forward)."""
    block.__dict__[STATE_ATTR] = _BlockGraphs(pool)


def uninstall(block: nn.Module) -> None:
    block.__dict__.pop(STATE_ATTR, None)


def graphed_forward(block: nn.Module, original, *args, **kwargs):
    """A block's forward from its graphs where they apply (module docstring), else `original`.

    Args:
        block: the patched block (install() gave it its state); original: its forward before the patch.
        args, kwargs: the block's own call arguments.
    Returns:
        What `original` returns (copies of the graph's outputs when replayed).
    """
    graph, got, spec = graph_for_call(block, original, args, kwargs, _capture)
    if graph is None:
        return got
    if graph.pool.newest_waiting() >= graph.fwd_rank:  # a waiting block's activations may lie in its temporaries
        args, kwargs = tree_unflatten(got, spec)  # the call as graph_for_call took it (empty caches left out)
        return original(*args, **kwargs)
    tensors = [t for t in got if isinstance(t, torch.Tensor)]
    block.__dict__[STATE_ATTR].replays += 1
    outs = _Replay.apply(graph, len(tensors), *tensors, *graph.params)
    return tree_unflatten(list(outs), graph.out_spec)


def graph_for_call(block: nn.Module, original, args: tuple, kwargs: dict, capture) -> tuple:
    """What serves this call (both graph forms: this module's and checkpoint_graphs.py's).

    Args:
        block, original, args, kwargs: as graphed_forward's.
        capture: capture(state, block, original, leaves, spec) -> a graph, or None (the block runs eagerly).
    Returns:
        (graph, the call's flattened arguments, their spec) to replay it, the arguments without the empty caches
        that without_caches leaves out; (None, output, None) when the call already ran here, eagerly (the module
        docstring's cases, and the first call with a signature).
    """
    state = block.__dict__.get(STATE_ATTR)
    if (state is None or state.refused or not (block.training and torch.is_grad_enabled())
            or getattr(block, "gradient_checkpointing", False)  # transformers' own: it would call us again
            or (torch.is_autocast_enabled("cuda") and torch.is_autocast_cache_enabled())  # a capture would reuse casts
            or torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing()):
        return None, original(*args, **kwargs), None
    args, kwargs, reads_cache = without_caches(args, kwargs)
    if reads_cache or _hands_out_more(block, kwargs):
        return None, original(*args, **kwargs), None
    leaves, spec = tree_flatten((args, kwargs))
    key = signature(block, leaves, spec)
    if key is None:
        return None, original(*args, **kwargs), None
    graph = state.seen.get(key)
    if graph is None:
        if key not in state.seen:  # first sight: run as usual, check that the call can be replayed
            state.seen[key] = None
            while len(state.seen) > MAX_SIGNATURES:
                state.seen.popitem(last=False)
            return None, _first_call(state, block, original, leaves, spec), None
        graph = capture(state, block, original, leaves, spec)
        if graph is None:
            return None, original(*args, **kwargs), None
        graph.kept_buffers = scratch.held()  # a 4-bit base's dense buffers the graph writes stay allocated
        state.seen[key] = graph
    return graph, leaves, spec


def _first_call(state: _BlockGraphs, block: nn.Module, original, leaves: list, spec):
    """Run the block as usual; refuse graphs for it when it writes an input in place or returns other than
    tensors (and plain values)."""
    tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
    versions = [t._version for t in tensors]
    args, kwargs = tree_unflatten(leaves, spec)
    checkpointed = state.pool is not None and state.pool.checkpointed  # its recompute must draw what it drew
    rng = torch.cuda.get_rng_state(tensors[0].device) if checkpointed and tensors else None
    out = original(*args, **kwargs)
    outs = tree_flatten(out)[0]
    if any(t._version != v for t, v in zip(tensors, versions)):
        state.refused = "it writes an input in place"
    elif rng is not None and not torch.equal(rng, torch.cuda.get_rng_state(tensors[0].device)):
        state.refused = "it draws from torch's CUDA generator (a recompute replayed from a graph would draw anew)"
    elif not any(isinstance(o, torch.Tensor) for o in outs) or \
            any(not isinstance(o, (torch.Tensor, *PLAIN)) for o in outs):
        state.refused = "it returns other than tensors"
    return out


def _capture(state: _BlockGraphs, block: nn.Module, original, leaves: list, spec):
    """Capture the block's forward and backward for this call's signature. A failed capture leaves torch's CUDA
    generator and allocator mid-capture, so it raises (LorakitError) instead of going on eagerly."""
    pool = state.pool
    graph = _Graph(pool)
    tensors = [(i, t) for i, t in enumerate(leaves) if isinstance(t, torch.Tensor)]
    graph.inputs = [t.detach().clone().requires_grad_(t.requires_grad) for _, t in tensors]
    graph.params = tuple(block_state(block)[0])
    graph.wants = [s.requires_grad for s in graph.inputs] + [True] * len(graph.params)
    wrt = [s for s in graph.inputs if s.requires_grad]  # then the params' stand-ins (stand_ins)
    if not wrt and not graph.params:  # nothing in or before it trains: no backward to capture
        state.refused = "nothing in it or before it needs a gradient"
        return None

    def call():
        filled = list(leaves)
        for (i, _), s in zip(tensors, graph.inputs):
            filled[i] = s
        args, kwargs = tree_unflatten(filled, spec)
        return original(*args, **kwargs)

    def backward(outs, grad_outputs):
        diff = [o for o, d in zip(outs, graph.differentiable) if d]
        return torch.autograd.grad(diff, wrt, grad_outputs, retain_graph=True, allow_unused=True)

    with stand_ins(block, graph.params) as aliases:
        wrt.extend(aliases)
        torch.cuda.synchronize()
        with torch.cuda.stream(pool.stream):  # a warm-up on a side stream (as torch's make_graphed_callables)
            warm, _ = tree_flatten(call())
            graph.differentiable = [isinstance(o, torch.Tensor) and o.requires_grad for o in warm]
            backward(warm, [torch.ones_like(o) for o, d in zip(warm, graph.differentiable) if d])
            del warm
        torch.cuda.synchronize()
        _record(graph, pool, call, backward)
    graph.wide_marks = wide_marks(block)
    graph.fwd_rank, graph.bwd_rank = pool.captured, pool.captured + 1
    pool.captured += 2
    return graph


def wide_marks(block: nn.Module) -> list:
    """wide.py's host records of the block's widened weights (a replay writes their spare columns)."""
    return [t.__dict__[WIDE_ATTR] for m in block.modules() for t in m._parameters.values()
            if t is not None and WIDE_ATTR in getattr(t, "__dict__", {})]


@contextlib.contextmanager
def stand_ins(block: nn.Module, params: tuple):
    """While capturing, each trained parameter of the block is replaced by a new leaf Parameter on the same
    memory (its attributes copied): the graphs read and differentiate the same storage, and autograd's
    accumulators of the real parameters, which a caller's live graph (last step's loss) keeps on the stream
    they were made on, never join the capture (a dependency on the default stream would fail it)."""
    alias = {id(p): nn.Parameter(p.detach(), requires_grad=True) for p in params}
    for p in params:
        alias[id(p)].__dict__.update(p.__dict__)
    swapped = []
    for m in block.modules():
        for name, p in m._parameters.items():
            if p is not None and id(p) in alias:
                swapped.append((m, name, p))
    for m, name, p in swapped:
        m._parameters[name] = alias[id(p)]
    try:
        yield [alias[id(p)] for p in params]
    finally:
        for m, name, p in swapped:
            m._parameters[name] = p


@contextlib.contextmanager
def no_collection():
    """Python's cyclic garbage collector off while a graph is captured: a collection there could free another
    model's graphs and their memory, a CUDA call that invalidates the capture."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _record(graph: _Graph, pool: Pool, call, backward) -> None:
    """Capture the forward, then the backward, into graph.fwd and graph.bwd."""
    try:
        with no_collection(), torch.cuda.graph(graph.fwd, pool=pool.handle):
            graph.outputs, graph.out_spec = tree_flatten(call())
        graph.grad_outputs = [torch.empty_like(o) for o, d in zip(graph.outputs, graph.differentiable) if d]
        with no_collection(), torch.cuda.graph(graph.bwd, pool=pool.handle):
            graph.grads = list(backward(graph.outputs, graph.grad_outputs))
    except Exception as error:  # an op that cannot be captured (a host synchronisation): torch's state is lost
        raise LorakitError(f"capturing a block as a CUDA graph failed ({type(error).__name__}: "
                           f"{str(error).splitlines()[0][:200]}); use optimize(model, cuda_graphs=False) for this "
                           "model") from error


def copied_outputs(ctx, graph) -> tuple:
    """A replay's outputs for its caller: copies of the graph's static outputs (plain values as they are), those
    that carry no gradient marked so."""
    outs = tuple(o.clone() if isinstance(o, torch.Tensor) else o for o in graph.outputs)
    ctx.mark_non_differentiable(*(o for o, d in zip(outs, graph.differentiable)
                                  if isinstance(o, torch.Tensor) and not d))
    return outs


class _Replay(torch.autograd.Function):
    """A graph's forward and backward as one autograd node over the call's tensors and the trained params."""

    @staticmethod
    def forward(ctx, graph: _Graph, n_tensors: int, *inputs):
        for static, t in zip(graph.inputs, inputs[:n_tensors]):
            if static.data_ptr() != t.data_ptr():
                static.copy_(t)
        graph.fwd.replay()
        for mark in graph.wide_marks:  # the replay wrote these spare columns: the next eager call zeroes them first
            mark[2] = None
        token = ctx.token = _Token()
        graph.pool.waiting[graph.fwd_rank] = weakref.ref(token)
        ctx.graph = graph
        return copied_outputs(ctx, graph)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        graph, token = ctx.graph, ctx.token
        if token.overwritten:
            raise LorakitError("a block replayed from a CUDA graph lost its saved activations to another block's "
                               "replay before its backward (backward through blocks out of their order, or twice "
                               "with retain_graph): use optimize(model, cuda_graphs=False) for this model")
        pool = graph.pool
        for rank, ref in pool.waiting.items():  # what this backward's temporaries may overwrite
            waiting = ref()
            if rank > graph.bwd_rank and waiting is not None:
                waiting.overwritten = True
        for static, g in zip(graph.grad_outputs, (g for g, d in zip(grads, graph.differentiable) if d)):
            if static.data_ptr() != g.data_ptr():
                static.copy_(g)
        graph.bwd.replay()
        if pool.waiting.get(graph.fwd_rank) is not None and pool.waiting[graph.fwd_rank]() is token:
            del pool.waiting[graph.fwd_rank]
        token.overwritten = True  # no longer watched: a second backward (retain_graph) is refused
        it = iter(graph.grads)
        out = [next(it) if want else None for want in graph.wants]
        return None, None, *(g.clone() if g is not None else None for g in out)
