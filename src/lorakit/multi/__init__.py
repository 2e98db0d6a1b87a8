"""Many adapters on one base: per-row routing of mixed batches, its kernels and CUDA-graph replay, hot-swap, exact
combination and the LoraHub-style weight search."""

from .combine import combine, weighted
from .lorahub import lorahub_search
from .hotswap import hot_swap
from .graphs import PerRowGraphs
from .routing import per_row

__all__ = ["per_row", "PerRowGraphs", "hot_swap", "combine", "weighted", "lorahub_search"]
