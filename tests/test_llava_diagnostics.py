"""The diagnostics behind BENCHMARKS C's explanations run on the shipped clutter base and report what they claim."""

from __future__ import annotations

import json

from tests.script_loader import run_script_in_process


def test_the_teacher_diagnostic_reports_recall_above_random_and_the_oracle_accuracies(tmp_path, capsys) -> None:
    out = tmp_path / "teacher.json"
    done = run_script_in_process("diagnose_llava_teacher", ["--num-questions", "10", "--keep", "64", "--batch-size", "5",
                                                            "--output", str(out)], capsys)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert report["random_recall"] == 0.25 and set(report["recall_mean_heads"]) == {str(i) for i in range(8)}
    assert report["recall_groups"]["all layers"] > 0.5  # the trained base attends to the asked objects
    for accuracy in report["oracle_accuracy"].values():
        assert 0.0 <= accuracy["all"] <= 1.0 and "count" in accuracy


def test_the_position_diagnostic_probes_every_layer(tmp_path, capsys) -> None:
    out = tmp_path / "position.json"
    done = run_script_in_process("diagnose_llava_position", ["--fit-questions", "40", "--test-questions", "20",
                                                             "--output", str(out)], capsys)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert [row["layer"] for row in report["layers"]] == list(range(9))  # embeddings + 8 layers
    assert report["layers"][-1]["answer"] >= 0.8  # the shipped base answers position questions
    bad = run_script_in_process("diagnose_llava_position", ["--fit-questions", "2"], capsys)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
