"""Bad input and faults on the edit path: ``scripts/run_with_token_pruning.py`` and ``TokenPruningQwenImageEditPipeline``.

Every bad input to the CLI is refused before the model is loaded: exit 2, exactly one stderr line
``error: ...`` that names the flag and the rule, no traceback, nothing written. Every bad argument to the
API is one ``ValueError`` line naming the argument. Faults: Ctrl-C during denoising exits 130 and
leaves no file; an interruption while the outputs are written leaves none of them (all or nothing).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cli import UserError, run_cli, write_outputs
from data.media import make_sample_image
from models.tiny.qwenimage_edit import tiny_qwenimage_edit_dir
from pipelines.qwenimage_edit import TokenPruningQwenImageEditPipeline
from pipelines.qwenimage_edit_limits import EditInputError, LoRALoadError, hub_failure_reason
from tests.script_loader import load_script, run_script_in_process, sigint_default

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "scripts" / "run_with_token_pruning.py"
FAST = ("--height", "64", "--width", "64", "-s", "2")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def run_edit(*args, cwd, env=None, timeout=300):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=cwd,
                          env=env or ENV, timeout=timeout)


def assert_one_line_error(stderr: str, *needles: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def leftovers(root: Path) -> list[str]:
    """Temporary files of an atomic write that were not cleaned up."""
    return [str(p) for p in root.rglob("*") if ".tmp-" in p.name]


# ----------------------------------------------------------------------------- CLI: refused before the model loads


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "a_file").write_text("keep me")
    (tmp_path / "a_dir").mkdir()
    return tmp_path


CLI_CASES = {
    "output_dir_that_is_a_file": (["-o", "a_file"], ["-o/--output_dir", "is a file"]),
    "output_dir_under_a_file": (["-o", "a_file/out"], ["-o/--output_dir", "which is a file"]),
    "stats_json_that_is_a_directory": (["--stats-json", "a_dir"], ["--stats-json", "is a directory"]),
    "stats_json_under_a_file": (["--stats-json", "a_file/stats.json"], ["--stats-json", "which is a file"]),
    "size_beyond_max_image_seq_len": (["--height", "10000", "--width", "10000"],
                                      ["--height x --width", "390625 image tokens", "at most 8192", "max_image_seq_len"]),
    "derived_height_times_huge_width": (["--width", "100000"], ["from the reference image", "at most 8192"]),
    "size_beyond_rope_positions": (["--height", "16", "--width", "131072"], ["4096 RoPE positions"]),
    "height_not_a_multiple_of_16": (["--height", "17"], ["--height", "multiple of 16", "got 17"]),
    "width_zero": (["--width", "0"], ["--width", "multiple of 16", "got 0"]),
    "device_banana": (["--device", "banana"], ["--device 'banana' is not a device"]),
    "missing_local_lora": (["--lora", "/nonexistent/lightning.safetensors"],
                           ["--lora '/nonexistent/lightning.safetensors'", "no such LoRA file"]),
    "lora_dir_without_the_weight_file": (["--lora", "a_dir", "--lora-weight-name", "w.safetensors"],
                                         ["--lora 'a_dir'", "no file --lora-weight-name='w.safetensors'"]),
    "hub_lora_while_offline_by_setting": (["--lora", "owner/lora-repo", "--lora-weight-name", "w.safetensors"],
                                          ["--lora 'owner/lora-repo'", "offline by setting (HF_HUB_OFFLINE=1"]),
    "lora_weight_name_without_lora": (["--lora-weight-name", "w.safetensors"], ["without --lora"]),
    "max_sequence_length_beyond_1024": (["--max-sequence-length", "5000"], ["--max-sequence-length", "1 to 1024"]),
    "cfg_not_a_number": (["--cfg", "nan"], ["--cfg", "got nan"]),
}


@pytest.mark.parametrize("args, needles", CLI_CASES.values(), ids=CLI_CASES.keys())
def test_cli_bad_input_is_one_line_naming_the_flag_and_writes_nothing(workdir, capsys, args, needles):
    out, stats = workdir / "out", workdir / "stats.json"
    sizes = [] if {"--height", "--width"} & set(args) else ["--height", "64", "--width", "64"]
    argv = ["-o", str(out), "--stats-json", str(stats), "-s", "2", *sizes, *args]  # later flags win
    start = time.perf_counter()
    proc = run_script_in_process("run_with_token_pruning", argv, capsys, cwd=workdir)  # run_cli, as on the command line
    assert proc.returncode == 2, proc.stderr
    assert_one_line_error(proc.stderr, *needles)
    assert not out.exists() and not stats.exists() and not leftovers(workdir)
    assert (workdir / "a_file").read_text() == "keep me" and not any((workdir / "a_dir").iterdir())
    assert time.perf_counter() - start < 60  # refused before the model is loaded (no denoising)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cli_cuda_without_a_gpu_is_one_line(workdir):
    proc = run_edit("-o", str(workdir / "out"), *FAST, "--device", "cuda", cwd=workdir)
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr, "--device cuda", "no CUDA GPU")
    assert not (workdir / "out").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only directory")
def test_cli_read_only_output_dir_is_one_line(workdir):
    locked = workdir / "locked"
    locked.mkdir(mode=0o555)
    try:
        proc = run_edit("-o", str(locked / "out"), *FAST, cwd=workdir)
    finally:
        locked.chmod(0o755)
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr, "-o/--output_dir", "not writable")
    assert not (locked / "out").exists()


# ----------------------------------------------------------------------------- API: one ValueError line


@pytest.fixture(scope="module")
def pipe():
    pipe = TokenPruningQwenImageEditPipeline.from_pretrained(tiny_qwenimage_edit_dir())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def image():
    return make_sample_image()


API_CASES = {
    "width_zero_is_not_1024": (dict(width=0), "width must be a positive multiple of 16"),
    "height_17_is_not_rounded_to_16": (dict(height=17), "height must be a positive multiple of 16"),
    "height_float": (dict(height=64.0), "height must be a positive multiple of 16"),
    "image_none": (dict(image=None), "image must be the reference image as a PIL.Image.Image"),
    "image_a_path": (dict(image="photo.png"), "image must be the reference image as a PIL.Image.Image"),
    "image_empty_list": (dict(image=[]), "got an empty list"),
    "image_an_array": (dict(image=np.zeros((64, 64, 3), dtype=np.uint8)), "PIL.Image.Image .*got ndarray"),
    "size_beyond_max_image_seq_len": (dict(height=10000, width=10000), "at most 8192"),
    "zero_steps": (dict(num_inference_steps=0), "num_inference_steps must be an integer >= 1"),
    "max_sequence_length_beyond_1024": (dict(max_sequence_length=2000), "max_sequence_length must be an integer"),
    "prompt_beyond_rope_positions": (dict(height=16, width=16 * 8150), "more than the transformer's 4096"),
}


@pytest.mark.parametrize("kwargs, message", API_CASES.values(), ids=API_CASES.keys())
def test_api_bad_argument_is_one_line_value_error_naming_it(pipe, image, kwargs, message):
    call = dict(image=image, prompt="make it blue", height=64, width=64, num_inference_steps=2, true_cfg_scale=1.0,
                output_type="np", pruning_mode="kv")
    with pytest.raises(ValueError, match=message) as caught:
        pipe(**{**call, **kwargs})
    assert isinstance(caught.value, EditInputError) and "\n" not in str(caught.value)
    assert pipe._rope_check is None  # no per-call state survives a refused call


def test_api_prompt_beyond_max_sequence_length_is_truncated_with_a_warning(pipe, image, caplog):
    long_prompt = " ".join(f"word{i}" for i in range(5000))  # ~34k tokens: the stock call fails at the RoPE table
    with caplog.at_level(logging.WARNING, logger="pipelines.qwenimage_edit"):
        out = pipe(image=image, prompt=long_prompt, height=64, width=64, num_inference_steps=2, true_cfg_scale=1.0,
                   output_type="np", max_sequence_length=64).images
    assert out.shape == (1, 64, 64, 3) and torch.isfinite(torch.as_tensor(out)).all()
    assert any("truncated to its first 64 tokens" in r.getMessage() for r in caplog.records)


def test_api_progress_bar_says_it_counts_denoising_steps(pipe):
    import io

    saved = pipe._progress_bar_config
    try:
        for config, label in ((dict(), "denoise: "), (dict(desc="mine"), "mine: ")):  # the caller's label wins
            shown = io.StringIO()
            pipe.set_progress_bar_config(file=shown, **config)
            with pipe.progress_bar(total=2) as bar:
                bar.update()
            assert label in shown.getvalue() and "step" in shown.getvalue()
    finally:
        pipe._progress_bar_config = saved


def test_api_missing_lora_names_the_lora_not_the_model():
    with pytest.raises(LoRALoadError, match=r"lora '/nonexistent': no such LoRA file") as caught:
        TokenPruningQwenImageEditPipeline.from_pretrained(tiny_qwenimage_edit_dir(), lora="/nonexistent")
    assert "model" not in str(caught.value)


def test_api_broken_lora_file_names_the_lora(tmp_path):
    broken = tmp_path / "lightning.safetensors"
    broken.write_bytes(b"not a safetensors file")
    with pytest.raises(LoRALoadError, match=r"cannot load the LoRA .*lightning.safetensors.*holds no LoRA"):
        TokenPruningQwenImageEditPipeline.from_pretrained(tiny_qwenimage_edit_dir(), lora=str(broken))


def test_hub_failure_says_offline_by_setting_or_unreachable(monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    def chained(outer, inner):
        try:
            try:
                raise inner
            except Exception as error:
                raise outer from error
        except Exception as error:
            return error

    unreachable = chained(OSError("no file named w.safetensors"), LocalEntryNotFoundError("cannot reach"))
    unreachable.__cause__.__cause__ = ConnectionRefusedError(111, "Connection refused")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "offline by setting (HF_HUB_OFFLINE=1" in hub_failure_reason(unreachable)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert "could not be reached" in hub_failure_reason(unreachable)
    assert "offline" not in hub_failure_reason(unreachable)
    not_found = RepositoryNotFoundError.__new__(RepositoryNotFoundError)  # its __init__ wants an HTTP response
    Exception.__init__(not_found, "404")
    missing = chained(OSError("no such repo"), not_found)
    assert "no such repository" in hub_failure_reason(missing)


# ----------------------------------------------------------------------------- faults: Ctrl-C, interrupted writes


def test_ctrl_c_during_denoising_exits_130_within_seconds_and_writes_nothing(tmp_path):
    out, stats = tmp_path / "out", tmp_path / "stats.json"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "-o", str(out), "--stats-json", str(stats),
                             "--height", "64", "--width", "64", "-s", "500", "--pruning-mode", "kv"],
                            cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=sigint_default)
    seen, deadline = b"", time.monotonic() + 240
    try:
        while b"denoise (kv)" not in seen and time.monotonic() < deadline:  # the labelled bar: denoising has begun
            chunk = os.read(proc.stderr.fileno(), 4096)
            if not chunk:
                break
            seen += chunk
        assert b"denoise (kv)" in seen, seen.decode(errors="replace")[-2000:]
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert time.monotonic() - sent < 10
    shown = (seen + err).decode(errors="replace")
    assert "\ninterrupted\n" in shown.replace("\r", "\n")  # run_cli's line; around it only the denoise bar
    assert "Traceback" not in shown and "Exception ignored" not in shown
    assert not out.exists() and not stats.exists() and not leftovers(tmp_path)


def test_interruption_while_writing_outputs_leaves_none_of_them(tmp_path, monkeypatch, capsys):
    script = load_script("run_with_token_pruning")
    calls = []

    def png_writer(picture):
        calls.append(picture)
        if len(calls) == 2:  # the second image: the first is already on disk under its temporary name
            def interrupted(tmp):
                tmp.write_bytes(b"half a png")
                raise KeyboardInterrupt
            return interrupted
        return lambda tmp: picture.save(tmp, format="PNG")

    monkeypatch.setattr(script, "png_writer", png_writer)
    out, stats = tmp_path / "new" / "out", tmp_path / "stats.json"
    with pytest.raises(SystemExit) as exited:
        run_cli(lambda: script.main(["-o", str(out), "--stats-json", str(stats), *FAST, "--pruning-mode", "mlp"]))
    assert exited.value.code == 130 and len(calls) == 2
    assert "interrupted" in capsys.readouterr().err
    assert not (tmp_path / "new").exists() and not stats.exists() and not leftovers(tmp_path)


def test_failed_write_keeps_the_previous_files_intact(tmp_path):
    old = tmp_path / "stats.json"
    old.write_text("previous")

    def fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_outputs({old: lambda tmp: tmp.write_text("new"), tmp_path / "deep" / "img.png": fail})
    assert old.read_text() == "previous" and not (tmp_path / "deep").exists() and not leftovers(tmp_path)


def test_limit_that_only_the_loaded_pipeline_knows_is_one_line_in_the_cli(monkeypatch, tmp_path):
    """A size that passes the pre-load checks but leaves the prompt too few RoPE positions: still one line."""
    script = load_script("run_with_token_pruning")
    with pytest.raises(UserError, match="more than the transformer's 4096"):
        script.main(["-o", str(tmp_path / "out"), "--height", "16", "--width", str(16 * 8150), "-s", "2"])
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- the hub, when it is not offline by setting


@pytest.mark.slow
def test_cli_unreachable_hub_lora_says_unreachable_not_offline(tmp_path):
    """HF_HUB_OFFLINE=0 and no hub (a closed port): huggingface_hub retries for ~30 s, then one error line."""
    env = {**ENV, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}
    proc = run_edit("-o", str(tmp_path / "out"), *FAST, "--lora", "owner/lora-repo", "--lora-weight-name",
                    "w.safetensors", cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]  # above it: huggingface_hub's own retry warnings
    assert last.startswith("error: cannot load the LoRA 'owner/lora-repo'") and "could not be reached" in last
    assert "offline by setting" not in last and not (tmp_path / "out").exists()
