"""Training the video-QA base: a tiny run writes a loadable model, its JSON log and a checkpoint that resumes."""

from __future__ import annotations

import json

import pytest
import torch

from tests.script_loader import load_script

TINY = ["--steps", "2", "--batch-size", "1", "--turns", "2", "--eval-size", "2", "--eval-every", "1", "--warmup", "1",
        "--text-hidden", "32", "--text-layers", "1", "--vision-hidden", "16", "--threads", "1"]


@pytest.fixture(scope="module")
def script():
    return load_script("train_video_base")


def test_a_tiny_run_saves_a_from_pretrained_model_its_log_and_resumes_from_its_checkpoint(script, tmp_path):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    out, checkpoint = tmp_path / "model", tmp_path / "run" / "checkpoint.pt"
    assert script.main([*TINY, "--output-dir", str(out), "--checkpoint", str(checkpoint)]) == 0
    log = json.loads(checkpoint.with_suffix(".json").read_text())
    assert [e["step"] for e in log["evaluations"]] == [1, 2]
    assert set(log["evaluations"][0]["accuracy"]) >= {"all", "colour", "direction", "order", "static"}
    record = json.loads((out / "training_record.json").read_text())
    assert record["settings"]["steps"] == 2 and 0.0 <= record["validation_accuracy"] <= 1.0
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    assert model.config.text_config.hidden_size == 32 and processor.video_processor.size["longest_edge"] == 224 * 224

    with pytest.raises(ValueError, match="other settings"):  # a checkpoint only continues the run it belongs to
        script.main([*TINY[:1], "4", *TINY[2:], "--output-dir", str(out), "--checkpoint", str(checkpoint), "--resume",
                     "--overwrite"])


def test_an_interrupted_run_resumed_from_its_checkpoint_ends_with_the_uninterrupted_runs_weights(script, tmp_path,
                                                                                                 monkeypatch):
    from safetensors.torch import load_file

    import data.video_qa

    script.main([*TINY, "--output-dir", str(tmp_path / "a"), "--checkpoint", str(tmp_path / "a.pt")])
    original = data.video_qa.make_conversation

    def interrupt_at_step_two(seed, split, index, turns):
        if index >= 1:  # batch size 1: the second step's sample
            raise KeyboardInterrupt
        return original(seed, split, index, turns)

    monkeypatch.setattr(data.video_qa, "make_conversation", interrupt_at_step_two)
    with pytest.raises(KeyboardInterrupt):
        script.main([*TINY, "--output-dir", str(tmp_path / "b"), "--checkpoint", str(tmp_path / "b.pt")])
    assert not (tmp_path / "b").exists() and torch.load(tmp_path / "b.pt", weights_only=True)["step"] == 1
    monkeypatch.setattr(data.video_qa, "make_conversation", original)
    script.main([*TINY, "--output-dir", str(tmp_path / "b"), "--checkpoint", str(tmp_path / "b.pt"), "--resume"])
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = json.loads((tmp_path / "b.json").read_text())
    assert [e["step"] for e in log["evaluations"]] == [1, 2]


def test_a_warm_start_begins_from_the_given_model_and_records_it(script, tmp_path):
    from safetensors.torch import load_file

    script.main([*TINY, "--output-dir", str(tmp_path / "a"), "--checkpoint", str(tmp_path / "a.pt")])
    script.main([*TINY, "--lr", "1e-12", "--init-from", str(tmp_path / "a"), "--output-dir", str(tmp_path / "b"),
                 "--checkpoint", str(tmp_path / "b.pt")])
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)  # two steps at lr 1e-12 from a's weights
    record = json.loads((tmp_path / "b" / "training_record.json").read_text())
    assert record["settings"]["init_from"] == str(tmp_path / "a")
    with pytest.raises(SystemExit):  # another size: refused before any work, one line
        script.run_cli(lambda: script.main([*TINY, "--text-hidden", "64", "--init-from", str(tmp_path / "a"),
                                            "--output-dir", str(tmp_path / "c"), "--checkpoint", str(tmp_path / "c.pt")]))
    assert not (tmp_path / "c").exists()


def test_bad_arguments_are_refused_before_any_work(script, tmp_path, capsys):
    cases = [
        (["--steps", "0"], "--steps must be >= 1"),
        (["--text-hidden", "48"], "--text-hidden must be a multiple of 32"),
        (["--resume", "--checkpoint", str(tmp_path / "none.pt")], "--resume: no checkpoint"),
        (["--init-from", str(tmp_path / "no_model")], "--init-from: no trained model"),
    ]
    for argv, message in cases:
        argv = argv if "--checkpoint" in argv else [*argv, "--checkpoint", str(tmp_path / "ck.pt")]
        with pytest.raises(SystemExit) as exit_info:
            script.run_cli(lambda: script.main([*argv, "--output-dir", str(tmp_path / "o")]))
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(SystemExit):
        script.run_cli(lambda: script.main(["--output-dir", str(tmp_path / "full"), "--checkpoint", str(tmp_path / "c.pt")]))
    assert "is not empty: pass --overwrite" in capsys.readouterr().err
