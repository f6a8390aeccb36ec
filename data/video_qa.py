"""A generated video question-answering task (system B's testbed): moving and static objects on a textured scene.

Each sample is a video of ``NUM_FRAMES = 16`` frames of ``FRAME_SIZE = 224`` px and one question with a
one- or two-word answer. For Qwen2.5-VL (14 px patches, 2x2 merge, 2 frames per temporal step) a video
is ``8 grid steps x 8 x 8 = 512`` visual tokens, and the scene is laid out on that token grid: every
object fills one ``CELL = 28`` px cell (one merged token) for both frames of a grid step, and a moving
object advances one cell per grid step. Within a step in which it travels, its two frames show it
``MARGIN`` px behind and ahead of the cell's centre, so the motion is visible inside one temporal patch,
as it is in real video (the ViT's patch embedding sees both frames). So stage 1 of PruneVid has real
static regions to merge (the background texture and the static objects never change) and real dynamic
tokens (the moving objects' cells), token by token.

A scene (:class:`VideoScene`): a static background (a colour gradient with grey decorations in some
cells, never in a cell an object visits), one to three **moving** objects and one to three **static**
objects, all of distinct colours (``data.media.PALETTE``) and drawn with the one shape renderer. A
moving object sits still until its ``start_step``, then moves ``MOVE_STEPS`` cells in its direction
(one per grid step) and stays; no two objects ever share a cell at the same step.

==========  ==========================================================  =============================
type        question                                                    answer
==========  ==========================================================  =============================
colour      What colour is the object that moves to the left?           red (directions are distinct)
shape       What shape is the moving red object?                        circle
direction   Which direction does the red circle move?                   left | right | up | down
count       How many objects move?                                      one | two | three
order       Which starts moving first, the red circle or the blue ...?  red (the first one's colour)
static      What colour is the square that does not move?               green (a shape no other object has)
==========  ==========================================================  =============================

Every sample is also an EgoSchema-format record (:meth:`VideoQASample.egoschema_record`: question,
five options of the answer's kind, answer index, video id), and :func:`evidence_cells` names the cells
that hold a question's answer. Everything is deterministic from
``(seed, split, index)``: sample ``i`` of a split has its own ``numpy`` generator, so splits of
different sizes share their first samples and the splits use disjoint seed streams.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data.media import PALETTE, SHAPES, draw_shape
from pruning.common import check_int

VERSION = 2  # 2: motion visible within a temporal patch; static questions name a shape no other object has
"""Bump whenever anything below changes the generated samples."""

FRAME_SIZE = 224
NUM_FRAMES = 16
CELL = 28  # px: one merged visual token of Qwen2.5-VL (14 px patches, 2x2 merge)
FRAMES_PER_STEP = 2  # Qwen2.5-VL temporal_patch_size
GRID = FRAME_SIZE // CELL  # 8 x 8 cells
NUM_STEPS = NUM_FRAMES // FRAMES_PER_STEP  # 8 grid steps
MOVE_STEPS = 3  # cells a moving object travels
MAX_START_STEP = NUM_STEPS - 1 - MOVE_STEPS  # it has stopped by the last step
MARGIN = 3  # px between an object and its cell's border
DIRECTIONS = {"right": (0, 1), "left": (0, -1), "down": (1, 0), "up": (-1, 0)}  # (d_row, d_col) per step
DIRECTION_PHRASES = {"right": "to the right", "left": "to the left", "down": "down", "up": "up"}
COUNT_WORDS = ("one", "two", "three")
QUESTION_TYPES = ("colour", "shape", "direction", "count", "order", "static")
ANSWERS: dict[str, tuple[str, ...]] = {
    "colour": tuple(PALETTE),
    "shape": SHAPES,
    "direction": tuple(DIRECTIONS),
    "count": COUNT_WORDS,
    "order": tuple(PALETTE),
    "static": tuple(PALETTE),
}
SPLITS = {"train": 0, "val": 1, "test": 2}
NUM_OPTIONS = 5
EXTRA_OPTIONS = {"shape": ("star", "ring"), "direction": ("still",), "count": ("none", "four")}
"""Distractors beyond a type's answers, so every type has five options."""


@dataclass(frozen=True)
class VideoObject:
    colour: str
    shape: str
    row: int  # the cell it starts in
    col: int
    direction: str | None = None  # None: a static object
    start_step: int = 0  # the grid step at which it starts moving (movers only)

    @property
    def moves(self) -> bool:
        return self.direction is not None

    def cell(self, step: int) -> tuple[int, int]:
        """``(row, col)`` at grid step ``step``."""
        if not self.moves:
            return self.row, self.col
        travelled = min(max(step - self.start_step, 0), MOVE_STEPS)
        d_row, d_col = DIRECTIONS[self.direction]
        return self.row + d_row * travelled, self.col + d_col * travelled

    def moving_at(self, step: int) -> bool:
        """Whether it travels during grid step ``step`` (it is in the next cell at ``step + 1``)."""
        return self.moves and self.start_step <= step < self.start_step + MOVE_STEPS

    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class VideoScene:
    objects: tuple[VideoObject, ...]
    background_seed: int

    @property
    def movers(self) -> tuple[VideoObject, ...]:
        return tuple(o for o in self.objects if o.moves)

    @property
    def statics(self) -> tuple[VideoObject, ...]:
        return tuple(o for o in self.objects if not o.moves)

    def occupied(self) -> set[tuple[int, int]]:
        """Every cell an object covers at some step."""
        return {o.cell(step) for o in self.objects for step in range(NUM_STEPS)}

    def object_cells(self, step: int) -> dict[tuple[int, int], VideoObject]:
        return {o.cell(step): o for o in self.objects}


@dataclass(frozen=True)
class VideoQASample:
    scene: VideoScene
    question: str
    answer: str
    qtype: str
    options: tuple[str, ...]  # five, the answer among them
    video_id: str

    @property
    def answer_index(self) -> int:
        return self.options.index(self.answer)

    def frames(self) -> np.ndarray:
        """``uint8 [NUM_FRAMES, FRAME_SIZE, FRAME_SIZE, 3]``."""
        return render_frames(self.scene)

    def egoschema_record(self) -> dict:
        """The sample as an EgoSchema record (``q_uid``, ``question``, ``option 0..4``, ``answer``)."""
        record = {"q_uid": self.video_id, "question": self.question}
        record.update({f"option {i}": option for i, option in enumerate(self.options)})
        record["answer"] = self.answer_index
        return record


# ============================================================================= rendering


def _background(seed: int, occupied: set[tuple[int, int]]) -> Image.Image:
    """A static gradient with grey square decorations in about half of the cells no object visits."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0.0, 1.0, FRAME_SIZE)[:, None, None]
    x = np.linspace(0.0, 1.0, FRAME_SIZE)[None, :, None]
    top, bottom = rng.integers(70, 150, size=3), rng.integers(110, 190, size=3)
    side = rng.integers(-30, 31, size=3)
    pixels = (top * (1 - y) + bottom * y + side * x).clip(0, 255).round().astype(np.uint8)
    image = Image.fromarray(pixels, mode="RGB")
    draw = ImageDraw.Draw(image)
    for row in range(GRID):
        for col in range(GRID):
            if (row, col) in occupied or rng.random() < 0.5:
                continue
            grey = int(rng.integers(90, 200))
            x0, y0 = col * CELL + 8, row * CELL + 8
            draw.rectangle((x0, y0, x0 + 11, y0 + 11), fill=(grey, grey, max(grey - 20, 0)))
    return image


def cell_box(row: int, col: int) -> tuple[int, int, int, int]:
    """The box an object fills in cell ``(row, col)``."""
    return (col * CELL + MARGIN, row * CELL + MARGIN, (col + 1) * CELL - 1 - MARGIN, (row + 1) * CELL - 1 - MARGIN)


def shifted_box(box: tuple[int, int, int, int], direction: str, pixels: int) -> tuple[int, int, int, int]:
    d_row, d_col = DIRECTIONS[direction]
    return box[0] + d_col * pixels, box[1] + d_row * pixels, box[2] + d_col * pixels, box[3] + d_row * pixels


def render_frames(scene: VideoScene) -> np.ndarray:
    """``uint8 [NUM_FRAMES, H, W, 3]``: the background, then every object in its cell of that frame's grid step;
    an object travelling during the step is drawn ``MARGIN`` px behind its cell's centre in the step's first
    frame and ``MARGIN`` px ahead in the second (it never leaves the cell)."""
    background = _background(scene.background_seed, scene.occupied())
    frames = []
    for step in range(NUM_STEPS):
        for half in range(FRAMES_PER_STEP):
            frame = background.copy()
            draw = ImageDraw.Draw(frame)
            for obj in scene.objects:
                box = cell_box(*obj.cell(step))
                if obj.moving_at(step):
                    box = shifted_box(box, obj.direction, MARGIN if half else -MARGIN)
                draw_shape(draw, obj.shape, box, PALETTE[obj.colour])
            frames.append(np.asarray(frame))
    return np.stack(frames)


# ============================================================================= scenes and questions


def _random_scene(rng: np.random.Generator, num_movers: int | None = None) -> VideoScene:
    """1-3 movers (``num_movers``, default drawn; distinct directions, so "the object that moves left" is
    unique) and 1-3 static objects."""
    fixed_movers = num_movers
    while True:
        num_movers = fixed_movers if fixed_movers is not None else int(rng.integers(1, 4))
        num_statics = int(rng.integers(1, 4))
        colours = [str(c) for c in rng.permutation(list(PALETTE))[: num_movers + num_statics]]
        directions = [str(d) for d in rng.permutation(list(DIRECTIONS))[:num_movers]]
        objects = []
        for colour, direction in zip(colours[:num_movers], directions):
            d_row, d_col = DIRECTIONS[direction]
            rows = range(GRID) if d_row == 0 else (range(GRID - MOVE_STEPS) if d_row > 0 else range(MOVE_STEPS, GRID))
            cols = range(GRID) if d_col == 0 else (range(GRID - MOVE_STEPS) if d_col > 0 else range(MOVE_STEPS, GRID))
            objects.append(VideoObject(
                colour, str(rng.choice(SHAPES)), int(rng.choice(list(rows))), int(rng.choice(list(cols))),
                direction, int(rng.integers(0, MAX_START_STEP + 1)),
            ))  # fmt: skip
        for colour in colours[num_movers:]:
            cell = int(rng.integers(GRID * GRID))
            objects.append(VideoObject(colour, str(rng.choice(SHAPES)), cell // GRID, cell % GRID))
        cells_per_step = [[o.cell(step) for o in objects] for step in range(NUM_STEPS)]
        if all(len(set(cells)) == len(cells) for cells in cells_per_step):  # never two objects in one cell
            return VideoScene(tuple(objects), int(rng.integers(2**31)))


def _question(rng: np.random.Generator, scene: VideoScene, qtype: str) -> tuple[str, str] | None:
    """``(question, answer)`` of type ``qtype`` for ``scene``, or None when the scene cannot ask it."""
    movers, statics = scene.movers, scene.statics
    if qtype == "colour":
        target = movers[int(rng.integers(len(movers)))]
        return f"What colour is the object that moves {DIRECTION_PHRASES[target.direction]}?", target.colour
    if qtype == "shape":
        target = movers[int(rng.integers(len(movers)))]
        return f"What shape is the moving {target.colour} object?", target.shape
    if qtype == "direction":
        target = movers[int(rng.integers(len(movers)))]
        return f"Which direction does the {target.name()} move?", target.direction
    if qtype == "count":
        return "How many objects move?", COUNT_WORDS[len(movers) - 1]
    if qtype == "order":
        pairs = [(a, b) for a in movers for b in movers if a.start_step < b.start_step]
        if not pairs:
            return None
        first, later = pairs[int(rng.integers(len(pairs)))]
        named = [first, later] if rng.random() < 0.5 else [later, first]
        return f"Which starts moving first, the {named[0].name()} or the {named[1].name()}?", first.colour
    if qtype == "static":
        unique = [o for o in statics if sum(s.shape == o.shape for s in scene.objects) == 1]
        if not unique:
            return None
        target = unique[int(rng.integers(len(unique)))]
        return f"What colour is the {target.shape} that does not move?", target.colour
    raise ValueError(f"unknown question type {qtype!r}; expected one of {QUESTION_TYPES}")


def asked_object(scene: VideoScene, qtype: str, question: str, answer: str) -> VideoObject | None:
    """The one object ``question`` is about (for order: the one that starts first), or None for count questions."""
    by_colour = {o.colour: o for o in scene.objects}
    if qtype in ("colour", "order", "static"):
        return by_colour[answer]
    if qtype in ("shape", "direction"):
        (colour,) = [c for c in by_colour if c in question.rstrip("?").split()]
        return by_colour[colour]
    if qtype == "count":
        return None
    raise ValueError(f"unknown question type {qtype!r}; expected one of {QUESTION_TYPES}")


def evidence_cells(scene: VideoScene, qtype: str, question: str, answer: str) -> tuple[tuple[int, int, int], ...]:
    """``(step, row, col)`` of the visual tokens that hold the answer to ``question``: the asked object's
    cells while it travels (colour, direction), at every step (shape, static), every mover's travelling
    cells (count), the first mover's cell in its first travelling step (order)."""

    def cells(obj: VideoObject, moving_only: bool) -> list[tuple[int, int, int]]:
        return [(step, *obj.cell(step)) for step in range(NUM_STEPS) if obj.moving_at(step) or not moving_only]

    if qtype == "count":
        return tuple(cell for obj in scene.movers for cell in cells(obj, moving_only=True))
    target = asked_object(scene, qtype, question, answer)
    if qtype == "order":
        return ((target.start_step, *target.cell(target.start_step)),)
    return tuple(cells(target, moving_only=qtype in ("colour", "direction")))


def _options(rng: np.random.Generator, qtype: str, answer: str, scene: VideoScene) -> tuple[str, ...]:
    """Five options of the answer's kind, the answer among them, in a seeded order."""
    if qtype == "order":  # the two named objects' colours first among the distractors
        others = [c for c in PALETTE if c != answer and c not in {o.colour for o in scene.movers}]
        pool = [o.colour for o in scene.movers if o.colour != answer] + [others[i] for i in rng.permutation(len(others))]
    else:
        pool = [a for a in ANSWERS[qtype] + EXTRA_OPTIONS.get(qtype, ()) if a != answer]
        pool = [pool[i] for i in rng.permutation(len(pool))]
    distractors = list(dict.fromkeys(pool))[: NUM_OPTIONS - 1]
    options = [answer, *distractors]
    return tuple(options[i] for i in rng.permutation(NUM_OPTIONS))


def make_sample(seed: int, split: str, index: int) -> VideoQASample:
    """Sample ``index`` of ``split`` (deterministic); question types are drawn uniformly."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    check_int("seed", seed, lo=0)
    check_int("index", index, lo=0)
    rng = np.random.default_rng([seed, SPLITS[split], index])
    qtype = QUESTION_TYPES[int(rng.integers(len(QUESTION_TYPES)))]
    # count questions draw the answer first, so "three" is as frequent as "one" (crowded scenes are rejected more)
    num_movers = 1 + int(rng.random() * 3) if qtype == "count" else None
    while True:
        scene = _random_scene(rng, num_movers)
        asked = _question(rng, scene, qtype)
        if asked is not None:
            question, answer = asked
            options = _options(rng, qtype, answer, scene)
            return VideoQASample(scene, question, answer, qtype, options, f"{split}-{seed}-{index:06d}")


@dataclass(frozen=True)
class VideoQAConversation:
    """One scene with several questions about it (training: the video is encoded once for every answer)."""

    scene: VideoScene
    turns: tuple[tuple[str, str, str], ...]  # (question, answer, question type)
    video_id: str

    def frames(self) -> np.ndarray:
        return render_frames(self.scene)


def make_conversation(seed: int, split: str, index: int, turns: int = 4) -> VideoQAConversation:
    """Up to ``turns`` questions of distinct types about one scene (the types the scene can ask, in a seeded
    order), none whose answer an earlier turn's question or answer already says ("the red circle" gives
    away the shape of the red object); a stream disjoint from :func:`make_sample`'s (it draws from
    ``(seed, split, index, 1)``)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    check_int("turns", turns, lo=1)
    rng = np.random.default_rng([seed, SPLITS[split], index, 1])
    scene = _random_scene(rng)
    asked, said = [], set()
    for qtype in (QUESTION_TYPES[i] for i in rng.permutation(len(QUESTION_TYPES))):
        question = _question(rng, scene, qtype)
        if question is None or question[1] in said:  # an earlier turn would give the answer away
            continue
        asked.append((*question, qtype))
        said |= set(question[0].rstrip("?").split()) | {question[1]}
        if len(asked) == turns:
            break
    return VideoQAConversation(scene, tuple(asked), f"{split}-{seed}-{index:06d}-c")


DEMO_INDEX = 11
"""The test sample ``make run-video`` shows the trained model: which of two movers starts first (temporal order must be
read from the video); the shipped model answers it right with and without PruneVid's default preset."""


def demo_sample() -> VideoQASample:
    return make_sample(0, "test", DEMO_INDEX)


def demo_video_path() -> Path:
    """The demo sample's video as a lossless AVI in the embedded-model cache (written on first use)."""
    from data.demo_video import write_avi
    from models.tiny import cache_root

    path = cache_root() / f"video_qa_demo-v{VERSION}-{DEMO_INDEX}.avi"
    if not path.exists():
        write_avi(path, demo_sample().frames())
    return path


def make_split(split: str, size: int, seed: int = 0) -> list[VideoQASample]:
    check_int("size", size, lo=0)
    return [make_sample(seed, split, i) for i in range(size)]


__all__ = [
    "ANSWERS",
    "CELL",
    "FRAME_SIZE",
    "GRID",
    "NUM_FRAMES",
    "NUM_STEPS",
    "QUESTION_TYPES",
    "SPLITS",
    "VideoObject",
    "VideoQAConversation",
    "VideoQASample",
    "VideoScene",
    "cell_box",
    "demo_sample",
    "demo_video_path",
    "evidence_cells",
    "make_conversation",
    "make_sample",
    "make_split",
    "render_frames",
]
