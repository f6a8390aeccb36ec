"""A scatter plot drawn with PIL (no plotting dependency): quality against speed for the evaluators' tables.

Points crowd where many methods cost about the same, so each point carries a short number placed where it
overlaps no other number or point, and a key beside the axes spells out what each number is. Colour says the
point's series (a family of methods), the marker its variant (e.g. filled circle: one model, hollow square: another).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75))
MARKERS = ("circle", "square")


@dataclass(frozen=True)
class Point:
    x: float
    y: float
    label: str  # what the key says; points with the same label share a number
    series: int = 0  # index into the series legend (and COLOURS)
    y_error: float = 0.0  # half-length of the error bar (e.g. the standard error)
    marker: int = 0  # index into the marker legend (MARKERS: filled circle, hollow square)


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    span = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(span)) if span > 0 else 1.0
    step = min((m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= span), default=span)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step) + 1)]


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default(size=size)


def _overlaps(box: tuple, boxes: Sequence[tuple]) -> bool:
    return any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in boxes)


def _draw_marker(draw: ImageDraw.ImageDraw, px: float, py: float, marker: int, colour) -> None:
    if MARKERS[marker % len(MARKERS)] == "circle":
        draw.ellipse((px - 4, py - 4, px + 4, py + 4), fill=colour)
    else:
        draw.rectangle((px - 4, py - 4, px + 4, py + 4), outline=colour, width=2)


def scatter_plot(points: Sequence[Point], *, x_label: str, y_label: str, title: str, series: Sequence[str],
                 markers: Sequence[str] = (), size: tuple[int, int] = (1200, 720), key_width: int = 330) -> Image.Image:
    """Points with error bars on linear axes (a margin around the data); a number beside each point, and on the right
    the key: the series' colours, the markers' meaning, then ``number  label`` for every distinct label."""
    width, height = size
    left, right, top, bottom = 70, key_width + 20, 54, 56
    font, small = _font(13), _font(11)
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
    for tick in _ticks(x_low, x_high):
        px, _ = to_px(tick, y_low)
        draw.line((px, top, px, height - bottom), fill=(232, 232, 232))
        draw.line((px, height - bottom, px, height - bottom + 5), fill="black")
        draw.text((px, height - bottom + 8), f"{tick:.2f}", fill="black", font=small, anchor="mt")
    for tick in _ticks(y_low, y_high):
        _, py = to_px(x_low, tick)
        draw.line((left, py, width - right, py), fill=(232, 232, 232))
        draw.line((left - 5, py, left, py), fill="black")
        draw.text((left - 8, py), f"{tick:.1f}", fill="black", font=small, anchor="rm")
    draw.rectangle((left, top, width - right, height - bottom), outline="black")
    draw.text(((left + width - right) / 2, height - 10), x_label, fill="black", font=font, anchor="ms")
    draw.text((left, top - 8), y_label, fill="black", font=font, anchor="ls")
    draw.text((left, 8), title, fill="black", font=font, anchor="lt")

    numbers = {label: i + 1 for i, label in enumerate(dict.fromkeys(p.label for p in points))}
    centres = [to_px(p.x, p.y) for p in points]
    taken = [(px - 5, py - 5, px + 5, py + 5) for px, py in centres]  # numbers avoid every marker
    for p, (px, py) in zip(points, centres):
        colour = COLOURS[p.series % len(COLOURS)]
        if p.y_error:
            _, y0 = to_px(p.x, p.y - p.y_error)
            _, y1 = to_px(p.x, p.y + p.y_error)
            draw.line((px, y0, px, y1), fill=colour)
        _draw_marker(draw, px, py, p.marker, colour)
    for p, (px, py) in zip(points, centres):
        text = str(numbers[p.label])
        w, h = draw.textbbox((0, 0), text, font=small)[2:]
        candidates = [(px + dx, py + dy) for r in (9, 16, 24, 34, 46)
                      for dx, dy in ((r, -h / 2), (-r - w, -h / 2), (-w / 2, -r - h), (-w / 2, r),
                                     (r, -r - h), (-r - w, -r - h), (r, r), (-r - w, r))]
        x0, y0 = next((c for c in candidates if not _overlaps((c[0], c[1], c[0] + w, c[1] + h), taken)), candidates[0])
        taken.append((x0, y0, x0 + w, y0 + h))
        if math.hypot(x0 + w / 2 - px, y0 + h / 2 - py) > 14:  # far from its point: a leader line
            draw.line((px, py, x0 + w / 2, y0 + h / 2), fill=(170, 170, 170))
        draw.text((x0, y0), text, fill=COLOURS[p.series % len(COLOURS)], font=small)

    kx, ky = width - key_width, top
    for i, name in enumerate(series):
        draw.ellipse((kx, ky + 3, kx + 9, ky + 12), fill=COLOURS[i % len(COLOURS)])
        draw.text((kx + 16, ky), name, fill="black", font=font)
        ky += 18
    for i, name in enumerate(markers):
        _draw_marker(draw, kx + 4, ky + 8, i, (90, 90, 90))
        draw.text((kx + 16, ky), name, fill="black", font=font)
        ky += 18
    ky += 8
    series_of = {p.label: p.series for p in points}
    line_height = min(17, (height - ky - 10) / max(1, len(numbers)))
    for label, number in numbers.items():
        draw.text((kx, ky), f"{number:>2}  {label}", fill=COLOURS[series_of[label] % len(COLOURS)], font=small)
        ky += line_height
    return image
