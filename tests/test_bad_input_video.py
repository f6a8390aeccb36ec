"""Fail fast, say why, write nothing: bad input to the three video CLIs and the PruneVid API, and Ctrl-C.

The CLIs (``scripts/run_video.py``, ``scripts/sweep_stage1.py``, ``scripts/eval_egoschema.py``) run as real
subprocesses in an empty working directory: a bad input must exit 2 with exactly one stderr line
``error: ...`` naming the flag or the problem, no traceback, and leave the directory as it was. Every
check runs before the model weights are loaded (the model's config and processor are read for the
layer count and the context length). ``Qwen25VLPruneVid`` raises a one-line ``ValueError`` instead.
A run interrupted by Ctrl-C exits 130 and leaves no partial stats or results file.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from data.demo_video import write_demo_video
from tests.script_loader import load_script, run_script_in_process, sigint_default

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = REPO_ROOT / "scripts"
PYTHON = str(REPO_ROOT / ".venv" / "bin" / "python") if (REPO_ROOT / ".venv" / "bin" / "python").exists() else sys.executable
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
HAS_CUDA = torch.cuda.is_available()
# 33,000 one-token words: past the embedded model's 32,768-token context (and short enough for one argv string)
TOO_LONG_QUESTION = " ".join(["x"] * 33_000)


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def snapshot(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*")}


def run_cli_process(script: str, argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, str(SCRIPTS / script), *argv], capture_output=True, text=True, cwd=cwd, env=ENV, timeout=120
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture
def workdir(tmp_path) -> Path:
    """An empty working directory with a plain file (``afile``) and a directory (``adir``) to misuse as outputs."""
    (tmp_path / "afile").write_text("not a directory\n")
    (tmp_path / "adir").mkdir()
    return tmp_path


CUDA_ONLY_ERROR = pytest.mark.skipif(HAS_CUDA, reason="this machine has a GPU: --device cuda is valid here")

CLI_CASES = [
    # ------------------------------------------------------------------ run_video.py: outputs
    pytest.param("run_video.py", ["--stats-json", "adir"], ["--stats-json", "is a directory"], id="run_video-stats-json-is-a-directory"),
    pytest.param("run_video.py", ["--stats-json", "afile/stats.json"], ["--stats-json", "which is a file"],
                 id="run_video-stats-json-under-a-file"),
    # ------------------------------------------------------------------ run_video.py: device
    pytest.param("run_video.py", ["--device", "banana"], ["--device 'banana' is not a device"], id="run_video-device-banana"),
    pytest.param("run_video.py", ["--device", "cuda"], ["--device cuda", "no CUDA GPU"], id="run_video-device-cuda-without-gpu",
                 marks=CUDA_ONLY_ERROR),
    # ------------------------------------------------------------------ run_video.py: knobs the preset ignores
    pytest.param("run_video.py", ["--preset", "baseline", "--keep-ratio", "0.1"],
                 ["--keep-ratio would be ignored", "--preset baseline", "stage 2", "--preset custom"],
                 id="run_video-baseline-ignores-keep-ratio"),
    pytest.param("run_video.py", ["--preset", "stage2_only", "--tau", "0.5"],
                 ["--tau would be ignored", "--preset stage2_only", "stage 1"], id="run_video-stage2_only-ignores-tau"),
    pytest.param("run_video.py", ["--preset", "stage1_only", "--no-cache-compression"],
                 ["--no-cache-compression would be ignored", "stage 2"], id="run_video-stage1_only-ignores-no-cache-compression"),
    # ------------------------------------------------------------------ run_video.py: ranges and the model's limits
    pytest.param("run_video.py", ["--pruning-layer", "99"], ["--pruning-layer", "pruning_layer=99", "4 layers", "0..3"],
                 id="run_video-pruning-layer-past-the-model"),
    pytest.param("run_video.py", ["--keep-ratio", "1.5"], ["--keep-ratio", "(0, 1]"], id="run_video-keep-ratio-out-of-range"),
    pytest.param("run_video.py", ["--num-frames", "0"], ["--num-frames must be >= 1"], id="run_video-num-frames-zero"),
    pytest.param("run_video.py", ["--num-frames", "4", "--max-new-tokens", "40000"],
                 ["--max-new-tokens", "max_new_tokens=40000", "context of 32768 tokens"], id="run_video-max-new-tokens-past-context"),
    pytest.param("run_video.py", ["--num-frames", "4", "-q", TOO_LONG_QUESTION],
                 ["question", "exceeds the model's context of 32768 tokens", "shorten the question"],
                 id="run_video-question-past-context"),
    pytest.param("run_video.py", [TOO_LONG_QUESTION], ["is not a usable path", "-q QUESTION"],
                 id="run_video-question-where-the-video-goes"),
    pytest.param("run_video.py", ["--model-path", "nobody/no-such-model"],
                 ["cannot load Qwen2.5-VL from 'nobody/no-such-model'", "offline by setting (HF_HUB_OFFLINE=1"],
                 id="run_video-hub-id-while-offline-says-offline-by-setting"),
    # ------------------------------------------------------------------ sweep_stage1.py
    pytest.param("sweep_stage1.py", ["--output", "adir"], ["--output", "is a directory"], id="sweep-output-is-a-directory"),
    pytest.param("sweep_stage1.py", ["--output", "afile/sweep.json"], ["--output", "which is a file"], id="sweep-output-under-a-file"),
    pytest.param("sweep_stage1.py", ["--device", "banana"], ["--device 'banana' is not a device"], id="sweep-device-banana"),
    pytest.param("sweep_stage1.py", ["--with-stage2", "--pruning-layer", "99"], ["--pruning-layer", "6 layers"],
                 id="sweep-pruning-layer-past-the-model"),
    # ------------------------------------------------------------------ eval_egoschema.py
    pytest.param("eval_egoschema.py", ["--output", "afile/results.json"], ["--output", "which is a file"],
                 id="eval-output-under-a-file"),
    pytest.param("eval_egoschema.py", ["--device", "cuda:3"], ["--device cuda:3"], id="eval-device-cuda-3-absent",
                 marks=pytest.mark.skipif(HAS_CUDA and torch.cuda.device_count() > 3, reason="cuda:3 exists here")),
    pytest.param("eval_egoschema.py", ["--limit", "1", "--num-frames", "8", "--max-new-tokens", "40000"],
                 ["max_new_tokens=40000", "context of 32768 tokens"], id="eval-max-new-tokens-past-context"),
]


@pytest.mark.parametrize("script, argv, needles", CLI_CASES)
def test_cli_bad_input_exits_2_with_one_line_naming_the_flag_and_writes_nothing(workdir, capsys, script, argv, needles):
    before = snapshot(workdir)
    # sweep / eval: their default output file would land in the working directory. In this process (the script's
    # own run_cli, as on the command line); test_a_bad_flag_in_a_fresh_interpreter_is_one_line runs one case as a process.
    proc = run_script_in_process(script.removesuffix(".py"),
                                 [*argv, "--no-progress"] if script != "run_video.py" else argv, capsys, cwd=workdir)
    assert_one_line_error(proc, *needles)
    assert proc.stdout == ""  # failed before any work (nothing printed, no model loaded)
    assert snapshot(workdir) == before


def test_a_bad_flag_in_a_fresh_interpreter_is_one_line(workdir):
    before = snapshot(workdir)
    proc = run_cli_process("run_video.py", ["--keep-ratio", "1.5"], workdir)
    assert_one_line_error(proc, "--keep-ratio", "(0, 1]")
    assert proc.stdout == "" and snapshot(workdir) == before


# ============================================================================= the Python API


@pytest.fixture(scope="module")
def pipe():
    from pipelines.prunevid import Qwen25VLPruneVid

    return Qwen25VLPruneVid(preset="default", num_frames=4)


@pytest.fixture(scope="module")
def video4(tmp_path_factory) -> Path:
    return write_demo_video(tmp_path_factory.mktemp("video") / "demo4.avi", num_frames=4)


@pytest.fixture
def no_weight_loading(monkeypatch):
    """Any attempt to read model weights fails the test: the checks must come first."""
    from models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLForConditionalGeneration

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the bad input was reported")

    monkeypatch.setattr(Qwen2_5_VLForConditionalGeneration, "from_pretrained", refuse)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        pytest.param(dict(device="banana"), "device 'banana' is not a device", id="device-banana"),
        pytest.param(dict(device="cuda"), "no CUDA GPU is available", id="device-cuda-without-gpu", marks=CUDA_ONLY_ERROR),
        pytest.param(dict(preset="baseline", keep_ratio=0.1), "keep_ratio=0.1 would be ignored: preset 'baseline' has stage 2",
                     id="baseline-ignores-keep-ratio"),
        pytest.param(dict(preset="stage1_only", pruning_layer=1), "pruning_layer=1 would be ignored", id="stage1_only-ignores-layer"),
        pytest.param(dict(preset="stage2_only", cluster_ratio=0.3), "cluster_ratio=0.3 would be ignored", id="stage2_only-ignores-cluster"),
        pytest.param(dict(pruning_layer=99), "pruning_layer=99 is out of range for a model with 6 layers", id="layer-past-the-model"),
        pytest.param(dict(num_frames=0), "num_frames must be an integer >= 1", id="num-frames-zero"),
    ],
)
def test_api_bad_configuration_is_a_one_line_value_error_before_the_weights_load(no_weight_loading, kwargs, message):
    from pipelines.prunevid import Qwen25VLPruneVid

    with pytest.raises(ValueError) as info:
        Qwen25VLPruneVid(**kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_api_question_past_the_context_is_a_one_line_value_error_not_a_truncation(pipe, video4):
    with pytest.raises(ValueError) as info:
        pipe.prepare_inputs(video4, TOO_LONG_QUESTION)
    message = str(info.value)
    assert "exceeds the model's context of 32768 tokens" in message and "shorten the question" in message
    assert "\n" not in message


def test_api_five_thousand_word_question_fits_the_context_and_is_kept_whole(pipe, video4):
    """Stated behaviour: no silent truncation. 5,000 words fit the 32,768-token context, so the whole question is used."""
    inputs = pipe.prepare_inputs(video4, " ".join(["word"] * 5_000))
    assert inputs["input_ids"].shape[1] > 5_000


def test_api_max_new_tokens_past_the_context_is_a_one_line_value_error(pipe, video4):
    inputs = pipe.prepare_inputs(video4, "What moves?")
    with pytest.raises(ValueError, match="max_new_tokens=40000 it exceeds the model's context of 32768 tokens"):
        pipe.generate_from_inputs(inputs, max_new_tokens=40_000)


# ============================================================================= Ctrl-C


def _interrupt_on_call(monkeypatch, number: int) -> None:
    """``Qwen25VLPruneVid.generate_from_inputs`` raises KeyboardInterrupt (as Ctrl-C does) on its ``number``-th call."""
    from pipelines.prunevid import Qwen25VLPruneVid

    original = Qwen25VLPruneVid.generate_from_inputs
    calls = {"n": 0}

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == number:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Qwen25VLPruneVid, "generate_from_inputs", interrupted)


def test_run_video_interrupted_mid_run_exits_130_and_writes_no_stats(monkeypatch, workdir, capsys):
    run_video = load_script("run_video")
    _interrupt_on_call(monkeypatch, 2)  # after the warm-up, during the first reported run
    before = snapshot(workdir)
    stats = workdir / "stats.json"
    with pytest.raises(SystemExit) as info:
        run_video.run_cli(lambda: run_video.main(["--num-frames", "4", "--max-new-tokens", "2", "--compare",
                                                  "--stats-json", str(stats)]))  # fmt: skip
    assert info.value.code == 130
    assert "interrupted" in capsys.readouterr().err
    assert not stats.exists() and snapshot(workdir) == before


def test_eval_egoschema_interrupted_mid_run_exits_130_and_writes_no_results(monkeypatch, workdir, capsys):
    evaluator = load_script("eval_egoschema")
    _interrupt_on_call(monkeypatch, 3)  # warm-up, first answer, then Ctrl-C
    before = snapshot(workdir)
    output = workdir / "results.json"
    with pytest.raises(SystemExit) as info:
        evaluator.run_cli(lambda: evaluator.main(["--limit", "2", "--num-frames", "8", "--max-new-tokens", "2",
                                                  "--presets", "baseline,default", "--no-progress",
                                                  "--output", str(output)]))  # fmt: skip
    assert info.value.code == 130
    assert not output.exists()  # no results JSON; the per-question records stay for --resume
    assert snapshot(workdir) == before | {"results.records.jsonl"}
    from evaluation.records import read_records

    header, records = read_records(workdir / "results.records.jsonl")
    assert header is not None and records == {}  # interrupted inside the first question: none complete


def test_sweep_sigint_mid_run_exits_130_within_seconds_and_leaves_no_file(workdir):
    """A real Ctrl-C (SIGINT) to the process while it is generating: exit 130, no results file, no temporary file."""
    output = workdir / "sweep.json"
    before = snapshot(workdir)
    proc = subprocess.Popen(
        [PYTHON, str(SCRIPTS / "sweep_stage1.py"), "--num-frames", "8", "--repeats", "20", "--output", str(output)],
        cwd=workdir, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
        preexec_fn=sigint_default,
    )  # fmt: skip
    try:
        seen = ""
        deadline = time.monotonic() + 90
        while "setting" not in seen:  # the progress bar ("setting ...") appears once the runs start
            assert time.monotonic() < deadline and proc.poll() is None, seen
            seen += proc.stderr.read(1)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        _, rest = proc.communicate(timeout=30)
        stopped_after = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, seen + rest
    assert "Traceback" not in seen + rest and "interrupted" in rest
    assert stopped_after < 10
    assert not output.exists() and snapshot(workdir) == before
