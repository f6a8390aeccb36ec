"""Pictures of what system C and the baselines keep (``evaluation/llava_overlay.py``, ``eval_llava_pruning.py
--visualize``): every kept patch is outlined and shown as it is, every dropped one darkened, the asked objects'
patches marked, one panel per selection stage."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from evaluation.llava_overlay import ASKED_MARK, DROPPED_DARKEN, KEPT_EDGE, SCALE, draw_selection_row


def test_a_panel_darkens_dropped_patches_outlines_kept_ones_and_marks_the_asked_ones():
    grid, cell = 4, 10
    image = np.full((grid * cell, grid * cell, 3), 200, dtype=np.uint8)
    keep = np.zeros(grid * grid, dtype=bool)
    keep[[0, 5]] = True
    asked = np.zeros(grid * grid, dtype=bool)
    asked[5] = True
    row = np.asarray(draw_selection_row(Image.fromarray(image), [("divprune", keep)], grid, asked, caption="q"))
    tile = grid * cell * SCALE
    top = row.shape[0] - tile
    panel = row[top:, tile + 6:]  # the second tile (after the plain image and the gap)
    centre = lambda index: panel[(index // grid) * cell * SCALE + cell, (index % grid) * cell * SCALE + cell]  # noqa: E731
    assert tuple(centre(0)) == (200, 200, 200)  # kept: as it is
    assert tuple(centre(1)) == (round(200 * DROPPED_DARKEN),) * 3  # dropped: darkened
    assert tuple(panel[0, 0]) == KEPT_EDGE  # kept: outlined
    y0, x0 = cell * SCALE, cell * SCALE  # patch 5 = row 1, column 1
    assert tuple(panel[y0 + 3, x0 + 3]) == ASKED_MARK
    assert tuple(row[top + cell * SCALE + 3, cell * SCALE + 3]) == ASKED_MARK  # marked on the plain image too
    assert row.shape[1] == 2 * tile + 6


def test_eval_visualize_draws_the_learned_stages_next_to_divprune_fastv_and_visionzip(tmp_path, capsys):
    from models.tiny.llava import tiny_clutter_llava_dir
    from tests.script_loader import run_script_in_process

    pictures = tmp_path / "pictures"
    result = run_script_in_process("eval_llava_pruning", [
        "--task", "clutter", "--model-path", str(tiny_clutter_llava_dir()),
        "--methods", "untrained,divprune,fastv,visionzip", "--budgets", "0.25", "--num-questions", "3",
        "--batch-size", "3", "--timing-batches", "1", "--output", str(tmp_path / "eval.json"),
        "--visualize", str(pictures), "--visualize-count", "2"], capsys)
    assert result.returncode == 0, result.stderr
    figure = Image.open(pictures / "selection.png")
    record = json.loads((pictures / "selection.json").read_text())
    assert record["methods"] == ["untrained", "divprune", "fastv", "visionzip"] and len(record["questions"]) == 2
    first = record["questions"][0]["methods"]
    assert list(first["untrained"]["kept"]) == ["merger", "layer 2", "layer 4", "layer 7"]
    assert first["untrained"]["kept"]["merger"] == 96  # at budget 0.25 the merger keeps 96 of 256 (learned_schedule)
    assert first["divprune"]["kept"] == {"divprune": 64} and first["visionzip"]["kept"] == {"visionzip": 64}
    assert 0 < first["fastv"]["kept"]["fastv"] < 64  # FastV starts at layer 2: fewer tokens for the same budget
    for method in first.values():
        assert all(0 <= kept <= record["questions"][0]["asked_patches"] for kept in method["asked_patches_kept"].values())
    panels = 1 + 4 + 3  # image, merger + 3 pruner layers, three baselines
    assert figure.size[0] == panels * 224 * 2 + (panels - 1) * 6
