"""The building blocks every system shares, defined once: integer validation, layer scaling, palette and shapes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from data import egoschema, vqa_shapes
from data.demo_video import CELL, make_demo_frames, object_cells
from data.media import PALETTE, SHAPES, draw_shape
from pipelines.prunevid import scaled_pruning_layer
from pruning.common import check_int, round_half_up, scale_layer_index
from pruning.llava.config import ConfigError, MergerConfig, scale_pruning_layers
from pruning.video.prunevid import PruneVidConfig

# ============================================================================= integer validation


@pytest.mark.parametrize(
    "value,lo,hi,message",
    [
        (0, 1, None, "k must be an integer >= 1, got 0"),
        (True, 1, None, "k must be an integer >= 1, got True"),
        (2.0, 0, None, "k must be an integer >= 0, got 2.0"),
        (9, 1, 8, "k must be an integer from 1 to 8, got 9"),
        (9, None, 8, "k must be an integer <= 8, got 9"),
        ("3", None, None, "k must be an integer, got '3'"),
    ],
)
def test_check_int_names_the_argument_the_allowed_range_and_the_value_in_one_line(value, lo, hi, message):
    with pytest.raises(ValueError) as info:
        check_int("k", value, lo, hi)
    assert str(info.value) == message


def test_check_int_accepts_integers_in_range_and_raises_the_callers_error_class():
    for value in (1, 5, 8):
        check_int("k", value, 1, 8)
    with pytest.raises(ConfigError, match="merger_num_heads must be an integer >= 1, got 0"):
        MergerConfig(merger_num_heads=0)
    with pytest.raises(ValueError, match="k_neighbors must be an integer >= 1, got 0"):
        PruneVidConfig(k_neighbors=0)


# ============================================================================= layer scaling


def nearest_ending_layer(layer: int, num_layers_real: int, num_layers_model: int) -> int:
    """Independent reference: the model layer whose end depth (m + 1) / M is nearest (layer + 1) / N (ties: deeper)."""
    target = (layer + 1) / num_layers_real
    distances = [abs((m + 1) / num_layers_model - target) for m in range(num_layers_model)]
    best = min(distances)
    return max(m for m, d in enumerate(distances) if d <= best + 1e-12)


@pytest.mark.parametrize("num_layers_real", [28, 32])
def test_scale_layer_index_maps_to_the_layer_ending_nearest_the_same_depth(num_layers_real):
    for num_layers_model in range(1, 41):
        for layer in range(num_layers_real):
            expected = nearest_ending_layer(layer, num_layers_real, num_layers_model)
            assert scale_layer_index(layer, num_layers_real, num_layers_model) == expected, (layer, num_layers_model)
    assert [scale_layer_index(layer, 32, 32) for layer in range(32)] == list(range(32))  # same depth: identity


def test_prunevid_and_llava_scale_their_layers_by_the_same_rule():
    for num_layers in range(1, 41):
        assert scaled_pruning_layer(10, num_layers) == scale_layer_index(10, 28, num_layers)
    assert (scaled_pruning_layer(10, 6), scaled_pruning_layer(10, 8), scaled_pruning_layer(10, 28)) == (1, 2, 10)
    for num_layers in (8, 16, 32, 40):  # no collisions at these depths: exactly the per-layer rule
        assert scale_pruning_layers([10, 20, 31], 32, num_layers) == [scale_layer_index(l, 32, num_layers) for l in (10, 20, 31)]
    assert scale_pruning_layers([10, 20, 31], 32, 8) == [2, 4, 7]
    with pytest.raises(ValueError, match="layer must be an integer from 0 to 27, got 28"):
        scale_layer_index(28, 28, 6)


def test_round_half_up_rounds_halves_up_even_a_hair_below_in_floating_point():
    assert [round_half_up(x) for x in (0.5, 1.5, 2.5, 0.7 * 30 + 0.5, 2.4999999)] == [1, 2, 3, 22, 2]


# ============================================================================= one palette, one shape renderer


def test_every_generated_task_and_medium_draws_from_the_one_palette():
    assert vqa_shapes.ANSWERS["colour"] == tuple(PALETTE)
    assert vqa_shapes.SHAPES is SHAPES and egoschema.SHAPES is SHAPES
    sample = vqa_shapes.make_sample(0, "train", 0)
    drawn = {tuple(p) for p in np.asarray(sample.image).reshape(-1, 3)} - {vqa_shapes.BACKGROUND}
    assert drawn == {PALETTE[s.colour] for s in sample.shapes}  # no antialiasing: exactly the palette colours
    frames = make_demo_frames(8)
    (r1, c1), (r2, c2) = object_cells(8)[0]
    assert tuple(frames[0, r1 * CELL + CELL // 2, c1 * CELL + CELL // 2]) == PALETTE["red"]
    assert tuple(frames[0, r2 * CELL + CELL // 2, c2 * CELL + CELL // 2]) == PALETTE["black"]


def test_draw_shape_fills_the_box_and_points_the_triangle_up():
    def mask(shape: str) -> np.ndarray:
        image = Image.new("L", (20, 20), 0)
        draw_shape(ImageDraw.Draw(image), shape, (2, 4, 16, 18), 1)
        return np.asarray(image)

    square, circle, triangle = mask("square"), mask("circle"), mask("triangle")
    assert square.sum() == 15 * 15 and square[4:19, 2:17].all()
    assert circle.sum() < square.sum() and not circle[4, 2] and circle[11, 9]
    rows = triangle.sum(axis=1)
    assert rows[4] <= 2 and rows[18] == 15 and all(a <= b for a, b in zip(rows[4:19], rows[5:19]))  # apex up, base down
    with pytest.raises(ValueError, match="unknown shape 'hexagon'"):
        mask("hexagon")
