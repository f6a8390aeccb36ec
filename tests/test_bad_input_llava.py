"""System C's command-line tools fail fast and write atomically (train_llava_pruner, eval_llava_pruning, train_llava_base).

* every bad input is exit 2 with ONE stderr line ``error: ...`` naming the flag, no traceback, and
  nothing written, before any model is loaded;
* checkpoints carry a run id, the config (and its fingerprint) and the base model: ``--resume``
  skips unreadable checkpoints and those of another run, config or base with one line each and
  continues bit-identically from the newest good one; an unusable one named explicitly is a
  one-line error naming the last good one; a fresh run refuses a directory that holds a run;
* a save interrupted by a kill leaves the previous file intact;
* the evaluation refuses stages trained on another base.

All on the embedded tiny LLaVA (random weights; ``--model-path``): the trained shapes-VQA base is
never needed. Training runs are 4 steps of batch 2 (a few seconds each).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models.tiny.llava import tiny_llava_dir
from tests.script_loader import load_script

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TRAIN = ["--max-steps", "4", "--eval-size", "2", "--set", "batch_size=2", "--set", "eval_every=0",
         "--set", "log_every=1", "--set", "save_every=2"]


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"scripts/{script}.py", *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``root`` (hidden ones too) with its size and modification time."""
    return {str(p.relative_to(root)): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-2000:]
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)


def train(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return run("train_llava_pruner", "--task", "shapes", "--model-path", tiny_llava_dir(), *TRAIN, "--output-dir", out,
               *extra)


def final_weights(out: Path) -> dict:
    return torch.load(out / "pruning_final.pt", weights_only=True)


def assert_same_stages(a: Path, b: Path) -> None:
    sa, sb = final_weights(a)["state_dict"], final_weights(b)["state_dict"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    """An uninterrupted 4-step run: checkpoint-2, checkpoint-4, pruning_final.pt, pruning_last.pt, train_log.json."""
    out = tmp_path_factory.mktemp("llava_runs") / "full"
    result = train(out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train step" in result.stderr  # the bar says what it counts
    return out


def copy_checkpoints(full: Path, target: Path, *steps: int) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for step in steps:
        shutil.copytree(full / f"checkpoint-{step}", target / f"checkpoint-{step}")
    return target


# ----------------------------------------------------------------------------- bad input: one line, nothing written

RANDOM_BYTES = bytes(range(256)) * 20

BAD_INPUTS = {
    # train_llava_pruner.py
    "train_output_dir_is_a_file": ("train_llava_pruner", ["--output-dir", "{file}"], ["--output-dir", "is a file"]),
    "train_output_dir_under_a_file": ("train_llava_pruner", ["--output-dir", "{file}/run"],
                                      ["--output-dir", "which is a file"]),
    "train_max_steps_zero": ("train_llava_pruner", ["--max-steps", "0", "--output-dir", "{tmp}/out"], ["--max-steps"]),
    "train_threads_zero": ("train_llava_pruner", ["--threads", "0", "--output-dir", "{tmp}/out"], ["--threads"]),
    "train_set_without_value": ("train_llava_pruner", ["--set", "batch_size", "--output-dir", "{tmp}/out"],
                                ["--set expects KEY=VALUE"]),
    "train_set_unknown_key": ("train_llava_pruner", ["--set", "nokey=1", "--output-dir", "{tmp}/out"],
                              ["unknown key 'nokey'"]),
    "train_config_is_a_directory": ("train_llava_pruner", ["--config", "{tmp}", "--output-dir", "{tmp}/out"],
                                    ["--config", "is a directory"]),
    "train_model_path_missing": ("train_llava_pruner", ["--model-path", "{tmp}/no-model", "--output-dir", "{tmp}/out"],
                                 ["--model-path", "no such directory"]),
    "train_resume_path_missing": ("train_llava_pruner", ["--resume", "{tmp}/checkpoint-9", "--output-dir", "{tmp}/out"],
                                  ["--resume", "no checkpoint there"]),
    "train_resume_and_overwrite": ("train_llava_pruner", ["--resume", "--overwrite", "--output-dir", "{tmp}/out"],
                                   ["--resume", "--overwrite"]),
    "train_resume_random_bytes": ("train_llava_pruner", ["--resume", "{random}", "--output-dir", "{tmp}/out"],
                                  ["--resume", "not a torch.save file"]),
    # eval_llava_pruning.py
    "eval_output_is_a_directory": ("eval_llava_pruning", ["--methods", "random", "--output", "{tmp}"],
                                   ["--output", "is a directory"]),
    "eval_output_under_a_file": ("eval_llava_pruning", ["--methods", "random", "--output", "{file}/eval.json"],
                                 ["--output", "which is a file"]),
    "eval_fastv_layer_past_the_model": ("eval_llava_pruning", ["--methods", "fastv", "--fastv-layer", "99"],
                                        ["--fastv-layer 99", "8 layers", "1..7"]),
    "eval_checkpoint_random_bytes": ("eval_llava_pruning", ["--methods", "learned", "--checkpoint", "{random}"],
                                     ["--checkpoint", "not a torch.save file"]),
    "eval_checkpoint_empty": ("eval_llava_pruning", ["--methods", "learned", "--checkpoint", "{file}"],
                              ["--checkpoint", "empty"]),
    "eval_checkpoint_is_a_training_checkpoint": ("eval_llava_pruning", ["--methods", "learned", "--checkpoint",
                                                                        "{state}"],
                                                 ["--checkpoint", "training checkpoint: pass pruning_final.pt"]),
    "eval_seed_negative": ("eval_llava_pruning", ["--methods", "random", "--seed", "-1"], ["--seed"]),
    "eval_threads_zero": ("eval_llava_pruning", ["--methods", "random", "--threads", "0"], ["--threads"]),
    "eval_unknown_method": ("eval_llava_pruning", ["--methods", "random,magic"], ["--methods", "magic"]),
    "eval_stats_json_is_a_directory": ("eval_llava_pruning", ["--methods", "random", "--stats-json", "{tmp}"],
                                       ["--stats-json"]),
    "eval_visualize_is_a_file": ("eval_llava_pruning", ["--methods", "random", "--visualize", "{file}"],
                                 ["--visualize", "is a file"]),
    "eval_visualize_budget_zero": ("eval_llava_pruning", ["--methods", "random", "--visualize", "{tmp}/pics",
                                                          "--visualize-budget", "0"], ["--visualize-budget"]),
    "eval_visualize_more_than_asked": ("eval_llava_pruning", ["--methods", "random", "--visualize", "{tmp}/pics",
                                                              "--visualize-count", "9"], ["--visualize-count"]),
    "base_tower_steps_on_the_shapes_task": ("train_llava_base", ["--tower-steps", "5", "--output-dir", "{tmp}/base"],
                                            ["--tower-steps", "--task clutter"]),
    "base_clutter_other_settings_without_output_dir": ("train_llava_base", ["--task", "clutter", "--steps", "5"],
                                                       ["fixed settings", "--output-dir"]),
    "base_evidence_heads_three": ("train_llava_base", ["--task", "clutter", "--evidence-heads", "3", "--output-dir",
                                                       "{tmp}/base"], ["--evidence-heads"]),
    "base_tower_lr_zero": ("train_llava_base", ["--task", "clutter", "--tower-lr", "0", "--output-dir", "{tmp}/base"],
                           ["--tower-lr"]),
    "base_freeze_tower_not_0_or_1": ("train_llava_base", ["--freeze-tower", "2", "--output-dir", "{tmp}/base"],
                                     ["--freeze-tower"]),
    # train_llava_base.py
    "base_steps_zero": ("train_llava_base", ["--steps", "0", "--output-dir", "{tmp}/base"], ["--steps"]),
    "base_lr_not_a_number": ("train_llava_base", ["--lr", "nan", "--output-dir", "{tmp}/base"], ["--lr"]),
    "base_text_loss_not_0_or_1": ("train_llava_base", ["--text-loss", "2", "--output-dir", "{tmp}/base"],
                                  ["--text-loss"]),
    "base_output_dir_not_empty": ("train_llava_base", ["--steps", "2", "--output-dir", "{tmp}/full"],
                                  ["--output-dir", "not empty", "--force"]),
    "base_output_dir_is_a_file": ("train_llava_base", ["--steps", "2", "--output-dir", "{file}"],
                                  ["--output-dir", "is a file"]),
    "base_model_path_is_a_file": ("train_llava_base", ["--model-path", "{file}", "--output-dir", "{tmp}/base"],
                                  ["--model-path", "is a file"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_naming_the_flag_and_writes_nothing(case, tmp_path) -> None:
    script, args, needles = BAD_INPUTS[case]
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "random.pt").write_bytes(RANDOM_BYTES)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("someone's file\n")
    torch.save({"pruning": {}, "step": 1, "run_id": "x"}, tmp_path / "state.pt")
    values = {"tmp": tmp_path, "file": tmp_path / "empty.pt", "random": tmp_path / "random.pt",
              "state": tmp_path / "state.pt"}
    args = [a.format(**values) for a in args]
    defaults = {"--model-path": str(tiny_llava_dir()), "--task": "shapes"}  # tiny settings for what the case does not set
    if script == "eval_llava_pruning":
        defaults.update({"--eval-size": "2", "--output": str(tmp_path / "eval.json")})
    elif script == "train_llava_pruner":
        defaults.update({"--max-steps": "2", "--eval-size": "2"})
    else:
        defaults = {}
    for flag, value in defaults.items():
        if flag not in args:
            args += [flag, value]
    before = snapshot(tmp_path)
    result = run(script, *args)
    assert_one_line_error(result, *needles)
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------- checkpoints: resume


def test_resume_skips_a_truncated_newest_checkpoint_and_ends_where_the_uninterrupted_run_ends(full_run, tmp_path) -> None:
    out = copy_checkpoints(full_run, tmp_path / "run", 2, 4)
    state = out / "checkpoint-4" / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # killed mid-write (a non-atomic save)
    result = train(out, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipping checkpoint-4/state.pt: truncated or corrupt" in result.stdout, result.stdout
    assert "resuming from the last good checkpoint, checkpoint-2/state.pt (step 2)" in result.stdout
    assert "| 2/4 [" in result.stderr  # the resumed run's bar starts at the resumed step
    assert_same_stages(out, full_run)
    assert final_weights(out)["run_id"] == final_weights(full_run)["run_id"]  # the same run, continued


@pytest.mark.parametrize("fault", ["truncated", "empty", "random bytes"])
def test_an_unusable_checkpoint_named_by_resume_is_one_line_naming_the_last_good_one(fault, full_run, tmp_path) -> None:
    out = copy_checkpoints(full_run, tmp_path / "run", 2, 4)
    state = out / "checkpoint-4" / "state.pt"
    data = state.read_bytes()
    state.write_bytes({"truncated": data[:3000], "empty": b"", "random bytes": RANDOM_BYTES}[fault])
    before = snapshot(tmp_path)
    result = train(out, "--resume", out / "checkpoint-4")
    why = {"truncated": "truncated or corrupt", "empty": "empty", "random bytes": "not a torch.save file"}[fault]
    assert_one_line_error(result, "--resume", why, f"the last good checkpoint is {out / 'checkpoint-2'} (step 2)")
    assert snapshot(tmp_path) == before


def test_resume_with_no_usable_checkpoint_lists_each_and_why_in_one_line(full_run, tmp_path) -> None:
    out = copy_checkpoints(full_run, tmp_path / "run", 2, 4)
    (out / "checkpoint-4" / "state.pt").write_bytes(b"")
    (out / "checkpoint-2" / "state.pt").write_bytes(RANDOM_BYTES)
    before = snapshot(tmp_path)
    result = train(out, "--resume")
    assert_one_line_error(result, "--resume: no checkpoint of this run's config and base",
                          "checkpoint-4: empty", "checkpoint-2: not a torch.save file", "--overwrite")
    assert "skipping checkpoint-4/state.pt: empty" in result.stdout
    assert snapshot(tmp_path) == before


def test_resume_with_a_changed_config_is_one_line_naming_what_changed(full_run, tmp_path) -> None:
    out = copy_checkpoints(full_run, tmp_path / "run", 2)
    before = snapshot(tmp_path)
    result = train(out, "--resume", "--set", "lr_pruners=1e-3")
    assert_one_line_error(result, "checkpoint-2: another config (lr_pruners 2e-05 -> 0.001)")
    result = train(out, "--resume", out / "checkpoint-2", "--max-steps", "6")
    assert_one_line_error(result, "another config (max_steps 4 -> 6)")
    assert snapshot(tmp_path) == before


def test_resume_continues_the_run_in_the_log_not_a_newer_checkpoint_of_an_earlier_run(full_run, tmp_path) -> None:
    """checkpoint-4 is an earlier, finished run's; checkpoint-2 and train_log.json are the current run's."""
    out = copy_checkpoints(full_run, tmp_path / "run", 2, 4)
    state = torch.load(out / "checkpoint-2" / "state.pt", weights_only=True)
    state["run_id"] = "b" * 32
    torch.save(state, out / "checkpoint-2" / "state.pt")
    (out / "train_log.json").write_text(json.dumps({"run_id": "b" * 32}))
    result = train(out, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"skipping checkpoint-4/state.pt: from another run ({final_weights(full_run)['run_id'][:8]}" in result.stdout
    assert "resumed from" in result.stdout and "at step 2 (run bbbbbbbb)" in result.stdout
    assert final_weights(out)["run_id"] == "b" * 32
    assert_same_stages(out, full_run)


def test_a_fresh_run_refuses_a_directory_holding_another_run_and_resume_refuses_a_finished_one(full_run, tmp_path) -> None:
    out = tmp_path / "run"
    shutil.copytree(full_run, out)
    before = snapshot(tmp_path)
    result = train(out)
    assert_one_line_error(result, "--output-dir", "already holds a training run",
                          f"run {final_weights(full_run)['run_id'][:8]}", "--resume", "--overwrite")
    result = train(out, "--resume")
    assert_one_line_error(result, "already finished all 4 steps", "--overwrite")
    assert snapshot(tmp_path) == before


@pytest.mark.slow
def test_overwrite_replaces_the_previous_run_with_a_new_run_id_and_both_scripts_honour_threads(full_run, tmp_path) -> None:
    out = tmp_path / "run"
    shutil.copytree(full_run, out)
    (out / ".checkpoint-6.tmp-12345").mkdir()  # an interrupted save of the old run
    result = train(out, "--overwrite", "--set", "save_every=3", "--threads", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--overwrite: removed the previous run's" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-3", "checkpoint-4", "pruning_final.pt",
                                                     "pruning_last.pt", "train_log.json"]
    log = json.loads((out / "train_log.json").read_text())
    assert log["run_id"] != final_weights(full_run)["run_id"] and log["torch_threads"] == 2
    assert evaluate(out / "pruning_final.pt", tmp_path / "eval.json", "learned", threads=2)["timing"]["threads"] == 2


# ----------------------------------------------------------------------------- atomic saves


def test_a_save_killed_midway_leaves_the_previous_checkpoint_intact(full_run, tmp_path, monkeypatch) -> None:
    """torch.save writes half a file, then the process is interrupted: checkpoint and stage file stay as they were."""
    script = load_script("train_llava_pruner")
    out = copy_checkpoints(full_run, tmp_path / "run", 2)
    shutil.copyfile(full_run / "pruning_final.pt", out / "pruning_final.pt")
    before = snapshot(out)
    state = torch.load(out / "checkpoint-2" / "state.pt", weights_only=True)
    real_save = torch.save

    def killed_save(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        Path(path).write_bytes(Path(path).read_bytes()[:100])  # half written
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed_save)
    for step in (2, 4):  # replacing an existing checkpoint, and writing a new one
        with pytest.raises(KeyboardInterrupt):
            script.write_checkpoint(out / f"checkpoint-{step}", state, best=out / "pruning_final.pt")
    with pytest.raises(KeyboardInterrupt):
        script.save_torch({"state_dict": {}}, out / "pruning_final.pt")
    monkeypatch.undo()
    assert snapshot(out) == before  # no half file, no new folder, no temporary left behind
    assert torch.equal(script.read_checkpoint(out / "checkpoint-2" / "state.pt")["torch_rng"], state["torch_rng"])


def test_resume_after_a_kill_during_a_save_ignores_its_temporary_and_ends_where_the_uninterrupted_run_ends(
        full_run, tmp_path) -> None:
    """A SIGKILL between torch.save and the rename leaves ``.checkpoint-4.tmp-<pid>``: never read, removed on resume."""
    out = copy_checkpoints(full_run, tmp_path / "run", 2)
    leftover = out / ".checkpoint-4.tmp-99999"
    leftover.mkdir()
    (leftover / "state.pt").write_bytes((full_run / "checkpoint-4" / "state.pt").read_bytes()[:2000])
    result = train(out, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "removed .checkpoint-4.tmp-99999: a save that was interrupted" in result.stdout
    assert "resumed from" in result.stdout and not leftover.exists()
    assert_same_stages(out, full_run)


# ----------------------------------------------------------------------------- evaluation checks the base


def test_evaluation_refuses_stages_trained_on_another_base_naming_both(full_run, tmp_path) -> None:
    stages = torch.load(full_run / "pruning_final.pt", weights_only=True)
    assert stages["base_model"] == str(tiny_llava_dir().resolve()) and stages["base_fingerprint"]
    stages.update(base_model="/models/llava-1.5-7b-hf", base_fingerprint="0" * 64)
    torch.save(stages, tmp_path / "foreign.pt")
    before = snapshot(tmp_path)
    result = run("eval_llava_pruning", "--task", "shapes", "--model-path", tiny_llava_dir(), "--checkpoint",
                 tmp_path / "foreign.pt",
                 "--methods", "learned", "--eval-size", "2", "--output", tmp_path / "eval.json")
    assert_one_line_error(result, "--checkpoint", "trained on base '/models/llava-1.5-7b-hf'",
                          f"not on '{tiny_llava_dir().resolve()}'")
    assert snapshot(tmp_path) == before


def test_the_base_fingerprint_accepts_a_copy_and_rejects_changed_weights(tmp_path) -> None:
    from models.tiny.llava_vqa import base_identity, base_mismatch

    original = base_identity(tiny_llava_dir())
    copy = tmp_path / "copy"
    shutil.copytree(tiny_llava_dir(), copy)
    assert base_mismatch(original, base_identity(copy)) is None  # another path, the same model
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF  # one weight changed
    weights.write_bytes(bytes(data))
    assert "trained on base" in base_mismatch(original, base_identity(copy))


def evaluate(checkpoint: Path, output: Path, methods: str, threads: int) -> dict:
    result = run("eval_llava_pruning", "--task", "shapes", "--model-path", tiny_llava_dir(), "--checkpoint", checkpoint,
                 "--methods", methods, "--budgets", "0.5", "--eval-size", "2", "--batch-size", "2",
                 "--timing-batches", "1", "--threads", str(threads), "--output", output)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(output.read_text())


def test_evaluation_runs_stages_on_the_base_they_were_trained_on(full_run, tmp_path) -> None:
    report = evaluate(full_run / "pruning_final.pt", tmp_path / "eval.json", "learned,fastv", threads=1)
    assert [r["method"] for r in report["results"]] == ["unpruned", "learned", "learned", "fastv"]
    assert report["timing"]["threads"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.json", "eval.records.jsonl"]  # no temporary left
