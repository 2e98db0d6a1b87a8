"""An adapter directory's deltas without the base model: each on a stand-in layer of the right shape.

The files hold only the adapter's tensors, so the base layer each delta belongs to (kind, out, in,
kernel) is found by building the variant's own Delta for candidate shapes on the `meta` device (no
memory) until its `peft_tensors()` shapes equal the saved ones, the same check `load_adapter` makes. No
variant is named here: any registered variant works, LoRA, LoHa, LoKr, AdaLoRA alike.

The stand-in base weight is NaN (a zero-memory expanded scalar): ΔW of a variant that needs W (DoRA)
comes out NaN, and the analysis asks for `--base` instead of reporting numbers made up from a fake W.
"""

from __future__ import annotations

import itertools
import re
from typing import Callable, Optional

import torch
from torch import nn

from ..core.adapted import AdaptedLayer
from ..core.config import AdapterConfig
from ..errors import AdapterFormatError
from ..core.files import PREFIX
from ..core.layers import ops_for
from ..core.registry import delta_class

# Kinds of stand-in layer: (out, n, kernel) → module on `meta`. Canonical sizes: out = output features,
# n = input features (an embedding's vocabulary), kernel = a convolution's kernel size.
KINDS: dict[str, tuple[int, Callable[[int, int, tuple], nn.Module]]] = {
    "linear": (0, lambda out, n, k: nn.Linear(n, out, bias=False, device="meta")),
    "embedding": (0, lambda out, n, k: nn.Embedding(n, out, device="meta")),
    "conv1d": (1, lambda out, n, k: nn.Conv1d(n, out, k, bias=False, device="meta")),
    "conv2d": (2, lambda out, n, k: nn.Conv2d(n, out, k, bias=False, device="meta")),
    "conv3d": (3, lambda out, n, k: nn.Conv3d(n, out, k, bias=False, device="meta")),
}
Shapes = dict[str, tuple[int, ...]]


def _expected(config: AdapterConfig, path: str, kind: str, out: int, n: int, kernel: tuple) -> Optional[Shapes]:
    """The shapes the variant's delta would have on a layer of that kind and size; None if it refuses it."""
    try:
        delta = delta_class(config)(ops_for(KINDS[kind][1](out, n, kernel)), config, path)
    except (ValueError, RuntimeError, TypeError, NotImplementedError):  # TargetError is a ValueError
        return None
    return {key: tuple(t.shape) for key, t in delta.peft_tensors().items()}


# Probe sizes for collecting key names: some variants name their tensors by size (LoKr keeps a full factor
# where the rank would not save anything), so small and large layers are both probed.
PROBE_SIZES = ((2, 3), (12, 20), (96, 160), (1536, 4096))
# Distinct primes, larger than any rank: where they land in the expected shapes says which saved dimension
# is out, which is n, and which is the kernel.
SOLVE_OUT, SOLVE_N, SOLVE_KERNEL = 10007, 10009, (1009, 1013, 1019)  # meta numel stays < 2**63


def suffix_sets(config: AdapterConfig) -> list[tuple[str, frozenset]]:
    """(kind, a set of PEFT key suffixes a delta has on that kind), probed on meta layers of several sizes."""
    out = []
    for kind, (nd, _) in KINDS.items():
        for (o, n), size in itertools.product(PROBE_SIZES, (1, 3) if nd else (1,)):
            shapes = _expected(config, "probe", kind, o, n, (size,) * nd)
            if shapes is not None and (kind, frozenset(shapes)) not in out:
                out.append((kind, frozenset(shapes)))
    return out


def group_tensors(tensors: dict[str, torch.Tensor], config: AdapterConfig):
    """({module path: {suffix: tensor}}, {key: tensor} of everything else: modules_to_save, biases)."""
    suffixes = sorted({s for _, keys in suffix_sets(config) for s in keys}, key=len, reverse=True)
    per_path: dict[str, dict[str, torch.Tensor]] = {}
    rest: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        bare = key[len(PREFIX):] if key.startswith(PREFIX) else key
        suffix = next((s for s in suffixes if bare.endswith("." + s)), None)
        if suffix is None:
            rest[key] = t
        else:
            per_path.setdefault(bare[: -len(suffix) - 1], {})[suffix] = t
    return per_path, rest


def _candidate_sizes(shapes: Shapes) -> list[int]:
    """Sizes out and n may have: every saved dimension, then products of two (factorised variants)."""
    dims = sorted({d for s in shapes.values() for d in s})
    products = sorted({a * b for a, b in itertools.combinations_with_replacement(dims, 2)} - set(dims))
    return dims + products


def infer_layer(config: AdapterConfig, path: str, shapes: Shapes, cache: dict) -> tuple[str, int, int, tuple]:
    """(kind, out, n, kernel) of the base layer that gives exactly these saved shapes."""
    signature = tuple(sorted(shapes.items()))
    if signature not in cache:
        cache[signature] = _search(config, path, shapes)
    found = cache[signature]
    if found is None:
        raise AdapterFormatError(f"{path}: cannot tell the base layer's shape from the saved tensors "
                                 f"{dict(shapes)}; pass the base model (--base) to analyse this adapter")
    return found


def _solve(config: AdapterConfig, path: str, kind: str, nd: int, shapes: Shapes) -> Optional[tuple[int, int, tuple]]:
    """Read (out, n, kernel) off the saved shapes where the delta's shapes contain out, n and kernel as such."""
    probe = _expected(config, path, kind, SOLVE_OUT, SOLVE_N, SOLVE_KERNEL[:nd])
    if probe is None or set(probe) != set(shapes):
        return None
    found: dict[int, int] = {}
    for key, expected in probe.items():
        if len(expected) != len(shapes[key]):
            return None
        for e, d in zip(expected, shapes[key]):
            if e in (SOLVE_OUT, SOLVE_N, *SOLVE_KERNEL[:nd]):
                found[e] = d
    if SOLVE_OUT not in found or SOLVE_N not in found or any(k not in found for k in SOLVE_KERNEL[:nd]):
        return None
    return found[SOLVE_OUT], found[SOLVE_N], tuple(found[k] for k in SOLVE_KERNEL[:nd])


def _search(config: AdapterConfig, path: str, shapes: Shapes):
    """Solve for the sizes directly; failing that (factorised shapes, as LoKr's), try candidate sizes."""
    ndim = max(len(s) for s in shapes.values())
    kinds = [(kind, nd) for kind, (nd, _) in KINDS.items() if ndim >= nd + 2 or nd == 0]
    for kind, nd in kinds:
        solved = _solve(config, path, kind, nd, shapes)
        if solved is not None and _expected(config, path, kind, *solved) == shapes:
            return (kind, *solved)
    sizes = _candidate_sizes(shapes)
    for kind, nd in kinds:
        kernels = sorted({s[-nd:] for s in shapes.values() if len(s) >= nd + 2}, reverse=True) if nd else [()]
        for kernel in kernels:
            for out, n in itertools.product(sizes, sizes):
                if _expected(config, path, kind, out, n, kernel) == shapes:
                    return kind, out, n, kernel
    return None


def standin_layer(kind: str, out: int, n: int, kernel: tuple) -> AdaptedLayer:
    """An adapted layer around a CPU module whose weight is NaN everywhere and takes no memory."""
    layer = KINDS[kind][1](out, n, kernel)
    nan = torch.full((), float("nan")).expand(layer.weight.shape)
    layer.weight = nn.Parameter(nan, requires_grad=False)
    return AdaptedLayer(layer)


def natural_key(path: str) -> list:
    """Sort "layer.2" before "layer.10"."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path)]
