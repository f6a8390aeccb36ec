"""The cluttered-scene VQA task (``data/vqa_clutter.py``): every answer follows from the drawn scene, the question
picks its object(s) unambiguously, scenes are cluttered and deterministic, splits are disjoint and balanced."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest
import torch

from data.media import PALETTE, SHAPES
from data.vqa_clutter import (
    COUNT_WORDS,
    GRID,
    IMAGE_SIZE,
    NUM_OBJECTS,
    PATCH_SIZE,
    QUESTION_TYPES,
    SURFACES,
    TONES,
    TOWER_TARGET_CLASSES,
    asked_patches,
    make_conversation,
    make_sample,
    make_split,
    patch_labels,
    patch_objects,
    patch_targets,
    shade,
)

HELDOUT = make_split("heldout", 150)
COLOUR = "|".join(PALETTE)
KIND = "|".join(SHAPES)


def drawn_objects(sample) -> list[dict]:
    """The objects as the image shows them, found from its pixels alone (not the generator's list): every connected
    region of one palette colour and its shade (the background's tones are neither) is an object; its box gives the
    centre and the size word (big shapes are >= 30 px across), its fill of the box the kind (square ~1, circle
    ~0.79, triangle ~0.5); every surface shows both tones."""
    from scipy import ndimage

    pixels = np.asarray(sample.image).astype(np.int64)
    objects = []
    for colour, rgb in PALETTE.items():
        tone = (pixels == rgb).all(axis=-1)
        second = (pixels == shade(colour)).all(axis=-1)
        regions, count = ndimage.label(tone | second)
        for region in ndimage.find_objects(regions):
            height, width = region[0].stop - region[0].start, region[1].stop - region[1].start
            fill = (regions[region] > 0).sum() / (height * width)
            kind = "square" if fill > 0.92 else "circle" if fill > 0.65 else "triangle"
            shaded = second[region].sum() / (regions[region] > 0).sum()
            assert 0.25 < shaded < 0.75, (kind, shaded)  # every surface is two-tone
            objects.append({"colour": colour, "kind": kind, "size": "big" if width >= 26 else "small",
                            "x": (region[1].start + region[1].stop - 1) / 2, "y": (region[0].start + region[0].stop - 1) / 2})
    assert len(objects) == len(sample.shapes)  # every shape drawn whole and apart from the others
    return objects


def side(obj, anchor, relation) -> float:
    axis, sign = {"left of": ("x", -1), "right of": ("x", 1), "above": ("y", -1), "below": ("y", 1)}[relation]
    return (obj[axis] - anchor[axis]) * sign


def answer_from_scene(sample) -> str:
    """The answer worked out from the question's words and the drawn objects alone."""
    objects, q = drawn_objects(sample), sample.question
    if m := re.fullmatch(rf"What colour is the (big|small) ({KIND})\?", q):
        (hit,) = [o for o in objects if (o["size"], o["kind"]) == m.groups()]
        return hit["colour"]
    if m := re.fullmatch(rf"What shape is the (big|small) ({COLOUR}) object\?", q):
        (hit,) = [o for o in objects if (o["size"], o["colour"]) == m.groups()]
        return hit["kind"]
    if m := re.fullmatch(rf"How many ({COLOUR}) objects are there\?", q):
        return COUNT_WORDS[sum(o["colour"] == m.group(1) for o in objects)]
    if m := re.fullmatch(rf"How many ({KIND})s are there\?", q):
        return COUNT_WORDS[sum(o["kind"] == m.group(1) for o in objects)]
    relation = "(left of|right of|above|below)"
    if m := re.fullmatch(rf"Is the ({COLOUR}) ({KIND}) {relation} the ({COLOUR}) ({KIND})\?", q):
        (a,) = [o for o in objects if (o["colour"], o["kind"]) == m.group(1, 2)]
        (b,) = [o for o in objects if (o["colour"], o["kind"]) == m.group(4, 5)]
        assert abs(side(a, b, m.group(3))) >= PATCH_SIZE - 1  # clearly on one side or the other (+-1 px of drawing)
        return "yes" if side(a, b, m.group(3)) > 0 else "no"
    if m := re.fullmatch(rf"What colour is the (big|small) ({KIND}) {relation} the ({COLOUR}) ({KIND})\?", q):
        (anchor,) = [o for o in objects if (o["colour"], o["kind"]) == m.group(4, 5)]
        same = [o for o in objects if (o["size"], o["kind"]) == m.group(1, 2) and o is not anchor]
        (hit,) = [o for o in same if side(o, anchor, m.group(3)) > 0]
        others = [o for o in same if o is not hit]
        # the relation is needed: another object of that size and kind, of another colour, on the other side
        assert others and all(o["colour"] != hit["colour"] for o in others)
        assert all(abs(side(o, anchor, m.group(3))) >= PATCH_SIZE - 1 for o in same)
        return hit["colour"]
    raise AssertionError(f"question of no known form: {q!r}")


@pytest.mark.parametrize("qtype", QUESTION_TYPES)
def test_every_answer_follows_from_the_drawn_scene_and_the_question_words(qtype):
    samples = [s for s in HELDOUT if s.qtype == qtype]
    assert len(samples) == 30
    for sample in samples:
        assert answer_from_scene(sample) == sample.answer, sample.question


def test_scenes_are_cluttered_224px_with_non_overlapping_objects_spanning_several_patches():
    for sample in HELDOUT[:60]:
        assert sample.image.size == (IMAGE_SIZE, IMAGE_SIZE)
        assert NUM_OBJECTS[0] <= len(sample.shapes) <= NUM_OBJECTS[1]
        for i, a in enumerate(sample.shapes):
            first, last = (a.cx - a.size // 2) // PATCH_SIZE, (a.cx + a.size // 2 - 1) // PATCH_SIZE
            assert last > first  # across at least two patch columns (and rows: the shapes are as tall as wide)
            for b in sample.shapes[i + 1:]:
                assert abs(a.cx - b.cx) * 2 >= a.size + b.size or abs(a.cy - b.cy) * 2 >= a.size + b.size
    covered = [(patch_labels(s)[0] > 0).sum().item() for s in HELDOUT]
    assert np.mean(covered) > 0.25 * GRID * GRID  # more object patches than a 25% budget keeps, on average


def test_asked_patches_are_the_patches_of_the_objects_the_question_names():
    for sample in HELDOUT[:40]:
        mask = asked_patches(sample)
        assert mask.shape == (GRID * GRID,)
        colours, _ = patch_labels(sample)
        asked_colours = {list(PALETTE).index(sample.shapes[i].colour) + 1 for i in sample.asked}
        assert set(colours[mask].tolist()) <= asked_colours
        if sample.qtype in ("colour", "shape", "relation"):
            assert sample.shapes[sample.asked[0]].colour == sample.answer or sample.shapes[sample.asked[0]].kind == sample.answer
            assert mask.any()


def test_held_out_types_and_yes_no_are_balanced_and_answers_vary():
    assert Counter(s.qtype for s in HELDOUT) == {t: 30 for t in QUESTION_TYPES}
    yes = sum(s.answer == "yes" for s in HELDOUT if s.qtype == "position")
    assert 10 <= yes <= 20
    for qtype in ("colour", "shape", "count", "relation"):
        answers = Counter(s.answer for s in HELDOUT if s.qtype == qtype)
        assert len(answers) >= 3 and max(answers.values()) <= 0.6 * 30  # no constant guess wins


def test_samples_are_deterministic_and_splits_disjoint_and_prefix_stable():
    again = make_split("heldout", 20)
    assert [(s.shapes, s.question, s.background) for s in again] == [(s.shapes, s.question, s.background)
                                                                     for s in HELDOUT[:20]]
    assert np.array_equal(np.asarray(again[3].image), np.asarray(HELDOUT[3].image))
    scenes = {split: {make_sample(0, split, i).shapes for i in range(40)} for split in ("train", "val", "heldout")}
    assert not (scenes["train"] & scenes["val"]) and not (scenes["train"] & scenes["heldout"])
    assert not (scenes["val"] & scenes["heldout"])
    assert make_sample(1, "heldout", 0).shapes != HELDOUT[0].shapes


def test_a_conversation_asks_distinct_questions_about_one_scene():
    conversation = make_conversation(0, "train", 5, turns=4)
    questions = [q for q, _, _ in conversation.turns]
    assert len(questions) == len(set(questions)) >= 2
    assert conversation.image.size == (IMAGE_SIZE, IMAGE_SIZE)


def test_an_unknown_split_is_one_line():
    with pytest.raises(ValueError, match="split='test'; allowed: train, heldout, val"):
        make_sample(0, "test", 0)


def test_the_base_trainer_takes_the_cluttered_task_on_the_224px_tiny_llava(tmp_path):
    from transformers import LlavaForConditionalGeneration

    from models.tiny.llava import tiny_clutter_llava_dir
    from models.tiny.llava_vqa import DEFAULTS, train_base

    settings = {**DEFAULTS, "steps": 2, "batch_size": 2, "turns": 2, "eval_size": 5, "position_weight": 1.0}
    metrics = train_base(tiny_clutter_llava_dir(), tmp_path / "base", task="clutter", log=lambda *_: None, **settings)
    assert list(metrics["accuracy"]) == list(QUESTION_TYPES) + ["all"]
    assert metrics["chance"]["relation"]["uniform"] == 1 / 8 and metrics["settings"]["task"] == "clutter"
    assert set(metrics["probe_accuracy_last_10"]) >= {"row", "column", "colour"}
    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "base")
    assert model.config.image_seq_length == GRID * GRID and model.config.vision_config.image_size == IMAGE_SIZE


def test_base_training_resumed_from_a_checkpoint_ends_with_the_uninterrupted_runs_weights(tmp_path):
    import shutil

    from safetensors.torch import load_file

    from models.tiny.llava import tiny_clutter_llava_dir
    from models.tiny.llava_vqa import DEFAULTS, train_base

    settings = {**DEFAULTS, "steps": 2, "batch_size": 2, "turns": 2, "eval_size": 2, "warmup": 1,
                "position_weight": 1.0, "sincos_positions": 0.5}

    def keep_step_1_checkpoint(message):  # logged before the step-2 checkpoint replaces the step-1 one
        if message.startswith("step 2"):
            shutil.copy(tmp_path / "whole.pt", tmp_path / "part.pt")

    common = dict(task="clutter", eval_every=1, val_size=3)
    whole = train_base(tiny_clutter_llava_dir(), tmp_path / "whole", checkpoint=tmp_path / "whole.pt",
                       log=keep_step_1_checkpoint, **common, **settings)
    resumed = train_base(tiny_clutter_llava_dir(), tmp_path / "resumed", checkpoint=tmp_path / "part.pt", resume=True,
                         log=lambda *_: None, **common, **settings)
    assert [v["step"] for v in resumed["validation"]] == [1, 2]
    assert resumed["validation"][0] == whole["validation"][0]
    assert (tmp_path / "whole.json").is_file()  # the JSON log beside the checkpoint
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sincos_positions_make_the_patch_row_and_column_linear():
    from models.tiny.llava_vqa import sincos_2d

    table = sincos_2d(16, 64)
    assert table.shape == (256, 64) and torch.allclose(table.pow(2).mean(1), torch.ones(256), atol=1e-5)
    features = torch.cat([table, torch.ones(256, 1)], 1).double()
    for target in (torch.arange(256) // 16, torch.arange(256) % 16):
        weights = torch.linalg.lstsq(features, torch.nn.functional.one_hot(target, 16).double()).solution
        assert ((features @ weights).argmax(1) == target).all()


def test_readout_targets_name_the_asked_objects_and_answer_positions_point_before_each_answer():
    from data.vqa_clutter import readout_targets
    from data.vqa_shapes import encode_conversations
    from models.tiny.llava import build_llama_tokenizer, build_llava_processor

    conversation = make_conversation(0, "train", 3, turns=4)
    for (question, answer, qtype), asked in zip(conversation.turns, conversation.asked):
        targets = readout_targets(conversation.shapes, asked)
        if qtype in ("colour", "relation"):
            assert list(PALETTE)[targets[0]] == answer
        if qtype == "shape":
            assert SHAPES[targets[1]] == answer
        first = conversation.shapes[asked[0]] if asked and len(asked) <= 2 else None
        if first is not None:
            assert (targets[2], targets[3]) == (first.cy // PATCH_SIZE, first.cx // PATCH_SIZE)
    processor = build_llava_processor(build_llama_tokenizer(), IMAGE_SIZE)
    batch = encode_conversations(processor, [conversation, make_conversation(0, "train", 4, turns=2)],
                                 answer_positions=True)
    tokenizer = processor.tokenizer
    for row, conv in enumerate((conversation, make_conversation(0, "train", 4, turns=2))):
        for turn, (_, answer, _) in enumerate(conv.turns):
            position = batch["answer_positions"][row, turn].item()
            assert tokenizer.decode(batch["input_ids"][row, position]).strip().endswith(":")  # "ASSISTANT:"
            first_answer_token = tokenizer(answer, add_special_tokens=False).input_ids[0]
            assert batch["input_ids"][row, position + 1].item() == first_answer_token
    assert (batch["answer_positions"][1, 2:] == -1).all()


def test_the_readout_probe_trains_on_the_asked_objects(tmp_path):
    from models.tiny.llava import tiny_clutter_llava_dir
    from models.tiny.llava_vqa import DEFAULTS, train_base

    settings = {**DEFAULTS, "steps": 2, "batch_size": 2, "turns": 2, "eval_size": 2, "readout_weight": 1.0}
    metrics = train_base(tiny_clutter_llava_dir(), tmp_path / "base", task="clutter", log=lambda *_: None, **settings)
    assert "readout" in metrics["probe_accuracy_last_10"] and metrics["settings"]["readout_weight"] == 1.0


def test_object_shades_are_no_palette_colour_and_no_background_tone():
    """Each object is exactly the pixels of its colour and its shade: a shade is never another colour, and never a
    background pixel (a tone, or a tone plus the texture's contrast of 12-25 per channel)."""
    shades = {colour: shade(colour) for colour in PALETTE}
    assert len(set(shades.values())) == len(PALETTE)
    assert not set(shades.values()) & set(PALETTE.values())
    for tone in TONES:
        for contrast in range(0, 26):
            assert tuple(c + contrast for c in tone) not in shades.values()


def test_every_kind_has_its_own_surface():
    assert sorted(SURFACES) == sorted(SHAPES) and len(set(SURFACES.values())) == len(SHAPES)


def test_patch_targets_describe_each_patchs_main_object():
    for sample in HELDOUT[:40]:
        targets = patch_targets(sample)
        objects = patch_objects(sample.shapes)
        assert set(targets) == set(TOWER_TARGET_CLASSES)
        for name, values in targets.items():
            assert values.shape == (GRID * GRID,) and int(values.max()) < TOWER_TARGET_CLASSES[name]
            assert (values[torch.from_numpy(objects == 0)] == 0).all()
        for index, obj in enumerate(sample.shapes):
            mine = torch.from_numpy(objects == index + 1)
            big = obj.size >= 30
            assert (targets["size"][mine] == 1 + big).all()
            centres = (targets["centre"].bool() & mine).nonzero().flatten().tolist()
            assert centres in ([], [(obj.cy // PATCH_SIZE) * GRID + obj.cx // PATCH_SIZE])
        assert int(targets["centre"].sum()) >= len(sample.shapes) - 1  # a centre patch is rarely another's


def test_tower_pretraining_changes_only_the_tower_and_a_frozen_tower_stays_as_pretrained(tmp_path):
    from safetensors.torch import load_file

    from models.tiny.llava import tiny_clutter_llava_dir
    from models.tiny.llava_vqa import DEFAULTS, train_base

    settings = {**DEFAULTS, "batch_size": 2, "turns": 2, "eval_size": 2, "tower_steps": 2, "warmup": 1}
    runs = {}
    for name, steps, freeze in (("one", 1, 1), ("two", 2, 1), ("unfrozen", 2, 0)):
        metrics = train_base(tiny_clutter_llava_dir(), tmp_path / name, task="clutter", log=lambda *_: None,
                             **{**settings, "steps": steps, "freeze_tower": freeze})
        runs[name] = load_file(tmp_path / name / "model.safetensors")
    initial = load_file(tiny_clutter_llava_dir() / "model.safetensors")
    tower = [k for k in initial if "vision_tower" in k]
    llm = [k for k in initial if "language_model" in k]
    assert tower and llm
    assert all(torch.equal(runs["one"][k], runs["two"][k]) for k in tower)  # frozen through the LLaVA steps
    assert not all(torch.equal(runs["one"][k], initial[k]) for k in tower)  # pretrained
    assert not all(torch.equal(runs["one"][k], runs["two"][k]) for k in llm)  # the LLaVA steps train the LLM
    assert not all(torch.equal(runs["two"][k], runs["unfrozen"][k]) for k in tower)
    assert {"tower_shape", "tower_size", "tower_row"} <= set(metrics["probe_accuracy_last_10"])


def test_comparison_targets_say_where_the_first_object_lies_from_the_second():
    from data.vqa_clutter import MIN_SEPARATION, comparison_targets
    from data.vqa_shapes import Shape

    shapes = (Shape("circle", "red", 40, 40, 20), Shape("square", "blue", 120, 40 + MIN_SEPARATION, 20),
              Shape("triangle", "green", 40 + MIN_SEPARATION - 1, 200, 20))
    assert comparison_targets(shapes, (0, 1)) == [0, 0]  # above (by exactly the separation) and left
    assert comparison_targets(shapes, (1, 0)) == [2, 2]
    assert comparison_targets(shapes, (0, 2)) == [0, 1]  # level horizontally: closer than the separation
    assert comparison_targets(shapes, (0,)) == [-100, -100] and comparison_targets(shapes, (0, 1, 2)) == [-100, -100]
    for sample in HELDOUT:
        if sample.qtype == "position":  # the comparison decides the answer with the relation word
            relation = re.search(r"(left of|right of|above|below)", sample.question).group(1)
            vertical, horizontal = comparison_targets(sample.shapes, sample.asked)
            wanted = {"above": vertical == 0, "below": vertical == 2, "left of": horizontal == 0,
                      "right of": horizontal == 2}[relation]
            assert (sample.answer == "yes") == wanted, sample.question


def test_attention_and_value_supervision_train_and_leave_the_saved_model_on_its_own_attention(tmp_path):
    import json

    from models.tiny.llava import tiny_clutter_llava_dir
    from models.tiny.llava_vqa import DEFAULTS, train_base

    settings = {**DEFAULTS, "steps": 2, "batch_size": 2, "turns": 2, "eval_size": 2, "readout_weight": 1.0,
                "attention_weight": 0.3, "value_weight": 1.0, "evidence_heads": 2, "readout_comparisons": 1}
    metrics = train_base(tiny_clutter_llava_dir(), tmp_path / "base", task="clutter", log=lambda *_: None, **settings)
    assert {"attention_loss", "value_loss", "readout"} <= set(metrics["probe_accuracy_last_10"])
    assert metrics["probe_accuracy_last_10"]["attention_loss"] > 0 and metrics["probe_accuracy_last_10"]["value_loss"] > 0
    assert "_attn_implementation" not in json.loads((tmp_path / "base" / "config.json").read_text())["text_config"]


def test_relation_targets_give_a_position_questions_answer_as_axis_direction_and_side():
    from data.vqa_clutter import relation_targets

    for sample in HELDOUT:
        axis, direction, on_side = relation_targets(sample.question, sample.shapes, sample.asked)
        if sample.qtype in ("position", "relation"):
            relation = re.search(r"(left of|right of|above|below)", sample.question).group(1)
            assert (axis, direction) == {"left of": (0, 0), "right of": (0, 1), "above": (1, 0), "below": (1, 1)}[relation]
            assert on_side == ({"yes": 1, "no": 0}[sample.answer] if sample.qtype == "position" else -100)
        else:
            assert (axis, direction, on_side) == (-100, -100, -100), sample.question


def test_type_weights_set_the_share_of_each_question_type_and_are_checked():
    from data.vqa_clutter import QUESTION_TYPES, make_conversation

    weights = [0.0 if t != "position" else 1.0 for t in QUESTION_TYPES]
    conversations = [make_conversation(0, "train", i, turns=2, type_weights=weights) for i in range(20)]
    assert {qtype for c in conversations for _, _, qtype in c.turns} == {"position"}
    assert make_conversation(0, "train", 3) == make_conversation(0, "train", 3, type_weights=None)  # default stream
    with pytest.raises(ValueError, match="type_weights"):
        make_conversation(0, "train", 0, type_weights=[1.0, 0.0])


def test_the_relation_probe_and_the_position_share_train(tmp_path):
    from models.tiny.llava import tiny_clutter_llava_dir
    from models.tiny.llava_vqa import DEFAULTS, train_base

    settings = {**DEFAULTS, "steps": 2, "batch_size": 2, "turns": 2, "eval_size": 2, "readout_weight": 1.0,
                "readout_relation": 1, "position_share": 0.9}
    metrics = train_base(tiny_clutter_llava_dir(), tmp_path / "base", task="clutter", log=lambda *_: None, **settings)
    assert "relation" in metrics["probe_accuracy_last_10"]
    assert metrics["settings"]["readout_relation"] == 1 and metrics["settings"]["position_share"] == 0.9
