"""Hot-swap: replace a loaded adapter's weights in place from a directory.

    lorakit.hot_swap(model, "default", "adapters/customer-42")

Nothing is re-injected and nothing a compiled graph depends on changes: every parameter keeps its
identity, shape, dtype and device (values are written with copy_), and no Python attribute that forward
reads changes. A `torch.compile`d model therefore runs on without recompiling.

A low-rank delta (one that can hold any s·B·A: `Delta.factors_writable`) may swap in a smaller
rank (zero-padded: the extra rank rows of A and columns of B are 0) and another scale (another alpha:
the ratio new_scale / old_scale is folded into B, so the layer's Python scale stays); the new file is read
into a fresh delta, whose `low_rank_factors` are written with the loaded delta's `set_low_rank_factors`.
Modules the loaded adapter adapts but the new one does not get ΔW = 0. Any other delta swaps when the new
file builds deltas of the same shapes and constants. The adapter keeps its name, active state and config
(the new weights are expressed in the loaded rank and scaling).
Everything is checked before the first tensor is written; on an error the model is unchanged.
"""

from __future__ import annotations

import functools
import os
from typing import Callable, Union

import torch
from torch import nn

from ..core import files
from ..core.api import adapted_layers, get_config, plan_adapter, saved_modules
from ..core.originals import keep_originals
from ..errors import AdapterFormatError, HotSwapError
from .layer_plans import clear_stacks

_TEMP_NAME = "_lorakit_hot_swap"

# A write is a call that stores new values in place (nothing is written while the swap is being checked);
# a swapper checks one module and returns its writes, or raises.
Write = Callable[[], None]
Swapper = Callable[[nn.Module, "nn.Module | None", "dict[str, torch.Tensor] | None"], list[Write]]


@torch.no_grad()
def _copy(param: torch.Tensor, value: torch.Tensor) -> None:
    param.copy_(value.to(device=param.device, dtype=param.dtype))


def _low_rank_writes(old: nn.Module, fresh, tensors) -> list[Write]:
    """A delta holding any s·B·A: zero-pad a smaller rank, fold the scale ratio into B. fresh/tensors None:
    the new adapter skips this module, so ΔW = 0."""
    b_old, a_old, s_old = old.low_rank_factors()  # [out, r], [r, in·k]
    if fresh is None:
        return [functools.partial(old.set_low_rank_factors, b_old.new_zeros(b_old.shape[0], 0),
                                  a_old.new_zeros(0, a_old.shape[1]))]
    # in the file's own (widest) dtype: the values reach the loaded delta as if copied from the file directly
    fresh.to(functools.reduce(torch.promote_types, [t.dtype for t in tensors.values()])).load_peft_tensors(tensors)
    b_new, a_new, s_new = fresh.low_rank_factors()
    r_old, r_new = b_old.shape[1], b_new.shape[1]
    if r_new > r_old:
        raise HotSwapError(f"{old.module_name}: the new adapter's rank {r_new} is larger than the loaded rank "
                           f"{r_old}; load the largest-rank adapter first (or use load_adapter)")
    if tuple(a_new.shape) != (r_new, a_old.shape[1]) or b_new.shape[0] != b_old.shape[0]:
        raise HotSwapError(f"{old.module_name}: the new factors B {tuple(b_new.shape)} · A {tuple(a_new.shape)} do "
                           f"not fit the loaded ΔW [{b_old.shape[0]}, {a_old.shape[1]}]")
    ratio = s_new / s_old
    return [functools.partial(old.set_low_rank_factors, b_new.float() * ratio if ratio != 1.0 else b_new, a_new)]


def _constants(delta: nn.Module) -> dict:
    return {k: v for k, v in vars(delta).items()
            if not k.startswith("_") and k != "training" and isinstance(v, (bool, int, float, str, tuple))}


def _generic_writes(old: nn.Module, fresh, tensors) -> list[Write]:
    """Any variant: the same tensor shapes and the same constants (rank, scaling...), values copied."""
    if fresh is None:
        raise HotSwapError(f"{old.module_name}: the new adapter does not adapt this module, and "
                           f"{type(old).__name__} has no neutral value to swap in")
    mine, theirs = _constants(old), _constants(fresh)
    differ = sorted(k for k in mine.keys() | theirs.keys() if k != "module_name" and mine.get(k) != theirs.get(k))
    if differ:
        raise HotSwapError(f"{old.module_name}: the new {type(old).__name__} differs in {differ} "
                           f"({[mine.get(k) for k in differ]} → {[theirs.get(k) for k in differ]}); "
                           "only a low-rank delta (one that can hold any s·B·A) can change rank or scaling in place")
    writes = []
    for key, param in old.peft_tensors().items():
        if tuple(tensors[key].shape) != tuple(param.shape):
            raise HotSwapError(f"{old.module_name}.{key}: shape {tuple(tensors[key].shape)} ≠ {tuple(param.shape)}")
        writes.append(functools.partial(_copy, param, tensors[key]))
    return writes


# Delta class → swapper, for a variant with a rule of its own; the others take _low_rank_writes when they
# are low-rank deltas (Delta.factors_writable: they can hold any s·B·A), else _generic_writes.
SWAPPERS: dict[type, Swapper] = {}


def _plan_writes(model: nn.Module, name: str, directory) -> tuple[list[Write], list[nn.Parameter]]:
    """Every write the swap makes (all checks done), and the base parameters (biases) among their targets."""
    current = get_config(model, name)
    config = files.read_config(directory)
    if config.variant != current.variant:
        raise HotSwapError(f"adapter {name!r} is {current.variant}; {directory} holds {config.variant}")
    tensors = files.read_tensors(directory)
    plan = plan_adapter(model, config, _TEMP_NAME)
    per_delta, per_saved, biases = files.sort_and_check(model, plan, tensors, files.weights_file(directory))
    loaded = {path: layer.deltas[name] for path, layer in adapted_layers(model) if name in layer.deltas}
    extra = sorted(set(plan.deltas) - set(loaded))
    if extra:
        raise HotSwapError(f"the new adapter adapts modules that {name!r} does not ({extra[:4]}); hot-swap cannot "
                           "inject layers: load it with load_adapter")
    writes: list[Write] = []
    for path, old in loaded.items():
        fresh = plan.deltas.get(path)
        if fresh is not None and type(fresh) is not type(old):
            raise HotSwapError(f"{path}: {type(fresh).__name__} cannot replace {type(old).__name__}")
        swapper = SWAPPERS.get(type(old)) or (_low_rank_writes if old.factors_writable else _generic_writes)
        writes += swapper(old, fresh, per_delta.get(path))
    writes += _saved_writes(model, name, per_saved)
    writes += [functools.partial(_copy, param, t) for param, t in biases.values()]
    return writes, [param for param, _ in biases.values()]


def _saved_writes(model: nn.Module, name: str, per_saved: dict) -> list[Write]:
    have = {path: holder.copies[name] for path, holder in saved_modules(model) if name in holder.copies}
    if set(per_saved) != set(have):
        raise HotSwapError(f"modules_to_save differ: {name!r} has {sorted(have)}, the new adapter {sorted(per_saved)}")
    writes = []
    for path, sd in per_saved.items():
        current = have[path].state_dict(keep_vars=True)
        writes += [functools.partial(_copy, current[k], t) for k, t in sd.items()]
    return writes


@torch.no_grad()
def hot_swap(model: nn.Module, name: str, directory: Union[str, os.PathLike]) -> nn.Module:
    """Replace adapter `name`'s weights in place with those saved in `directory` (PEFT or lorakit layout).

    Same variant, same or fewer target modules, same or smaller rank (low-rank deltas, which can hold any s·B·A).
    Raises a LorakitError and leaves the model untouched when the new adapter does not fit. Returns the same
    model object."""
    layers = [layer for _, layer in adapted_layers(model)]
    if any(name in layer.merged for layer in layers):
        raise HotSwapError(f"adapter {name!r} is merged into the base weights; call lorakit.unmerge(model) first")
    try:
        writes, base_params = _plan_writes(model, name, directory)
    except (KeyError, IndexError) as e:  # a file whose keys fit no delta the way its config says
        raise AdapterFormatError(f"{directory}: tensors do not fit the adapter's config ({e})") from None
    keep_originals(model, name, base_params)  # delete_adapter / unload(merge=False) put the base biases back
    for write in writes:
        write()
    clear_stacks(model)
    return model


__all__ = ["hot_swap", "HotSwapError", "SWAPPERS"]
