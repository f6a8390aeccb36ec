"""Small helpers shared by every system (one definition each): rounding, integer validation, layer scaling."""

from __future__ import annotations

import math

ROUNDING_EPS = 1e-9
"""Products such as ``0.7 * 30`` land a hair below ``x.5`` in floating point; the tolerance keeps them halves."""


def round_half_up(x: float) -> int:
    """Round to the nearest integer, halves up (Python's ``round`` rounds halves to even): 2.5 -> 3, 3.5 -> 4."""
    return int(math.floor(x + 0.5 + ROUNDING_EPS))


def check_int(name: str, value, lo: int | None = None, hi: int | None = None, error: type[Exception] = ValueError) -> None:
    """Raise ``error`` with one line unless ``value`` is an ``int`` (not a ``bool``) in ``[lo, hi]``.

    The message names the argument, the allowed range and the value: ``"k must be an integer >= 1, got 0"``.
    """
    if isinstance(value, bool) or not isinstance(value, int) or (lo is not None and value < lo) or (
        hi is not None and value > hi
    ):
        if lo is not None and hi is not None:
            allowed = f"an integer from {lo} to {hi}"
        elif lo is not None:
            allowed = f"an integer >= {lo}"
        elif hi is not None:
            allowed = f"an integer <= {hi}"
        else:
            allowed = "an integer"
        raise error(f"{name} must be {allowed}, got {value!r}")


def scale_layer_index(layer: int, num_layers_real: int, num_layers_model: int) -> int:
    """Layer ``layer`` of a ``num_layers_real``-layer LLM at the same depth of a ``num_layers_model``-layer one.

    Layer ``l`` ends at depth fraction ``(l + 1) / num_layers_real``; it maps to the layer ending nearest
    that fraction, ``round_half_up((l + 1) * num_layers_model / num_layers_real) - 1``, clamped to
    ``[0, num_layers_model - 1]`` (the last layer maps to the last layer). PruneVid's layer 10 of 28 ->
    2 of 8, 1 of 6, 13 of 36; LLaVA's 10, 20, 31 of 32 -> 2, 4, 7 of 8.
    """
    check_int("num_layers_real", num_layers_real, lo=1)
    check_int("num_layers_model", num_layers_model, lo=1)
    check_int("layer", layer, lo=0, hi=num_layers_real - 1)
    scaled = round_half_up((layer + 1) * num_layers_model / num_layers_real) - 1
    return min(max(scaled, 0), num_layers_model - 1)


__all__ = ["ROUNDING_EPS", "check_int", "round_half_up", "scale_layer_index"]
