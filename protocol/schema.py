"""Field checks for message dataclasses: each turns a decoded value into a typed one or raises SchemaError.

A message class declares a check per field with `field(check)`; `from_fields` applies them and
rejects missing and unknown fields, `to_fields` turns the dataclass back into plain msgpack values.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Callable, Mapping
from typing import Any

from protocol.encoding import MalformedError, canonicalize
from protocol.errors import SchemaError

Check = Callable[[str, Any], Any]
_HEX64 = re.compile(r"[0-9a-f]{64}")
UINT63_MAX = 2**63 - 1


def field(check: Check, **kwargs: Any) -> Any:
    """A dataclass field validated by `check` in `from_fields`."""
    return dataclasses.field(metadata={"check": check}, **kwargs)


def _got(value: Any) -> str:
    if isinstance(value, str | bytes):
        return f"{type(value).__name__} of length {len(value)}"
    if isinstance(value, bool | int | float):
        return f"{type(value).__name__} {value!r}"
    return type(value).__name__


def text(max_len: int = 256, pattern: str | None = None) -> Check:
    """A str of 1..max_len characters, optionally matching `pattern` in full."""
    regex = re.compile(pattern) if pattern else None

    def check(name: str, value: Any) -> str:
        if type(value) is not str or not 1 <= len(value) <= max_len:
            raise SchemaError(f"expected {name} to be a str of 1..{max_len} chars, got {_got(value)}")
        if regex is not None and not regex.fullmatch(value):
            raise SchemaError(f"expected {name} to match {pattern}, got {value[:80]!r}")
        return value

    return check


def hex64(name: str, value: Any) -> str:
    """A lower-case hex sha256."""
    if type(value) is not str or not _HEX64.fullmatch(value):
        raise SchemaError(f"expected {name} to be a lower-case hex sha256, got {_got(value)}")
    return value


def raw_bytes(size: int) -> Check:
    """Bytes of exactly `size` length."""

    def check(name: str, value: Any) -> bytes:
        if type(value) is not bytes or len(value) != size:
            raise SchemaError(f"expected {name} to be {size} bytes, got {_got(value)}")
        return value

    return check


def integer(low: int = 0, high: int = UINT63_MAX) -> Check:
    """An int (not bool) in [low, high]."""

    def check(name: str, value: Any) -> int:
        if type(value) is not int or not low <= value <= high:
            raise SchemaError(f"expected {name} to be an int in [{low}, {high}], got {_got(value)}")
        return value

    return check


def number(low: float, high: float) -> Check:
    """A float in [low, high] (ints are not accepted: one canonical form)."""

    def check(name: str, value: Any) -> float:
        if type(value) is not float or not low <= value <= high:
            raise SchemaError(f"expected {name} to be a float in [{low}, {high}], got {_got(value)}")
        return value

    return check


def boolean(name: str, value: Any) -> bool:
    """A bool."""
    if type(value) is not bool:
        raise SchemaError(f"expected {name} to be a bool, got {_got(value)}")
    return value


def sequence(item: Check, max_items: int, min_items: int = 0, strictly_sorted: bool = False) -> Check:
    """A list of checked items, returned as a tuple."""

    def check(name: str, value: Any) -> tuple:
        if type(value) not in (list, tuple) or not min_items <= len(value) <= max_items:
            got = _got(value)
            raise SchemaError(f"expected {name} to be a list of {min_items}..{max_items} items, got {got}")
        items = tuple(item(f"{name}[{i}]", v) for i, v in enumerate(value))
        if strictly_sorted and any(a >= b for a, b in itertools.pairwise(items)):
            raise SchemaError(f"expected {name} to be sorted without duplicates, got another order")
        return items

    return check


def nested(cls: type) -> Check:
    """A map validated by `cls.from_dict`."""

    def check(name: str, value: Any) -> Any:
        if isinstance(value, cls):
            return value
        return cls.from_dict(value, where=name)

    return check


def plain_value(max_items: int = 4096) -> Check:
    """Any canonical msgpack value (maps, lists, numbers, str) of bounded size, e.g. merge parameters."""

    def check(name: str, value: Any) -> Any:
        try:
            value = canonicalize(value)
        except MalformedError as exc:
            raise SchemaError(f"expected {name} to be plain data: {exc}") from None
        if _count(value) > max_items:
            raise SchemaError(f"expected {name} to hold at most {max_items} values, got more")
        return value

    return check


def _count(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + sum(_count(v) for v in value.values())
    if isinstance(value, list):
        return 1 + sum(_count(v) for v in value)
    return 1


class Record:
    """Base of message dataclasses: fields are checked (and normalised) on construction.

    Subclasses are frozen dataclasses whose fields use `field(check)`; `_validate` adds
    cross-field rules. Unknown and missing fields are rejected by `from_dict`.
    """

    def __post_init__(self) -> None:
        label = type(self).__name__
        for f in dataclasses.fields(self):
            value = f.metadata["check"](f"{label}.{f.name}", getattr(self, f.name))
            object.__setattr__(self, f.name, value)
        self._validate()

    def _validate(self) -> None:
        """Cross-field rules; raise SchemaError."""

    @classmethod
    def from_dict(cls, data: Any, where: str | None = None) -> Any:
        """The record from a decoded map; unknown or missing fields raise SchemaError."""
        label = where or cls.__name__
        if not isinstance(data, Mapping):
            raise SchemaError(f"expected {label} to be a map, got {_got(data)}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in set(data) - names)
        if unknown:
            raise SchemaError(f"expected only known fields in {label}, got unknown field {unknown[0][:80]!r}")
        missing = sorted(names - set(data))
        if missing:
            raise SchemaError(f"expected field {missing[0]!r} in {label}, got none")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """The plain map (nested records and tuples become maps and lists)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _plain(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value
