"""The PruneVid experiment scripts: ``scripts/sweep_stage1.py``, ``scripts/eval_egoschema.py``, and the
EgoSchema format of ``data/egoschema.py`` (reader and generated set).

Everything runs on the embedded tiny Qwen2.5-VL with 8-frame videos, few settings and few questions;
the scripts are called in process (``main(argv)`` through ``run_cli``, as from the command line) and
once each as a real subprocess for the exit code.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.script_loader import load_script
import torch

from data.demo_video import CELL, FRAMES_PER_STEP, write_demo_video
from pipelines.video_io import load_video
from data.media import PALETTE
from data.egoschema import (
    DIRECTION_OPTIONS,
    OPTION_FIELDS,
    EgoSchemaError,
    MovingObject,
    find_video,
    load_answers,
    load_egoschema,
    make_synthetic_egoschema,
    parse_questions,
    synthetic_egoschema,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = REPO_ROOT / "scripts"


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Tiny matrices gain nothing from intra-op threads; on a busy 2-core machine they cost ~100x. Restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _load_script(name: str):
    return load_script(name)


@pytest.fixture(scope="module")
def sweep():
    return _load_script("sweep_stage1")


@pytest.fixture(scope="module")
def evaluator():
    return _load_script("eval_egoschema")


@pytest.fixture(scope="module")
def video8(tmp_path_factory) -> Path:
    return write_demo_video(tmp_path_factory.mktemp("video") / "demo8.avi", num_frames=8)


def run_in_process(module, argv, capsys) -> tuple[int, str, str]:
    """``module.main(argv)`` exactly as the command line runs it (``run_cli``): (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as info:
        module.run_cli(lambda: module.main(argv))
    out, err = capsys.readouterr()
    return info.value.code, out, err


def record(q_uid="clip-1", answer=None, **overrides) -> dict:
    rec = {"q_uid": q_uid, "question": "What does the person do?", **{f: f"choice {i}" for i, f in enumerate(OPTION_FIELDS)}}
    if answer is not None:
        rec["answer"] = answer
    rec.update(overrides)
    return rec


def write_set(root: Path, records, answers=None, videos=("clip-1",), ext=".mp4") -> tuple[Path, Path, Path | None]:
    root.mkdir(parents=True, exist_ok=True)
    (root / "videos").mkdir(exist_ok=True)
    questions = root / "questions.json"
    questions.write_text(json.dumps(records) if not isinstance(records, str) else records)
    answers_path = None
    if answers is not None:
        answers_path = root / "subset_answers.json"
        answers_path.write_text(json.dumps(answers))
    for q_uid in videos:
        (root / "videos" / f"{q_uid}{ext}").write_bytes(b"not decoded by the reader")
    return questions, root / "videos", answers_path


# ============================================================================= the stage-1 sweep


def test_sweep_writes_every_setting_with_token_counts_and_agreement(sweep, video8, tmp_path, capsys):
    output = tmp_path / "sweep.json"
    argv = [str(video8), "What moves?", "--taus", "0.7,0.9", "--cluster-ratios", "0.5", "--temporal-segment-ratios",
            "0.25,0.5", "--num-frames", "8", "--max-new-tokens", "3", "--repeats", "1", "--no-progress", "--output", str(output)]  # fmt: skip
    code, out, _ = run_in_process(sweep, argv, capsys)
    assert code == 0 and "results in" in out
    report = json.loads(output.read_text())
    assert {"command", "machine", "baseline", "settings", "grid", "note"} <= set(report)
    assert "sweep_stage1.py" in report["command"] and report["machine"]["device"] == "cpu"
    assert [(s["tau"], s["cluster_ratio"], s["temporal_segment_ratio"]) for s in report["settings"]] == [
        (0.7, 0.5, 0.25), (0.7, 0.5, 0.5), (0.9, 0.5, 0.25), (0.9, 0.5, 0.5)
    ]  # fmt: skip
    base = report["baseline"]
    assert base["token_agreement"] == 1.0 and base["exact_match"] is True  # baseline vs its warm-up run
    assert base["tokens_before_stage1"] == base["tokens_after_stage1"] == base["tokens_after"] == 64
    for s in report["settings"]:
        assert 1 <= s["tokens_after_stage1"] <= s["tokens_before_stage1"] == 64
        assert s["tokens_after"] == s["tokens_after_stage1"]  # stage 1 only by default
        assert s["stage1_compression"] == pytest.approx(1 - s["tokens_after_stage1"] / 64)
        assert s["static_tokens_before_stage1"] + s["dynamic_tokens_before_stage1"] == 64
        assert s["static_tokens_after_stage1"] + s["dynamic_tokens_after_stage1"] == s["tokens_after_stage1"]
        assert len(s["num_segments"]) == 1 and s["num_segments"][0] >= 1
        assert 0.0 <= s["token_agreement"] <= 1.0 and s["exact_match"] == (s["generated_ids"] == base["generated_ids"])
        assert s["ttft_s"] > 0 and s["ttft_speedup"] > 0
        assert set(s["kv_cache_length_per_layer"]) == {s["prompt_tokens"] - 64 + s["tokens_after_stage1"]}
    by_segment = {s["temporal_segment_ratio"]: s["num_segments"][0] for s in report["settings"] if s["tau"] == 0.7}
    assert by_segment[0.5] >= by_segment[0.25]  # more segments per frame -> more (or as many) segments


def test_sweep_with_stage2_prunes_after_stage1(sweep, video8, tmp_path, capsys):
    output = tmp_path / "sweep2.json"
    argv = [str(video8), "--taus", "0.8", "--cluster-ratios", "0.5", "--temporal-segment-ratios", "0.25", "--with-stage2",
            "--keep-ratio", "0.5", "--num-frames", "8", "--max-new-tokens", "2", "--repeats", "2", "--no-progress",
            "--output", str(output)]  # fmt: skip
    code, _, _ = run_in_process(sweep, argv, capsys)
    assert code == 0
    (setting,) = json.loads(output.read_text())["settings"]
    assert setting["tokens_after"] < setting["tokens_after_stage1"] < 64
    assert setting["keep_ratio"] == 0.5 and setting["pruning_layer"] == 1 and len(setting["ttft_s_runs"]) == 2


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--taus", "0.8,1.5"], "argument --taus: values must be in (0, 1], got 1.5"),
        (["--cluster-ratios", "0.3,x"], "argument --cluster-ratios: expected a comma-separated list of numbers"),
        (["--temporal-segment-ratios", "0.25,0.25"], "a value is listed twice"),
        (["--keep-ratio", "0.5"], "add --with-stage2"),
        (["--with-stage2", "--keep-ratio", "0"], "keep_ratio must be a number in (0, 1]"),
        (["--with-stage2", "--pruning-layer", "6", "--taus", "0.8", "--cluster-ratios", "0.5", "--temporal-segment-ratios", "0.25"],
         "pruning_layer=6 is out of range for a model with 6 layers"),
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["VIDEO", "--num-frames", "9"], "num_frames=9 is larger than the video's 8 frames"),
        (["missing.mp4"], "does not exist"),
        (["VIDEO", ""], "the question is empty"),
    ],
)
def test_sweep_bad_input_is_one_line_exit_2_and_writes_nothing(sweep, video8, tmp_path, capsys, argv, message):
    output = tmp_path / "out.json"
    argv = [str(video8) if a == "VIDEO" else str(tmp_path / a) if a.endswith(".mp4") else a for a in argv]
    code, out, err = run_in_process(sweep, [*argv, "--no-progress", "--output", str(output)], capsys)
    assert code == 2 and message in err and err.count("\n") == 1 and err.startswith("error: ")
    assert not output.exists()


# ============================================================================= the EgoSchema reader


def test_reader_accepts_the_official_list_layout_with_subset_answers(tmp_path):
    recs = [record("clip-1", google_drive_id="abc"), record("clip-2"), record("clip-3")]
    questions, videos, answers = write_set(tmp_path, recs, {"clip-1": 4, "clip-3": "0", "other": 1}, ("clip-1", "clip-3"))
    (videos / "clip-3.mp4").unlink()
    (videos / "clip-3.mkv").write_bytes(b"x")  # any container decord reads
    loaded = load_egoschema(questions, videos, answers, missing_answers="skip")
    assert [(q.q_uid, q.answer) for q in loaded] == [("clip-1", 4), ("clip-3", 0)]
    assert loaded[0].options == tuple(f"choice {i}" for i in range(5)) and loaded[0].question == "What does the person do?"
    assert loaded[0].video_path == videos / "clip-1.mp4" and loaded[1].video_path == videos / "clip-3.mkv"
    with pytest.raises(EgoSchemaError, match="record 1 \\(q_uid 'clip-2'\\) has no answer"):
        load_egoschema(questions, videos, answers)  # default: every question must be labelled
    with pytest.raises(EgoSchemaError, match="no video for q_uid 'clip-2'"):
        load_egoschema(questions, videos, answers, missing_answers="keep")  # kept, so its video is needed
    (videos / "clip-2.webm").write_bytes(b"x")
    kept = load_egoschema(questions, videos, answers, missing_answers="keep")
    assert [(q.answer, q.video_path.suffix) for q in kept] == [(4, ".mp4"), (None, ".webm"), (0, ".mkv")]
    assert [q.q_uid for q in load_egoschema(questions, videos, answers, missing_answers="keep", limit=2)] == ["clip-1", "clip-2"]


def test_reader_accepts_answer_fields_and_the_dict_keyed_by_q_uid(tmp_path):
    keyed = {"clip-1": {k: v for k, v in record(answer=2).items() if k != "q_uid"}}
    questions, videos, _ = write_set(tmp_path, keyed)
    (q,) = load_egoschema(questions, videos)
    assert (q.q_uid, q.answer) == ("clip-1", 2)
    (videos / "clip-1.avi").write_bytes(b"x")
    assert find_video(videos, "clip-1").suffix == ".mp4"  # .mp4 (the official layout) first
    assert load_answers(write_set(tmp_path / "b", [record()], {"clip-1": 3})[2]) == {"clip-1": 3}


@pytest.mark.parametrize(
    "records, answers, message",
    [
        ([{k: v for k, v in record(answer=1).items() if k != "option 3"}], None, "record 0 (q_uid 'clip-1'): missing field 'option 3'"),
        ([{k: v for k, v in record(answer=1).items() if k != "q_uid"}], None, "record 0: missing field 'q_uid'"),
        ([record(answer=5)], None, "answer 5 is out of range: must be an option index 0..4"),
        ([record(answer=True)], None, "answer must be an option index 0..4, got True"),
        ([record(answer="B")], None, "answer must be an option index 0..4, got 'B'"),
        ([record()], {"clip-1": 7}, "q_uid 'clip-1': answer 7 is out of range"),
        ([record(answer=1)], {"clip-1": 2}, "answer 1 disagrees with 2 in the answers file"),
        ([record()], None, "has no answer (no 'answer' field, no answers file)"),
        ([record(answer=1, question="  ")], None, "field 'question' must be a non-empty string"),
        ([record(answer=1, **{"option 2": 3})], None, "field 'option 2' must be a non-empty string, got 3"),
        ([record(answer=1, **{"option 5": "more"})], None, "exactly five options"),
        ([record(answer=1), record(answer=2)], None, "record 1 (q_uid 'clip-1'): duplicate q_uid (also record 0)"),
        ([record("../clip-1", answer=1)], None, "q_uid must be a plain file stem"),
        ([record("clip-9", answer=1)], None, "no video for q_uid 'clip-9'"),
        ([], None, "no questions in it"),
        ({"clip-1": record("clip-2", answer=1)}, None, "record keyed 'clip-1' has q_uid 'clip-2'"),
        ("[{]", None, "is not valid JSON"),
        ('"questions"', None, "expected a JSON list of question records"),
        ([record()], [["clip-1", 1]], "expected a JSON object mapping q_uid to an option index"),
    ],
)
def test_reader_rejects_bad_records_with_one_line_messages(tmp_path, records, answers, message):
    questions, videos, answers_path = write_set(tmp_path, records, answers)
    with pytest.raises(EgoSchemaError) as info:
        load_egoschema(questions, videos, answers_path)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_reader_rejects_missing_files_and_empty_videos(tmp_path):
    questions, videos, _ = write_set(tmp_path, [record(answer=0)])
    for call, message in [
        (lambda: load_egoschema(tmp_path / "nope.json", videos), "questions file '.*nope.json' does not exist"),
        (lambda: load_egoschema(questions, tmp_path / "novideos"), "video directory .* does not exist"),
        (lambda: load_egoschema(questions, videos, tmp_path / "no_answers.json"), "answers file .* does not exist"),
        (lambda: load_egoschema(questions, videos, missing_answers="maybe"), "missing_answers must be one of"),
    ]:
        with pytest.raises(EgoSchemaError, match=message):
            call()
    (videos / "clip-1.mp4").write_bytes(b"")
    with pytest.raises(EgoSchemaError, match="is empty"):
        load_egoschema(questions, videos)
    assert parse_questions([record(answer="3")])[0].answer == 3  # one-digit strings (some re-releases)


# ============================================================================= the generated set


def test_generated_set_is_deterministic_in_the_official_format_and_answerable(tmp_path):
    first = make_synthetic_egoschema(tmp_path / "a", num_questions=4, seed=3, num_frames=8)
    second = make_synthetic_egoschema(tmp_path / "b", num_questions=4, seed=3, num_frames=8)
    names = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(names) == 3 + 4
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    other = make_synthetic_egoschema(tmp_path / "c", num_questions=4, seed=4, num_frames=8)
    assert other.questions.read_bytes() != first.questions.read_bytes()

    records = json.loads(first.questions.read_text())
    answers = json.loads(first.answers.read_text())
    assert isinstance(records, list) and len(records) == 4
    for rec in records:  # exactly the official fields; answers only in subset_answers.json, as in the release
        assert set(rec) == {"q_uid", "question", *OPTION_FIELDS} and len(set(rec[f] for f in OPTION_FIELDS)) == 5
    assert set(answers) == {rec["q_uid"] for rec in records} and all(a in range(5) for a in answers.values())
    loaded = load_egoschema(first.questions, first.video_dir, first.answers)
    assert [q.answer for q in loaded] == [answers[rec["q_uid"]] for rec in records]

    # the correct option is true of the video: objects sit where the scene says, and the answer names them
    scenes = json.loads((tmp_path / "a" / "scenes.json").read_text())["videos"]
    for q in loaded:
        objects = [MovingObject(o["colour"], o["shape"], o["direction"], o["track"], o["start_cell"]) for o in scenes[q.q_uid]]
        frames = load_video(q.video_path, 8).frames
        for t in range(8):
            cells = [o.cell(t // FRAMES_PER_STEP, 4, 4) for o in objects]
            for obj, (r, c) in zip(objects, cells):
                if cells.count((r, c)) == 1:
                    assert tuple(frames[t, r * CELL + CELL // 2 + 4, c * CELL + CELL // 2]) == PALETTE[obj.colour]
        correct = q.options[q.answer]
        if q.question.startswith("Which direction does the "):
            colour = q.question.split()[4]
            assert correct == DIRECTION_OPTIONS[next(o.direction for o in objects if o.colour == colour)]
        elif q.question.startswith("What colour"):
            target = next(o for o in objects if o.colour == correct)
            assert q.question == f"What colour is the object that moves {DIRECTION_OPTIONS[target.direction]}?"
        else:
            assert correct == ("none", "one", "two", "three", "four")[len(objects)]


def test_cached_generated_set_is_built_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNING_MODELS_CACHE", str(tmp_path))
    files = synthetic_egoschema(num_questions=2, seed=0, num_frames=4)
    assert files.questions.parent.parent == tmp_path and (files.questions.parent / ".complete").exists()
    mtime = files.questions.stat().st_mtime_ns
    assert synthetic_egoschema(num_questions=2, seed=0, num_frames=4) == files and files.questions.stat().st_mtime_ns == mtime
    reference = make_synthetic_egoschema(tmp_path / "direct", num_questions=2, seed=0, num_frames=4)
    assert reference.questions.read_bytes() == files.questions.read_bytes()


# ============================================================================= the EgoSchema evaluator


def test_eval_egoschema_runs_two_questions_and_two_presets(evaluator, tmp_path, capsys):
    output = tmp_path / "ego.json"
    argv = ["--limit", "2", "--presets", "baseline,default", "--num-frames", "8", "--max-new-tokens", "1",
            "--no-progress", "--output", str(output)]  # fmt: skip
    code, out, _ = run_in_process(evaluator, argv, capsys)
    assert code == 0 and "chance level" in out and "baseline" in out and "default" in out
    report = json.loads(output.read_text())
    assert {"command", "machine", "summary", "questions", "note", "chance_level", "presets", "num_questions"} <= set(report)
    assert report["num_questions"] == 2 and report["generated_set"] is True and report["chance_level"] == 0.2
    assert "chance level (20%" in report["note"]
    assert set(report["summary"]) == {"baseline", "default"}
    keys = {"accuracy", "mean_tokens_before_stage1", "mean_tokens_after_stage1", "mean_tokens_before_stage2",
            "mean_tokens_after_stage2", "mean_total_compression", "mean_ttft_s", "mean_seconds_per_question",
            "agreement_with_baseline", "ttft_speedup", "num_labelled"}  # fmt: skip
    for name, s in report["summary"].items():
        assert keys <= set(s) and s["num_labelled"] == 2 and s["accuracy"] in (0.0, 0.5, 1.0)
        assert s["mean_tokens_before_stage1"] == 64 and s["mean_ttft_s"] > 0 and s["mean_seconds_per_question"] > 0
    base, default = report["summary"]["baseline"], report["summary"]["default"]
    assert base["agreement_with_baseline"] == 1.0 and base["mean_total_compression"] == 0.0
    assert default["mean_tokens_after_stage2"] < default["mean_tokens_after_stage1"] < 64
    assert default["mean_total_compression"] > 0.5 and default["agreement_with_baseline"] in (0.0, 0.5, 1.0)
    for q in report["questions"]:
        assert q["answer"] in range(5) and set(q["presets"]) == {"baseline", "default"}
        assert all(p["prediction"] in range(5) and p["correct"] == (p["prediction"] == q["answer"]) for p in q["presets"].values())


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--presets", "baseline,custom"], "argument --presets: unknown preset 'custom'"),
        (["--presets", "default,default"], "a preset is listed twice"),
        (["--questions", "Q"], "--questions needs --video-dir"),
        (["--answers", "A"], "pass its questions file with --questions too"),
        (["--questions", "Q", "--video-dir", "V"], "missing field 'option 4'"),
        (["--limit", "0"], "--limit must be >= 1"),
        (["--num-frames", "17", "--limit", "1"], "has 16 frames, fewer than --num-frames 17"),
        (["--missing-answers", "sometimes"], "argument --missing-answers: invalid choice"),
        (["--model-path", "NOMODEL", "--limit", "1", "--num-frames", "8"], "cannot load Qwen2.5-VL from"),
    ],
)
def test_eval_bad_input_is_one_line_exit_2_and_writes_nothing(evaluator, tmp_path, capsys, argv, message):
    output = tmp_path / "out.json"
    bad = {k: v for k, v in record(answer=1).items() if k != "option 4"}
    questions, videos, _ = write_set(tmp_path / "set", [bad])
    subst = {"Q": str(questions), "V": str(videos), "A": str(tmp_path / "a.json"), "NOMODEL": str(tmp_path / "nomodel")}
    argv = [subst.get(a, a) for a in argv]
    code, out, err = run_in_process(evaluator, [*argv, "--no-progress", "--output", str(output)], capsys)
    assert code == 2 and message in err and err.count("\n") == 1 and err.startswith("error: ")
    assert not output.exists()


@pytest.mark.parametrize(
    "script, argv, message",
    [
        ("sweep_stage1.py", ["--taus", "2"], "values must be in (0, 1]"),
        ("eval_egoschema.py", ["--questions", "MISSING", "--video-dir", "."], "does not exist"),
    ],
)
def test_scripts_exit_2_with_one_line_as_processes(tmp_path, script, argv, message):
    output = tmp_path / "out.json"
    argv = [str(tmp_path / "missing.json") if a == "MISSING" else a for a in argv]
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / script), *argv, "--output", str(output)],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stdout == "" and not output.exists()
