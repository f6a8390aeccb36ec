#!/usr/bin/env python
"""Regenerate tests/golden/*.json from the registered golden cases (``make golden``).

Run only on purpose, when a behaviour change is intended; review the diff before committing.
``python scripts/make_golden.py NAME ...`` regenerates only the named cases.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from tests import golden_cases  # noqa: E402,F401  (registers the cases)
from tests.golden_utils import GOLDEN_CASES, write_golden  # noqa: E402


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
