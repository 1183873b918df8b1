"""Human-readable model sizes: ``"125M"`` <-> ``1.25e8``.

>>> parse_size("1.3B"), parse_size("70b"), parse_size("3.5e8")
(1300000000.0, 70000000000.0, 350000000.0)
>>> format_size(1.25e8), format_size(7e10), format_size(1.3e9)
('125M', '70B', '1.3B')
"""

from __future__ import annotations

import math
import re

_UNITS = {"K": 3, "M": 6, "B": 9, "T": 12}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?)([eE][+-]?\d+)?\s*([KMBT]?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> float:
    """Parse ``"10M"``, ``"1.3B"``, ``"70B"``, ``"2T"``, ``"350k"`` or ``"1e9"`` into N > 0.

    Raises ``ValueError`` naming ``text`` for anything else, and for an exponent and a unit
    together (``"1e3M"``: a typo for ``1e3`` or for ``1M``, no one can tell).
    """
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"cannot read model size {text!r}; use e.g. 10M, 1.3B, 70B or 1e9")
    mantissa, exponent, unit = match.groups()
    if exponent and unit:
        raise ValueError(
            f"model size {text!r} is ambiguous: it has both an exponent and a unit; "
            "write e.g. 1.3B or 1.3e9"
        )
    # Building the literal keeps "1.3B" exactly float("1.3e9") instead of 1.3 * 1e9.
    if unit:
        value = float(f"{mantissa}e{_UNITS[unit.upper()]}")
    else:
        value = float(mantissa + (exponent or ""))
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"model size must be a finite number > 0, got {text!r}")
    return value


def format_size(n_params: float) -> str:
    """Shortest readable name of a parameter count: ``1.25e8`` -> ``"125M"``."""
    for unit, exponent in sorted(_UNITS.items(), key=lambda item: -item[1]):
        if n_params >= 10**exponent:
            return f"{n_params / 10**exponent:.4g}{unit}"
    return f"{n_params:.4g}"
