#!/usr/bin/env python
"""Regenerate tests/golden/*.json from the registered golden cases (``make golden``).

Run only on purpose, when a behaviour change is intended; review the diff before committing.
``python scripts/make_golden.py NAME ...`` regenerates only the named cases.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tests import golden_cases  # noqa: F401  (registers the cases; the repository root is installed, see pyproject.toml)
from tests.golden_utils import GOLDEN_CASES, write_golden

REPO_ROOT = Path(__file__).resolve().parent.parent


def main(names: list[str]) -> int:
    unknown = sorted(set(names) - set(GOLDEN_CASES))
    if unknown:
        print(f"error: unknown golden case(s) {unknown}; known: {sorted(GOLDEN_CASES)}", file=sys.stderr)
        return 2
    for name in names or sorted(GOLDEN_CASES):
        path = write_golden(name, GOLDEN_CASES[name]())
        print(f"wrote {path.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
