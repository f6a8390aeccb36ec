"""Pictures of what system C and the training-free baselines keep, on the image's patch grid.

One row per test question: the image with the question, the correct answer and each method's answer above it, then
one panel per selection stage, each the image with the dropped patches darkened and the kept ones outlined:

* **merger**: the learned merger's centres (the placeholders that carry a merged token into layer 0);
* **layer p**: the tokens still kept after the learned pruner head at LLM layer ``p`` (cumulative);
* **DivPrune**, **FastV**, **VisionZip** (whichever ran): the tokens each keeps at the same budget.

Every panel marks the patches of the objects the question asks about (``ClutterSample.asked``) with a magenta
corner, so a glance shows whether a selection kept them. :func:`selection_panels` turns a
:class:`~pruning.llava.runtime.PruningTrace` into named keep masks; :func:`draw_selection_row` draws one row.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

KEPT_EDGE = (0, 220, 70)
ASKED_MARK = (255, 0, 200)
DROPPED_DARKEN = 0.3  # brightness left to a dropped patch
PANEL_GAP = 6
CAPTION_HEIGHT = 14
SCALE = 2  # panels are drawn at twice the model's input size


def selection_panels(trace, row: int) -> list[tuple[str, np.ndarray]]:
    """``[(stage name, keep [V] bool)]`` of one prompt (``row``) of a drop-mode trace: the merger's centres (if it
    ran), then the cumulative keep after each selecting layer, in order."""
    panels = []
    if trace.merge_keep is not None:
        panels.append(("merger", trace.merge_keep[row].cpu().numpy().astype(bool)))
    for layer in sorted(trace.keep):
        panels.append((f"layer {layer}", (trace.keep[layer][row] > 0.5).cpu().numpy()))
    return panels


def _panel(image: np.ndarray, keep: np.ndarray | None, asked: np.ndarray | None, grid: int) -> Image.Image:
    """``image uint8 [H, W, 3]`` with the patches not in ``keep [grid^2]`` darkened and the kept ones outlined (no
    ``keep``: the image as it is), the ``asked [grid^2]`` patches marked in a corner; scaled by :data:`SCALE`."""
    height, width = image.shape[:2]
    cell_h, cell_w = height // grid, width // grid
    pixels = image.astype(np.float32).copy()
    if keep is not None:
        for index in np.flatnonzero(~keep):
            r, c = divmod(int(index), grid)
            pixels[r * cell_h:(r + 1) * cell_h, c * cell_w:(c + 1) * cell_w] *= DROPPED_DARKEN
    panel = Image.fromarray(pixels.round().astype(np.uint8)).resize((width * SCALE, height * SCALE), Image.NEAREST)
    draw = ImageDraw.Draw(panel)
    h, w = cell_h * SCALE, cell_w * SCALE
    for index in range(grid * grid):
        r, c = divmod(index, grid)
        x0, y0 = c * w, r * h
        if keep is not None and keep[index]:
            draw.rectangle((x0, y0, x0 + w - 1, y0 + h - 1), outline=KEPT_EDGE, width=2)
        if asked is not None and asked[index]:
            draw.polygon([(x0 + 2, y0 + 2), (x0 + w // 2, y0 + 2), (x0 + 2, y0 + h // 2)], fill=ASKED_MARK)
    return panel


def draw_selection_row(image, panels: list[tuple[str, np.ndarray]], grid: int, asked: np.ndarray | None = None,
                       caption: str = "") -> Image.Image:
    """One question's row: ``image`` (PIL or ``uint8 [H, W, 3]``, the model's input) and one panel per ``(name,
    keep [grid^2] bool)``, each titled with its name and kept count, under a one-line ``caption``."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.uint8)
    tiles = [("image", _panel(pixels, None, asked, grid))]
    tiles += [(f"{name} ({int(keep.sum())})", _panel(pixels, np.asarray(keep, dtype=bool), asked, grid))
              for name, keep in panels]
    tile_w, tile_h = tiles[0][1].size
    out = Image.new("RGB", (len(tiles) * tile_w + (len(tiles) - 1) * PANEL_GAP, tile_h + 2 * CAPTION_HEIGHT),
                    (255, 255, 255))
    draw = ImageDraw.Draw(out)
    draw.text((2, 1), caption, fill=(0, 0, 0))
    for index, (title, tile) in enumerate(tiles):
        x = index * (tile_w + PANEL_GAP)
        draw.text((x + 2, CAPTION_HEIGHT + 1), title, fill=(0, 0, 0))
        out.paste(tile, (x, 2 * CAPTION_HEIGHT))
    return out


def stack_rows(rows: list[Image.Image]) -> Image.Image:
    """Rows one under another (left-aligned, white between)."""
    width = max(r.size[0] for r in rows)
    out = Image.new("RGB", (width, sum(r.size[1] for r in rows) + PANEL_GAP * (len(rows) - 1)), (255, 255, 255))
    top = 0
    for r in rows:
        out.paste(r, (0, top))
        top += r.size[1] + PANEL_GAP
    return out


def save_selection_figure(path: Path, rows: list[Image.Image]) -> Path:
    from cli import save_image

    path = Path(path)
    save_image(stack_rows(rows), path)
    return path


__all__ = ["draw_selection_row", "save_selection_figure", "selection_panels", "stack_rows"]
