"""``make eval-video``: every method's accuracy, budget and cost on the video-QA test split, in the documented JSON."""

from __future__ import annotations

import json

import pytest

from tests.script_loader import load_script


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory):
    """An untrained video-QA model at a small size (the evaluator's mechanics, not its accuracy)."""
    from models.tiny.video_qa import build_untrained

    directory = tmp_path_factory.mktemp("video_qa_model")
    model, processor = build_untrained(0, text_hidden=32, text_layers=2, vision_hidden=16)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def test_eval_video_writes_every_method_with_accuracy_budget_tokens_and_flops(small_model_dir, tmp_path, capsys):
    script = load_script("eval_video")
    stats_path = tmp_path / "eval.json"
    code = script.main(["--model-path", str(small_model_dir), "--num-videos", "2", "--seed", "3", "--threads", "1",
                        "--methods", "baseline,random,frame_subsample,fastv,divprune", "--no-progress",
                        "--stats-json", str(stats_path)])
    assert code == 0
    stats = json.loads(stats_path.read_text())
    methods = stats["methods"]
    assert {"baseline", "default", "aggressive"} <= set(methods)
    budgets = stats["budgets"]
    assert budgets["25pct"] == 128 and budgets["10pct"] == 51
    for label in budgets:
        for method in ("frame_subsample", "random", "divprune", "fastv"):
            assert f"{method}_{label}" in methods
    for name, m in methods.items():
        assert {"accuracy", "accuracy_se", "per_type", "visual_tokens", "agreement_with_baseline", "flops_ratio_7b"} <= set(m)
        assert 0.0 <= m["accuracy"] <= 1.0 and 0.0 < m["flops_ratio_7b"] <= 1.0 + 1e-9
    assert methods["baseline"]["visual_tokens"] == 512 and methods["baseline"]["agreement_with_baseline"] == 1.0
    assert methods["random_25pct"]["visual_tokens"] == methods["divprune_25pct"]["visual_tokens"] == 128
    assert methods["frame_subsample_25pct"]["visual_tokens"] == 128  # 4 frames = 2 grid steps x 64
    assert methods["random_10pct"]["visual_tokens"] == 51
    assert "frame_subsample_default" in capsys.readouterr().out


def test_eval_video_refuses_a_missing_model_and_unknown_methods(tmp_path):
    script = load_script("eval_video")
    with pytest.raises(script.UserError, match="--methods: unknown"):
        script.main(["--model-path", str(tmp_path), "--methods", "baseline,oracle"])
    with pytest.raises(script.UserError, match="--num-videos must be >= 1"):
        script.main(["--num-videos", "0"])
