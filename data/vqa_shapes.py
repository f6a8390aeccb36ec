"""A generated visual-question-answering task: coloured shapes on a plain background (system C's task).

Each sample is a 112x112 RGB image with 2-4 shapes (circle / square / triangle in one of eight
colours, 10-13 px, each centred, +-1 px, in its own cell of the 8x8 grid of the model's 14 px
patches, so every silhouette lies inside one patch) and one question with a one-word answer,
every word a single token of the embedded tiny LLaVA tokenizer:

==========  ===============================================  =================================
type        question                                         answer
==========  ===============================================  =================================
colour      What colour is the circle?                       red (the shape kind is unique)
shape       Which shape is red?                              circle (the colour is unique)
count       How many squares are there?                      zero .. three
position    Is the red circle left of the blue square?       yes / no (also "above")
==========  ===============================================  =================================

Question types are drawn uniformly; yes/no answers are balanced. Everything is deterministic
from ``(seed, split, index)``: sample ``i`` of a split uses its own ``numpy`` generator, so
splits of different sizes share their first samples, and the train and held-out splits use
disjoint seed streams.

Helpers build LLaVA-1.5 prompts (``USER: <image>\\n{question} ASSISTANT:``) and batches with
labels on the answer (+ EOS) only and a ``question_mask`` (the question tokens, which the
learned pruner heads attend to), score answers (exact match after normalisation, smoothed
sentence BLEU) and give chance levels per question type.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from data.media import PALETTE, SHAPES, draw_shape

IMAGE_SIZE = 112
BACKGROUND = (128, 128, 128)
COUNT_WORDS = ("zero", "one", "two", "three", "four")
QUESTION_TYPES = ("colour", "shape", "count", "position")
ANSWERS: dict[str, tuple[str, ...]] = {
    "colour": tuple(PALETTE),  # the one palette (data.media); its order numbers the colour answers
    "shape": SHAPES,
    "count": COUNT_WORDS,
    "position": ("yes", "no"),
}
SPLITS = {"train": 0, "heldout": 1, "val": 2}  # val: model selection during training; heldout: reporting
GRID = 8  # cells of 14 px: the patch grid of a 112 px image with 14 px patches
SIZES = (10, 14)  # shape size in px, [low, high)
JITTER = 1  # px, around the cell centre
MIN_SEPARATION = 12  # px between centres along the asked axis for a position question


@dataclass(frozen=True)
class Shape:
    kind: str  # circle | square | triangle
    colour: str
    cx: int
    cy: int
    size: int  # side / diameter in px


@dataclass(frozen=True)
class VQASample:
    shapes: tuple[Shape, ...]
    question: str
    answer: str
    qtype: str

    @property
    def image(self) -> Image.Image:
        return render(self.shapes)


def shape_box(s: Shape) -> tuple[float, float, float, float]:
    """The box ``(x0, y0, x1, y1)`` the shape is drawn in (``data.media.draw_shape``)."""
    h = s.size / 2
    return (s.cx - h, s.cy - h, s.cx + h, s.cy + h)


def render(shapes: Iterable[Shape], size: int = IMAGE_SIZE) -> Image.Image:
    """Draw the shapes on the plain background (``data.media.draw_shape``)."""
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for s in shapes:
        draw_shape(draw, s.kind, shape_box(s), PALETTE[s.colour])
    return image


def label_map(shapes: Sequence[Shape], size: int = IMAGE_SIZE) -> np.ndarray:
    """``[size, size]`` int: 1 + index of the shape drawn at each pixel (0: background), later shapes on top."""
    image = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(image)
    for index, s in enumerate(shapes, start=1):
        draw_shape(draw, s.kind, shape_box(s), index)
    return np.asarray(image, dtype=np.int64)


def patch_objects(shapes: Sequence[Shape], grid: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """``[grid * grid]`` int, row-major (CLIP's patch order): 1 + index of the shape covering most of each patch
    if it covers at least a tenth of it, else 0 (background)."""
    labels = label_map(shapes, size)
    cell = size // grid
    blocks = labels.reshape(grid, cell, grid, cell).transpose(0, 2, 1, 3).reshape(grid * grid, cell * cell)
    out = np.zeros(grid * grid, dtype=np.int64)
    for patch, pixels in enumerate(blocks):
        counts = np.bincount(pixels, minlength=len(shapes) + 1)
        counts[0] = 0
        top = int(counts.argmax())
        if counts[top] * 10 >= pixels.size:
            out[patch] = top
    return out


def patch_labels(sample: "VQASample", grid: int = 8, size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch targets of a ``grid x grid`` patching of a ``size`` px image: ``(colour [grid^2], shape [grid^2])``.

    The label of a patch is its main shape (:func:`patch_objects`; colour: 1 + index in ``PALETTE``, shape: 1 +
    index in ``SHAPES``), or 0 (background). Row-major, the order of CLIP's patch tokens. Used as dense auxiliary
    supervision when training the base model.
    """
    objects = patch_objects(sample.shapes, grid, size)
    colour_index = {c: i + 1 for i, c in enumerate(PALETTE)}
    shape_index = {k: i + 1 for i, k in enumerate(SHAPES)}
    colours = [0 if o == 0 else colour_index[sample.shapes[o - 1].colour] for o in objects]
    kinds = [0 if o == 0 else shape_index[sample.shapes[o - 1].kind] for o in objects]
    return torch.tensor(colours), torch.tensor(kinds)


def _scene(rng: np.random.Generator) -> tuple[Shape, ...]:
    count = int(rng.integers(2, 5))
    cells = rng.choice(GRID * GRID, size=count, replace=False)
    cell = IMAGE_SIZE // GRID
    shapes = []
    for c in cells:
        size = int(rng.integers(*SIZES))
        cx = int((c % GRID) * cell + cell // 2 + rng.integers(-JITTER, JITTER + 1))
        cy = int((c // GRID) * cell + cell // 2 + rng.integers(-JITTER, JITTER + 1))
        shapes.append(Shape(str(rng.choice(SHAPES)), str(rng.choice(list(PALETTE))), cx, cy, size))
    return tuple(shapes)


def _plural(kind: str) -> str:
    return kind + "s"


def _try_question(rng: np.random.Generator, shapes: tuple[Shape, ...], qtype: str) -> tuple[str, str] | None:
    kinds = Counter(s.kind for s in shapes)
    colours = Counter(s.colour for s in shapes)
    if qtype == "colour":
        unique = [s for s in shapes if kinds[s.kind] == 1]
        if not unique:
            return None
        s = unique[int(rng.integers(len(unique)))]
        return f"What colour is the {s.kind}?", s.colour
    if qtype == "shape":
        unique = [s for s in shapes if colours[s.colour] == 1]
        if not unique:
            return None
        s = unique[int(rng.integers(len(unique)))]
        return f"Which shape is {s.colour}?", s.kind
    if qtype == "count":
        kind = SHAPES[int(rng.integers(len(SHAPES)))]
        return f"How many {_plural(kind)} are there?", COUNT_WORDS[kinds[kind]]
    # position: two shapes, each unique by (colour, kind), clearly apart along the asked axis
    pairs = Counter((s.colour, s.kind) for s in shapes)
    unique = [s for s in shapes if pairs[(s.colour, s.kind)] == 1]
    axis = "left" if rng.random() < 0.5 else "above"
    want_yes = rng.random() < 0.5
    candidates = []
    for a in unique:
        for b in unique:
            if a is b:
                continue
            delta = (b.cx - a.cx) if axis == "left" else (b.cy - a.cy)
            if abs(delta) >= MIN_SEPARATION and (delta > 0) == want_yes:
                candidates.append((a, b))
    if not candidates:
        return None
    a, b = candidates[int(rng.integers(len(candidates)))]
    relation = "left of" if axis == "left" else "above"
    return f"Is the {a.colour} {a.kind} {relation} the {b.colour} {b.kind}?", "yes" if want_yes else "no"


def make_sample(seed: int, split: str, index: int) -> VQASample:
    """Sample ``index`` of ``split`` (deterministic in ``(seed, split, index)``)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; allowed: {', '.join(SPLITS)}")
    rng = np.random.default_rng([seed, SPLITS[split], index])
    qtype = QUESTION_TYPES[index % len(QUESTION_TYPES)] if split != "train" else \
        QUESTION_TYPES[int(rng.integers(len(QUESTION_TYPES)))]
    while True:
        shapes = _scene(rng)
        qa = _try_question(rng, shapes, qtype)
        if qa is not None:
            return VQASample(shapes, qa[0], qa[1], qtype)


@dataclass(frozen=True)
class VQAConversation:
    """One scene with several questions about it (multi-turn training data for the base model)."""

    shapes: tuple[Shape, ...]
    turns: tuple[tuple[str, str, str], ...]  # (question, answer, qtype)

    @property
    def image(self) -> Image.Image:
        return render(self.shapes)


def make_conversation(seed: int, split: str, index: int, turns: int = 4) -> VQAConversation:
    """Scene ``index`` of ``split`` with up to ``turns`` distinct questions (types drawn uniformly).

    A separate stream from ``make_sample`` (same split seeds, another generator key), used to
    train the base: different questions about the same image (the colour of the circle *and*
    of the square) teach the model to read the question, not only its type.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; allowed: {', '.join(SPLITS)}")
    rng = np.random.default_rng([seed, SPLITS[split], index, 1])
    while True:  # (a scene with no askable question at all is redrawn)
        shapes = _scene(rng)
        found: list[tuple[str, str, str]] = []
        for _ in range(4 * turns):
            qtype = QUESTION_TYPES[int(rng.integers(len(QUESTION_TYPES)))]
            qa = _try_question(rng, shapes, qtype)
            if qa is not None and all(qa[0] != q for q, _, _ in found):
                found.append((qa[0], qa[1], qtype))
            if len(found) == turns:
                break
        if found:
            return VQAConversation(shapes, tuple(found))


def make_split(split: str, size: int, seed: int = 0) -> list[VQASample]:
    """The first ``size`` samples of a split (held-out: question types cycle, exactly balanced)."""
    if size < 1:
        raise ValueError(f"size={size} must be >= 1")
    return [make_sample(seed, split, i) for i in range(size)]


# ----------------------------------------------------------------------------- scoring


def normalize_answer(text: str) -> str:
    """Lower case, first word only, punctuation stripped ("Red." -> "red")."""
    words = re.sub(r"[^a-z0-9 ]", " ", text.lower()).split()
    return words[0] if words else ""


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)


def sentence_bleu(hypothesis: str, reference: str, max_n: int = 4) -> float:
    """Smoothed sentence BLEU of one hypothesis against one reference (lower-cased words).

    Geometric mean of the modified n-gram precisions p_1..p_N times the brevity penalty, with
    ``N = min(max_n, len(hyp), len(ref))`` (short answers are scored on the orders they have, so
    a one-word answer is scored on unigrams) and add-one smoothing of p_2..p_N (Lin & Och 2004):
    ``(matches + 1) / (total + 1)``. p_1 is not smoothed: no word in common scores 0.
    An exact match scores 1.0.
    """
    hyp = re.sub(r"[^a-z0-9 ]", " ", hypothesis.lower()).split()
    ref = re.sub(r"[^a-z0-9 ]", " ", reference.lower()).split()
    if not hyp or not ref:
        return 0.0
    orders = max(1, min(max_n, len(hyp), len(ref)))
    log_p = 0.0
    for n in range(1, orders + 1):
        h = Counter(tuple(hyp[i:i + n]) for i in range(len(hyp) - n + 1))
        r = Counter(tuple(ref[i:i + n]) for i in range(len(ref) - n + 1))
        match, total = sum(min(c, r[g]) for g, c in h.items()), sum(h.values())
        if n == 1:
            if match == 0:
                return 0.0
            log_p += math.log(match / total)
        else:
            log_p += math.log((match + 1) / (total + 1))
    bp = 1.0 if len(hyp) > len(ref) else math.exp(1 - len(ref) / len(hyp))
    return bp * math.exp(log_p / orders)


def chance_levels(samples: Sequence[VQASample], possible_answers: dict[str, tuple[str, ...]] = ANSWERS
                  ) -> dict[str, dict[str, float]]:
    """Per question type: ``uniform`` (1 / number of possible answers) and ``majority`` (best constant guess).
    ``possible_answers``: the task's answers per type (another task's, e.g. ``data.vqa_clutter.ANSWERS``)."""
    out: dict[str, dict[str, float]] = {}
    for qtype in possible_answers:
        answers = [s.answer for s in samples if s.qtype == qtype]
        if not answers:
            continue
        out[qtype] = {
            "uniform": 1.0 / len(possible_answers[qtype]),
            "majority": Counter(answers).most_common(1)[0][1] / len(answers),
            "n": len(answers),
        }
    return out


def accuracy_by_type(samples: Sequence[VQASample], predictions: Sequence[str]) -> dict[str, float]:
    """Exact-match accuracy per question type (in the order they first appear) and ``all``."""
    out: dict[str, float] = {}
    hits = [exact_match(p, s.answer) for s, p in zip(samples, predictions, strict=True)]
    for qtype in dict.fromkeys(s.qtype for s in samples):
        h = [hit for hit, s in zip(hits, samples) if s.qtype == qtype]
        if h:
            out[qtype] = sum(h) / len(h)
    out["all"] = sum(hits) / len(hits)
    return out


# ----------------------------------------------------------------------------- batches


def chat_prompt(question: str) -> str:
    """The LLaVA-1.5 prompt (``llava-hf`` chat template) for one image and one question."""
    return f"USER: <image>\n{question} ASSISTANT:"


def _fast_path_applies(processor, images: Sequence[Image.Image]) -> bool:
    """True when CLIP preprocessing of these images is only rescale + normalise (already at crop size)."""
    ip = getattr(processor, "image_processor", None)
    crop = getattr(ip, "crop_size", None) or {}
    size = getattr(ip, "size", None) or {}
    side = crop.get("height")
    return (
        side is not None and crop.get("width") == side and size.get("shortest_edge") == side
        and all(im.size == (side, side) and im.mode == "RGB" for im in images)
        and getattr(ip, "do_rescale", False) and getattr(ip, "do_normalize", False)
        and getattr(processor, "patch_size", None) is not None
    )


def pixel_values_fast(processor, images: Sequence[Image.Image]) -> torch.Tensor:
    """``CLIPImageProcessor`` output for images already at the crop size: ``(x * rescale - mean) / std``.

    Identical (to float rounding, 5e-7) to the processor, ~50x faster than its PIL path; the
    tests check it against the processor.
    """
    ip = processor.image_processor
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) * np.float32(ip.rescale_factor)
    x = torch.from_numpy(arr).permute(0, 3, 1, 2)
    mean = torch.tensor(ip.image_mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(ip.image_std, dtype=torch.float32)[:, None, None]
    return ((x - mean) / std).contiguous()


def _expanded_prompt(processor, question: str, side: int) -> str:
    """The prompt with ``<image>`` expanded the way ``LlavaProcessor`` does for a ``side`` x ``side`` image."""
    n = (side // processor.patch_size) ** 2 + processor.num_additional_image_tokens
    if processor.vision_feature_select_strategy == "default":
        n -= 1
    return chat_prompt(question).replace("<image>", processor.image_token * n)


def encode_batch(processor, samples: Sequence[VQASample], with_answers: bool,
                 fast: bool = True) -> dict[str, torch.Tensor]:
    """Left-padded batch for a LLaVA processor.

    Returns ``input_ids``, ``attention_mask``, ``pixel_values`` and ``question_mask`` (the tokens
    between the image and the end of the prompt); with answers also ``labels`` (-100 except the
    answer token(s) and EOS, which are appended after ``ASSISTANT:``). ``fast``: when the
    processor would only rescale and normalise (the images are at its crop size), do that
    directly and expand ``<image>`` like ``LlavaProcessor``; otherwise call the processor.
    """
    tokenizer = processor.tokenizer
    images = [s.image for s in samples]
    if fast and _fast_path_applies(processor, images):
        side = processor.image_processor.crop_size["height"]
        prompt_ids = tokenizer([_expanded_prompt(processor, s.question, side) for s in samples]).input_ids
        pixel_values = pixel_values_fast(processor, images)
    else:
        enc = processor(images=images, text=[chat_prompt(s.question) for s in samples])
        prompt_ids = enc["input_ids"]
        pixel_values = torch.as_tensor(np.stack([np.asarray(p) for p in enc["pixel_values"]]))
    image_id = tokenizer.convert_tokens_to_ids(processor.image_token)
    rows, prompt_lengths = [], []
    for s, ids in zip(samples, prompt_ids):
        ids = list(ids)
        prompt_lengths.append(len(ids))
        if with_answers:
            ids += tokenizer(s.answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        rows.append(ids)
    length = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    question_mask = torch.zeros((len(rows), length), dtype=torch.bool)
    for b, (ids, plen) in enumerate(zip(rows, prompt_lengths)):
        off = length - len(ids)
        input_ids[b, off:] = torch.tensor(ids)
        attention_mask[b, off:] = 1
        labels[b, off + plen:] = torch.tensor(ids[plen:], dtype=torch.long)
        last_image = max(i for i, t in enumerate(ids) if t == image_id)
        question_mask[b, off + last_image + 1: off + plen] = True
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
             "question_mask": question_mask}
    if with_answers:
        batch["labels"] = labels
    return batch


def encode_conversations(processor, conversations: Sequence[VQAConversation],
                         label_text: bool = False, answer_positions: bool = False) -> dict[str, torch.Tensor]:
    """Left-padded multi-turn batch in the LLaVA-1.5 format, labels on every answer + EOS.

    ``USER: <image>\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>...``; turn 1 is
    exactly the single-question prompt of ``encode_batch``. ``label_text``: label the question
    text too (every token after the image), a dense language-modelling signal. ``answer_positions``: also
    ``"answer_positions"`` ``[B, max turns]``, the row of each turn's last prompt token (where the model predicts the
    answer's first token), -1 for turns a conversation does not have (pop it before calling the model).
    """
    tokenizer = processor.tokenizer
    images = [c.image for c in conversations]
    if not _fast_path_applies(processor, images):
        raise ValueError("encode_conversations needs square RGB images at the processor's crop size")
    side = processor.image_processor.crop_size["height"]
    eos = tokenizer.eos_token_id
    image_id = tokenizer.convert_tokens_to_ids(processor.image_token)
    rows, label_rows, position_rows = [], [], []
    for conv in conversations:
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for turn, (question, answer, _) in enumerate(conv.turns):
            if turn == 0:
                prompt = tokenizer(_expanded_prompt(processor, question, side)).input_ids
            else:
                prompt = tokenizer(f"USER: {question} ASSISTANT:", add_special_tokens=False).input_ids
            reply = tokenizer(answer, add_special_tokens=False).input_ids + [eos]
            prompt_labels = [-100] * len(prompt)
            if label_text:
                after_image = max(i for i, t in enumerate(prompt) if t == image_id) + 1 if turn == 0 else 0
                prompt_labels[after_image:] = prompt[after_image:]
            positions.append(len(ids) + len(prompt) - 1)
            ids += prompt + reply
            labels += prompt_labels + reply
        rows.append(ids)
        label_rows.append(labels)
        position_rows.append(positions)
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    for b, (ids, lab) in enumerate(zip(rows, label_rows)):
        off = length - len(ids)
        input_ids[b, off:] = torch.tensor(ids)
        attention_mask[b, off:] = 1
        labels[b, off:] = torch.tensor(lab)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask,
             "pixel_values": pixel_values_fast(processor, images), "labels": labels}
    if answer_positions:
        turns = max(len(p) for p in position_rows)
        batch["answer_positions"] = torch.tensor([[length - len(ids) + p for p in positions] + [-1] * (turns - len(positions))
                                                  for ids, positions in zip(rows, position_rows)])
    return batch


class VQADataset(torch.utils.data.Dataset):
    """Map-style view of a split (``dataset[i]`` = ``make_sample(seed, split, i)``; ``sample_fn``: another task's
    ``make_sample``), for DataLoaders.

    Use ``collate_fn=VQACollator(processor)``; with Accelerate the DataLoader is sharded across
    processes, so every process sees different samples.
    """

    def __init__(self, split: str, size: int, seed: int = 0, sample_fn=None) -> None:
        if split not in SPLITS:
            raise ValueError(f"split={split!r}; allowed: {', '.join(SPLITS)}")
        self.split, self.size, self.seed = split, size, seed
        self.sample_fn = sample_fn if sample_fn is not None else make_sample  # another task's, e.g. vqa_clutter's

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> VQASample:
        if not 0 <= index < self.size:
            raise IndexError(index)
        return self.sample_fn(self.seed, self.split, index)


class VQACollator:
    """``encode_batch(processor, samples, with_answers)`` as a DataLoader ``collate_fn``."""

    def __init__(self, processor, with_answers: bool = True) -> None:
        self.processor, self.with_answers = processor, with_answers

    def __call__(self, samples: Sequence[VQASample]) -> dict[str, torch.Tensor]:
        return encode_batch(self.processor, samples, self.with_answers)


@torch.no_grad()
def generate_answers(model, processor, samples: Sequence[VQASample], batch_size: int = 32,
                     max_new_tokens: int = 3) -> list[str]:
    """Greedy answers (decoded, special tokens skipped) for ``samples``."""
    answers: list[str] = []
    device = next(model.parameters()).device
    for start in range(0, len(samples), batch_size):
        batch = encode_batch(processor, samples[start:start + batch_size], with_answers=False)
        batch.pop("question_mask")
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens,
                             pad_token_id=processor.tokenizer.pad_token_id)
        answers += processor.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return answers


__all__ = [
    "ANSWERS",
    "PALETTE",
    "QUESTION_TYPES",
    "SHAPES",
    "Shape",
    "VQACollator",
    "VQADataset",
    "VQAConversation",
    "VQASample",
    "accuracy_by_type",
    "chance_levels",
    "chat_prompt",
    "encode_batch",
    "encode_conversations",
    "make_conversation",
    "pixel_values_fast",
    "exact_match",
    "generate_answers",
    "make_sample",
    "make_split",
    "label_map",
    "patch_objects",
    "normalize_answer",
    "patch_labels",
    "shape_box",
    "render",
    "sentence_bleu",
]
