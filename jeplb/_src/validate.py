"""The checks of plain option values, one per kind, with the same exception type and words
wherever an option is taken (configuration objects, entry points, the saved-file decoder).

Rules: a value of the wrong type is a TypeError, a value of the right type out of range a
ValueError; both name the option, what was expected and what arrived. A bool is never an int.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["check_axis_name", "check_bool", "check_choice", "check_fraction", "check_int"]


def check_int(name: str, value: Any, *, minimum: int | None = None, allow_none=False) -> None:
    """Raises unless ``value`` is an int (not a bool, not a float) >= ``minimum``.

    Raises:
      TypeError: not an int (``None`` too, unless ``allow_none``).
      ValueError: below ``minimum``.
    """
    if value is None and allow_none:
        return
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer):
        want = "an int or None" if allow_none else "an int"
        raise TypeError(f"{name}: expected {want}, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")


def check_fraction(name: str, value: Any, *, allow_none=False) -> None:
    """Raises unless ``value`` is a real number (int or float, not a bool) in [0, 1].

    Raises:
      TypeError: not a real number (``None`` too, unless ``allow_none``).
      ValueError: outside [0, 1] (NaN included).
    """
    if value is None and allow_none:
        return
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | float | np.number):
        want = "a number in [0, 1] or None" if allow_none else "a number in [0, 1]"
        raise TypeError(f"{name}: expected {want}, got {type(value).__name__} {value!r}")
    if not 0 <= value <= 1:
        raise ValueError(f"{name}: expected a number in [0, 1], got {value!r}")


def check_bool(name: str, value: Any, *, hint: str = "") -> None:
    """Raises a TypeError unless ``value`` is a bool (``hint``: the fix, appended)."""
    if not isinstance(value, bool | np.bool_):
        fix = f". {hint}" if hint else ""
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__} {value!r}{fix}")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    """Raises unless ``value`` is one of the strings ``choices``.

    Raises:
      TypeError: not a str. ValueError: a str not among ``choices``.
    """
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected one of {choices}, got {type(value).__name__} {value!r}")
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")


def check_axis_name(name: str, value: Any) -> str | tuple[str, ...]:
    """Checks a mesh axis name: a non-empty str, or a tuple (or list) of distinct ones.

    Returns:
      The canonical form: a str for one axis (a one-element tuple becomes its str), else a tuple.

    Raises:
      TypeError: not a str or a sequence of non-empty strs.
      ValueError: an empty sequence, or an axis named twice.
    """
    names = tuple(value) if isinstance(value, tuple | list) else (value,)
    if not all(isinstance(a, str) and a for a in names):
        raise TypeError(
            f"{name}: expected a mesh axis name (str) or a tuple of them, got "
            f"{type(value).__name__} {value!r}"
        )
    if not names:
        raise ValueError(f"{name}: expected at least one mesh axis, got {value!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"{name}: names an axis twice: {value!r}")
    return names[0] if len(names) == 1 else names
