"""Small numeric helpers shared by every system (one definition each)."""

from __future__ import annotations

import math

ROUNDING_EPS = 1e-9
"""Products such as ``0.7 * 30`` land a hair below ``x.5`` in floating point; the tolerance keeps them halves."""


def round_half_up(x: float) -> int:
    """Round to the nearest integer, halves up (Python's ``round`` rounds halves to even): 2.5 -> 3, 3.5 -> 4."""
    return int(math.floor(x + 0.5 + ROUNDING_EPS))


__all__ = ["ROUNDING_EPS", "round_half_up"]
