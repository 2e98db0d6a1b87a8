"""Options dataclasses as data: attribute docstrings, value coercion, and config-file + override merging.

Shared by the command line (cli.py builds argparse from it) and the Python API (`lorakit.train(**kw)`).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import json
import textwrap
import typing
from pathlib import Path
from typing import Any, Literal, Union

from ..errors import ConfigError


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """{attribute: docstring} from the string literal under each annotated attribute (all base classes)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue  # builtins, or source not shipped: no help text
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


@functools.lru_cache(maxsize=None)
def field_types(cls: type) -> dict[str, Any]:
    """{attribute: resolved type hint} of an options dataclass."""
    return typing.get_type_hints(cls)


def unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """(X, True) for Optional[X], else (tp, False)."""
    if typing.get_origin(tp) is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _parse_scalar(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def coerce(name: str, tp: Any, value: Any) -> Any:
    """Turn a flag string or a config-file value into the field's type; ConfigError if it does not fit."""
    inner, optional = unwrap_optional(tp)
    if value is None or (optional and value == ""):
        if optional:
            return None
        raise ConfigError(f"option {name!r} needs a value")
    origin = typing.get_origin(inner)
    if origin is Literal:
        choices = typing.get_args(inner)
        for c in choices:
            if value == c or str(value) == str(c):
                return c
        raise ConfigError(f"option {name!r} must be one of {list(choices)}, got {value!r}")
    if inner is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"option {name!r} must be true or false, got {value!r}")
    if inner in (int, float):
        try:
            number = inner(value)
        except (TypeError, ValueError):
            raise ConfigError(f"option {name!r} must be a number ({inner.__name__}), got {value!r}") from None
        if inner is int and isinstance(value, float) and value != number:
            raise ConfigError(f"option {name!r} must be an integer, got {value!r}")
        return number
    if inner is str:
        return str(value)
    if origin is list or inner is list:
        items = [value] if isinstance(value, str) else list(value)
        return [part.strip() for item in items for part in str(item).split(",") if part.strip()]
    if origin is dict or inner is dict:
        return _coerce_dict(name, value)
    return value


def _coerce_dict(name: str, value: Any) -> dict:
    """A dict from a mapping, a JSON object string, or key=value strings (values read as JSON when they parse)."""
    if isinstance(value, dict):
        return dict(value)
    items = [value] if isinstance(value, str) else list(value)
    out: dict[str, Any] = {}
    for item in items:
        item = str(item).strip()
        if item.startswith("{"):
            try:
                out.update(json.loads(item))
            except json.JSONDecodeError as e:
                raise ConfigError(f"option {name!r}: invalid JSON {item!r}: {e}") from None
        elif "=" in item:
            key, _, raw = item.partition("=")
            key, raw = key.strip(), raw.strip()
            value = _parse_scalar(raw)
            if isinstance(value, str) and raw.startswith(("[", "{")):  # meant as a list or object: not plain text
                raise ConfigError(f"option {name!r}: field {key!r}: {raw!r} is not valid JSON (strings inside need "
                                  f"quotes, e.g. {key}='[\"a\", \"b\"]')")
            out[key] = value
        else:
            raise ConfigError(f"option {name!r} takes JSON or key=value pairs, got {item!r}")
    return out


def read_config_file(path: Union[str, Path]) -> dict[str, Any]:
    """A YAML or JSON mapping of option names (attribute or flag spelling) to values."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    text = p.read_text()
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # yaml and json raise their own error types
        raise ConfigError(f"config file {p} could not be parsed: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of option names to values")
    return data


def build_options(cls: type, *layers: dict[str, Any]):
    """An instance of the options dataclass `cls` from layers of settings; later layers win."""
    names = {f.name for f in dataclasses.fields(cls)}
    types = field_types(cls)
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            attr = key.replace("-", "_")
            if attr not in names:
                import difflib

                near = difflib.get_close_matches(attr, sorted(names), n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise ConfigError(f"unknown option {key!r} for {cls.__name__}{hint}")
            merged[attr] = coerce(attr, types[attr], value)
    return cls(**merged)


def given_fields(options: Any) -> dict[str, Any]:
    """The fields of an options instance that differ from the dataclass defaults."""
    out = {}
    for f in dataclasses.fields(options):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        value = getattr(options, f.name)
        if value != default:
            out[f.name] = value
    return out
