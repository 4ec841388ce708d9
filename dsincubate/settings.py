"""Typed settings: a dataclass field with its valid range beside it (`setting`), the range checked on construction
(`_Checked`), a nested config read from a dict or `--set` strings with one error line per bad value (`_from_dict`,
`_coerce`), and the field docs `dsincubate config --fields` prints (`config_lines`). No torch import.

    @dataclass
    class Section(_Checked):
        lr: float = setting(1e-3, lo=0.0, lo_open=True)
        # ... followed by the field's docstring, which `config_lines` prints with the range
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import MISSING, field
from typing import Any

from dsincubate.errors import UserError


def setting(default=MISSING, *, factory=MISSING, lo=None, hi=None, lo_open=False, hi_open=False, choices=None):
    """A dataclass field with its domain: lo/hi bounds (closed unless *_open) or a tuple of choices."""
    md = {"lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open, "choices": choices}
    if factory is not MISSING:
        return field(default_factory=factory, metadata=md)
    return field(default=default, metadata=md)


def domain_text(f: dataclasses.Field) -> str:
    md = f.metadata
    if not md:
        return ""
    if md.get("choices"):
        return "one of " + ", ".join(map(str, md["choices"]))
    lo, hi = md.get("lo"), md.get("hi")
    parts = []
    if lo is not None:
        parts.append(f"{'>' if md['lo_open'] else '>='} {lo}")
    if hi is not None:
        parts.append(f"{'<' if md['hi_open'] else '<='} {hi}")
    return ", ".join(parts)


def _check_domains(obj, where: str) -> None:
    for f in dataclasses.fields(obj):
        value, md = getattr(obj, f.name), f.metadata
        if not md or value is None:
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            bad = False
            if md.get("choices") is not None:
                bad = v not in md["choices"]
            else:
                if isinstance(v, float) and not math.isfinite(v):
                    bad = True
                lo, hi = md.get("lo"), md.get("hi")
                if lo is not None and (v <= lo if md["lo_open"] else v < lo):
                    bad = True
                if hi is not None and (v >= hi if md["hi_open"] else v > hi):
                    bad = True
            if bad:
                raise UserError(f"{where}.{f.name}={value!r}: must be {domain_text(f)}")


class _Checked:
    """Domain checks on construction (a recipe's typo fails where it is made)."""

    def __post_init__(self):
        _check_domains(self, type(self).__name__)


def _from_dict(cls, d: dict[str, Any], where: str):
    """`where` is the section's path ("" for the top level, "e2e", "model", ...), used in error messages."""
    if not isinstance(d, dict):
        raise UserError(f"config{'.' + where if where else ''}: expected an object, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise UserError(f"config{'.' + where if where else ''}: unknown field(s) {sorted(unknown)}")
    kwargs = {}
    for key, value in d.items():
        hint = hints[key]
        path = f"{where}.{key}" if where else key
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _from_dict(hint, value, path)
        else:
            kwargs[key] = _coerce(value, hint, path)
    try:  # the domain check names the field by its path (e2e.lr), not its class (TrainConfig.lr)
        return cls(**kwargs)
    except UserError as e:
        raise UserError(str(e).replace(f"{cls.__name__}.", f"{where}." if where else "", 1)) from None


def _coerce(value: Any, hint: Any, where: str) -> Any:
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Union and type(None) in args:  # Optional[X]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "")):
            return None
        hint = next(a for a in args if a is not type(None))
    origin = typing.get_origin(hint)
    try:
        if origin in (list, tuple):
            if isinstance(value, str):
                value = [v for v in value.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                raise TypeError(value)
            (inner, *_) = typing.get_args(hint) or (str,)
            items = [_coerce(v, inner, where) for v in value]
            if origin is tuple and len(typing.get_args(hint)) > 1 and ... not in typing.get_args(hint) \
                    and len(items) != len(typing.get_args(hint)):
                raise ValueError(value)
            return tuple(items) if origin is tuple else items
        if hint is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            if not isinstance(value, (bool, int)):
                raise TypeError(value)
            return bool(value)
        if hint in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise TypeError(value)
            if hint is int:
                f = float(value)
                if not f.is_integer():
                    raise ValueError(value)
                return int(f)
            return float(value)
        if hint is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise TypeError(value)
            return str(value)
    except (TypeError, ValueError, OverflowError):
        name = getattr(hint, "__name__", str(hint))
        raise UserError(f"{where}: cannot read {value!r} as {name}") from None
    return value


def config_lines(cls) -> list[str]:
    """Field documentation with domains, for `dsincubate config --fields`."""
    import ast
    import inspect

    fields = {f.name: f for f in dataclasses.fields(cls)}
    tree = ast.parse(inspect.getsource(cls)).body[0]
    lines, last = [], None
    for node in tree.body:
        if isinstance(node, ast.AnnAssign):
            last = node.target.id
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and last:
            dom = domain_text(fields[last])
            lines.append(f"{cls.__name__}.{last}: {' '.join(node.value.value.split())}" + (f" [{dom}]" if dom else ""))
            last = None
    return lines
