"""A scatter plot drawn with PIL (no plotting dependency): quality against speed for the evaluators' tables."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14))


@dataclass(frozen=True)
class Point:
    x: float
    y: float
    label: str
    series: int = 0  # index into the legend (and COLOURS)
    y_error: float = 0.0  # half-length of the error bar (e.g. the standard error)


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    span = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(span)) if span > 0 else 1.0
    step = min((m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= span), default=span)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step) + 1)]


def scatter_plot(points: Sequence[Point], *, x_label: str, y_label: str, title: str, legend: Sequence[str],
                 size: tuple[int, int] = (1100, 700)) -> Image.Image:
    """Points with error bars and labels on linear axes (a margin around the data), a legend per series."""
    width, height = size
    left, right, top, bottom = 80, 30, 50, 60
    xs = [p.x for p in points]
    ys = [p.y + s * p.y_error for p in points for s in (-1, 1)]
    x_low, x_high = min(xs), max(xs)
    y_low, y_high = min(ys), max(ys)
    x_pad, y_pad = 0.06 * (x_high - x_low or 1), 0.08 * (y_high - y_low or 1)
    x_low, x_high, y_low, y_high = x_low - x_pad, x_high + x_pad, y_low - y_pad, y_high + y_pad

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x_low) / (x_high - x_low) * (width - left - right),
                top + (y_high - y) / (y_high - y_low) * (height - top - bottom))

    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((left, top, width - right, height - bottom), outline="black")
    for tick in _ticks(x_low, x_high):
        px, _ = to_px(tick, y_low)
        draw.line((px, height - bottom, px, height - bottom + 5), fill="black")
        draw.line((px, top, px, height - bottom), fill=(230, 230, 230))
        draw.text((px - 12, height - bottom + 8), f"{tick:.2f}", fill="black")
    for tick in _ticks(y_low, y_high):
        _, py = to_px(x_low, tick)
        draw.line((left - 5, py, left, py), fill="black")
        draw.line((left, py, width - right, py), fill=(230, 230, 230))
        draw.text((8, py - 6), f"{tick:.1f}", fill="black")
    draw.rectangle((left, top, width - right, height - bottom), outline="black")
    draw.text((width // 2 - 5 * len(x_label) // 2, height - 25), x_label, fill="black")
    draw.text((8, top - 20), y_label, fill="black")
    draw.text((left, 12), title, fill="black")
    for p in points:
        colour = COLOURS[p.series % len(COLOURS)]
        px, py = to_px(p.x, p.y)
        if p.y_error:
            _, y0 = to_px(p.x, p.y - p.y_error)
            _, y1 = to_px(p.x, p.y + p.y_error)
            draw.line((px, y0, px, y1), fill=colour)
        draw.ellipse((px - 4, py - 4, px + 4, py + 4), fill=colour)
        draw.text((px + 6, py - 6), p.label, fill=colour)
    for i, name in enumerate(legend):
        colour = COLOURS[i % len(COLOURS)]
        y = top + 10 + 16 * i
        draw.ellipse((width - right - 200, y, width - right - 192, y + 8), fill=colour)
        draw.text((width - right - 186, y - 2), name, fill="black")
    return image
