"""The evaluators shard over processes, gather exactly, record each item as it finishes, and resume.

Two CPU processes are started the way accelerate starts them on a machine without GPUs (its torchrun path,
``accelerate launch --multi_gpu --num_processes 2``); their merged per-item records must equal a one-process run's,
in the same order. A run cut short (its records file ending after some items, the last line torn) continues with
``--resume`` to the same records, and a changed configuration refuses to mix with them in one line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = REPO_ROOT / ".venv" / "bin"
PYTHON = str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "PYTHONPATH": str(REPO_ROOT)}
EGOSCHEMA = ["--synthetic-questions", "4", "--presets", "baseline,default", "--num-frames", "4", "--no-progress"]


def run(argv: list[str], processes: int = 1) -> subprocess.CompletedProcess:
    if processes == 1:
        command = [PYTHON, *argv]
    else:
        accelerate = str(VENV_BIN / "accelerate") if (VENV_BIN / "accelerate").exists() else shutil.which("accelerate")
        command = [accelerate, "launch", "--multi_gpu", "--num_processes", str(processes), "--main_process_port", "0",
                   *argv]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, env=ENV, timeout=300)


def deterministic(record: dict) -> dict:
    """A question's record without its wall times (which no two runs share)."""
    return {**record, "presets": {name: {k: v for k, v in preset.items() if k not in ("ttft_s", "seconds")}
                                  for name, preset in record["presets"].items()}}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("one") / "one.json"
    done = run(["scripts/eval_egoschema.py", *EGOSCHEMA, "--output", str(out)])
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text())


def test_two_processes_give_the_one_process_records_in_the_same_order(one_process, tmp_path) -> None:
    out = tmp_path / "two.json"
    done = run(["scripts/eval_egoschema.py", *EGOSCHEMA, "--output", str(out)], processes=2)
    assert done.returncode == 0, done.stderr[-2000:]
    two = json.loads(out.read_text())
    assert two["processes"] == 2 and one_process["processes"] == 1
    assert [deterministic(r) for r in two["questions"]] == [deterministic(r) for r in one_process["questions"]]
    for name, summary in two["summary"].items():  # accuracy and agreement as one process; no times
        assert summary["accuracy"] == one_process["summary"][name]["accuracy"]
        assert summary["agreement_with_baseline"] == one_process["summary"][name]["agreement_with_baseline"]
        assert summary["mean_ttft_s"] is None and summary["ttft_speedup"] is None
    assert "accuracy and agreement only" in two["timing_note"] and "timing_note" not in one_process
    lines = (tmp_path / "two.records.jsonl").read_text().splitlines()
    assert len(lines) == 1 + len(one_process["questions"])  # the header, then one line per question


def test_an_interrupted_run_resumes_to_the_same_records(one_process, tmp_path) -> None:
    out = tmp_path / "run.json"
    records = tmp_path / "run.records.jsonl"
    first = run(["scripts/eval_egoschema.py", *EGOSCHEMA, "--output", str(out)])
    assert first.returncode == 0, first.stderr[-2000:]
    lines = records.read_bytes().split(b"\n")
    records.write_bytes(b"\n".join(lines[:3]) + b"\n" + lines[3][:20])  # header + 2 questions + a torn third
    out.unlink()
    resumed = run(["scripts/eval_egoschema.py", *EGOSCHEMA, "--output", str(out), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "2 of this process's 4 questions already recorded" in resumed.stdout
    report = json.loads(out.read_text())
    assert report["resumed_questions"] == 2
    assert [deterministic(r) for r in report["questions"]] == [deterministic(r) for r in one_process["questions"]]
    assert len(records.read_text().splitlines()) == 5

    other = [("8" if previous == "--num-frames" else arg) for previous, arg in zip([None, *EGOSCHEMA], EGOSCHEMA)]
    changed = run(["scripts/eval_egoschema.py", *other, "--output", str(out), "--resume"])  # another configuration
    assert changed.returncode == 2 and "Traceback" not in changed.stderr
    assert changed.stderr.count("\n") == 1 and "another configuration (num_frames: 4 -> 8)" in changed.stderr
    assert len(records.read_text().splitlines()) == 5  # the records are left as they were


VIDEO = ["--num-videos", "4", "--methods", "baseline,default,random", "--no-progress"]
TIMES = ("ttft_s", "decode_tokens_per_s", "generate_s", "peak_memory_bytes")


def video_records(path: Path) -> dict:
    """eval_video's records without their wall times and memory peaks."""
    from evaluation.records import read_records

    return {key: {method: {k: v for k, v in result.items() if k not in TIMES} for method, result in record.items()}
            for key, record in read_records(path)[1].items()}


def test_video_evaluation_sharded_and_resumed_equals_one_process(tmp_path) -> None:
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    done = run(["scripts/eval_video.py", *VIDEO, "--stats-json", str(one)])
    assert done.returncode == 0, done.stderr[-2000:]
    done = run(["scripts/eval_video.py", *VIDEO, "--stats-json", str(two)], processes=2)
    assert done.returncode == 0, done.stderr[-2000:]
    reference = video_records(tmp_path / "one.records.jsonl")
    assert video_records(tmp_path / "two.records.jsonl") == reference  # per question and phase, random included
    a, b = json.loads(one.read_text())["methods"], json.loads(two.read_text())["methods"]
    assert list(a) == list(b) and "random_25pct" in a
    for name in a:
        assert (b[name]["accuracy"], b[name]["agreement_with_baseline"]) == (a[name]["accuracy"],
                                                                             a[name]["agreement_with_baseline"])
        assert b[name]["ttft_ratio"] is None and a[name]["ttft_ratio"] is not None

    records = tmp_path / "two.records.jsonl"  # cut after the first phase's records of 3 questions
    lines = records.read_bytes().split(b"\n")
    records.write_bytes(b"\n".join(lines[:4]) + b"\n")
    two.unlink()
    resumed = run(["scripts/eval_video.py", *VIDEO, "--stats-json", str(two), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads(two.read_text())["resumed_records"] == 3
    assert video_records(records) == reference


EDIT = ["--num-edits", "3", "--methods", "baseline,identity,kv_once,mag_cache", "--no-zero-cond-t"]


def edit_records(path: Path) -> dict:
    from evaluation.records import read_records

    return {key: {method: {k: v for k, v in scores.items() if k != "seconds"} for method, scores in record.items()}
            for key, record in read_records(path)[1].items()}


def test_edit_evaluation_sharded_and_resumed_equals_one_process(tmp_path) -> None:
    done = run(["scripts/eval_edit.py", *EDIT, "-o", str(tmp_path / "one")])
    assert done.returncode == 0, done.stderr[-2000:]
    done = run(["scripts/eval_edit.py", *EDIT, "-o", str(tmp_path / "two")], processes=2)
    assert done.returncode == 0, done.stderr[-2000:]
    reference = edit_records(tmp_path / "one" / "eval_edit.records.jsonl")
    assert len(reference) == 3 and edit_records(tmp_path / "two" / "eval_edit.records.jsonl") == reference
    a = json.loads((tmp_path / "one" / "eval_edit.json").read_text())["methods"]
    b = json.loads((tmp_path / "two" / "eval_edit.json").read_text())["methods"]
    timing = ("speedup_measured", "transformer_seconds")
    assert {m: {k: v for k, v in r.items() if k not in timing} for m, r in b.items()} == \
        {m: {k: v for k, v in r.items() if k not in timing} for m, r in a.items()}
    assert b["kv_once"]["speedup_measured"] is None and a["kv_once"]["speedup_measured"] is not None

    records = tmp_path / "two" / "eval_edit.records.jsonl"
    records.write_bytes(b"\n".join(records.read_bytes().split(b"\n")[:2]) + b"\n")  # the header and one edit
    resumed = run(["scripts/eval_edit.py", *EDIT, "-o", str(tmp_path / "two"), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((tmp_path / "two" / "eval_edit.json").read_text())["resumed_records"] == 1
    assert edit_records(records) == reference


LLAVA = ["--num-questions", "12", "--batch-size", "4", "--methods", "untrained,random,divprune", "--budgets", "0.25",
         "--threads", "1"]


def test_llava_evaluation_sharded_and_resumed_equals_one_process(tmp_path) -> None:
    """Batches are fixed by the question order (4 + 4 + 4 here, split 2 / 1 between the processes), so every
    answer, the random baseline's included, is the one-process answer."""
    from evaluation.records import read_records

    one, two = tmp_path / "one.json", tmp_path / "two.json"
    done = run(["scripts/eval_llava_pruning.py", *LLAVA, "--output", str(one)])
    assert done.returncode == 0, done.stderr[-2000:]
    done = run(["scripts/eval_llava_pruning.py", *LLAVA, "--output", str(two)], processes=2)
    assert done.returncode == 0, done.stderr[-2000:]
    reference = read_records(tmp_path / "one.records.jsonl")[1]
    assert len(reference) == 12 and read_records(tmp_path / "two.records.jsonl")[1] == reference
    a, b = json.loads(one.read_text())["results"], json.loads(two.read_text())["results"]
    assert [(r["method"], r["budget"], r["accuracy"], r["agreement_with_unpruned"]) for r in b] == \
        [(r["method"], r["budget"], r["accuracy"], r["agreement_with_unpruned"]) for r in a]
    assert all(r["prefill_time_ratio"] is None for r in b) and all(r["prefill_time_ratio"] for r in a)

    records = tmp_path / "two.records.jsonl"
    records.write_bytes(b"\n".join(records.read_bytes().split(b"\n")[:5]) + b"\n")  # one batch of 4 recorded
    resumed = run(["scripts/eval_llava_pruning.py", *LLAVA, "--output", str(two), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads(two.read_text())["resumed_records"] == 4
    assert read_records(records)[1] == reference
    changed = run(["scripts/eval_llava_pruning.py", *LLAVA[:-2], "--threads", "1", "--seed", "3", "--output", str(two),
                   "--resume"])
    assert changed.returncode == 2 and changed.stderr.count("\n") == 1 and "another configuration" in changed.stderr
