"""The edit benchmark's second bound: a per-step fixed cost charged to every step, the rest scaled by the FLOPs."""

from __future__ import annotations

import pytest

from tests.script_loader import load_script


def test_bound_with_fixed_cost_is_the_flop_bound_when_nothing_is_fixed():
    bench = load_script("bench_edit")
    assert bench.bound_with_fixed_cost(2.0, 0.0, 4, 0.5) == pytest.approx(2.0)


def test_bound_with_fixed_cost_equals_the_time_ratio_of_a_step_model_with_a_fixed_part():
    """Independent reference: build both edits step by step, each step = fixed + per-FLOP time x its FLOPs."""
    bench = load_script("bench_edit")
    fixed, per_flop, full_flops = 0.02, 1e-10, 3.7e9
    reuse_flops = 0.34 * full_flops  # one refresh step, then three reuse steps ("once")
    baseline = 4 * (fixed + per_flop * full_flops)
    once = (fixed + per_flop * full_flops) + 3 * (fixed + per_flop * reuse_flops)
    flops_ratio = (full_flops + 3 * reuse_flops) / (4 * full_flops)
    bound = bench.bound_with_fixed_cost(baseline, fixed, 4, flops_ratio)
    assert bound == pytest.approx(baseline / once)
    assert bound < 1 / flops_ratio  # a fixed cost can only lower what skipping work buys


def test_bound_with_fixed_cost_refuses_a_fixed_cost_that_is_the_whole_edit():
    bench = load_script("bench_edit")
    with pytest.raises(ValueError, match="must lie in"):
        bench.bound_with_fixed_cost(1.0, 0.25, 4, 0.5)
