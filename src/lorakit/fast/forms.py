"""Which module forms the fast paths may take over: a module's forward compared with transformers' own classes,
statement for statement (families.py patches only those), and whether a hook could see a module's call."""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import textwrap
from typing import Optional

from torch import nn

_BODIES: dict = {}  # class → its forward's statements as text (None when the source cannot be read)
_FUNCTION_BODIES: dict = {}  # code object → its statements as text (None when the source cannot be read)


class _Rename(ast.NodeTransformer):
    def __init__(self, old: str):
        self.old = old

    def visit_Name(self, node):
        return ast.Name("x", node.ctx) if node.id == self.old else node


def _statements(fn: ast.FunctionDef) -> str:
    """fn's statements, normalised by the ast (formatting, comments and the docstring dropped, the first argument
    after self named x)."""
    stmts = fn.body
    if stmts and isinstance(stmts[0], ast.Expr) and isinstance(stmts[0].value, ast.Constant):
        stmts = stmts[1:]
    rename = _Rename(fn.args.args[1].arg)
    return "\n".join(ast.unparse(rename.visit(st)) for st in stmts)


def _parsed(fn) -> Optional[str]:
    try:
        return _statements(ast.parse(textwrap.dedent(inspect.getsource(fn))).body[0])
    except (OSError, TypeError, SyntaxError, IndexError, AttributeError):
        return None


def forward_body(cls) -> Optional[str]:
    """cls.forward's statements (_statements), through its decorators: for a module whose forward lorakit
    replaces when its structure is known (a gated MLP, a causal-LM head)."""
    if cls not in _BODIES:
        _BODIES[cls] = _parsed(inspect.unwrap(cls.forward))
    return _BODIES[cls]


def function_body(fn) -> Optional[str]:
    """The statements (_statements) of exactly the function `fn`, for code that runs it as it is: None where it
    wraps another (a decorator could read what the body returns) or has no source."""
    code = getattr(fn, "__code__", None)
    if code is None or hasattr(fn, "__wrapped__"):
        return None
    if code not in _FUNCTION_BODIES:
        _FUNCTION_BODIES[code] = _parsed(fn)
    return _FUNCTION_BODIES[code]


def _module_of(family: str):
    try:
        return importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    except ImportError:
        return None


@functools.lru_cache(maxsize=None)
def known_bodies(forms: tuple) -> frozenset:
    """The forward bodies of transformers' classes `forms` ((family, class name), ...) that this install has."""
    bodies = set()
    for family, name in forms:
        module = _module_of(family)
        body = forward_body(getattr(module, name)) if module is not None else None
        if body is not None:
            bodies.add(body)
    return frozenset(bodies)


@functools.lru_cache(maxsize=None)
def source_bodies(forms: tuple) -> frozenset:
    """The forward bodies of transformers' classes `forms`, as their source files have them (a class patched
    since, at run time, does not change them)."""
    bodies = set()
    for family, name in forms:
        module = _module_of(family)
        try:
            tree = ast.parse(inspect.getsource(module)) if module is not None else None
        except (OSError, TypeError, SyntaxError):
            tree = None
        for node in tree.body if tree is not None else ():
            if isinstance(node, ast.ClassDef) and node.name == name:
                bodies.update(_statements(f) for f in node.body
                              if isinstance(f, ast.FunctionDef) and f.name == "forward")
    return frozenset(bodies)


def seen_by_hooks(*modules) -> bool:
    """Whether a hook could see these modules' calls or gradients (their own forward or backward hooks, or global
    ones): a fused call that bypasses the modules' own call would skip them."""
    glob = nn.modules.module
    return bool(glob._global_forward_hooks or glob._global_forward_pre_hooks
                or getattr(glob, "_global_backward_hooks", None) or getattr(glob, "_global_backward_pre_hooks", None)
                or any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                       for m in modules))
