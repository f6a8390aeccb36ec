"""Pictures of what PruneVid keeps: the sampled frames with the visual-token cells marked per stage.

One row per Qwen grid step (its first frame), three panels:

* **frame**: the frame as the model saw it;
* **stage 1**: cells of tokens averaged over time into a static token tinted blue, dynamic tokens (kept
  per grid step) outlined orange; each cell carries a thin border in a colour of its cluster (the
  merged token it went into), so clusters show as same-coloured groups;
* **stage 2**: cells whose merged token survived the attention pruning outlined green, the dropped
  ones darkened.

:func:`token_cell_masks` computes the per-cell masks from stage 1's :class:`~pruning.video.prunevid.MergeResult`
and stage 2's kept indices; :func:`draw_overlay` draws them. A merged static token covers its cell in every
step of its segment, so keeping it keeps all of those cells.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

STATIC_TINT = (40, 90, 255)
DYNAMIC_EDGE = (255, 140, 0)
KEPT_EDGE = (0, 220, 70)
DROPPED_DARKEN = 0.25  # brightness left to a dropped cell
PANEL_GAP = 6


@dataclass(frozen=True)
class TokenCellMasks:
    """Per grid step and cell ``[T_grid, rows, cols]``: the merged token, whether it is static, whether stage 2 kept it."""

    merged: np.ndarray  # int: index of the merged token the cell went into
    static: np.ndarray  # bool
    kept: np.ndarray  # bool (all True when stage 2 did not run)


def token_cell_masks(merge, kept_visual, grid: tuple[int, int, int]) -> TokenCellMasks:
    """Masks for one video: ``merge`` (stage 1), ``kept_visual`` (indices of the kept merged tokens, or None: stage 2
    off) and ``grid = (T_grid, rows, cols)`` of the LLM-side tokens (Qwen's t-major raster order)."""
    steps, rows, cols = grid
    members = np.asarray(merge.cluster_members.cpu()).reshape(steps, rows, cols)
    static = np.asarray(merge.is_static.cpu())[members]
    if kept_visual is None:
        kept = np.ones_like(static)
    else:
        keep = np.zeros(merge.tokens_after_stage1, dtype=bool)
        keep[np.asarray(kept_visual.cpu() if hasattr(kept_visual, "cpu") else kept_visual, dtype=int)] = True
        kept = keep[members]
    return TokenCellMasks(members, static, kept)


def _cluster_colour(index: int) -> tuple[int, int, int]:
    rng = np.random.default_rng(index)
    return tuple(int(v) for v in rng.integers(60, 256, size=3))


def draw_overlay(frames: np.ndarray, masks: TokenCellMasks, frames_per_step: int = 2) -> Image.Image:
    """``frames uint8 [T, H, W, 3]`` (the model's input frames) -> one RGB picture, a row per grid step."""
    steps, rows, cols = masks.static.shape
    height, width = frames.shape[1:3]
    cell_h, cell_w = height // rows, width // cols
    panel = Image.new("RGB", (3 * width + 2 * PANEL_GAP, steps * height + (steps - 1) * PANEL_GAP), (255, 255, 255))
    for step in range(steps):
        frame = np.asarray(frames[min(step * frames_per_step, len(frames) - 1)], dtype=np.uint8)
        stage1 = frame.astype(np.float32).copy()
        stage2 = frame.astype(np.float32).copy()
        for r in range(rows):
            for c in range(cols):
                box = np.s_[r * cell_h:(r + 1) * cell_h, c * cell_w:(c + 1) * cell_w]
                if masks.static[step, r, c]:
                    stage1[box] = 0.55 * stage1[box] + 0.45 * np.array(STATIC_TINT)
                if not masks.kept[step, r, c]:
                    stage2[box] *= DROPPED_DARKEN
        images = [Image.fromarray(frame), Image.fromarray(stage1.round().astype(np.uint8)),
                  Image.fromarray(stage2.round().astype(np.uint8))]
        draw1, draw2 = ImageDraw.Draw(images[1]), ImageDraw.Draw(images[2])
        for r in range(rows):
            for c in range(cols):
                x0, y0, x1, y1 = c * cell_w, r * cell_h, (c + 1) * cell_w - 1, (r + 1) * cell_h - 1
                draw1.rectangle((x0, y0, x1, y1), outline=_cluster_colour(int(masks.merged[step, r, c])))
                if not masks.static[step, r, c]:
                    draw1.rectangle((x0 + 1, y0 + 1, x1 - 1, y1 - 1), outline=DYNAMIC_EDGE, width=2)
                if masks.kept[step, r, c]:
                    draw2.rectangle((x0 + 1, y0 + 1, x1 - 1, y1 - 1), outline=KEPT_EDGE, width=2)
        top = step * (height + PANEL_GAP)
        for index, image in enumerate(images):
            panel.paste(image, (index * (width + PANEL_GAP), top))
    return panel


def save_overlay(path: Path, frames: np.ndarray, masks: TokenCellMasks, frames_per_step: int = 2) -> Path:
    from cli import save_image

    path = Path(path)
    save_image(draw_overlay(frames, masks, frames_per_step), path)
    return path


__all__ = ["TokenCellMasks", "draw_overlay", "save_overlay", "token_cell_masks"]
