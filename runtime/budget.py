"""Parsing sizes such as `300MB`, `1.5GiB` or `25%` (of the bundle's expert bytes)."""

from __future__ import annotations

import re

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 10**3, "M": 10**6, "G": 10**9}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([A-Za-z%]*)\s*$")


class BudgetError(ValueError):
    """A size string could not be parsed or is out of range."""


def parse_size(text: str, total: int | None = None) -> int:
    """Return the number of bytes that `text` means.

    Args:
        text: a number with an optional unit (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB; decimal
            units are powers of 1000) or a percentage such as `25%`.
        total: what 100 % is, in bytes; required for percentages.

    Raises:
        BudgetError: naming the text and the accepted forms.
    """
    match = _PATTERN.match(str(text))
    if not match:
        raise BudgetError(f"invalid size {text!r}: expected a number of bytes with an optional unit "
                          "(300MB, 1.5GiB) or a percentage (25%)")
    number, unit = float(match.group(1)), match.group(2).upper()
    if unit == "%":
        if total is None:
            raise BudgetError(f"invalid size {text!r}: a percentage needs a total to refer to")
        if not 0 < number <= 100:
            raise BudgetError(f"invalid size {text!r}: a percentage must be in (0, 100]")
        return int(total * number / 100)
    if unit not in _UNITS:
        raise BudgetError(f"invalid size {text!r}: unknown unit {match.group(2)!r}; use B, KB, MB, GB, "
                          "KiB, MiB, GiB or %")
    value = int(number * _UNITS[unit])
    if value <= 0:
        raise BudgetError(f"invalid size {text!r}: must be greater than 0")
    return value


def format_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(count) < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} GB"
