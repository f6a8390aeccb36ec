"""The shipped video-QA model (models/trained/video_qa): it loads with from_pretrained, answers the demo question
correctly, and its training record says how it was made; a slow test retrains it and reaches the recorded
validation accuracy within noise."""

from __future__ import annotations

import json
import math

import pytest

from models.tiny.video_qa import DEFAULTS, METRICS_FILE, SHIPPED_DIR


def test_the_shipped_model_loads_with_from_pretrained_and_answers_the_demo_question_correctly():
    from transformers import AutoProcessor

    from data.video_qa import demo_sample
    from models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
    from models.tiny.video_qa import generate_answers

    assert (SHIPPED_DIR / "model.safetensors").stat().st_size < 25 * 2**20
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(SHIPPED_DIR).eval()
    processor = AutoProcessor.from_pretrained(SHIPPED_DIR)
    demo = demo_sample()
    assert generate_answers(model, processor, [demo]) == [demo.answer]


def test_the_training_record_holds_the_command_settings_steps_time_and_validation_accuracy():
    record = json.loads((SHIPPED_DIR / METRICS_FILE).read_text())
    assert record["settings"] == DEFAULTS  # made by make train-video-base, as documented
    assert record["evaluations"][-1]["step"] == record["settings"]["steps"]
    last = record["evaluations"][-1]
    assert record["train_seconds"] > 0 and record["validation_accuracy"] == last["accuracy"]["all"]["accuracy"]
    assert last["size"] == record["settings"]["eval_size"] and last["split"] == "val"
    # the model learned the task: far above the majority answer of the validation questions overall
    majority = sum(c["majority"] for c in last["chance"].values()) / len(last["chance"])
    assert record["validation_accuracy"] > 2 * majority and record["num_parameters"] > 0


@pytest.mark.slow
def test_retraining_with_the_recorded_settings_reaches_the_recorded_validation_accuracy_within_noise(tmp_path):
    """About an hour on 2 cores (make train-video-base does the same)."""
    from models.tiny.video_qa import train

    record = json.loads((SHIPPED_DIR / METRICS_FILE).read_text())
    again = train(tmp_path / "model", checkpoint=tmp_path / "checkpoint.pt", log=lambda *_: None, **record["settings"])
    n = record["settings"]["eval_size"]
    p = record["validation_accuracy"]
    assert abs(again["validation_accuracy"] - p) <= 3 * math.sqrt(2 * p * (1 - p) / n) + 1e-9
