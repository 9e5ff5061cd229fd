"""The argument checks every public function shares: one rule each, one wording of the error.

Each returns the value (normalized where that helps: a float for a number, a compiled pattern for a
regex) or raises ``ValueError`` with one line naming the argument, the accepted values and what was
given. ``bool`` is never an int or a number here, although Python makes it one.

Ints where a fraction is expected: accepted (``keep=1`` is ``1.0``; ``0`` fails the range) — except in
the decomposition formats, where an int ``rank`` is a rank and only a float is a fraction
(:func:`rankwise.formats._ops.resolve_ranks`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable


def is_int(value: object) -> bool:
    """An ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """An ``int`` or ``float`` that is not a ``bool`` (NaN included: ranges reject it)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def int_at_least(value: object, name: str, low: int, *, none_ok: bool = False) -> int | None:
    """An int ``>= low`` (or None when ``none_ok``)."""
    if none_ok and value is None:
        return None
    if not is_int(value) or value < low:
        raise ValueError(f"{name} must be an int >= {low}{' or None' if none_ok else ''}, got {value!r}")
    return value


def int_between(value: object, name: str, low: int, high: int) -> int:
    """An int in ``[low, high]``."""
    if not is_int(value) or not low <= value <= high:
        raise ValueError(f"{name} must be an int from {low} to {high}, got {value!r}")
    return value


def positive_ints(values: object, name: str, what: str = "positive ints") -> tuple[int, ...]:
    """A sequence of ints ``>= 1`` as a tuple (``what`` describes it in the error)."""
    if not isinstance(values, (list, tuple)) or not all(is_int(v) and v >= 1 for v in values):
        raise ValueError(f"{name} must contain {what} only, got {values!r}")
    return tuple(values)


def fraction(value: object, name: str, *, none_ok: bool = False) -> float | None:
    """A number in ``(0, 1]`` as a float (ints accepted, see the module notes; or None when ``none_ok``)."""
    if none_ok and value is None:
        return None
    if not is_number(value) or not 0.0 < float(value) <= 1.0:
        raise ValueError(f"{name} must be a fraction in (0, 1]{' or None' if none_ok else ''}, got {value!r}")
    return float(value)


def number_in(value: object, name: str, low: float, high: float, *, high_open: bool = False) -> float:
    """A number in ``[low, high]`` (``[low, high)`` with ``high_open``) as a float."""
    ok = is_number(value) and low <= float(value) and (float(value) < high if high_open else float(value) <= high)
    if not ok:
        raise ValueError(f"{name} must be a number in [{low:g}, {high:g}{')' if high_open else ']'}, got {value!r}")
    return float(value)


def non_negative(value: object, name: str) -> float:
    """A number ``>= 0`` as a float (a tolerance, a learning rate)."""
    if not is_number(value) or not float(value) >= 0:
        raise ValueError(f"{name} must be a float >= 0, got {value!r}")
    return float(value)


def finite(value: object, name: str) -> float:
    """A finite number as a float."""
    if not is_number(value) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def choice(value: object, name: str, options: Iterable[str]) -> str:
    """One of ``options``."""
    options = tuple(options)
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(options)}, got {value!r}")
    return value


def regex(value: object, name: str, *, none_ok: bool = True) -> re.Pattern | None:
    """A regular expression (a string Python's ``re`` compiles), compiled; None stays None when ``none_ok``."""
    if none_ok and value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a regex string{' or None' if none_ok else ''}, got {type(value).__name__}")
    try:
        return re.compile(value)
    except re.error as err:
        raise ValueError(f"{name}={value!r} is not a valid regular expression: {err}") from None
