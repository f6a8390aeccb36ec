"""The embedded video-QA Qwen2.5-VL: the real architecture at toy size, trained from scratch on ``data.video_qa``.

It is the model system B's quality is measured on: without learned weights, pruning cannot be seen to
cost anything. Everything here is the real Qwen2.5-VL (windowed ViT with full-attention blocks, 2x2
merger, M-RoPE, GQA) built from a config, with the real ``Qwen2_5_VLProcessor`` around a tiny BPE
tokenizer whose corpus includes the task's questions. Training (``scripts/train_video_base.py``,
``make train-video-base``) minimises the answer tokens' cross-entropy plus auxiliary supervision that
gives a from-scratch toy the structure a pretrained model brings:

* **Per-token probes** (linear, on unit-rms features, discarded after training; weight ``aux_weight``):
  on the merger's output tokens, which palette colour and which shape fill each token's cell at that
  grid step (0 = background); on the language model's hidden states after its first layer, each visual
  token's grid step. The **motion probe** (weight ``motion_weight``) reads, over the tokens that hold an
  object, whether it is still or travelling and in which direction (with ``motion_weight=0`` it runs over
  all tokens at ``aux_weight``, where "not travelling" is right for 99% of them and the vision tower
  learned little motion).
* **Attention supervision** (weight ``attention_weight``): at the position that predicts each answer,
  head 0 of the first layer is trained to look at the question's key words (:func:`key_words`) and head
  0 of the middle layers (1 and 2 of 4) at the answer's evidence tokens
  (:func:`data.video_qa.evidence_cells`), by ``-log`` of the attention mass there.
* **Readout supervision** (weight ``readout_weight``): the answer's cross-entropy also from the
  second-to-last layer's hidden state, through the model's own final norm and ``lm_head``.
* **Value supervision** (weight ``value_weight``): what head 0 of those middle layers carries from the
  evidence to the answer position: linear probes on its output (before ``o_proj``) must read the asked
  object's colour, shape and motion (:func:`asked_attributes`). Attention supervision says where to look,
  value supervision what to bring back.

What made training work, as far as it was tested (docs/BENCHMARKS.md, the video QA testbed): without
any of these, and with the probes and attention supervision at weight 1, the answers stayed at each
question type's prior for hundreds of steps; with probes and attention supervision at 0.1 and the
readout at 1 validation accuracy left chance by step 500, but direction and shape stayed at chance; the
object-token motion probe at weight 1 and the value supervision (the defaults) taught both. What each
part contributes alone was not isolated.

The supervision shapes how the model reads the video; it does not hand it the answer: at test time
the model has only the pixels and the question. The trained directory is shipped in the repository
(``models/trained/video_qa``) with its training record; ``from_pretrained`` loads it.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import torch

from data.media import PALETTE, SHAPES
from models.tiny.training import lr_factor, optimizer_step, resume_checkpoint, save_checkpoint

PALETTE_INDEX = {colour: i for i, colour in enumerate(PALETTE)}

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED_DIR = REPO_ROOT / "models" / "trained" / "video_qa"
VIDEO_MAX_PIXELS = 224 * 224  # a 224x224 frame stays whole: 8 x 8 merged tokens per grid step
METRICS_FILE = "training_record.json"

DEFAULTS = dict(steps=2400, batch_size=8, turns=4, lr=2e-3, warmup=100, weight_decay=0.01, aux_weight=0.1,
                motion_weight=1.0, attention_weight=0.1, readout_weight=1.0, value_weight=1.0, clip=1.0, embed_std=1.0, qk_std=0.1, seed=0, eval_size=120,
                eval_every=250, text_hidden=128, text_layers=4, vision_hidden=64)


# ============================================================================= model, tokenizer, processor


def task_lines() -> list[str]:
    """Every question template and answer word of the task, for the tokenizer's BPE corpus."""
    from data.video_qa import ANSWERS, DIRECTION_PHRASES, EXTRA_OPTIONS

    lines = []
    for colour in PALETTE:
        for shape in SHAPES:
            lines += [
                f"Which direction does the {colour} {shape} move?",
                f"What shape is the moving {colour} object?",
                f"What colour is the {shape} that does not move?",
                f"Which starts moving first, the {colour} {shape} or the {colour} {shape}?",
            ]
    lines += [f"What colour is the object that moves {phrase}?" for phrase in DIRECTION_PHRASES.values()]
    lines.append("How many objects move?")
    words = sorted({w for answers in ANSWERS.values() for w in answers} | {w for e in EXTRA_OPTIONS.values() for w in e})
    lines += [" ".join(words)] * 4
    lines += [word for word in words for _ in range(8)]  # an answer opens the assistant turn: one token, no space
    return lines * 2


def build_tokenizer():
    from models.tiny.qwen_tokenizer import build_qwen2_tokenizer

    return build_qwen2_tokenizer(task_lines())


def video_qa_config(tokenizer, *, text_hidden: int = 128, text_layers: int = 4, vision_hidden: int = 64):
    """Qwen2.5-VL at toy size for 224 px video: text width ``text_hidden`` (head dim 32, 2 query heads per KV
    head, MLP 4x, M-RoPE in the 7B's 16/24/24 proportions), ViT width ``vision_hidden`` (4 blocks, 1 and 3 full)."""
    from transformers import Qwen2_5_VLConfig

    from models.tiny.qwen2_5_vl import tiny_qwen2_5_vl_config, tiny_text_config_kwargs, tiny_vision_config_kwargs

    head_dim = 32
    heads = text_hidden // head_dim
    text = tiny_text_config_kwargs(tokenizer)
    text.update(hidden_size=text_hidden, intermediate_size=4 * text_hidden, num_hidden_layers=text_layers,
                max_window_layers=text_layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2))
    quarter = head_dim // 2 // 8  # the rotary half-dimension split 2/3/3 (7B: 16/24/24 of 64)
    text["rope_parameters"] = {**text["rope_parameters"], "mrope_section": [2 * quarter, 3 * quarter, 3 * quarter]}
    vision = tiny_vision_config_kwargs(text_hidden)
    vision.update(hidden_size=vision_hidden, intermediate_size=int(vision_hidden * 2.67), num_heads=vision_hidden // 16)
    base = tiny_qwen2_5_vl_config(tokenizer)
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=base.image_token_id, video_token_id=base.video_token_id,
        vision_start_token_id=base.vision_start_token_id, vision_end_token_id=base.vision_end_token_id,
        vision_token_id=base.vision_token_id, tie_word_embeddings=False,
    )  # fmt: skip


def build_processor(tokenizer):
    """The real ``Qwen2_5_VLProcessor`` with a video pixel cap that keeps 224x224 frames whole."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLVideoProcessor

    from models.tiny.qwen2_5_vl import (
        MERGE_SIZE,
        PATCH_SIZE,
        QWEN2_VL_CHAT_TEMPLATE,
        TEMPORAL_PATCH_SIZE,
        VIDEO_FPS,
        VIDEO_MIN_PIXELS,
        build_image_processor,
    )

    video_processor = Qwen2VLVideoProcessor(
        min_pixels=VIDEO_MIN_PIXELS, max_pixels=VIDEO_MAX_PIXELS, patch_size=PATCH_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE, merge_size=MERGE_SIZE, fps=VIDEO_FPS, cap_pixels_per_frame=True,
    )  # fmt: skip
    return Qwen2_5_VLProcessor(image_processor=build_image_processor(), tokenizer=tokenizer,
                               video_processor=video_processor, chat_template=QWEN2_VL_CHAT_TEMPLATE)


def build_untrained(seed: int, embed_std: float | None = None, qk_std: float | None = None, **sizes):
    """``(model, processor)``: the upstream class with seeded weights, and its processor.

    ``embed_std`` / ``qk_std`` redraw the text embeddings and the language model's q/k projections with
    that std (seeded), the recipe of the shapes-VQA LLaVA base: with the seeded init (std 0.02) the
    merger's tokens outgrew the question's embeddings during training."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from models.tiny import seeded_init_
    from models.tiny.qwen_tokenizer import ENDOFTEXT, IM_END

    tokenizer = build_tokenizer()
    model = Qwen2_5_VLForConditionalGeneration(video_qa_config(tokenizer, **sizes))
    seeded_init_(model, seed=seed, std=0.02)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        if embed_std is not None:
            weight = model.model.language_model.embed_tokens.weight
            weight.copy_(torch.randn(weight.shape, generator=generator) * embed_std)
        if qk_std is not None:
            for layer in model.model.language_model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                    proj.weight.copy_(torch.randn(proj.weight.shape, generator=generator) * qk_std)
    generation = model.generation_config
    generation.bos_token_id = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    generation.eos_token_id = [tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(ENDOFTEXT)]
    generation.pad_token_id = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    return model, build_processor(tokenizer)


# ============================================================================= batches


def video_metadata():
    from transformers.video_utils import VideoMetadata

    from data.video_qa import NUM_FRAMES

    return VideoMetadata(total_num_frames=NUM_FRAMES, fps=4.0)


def chat_prompt(processor, question: str) -> str:
    conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True)


@contextmanager
def padding_side(tokenizer, side: str):
    """Pad on ``side`` within the block, then give the shared processor's tokenizer its own setting back."""
    saved = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        yield
    finally:
        tokenizer.padding_side = saved


def encode_batch(processor, samples: Sequence, with_answers: bool, frames: Sequence | None = None) -> dict:
    """Processor inputs for ``samples`` (right padding); with answers: the answer and ``<|im_end|>`` appended and
    ``labels`` on exactly those tokens (-100 elsewhere)."""
    from models.tiny.qwen_tokenizer import IM_END

    prompts = [chat_prompt(processor, s.question) for s in samples]
    if with_answers:
        prompts = [p + s.answer + IM_END for p, s in zip(prompts, samples)]
    videos = list(frames) if frames is not None else [s.frames() for s in samples]
    tokenizer = processor.tokenizer
    with padding_side(tokenizer, "right" if with_answers else "left"):
        batch = dict(processor(videos=videos, video_metadata=[video_metadata()] * len(samples), text=prompts,
                               padding=True, return_tensors="pt"))
    if with_answers:
        labels = torch.full_like(batch["input_ids"], -100)
        for row, sample in enumerate(samples):
            answer_ids = tokenizer(sample.answer + IM_END, add_special_tokens=False).input_ids
            end = int(batch["attention_mask"][row].sum())
            labels[row, end - len(answer_ids) : end] = torch.tensor(answer_ids)
        batch["labels"] = labels
    return batch


def encode_conversations(processor, conversations: Sequence) -> dict:
    """Multi-turn training batch: the video in the first user turn, every answer (+ ``<|im_end|>``) labelled."""
    from models.tiny.qwen_tokenizer import IM_END

    tokenizer = processor.tokenizer
    texts, answer_spans = [], []
    for conv in conversations:
        messages = []
        for turn, (question, answer, _) in enumerate(conv.turns):
            content = ([{"type": "video"}] if turn == 0 else []) + [{"type": "text", "text": question}]
            messages.append({"role": "user", "content": content})
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        texts.append(processor.apply_chat_template(messages))
        answer_spans.append([tokenizer(answer + IM_END, add_special_tokens=False).input_ids for _, answer, _ in conv.turns])
    with padding_side(tokenizer, "right"):
        batch = dict(processor(videos=[c.frames() for c in conversations],
                               video_metadata=[video_metadata()] * len(conversations), text=texts, padding=True,
                               return_tensors="pt"))
    labels = torch.full_like(batch["input_ids"], -100)
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    for row, spans in enumerate(answer_spans):
        ids = batch["input_ids"][row].tolist()
        ends = [i for i, t in enumerate(ids) if t == im_end]  # system, then (user, assistant) per turn
        for turn, span in enumerate(spans):
            end = ends[2 + 2 * turn] + 1  # the assistant turn's <|im_end|>, inclusive
            assert ids[end - len(span):end] == span, "answer tokens not where the chat template put them"
            labels[row, end - len(span):end] = torch.tensor(span)
    batch["labels"] = labels
    return batch


def visual_targets(samples: Sequence) -> dict[str, torch.Tensor]:
    """Per visual token, ``[B * NUM_STEPS * GRID * GRID]`` in the merger's order (grid step, then row-major cells):
    ``colour`` / ``shape`` (1 + palette / shape index of the object in that cell, 0 for background), ``motion``
    (1 + direction index while the object travels during that step, else 0) and ``step`` (the grid step)."""
    from data.video_qa import DIRECTIONS, GRID, NUM_STEPS

    colour_index = {c: i + 1 for i, c in enumerate(PALETTE)}
    shape_index = {s: i + 1 for i, s in enumerate(SHAPES)}
    direction_index = {d: i + 1 for i, d in enumerate(DIRECTIONS)}
    colours, shapes, motions = [], [], []
    for sample in samples:
        for step in range(NUM_STEPS):
            cells = sample.scene.object_cells(step)
            for row in range(GRID):
                for col in range(GRID):
                    obj = cells.get((row, col))
                    colours.append(colour_index[obj.colour] if obj else 0)
                    shapes.append(shape_index[obj.shape] if obj else 0)
                    motions.append(direction_index[obj.direction] if obj and obj.moving_at(step) else 0)
    steps = torch.arange(NUM_STEPS).repeat_interleave(GRID * GRID).repeat(len(samples))
    return {"colour": torch.tensor(colours), "shape": torch.tensor(shapes), "motion": torch.tensor(motions),
            "step": steps}


def conversation_turns(conversation) -> list[tuple[str, list[int]]]:
    """Per turn of a :class:`~data.video_qa.VideoQAConversation` (or one :class:`~data.video_qa.VideoQASample`):
    ``(question, evidence)``, with the indices (into its 512 visual tokens, the merger's order) of the tokens
    that hold the answer (:func:`data.video_qa.evidence_cells`)."""
    from data.video_qa import GRID, evidence_cells

    turns = conversation.turns if hasattr(conversation, "turns") else [
        (conversation.question, conversation.answer, conversation.qtype)]
    return [(question, [step * GRID * GRID + row * GRID + col
                        for step, row, col in evidence_cells(conversation.scene, qtype, question, answer)])
            for question, answer, qtype in turns]


def asked_attributes(conversation) -> dict[str, torch.Tensor]:
    """Per turn of a conversation (or one sample), in :func:`conversation_turns`' order, the asked object's
    (:func:`data.video_qa.asked_object`) ``colour`` / ``shape`` (palette / shape index) and ``motion`` (0 for a
    static object, 1 + direction index for a mover); -100 (ignored by the loss) for count questions."""
    from data.video_qa import DIRECTIONS, asked_object

    turns = conversation.turns if hasattr(conversation, "turns") else [
        (conversation.question, conversation.answer, conversation.qtype)]
    colours, shapes, motions = [], [], []
    for question, answer, qtype in turns:
        obj = asked_object(conversation.scene, qtype, question, answer)
        colours.append(PALETTE_INDEX[obj.colour] if obj else -100)
        shapes.append(SHAPES.index(obj.shape) if obj else -100)
        motions.append((1 + list(DIRECTIONS).index(obj.direction) if obj.moves else 0) if obj else -100)
    return {"colour": torch.tensor(colours), "shape": torch.tensor(shapes), "motion": torch.tensor(motions)}


def key_words(question: str) -> list[str]:
    """The words of ``question`` that say which object it asks about (a colour, a shape, a direction) or, for
    "How many objects move?", ``many``."""
    from data.video_qa import DIRECTIONS

    keys = set(PALETTE) | set(SHAPES) | set(DIRECTIONS) | {"many"}
    return [word for word in question.rstrip("?").replace(",", "").split() if word in keys]


def supervision_targets(input_ids: torch.Tensor, labels: torch.Tensor, tokenizer, video_token_id: int,
                        turns: Sequence[Sequence[tuple[str, Sequence[int]]]]) -> dict[str, torch.Tensor]:
    """Where the attention supervision looks, one entry per answer in the batch.

    ``turns[b]``: per answer of row ``b``, ``(question, evidence)`` with ``evidence`` the indices of its
    evidence tokens among the row's visual tokens. Returns ``rows`` and ``queries`` (``[N]``: the row and the
    position that predicts the answer's first token), and ``[N, L]`` masks: ``evidence`` (those visual
    tokens) and ``question`` (the question's :func:`key_words` in that turn)."""
    rows, queries, evidence_masks, question_masks = [], [], [], []
    for row in range(input_ids.shape[0]):
        ids = input_ids[row]
        visual = (ids == video_token_id).nonzero().squeeze(1)
        labelled = labels[row] != -100
        starts = (labelled & ~torch.cat([labelled.new_zeros(1), labelled[:-1]])).nonzero().squeeze(1).tolist()
        turn_begin = int(visual[-1]) + 1 if len(visual) else 0
        for start, (question, evidence) in zip(starts, turns[row], strict=True):
            evidence_mask = torch.zeros(ids.shape[0])
            evidence_mask[visual[list(evidence)]] = 1.0
            question_mask = torch.zeros(ids.shape[0])
            for word in key_words(question):
                (token,) = tokenizer(" " + word, add_special_tokens=False).input_ids
                question_mask[turn_begin:start][ids[turn_begin:start] == token] = 1.0
            rows.append(row)
            queries.append(start - 1)
            evidence_masks.append(evidence_mask)
            question_masks.append(question_mask)
            turn_begin = start
    return {"rows": torch.tensor(rows), "queries": torch.tensor(queries), "evidence": torch.stack(evidence_masks),
            "question": torch.stack(question_masks)}


def attention_mass_loss(attentions: Sequence[torch.Tensor], rows: torch.Tensor, queries: torch.Tensor,
                        target: torch.Tensor, layers: Sequence[int]) -> torch.Tensor:
    """``-log`` of the attention mass head 0 of each of ``layers`` puts on ``target`` (``[N, L]``, 1 on the target
    positions) from ``queries`` (``[N]`` positions in rows ``rows``), averaged over queries and layers.

    ``attentions[l]``: ``[B, H, L, L]`` softmax probabilities."""
    losses = [-torch.log((attentions[layer][rows, 0, queries] * target).sum(-1).clamp_min(1e-6)) for layer in layers]
    return torch.stack(losses).mean()


# ============================================================================= answers and accuracy


def normalize(text: str) -> str:
    return " ".join(text.lower().replace(".", " ").replace(",", " ").split())


@torch.no_grad()
def generate_answers(model, processor, samples: Sequence, batch_size: int = 16, max_new_tokens: int = 4) -> list[str]:
    """Greedy answers (left padding, batched)."""
    answers = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        batch = encode_batch(processor, chunk, with_answers=False)
        out = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens)
        answers += processor.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return [a.strip() for a in answers]


def accuracy_report(samples: Sequence, predictions: Sequence[str]) -> dict:
    """Exact-match accuracy overall and per question type, each with its standard error and count."""
    from data.video_qa import QUESTION_TYPES

    def summary(hits: list[bool]) -> dict:
        n = len(hits)
        acc = sum(hits) / n if n else float("nan")
        return {"accuracy": acc, "accuracy_se": math.sqrt(acc * (1 - acc) / n) if n else float("nan"), "n": n}

    hits = [normalize(p) == normalize(s.answer) for s, p in zip(samples, predictions, strict=True)]
    report = {"all": summary(hits)}
    for qtype in QUESTION_TYPES:
        report[qtype] = summary([h for h, s in zip(hits, samples) if s.qtype == qtype])
    return report


def chance_report(samples: Sequence) -> dict:
    """Chance per type: guessing uniformly among the type's answers, and always answering the most frequent one."""
    from collections import Counter

    from data.video_qa import ANSWERS, QUESTION_TYPES

    out = {}
    for qtype in QUESTION_TYPES:
        answers = Counter(s.answer for s in samples if s.qtype == qtype)
        total = sum(answers.values())
        out[qtype] = {"uniform": 1 / len(ANSWERS[qtype]), "majority": max(answers.values()) / total if total else 0.0}
    return out


# ============================================================================= training


def evaluate(model, processor, split: str, size: int, seed: int, batch_size: int = 16) -> dict:
    """Greedy exact match on the first ``size`` samples of ``split``, per type with standard errors."""
    from data.video_qa import make_split

    samples = make_split(split, size, seed=seed)
    was_training = model.training
    model.eval()
    predictions = generate_answers(model, processor, samples, batch_size=batch_size)
    model.train(was_training)
    return {"split": split, "size": size, "accuracy": accuracy_report(samples, predictions),
            "chance": chance_report(samples),
            "examples": [{"question": s.question, "answer": s.answer, "prediction": p}
                         for s, p in list(zip(samples, predictions))[:6]]}


def train(output_dir: Path, *, steps: int, batch_size: int, turns: int, lr: float, warmup: int, weight_decay: float,
          aux_weight: float, motion_weight: float, attention_weight: float, readout_weight: float,
          value_weight: float, clip: float,
          embed_std: float, qk_std: float, seed: int, eval_size: int, eval_every: int, text_hidden: int,
          text_layers: int, vision_hidden: int, checkpoint: Path, resume: bool = False, init_from: Path | None = None,
          log=print) -> dict:
    """Train from scratch; validation accuracy every ``eval_every`` steps (and at the end) goes to the JSON log.

    ``checkpoint`` (model, probes, optimizer, scheduler, step, log, settings) is written atomically at
    every evaluation; ``resume`` continues from it (the data are a function of the step, so a resumed run
    sees exactly the samples the uninterrupted one would). The final model, processor and training record
    are written to ``output_dir`` (renamed into place when complete).
    """
    from tqdm.auto import tqdm

    from cli import atomic_path, write_json
    from data.video_qa import make_conversation, make_sample

    settings = dict(steps=steps, batch_size=batch_size, turns=turns, lr=lr, warmup=warmup, weight_decay=weight_decay,
                    aux_weight=aux_weight, motion_weight=motion_weight, attention_weight=attention_weight,
                    readout_weight=readout_weight, value_weight=value_weight, clip=clip, embed_std=embed_std, qk_std=qk_std, seed=seed,
                    eval_size=eval_size, eval_every=eval_every, text_hidden=text_hidden, text_layers=text_layers,
                    vision_hidden=vision_hidden)
    if init_from is not None:
        settings["init_from"] = str(init_from)
    torch.manual_seed(seed)
    model, processor = build_untrained(seed, embed_std=embed_std or None, qk_std=qk_std or None,
                                       text_hidden=text_hidden, text_layers=text_layers, vision_hidden=vision_hidden)
    from data.video_qa import DIRECTIONS, NUM_STEPS

    probes = torch.nn.ModuleDict({"colour": torch.nn.Linear(text_hidden, len(PALETTE) + 1),
                                  "shape": torch.nn.Linear(text_hidden, len(SHAPES) + 1),
                                  "motion": torch.nn.Linear(text_hidden, len(DIRECTIONS) + 1),
                                  "step": torch.nn.Linear(text_hidden, NUM_STEPS)})
    if init_from is not None:  # a warm start: the weights of a trained directory (same sizes)
        from transformers import Qwen2_5_VLForConditionalGeneration

        try:
            model.load_state_dict(Qwen2_5_VLForConditionalGeneration.from_pretrained(init_from).state_dict())
        except RuntimeError as error:  # another size: one line, not the size-mismatch listing
            raise ValueError(f"init_from {str(init_from)!r} has other sizes than this run's model "
                             f"(text {text_hidden} x {text_layers}, vision {vision_hidden}): "
                             f"{str(error).splitlines()[1].strip() if len(str(error).splitlines()) > 1 else error}"
                             ) from None
    # at the position that predicts an answer, head 0 of the first layer learns to look at the question's key words
    # and head 0 of the middle layers at the answer's evidence among the visual tokens
    evidence_layers = tuple(range(1, text_layers - 1)) if text_layers >= 3 else (text_layers - 1,)
    # what head 0 of those layers carries from the evidence: the asked object's colour, shape and motion
    head_dim = text_hidden // model.config.text_config.num_attention_heads
    for layer in evidence_layers if value_weight > 0 else ():
        probes.update({f"value{layer}_colour": torch.nn.Linear(head_dim, len(PALETTE)),
                       f"value{layer}_shape": torch.nn.Linear(head_dim, len(SHAPES)),
                       f"value{layer}_motion": torch.nn.Linear(head_dim, len(DIRECTIONS) + 1)})
    text_config = model.config.text_config
    video_token_id = model.config.video_token_id
    params = list(model.named_parameters()) + [(f"probe.{n}", p) for n, p in probes.named_parameters()]
    optimizer = torch.optim.AdamW(
        [{"params": [p for _, p in params if p.dim() >= 2], "weight_decay": weight_decay},
         {"params": [p for _, p in params if p.dim() < 2], "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps, warmup))
    record = {"settings": settings, "num_parameters": sum(p.numel() for p in model.parameters()), "evaluations": [],
              "loss_every_10_steps": [], "train_seconds": 0.0}
    start_step = 0
    if resume and Path(checkpoint).is_file():
        record, start_step = resume_checkpoint(checkpoint, modules={"model": model, "probes": probes},
                                               optimizer=optimizer, scheduler=scheduler, settings=settings, log=log)

    captured = {}
    hooks = [model.model.visual.register_forward_hook(
        lambda module, args, out: captured.__setitem__("tokens", out.pooler_output))]
    for layer in evidence_layers if value_weight > 0 else ():  # the heads' outputs, [B, L, heads * head_dim], before o_proj
        hooks.append(model.model.language_model.layers[layer].self_attn.o_proj.register_forward_pre_hook(
            lambda module, args, layer=layer: captured.__setitem__(f"heads{layer}", args[0])))
    model.train()
    text_config._attn_implementation = "eager"  # attention probabilities for the supervision loss
    window, aux_window, attention_window, readout_window, value_window = [], [], [], [], []
    begin = time.perf_counter() - record["train_seconds"]
    bar = tqdm(range(start_step, steps), desc="train step", unit="step", initial=start_step, total=steps,
               dynamic_ncols=True)
    try:
        for step in bar:
            if turns > 1:
                samples = [make_conversation(seed, "train", step * batch_size + i, turns) for i in range(batch_size)]
                batch = encode_conversations(processor, samples)
            else:
                samples = [make_sample(seed, "train", step * batch_size + i) for i in range(batch_size)]
                batch = encode_batch(processor, samples, with_answers=True)
            out = model(**batch, output_attentions=attention_weight > 0,
                        output_hidden_states=aux_weight > 0 or motion_weight > 0 or readout_weight > 0)
            loss = out.loss
            if aux_weight > 0 or motion_weight > 0:
                targets = visual_targets(samples)
                tokens = captured.pop("tokens")  # [B * 512, text_hidden] in grid-step, row-major order
                after_first_layer = out.hidden_states[1][batch["input_ids"] == video_token_id]  # same order
                probed = [("colour", tokens, aux_weight), ("shape", tokens, aux_weight),
                          ("step", after_first_layer, aux_weight)]
                if motion_weight > 0:
                    # its own weight, over the tokens that hold an object (still or travelling): over all tokens
                    # "not travelling" is right for 99% of them and the probe learns little else
                    targets["motion"] = targets["motion"].masked_fill(targets["colour"] == 0, -100)
                    probed.append(("motion", tokens, motion_weight))
                else:
                    probed.append(("motion", tokens, aux_weight))
                aux = 0.0
                for name, features, weight in probed:
                    # probes see unit-rms features, so the auxiliary loss cannot be lowered by inflating their norm
                    features = features * torch.rsqrt(features.pow(2).mean(-1, keepdim=True) + 1e-6)
                    aux = aux + weight * torch.nn.functional.cross_entropy(probes[name](features), targets[name])
                loss = loss + aux
                aux_window.append(aux.item())
            if attention_weight > 0 or readout_weight > 0 or value_weight > 0:
                where = supervision_targets(batch["input_ids"], batch["labels"], processor.tokenizer, video_token_id,
                                            [conversation_turns(sample) for sample in samples])
            if readout_weight > 0:
                # the answer read out of the second-to-last layer by the model's own final norm and lm_head
                hidden = out.hidden_states[-2][where["rows"], where["queries"]]  # [answers in the batch, D]
                logits = model.lm_head(model.model.language_model.norm(hidden))
                readout = torch.nn.functional.cross_entropy(logits, batch["input_ids"][where["rows"], where["queries"] + 1])
                loss = loss + readout_weight * readout
                readout_window.append(readout.item())
            if attention_weight > 0:
                attention = attention_mass_loss(out.attentions, where["rows"], where["queries"], where["question"],
                                                [0]) + attention_mass_loss(
                    out.attentions, where["rows"], where["queries"], where["evidence"], evidence_layers)
                loss = loss + attention_weight * attention
                attention_window.append(attention.item())
            if value_weight > 0:
                asked = [asked_attributes(sample) for sample in samples]
                asked = {key: torch.cat([a[key] for a in asked]) for key in ("colour", "shape", "motion")}
                value = 0.0
                for layer in evidence_layers:
                    head = captured.pop(f"heads{layer}")[where["rows"], where["queries"], :head_dim]  # [answers, head_dim]
                    head = head * torch.rsqrt(head.pow(2).mean(-1, keepdim=True) + 1e-6)
                    for key in ("colour", "shape", "motion"):
                        value = value + torch.nn.functional.cross_entropy(probes[f"value{layer}_{key}"](head), asked[key])
                value = value / len(evidence_layers)
                loss = loss + value_weight * value
                value_window.append(value.item())
            captured.clear()
            optimizer_step(loss, optimizer, scheduler, [p for _, p in params], clip)
            window.append(out.loss.item())
            if (step + 1) % 10 == 0:
                mean = lambda values: round(sum(values) / len(values), 4) if values else None  # noqa: E731
                record["loss_every_10_steps"].append({"step": step + 1, "answer_loss": mean(window),
                                                      "aux_loss": mean(aux_window),
                                                      "attention_loss": mean(attention_window),
                                                      "readout_loss": mean(readout_window),
                                                      "value_loss": mean(value_window)})
                bar.set_postfix(loss=mean(window), aux=mean(aux_window), attention=mean(attention_window),
                                readout=mean(readout_window), value=mean(value_window))
                window, aux_window, attention_window, readout_window, value_window = [], [], [], [], []
            if (step + 1) % eval_every == 0 or step + 1 == steps:
                record["train_seconds"] = round(time.perf_counter() - begin, 1)
                text_config._attn_implementation = "sdpa"
                result = evaluate(model, processor, "val", eval_size, seed)
                text_config._attn_implementation = "eager"
                result.update(step=step + 1, train_seconds=record["train_seconds"])
                record["evaluations"].append(result)
                acc = result["accuracy"]
                log(f"step {step + 1}: validation accuracy {acc['all']['accuracy']:.3f} "
                    + " ".join(f"{t} {v['accuracy']:.2f}" for t, v in acc.items() if t != "all"))
                save_checkpoint(checkpoint, modules={"model": model, "probes": probes}, optimizer=optimizer,
                                scheduler=scheduler, step=step + 1, record=record, settings=settings)
    finally:
        for hook in hooks:
            hook.remove()
        text_config._attn_implementation = "sdpa"
    record["train_seconds"] = round(time.perf_counter() - begin, 1)
    record["validation_accuracy"] = record["evaluations"][-1]["accuracy"]["all"]["accuracy"]
    with atomic_path(Path(output_dir)) as tmp:
        tmp.mkdir()
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        write_json(tmp / METRICS_FILE, record)
    return record


__all__ = [
    "DEFAULTS",
    "SHIPPED_DIR",
    "accuracy_report",
    "build_processor",
    "build_tokenizer",
    "build_untrained",
    "chance_report",
    "encode_batch",
    "evaluate",
    "generate_answers",
    "train",
    "video_qa_config",
    "visual_targets",
]
