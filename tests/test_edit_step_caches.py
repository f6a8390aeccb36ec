"""diffusers' own step caches on the forked transformer (pruning/edit/step_caches.py), the work they skip, and
`make eval-edit` (scripts/eval_edit.py) on a few edits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data.edit_task import make_edit
from evaluation.flops import (
    QwenImageShape,
    qwenimage_block_flops,
    qwenimage_component_flops,
    qwenimage_counted_flops_ratio,
)
from models.tiny.edit_testbed import NUM_STEPS, run_edit, shipped_pipeline
from pruning.edit.step_caches import WorkCounter, cache_config, calibrate_mag_ratios, step_cache
from tests.script_loader import load_script


def test_block_parts_add_up_to_the_block_and_counted_work_gives_the_ratio():
    shape = QwenImageShape()
    assert sum(qwenimage_component_flops(shape).values()) == pytest.approx(qwenimage_block_flops(shape, "none", False))
    full = {"attn": 8, "img_mlp": 8, "txt_mlp": 8}
    assert qwenimage_counted_flops_ratio(shape, full, full) == 1.0
    assert qwenimage_counted_flops_ratio(shape, {k: v // 2 for k, v in full.items()}, full) == 0.5


@pytest.fixture(scope="module")
def pipe():
    return shipped_pipeline()


def _edit(pipe):
    return np.asarray(run_edit(pipe, make_edit(0, "test", 2)))


def test_the_work_counter_sees_every_block_part_of_every_step(pipe):
    counter = WorkCounter(pipe.transformer)
    try:
        _edit(pipe)
    finally:
        counter.remove()
    blocks = len(pipe.transformer.transformer_blocks)
    assert counter.counts == {"attn": NUM_STEPS * blocks, "img_mlp": NUM_STEPS * blocks, "txt_mlp": NUM_STEPS * blocks,
                              "calls": NUM_STEPS}


@pytest.mark.parametrize("name", ["first_block_cache", "taylorseer_cache", "mag_cache"])
def test_each_diffusers_cache_attaches_to_the_fork_skips_work_and_detaches_to_the_exact_baseline(pipe, name):
    baseline = _edit(pipe)
    ratios = calibrate_mag_ratios(lambda: _edit(pipe), pipe.transformer, NUM_STEPS) if name == "mag_cache" else None
    counter = WorkCounter(pipe.transformer)
    try:
        with step_cache(pipe.transformer, cache_config(name, NUM_STEPS, ratios, **(
                {"threshold": 10.0} if name in ("first_block_cache", "mag_cache") else {}))):
            cached = _edit(pipe)
    finally:
        counter.remove()
    blocks = len(pipe.transformer.transformer_blocks)
    assert counter.counts["attn"] < NUM_STEPS * blocks  # something was skipped
    assert not np.array_equal(cached, baseline)
    assert np.array_equal(_edit(pipe), baseline)  # detached: the baseline again, bit for bit


def test_eval_edit_writes_every_method_with_the_documented_fields(tmp_path):
    script = load_script("eval_edit")
    stats = tmp_path / "stats.json"
    methods = "identity,kv_once,full_alternate,steps_3,first_block_cache,reference_quarter"
    assert script.main(["--num-edits", "2", "--methods", methods, "--no-zero-cond-t", "-o", str(tmp_path),
                        "--stats-json", str(stats)]) == 0
    report = json.loads(stats.read_text())
    assert list(report["methods"]) == ["baseline"] + methods.split(",")
    for name, result in report["methods"].items():
        for key in ("psnr_vs_baseline", "ssim_vs_baseline", "psnr_vs_target", "ssim_vs_target", "flops_ratio_real",
                    "speedup_measured"):
            assert key in result, (name, key)
    methods_ = report["methods"]
    assert methods_["baseline"]["identical_to_baseline"] == 2 and methods_["baseline"]["flops_ratio_real"] == 1.0
    assert methods_["identity"]["flops_ratio_real"] == 0.0 and methods_["identity"]["speedup_measured"] is None
    assert methods_["steps_3"]["flops_ratio_real"] == 0.75
    assert 0 < methods_["kv_once"]["flops_ratio_real"] < methods_["full_alternate"]["flops_ratio_real"] < 1
    assert (tmp_path / "quality_vs_speed.png").stat().st_size > 1000


@pytest.mark.parametrize("args, message", [
    (["--methods", "kv_twice"], "unknown method"),
    (["--num-edits", "1"], "--num-edits must be >= 2"),
    (["--model-path", "/nonexistent"], "holds no trained testbed"),
])
def test_eval_edit_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, message):
    script = load_script("eval_edit")
    with pytest.raises(SystemExit) as exit_info:
        from cli import run_cli

        run_cli(lambda: script.main(args + ["-o", str(tmp_path / "out")]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and not (tmp_path / "out").exists()
    assert torch.get_num_threads() >= 1
