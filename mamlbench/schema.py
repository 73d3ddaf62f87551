"""Typed, validated parameter sections.

Every knob in `params.yaml` maps onto a field of a frozen dataclass. `build(cls, mapping, where)`
turns a YAML mapping into that dataclass and rejects, before any work starts, unknown keys, wrong
types and out-of-range values with a one-line `ConfigError` that names the dotted key and the value.

Declare a field with `knob(default, doc, gt=..., ge=..., le=..., choices=...)`; nested sections are
fields whose type is another dataclass (`section(Cls)`).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin


class ConfigError(ValueError):
    """A bad parameter: the message is one line naming the key and the value."""


def knob(default: Any, doc: str = "", *, gt=None, ge=None, lt=None, le=None, choices=None):
    """A dataclass field with a docstring and range checks applied by `build`."""
    meta = dict(doc=doc, gt=gt, ge=ge, lt=lt, le=le, choices=choices)
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def section(cls, doc: str = ""):
    """A nested section, defaulting to the section's own defaults."""
    return dataclasses.field(default_factory=cls, metadata=dict(doc=doc))


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`; return it (ints widen to float)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where} = {_show(value)}: expected {_typename(tp)}")
    if origin is Literal:
        if value not in get_args(tp):
            choices = ", ".join(repr(a) for a in get_args(tp))
            raise ConfigError(f"{where} = {_show(value)}: must be one of {choices}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} = {_show(value)}: expected a list")
        (item,) = get_args(tp)[:1] or (Any,)
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} = {_show(value)}: expected a mapping")
        _, item = get_args(tp) or (str, Any)
        return {k: _coerce(item, v, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} = {_show(value)}: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} = {_show(value)}: expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} = {_show(value)}: expected a number")
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{where} = {_show(value)}: must be finite")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} = {_show(value)}: expected a string")
        return value
    raise TypeError(f"unsupported annotation {tp!r} at {where}")


def _typename(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _check_range(meta: dict, value: Any, where: str) -> None:
    values = value if isinstance(value, list) else [value]
    for v in values:
        if v is None or isinstance(v, (bool, str)):
            if meta.get("choices") is not None and v not in meta["choices"]:
                raise ConfigError(f"{where} = {_show(v)}: must be one of {', '.join(map(repr, meta['choices']))}")
            continue
        for key, ok, text in (("gt", lambda a, b: a > b, ">"), ("ge", lambda a, b: a >= b, ">="),
                              ("lt", lambda a, b: a < b, "<"), ("le", lambda a, b: a <= b, "<=")):
            bound = meta.get(key)
            if bound is not None and not ok(v, bound):
                raise ConfigError(f"{where} = {_show(v)}: must be {text} {bound}")
        if meta.get("choices") is not None and v not in meta["choices"]:
            raise ConfigError(f"{where} = {_show(v)}: must be one of {', '.join(map(repr, meta['choices']))}")


def build(cls, mapping: Any, where: str = ""):
    """Build dataclass `cls` from a YAML mapping, validating every key (see module docstring)."""
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, dict):
        raise ConfigError(f"{where or 'params'} = {_show(mapping)}: expected a mapping of keys")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in mapping if k not in fields]
    if unknown:
        key = f"{where}.{unknown[0]}" if where else str(unknown[0])
        raise ConfigError(f"unknown key '{key}' (known here: {', '.join(fields)})")
    values = {}
    for name, value in mapping.items():
        key = f"{where}.{name}" if where else name
        coerced = _coerce(hints[name], value, key)
        _check_range(dict(fields[name].metadata), value, key)  # the value as written, for the message
        values[name] = coerced
    obj = cls(**values)
    check = getattr(obj, "validate", None)
    if check is not None:
        check(where)
    return obj


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain YAML-able values."""
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys: {'a': {'b': 1}} -> {'a.b': 1} (lists kept whole)."""
    if dataclasses.is_dataclass(tree):
        tree = dataclasses.asdict(tree)
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out
