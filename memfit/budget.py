"""Budgets: how many bytes one training step may hold.

A budget is given as bytes (int), a size string ("6GiB", "800MB", "1.5 GB") or a
percentage of the unoptimized step's peak ("50%"). Binary (KiB, MiB, GiB) and decimal
(KB, MB, GB) units are kept apart, as the IEC standard defines them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from memfit.errors import BudgetError

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)
_PCT_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*%\s*$")
_NEG_RE = re.compile(r"^\s*-\s*[0-9]*\.?[0-9]+\s*[a-z%]*\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Budget:
    """A byte budget for one training step: absolute (`nbytes`) or relative (`fraction`).

    `fraction` is of the unoptimized training step's predicted peak; `resolve` turns it
    into bytes once that peak is known.
    """

    nbytes: int | None = None
    fraction: float | None = None
    text: str = ""

    def __post_init__(self):
        if (self.nbytes is None) == (self.fraction is None):
            raise BudgetError("a Budget needs exactly one of nbytes or fraction")
        if self.nbytes is not None and self.nbytes <= 0:
            raise BudgetError(f"budget must be positive, got {self.nbytes} bytes")
        if self.fraction is not None and not (0.0 < self.fraction <= 10.0):
            raise BudgetError(f"budget percentage must be in (0%, 1000%], got {self.fraction:.0%}")

    @classmethod
    def parse(cls, value: "Budget | int | float | str") -> "Budget":
        if isinstance(value, Budget):
            return value
        if isinstance(value, bool):
            raise BudgetError(f"malformed budget {value!r}: give bytes, e.g. 6GiB, 800MB or 50%")
        if isinstance(value, int):
            return cls(nbytes=value, text=format_bytes(value))
        if isinstance(value, float):
            if value != value or value in (float("inf"), float("-inf")):
                raise BudgetError(f"budget must be a finite number of bytes, got {value!r}; e.g. 6GiB, 800MB or 50%")
            if value != int(value):
                raise BudgetError(f"budget in bytes must be whole, got {value}; for a ratio write '{value:.0%}'")
            return cls(nbytes=int(value), text=format_bytes(int(value)))
        if not isinstance(value, str):
            raise BudgetError(f"malformed budget {value!r}: expected bytes (int) or a string such as '6GiB' or '50%'")
        m = _PCT_RE.match(value)
        if m:
            return cls(fraction=float(m.group(1)) / 100.0, text=value.strip())
        if _NEG_RE.match(value):
            raise BudgetError(f"budget must be positive, got {value.strip()!r}; e.g. 6GiB, 800MB or 50%")
        m = _SIZE_RE.match(value)
        if not m or m.group(2).lower() not in _UNITS:
            raise BudgetError(
                f"malformed budget {value!r}: expected a number with an optional unit "
                "(B, KB, MB, GB, KiB, MiB, GiB) or a percentage, e.g. '6GiB', '800MB', '50%'")
        n = float(m.group(1)) * _UNITS[m.group(2).lower()]
        return cls(nbytes=int(round(n)), text=value.strip())

    def resolve(self, baseline_peak: int) -> int:
        """Bytes of this budget, given the unoptimized step's peak in bytes."""
        if self.nbytes is not None:
            return self.nbytes
        return int(self.fraction * baseline_peak)

    def __str__(self) -> str:
        return self.text or (format_bytes(self.nbytes) if self.nbytes is not None else f"{self.fraction:.0%}")


def format_bytes(n: float, *, up: bool = False) -> str:
    """Human form with binary units: 1536 -> '1.50 KiB'. `up`: rounded up, not to the nearest
    (for a least budget: the figure shown, read back, is still enough)."""
    import math

    n = float(n)
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            if unit == "B":
                return f"{sign}{math.ceil(n) if up else n:.0f} {unit}"
            return f"{sign}{math.ceil(n * 100) / 100 if up else n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
