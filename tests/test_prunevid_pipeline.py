"""``Qwen25VLPruneVid``, video input, the demo video and ``scripts/run_video.py`` (``make run-video``).

The embedded tiny Qwen2.5-VL (6 layers) and the generated demo video, 8 frames of 112x112 px (64 video
tokens); one model load shared by the module (``with_config`` reuses it).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.script_loader import load_script
import torch
from transformers import Qwen2_5_VLForConditionalGeneration as UpstreamQwen

from models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLForConditionalGeneration as ForkQwen
from data.demo_video import demo_video_path, make_demo_frames, write_demo_video
from models.tiny.qwen2_5_vl import tiny_qwen2_5_vl_dir
from pipelines.prunevid import PRESETS, Qwen25VLPruneVid, scaled_pruning_layer
from pipelines.video_io import load_video, uniform_frame_indices
from pruning.video import prunevid
from pruning.video.prunevid import preset

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "scripts" / "run_video.py"
QUESTION = "What is moving in the video?"
RESULT_KEYS = {
    "generated_text", "tokens_before_stage1", "tokens_after_stage1", "tokens_before", "tokens_after",
    "total_compression_ratio", "ttft_s", "decode_tokens_per_s", "peak_memory_bytes", "kv_cache_length_per_layer",
}  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Tiny matrices gain nothing from intra-op threads; on a busy 2-core machine they cost ~100x. Restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def video8(tmp_path_factory) -> Path:
    return write_demo_video(tmp_path_factory.mktemp("video") / "demo8.avi", num_frames=8)


@pytest.fixture(scope="module")
def pipe() -> Qwen25VLPruneVid:
    return Qwen25VLPruneVid(preset="default", num_frames=8)


@pytest.fixture(scope="module")
def run_video():
    return load_script("run_video")


# ============================================================================= demo video and video input


def test_demo_video_is_deterministic_and_decord_reads_back_the_exact_frames(tmp_path):
    first = write_demo_video(tmp_path / "a.avi", num_frames=8)
    second = write_demo_video(tmp_path / "b.avi", num_frames=8)
    assert first.read_bytes() == second.read_bytes()
    video = load_video(first, 8)
    assert video.frames.dtype == np.uint8 and video.frames.shape == (8, 112, 112, 3)
    assert np.array_equal(video.frames, make_demo_frames(8))  # uncompressed AVI: lossless
    frames = video.frames.astype(int)
    assert (frames[0] != frames[2]).any(axis=-1).mean() < 0.2  # mostly static background, some motion
    assert (frames[0] != frames[2]).any() and np.array_equal(frames[0], frames[1])  # objects move per grid step
    assert demo_video_path().exists()


def test_uniform_sampling_takes_the_centre_of_equal_spans(tmp_path):
    assert uniform_frame_indices(16, 4) == [2, 6, 10, 14]
    assert uniform_frame_indices(8, 8) == list(range(8))
    path = write_demo_video(tmp_path / "v16.avi", num_frames=16)
    video = load_video(path, 4)
    assert video.indices == [2, 6, 10, 14]
    assert np.array_equal(video.frames, make_demo_frames(16)[[2, 6, 10, 14]])
    assert video.total_frames == 16 and video.metadata.sampled_fps == pytest.approx(4 / 16 * video.fps)


@pytest.mark.parametrize(
    "case, num_frames, error, message",
    [
        ("missing", 8, FileNotFoundError, "does not exist"),
        ("empty", 8, ValueError, "is empty"),
        ("garbage", 8, ValueError, "cannot decode video"),
        ("directory", 8, ValueError, "is a directory"),
        ("demo", 9, ValueError, "num_frames=9 is larger than the video's 8 frames"),
        ("demo", 0, ValueError, "num_frames must be an integer >= 1"),
    ],
)
def test_unusable_videos_give_one_line_errors(tmp_path, video8, case, num_frames, error, message):
    path = {"missing": tmp_path / "nope.mp4", "empty": tmp_path / "empty.mp4", "garbage": tmp_path / "bad.avi",
            "directory": tmp_path, "demo": video8}[case]  # fmt: skip
    if case == "empty":
        path.write_bytes(b"")
    if case == "garbage":
        path.write_bytes(b"RIFF not really a video at all" * 10)
    with pytest.raises(error, match=message) as info:
        load_video(path, num_frames)
    assert "\n" not in str(info.value)


# ============================================================================= the pipeline


@torch.no_grad()
def test_baseline_preset_generates_the_upstream_tokens(pipe, video8):
    baseline = pipe.with_config("baseline")
    result = baseline.generate(video8, QUESTION, max_new_tokens=6)
    inputs = baseline.prepare_inputs(video8, QUESTION)
    upstream = UpstreamQwen.from_pretrained(tiny_qwen2_5_vl_dir()).eval()
    expected = upstream.generate(**inputs, do_sample=False, max_new_tokens=6)
    assert result["generated_ids"] == expected[0, inputs["input_ids"].shape[1] :].tolist()
    assert result["tokens_before_stage1"] == result["tokens_after"] == 64 and result["total_compression_ratio"] == 0
    assert set(result["kv_cache_length_per_layer"]) == {inputs["input_ids"].shape[1]}


def test_generate_reports_token_counts_compression_timing_memory_and_kv_lengths(pipe, video8):
    assert isinstance(pipe.model, ForkQwen)
    result = pipe.generate(video8, QUESTION, max_new_tokens=4)
    assert RESULT_KEYS <= set(result) and isinstance(result["generated_text"], str)
    assert result["tokens_before_stage1"] == 64
    assert 64 > result["tokens_after_stage1"] == result["tokens_before"] > result["tokens_after"] >= 1
    assert result["total_compression_ratio"] == pytest.approx(1 - result["tokens_after"] / 64)
    kv_lengths = result["kv_cache_length_per_layer"]
    assert kv_lengths == [result["prompt_tokens"] - 64 + result["tokens_after"]] * 6  # stage 3: every layer short
    assert result["ttft_s"] > 0 and result["decode_tokens_per_s"] > 0 and result["peak_memory_bytes"] > 2**20
    assert result["peak_memory_kind"] == "cpu_peak_rss_sampled" and result["pruning_layer"] == 1

    no_stage3 = pipe.with_config("stage2_only", enable_cache_compression=False).generate(video8, QUESTION, max_new_tokens=2)
    full, short = no_stage3["prompt_tokens"], no_stage3["prompt_tokens"] - 64 + no_stage3["tokens_after"]
    assert no_stage3["kv_cache_length_per_layer"] == [full] * 2 + [short] * 4  # layers 0..K (K = 1) full, K+1.. pruned


def test_presets_are_the_named_configurations_and_pruning_layer_scales_to_the_depth(pipe):
    assert PRESETS is prunevid.PRESETS
    assert pipe.config == preset("default", pruning_layer=1) and pipe.preset_name == "default"
    assert (scaled_pruning_layer(10, 28), scaled_pruning_layer(10, 6), scaled_pruning_layer(10, 36)) == (10, 1, 13)
    conservative = pipe.with_config("conservative")
    assert (conservative.config.tau, conservative.config.cluster_ratio, conservative.config.keep_ratio) == (0.9, 0.8, 0.6)
    assert pipe.with_config("default", pruning_layer=4).config.pruning_layer == 4  # explicit: used as given
    custom = pipe.with_config("custom", keep_ratio=0.5, selection="segment")
    assert custom.config == preset("default", keep_ratio=0.5, selection="segment", pruning_layer=1)
    assert pipe.with_config(preset("aggressive")).config.keep_ratio == 0.3
    assert pipe.with_config("stage1_only").config.enable_pruning is False
    assert pipe.with_config(enable_pruning=False).config.enable_cache_compression is False


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(preset="fastest"), "unknown PruneVid preset 'fastest'"),
        (dict(keep_ratio=0), "keep_ratio must be a number in \\(0, 1\\]"),
        (dict(pruning_layer=6), "pruning_layer=6 is out of range for a model with 6 layers"),
        (dict(selection="random"), "selection must be one of"),
        (dict(num_frames=0), "num_frames must be an integer >= 1"),
    ],
)
def test_bad_configuration_gives_a_clear_error(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe.with_config(**kwargs)


def test_batch_larger_than_one_and_bad_model_paths_give_clear_errors(pipe, video8, tmp_path):
    with pytest.raises(ValueError, match="batch size 1"):
        pipe.generate([video8, video8], QUESTION)
    inputs = pipe.prepare_inputs(video8, QUESTION)
    batch = dict(inputs, input_ids=torch.cat([inputs["input_ids"]] * 2))
    with pytest.raises(ValueError, match="batch size 1"):
        pipe.generate_from_inputs(batch)
    with pytest.raises(ValueError, match="cannot load Qwen2.5-VL from .*no such local directory"):
        Qwen25VLPruneVid(model_path=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="not a complete Qwen2.5-VL model directory"):
        Qwen25VLPruneVid(model_path=str(tmp_path))
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
        pipe.generate(video8, QUESTION, max_new_tokens=0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pipe.generate(tmp_path / "missing.mp4", QUESTION)


def test_any_qwen2_5_vl_directory_loads_the_same_way_as_the_default(video8):
    explicit = Qwen25VLPruneVid(model_path=tiny_qwen2_5_vl_dir(), preset="stage2_only", num_frames=8)
    assert isinstance(explicit.model, ForkQwen) and explicit.config.pruning_layer == 1
    assert explicit.generate(video8, QUESTION, max_new_tokens=2)["tokens_after"] == 24  # 4 grid steps x int(16 * 0.4)


def test_process_egoschema_sample_predicts_the_option_with_the_highest_letter_logit(pipe, video8):
    options = ["a red square moves right", "nothing moves", "a cat sleeps", "a car turns", "it rains"]
    prediction, text, stats = pipe.process_egoschema_sample(video8, "What moves?", options)
    assert 0 <= prediction < 5 and isinstance(text, str)
    assert stats["prediction_letter"] == "ABCDE"[prediction] and len(stats["option_logits"]) == 5
    assert prediction == int(np.argmax(stats["option_logits"]))
    assert stats["tokens_after"] < stats["tokens_before_stage1"]
    with pytest.raises(ValueError, match="options must be a list"):
        pipe.process_egoschema_sample(video8, "What moves?", ["only one"])


def test_verbose_logs_detection_shapes_importance_and_statistics(pipe, video8, caplog):
    verbose = pipe.with_config("default", verbose=True)
    with caplog.at_level(logging.INFO):
        verbose.generate(video8, QUESTION, max_new_tokens=1)
    text = "\n".join(record.getMessage() for record in caplog.records)
    for needle in ("64 video tokens", "T_grid=4, N=16, D=64", "one grid step = 2 frames", "stage 2 at layer 1",
                   "question queries", "no output_attentions", "stage 3: KV cache of layers 0..1 compressed",
                   "total compression", "KV cache length per layer"):  # fmt: skip
        assert needle in text, needle


# ============================================================================= scripts/run_video.py


def test_run_video_compare_reports_agreement_and_ratios_and_writes_stats(run_video, video8, tmp_path, capsys):
    stats_path = tmp_path / "stats.json"
    code = run_video.main([str(video8), QUESTION, "--num-frames", "8", "--max-new-tokens", "4", "--compare",
                           "--stats-json", str(stats_path)])  # fmt: skip
    assert code == 0
    stats = json.loads(stats_path.read_text())
    assert set(stats["runs"]) == {"baseline", "default"}
    assert RESULT_KEYS <= set(stats["runs"]["default"])
    comparison = stats["comparison"]
    assert 0 <= comparison["token_agreement"] <= 1 and comparison["ttft_speedup"] > 0
    assert 0 < comparison["llm_prefill_flops_ratio"] < 1 and 0 < comparison["kv_cache_ratio"] < 1
    out = capsys.readouterr().out
    assert "agreement with baseline" in out and "TTFT speedup" in out


def test_run_video_defaults_to_the_shipped_model_on_its_demo_question_and_says_whether_each_answer_is_right(
    run_video, tmp_path, monkeypatch, capsys
):
    import models.tiny.video_qa as video_qa
    from data.video_qa import demo_sample

    model, processor = video_qa.build_untrained(0, text_hidden=32, text_layers=2, vision_hidden=16)
    model.save_pretrained(tmp_path / "shipped")
    processor.save_pretrained(tmp_path / "shipped")
    monkeypatch.setattr(video_qa, "SHIPPED_DIR", tmp_path / "shipped")  # stands in for models/trained/video_qa
    code = run_video.main(["--compare", "--max-new-tokens", "2", "--threads", "1", "--stats-json", str(tmp_path / "s.json")])
    assert code == 0
    stats = json.loads((tmp_path / "s.json").read_text())
    demo = demo_sample()
    assert stats["model_path"] == str(tmp_path / "shipped") and stats["question"] == demo.question
    assert stats["expected_answer"] == demo.answer and stats["runs"]["default"]["tokens_before_stage1"] == 512
    out = capsys.readouterr().out
    assert out.count("(right)") + out.count(f"(wrong: the answer is {demo.answer!r})") == 2  # baseline and default


def test_run_video_visualize_writes_the_token_picture_of_the_pruned_run(run_video, video8, tmp_path, capsys):
    from PIL import Image

    code = run_video.main([str(video8), QUESTION, "--num-frames", "8", "--max-new-tokens", "2",
                           "--visualize", str(tmp_path / "pictures"), "--stats-json", str(tmp_path / "s.json")])
    assert code == 0
    picture = Image.open(tmp_path / "pictures" / "prunevid_tokens.png")
    # 4 grid steps of 112 px frames, three panels each (frame, stage 1, stage 2)
    assert picture.size[0] > 3 * 112 and picture.size[1] > 4 * 112
    assert json.loads((tmp_path / "s.json").read_text())["visualization"].endswith("prunevid_tokens.png")
    assert "token picture in" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.mp4"], "does not exist"),
        (["--num-frames", "40"], "num_frames=40 is larger than the video's 16 frames"),
        (["--keep-ratio", "0"], "keep_ratio must be a number in (0, 1]"),
        (["--pruning-layer", "6"], "pruning_layer=6 is out of range for a model with 4 layers"),  # the shipped video-QA model
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        (["--preset", "fastest"], "unknown --preset 'fastest'"),
    ],
)
def test_run_video_bad_input_raises_one_line_user_error_and_writes_nothing(run_video, tmp_path, args, message):
    stats_path = tmp_path / "stats.json"
    with pytest.raises(run_video.UserError) as info:
        run_video.main([*args, "--stats-json", str(stats_path)])
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not stats_path.exists()


def test_run_video_cli_prints_one_error_line_and_exits_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path / "missing.avi"), "--stats-json", str(tmp_path / "s.json")],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: video")
    assert not (tmp_path / "s.json").exists()


@pytest.mark.slow
def test_make_run_video_default_command_finishes_under_a_minute(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--compare", "--stats-json", str(tmp_path / "s.json")],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "s.json").read_text())["runs"]["default"]["tokens_before_stage1"] == 128
