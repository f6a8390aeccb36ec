"""The generated edit task (data/edit_task.py): deterministic, disjoint splits, and every target is the edit its
instruction asks for, checked on the rendered pixels."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

from data.edit_task import (
    ADD_SIZE,
    BACKGROUNDS,
    EDIT_TYPES,
    IMAGE_SIZE,
    REGION_CENTRES,
    REGIONS,
    background_pixels,
    make_edit,
    make_split,
    mask_colour,
    nearest_palette_colour,
)
from data.media import PALETTE


def test_the_same_seed_split_and_index_give_the_same_edit_and_pixels():
    a, b = make_edit(3, "val", 17), make_edit(3, "val", 17)
    assert a == b
    assert np.array_equal(np.asarray(a.source_image()), np.asarray(b.source_image()))
    assert np.array_equal(np.asarray(a.target_image()), np.asarray(b.target_image()))


def test_splits_are_different_streams_and_a_longer_split_extends_a_shorter_one():
    train, test = make_split("train", 40), make_split("test", 40)
    assert [s.source for s in train] != [s.source for s in test]
    assert make_split("test", 60)[:40] == test


def test_every_edit_type_occurs_and_the_target_always_differs_from_the_source():
    samples = make_split("train", 300)
    counts = Counter(s.edit_type for s in samples)
    assert set(counts) == set(EDIT_TYPES) and min(counts.values()) > 300 / len(EDIT_TYPES) / 2
    for s in samples:
        assert not np.array_equal(np.asarray(s.source_image()), np.asarray(s.target_image())), s.instruction


def _region_of(instruction: str) -> str:
    return re.search(r"(?:at|to) the (.+)\.$", instruction).group(1)


def test_each_target_is_what_its_instruction_asks_for_on_the_pixels():
    for s in make_split("test", 120):
        source, target = np.asarray(s.source_image()), np.asarray(s.target_image())
        changed = np.any(source != target, axis=-1)
        mask = s.asked_mask()
        if s.edit_type == "recolour":
            old, new = re.match(r"Make the (\w+) (\w+) (\w+)\.", s.instruction).group(1, 3)
            assert mask_colour(s.target_image(), mask) == new == s.new_colour
            assert mask_colour(s.source_image(), mask) == old
            assert not changed[~mask].any()  # nothing else changed
        elif s.edit_type == "remove":
            plain = background_pixels(s.source.background, s.source.texture)
            assert np.array_equal(target[mask], plain[mask]) and not changed[~mask].any()
        elif s.edit_type in ("add", "move"):
            col, row = REGIONS[_region_of(s.instruction)]
            assert (s.asked.x, s.asked.y) == (REGION_CENTRES[col], REGION_CENTRES[row])
            assert mask_colour(s.target_image(), mask) == s.asked.colour
            if s.edit_type == "add":
                assert s.asked.size == ADD_SIZE and not changed[~mask].any()
        else:  # background: every background pixel changed, no shape pixel did
            new = s.instruction.removeprefix("Change the background to ").rstrip(".")
            assert new in BACKGROUNDS and s.target.background == new
            shapes = np.zeros_like(mask)
            for shape in s.source.shapes:
                from data.edit_task import shape_mask

                shapes |= shape_mask(shape)
            assert changed[~shapes].all() and not changed[shapes].any()


def test_names_in_instructions_pick_exactly_one_object():
    for s in make_split("train", 200):
        names = [shape.name for shape in s.source.shapes]
        assert len(names) == len(set(names))
        match = re.search(r"the (\w+ (?:circle|square|triangle))", s.instruction)
        if s.edit_type in ("recolour", "remove", "move"):
            assert names.count(match.group(1)) == 1


def test_nearest_palette_colour_returns_each_palette_colour_for_itself():
    for name, rgb in PALETTE.items():
        assert nearest_palette_colour(rgb) == name
    assert IMAGE_SIZE == 128
