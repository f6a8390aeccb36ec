"""The PruneVid token picture marks exactly the cells stage 1 made static and exactly the cells stage 2 kept."""

from __future__ import annotations

import numpy as np
import torch

from evaluation.video_overlay import DROPPED_DARKEN, KEPT_EDGE, PANEL_GAP, draw_overlay, token_cell_masks
from pruning.video.prunevid import merge_video_tokens, preset

STEPS, ROWS, COLS, CELL = 4, 4, 4, 28


def known_video() -> torch.Tensor:
    """``[4, 16, 8]``: a static background with small noise, one token moving along row 1 (cells 4..7 by step)."""
    g = torch.Generator().manual_seed(0)
    background = torch.randn(ROWS * COLS, 8, generator=g)
    video = background[None].repeat(STEPS, 1, 1) + 0.01 * torch.randn(STEPS, ROWS * COLS, 8, generator=g)
    mover = 3 * torch.randn(8, generator=g)
    for step in range(STEPS):
        video[step, 4 + step] = mover
    return video


def test_masks_follow_the_merge_and_the_kept_tokens():
    merge = merge_video_tokens(known_video(), preset("stage1_only", temporal_segment_ratio=0.25))
    members = merge.cluster_members.numpy().reshape(STEPS, ROWS, COLS)
    kept = torch.tensor([m for m in range(merge.tokens_after_stage1) if m % 3 == 0])
    masks = token_cell_masks(merge, kept, (STEPS, ROWS, COLS))
    assert np.array_equal(masks.merged, members)
    for step in range(STEPS):
        for r in range(ROWS):
            for c in range(COLS):
                m = members[step, r, c]
                assert masks.static[step, r, c] == bool(merge.is_static[m])
                assert masks.kept[step, r, c] == (m % 3 == 0)
    # the moving token's cells are dynamic, the background's static
    assert not any(masks.static[step, 1, step] for step in range(STEPS)) and masks.static[:, 3, :].all()
    assert token_cell_masks(merge, None, (STEPS, ROWS, COLS)).kept.all()


def test_the_picture_darkens_exactly_the_dropped_cells_and_outlines_exactly_the_kept_ones():
    merge = merge_video_tokens(known_video(), preset("stage1_only", temporal_segment_ratio=0.25))
    kept = torch.tensor([m for m in range(merge.tokens_after_stage1) if m % 2 == 1])
    masks = token_cell_masks(merge, kept, (STEPS, ROWS, COLS))
    frames = np.full((2 * STEPS, ROWS * CELL, COLS * CELL, 3), 200, dtype=np.uint8)
    picture = np.asarray(draw_overlay(frames, masks, frames_per_step=2))
    width, height = COLS * CELL, ROWS * CELL
    assert picture.shape == (STEPS * height + (STEPS - 1) * PANEL_GAP, 3 * width + 2 * PANEL_GAP, 3)
    for step in range(STEPS):
        top = step * (height + PANEL_GAP)
        stage1 = picture[top:top + height, width + PANEL_GAP:2 * width + PANEL_GAP]
        stage2 = picture[top:top + height, 2 * (width + PANEL_GAP):]
        for r in range(ROWS):
            for c in range(COLS):
                centre2 = stage2[r * CELL + CELL // 2, c * CELL + CELL // 2]
                expected = 200 if masks.kept[step, r, c] else round(200 * DROPPED_DARKEN)
                assert tuple(centre2) == (expected,) * 3, (step, r, c)
                edge = tuple(stage2[r * CELL + CELL // 2, c * CELL + 1])
                assert (edge == KEPT_EDGE) == bool(masks.kept[step, r, c])
                centre1 = stage1[r * CELL + CELL // 2, c * CELL + CELL // 2]
                assert (centre1[2] > centre1[0]) == bool(masks.static[step, r, c])  # static cells tinted blue
