"""Which module forms the fast paths may take over: a module's forward compared with transformers' own classes,
statement for statement (families.py patches only those), and whether a forward hook could see a module's call."""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import textwrap
from typing import Optional

from torch import nn

_BODIES: dict = {}  # class → its forward's statements as text (None when the source cannot be read)


class _Rename(ast.NodeTransformer):
    def __init__(self, old: str):
        self.old = old

    def visit_Name(self, node):
        return ast.Name("x", node.ctx) if node.id == self.old else node


def forward_body(cls) -> Optional[str]:
    """cls.forward's statements, normalised by the ast (formatting, comments and the docstring dropped, the first
    argument after self named x)."""
    if cls not in _BODIES:
        try:
            fn = ast.parse(textwrap.dedent(inspect.getsource(inspect.unwrap(cls.forward)))).body[0]
            stmts = fn.body
            if stmts and isinstance(stmts[0], ast.Expr) and isinstance(stmts[0].value, ast.Constant):
                stmts = stmts[1:]
            rename = _Rename(fn.args.args[1].arg)
            _BODIES[cls] = "\n".join(ast.unparse(rename.visit(st)) for st in stmts)
        except (OSError, TypeError, SyntaxError, IndexError, AttributeError):
            _BODIES[cls] = None
    return _BODIES[cls]


@functools.lru_cache(maxsize=None)
def known_bodies(forms: tuple) -> frozenset:
    """The forward bodies of transformers' classes `forms` ((family, class name), ...) that this install has."""
    bodies = set()
    for family, name in forms:
        try:
            module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        except ImportError:
            continue
        body = forward_body(getattr(module, name))
        if body is not None:
            bodies.add(body)
    return frozenset(bodies)


def seen_by_hooks(*modules) -> bool:
    """Whether a forward hook could see these modules' inputs or outputs (their own, or global ones)."""
    return bool(nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks
                or any(m._forward_hooks or m._forward_pre_hooks for m in modules))
