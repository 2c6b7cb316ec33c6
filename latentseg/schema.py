"""Declarative checks of settings and JSON files: a dataclass's type hints say what each field
may hold (`Literal` choices, `Annotated[int, Range(1)]` bounds, `list[...]` elements), and
`problems(obj)` lists every field that breaks them, one line each, naming the key.

The config sections, the saved plan and the fingerprint are all checked this way, so a value is
refused where it is read, not where it is first used.
"""

from __future__ import annotations

import dataclasses
import math
import types
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints


@dataclass(frozen=True)
class Range:
    """Bounds of a number: `low <= x` (or `<` when `low_open`), `x <= high` (or `<`)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def check(self, value: float) -> str | None:
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be a finite number, got {value}"
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if too_low or too_high:
            return f"must be {self.describe()}, got {value!r}"
        return None

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {left}{_num(self.low)}, {_num(self.high)}{right}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {_num(self.low)}"
        return f"{'<' if self.high_open else '<='} {_num(self.high)}"


def _num(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


PositiveInt = Annotated[int, Range(1)]
NonNegativeInt = Annotated[int, Range(0)]
PositiveFloat = Annotated[float, Range(0, low_open=True)]
NonNegativeFloat = Annotated[float, Range(0)]
Fraction = Annotated[float, Range(0, 1)]  # [0, 1]
OpenFraction = Annotated[float, Range(0, 1, high_open=True)]  # [0, 1)
Seed = Annotated[int, Range(0, 2**63 - 1)]


def _type_name(hint: Any) -> str:
    if get_origin(hint) is Annotated:
        return _type_name(get_args(hint)[0])
    if get_origin(hint) is Literal:
        return " | ".join(repr(a) for a in get_args(hint))
    return getattr(hint, "__name__", str(hint))


def value_problem(value: Any, hint: Any) -> str | None:
    """Why `value` does not fit `hint`, or None."""
    origin = get_origin(hint)
    if origin is Annotated:
        base, *extras = get_args(hint)
        problem = value_problem(value, base)
        if problem:
            return problem
        for extra in extras:
            if isinstance(extra, Range):
                problem = extra.check(value)
                if problem:
                    return problem
        return None
    if origin is Literal:
        choices = get_args(hint)
        if value not in choices or type(value) is not type(next(c for c in choices if c == value)):
            return f"must be one of {', '.join(str(c) for c in choices)}, got {value!r}"
        return None
    if origin in (Union, types.UnionType):
        options = get_args(hint)
        found = [value_problem(value, option) for option in options]
        if any(problem is None for problem in found):
            return None
        for option, problem in zip(options, found, strict=True):  # right type, out of range: say so
            if get_origin(option) is Annotated and value_problem(value, get_args(option)[0]) is None:
                return problem
        if all(get_origin(option) is Literal for option in options):  # Literal["auto"] | Literal[1, 3]
            choices = [str(choice) for option in options for choice in get_args(option)]
            return f"must be one of {', '.join(choices)}, got {value!r}"
        return f"must be {' or '.join(_type_name(o) for o in options)}, got {value!r}"
    if origin is list:
        if not isinstance(value, list):
            return f"must be a list, got {value!r}"
        (item,) = get_args(hint) or (Any,)
        for i, entry in enumerate(value):
            problem = value_problem(entry, item)
            if problem:
                return f"entry {i} {problem}"
        return None
    if origin is dict:
        return None if isinstance(value, dict) else f"must be a mapping, got {value!r}"
    if hint is Any:
        return None
    if hint is bool:
        return None if isinstance(value, bool) else f"must be true or false, got {value!r}"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else f"must be an integer, got {value!r}"
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok else f"must be a number, got {value!r}"
    if hint is type(None):
        return None if value is None else f"must be null, got {value!r}"
    if isinstance(hint, type):
        return None if isinstance(value, hint) else f"must be a {hint.__name__}, got {value!r}"
    return None


def hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls, include_extras=True)


def problems(obj: Any, prefix: str = "") -> list[str]:
    """`prefix.field must be ...` for every field of the dataclass `obj` that breaks its type hint."""
    found = []
    for name, hint in hints(type(obj)).items():
        if name not in {f.name for f in dataclasses.fields(obj)}:
            continue
        problem = value_problem(getattr(obj, name), hint)
        if problem:
            found.append(f"{prefix}{name} {problem}")
    return found


def check_mapping(raw: Any, cls: type, source: str, required: tuple[str, ...] = ()) -> list[str]:
    """Problems of a JSON object `raw` read as dataclass `cls`: not an object, missing required keys,
    unknown keys, or values that break the field's hint. Each line names `source` and the key."""
    if not isinstance(raw, dict):
        return [f"{source}: must hold a JSON object, got {type(raw).__name__}"]
    fields = hints(cls)
    found = [f"{source}: missing key {key!r}" for key in required if key not in raw]
    for key, value in raw.items():
        if key not in fields:
            found.append(f"{source}: unknown key {key!r}")
            continue
        problem = value_problem(value, fields[key])
        if problem:
            found.append(f"{source}: {key} {problem}")
    return found
