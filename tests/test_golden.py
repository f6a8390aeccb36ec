"""Every registered golden case reproduces its stored output (``make golden`` rewrites them)."""

from __future__ import annotations

import json

import pytest
import torch

from tests import golden_cases  # noqa: F401  (registers the cases)
from tests.golden_utils import GOLDEN_CASES, compare, golden_path, summarize


@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_output_matches_golden_file(name):
    path = golden_path(name)
    assert path.exists(), f"{path} missing: run `make golden` and review the new file"
    expected = json.loads(path.read_text())
    actual = json.loads(json.dumps(GOLDEN_CASES[name]()))
    problems = compare(expected, actual, name)
    assert not problems, "output drifted from the golden file (if intended: `make golden`):\n" + "\n".join(problems[:20])


def test_golden_comparison_detects_a_changed_token_and_a_changed_tensor():
    base = {"ids": [1, 2, 3], "logits": summarize(torch.linspace(-1, 1, 64).reshape(8, 8))}
    assert compare(base, base) == []
    assert compare(base, {**base, "ids": [1, 2, 4]})
    assert compare(base, {**base, "logits": summarize(torch.linspace(-1, 1, 64).reshape(8, 8) * 1.01)})
    # a last-bit difference (another CPU kernel) stays within the stated tolerance
    assert compare(base, {**base, "logits": summarize(torch.linspace(-1, 1, 64).reshape(8, 8) + 1e-7)}) == []
