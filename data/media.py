"""Deterministic demo media generated in code: images of coloured shapes and videos of moving shapes.

Only numpy's seeded generator and PIL's (non-antialiased) ``ImageDraw`` are used, so the same
seed gives the same pixels on every machine.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 70, 230),
    "yellow": (240, 220, 40),
    "purple": (140, 50, 170),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
"""The one palette of every generated image and video (demo media, the shapes VQA task, the EgoSchema-format set)."""
SHAPES = ("circle", "square", "triangle")


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A soft vertical gradient between two random muted colours."""
    top, bottom = rng.integers(60, 200, size=(2, 3))
    ramp = np.linspace(0.0, 1.0, height)[:, None, None]
    pixels = (top * (1 - ramp) + bottom * ramp).repeat(width, axis=1)
    return Image.fromarray(pixels.round().astype(np.uint8), mode="RGB")


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], fill) -> None:
    """The one shape renderer: a filled ``circle``, ``square`` or ``triangle`` inside ``box`` = (x0, y0, x1, y1).

    The triangle points up: apex at the middle of the top edge, base along the bottom edge. ``fill`` is an
    RGB tuple (or a label, for an ``"L"`` image). PIL's non-antialiased drawing: the same pixels everywhere.
    """
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def make_sample_image(size: tuple[int, int] = (256, 256), seed: int = 0, num_shapes: int = 3) -> Image.Image:
    """A deterministic RGB image of ``size`` = (W, H): ``num_shapes`` coloured shapes on a gradient background."""
    width, height = size
    rng = np.random.default_rng(seed)
    image = _background(rng, width, height)
    draw = ImageDraw.Draw(image)
    colours = list(PALETTE.values())
    for _ in range(num_shapes):
        side = int(rng.integers(max(4, min(width, height) // 6), max(5, min(width, height) // 2)))
        x0 = int(rng.integers(0, max(1, width - side)))
        y0 = int(rng.integers(0, max(1, height - side)))
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        draw_shape(draw, shape, (x0, y0, x0 + side, y0 + side), colours[int(rng.integers(len(colours)))])
    return image


def make_sample_video(num_frames: int = 8, size: tuple[int, int] = (112, 112), seed: int = 0) -> np.ndarray:
    """A deterministic uint8 video [T, H, W, 3]: two shapes moving in straight lines over a fixed background.

    Each shape keeps its colour, size and velocity (wrapping around at the border), so consecutive
    frames share most tokens (static background, slowly moving objects), as real videos do.
    """
    width, height = size
    rng = np.random.default_rng(seed)
    background = _background(rng, width, height)
    colours = list(PALETTE.values())
    side = max(4, min(width, height) // 4)
    movers = []
    for index, colour_index in enumerate(rng.choice(len(colours), size=2, replace=False)):
        start = rng.integers(0, [max(1, width - side), max(1, height - side)])
        velocity = rng.integers(-max(1, side // 3), max(2, side // 3) + 1, size=2)
        movers.append((SHAPES[index % len(SHAPES)], colours[int(colour_index)], start, velocity))
    frames = []
    for t in range(num_frames):
        frame = background.copy()
        draw = ImageDraw.Draw(frame)
        for shape, colour, start, velocity in movers:
            x0, y0 = (start + t * velocity) % [max(1, width - side), max(1, height - side)]
            draw_shape(draw, shape, (int(x0), int(y0), int(x0) + side, int(y0) + side), colour)
        frames.append(np.asarray(frame))
    return np.stack(frames)
