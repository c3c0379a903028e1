"""Typed reads from JSON-decoded dicts, with errors that name the offending path.

Private helpers shared by the plan and policy parsers. Each reader takes the error class to
raise, so a bad plan raises ``PlanError`` and a bad policy ``PolicyError``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from service.gate.errors import GateError

Err = type[GateError]
_DECIMAL = re.compile(r"-?[0-9]{1,30}")


def as_mapping(value: Any, path: str, err: Err) -> Mapping[str, Any]:
    """Return ``value`` if it is a JSON object (dict with string keys), else raise ``err``."""
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise err(f"{path}: expected an object, got {type(value).__name__}")
    return value


def reject_unknown(data: Mapping[str, Any], known: set[str], path: str, err: Err) -> None:
    """Raise ``err`` naming every key of ``data`` outside ``known`` (catches typos)."""
    unknown = sorted(set(data) - known)
    if unknown:
        raise err(f"{path}: unknown field(s) {', '.join(unknown)}")


def as_int(value: Any, path: str, err: Err, *, minimum: int | None = None,
           maximum: int | None = None) -> int:
    """Read an integer; decimal strings are accepted (protobuf JSON writes 64-bit ints so)."""
    if isinstance(value, str) and _DECIMAL.fullmatch(value.strip()):
        value = int(value)  # ASCII digits only ("²" is a digit to isdigit() and no int), at most 30
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise err(f"{path}: expected an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise err(f"{path}: must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise err(f"{path}: must be <= {maximum}, got {value}")
    return value


def as_float(value: Any, path: str, err: Err, *, minimum: float | None = None,
             maximum: float | None = None) -> float:
    """Read a finite number (ints accepted) within optional inclusive bounds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise err(f"{path}: expected a number, got {value!r}")
    try:
        out = float(value)
    except OverflowError:  # an integer beyond any float
        out = math.inf
    if not math.isfinite(out):
        raise err(f"{path}: must be finite, got {value!r}")
    if minimum is not None and out < minimum:
        raise err(f"{path}: must be >= {minimum}, got {out}")
    if maximum is not None and out > maximum:
        raise err(f"{path}: must be <= {maximum}, got {out}")
    return out


def as_optional_float(value: Any, path: str, err: Err) -> float | None:
    """Read a finite number or JSON null."""
    return None if value is None else as_float(value, path, err)


def as_bool(value: Any, path: str, err: Err) -> bool:
    """Read a JSON boolean (no truthy coercion)."""
    if not isinstance(value, bool):
        raise err(f"{path}: expected true or false, got {value!r}")
    return value


def as_str(value: Any, path: str, err: Err, *, nonempty: bool = True) -> str:
    """Read a string, non-empty unless told otherwise."""
    if not isinstance(value, str) or (nonempty and not value):
        raise err(f"{path}: expected a non-empty string, got {value!r}")
    return value


def as_list(value: Any, path: str, err: Err) -> Sequence[Any]:
    """Read a JSON array."""
    if not isinstance(value, (list, tuple)):
        raise err(f"{path}: expected an array, got {type(value).__name__}")
    return value


def pick(data: Mapping[str, Any], snake: str, default: Any = None) -> Any:
    """Value under a snake_case key or its lowerCamelCase twin (protobuf JSON accepts both);
    ``default`` where the key is absent or null (protobuf JSON's null means the default)."""
    value = data[snake] if snake in data else data.get(camel(snake))
    return default if value is None else value


def camel(snake: str) -> str:
    """lowerCamelCase spelling of a snake_case field name."""
    head, *rest = snake.split("_")
    return head + "".join(part.title() for part in rest)
