"""`lorakit.optimize(model)`: install the fast paths on a model that has adapters (or none, to speed up
the frozen parts); `lorakit.unoptimize(model)` takes them out again.

What it does, each part switchable for measurement:
- every adapted linear gets `fast_path = lora_linear_fast_path` (the fused autograd function, for plain
  low-rank deltas with or without dropout, output-scaled deltas, dense or 4-bit bases, trained
  or frozen biases, under autocast or not; the reference path is taken at call time whenever the layer is
  merged, disabled, routed, has a delta of another form (see spec.py), adapters in another dtype than its
  base outside autocast, or a trained base weight);
- `group`: sibling projections that read one input (q/k/v, query/key/value; gate/up inside `glu`) run as
  one fused call;
- `norms`, `rope`, `glu`, `fused_loss`: the HF family patches of families.py (Triton on GPU, torch on CPU);
- `dropout`: on CPU the model's own dropout (its nn.Dropout modules, and transformers' sdpa attention dropout in
  the patched attention modules) draws the seeded hash masks instead of torch's scalar Bernoulli loop
  (model_dropout.py: the same keep probability from another random stream; the adapted layers' own dropout is
  the fused linear's);
- `wide`: the base weights of groups that read a patched RMSNorm's output (q/k/v, gate/up) get spare columns,
  so each output's LoRA term runs inside its base GEMM ([x | h]·[W | s·B]ᵀ, wide.py). The Parameters stay, with
  their values; their storage gets a row stride of in + E (E: the group's total rank, rounded up to 8);
  unoptimize() and unload() pack them back. "auto" (the default): on for a model on a CUDA device, except in a
  process group of several processes, where FSDP2's fully_shard refuses non-contiguous parameters (True: on
  there too, e.g. under DDP, and on CPU, where MKL runs these GEMMs slower than the plain form's two);
- `checkpoint`: False, True (recompute each block: the layers transformers would checkpoint, in both stacks of an
  encoder-decoder; else the longest list of repeated blocks) or "offload" (and keep its input in pinned CPU memory,
  copied on a side stream; the long-context mode); the fused loss then takes smaller chunks (memory first); in
  a Llama-form layer's recompute the down projection skips its unread base product (families.DECODER_FORMS);
- `tile_mlp`: gated MLPs run in sequence tiles (tiling.py) so that their [T, intermediate] tensors exist for
  one tile at a time: "auto" (the default under checkpoint="offload": tiles of ~256 MiB, sequences
  shorter than four tiles untiled), a number of rows per tile, or False;
- `cuda_graphs`: False (the default) or True: on a CUDA model in training, each block's forward and backward
  are captured as CUDA graphs at its second call with a signature and replayed from then on (block_graphs.py:
  what the signature covers, when a block runs eagerly instead, the memory it holds). For host-bound steps
  (small models, short sequences, many adapters' kernels). With checkpoint=True the forward without autograd
  and the recompute with its backward are the graphs (checkpoint_graphs.py: the 8B step at batch 1 that
  checkpointing makes fit, a 4-bit base's too); not with checkpoint="offload" or tile_mlp;
- `cpu_heap`: "auto" (the default: on for a model on the CPU) keeps freed memory in the process's heap (glibc's
  mmap and trim thresholds, cpu_heap.py), so the step's multi-MiB tensors stop paying page faults every step. It
  is a setting of the whole process, made once: unoptimize() leaves it.
The returned counts include "not_fused": the adapted layers that take the reference path (their reasons:
`fusion_report(model)`; `report=True` logs them to stderr through the `lorakit.fast` logger).
The reference path (`AdaptedLayer.reference_forward`) is never changed. Call it again after adding
adapters or layers: it is idempotent and only fills in what is missing.
Under DDP or FSDP2 call it before wrapping: it patches the model's own modules, DDP's reducer sees the
layers' own Parameters (the fused call takes them as inputs, grouped or not), and FSDP2 unshards a block's
parameters in its pre-forward hook, before the block's fused calls read them.
"""

from __future__ import annotations

from typing import Union

import torch
from torch import nn

from ..core.api import adapted_layers
from ..core.blocks import checkpoint_units
from ..core.patching import is_patched, patch_forward, unpatch_forward
from ..errors import ConfigError
from . import block_graphs, checkpoint_graphs
from . import cpu_heap as heap
from . import families
from .checkpoint import CHECKPOINT_SLOT, OTHER_FORM_ATTR, OVERLAP_ATTR, checkpointed_forward
from .families import TILE_ATTR
from .lora_linear import lora_linear_fast_path
from .report import fusion_report, log_report

GRAPHS_SLOT = "graphs"
CHECKPOINT_MODE_ATTR = "_lorakit_checkpoint_mode"  # on a checkpointed block: True or "offload"


def optimize(model: nn.Module, *, group: bool = True, norms: bool = True, rope: bool = True, glu: bool = True,
             fused_loss: bool = True, dropout: bool = True, checkpoint: Union[bool, str] = False,
             tile_mlp: Union[None, bool, int, str] = None,
             wide: Union[bool, str] = "auto", cpu_heap: Union[bool, str] = "auto", cuda_graphs: bool = False,
             report: bool = False) -> dict[str, int]:
    """Install fast paths in place; returns how many modules got each one, and "not_fused": how many adapted
    layers take the reference path (see fusion_report). report=True logs each of them with its reason.
    tile_mlp None: "auto" under checkpoint="offload", else off (see the module docstring)."""
    if checkpoint not in (False, True, "offload"):
        raise ConfigError(f"checkpoint must be False, True or 'offload', got {checkpoint!r}")
    if tile_mlp is None:
        tile_mlp = "auto" if checkpoint == "offload" else False
    if not (tile_mlp in (False, "auto") or (type(tile_mlp) is int and tile_mlp > 0)):
        raise ConfigError(f"tile_mlp must be False, 'auto' or a positive number of rows, got {tile_mlp!r}")
    widen = _wide_on(wide, model)  # checked before anything changes
    if cpu_heap not in (True, False, "auto"):
        raise ConfigError(f"cpu_heap must be True, False or 'auto', got {cpu_heap!r}")
    if cuda_graphs not in (True, False):
        raise ConfigError(f"cuda_graphs must be True or False, got {cuda_graphs!r}")
    _check_graph_forms(model, checkpoint, cuda_graphs, tile_mlp)
    counts = {"linear": 0}
    for _, layer in adapted_layers(model):
        if layer.ops.kind == "linear" and layer.fast_path is None:
            layer.fast_path = lora_linear_fast_path
            counts["linear"] += 1
    counts.update(families.install(model, group=group, norms=norms, rope=rope, glu=glu, fused_loss=fused_loss,
                                   dropout=dropout))
    counts["wide"] = families.widen_groups(model) if widen else 0
    counts["checkpoint"] = _install_checkpointing(model, checkpoint) if checkpoint else 0
    if counts["checkpoint"]:
        families.set_checkpointed_loss(model)
    counts["tiled_mlp"] = families.set_mlp_tiling(model, tile_mlp) if tile_mlp else 0
    counts["cuda_graphs"] = _install_graphs(model) if cuda_graphs and _on_device(model, "cuda") else 0
    on_cpu = cpu_heap is True or (cpu_heap == "auto" and _on_device(model, "cpu"))
    counts["cpu_heap"] = int(on_cpu and heap.keep_freed_memory())
    rows = fusion_report(model)
    counts["not_fused"] = len(rows)
    if report:
        log_report(rows)
    return counts


def _on_device(model: nn.Module, device_type: str) -> bool:
    first = next(model.parameters(), None)
    return first is not None and first.device.type == device_type


def _wide_on(wide: Union[bool, str], model: nn.Module) -> bool:
    if wide not in (True, False, "auto"):
        raise ConfigError(f"wide must be True, False or 'auto', got {wide!r}")
    if wide != "auto":
        return wide
    if not _on_device(model, "cuda"):  # MKL runs the strided K = in + R GEMMs slower than the plain form's two
        return False
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)


def _check_graph_forms(model: nn.Module, checkpoint: Union[bool, str], cuda_graphs: bool, tile_mlp) -> None:
    """Refuse, before anything changes, what CUDA graphs cannot take: checkpoint="offload" (its copies to host
    memory run on a side stream), sequence-tiled MLPs (their tiles read the generator's state), and checkpointing
    blocks that an earlier call already gave graphs without it (its patch would sit beneath the graphs')."""
    offload = ConfigError("cuda_graphs=True combines with checkpoint=True, not with checkpoint='offload' (its "
                          "copies to host memory run on a side stream, outside any graph)")
    if cuda_graphs and checkpoint == "offload":
        raise offload
    blocks = checkpoint_units(model)
    for block in blocks if (cuda_graphs or checkpoint) else ():
        mode = block.__dict__.get(CHECKPOINT_MODE_ATTR, False)
        if checkpoint and not mode and is_patched(block, GRAPHS_SLOT):
            raise ConfigError("the blocks already replay from CUDA graphs without checkpointing: call "
                              "lorakit.unoptimize(model), then optimize with both checkpoint and cuda_graphs")
        if cuda_graphs and mode == "offload":
            raise offload
    tiled = any(m.__dict__.get(TILE_ATTR) for m in model.modules())  # by an earlier call
    graphed = any(is_patched(b, GRAPHS_SLOT) for b in blocks)
    if (cuda_graphs and (tile_mlp or tiled)) or (tile_mlp and graphed):
        raise ConfigError("cuda_graphs=True does not take tile_mlp (its tiles read the generator's state, which a "
                          "capture forbids): leave tile_mlp off, or unoptimize(model) first")


def _install_checkpointing(model: nn.Module, mode: Union[bool, str]) -> int:
    count = 0
    for block in checkpoint_units(model):
        if patch_forward(block, checkpointed_forward, mode == "offload", slot=CHECKPOINT_SLOT):
            block.__dict__[CHECKPOINT_MODE_ATTR] = mode  # what the graphs' form follows (_install_graphs)
            count += 1
    return count


def _install_graphs(model: nn.Module) -> int:
    """Graph patches on the blocks: checkpoint_graphs.py's form on checkpointed blocks (the model's blocks are
    all checkpointed or none), block_graphs.py's on the others; none on offloaded blocks or a model on several
    devices (one pool and capture stream per model)."""
    if len({p.device for p in model.parameters()}) > 1:
        return 0
    blocks = checkpoint_units(model)
    modes = {block.__dict__.get(CHECKPOINT_MODE_ATTR, False) for block in blocks}
    if "offload" in modes or len(modes) > 1:  # (offload is refused before: _check_graph_forms)
        return 0
    checkpointed = True in modes
    forward = checkpoint_graphs.checkpointed_graphed_forward if checkpointed else block_graphs.graphed_forward
    pool = None
    count = 0
    for block in blocks:
        if patch_forward(block, forward, slot=GRAPHS_SLOT):
            pool = pool or block_graphs.Pool(next(model.parameters()).device, checkpointed)
            block_graphs.install(block, pool)
            count += 1
    return count


def unoptimize(model: nn.Module) -> None:
    """Remove every fast path and patch that optimize() installed (the model computes as before)."""
    for _, layer in adapted_layers(model):
        if layer.fast_path is lora_linear_fast_path:
            layer.fast_path = None
    for m in model.modules():  # the graphs' and checkpoint patches went on last: they come off first
        unpatch_forward(m, slot=GRAPHS_SLOT)
        block_graphs.uninstall(m)
        unpatch_forward(m, slot=CHECKPOINT_SLOT)
        m.__dict__.pop(CHECKPOINT_MODE_ATTR, None)
        m.__dict__.pop(OVERLAP_ATTR, None)
        m.__dict__.pop(OTHER_FORM_ATTR, None)
    families.uninstall(model)
