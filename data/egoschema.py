"""EgoSchema-format multiple-choice video QA: the reader, and a small generated set for the embedded model.

Format (the official `EgoSchema <https://github.com/egoschema/EgoSchema>`_ release)
======================================================================================

``questions.json``: a JSON **list** of records, or a JSON **object keyed by q_uid** whose values are
records (a ``q_uid`` inside a keyed record is optional and, if present, must equal its key)::

    [{"q_uid": "001934bb-81bd-4cd8-a574-0472ef3f6678",
      "question": "...",
      "option 0": "...", "option 1": "...", "option 2": "...", "option 3": "...", "option 4": "...",
      "answer": 3},                                   # optional, see below
     ...]

* ``q_uid``: the video id, a non-empty string without path separators; unique;
* ``question``: a non-empty string;
* ``option 0`` .. ``option 4``: exactly five non-empty strings (the official field names, with a space);
* other fields (``google_drive_id``, ...) are ignored.

The correct answer is an index ``0..4``, taken from either (or both, if they agree):

* an ``answer`` field in the record (an integer, or a one-digit string as in some re-releases);
* a separate answers file (``answers_path``): the official ``subset_answers.json``, a JSON object
  ``{q_uid: index}``; q_uids in it that are not in the questions are ignored.

The official full ``questions.json`` (5031 questions) has no answers; only the 500 of
``subset_answers.json`` are labelled. ``missing_answers`` says what to do with unlabelled questions:
``"error"`` (default: every question must have an answer), ``"skip"`` (drop them: the official
``questions.json`` + ``subset_answers.json`` gives the 500-question subset) or ``"keep"`` (keep them
with ``answer=None``; accuracy is then computed over the labelled ones).

Videos: ``<video_dir>/<q_uid>.mp4`` (the official layout), or ``<video_dir>/<q_uid>.<ext>`` for any
other container decord reads (:data:`VIDEO_EXTENSIONS`, tried in that order, ``.mp4`` first). A
missing or empty file is an error found when the questions are loaded, before any model work.

Every problem raises :class:`EgoSchemaError` (a ``ValueError``) with one line that names the file,
the record (index and q_uid), what is wrong and what to do.

The generated set
=================

:func:`make_synthetic_egoschema` writes a small set in exactly that format (``questions.json`` without
answers, ``subset_answers.json`` with them, ``videos/<q_uid>.avi``) for the embedded tiny model: each
video is the demo video's kind of scene (:mod:`data.demo_video`: a static background on the
28 px token grid, objects one cell large that jump one cell per Qwen temporal grid step, written as
lossless AVI by :func:`~data.demo_video.write_avi`), with 1-3 moving objects of known colour,
shape and direction drawn from a seeded generator. Questions ask for an object's direction ("Which
direction does the red square move?"), the colour of the object moving in a direction, or the number
of moving objects; five options, one correct. Everything is a function of ``(num_questions, seed,
num_frames)``: byte-for-byte the same files on every machine. :func:`synthetic_egoschema` caches the
set under ``$PRUNING_MODELS_CACHE`` (like the embedded models) and returns its paths.
"""

from __future__ import annotations

import json
import random
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data.media import PALETTE, SHAPES, draw_shape
from pruning.common import check_int

__all__ = [
    "NUM_OPTIONS",
    "OPTION_FIELDS",
    "VIDEO_EXTENSIONS",
    "MISSING_ANSWER_POLICIES",
    "EgoSchemaError",
    "EgoSchemaQuestion",
    "EgoSchemaFiles",
    "MovingObject",
    "parse_questions",
    "load_answers",
    "find_video",
    "load_egoschema",
    "make_synthetic_egoschema",
    "synthetic_egoschema",
]

NUM_OPTIONS = 5
OPTION_FIELDS = tuple(f"option {i}" for i in range(NUM_OPTIONS))
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".ts", ".3gp", ".ogv")
"""Containers looked for, in this order, as ``<video_dir>/<q_uid><ext>`` (decord/FFmpeg reads them all)."""
MISSING_ANSWER_POLICIES = ("error", "skip", "keep")
QUESTIONS_FILE = "questions.json"
ANSWERS_FILE = "subset_answers.json"


class EgoSchemaError(ValueError):
    """A bad question file, answer file, record or video directory (one line)."""


@dataclass(frozen=True)
class EgoSchemaQuestion:
    q_uid: str
    question: str
    options: tuple[str, ...]  # five
    answer: int | None  # 0..4, None when unlabelled (missing_answers="keep")
    video_path: Path | None  # None only from parse_questions (no video directory given)


@dataclass(frozen=True)
class EgoSchemaFiles:
    """Where a set lives: the questions file, the answers file (or None) and the video directory."""

    questions: Path
    answers: Path | None
    video_dir: Path


# ============================================================================= reading


def _read_json(path: Path, what: str) -> Any:
    path = Path(path)
    if not path.exists():
        raise EgoSchemaError(f"{what} {str(path)!r} does not exist: pass an existing JSON file")
    if path.is_dir():
        raise EgoSchemaError(f"{what} {str(path)!r} is a directory: pass a JSON file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise EgoSchemaError(f"{what} {str(path)!r} is not UTF-8 text: pass a JSON file") from None
    except json.JSONDecodeError as error:
        raise EgoSchemaError(
            f"{what} {str(path)!r} is not valid JSON ({error.msg} at line {error.lineno} column {error.colno})"
        ) from None


def _answer_index(value: Any, where: str) -> int:
    if isinstance(value, str) and len(value.strip()) == 1 and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int):
        raise EgoSchemaError(f"{where}: answer must be an option index 0..{NUM_OPTIONS - 1}, got {value!r}")
    if not 0 <= value < NUM_OPTIONS:
        raise EgoSchemaError(f"{where}: answer {value} is out of range: must be an option index 0..{NUM_OPTIONS - 1}")
    return value


def parse_questions(data: Any, source: str = "questions") -> list[EgoSchemaQuestion]:
    """Validate decoded questions JSON (a list of records or a dict keyed by q_uid); ``video_path=None``.

    ``answer`` is the record's ``answer`` field, or ``None`` when absent.
    """
    if isinstance(data, dict):
        items = []
        for key, record in data.items():
            if isinstance(record, dict) and "q_uid" in record and record["q_uid"] != key:
                raise EgoSchemaError(
                    f"{source}: record keyed {key!r} has q_uid {record['q_uid']!r}: the key and the q_uid must match"
                )
            items.append((key, {**record, "q_uid": key} if isinstance(record, dict) else record))
    elif isinstance(data, list):
        items = [(None, record) for record in data]
    else:
        raise EgoSchemaError(
            f"{source}: expected a JSON list of question records (or an object keyed by q_uid), got {type(data).__name__}"
        )
    if not items:
        raise EgoSchemaError(f"{source}: no questions in it")
    questions, seen = [], {}
    for index, (_, record) in enumerate(items):
        where = f"{source}: record {index}"
        if not isinstance(record, dict):
            raise EgoSchemaError(f"{where}: expected an object with q_uid, question, option 0..option 4, got {type(record).__name__}")
        q_uid = record.get("q_uid")
        if q_uid is not None:
            where += f" (q_uid {q_uid!r})"
        for name in ("q_uid", "question", *OPTION_FIELDS):
            if name not in record:
                raise EgoSchemaError(
                    f"{where}: missing field {name!r} (EgoSchema records have q_uid, question, "
                    f"{', '.join(OPTION_FIELDS)})"
                )
            value = record[name]
            if not isinstance(value, str) or not value.strip():
                raise EgoSchemaError(f"{where}: field {name!r} must be a non-empty string, got {value!r}")
        extra = sorted(k for k in record if isinstance(k, str) and k.startswith("option ") and k not in OPTION_FIELDS)
        if extra:
            raise EgoSchemaError(f"{where}: unexpected field(s) {extra}: EgoSchema has exactly five options, option 0..option 4")
        if any(sep in q_uid for sep in ("/", "\\")) or q_uid in (".", ".."):
            raise EgoSchemaError(f"{where}: q_uid must be a plain file stem (it names <video_dir>/<q_uid>.mp4), got {q_uid!r}")
        if q_uid in seen:
            raise EgoSchemaError(f"{where}: duplicate q_uid (also record {seen[q_uid]}): q_uids must be unique")
        seen[q_uid] = index
        answer = _answer_index(record["answer"], where) if record.get("answer") is not None else None
        options = tuple(record[name] for name in OPTION_FIELDS)
        questions.append(EgoSchemaQuestion(q_uid, record["question"], options, answer, None))
    return questions


def load_answers(path: str | Path) -> dict[str, int]:
    """An official ``subset_answers.json``: a JSON object ``{q_uid: option index 0..4}``."""
    data = _read_json(Path(path), "answers file")
    if not isinstance(data, dict):
        raise EgoSchemaError(
            f"answers file {str(path)!r}: expected a JSON object mapping q_uid to an option index (subset_answers.json), "
            f"got {type(data).__name__}"
        )
    return {str(q_uid): _answer_index(value, f"answers file {str(path)!r}: q_uid {q_uid!r}") for q_uid, value in data.items()}


def find_video(video_dir: str | Path, q_uid: str) -> Path:
    """``<video_dir>/<q_uid><ext>`` for the first ext of :data:`VIDEO_EXTENSIONS` that exists (non-empty)."""
    video_dir = Path(video_dir)
    for ext in VIDEO_EXTENSIONS:
        for candidate in (video_dir / f"{q_uid}{ext}", video_dir / f"{q_uid}{ext.upper()}"):
            if candidate.is_file():
                if candidate.stat().st_size == 0:
                    raise EgoSchemaError(f"video {str(candidate)!r} for q_uid {q_uid!r} is empty (0 bytes): re-download it")
                return candidate
    raise EgoSchemaError(
        f"no video for q_uid {q_uid!r} in {str(video_dir)!r}: expected {q_uid}.mp4 (or {q_uid}.<ext> for ext in "
        f"{', '.join(e[1:] for e in VIDEO_EXTENSIONS[1:])})"
    )


def load_egoschema(
    questions_path: str | Path,
    video_dir: str | Path,
    answers_path: str | Path | None = None,
    *,
    missing_answers: str = "error",
    limit: int | None = None,
) -> list[EgoSchemaQuestion]:
    """Read, validate and resolve an EgoSchema-format set (see the module doc), in file order.

    ``limit``: keep the first ``limit`` questions (after ``missing_answers="skip"``); only their
    videos are looked up.
    """
    if missing_answers not in MISSING_ANSWER_POLICIES:
        raise EgoSchemaError(f"missing_answers must be one of {', '.join(MISSING_ANSWER_POLICIES)}, got {missing_answers!r}")
    if limit is not None:
        check_int("limit", limit, lo=1, error=EgoSchemaError)
    questions_path = Path(questions_path)
    video_dir = Path(video_dir)
    if not video_dir.is_dir():
        raise EgoSchemaError(
            f"video directory {str(video_dir)!r} "
            f"{'is not a directory' if video_dir.exists() else 'does not exist'}: pass the folder holding <q_uid>.mp4"
        )
    questions = parse_questions(_read_json(questions_path, "questions file"), f"questions file {str(questions_path)!r}")
    answers = load_answers(answers_path) if answers_path is not None else {}
    resolved = []
    for index, q in enumerate(questions):
        answer = q.answer
        if q.q_uid in answers:
            if answer is not None and answer != answers[q.q_uid]:
                raise EgoSchemaError(
                    f"questions file {str(questions_path)!r}: record {index} (q_uid {q.q_uid!r}): answer {answer} "
                    f"disagrees with {answers[q.q_uid]} in the answers file {str(answers_path)!r}"
                )
            answer = answers[q.q_uid]
        if answer is None:
            if missing_answers == "skip":
                continue
            if missing_answers == "error":
                raise EgoSchemaError(
                    f"questions file {str(questions_path)!r}: record {index} (q_uid {q.q_uid!r}) has no answer "
                    f"(no 'answer' field{', not in the answers file' if answers_path is not None else ', no answers file'}): "
                    "pass the answers file (subset_answers.json), or set missing_answers (--missing-answers) to skip or keep"
                )
        resolved.append((q, answer))
    if not resolved:
        raise EgoSchemaError(
            f"questions file {str(questions_path)!r}: no labelled question left (every one lacks an answer): "
            "pass the answers file (subset_answers.json)"
        )
    if limit is not None:
        resolved = resolved[:limit]
    return [EgoSchemaQuestion(q.q_uid, q.question, q.options, answer, find_video(video_dir, q.q_uid)) for q, answer in resolved]


# ============================================================================= the generated set

VERSION = 2
"""Bump whenever anything below changes the generated files (2: the one palette and shape renderer of data.media)."""

SIZE = (112, 112)  # (W, H): 4x4 token cells, the embedded model's video frame size
DEFAULT_NUM_FRAMES = 16
DIRECTIONS = {"right": (0, 1), "left": (0, -1), "down": (1, 0), "up": (-1, 0)}  # (d_row, d_col) per grid step
DIRECTION_OPTIONS = {
    "right": "to the right",
    "left": "to the left",
    "down": "downwards",
    "up": "upwards",
    None: "it does not move",
}
COUNT_WORDS = ("none", "one", "two", "three", "four")


@dataclass(frozen=True)
class MovingObject:
    colour: str
    shape: str
    direction: str
    track: int  # the row (left/right movers) or column (up/down movers) it runs along
    start: int  # the cell it starts in along the track

    def cell(self, step: int, cols: int, rows: int) -> tuple[int, int]:
        d_row, d_col = DIRECTIONS[self.direction]
        if d_row == 0:
            return self.track % rows, (self.start + d_col * step) % cols
        return (self.start + d_row * step) % rows, self.track % cols


def _scene_frames(objects: list[MovingObject], num_frames: int, rng: random.Random) -> np.ndarray:
    """``uint8 [T, H, W, 3]``: a seeded static gradient background with grey decorations, objects on top."""
    from PIL import Image, ImageDraw

    from data.demo_video import CELL, FRAMES_PER_STEP

    width, height = SIZE
    cols, rows = width // CELL, height // CELL
    y = np.linspace(0.0, 1.0, height)[:, None, None]
    x = np.linspace(0.0, 1.0, width)[None, :, None]
    top = np.array([rng.randint(70, 150) for _ in range(3)])
    bottom = np.array([rng.randint(110, 190) for _ in range(3)])
    side = np.array([rng.randint(-30, 30) for _ in range(3)])
    background = (top * (1 - y) + bottom * y + side * x).clip(0, 255).round().astype(np.uint8)
    scene = Image.fromarray(background, mode="RGB")
    draw = ImageDraw.Draw(scene)
    touched = {obj.cell(step, cols, rows) for obj in objects for step in range(num_frames)}
    for r, c in [(r, c) for r in range(rows) for c in range(cols)]:  # static texture where no object passes
        if (r, c) in touched or rng.random() < 0.4:
            continue
        x0, y0, grey = c * CELL + 7, r * CELL + 7, rng.randint(90, 200)
        draw.rectangle((x0, y0, x0 + 13, y0 + 13), fill=(grey, grey, grey - 20))
    frames = []
    for frame_index in range(num_frames):
        frame = scene.copy()
        draw = ImageDraw.Draw(frame)
        step = frame_index // FRAMES_PER_STEP  # both frames of a Qwen temporal grid step show the same cells
        for obj in objects:
            r, c = obj.cell(step, cols, rows)
            box = (c * CELL + 2, r * CELL + 2, c * CELL + CELL - 3, r * CELL + CELL - 3)
            draw_shape(draw, obj.shape, box, PALETTE[obj.colour])
        frames.append(np.asarray(frame))
    return np.stack(frames)


def _random_objects(rng: random.Random) -> list[MovingObject]:
    """1-3 objects with distinct colours and distinct directions; left/right movers on distinct rows, up/down on distinct columns."""
    from data.demo_video import CELL

    cols, rows = SIZE[0] // CELL, SIZE[1] // CELL
    count = rng.randint(1, 3)
    colours = rng.sample(sorted(PALETTE), count)
    directions = rng.sample(sorted(DIRECTIONS), count)
    free_rows, free_cols = rng.sample(range(rows), rows), rng.sample(range(cols), cols)
    objects = []
    for colour, direction in zip(colours, directions):
        horizontal = DIRECTIONS[direction][0] == 0
        track = free_rows.pop() if horizontal else free_cols.pop()
        start = rng.randrange(cols if horizontal else rows)
        objects.append(MovingObject(colour, rng.choice(SHAPES), direction, track, start))
    return objects


def _question_for(kind: int, objects: list[MovingObject], rng: random.Random) -> tuple[str, list[str], int]:
    """``(question, five options, index of the correct one)``."""
    if kind == 0:  # direction of a named object
        target = rng.choice(objects)
        question = f"Which direction does the {target.colour} {target.shape} move?"
        options = list(DIRECTION_OPTIONS.values())
        correct = DIRECTION_OPTIONS[target.direction]
        rng.shuffle(options)
    elif kind == 1:  # colour of the object moving in a direction (directions are distinct per video)
        target = rng.choice(objects)
        question = f"What colour is the object that moves {DIRECTION_OPTIONS[target.direction]}?"
        distractors = rng.sample(sorted(set(PALETTE) - {target.colour}), NUM_OPTIONS - 1)
        options = [target.colour, *distractors]
        correct = target.colour
        rng.shuffle(options)
    else:  # how many objects move
        question = "How many objects move in the video?"
        options = list(COUNT_WORDS)
        correct = COUNT_WORDS[len(objects)]
    return question, options, options.index(correct)


def _check_generator_args(num_questions, seed, num_frames) -> None:
    for name, value, minimum in (("num_questions", num_questions, 1), ("num_frames", num_frames, 2), ("seed", seed, 0)):
        check_int(name, value, lo=minimum)


def make_synthetic_egoschema(
    out_dir: str | Path, num_questions: int = 12, seed: int = 0, num_frames: int = DEFAULT_NUM_FRAMES
) -> EgoSchemaFiles:
    """Write a deterministic EgoSchema-format set into ``out_dir`` (see the module doc); returns its paths.

    ``out_dir/questions.json`` (official list layout, no answers), ``out_dir/subset_answers.json``
    (``{q_uid: index}``), ``out_dir/videos/<q_uid>.avi`` (one 112x112 video of ``num_frames`` frames per
    question) and ``out_dir/scenes.json`` (the ground truth: each video's objects).
    """
    from data.demo_video import write_avi

    _check_generator_args(num_questions, seed, num_frames)
    out_dir = Path(out_dir)
    video_dir = out_dir / "videos"
    video_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    questions, answers, scenes = [], {}, {}
    for index in range(num_questions):
        q_uid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        objects = _random_objects(rng)
        question, options, answer = _question_for(index % 3, objects, rng)
        write_avi(video_dir / f"{q_uid}.avi", _scene_frames(objects, num_frames, rng))
        questions.append({"q_uid": q_uid, "question": question, **dict(zip(OPTION_FIELDS, options))})
        answers[q_uid] = answer
        scenes[q_uid] = [
            {"colour": o.colour, "shape": o.shape, "direction": o.direction, "track": o.track, "start_cell": o.start}
            for o in objects
        ]
    (out_dir / QUESTIONS_FILE).write_text(json.dumps(questions, indent=2) + "\n")
    (out_dir / ANSWERS_FILE).write_text(json.dumps(answers, indent=2) + "\n")
    (out_dir / "scenes.json").write_text(
        json.dumps({"seed": seed, "num_frames": num_frames, "size": list(SIZE), "videos": scenes}, indent=2) + "\n"
    )
    return EgoSchemaFiles(out_dir / QUESTIONS_FILE, out_dir / ANSWERS_FILE, video_dir)


def synthetic_egoschema(num_questions: int = 12, seed: int = 0, num_frames: int = DEFAULT_NUM_FRAMES) -> EgoSchemaFiles:
    """The generated set, cached: ``<cache>/egoschema_synthetic-n<N>-s<seed>-f<T>-v<VERSION>`` (built on first use)."""
    from models.tiny import cached_model_dir

    _check_generator_args(num_questions, seed, num_frames)
    root = cached_model_dir(
        f"egoschema_synthetic-n{num_questions}-s{seed}-f{num_frames}",
        VERSION,
        lambda tmp: make_synthetic_egoschema(tmp, num_questions, seed, num_frames),
    )
    return EgoSchemaFiles(root / QUESTIONS_FILE, root / ANSWERS_FILE, root / "videos")
