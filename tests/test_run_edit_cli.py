"""``scripts/run_with_token_pruning.py`` (``make run-edit``): outputs, stats JSON, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.script_loader import run_script_in_process

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "scripts" / "run_with_token_pruning.py"
STATS_KEYS = {"mode", "refresh_steps", "steps", "height", "width", "tokens", "time_baseline_s", "time_pruned_s",
              "speedup", "psnr_db", "ssim", "cache_bytes", "flops_ratio"}


def run_process(*args, cwd):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.fixture
def run(capsys):
    """The script in this process through its own run_cli (as on the command line, without re-importing torch);
    the demo run below is a real process."""
    def run_in_process(*args, cwd):
        return run_script_in_process("run_with_token_pruning", list(args), capsys, cwd=cwd)

    return run_in_process


def test_compare_run_writes_images_and_stats(run, tmp_path):
    out = tmp_path / "out"
    proc = run("--compare", "-o", str(out), "--height", "64", "--width", "64", "-s", "2", "--pruning-mode", "kv",
               "--stats-json", str(tmp_path / "stats.json"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    names = {p.name for p in out.iterdir()}
    assert {"latest_baseline.png", "latest_pruning.png"} <= names
    assert any(n.startswith("output_pruning_") and n.endswith(".png") for n in names)
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert STATS_KEYS <= set(stats)
    assert stats["mode"] == "kv" and stats["refresh_steps"] == [1] and stats["steps"] == 2
    # the embedded testbed encodes its reference at 128x128 px (reference_area): 8 x 8 tokens
    assert stats["tokens"]["denoise"] == 16 and stats["tokens"]["reference"] == 64 and stats["tokens"]["text"] > 0
    assert 0 < stats["flops_ratio"] < 1 and stats["speedup"] > 0 and stats["cache_bytes"] > 0
    assert "denoising time" in proc.stdout


def test_default_run_edits_the_demo_test_edit_and_writes_the_comparison_strip(tmp_path):
    from PIL import Image

    out = tmp_path / "out"
    proc = run_process("--compare", "-o", str(out), "--pruning-mode", "kv", "--refresh-steps", "once",
               "--stats-json", str(tmp_path / "stats.json"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["test_edit"]["type"] == "recolour" and stats["reference_area"] == 128 * 128
    assert (stats["height"], stats["width"]) == (128, 128)
    # both runs do what the prompt says: the asked colour in the shape's mask, closer to the target than the input
    assert stats["colour_baseline"] == stats["colour_pruning"] == stats["colour_asked"]
    for name in ("baseline", "pruning"):
        assert stats[f"psnr_vs_target_{name}_db"] > stats["psnr_vs_target_input_db"]
    strip = Image.open(out / "compare_strip.png")
    assert strip.size == (5 * 128 + 4 * 4, 128 + 14)  # input | baseline | reuse | difference | target
    assert "recolour asked for" in proc.stdout and "against the target edit" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["-i", "missing.png"], "does not exist"),
    (["--reference-area", "100"], "--reference-area must be"),
    (["--edit-index", "-1"], "--edit-index picks a generated test edit"),
    (["--pruning-mode", "fast"], "invalid choice"),
    (["-s", "0"], "--steps must be >= 1"),
    (["-s", "4", "--refresh-steps", "1,7"], "names step(s) [7]"),
    (["--refresh-steps", "2,3"], "must include step 1"),
])
def test_bad_input_is_one_line_and_writes_nothing(run, tmp_path, args, message):
    out = tmp_path / "out"
    proc = run("-o", str(out), *args, cwd=tmp_path)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_unreadable_image_is_one_line(run, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    proc = run("-o", str(tmp_path / "out"), "-i", str(bad), cwd=tmp_path)
    assert proc.returncode == 2 and "cannot read image" in proc.stderr and "Traceback" not in proc.stderr


def test_unreachable_model_is_one_line(run, tmp_path):
    proc = run("-o", str(tmp_path / "out"), "--model-path", str(tmp_path / "no_such_model"), cwd=tmp_path)
    assert proc.returncode == 2 and "cannot load the Qwen-Image-Edit pipeline" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize("mode", ["mlp", "full", "kv"])
def test_plain_pruned_run_without_compare_writes_pruned_image_and_stats(run, tmp_path, mode):
    """The first command of the quick start: a pruned edit without ``--compare`` (no baseline run)."""
    out = tmp_path / "out"
    proc = run("-o", str(out), "--height", "64", "--width", "64", "-s", "2", "--pruning-mode", mode,
               "--stats-json", str(tmp_path / "stats.json"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    names = {p.name for p in out.iterdir()}
    assert "latest_pruning.png" in names and "latest_baseline.png" not in names
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["mode"] == mode and stats["time_baseline_s"] is None and stats["speedup"] is None
    assert stats["time_pruned_s"] > 0 and 0 < stats["flops_ratio"] < 1


def test_plain_baseline_run_writes_baseline_image_only(run, tmp_path):
    out = tmp_path / "out"
    proc = run("-o", str(out), "--height", "64", "--width", "64", "-s", "2", "--no-pruning",
               "--stats-json", str(tmp_path / "stats.json"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    names = {p.name for p in out.iterdir()}
    assert "latest_baseline.png" in names and "latest_pruning.png" not in names
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["mode"] == "none" and stats["time_pruned_s"] is None and stats["time_baseline_s"] > 0


@pytest.fixture()
def two_images(tmp_path):
    from data.media import make_sample_image

    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    make_sample_image(size=(192, 128), seed=1).save(paths[0])
    make_sample_image(size=(128, 128), seed=2).save(paths[1])
    return paths


def test_two_images_run_the_plus_pipeline_with_every_reference_cached(run, tmp_path, two_images):
    """``make run-edit ARGS="-i a.png -i b.png"``: the embedded Edit-2509-layout pipeline, both images reference tokens."""
    proc = run("-i", str(two_images[0]), "-i", str(two_images[1]), "--compare", "-o", str(tmp_path / "out"),
               "--height", "64", "--width", "64", "-s", "2", "--pruning-mode", "kv", "--refresh-steps", "once",
               "--stats-json", str(tmp_path / "stats.json"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["pipeline"] == "TokenPruningQwenImageEditPlusPipeline" and stats["references"] == 2
    # 1248x832 and 1024x1024 px at the VAE: 78 x 52 + 64 x 64 tokens of 16 x 16 px
    assert stats["tokens"]["reference"] == 78 * 52 + 64 * 64 and stats["tokens"]["denoise"] == 16
    assert 0 < stats["flops_ratio"] < 1 and stats["psnr_db"] is not None


def test_pipeline_choices_the_model_or_the_images_contradict_are_one_line(run, tmp_path, two_images):
    from models.tiny.qwenimage_edit import tiny_qwenimage_edit_dir

    out = tmp_path / "out"
    proc = run("--pipeline", "edit", "-i", str(two_images[0]), "-i", str(two_images[1]), "-o", str(out), cwd=tmp_path)
    assert proc.returncode == 2 and "--pipeline edit takes one -i image, got 2" in proc.stderr
    proc = run("--pipeline", "plus", "--model-path", str(tiny_qwenimage_edit_dir()), "-o", str(out), cwd=tmp_path)
    assert proc.returncode == 2 and "holds a QwenImageEditPipeline" in proc.stderr
    proc = run("-i", str(two_images[0]), "-i", str(two_images[1]), "--model-path", str(tiny_qwenimage_edit_dir()),
               "-o", str(out), cwd=tmp_path)
    assert proc.returncode == 2 and "Qwen-Image-Edit takes one reference image" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_fidelity_report_runs_every_schedule_on_the_testbed_demo_edit_against_baseline_and_target(tmp_path, capsys):
    out = tmp_path / "fidelity"
    proc = run_script_in_process("report_edit_fidelity", ["--modes", "kv,full", "-o", str(out)], capsys, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (stats_path,) = out.glob("fidelity_*.json")
    stats = json.loads(stats_path.read_text())
    assert stats["reference_area"] == 128 * 128 and stats["tokens"]["reference"] == 64
    rows = {(r["mode"], r["schedule"]): r for r in stats["rows"]}
    assert len(rows) == 2 * 4  # reuse 2, reuse 4, reuse 2+4, once
    assert stats["baseline_psnr_vs_target_db"] > 25  # the trained testbed makes the demo edit
    for row in rows.values():
        assert row["psnr_vs_target_db"] > 25 and 0 < row["flops_ratio"] < 1
    # under zero_cond_t kv would equal full; here kv also freezes the reference modulation: a different image
    assert rows[("kv", "reuse 2,3,4 (once)")]["psnr_db"] != rows[("full", "reuse 2,3,4 (once)")]["psnr_db"]
    assert (out / "baseline.png").is_file() and "vs target" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["--edit-index", "-1"], "--edit-index picks a generated test edit"),
    (["--reference-area", "100"], "--reference-area must be"),
    (["--modes", "kv,fast"], "unknown mode(s) ['fast']"),
    (["-i", "missing.png"], "does not exist"),
    (["-i", "photo.png", "--edit-index", "3"], "without -i; got 3 with -i"),
])
def test_fidelity_report_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, message):
    from data.media import make_sample_image

    make_sample_image((64, 64)).save(tmp_path / "photo.png")
    out = tmp_path / "fidelity"
    proc = run_script_in_process("report_edit_fidelity", [*args, "-o", str(out)], capsys, cwd=tmp_path)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()
