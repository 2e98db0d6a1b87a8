"""A per-thread, nestable "inside" flag: how a patched forward tells a wrapped library function, several calls
down, that the call comes from inside it (positions.no_packed_check, model_dropout.attention_scope); and a
per-thread value held for a block's duration (which checkpointed block is being recomputed)."""

from __future__ import annotations

import contextlib
import threading


class ThreadScope:
    """`with scope.entered():` marks this thread as inside until the block ends (nesting counts); `scope.active()`
    tells whether it is. Other threads never see it."""

    def __init__(self) -> None:
        self._local = threading.local()

    @contextlib.contextmanager
    def entered(self):
        depth = getattr(self._local, "depth", 0)
        self._local.depth = depth + 1
        try:
            yield
        finally:
            self._local.depth = depth

    @contextlib.contextmanager
    def left(self):
        """`with scope.left():` marks this thread as outside until the block ends, whatever the nesting."""
        depth = getattr(self._local, "depth", 0)
        self._local.depth = 0
        try:
            yield
        finally:
            self._local.depth = depth

    def active(self) -> bool:
        return getattr(self._local, "depth", 0) > 0


# Entered by fast/checkpoint.py around a block's recompute (the forward that builds the graph its backward then runs
# once and drops), and by fast/checkpoint_graphs.py around the recompute it captures, so an op recorded there may
# write its gradients over the activations it saved (swiglu.py, lora_linear.py). families.py leaves it for a gated
# MLP whose projections have forward hooks.
SINGLE_BACKWARD = ThreadScope()


class ThreadValue:
    """`with value.holding(v):` makes `value.get()` give v on this thread until the block ends (then what it gave
    before); None outside. Other threads never see it."""

    def __init__(self) -> None:
        self._local = threading.local()

    @contextlib.contextmanager
    def holding(self, value):
        before = getattr(self._local, "value", None)
        self._local.value = value
        try:
            yield
        finally:
            self._local.value = before

    def get(self):
        return getattr(self._local, "value", None)


# The checkpointed block whose recompute runs on this thread (fast/checkpoint.py, fast/checkpoint_graphs.py): in it,
# families.py lets a gated MLP whose output only that block's residual addition reads skip its down projection's
# base product.
RECOMPUTED_BLOCK = ThreadValue()
