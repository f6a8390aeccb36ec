"""A cluttered-scene visual-question-answering task, where which vision tokens are kept must depend on the question.

Each sample is a 224x224 RGB image (a 16x16 grid of 14 px patches: 256 vision tokens for a CLIP with 14 px
patches) with 8-16 shapes (circle / square / triangle in one of the eight colours of ``data.media.PALETTE``), 45%
**big** (30-46 px: across 3-5 patches each way), the others **small** (16-22 px: across 2-3 patches), never
overlapping, on a low-contrast textured background (stripes, checks or grain in two muted tones), and one question
about it with a one-word answer. Each kind also has its own two-tone surface (circles horizontal bands, squares
checks, triangles diagonal stripes, in the colour and its :data:`SHADES` tone), coarser on big objects than on small
ones, so that a single patch shows what it belongs to (:func:`render` says why):

==========  ===========================================================  ==========================
type        question                                                     answer
==========  ===========================================================  ==========================
colour      What colour is the big triangle?                             a colour ((size, shape) unique)
shape       What shape is the small red object?                          a shape ((size, colour) unique)
count       How many red objects are there? / How many squares are ...?  zero .. nine
position    Is the red square above the green circle?                    yes / no (both unique by colour
                                                                         and shape, >= 14 px apart)
relation    What colour is the small triangle left of the blue circle?   a colour: the one small triangle
                                                                         on that side of the anchor,
                                                                         while another small triangle of
                                                                         another colour lies clearly on
                                                                         the other side
==========  ===========================================================  ==========================

Token budgets of 10-50% keep 25-128 of the 256 tokens, while the objects cover 40-94 patches (5th-95th percentile;
67 on average): a selection that ignores the question must sometimes drop the asked object (a relation question
needs two objects, a count question all the matching ones). ``ClutterSample.asked`` holds the indices of the objects a correct answer needs.

Question types are drawn uniformly for training and cycle with the index in the held-out splits (exactly balanced);
yes/no answers are balanced. Everything is deterministic from ``(seed, split, index)``; the splits (``train``,
``val`` for model selection, ``heldout`` for reporting) use disjoint seed streams, and a split of any size shares
its first samples with a longer one. The batching, generation and scoring helpers of ``data.vqa_shapes`` take
these samples as they are (``image``, ``question``, ``answer``, ``qtype``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from data import vqa_shapes
from data.media import PALETTE, SHAPES, draw_shape
from data.vqa_shapes import Shape, shape_box

IMAGE_SIZE = 224
PATCH_SIZE = 14
GRID = IMAGE_SIZE // PATCH_SIZE  # 16: 256 vision tokens
NUM_OBJECTS = (8, 16)  # inclusive
SIZE_CLASSES = {"small": (16, 23), "big": (30, 47)}  # px, [low, high)
BIG_FRACTION = 0.45
GAP = 3  # px between any two objects' boxes
MIN_SEPARATION = 14  # px (one patch) between centres along the asked axis, for position and relation questions
COUNT_WORDS = vqa_shapes.COUNT_WORDS + ("five", "six", "seven", "eight", "nine")
QUESTION_TYPES = ("colour", "shape", "count", "position", "relation")
ANSWERS: dict[str, tuple[str, ...]] = {
    "colour": tuple(PALETTE),
    "shape": SHAPES,
    "count": COUNT_WORDS,
    "position": ("yes", "no"),
    "relation": tuple(PALETTE),
}
SPLITS = {"train": 0, "heldout": 1, "val": 2}
TEXTURES = ("stripes", "checks", "grain")
TONES = ((112, 112, 112), (138, 128, 112), (100, 116, 126), (126, 140, 126), (140, 130, 142), (120, 120, 136))
"""Muted background tones, far from every palette colour."""
RELATIONS = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}
"""relation -> (axis: 0 = x, 1 = y; sign of (object - anchor) along it)."""


@dataclass(frozen=True)
class Background:
    texture: str  # stripes | checks | grain
    tone: tuple[int, int, int]
    contrast: int  # the second tone is the first + contrast (each channel)
    period: int  # px: stripe width, check side, grain cell
    vertical: bool  # stripes: vertical (else horizontal)
    seed: int  # grain: which cells take the second tone


@dataclass(frozen=True)
class ClutterSample:
    shapes: tuple[Shape, ...]
    background: Background
    question: str
    answer: str
    qtype: str
    asked: tuple[int, ...]  # indices into shapes of the objects a correct answer needs

    @property
    def image(self) -> Image.Image:
        return render(self.shapes, self.background)


@dataclass(frozen=True)
class ClutterConversation:
    """One scene with several questions about it (multi-turn training data for the base model)."""

    shapes: tuple[Shape, ...]
    background: Background
    turns: tuple[tuple[str, str, str], ...]  # (question, answer, qtype)
    asked: tuple[tuple[int, ...], ...] = ()  # per turn: indices into shapes of the objects its answer needs

    @property
    def image(self) -> Image.Image:
        return render(self.shapes, self.background)


def size_word(shape: Shape) -> str:
    return "big" if shape.size >= SIZE_CLASSES["big"][0] else "small"


def background_pixels(background: Background, size: int = IMAGE_SIZE) -> np.ndarray:
    """``[size, size, 3]`` uint8: the two-tone texture."""
    ys, xs = np.mgrid[0:size, 0:size]
    if background.texture == "stripes":
        second = ((xs if background.vertical else ys) // background.period) % 2 == 1
    elif background.texture == "checks":
        second = (xs // background.period + ys // background.period) % 2 == 1
    elif background.texture == "grain":
        cells = -(-size // background.period)
        grain = np.random.default_rng(background.seed).random((cells, cells)) < 0.5
        second = grain[ys // background.period, xs // background.period]
    else:
        raise ValueError(f"unknown texture {background.texture!r}; expected one of {TEXTURES}")
    first = np.asarray(background.tone, dtype=np.int64)
    pixels = np.where(second[..., None], first + background.contrast, first)
    return np.clip(pixels, 0, 255).astype(np.uint8)


SURFACES = {"circle": "bands", "square": "checks", "triangle": "stripes"}
"""The surface of each kind, in the object's colour and its :func:`shade`: horizontal bands, checks, or diagonal
stripes."""
SURFACE_PERIODS = {"small": 2, "big": 5}
"""px per band / check of a small and a big object's surface (a nearer, bigger object shows a coarser texture)."""


SHADES: dict[str, tuple[int, int, int]] = {
    "red": (255, 160, 160), "green": (150, 240, 160), "blue": (170, 190, 255), "yellow": (110, 90, 0),
    "purple": (230, 170, 250), "orange": (120, 50, 0), "white": (175, 175, 175), "black": (85, 85, 85),
}
"""The second tone of each colour's surfaces: far from the colour (a dark colour's is light, a light one's dark), no
palette colour and no background tone, so every object is exactly the pixels of its colour and its shade."""


def shade(colour: str) -> tuple[int, int, int]:
    """The second tone of a ``colour`` object's surface (:data:`SHADES`)."""
    return SHADES[colour]


def surface_mask(shape: Shape, size: int = IMAGE_SIZE) -> np.ndarray:
    """``[size, size]`` bool: where ``shape``'s surface shows its shade (image coordinates; :data:`SURFACES`, with the
    period of its size word)."""
    ys, xs = np.mgrid[0:size, 0:size]
    period = SURFACE_PERIODS[size_word(shape)]
    surface = SURFACES[shape.kind]
    if surface == "bands":
        return (ys // period) % 2 == 1
    if surface == "checks":
        return (xs // period + ys // period) % 2 == 1
    return ((xs + ys) // period) % 2 == 1


def render(shapes: Sequence[Shape], background: Background, size: int = IMAGE_SIZE) -> Image.Image:
    """The shapes (silhouettes by ``data.media.draw_shape``, surfaces by :func:`surface_mask`) on the textured
    background.

    Each kind has its own surface as well as its silhouette (as real object categories have textures), and a big
    object's surface is coarser than a small one's: a 14 px patch holds a fragment of an outline, or none, and the toy
    CLIP tower, trained from scratch in minutes, does not learn to put the fragments together (per-patch shape 40%,
    chance 33%, after 600 steps of direct supervision on plain shapes; size 63% after 300, barely above the share
    of big objects' patches), while a surface is visible in every patch of its object."""
    pixels = background_pixels(background, size)
    for s in shapes:
        mask_image = Image.new("L", (size, size), 0)
        draw_shape(ImageDraw.Draw(mask_image), s.kind, shape_box(s), 1)
        inside = np.asarray(mask_image, dtype=bool)
        textured = surface_mask(s, size)
        pixels[inside & ~textured] = PALETTE[s.colour]
        pixels[inside & textured] = shade(s.colour)
    return Image.fromarray(pixels, mode="RGB")


def patch_objects(shapes: Sequence[Shape], grid: int = GRID) -> np.ndarray:
    """``[grid * grid]``: 1 + index of each patch's main shape, 0 for background (``data.vqa_shapes.patch_objects``
    at this task's image size)."""
    return vqa_shapes.patch_objects(shapes, grid, IMAGE_SIZE)


def patch_labels(sample, grid: int = GRID) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch ``(colour, shape)`` targets (``data.vqa_shapes.patch_labels`` at this task's image size): the dense
    auxiliary supervision of the base."""
    return vqa_shapes.patch_labels(sample, grid, IMAGE_SIZE)


def patch_targets(sample, grid: int = GRID) -> dict[str, torch.Tensor]:
    """Per-patch ``[grid * grid]`` targets of the vision tower's pretraining (``train_base``'s ``tower_steps``), from
    each patch's main object (:func:`patch_objects`): ``colour`` (1 + index in ``PALETTE``), ``shape`` (1 + index in
    ``SHAPES``), ``size`` (1 small, 2 big) and ``centre`` (1 where the patch holds the object's centre pixel), all 0
    on background patches."""
    colour, shape = patch_labels(sample, grid)
    objects = patch_objects(sample.shapes, grid)
    cell = IMAGE_SIZE // grid
    size = [0 if o == 0 else 1 + (size_word(sample.shapes[o - 1]) == "big") for o in objects]
    centre = [0 if o == 0 else int((sample.shapes[o - 1].cy // cell) * grid + sample.shapes[o - 1].cx // cell == p)
              for p, o in enumerate(objects)]
    return {"colour": colour, "shape": shape, "size": torch.tensor(size), "centre": torch.tensor(centre)}


TOWER_TARGET_CLASSES = {"colour": len(PALETTE) + 1, "shape": len(SHAPES) + 1, "size": 3, "centre": 2}
"""Classes of each :func:`patch_targets` head (background included)."""


# ----------------------------------------------------------------------------- scenes


def _background(rng: np.random.Generator) -> Background:
    return Background(texture=TEXTURES[int(rng.integers(len(TEXTURES)))],
                      tone=TONES[int(rng.integers(len(TONES)))], contrast=int(rng.integers(12, 26)),
                      period=int(rng.integers(4, 9)), vertical=bool(rng.random() < 0.5),
                      seed=int(rng.integers(2**31)))


def _scene(rng: np.random.Generator) -> tuple[Shape, ...]:
    """8-16 non-overlapping shapes (boxes ``GAP`` px apart), about a third of them big."""
    target = int(rng.integers(NUM_OBJECTS[0], NUM_OBJECTS[1] + 1))
    shapes: list[Shape] = []
    for _ in range(40 * target):
        if len(shapes) == target:
            break
        low, high = SIZE_CLASSES["big" if rng.random() < BIG_FRACTION else "small"]
        size = int(rng.integers(low, high))
        half = size / 2
        cx = int(rng.integers(int(np.ceil(half)) + 1, IMAGE_SIZE - int(np.ceil(half)) - 1))
        cy = int(rng.integers(int(np.ceil(half)) + 1, IMAGE_SIZE - int(np.ceil(half)) - 1))
        candidate = Shape(SHAPES[int(rng.integers(len(SHAPES)))], str(rng.choice(list(PALETTE))), cx, cy, size)
        if all(abs(cx - s.cx) * 2 >= size + s.size + 2 * GAP or abs(cy - s.cy) * 2 >= size + s.size + 2 * GAP
               for s in shapes):
            shapes.append(candidate)
    return tuple(shapes)


def _offset(a: Shape, b: Shape, axis: int) -> int:
    """Signed distance of ``a``'s centre from ``b``'s along ``axis`` (0: x, rightwards; 1: y, downwards)."""
    return (a.cx - b.cx) if axis == 0 else (a.cy - b.cy)


def _pick(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))]


def _try_question(rng: np.random.Generator, shapes: tuple[Shape, ...], qtype: str):
    """``(question, answer, asked indices)`` of type ``qtype`` about the scene, or None if it has none."""
    indices = range(len(shapes))
    by_size_kind = Counter((size_word(s), s.kind) for s in shapes)
    by_size_colour = Counter((size_word(s), s.colour) for s in shapes)
    by_colour_kind = Counter((s.colour, s.kind) for s in shapes)
    if qtype == "colour":
        unique = [i for i in indices if by_size_kind[(size_word(shapes[i]), shapes[i].kind)] == 1]
        if not unique:
            return None
        i = _pick(rng, unique)
        return f"What colour is the {size_word(shapes[i])} {shapes[i].kind}?", shapes[i].colour, (i,)
    if qtype == "shape":
        unique = [i for i in indices if by_size_colour[(size_word(shapes[i]), shapes[i].colour)] == 1]
        if not unique:
            return None
        i = _pick(rng, unique)
        return f"What shape is the {size_word(shapes[i])} {shapes[i].colour} object?", shapes[i].kind, (i,)
    if qtype == "count":
        if rng.random() < 0.5:
            colour = _pick(rng, list(PALETTE))
            asked = tuple(i for i in indices if shapes[i].colour == colour)
            question = f"How many {colour} objects are there?"
        else:
            kind = _pick(rng, SHAPES)
            asked = tuple(i for i in indices if shapes[i].kind == kind)
            question = f"How many {kind}s are there?"
        return (question, COUNT_WORDS[len(asked)], asked) if len(asked) < len(COUNT_WORDS) else None
    unique = [i for i in indices if by_colour_kind[(shapes[i].colour, shapes[i].kind)] == 1]
    relation = _pick(rng, list(RELATIONS))
    axis, sign = RELATIONS[relation]
    if qtype == "position":
        want_yes = rng.random() < 0.5
        pairs = [(a, b) for a in unique for b in unique if a != b
                 and abs(_offset(shapes[a], shapes[b], axis)) >= MIN_SEPARATION
                 and (_offset(shapes[a], shapes[b], axis) * sign > 0) == want_yes]
        if not pairs:
            return None
        a, b = _pick(rng, pairs)
        sa, sb = shapes[a], shapes[b]
        return (f"Is the {sa.colour} {sa.kind} {relation} the {sb.colour} {sb.kind}?", "yes" if want_yes else "no",
                (a, b))
    if qtype == "relation":
        # the referent: the only object of its (size, kind) clearly on that side of the anchor; another of that
        # (size, kind), of another colour, clearly on the other side; none of that (size, kind) near the boundary
        options = []
        for anchor in unique:
            for i in indices:
                if i == anchor:
                    continue
                same = [j for j in indices if j != anchor and (size_word(shapes[j]), shapes[j].kind)
                        == (size_word(shapes[i]), shapes[i].kind)]
                offsets = {j: _offset(shapes[j], shapes[anchor], axis) * sign for j in same}
                if any(abs(o) < MIN_SEPARATION for o in offsets.values()):
                    continue
                on_side = [j for j in same if offsets[j] > 0]
                others = [j for j in same if offsets[j] < 0]
                if on_side == [i] and others and all(shapes[j].colour != shapes[i].colour for j in others):
                    options.append((i, anchor))
        if not options:
            return None
        i, anchor = _pick(rng, options)
        s, a = shapes[i], shapes[anchor]
        return (f"What colour is the {size_word(s)} {s.kind} {relation} the {a.colour} {a.kind}?", s.colour,
                (i, anchor))
    raise ValueError(f"unknown question type {qtype!r}; expected one of {QUESTION_TYPES}")


def _rng(seed: int, split: str, index: int, stream: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; allowed: {', '.join(SPLITS)}")
    return np.random.default_rng([seed, SPLITS[split], index, 0xC1, stream])


def make_sample(seed: int, split: str, index: int) -> ClutterSample:
    """Sample ``index`` of ``split`` (deterministic in ``(seed, split, index)``)."""
    rng = _rng(seed, split, index, 0)
    qtype = (_pick(rng, QUESTION_TYPES) if split == "train" else QUESTION_TYPES[index % len(QUESTION_TYPES)])
    while True:  # a scene without a question of this type is redrawn
        background, shapes = _background(rng), _scene(rng)
        qa = _try_question(rng, shapes, qtype)
        if qa is not None:
            return ClutterSample(shapes, background, qa[0], qa[1], qtype, qa[2])


def make_conversation(seed: int, split: str, index: int, turns: int = 4,
                      type_weights: Sequence[float] | None = None) -> ClutterConversation:
    """Scene ``index`` of ``split`` with up to ``turns`` distinct questions (types drawn uniformly, or with
    ``type_weights`` over ``QUESTION_TYPES``): the base model's multi-turn training data (a separate stream from
    :func:`make_sample`)."""
    if type_weights is not None:
        weights = np.asarray(type_weights, dtype=np.float64)
        if weights.shape != (len(QUESTION_TYPES),) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"type_weights={list(type_weights)}: need {len(QUESTION_TYPES)} non-negative weights "
                             f"(over {', '.join(QUESTION_TYPES)}), not all 0")
        weights = weights / weights.sum()
    rng = _rng(seed, split, index, 1)
    while True:
        background, shapes = _background(rng), _scene(rng)
        found: list[tuple[str, str, str]] = []
        asked: list[tuple[int, ...]] = []
        for _ in range(4 * turns):
            qtype = (_pick(rng, QUESTION_TYPES) if type_weights is None
                     else QUESTION_TYPES[int(rng.choice(len(QUESTION_TYPES), p=weights))])
            qa = _try_question(rng, shapes, qtype)
            if qa is not None and all(qa[0] != q for q, _, _ in found):
                found.append((qa[0], qa[1], qtype))
                asked.append(qa[2])
            if len(found) == turns:
                break
        if found:
            return ClutterConversation(shapes, background, tuple(found), tuple(asked))


def make_split(split: str, size: int, seed: int = 0) -> list[ClutterSample]:
    """The first ``size`` samples of a split (held-out splits: question types cycle, exactly balanced)."""
    if size < 1:
        raise ValueError(f"size={size} must be >= 1")
    return [make_sample(seed, split, i) for i in range(size)]


def readout_targets(shapes: Sequence[Shape], asked: Sequence[int], grid: int = GRID) -> list[int]:
    """What an answer needs to have gathered about its first two asked objects: ``[colour, shape, row, column] x 2``
    (indices into ``PALETTE`` / ``SHAPES`` / the patch grid of the object's centre), -100 (ignored) where a question
    asks fewer objects, or more than two (a count question: no single object to read)."""
    targets = []
    objects = list(asked) if len(asked) <= 2 else []
    for slot in range(2):
        if slot < len(objects):
            s = shapes[objects[slot]]
            cell = IMAGE_SIZE // grid
            targets += [list(PALETTE).index(s.colour), SHAPES.index(s.kind), s.cy // cell, s.cx // cell]
        else:
            targets += [-100] * 4
    return targets


def comparison_targets(shapes: Sequence[Shape], asked: Sequence[int]) -> list[int]:
    """Where a two-object question's first object lies from its second, per axis: ``[vertical, horizontal]``, each 0
    (above / left of it by at least ``MIN_SEPARATION`` px), 1 (level within it) or 2 (below / right of it); -100
    (ignored) for questions about another number of objects. What a position question compares, before its relation
    word turns the comparison into yes or no."""
    if len(asked) != 2:
        return [-100, -100]
    a, b = shapes[asked[0]], shapes[asked[1]]

    def side(offset: int) -> int:
        return 1 if abs(offset) < MIN_SEPARATION else (0 if offset < 0 else 2)

    return [side(a.cy - b.cy), side(a.cx - b.cx)]


def asked_patches(sample: ClutterSample, grid: int = GRID) -> np.ndarray:
    """``[grid * grid]`` bool: the patches whose main object is one the question needs (``sample.asked``)."""
    return object_patches(sample.shapes, sample.asked, grid)


def relation_targets(question: str, shapes: Sequence[Shape], asked: Sequence[int]) -> list[int]:
    """What a question with a relation word needs at its answer: ``[axis, direction, on_side]``: the relation's axis
    (0: x, 1: y), its direction (0: left / above, 1: right / below), and whether the first asked object lies on that
    side of the second (1) or not (0), which is a position question's answer; -100 (ignored) for questions without a
    relation word, and ``on_side`` also for relation questions (their referent is on that side by construction)."""
    words = [word for word in RELATIONS if f" {word} the " in question]
    if len(words) != 1 or len(asked) != 2:
        return [-100, -100, -100]
    axis, sign = RELATIONS[words[0]]
    a, b = shapes[asked[0]], shapes[asked[1]]
    on_side = int(_offset(a, b, axis) * sign > 0) if question.startswith("Is the ") else -100
    return [axis, int(sign > 0), on_side]


def object_patches(shapes: Sequence[Shape], objects: Sequence[int], grid: int = GRID) -> np.ndarray:
    """``[grid * grid]`` bool: the patches whose main object is one of ``objects`` (indices into ``shapes``)."""
    main = patch_objects(shapes, grid)
    return np.isin(main - 1, np.asarray(objects, dtype=np.int64)) & (main > 0)
