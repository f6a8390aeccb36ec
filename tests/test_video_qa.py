"""The generated video QA task: deterministic, consistent with its pixels, balanced, five valid options."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from data.media import PALETTE
from data.video_qa import (
    CELL,
    DIRECTIONS,
    FRAMES_PER_STEP,
    GRID,
    MARGIN,
    MOVE_STEPS,
    NUM_FRAMES,
    NUM_STEPS,
    QUESTION_TYPES,
    evidence_cells,
    make_sample,
    make_split,
)


@pytest.fixture(scope="module")
def samples():
    return make_split("train", 300, seed=0)


def test_samples_are_deterministic_and_splits_use_disjoint_streams(samples):
    again = make_sample(0, "train", 7)
    assert again == samples[7] and np.array_equal(again.frames(), samples[7].frames())
    assert make_split("train", 5, seed=0) == samples[:5]  # splits of different sizes share their first samples
    assert make_sample(0, "val", 7).scene != samples[7].scene and make_sample(1, "train", 7).scene != samples[7].scene
    assert len({s.video_id for s in samples}) == len(samples)


def test_every_object_is_drawn_in_its_cell_at_every_step_and_nothing_else_changes(samples):
    for sample in samples[:40]:
        frames = sample.frames()
        assert frames.shape == (NUM_FRAMES, GRID * CELL, GRID * CELL, 3) and frames.dtype == np.uint8
        for step in range(NUM_STEPS):
            first, second = frames[FRAMES_PER_STEP * step], frames[FRAMES_PER_STEP * step + 1]
            travelling = {o.cell(step) for o in sample.scene.objects if o.moving_at(step)}
            for obj in sample.scene.objects:
                row, col = obj.cell(step)
                for frame, behind_or_ahead in ((first, -1), (second, 1)):
                    d_row, d_col = DIRECTIONS[obj.direction] if obj.moving_at(step) else (0, 0)
                    y = row * CELL + CELL // 2 + d_row * MARGIN * behind_or_ahead
                    x = col * CELL + CELL // 2 + 2 + d_col * MARGIN * behind_or_ahead
                    assert tuple(frame[y, x]) == PALETTE[obj.colour], (sample.video_id, obj, step)
            # the two frames of a Qwen temporal step differ exactly in the cells of objects travelling then
            differs = {(r, c) for r in range(GRID) for c in range(GRID)
                       if not np.array_equal(first[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL],
                                             second[r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL])}
            assert differs == travelling
        # the static part: cells no object ever visits are identical in every frame
        visited = sample.scene.occupied()
        for row in range(GRID):
            for col in range(GRID):
                if (row, col) not in visited:
                    block = frames[:, row * CELL:(row + 1) * CELL, col * CELL:(col + 1) * CELL]
                    assert (block == block[0]).all()


def test_movers_travel_in_their_direction_and_never_share_a_cell(samples):
    for sample in samples:
        for obj in sample.scene.movers:
            (r0, c0), (r1, c1) = obj.cell(0), obj.cell(NUM_STEPS - 1)
            d_row, d_col = DIRECTIONS[obj.direction]
            assert (r1 - r0, c1 - c0) == (d_row * MOVE_STEPS, d_col * MOVE_STEPS)
            assert 0 <= min(r0, r1, c0, c1) and max(r0, r1, c0, c1) < GRID
        for step in range(NUM_STEPS):
            cells = [o.cell(step) for o in sample.scene.objects]
            assert len(set(cells)) == len(cells)
        assert len({o.colour for o in sample.scene.objects}) == len(sample.scene.objects)


def test_answers_follow_from_the_scene(samples):
    for s in samples:
        movers, statics = s.scene.movers, s.scene.statics
        if s.qtype == "colour":
            (target,) = [o for o in movers if o.colour == s.answer]
            assert target.direction in s.question.replace("to the ", "")
        elif s.qtype == "shape":
            (target,) = [o for o in movers if o.colour in s.question]
            assert s.answer == target.shape
        elif s.qtype == "direction":
            (target,) = [o for o in movers if f"the {o.colour} {o.shape} move" in s.question]
            assert s.answer == target.direction
        elif s.qtype == "count":
            assert s.answer == ("one", "two", "three")[len(movers) - 1]
        elif s.qtype == "order":
            named = [o for o in movers if f"the {o.colour} {o.shape}" in s.question]
            assert len(named) == 2 and s.answer == min(named, key=lambda o: o.start_step).colour
            assert named[0].start_step != named[1].start_step
        else:
            (target,) = [o for o in statics if o.colour == s.answer]
            assert f"the {target.shape} that does not move" in s.question
            assert sum(o.shape == target.shape for o in s.scene.objects) == 1


def test_evidence_cells_hold_the_object_the_answer_is_read_from(samples):
    for s in samples:
        cells = evidence_cells(s.scene, s.qtype, s.question, s.answer)
        at = [s.scene.object_cells(step).get((row, col)) for step, row, col in cells]
        assert cells and all(obj is not None for obj in at), s.video_id
        if s.qtype in ("colour", "order", "static"):
            assert {o.colour for o in at} == {s.answer}
        if s.qtype in ("colour", "direction", "count", "order"):
            assert all(o.moving_at(step) for o, (step, _, _) in zip(at, cells))
        if s.qtype == "count":
            assert len({o.colour for o in at}) == len(s.scene.movers)
        if s.qtype == "order":
            assert cells[0][0] == min(o.start_step for o in s.scene.movers if o.colour in s.question)


def test_question_types_and_answers_are_balanced_and_every_record_has_five_options(samples):
    types = Counter(s.qtype for s in samples)
    assert set(types) == set(QUESTION_TYPES) and min(types.values()) > len(samples) / len(QUESTION_TYPES) / 2
    counts = Counter(s.answer for s in make_split("train", 1500, seed=0) if s.qtype == "count")
    assert min(counts.values()) > sum(counts.values()) / 4  # ~1/3 each
    positions = Counter(s.answer_index for s in samples)
    assert min(positions.values()) > len(samples) / 10
    for s in samples:
        record = s.egoschema_record()
        options = [record[f"option {i}"] for i in range(5)]
        assert len(set(options)) == 5 and options[record["answer"]] == s.answer and record["q_uid"] == s.video_id


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        make_sample(0, "dev", 0)
    with pytest.raises(ValueError, match="index must be an integer >= 0, got -1"):
        make_sample(0, "train", -1)
