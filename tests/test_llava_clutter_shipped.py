"""The shipped cluttered-scene LLaVA base (models/trained/llava_clutter): it loads with from_pretrained, is the 224 px
tiny LLaVA, answers held-out colour / shape / relation / position questions, and its record says how it was made."""

from __future__ import annotations

import json

from models.tiny.llava_vqa import CLUTTER_BASE_DIR, CLUTTER_POSITION, METRICS_FILE


def test_the_shipped_base_loads_with_from_pretrained_and_answers_held_out_questions():
    from transformers import AutoProcessor

    from data.vqa_clutter import GRID, make_split
    from data.vqa_shapes import accuracy_by_type, generate_answers
    from models.llava.modeling_llava import LlavaForConditionalGeneration

    assert (CLUTTER_BASE_DIR / "model.safetensors").stat().st_size < 25 * 2**20
    model = LlavaForConditionalGeneration.from_pretrained(CLUTTER_BASE_DIR).eval()
    processor = AutoProcessor.from_pretrained(CLUTTER_BASE_DIR)
    assert model.config.image_seq_length == GRID * GRID
    samples = [s for s in make_split("heldout", 60, seed=7) if s.qtype in ("colour", "shape", "relation", "position")]
    accuracy = accuracy_by_type(samples, generate_answers(model, processor, samples))
    assert accuracy["all"] >= 0.9, accuracy  # chance: 0.125 / 0.33 / 0.125 / 0.5
    assert accuracy["position"] >= 0.75, accuracy


def test_the_record_holds_the_settings_time_and_held_out_accuracy_of_make_train_llava_base():
    record = json.loads((CLUTTER_BASE_DIR / METRICS_FILE).read_text())
    settings = {k: v for k, v in record["settings"].items() if k not in ("model_path", "task", "samples_seen")}
    assert settings == {k: v for k, v in CLUTTER_POSITION.items() if k != "eval_size"}  # make train-llava-base's phase 3
    assert record["eval_size"] == CLUTTER_POSITION["eval_size"] and record["train_seconds"] > 0
    assert [v["step"] for v in record["validation"]][-1] == CLUTTER_POSITION["steps"]
    assert record["accuracy"]["position"] >= 0.8  # relative position is learned (chance 0.5, majority 0.55)
    for qtype in ("colour", "shape", "count", "relation"):
        assert record["accuracy"][qtype] > 2 * record["chance"][qtype]["majority"], qtype
    assert "How it was made" in (CLUTTER_BASE_DIR / "README.md").read_text()
