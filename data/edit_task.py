"""A generated image-editing task: scenes of coloured shapes, an instruction, and the edited scene (system A's testbed).

Each sample is a 128x128 RGB source image, one instruction and the 128x128 target image the instruction asks
for. A scene is a background (one of five named colours, plain, striped or checked) and 2-4 shapes (circle /
square / triangle in one of the eight palette colours of ``data.media``, 20-32 px), no two overlapping and no
two with the same colour and shape, so "the red circle" names one object:

==============  =============================================  ===============================================
type            instruction                                    target
==============  =============================================  ===============================================
recolour        Make the red circle blue.                      that object in the new colour
remove          Remove the green square.                       the background where it was
add             Add a yellow triangle at the top left.         a 26 px shape centred in that ninth of the image
move            Move the blue circle to the bottom right.      the object, same size, centred in that ninth
background      Change the background to mint.                 the same pattern in the new colour
==============  =============================================  ===============================================

The target is a deterministic function of the source and the instruction (added and moved shapes go to the
centre of one of nine regions, ``REGIONS``), so "the right answer" is one image and a model's output can be
scored against it. Edit types are drawn uniformly. Everything is deterministic from ``(seed, split, index)``:
sample ``i`` of a split uses its own ``numpy`` generator, so splits of different sizes share their first
samples, and the train, validation and test splits use disjoint seed streams.

Helpers render the source, the target and the asked object's mask, and read the colour of an output image's
pixels inside a mask (:func:`mask_colour`: did a recolour edit give the object the asked colour?). PSNR and SSIM
are ``evaluation.metrics``'.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from data.media import PALETTE, SHAPES, draw_shape

IMAGE_SIZE = 128
EDIT_TYPES = ("recolour", "remove", "add", "move", "background")
SPLITS = {"train": 0, "val": 1, "test": 2}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "grey": (128, 128, 128),
    "sand": (196, 178, 128),
    "sky": (120, 170, 215),
    "mint": (140, 200, 160),
    "rose": (215, 150, 170),
}
"""Named background colours (muted, unlike every palette colour), the words of background edits."""
TEXTURES = ("plain", "stripes", "checks")
TEXTURE_PERIOD = 16  # px: stripes and checks alternate the colour and a darker shade every 16 px
TEXTURE_SHADE = 0.8
REGIONS: dict[str, tuple[int, int]] = {
    name: (col, row)
    for row, names in enumerate((("top left", "top", "top right"), ("left", "centre", "right"),
                                 ("bottom left", "bottom", "bottom right")))
    for col, name in enumerate(names)
}
"""Where ``add`` and ``move`` put a shape: the centre of one ninth of the image, (column, row) of a 3x3 grid."""
REGION_CENTRES = (22, 64, 106)  # px along either axis
OBJECT_SIZES = (20, 33)  # px, [low, high)
ADD_SIZE = 26
NUM_OBJECTS = (2, 5)  # [low, high)
MARGIN = 3  # px kept free between two shapes' boxes


@dataclass(frozen=True)
class Shape:
    """One object: ``colour`` (a ``PALETTE`` name), ``shape`` (``SHAPES``), centre ``(x, y)`` px, ``size`` px."""

    colour: str
    shape: str
    x: int
    y: int
    size: int

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    def box(self) -> tuple[int, int, int, int]:
        half = self.size // 2
        return self.x - half, self.y - half, self.x - half + self.size, self.y - half + self.size


@dataclass(frozen=True)
class Scene:
    """A background (``background`` name, ``texture``) and the shapes drawn on it, in drawing order."""

    background: str
    texture: str
    shapes: tuple[Shape, ...]

    def find(self, name: str) -> Shape:
        return next(s for s in self.shapes if s.name == name)


@dataclass(frozen=True)
class EditSample:
    """One edit: ``source`` scene, ``instruction``, ``target`` scene; ``asked`` the edited shape as it is in the target
    (``remove``: as it was in the source; ``background``: None); ``new_colour`` for recolour edits."""

    split: str
    index: int
    edit_type: str
    instruction: str
    source: Scene
    target: Scene
    asked: Shape | None
    new_colour: str | None = None

    def source_image(self) -> Image.Image:
        return render(self.source)

    def target_image(self) -> Image.Image:
        return render(self.target)

    def asked_mask(self) -> np.ndarray:
        """``[H, W]`` bool: the asked shape's pixels (in the target; for ``remove``, where it was), or all False."""
        if self.asked is None:
            return np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
        return shape_mask(self.asked)


# ============================================================================= rendering


def background_pixels(name: str, texture: str, size: int = IMAGE_SIZE) -> np.ndarray:
    """``[size, size, 3]`` uint8: the named colour, plain or alternating with a darker shade (stripes, checks)."""
    colour = np.array(BACKGROUNDS[name], dtype=np.float64)
    shade = np.round(colour * TEXTURE_SHADE)
    rows = (np.arange(size) // TEXTURE_PERIOD) % 2
    cols = (np.arange(size) // TEXTURE_PERIOD) % 2
    if texture == "plain":
        dark = np.zeros((size, size), dtype=bool)
    elif texture == "stripes":
        dark = np.repeat(rows[:, None], size, axis=1).astype(bool)
    elif texture == "checks":
        dark = (rows[:, None] ^ cols[None, :]).astype(bool)
    else:
        raise ValueError(f"unknown texture {texture!r}; expected one of {TEXTURES}")
    pixels = np.where(dark[..., None], shade, colour)
    return pixels.astype(np.uint8)


def render(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    """The scene as an RGB image (PIL's non-antialiased drawing: the same pixels on every machine)."""
    image = Image.fromarray(background_pixels(scene.background, scene.texture, size), mode="RGB")
    draw = ImageDraw.Draw(image)
    for s in scene.shapes:
        x0, y0, x1, y1 = s.box()
        draw_shape(draw, s.shape, (x0, y0, x1 - 1, y1 - 1), PALETTE[s.colour])
    return image


def shape_mask(shape: Shape, size: int = IMAGE_SIZE) -> np.ndarray:
    """``[size, size]`` bool: the pixels ``shape`` covers when drawn alone."""
    image = Image.new("L", (size, size), 0)
    x0, y0, x1, y1 = shape.box()
    draw_shape(ImageDraw.Draw(image), shape.shape, (x0, y0, x1 - 1, y1 - 1), 255)
    return np.asarray(image) > 0


# ============================================================================= generation


def _free(box: tuple[int, int, int, int], others: Sequence[Shape], size: int = IMAGE_SIZE) -> bool:
    """``box`` lies inside the image and at least ``MARGIN`` px from every other shape's box."""
    x0, y0, x1, y1 = box
    if x0 < 0 or y0 < 0 or x1 > size or y1 > size:
        return False
    for other in others:
        a0, b0, a1, b1 = other.box()
        if x0 < a1 + MARGIN and a0 < x1 + MARGIN and y0 < b1 + MARGIN and b0 < y1 + MARGIN:
            return False
    return True


def _random_scene(rng: np.random.Generator) -> Scene:
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
    wanted = int(rng.integers(*NUM_OBJECTS))
    shapes: list[Shape] = []
    for _ in range(200):
        if len(shapes) == wanted:
            break
        size = int(rng.integers(*OBJECT_SIZES))
        x, y = (int(v) for v in rng.integers(size // 2, IMAGE_SIZE - size + size // 2 + 1, size=2))
        colour = list(PALETTE)[int(rng.integers(len(PALETTE)))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        candidate = Shape(colour, shape, x, y, size)
        if any(s.name == candidate.name for s in shapes) or not _free(candidate.box(), shapes):
            continue
        shapes.append(candidate)
    return Scene(background, texture, tuple(shapes))


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _region_centre(region: str) -> tuple[int, int]:
    col, row = REGIONS[region]
    return REGION_CENTRES[col], REGION_CENTRES[row]


def _try_edit(rng: np.random.Generator, scene: Scene, edit_type: str):
    """``(instruction, target scene, asked shape, new colour)`` for one edit of ``edit_type``, or None if impossible."""
    shapes = list(scene.shapes)
    if edit_type == "background":
        new = [b for b in BACKGROUNDS if b != scene.background][int(rng.integers(len(BACKGROUNDS) - 1))]
        return f"Change the background to {new}.", replace(scene, background=new), None, None
    if edit_type == "add":
        colour = list(PALETTE)[int(rng.integers(len(PALETTE)))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        if any(s.name == f"{colour} {shape}" for s in shapes):
            return None
        region = list(REGIONS)[int(rng.integers(len(REGIONS)))]
        added = Shape(colour, shape, *_region_centre(region), ADD_SIZE)
        if not _free(added.box(), shapes):
            return None
        return (f"Add {_article(colour)} {colour} {shape} at the {region}.", replace(scene, shapes=tuple(shapes) + (added,)), added, None)
    index = int(rng.integers(len(shapes)))
    chosen = shapes[index]
    if edit_type == "recolour":
        new = [c for c in PALETTE if c != chosen.colour][int(rng.integers(len(PALETTE) - 1))]
        recoloured = replace(chosen, colour=new)
        if any(s.name == recoloured.name for s in shapes):
            return None
        shapes[index] = recoloured
        return f"Make the {chosen.name} {new}.", replace(scene, shapes=tuple(shapes)), recoloured, new
    if edit_type == "remove":
        del shapes[index]
        return f"Remove the {chosen.name}.", replace(scene, shapes=tuple(shapes)), chosen, None
    if edit_type == "move":
        region = list(REGIONS)[int(rng.integers(len(REGIONS)))]
        moved = replace(chosen, x=_region_centre(region)[0], y=_region_centre(region)[1])
        others = shapes[:index] + shapes[index + 1:]
        if abs(moved.x - chosen.x) + abs(moved.y - chosen.y) < 24 or not _free(moved.box(), others):
            return None
        shapes[index] = moved
        return f"Move the {chosen.name} to the {region}.", replace(scene, shapes=tuple(shapes)), moved, None
    raise ValueError(f"unknown edit type {edit_type!r}; expected one of {EDIT_TYPES}")


def make_edit(seed: int, split: str, index: int) -> EditSample:
    """Sample ``index`` of ``split`` (``train`` / ``val`` / ``test``) for ``seed``: the same on every machine."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {tuple(SPLITS)}")
    rng = np.random.default_rng([seed, SPLITS[split], index])
    edit_type = EDIT_TYPES[int(rng.integers(len(EDIT_TYPES)))]
    while True:
        scene = _random_scene(rng)
        made = _try_edit(rng, scene, edit_type)
        if made is not None:
            instruction, target, asked, new_colour = made
            return EditSample(split, index, edit_type, instruction, scene, target, asked, new_colour)


def make_split(split: str, size: int, seed: int = 0, start: int = 0) -> list[EditSample]:
    """Samples ``start .. start + size - 1`` of ``split``."""
    return [make_edit(seed, split, start + i) for i in range(size)]


def instruction_lines() -> list[str]:
    """Every instruction word of the task in its templates (the tokenizer's BPE corpus makes each word one token)."""
    lines = []
    for colour in PALETTE:
        for shape in SHAPES:
            lines.append(f"Remove the {colour} {shape}.")
            lines += [f"Make the {colour} {shape} {new}." for new in PALETTE if new != colour][:2]
            lines += [f"Add {_article(colour)} {colour} {shape} at the {region}." for region in REGIONS]
            lines += [f"Move the {colour} {shape} to the {region}." for region in REGIONS]
    lines += [f"Change the background to {name}." for name in BACKGROUNDS] * 2
    return lines


# ============================================================================= scoring


def nearest_palette_colour(rgb: Sequence[float]) -> str:
    """The ``PALETTE`` name closest (Euclidean, in 0-255 RGB) to ``rgb``."""
    rgb = np.asarray(rgb, dtype=np.float64)
    return min(PALETTE, key=lambda name: float(np.sum((np.asarray(PALETTE[name], dtype=np.float64) - rgb) ** 2)))


def mask_colour(image: Image.Image, mask: np.ndarray) -> str:
    """The palette colour nearest the median RGB of ``image`` over ``mask`` (e.g. a recoloured shape's pixels)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)[mask]
    return nearest_palette_colour(np.median(pixels, axis=0))
