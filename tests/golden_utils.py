"""Golden files: stored outputs of the embedded models at fixed seeds.

A golden case is a function returning a JSON-able dict of
  * exact values (token ids, token counts, shapes): compared with ``==``, and
  * tensor summaries (``summarize(t)``): compared within ``RTOL``/``ATOL`` because CPU
    kernels may differ in the last bits between machines.

Cases are registered with ``@golden_case("name")`` in ``tests/golden_cases.py``; their
stored outputs live in ``tests/golden/<name>.json`` and are only rewritten on purpose by
``make golden`` (scripts/make_golden.py), so any behaviour change shows up in review.
Fork-vs-upstream comparisons inside one process stay bit-exact in the equivalence tests;
golden files guard against drift *across* commits.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
RTOL = 1e-3  # stated tolerance for float summaries across machines
ATOL = 1e-4

GOLDEN_CASES: dict[str, Callable[[], dict[str, Any]]] = {}


def golden_case(name: str):
    def register(fn: Callable[[], dict[str, Any]]):
        if name in GOLDEN_CASES:
            raise ValueError(f"duplicate golden case {name!r}")
        GOLDEN_CASES[name] = fn
        return fn

    return register


def summarize(tensor: torch.Tensor) -> dict[str, Any]:
    """Shape, dtype and float statistics of a tensor (enough to catch any real change)."""
    t = tensor.detach().to(torch.float64).cpu()
    flat = t.flatten()
    return {
        "__summary__": True,
        "shape": list(tensor.shape),
        "dtype": str(tensor.dtype),
        "sum": flat.sum().item(),
        "abs_sum": flat.abs().sum().item(),
        "std": flat.std().item() if flat.numel() > 1 else 0.0,
        "head": [round(v, 6) for v in flat[:8].tolist()],
    }


def golden_path(name: str) -> Path:
    return GOLDEN_DIR / f"{name}.json"


def write_golden(name: str, value: dict[str, Any]) -> Path:
    path = golden_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n")
    return path


def _close(a: float, b: float, scale: float) -> bool:
    return math.isclose(a, b, rel_tol=RTOL, abs_tol=ATOL * max(1.0, scale))


def compare(expected: Any, actual: Any, where: str = "") -> list[str]:
    """Differences between a stored golden value and a fresh one (empty list: equal)."""
    if isinstance(expected, dict) and expected.get("__summary__"):
        if not (isinstance(actual, dict) and actual.get("__summary__")):
            return [f"{where}: expected a tensor summary, got {type(actual).__name__}"]
        problems = []
        if expected["shape"] != actual["shape"] or expected["dtype"] != actual["dtype"]:
            return [f"{where}: shape/dtype {actual['shape']}/{actual['dtype']} != {expected['shape']}/{expected['dtype']}"]
        scale = expected["abs_sum"] / max(1, math.prod(expected["shape"]))
        for key in ("abs_sum", "std"):
            if not _close(expected[key], actual[key], 0.0):
                problems.append(f"{where}.{key}: {actual[key]!r} != {expected[key]!r}")
        # the plain sum may cancel to ~0: compare it on the scale of the absolute sum
        if not math.isclose(expected["sum"], actual["sum"], rel_tol=RTOL, abs_tol=RTOL * expected["abs_sum"] + ATOL):
            problems.append(f"{where}.sum: {actual['sum']!r} != {expected['sum']!r}")
        for i, (e, a) in enumerate(zip(expected["head"], actual["head"])):
            if not _close(e, a, scale):
                problems.append(f"{where}.head[{i}]: {a!r} != {e!r}")
        return problems
    if isinstance(expected, dict):
        if not isinstance(actual, dict) or set(expected) != set(actual):
            return [f"{where}: keys {sorted(actual) if isinstance(actual, dict) else actual!r} != {sorted(expected)}"]
        return [p for key in expected for p in compare(expected[key], actual[key], f"{where}.{key}")]
    if isinstance(expected, list):
        if not isinstance(actual, list) or len(expected) != len(actual):
            return [f"{where}: {actual!r} != {expected!r}"]
        return [p for i, (e, a) in enumerate(zip(expected, actual)) for p in compare(e, a, f"{where}[{i}]")]
    if isinstance(expected, float) and isinstance(actual, (int, float)):
        return [] if _close(expected, float(actual), abs(expected)) else [f"{where}: {actual!r} != {expected!r}"]
    return [] if expected == actual else [f"{where}: {actual!r} != {expected!r}"]
