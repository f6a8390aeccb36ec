"""The generated shapes-VQA task (data/vqa_shapes.py) and the training-free baselines' budgets/selectors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoProcessor

from evaluation.flops import LlavaShape, llm_layer_flops, prefill_flops
from models.tiny.llava import tiny_llava_dir
from pruning.llava.baselines import DivPruneSelector, baseline_schedule, learned_schedule, topk_keep
from data.vqa_shapes import (
    ANSWERS,
    PALETTE,
    QUESTION_TYPES,
    accuracy_by_type,
    chance_levels,
    encode_batch,
    exact_match,
    make_sample,
    make_split,
    normalize_answer,
    sentence_bleu,
)


@pytest.fixture(scope="module")
def processor():
    return AutoProcessor.from_pretrained(tiny_llava_dir())


def test_samples_are_deterministic_and_splits_differ() -> None:
    a, b = make_split("train", 20, seed=3), make_split("train", 20, seed=3)
    assert [(s.shapes, s.question, s.answer) for s in a] == [(s.shapes, s.question, s.answer) for s in b]
    assert np.array_equal(np.asarray(a[0].image), np.asarray(b[0].image))
    held = make_split("heldout", 20, seed=3)
    assert {s.shapes for s in a}.isdisjoint({s.shapes for s in held})
    val = make_split("val", 20, seed=3)  # the split train_llava_pruner.py selects checkpoints on
    assert {s.shapes for s in val}.isdisjoint({s.shapes for s in held} | {s.shapes for s in a})
    assert make_split("train", 5, seed=3) == a[:5]  # prefixes agree
    assert make_split("train", 5, seed=4) != a[:5]


def test_answers_are_consistent_with_the_scene() -> None:
    for s in make_split("train", 300):
        assert s.answer in ANSWERS[s.qtype]
        kinds = [x.kind for x in s.shapes]
        if s.qtype == "colour":
            kind = s.question.split()[-1].rstrip("?")
            assert kinds.count(kind) == 1 and s.answer == next(x.colour for x in s.shapes if x.kind == kind)
        elif s.qtype == "shape":
            colour = s.question.split()[-1].rstrip("?")
            assert [x.colour for x in s.shapes].count(colour) == 1
            assert s.answer == next(x.kind for x in s.shapes if x.colour == colour)
        elif s.qtype == "count":
            kind = s.question.split()[2][:-1]
            assert s.answer == ("zero", "one", "two", "three", "four")[kinds.count(kind)]
        else:
            words = s.question.rstrip("?").split()
            a = next(x for x in s.shapes if (x.colour, x.kind) == (words[2], words[3]))
            b = next(x for x in s.shapes if (x.colour, x.kind) == (words[-2], words[-1]))
            yes = b.cx > a.cx if "left" in words else b.cy > a.cy
            assert s.answer == ("yes" if yes else "no")


def test_image_has_the_shape_colours_on_the_background() -> None:
    s = make_sample(0, "train", 0)
    pixels = np.asarray(s.image).reshape(-1, 3)
    assert s.image.size == (112, 112)
    colours = {tuple(p) for p in pixels}
    for shape in s.shapes:
        assert PALETTE[shape.colour] in colours


def test_heldout_question_types_are_balanced_and_yes_no_roughly_balanced() -> None:
    held = make_split("heldout", 400)
    assert [sum(s.qtype == q for s in held) for q in QUESTION_TYPES] == [100] * 4
    yes = sum(s.answer == "yes" for s in held if s.qtype == "position")
    assert 35 <= yes <= 65
    chance = chance_levels(held)
    assert chance["colour"]["uniform"] == 1 / 8 and chance["position"]["uniform"] == 0.5
    assert all(c["majority"] >= c["uniform"] - 1e-9 for c in chance.values())


def test_every_answer_is_one_token(processor) -> None:
    for answers in ANSWERS.values():
        for answer in answers:
            assert len(processor.tokenizer(answer, add_special_tokens=False).input_ids) == 1, answer


def test_fast_encoding_equals_the_processor(processor) -> None:
    samples = make_split("train", 6)
    fast, slow = encode_batch(processor, samples, True, fast=True), encode_batch(processor, samples, True, fast=False)
    for key in ("input_ids", "attention_mask", "labels", "question_mask"):
        assert torch.equal(fast[key], slow[key]), key
    assert torch.allclose(fast["pixel_values"], slow["pixel_values"], atol=1e-5)


def test_batch_labels_cover_the_answer_and_eos_and_question_mask_the_question(processor) -> None:
    samples = make_split("train", 4)
    batch = encode_batch(processor, samples, with_answers=True)
    tok = processor.tokenizer
    for row, s in enumerate(samples):
        labelled = batch["labels"][row][batch["labels"][row] != -100].tolist()
        assert labelled == tok(s.answer, add_special_tokens=False).input_ids + [tok.eos_token_id]
        question = tok.decode(batch["input_ids"][row][batch["question_mask"][row]])
        assert question.strip() == f"{s.question} ASSISTANT:"
    assert (batch["input_ids"][:, -1] == tok.eos_token_id).all()  # left padded
    prompt = encode_batch(processor, samples, with_answers=False)
    assert "labels" not in prompt and prompt["input_ids"].shape[1] < batch["input_ids"].shape[1]


def test_scoring() -> None:
    assert normalize_answer(" Red.") == "red" and exact_match("Yes, it is", "yes") and not exact_match("no", "yes")
    assert sentence_bleu("red", "red") == 1.0 and sentence_bleu("blue", "red") == 0.0
    assert 0.0 < sentence_bleu("red red", "red") < 1.0
    # p1 = 2/3, p2 = (1 + 1) / (2 + 1), p3 = (0 + 1) / (1 + 1); equal lengths: no brevity penalty
    assert sentence_bleu("the red one", "the red circle") == pytest.approx((2 / 3 * 2 / 3 * 1 / 2) ** (1 / 3))
    samples = make_split("heldout", 8)
    acc = accuracy_by_type(samples, [s.answer for s in samples])
    assert acc["all"] == 1.0 and set(acc) == set(QUESTION_TYPES) | {"all"}


# ----------------------------------------------------------------------------- baselines


def test_budget_schedules_meet_the_budget() -> None:
    for budget in (0.25, 0.35, 0.5):
        for method in ("random", "divprune", "fastv"):
            sched = baseline_schedule(method, budget, 8, 64)
            assert abs(sched.achieved - budget) < 0.02, (method, budget, sched)
        learned = learned_schedule(budget, 8, 64, 32, [2, 4, 7], [0.7, 0.75, 0.67])
        assert abs(learned.achieved - budget) < 0.02 and learned.keep_ratios == (0.7, 0.75, 0.67)
    trained = learned_schedule(None, 8, 64, 32, [2, 4, 7], [0.7, 0.75, 0.67])
    assert trained.layer_tokens == (32, 32, 22, 22, 17, 17, 17, 11) and trained.merged == 32
    assert baseline_schedule("fastv", 0.5, 8, 64).selector_layer == 2
    assert baseline_schedule("fastv", 0.25, 8, 64).selector_layer == 1  # too small a budget for K=2


def test_the_learned_schedule_scales_the_merger_and_keeps_the_trained_ratios() -> None:
    """256 tokens, 8 layers, pruners at 2 / 4 / 7: the merger's count follows the budget with the ratios as trained;
    above what 256 merged tokens cost with them, every token stays merged-in and the ratios relax instead."""
    ratios = [0.7, 0.75, 0.67]
    for budget in (0.1, 0.25, 0.35):
        sched = learned_schedule(budget, 8, 256, 128, [2, 4, 7], ratios)
        assert sched.keep_ratios == tuple(ratios) and abs(sched.achieved - budget) < 0.01, sched
        for other in (sched.merged - 1, sched.merged + 1):  # the closest count
            tokens = learned_schedule(None, 8, 256, other, [2, 4, 7], ratios).layer_tokens
            assert abs(sum(tokens) / 2048 - budget) >= abs(sched.achieved - budget)
    assert learned_schedule(0.25, 8, 256, 128, [2, 4, 7], ratios).merged == 96
    high = learned_schedule(0.8, 8, 256, 128, [2, 4, 7], ratios)
    assert high.merged == 256 and all(r > k for r, k in zip(high.keep_ratios, ratios))
    assert abs(high.achieved - 0.8) < 0.01


def test_topk_keep_and_divprune_respect_alive_and_count() -> None:
    alive = torch.tensor([[1.0, 1, 0, 1, 1, 0]])
    keep = topk_keep(torch.tensor([[5.0, 1, 9, 3, 2, 8]]), alive, 2)
    assert keep.tolist() == [[1.0, 0, 0, 1, 0, 0]]
    # two tight clusters + one outlier: DivPrune picks across clusters, never a dead token
    feats = torch.tensor([[[1.0, 0], [0.99, 0.1], [0, 1], [0.1, 0.99], [-1, 0], [-0.99, 0.1]]])
    alive = torch.tensor([[1.0, 1, 1, 1, 1, 0]])
    keep = DivPruneSelector.select_diverse(feats, alive, 3)
    assert keep.sum() == 3 and keep[0, 5] == 0
    picked = keep[0].nonzero().flatten().tolist()
    assert {p // 2 for p in picked} == {0, 1, 2}


def test_real_shape_flops() -> None:
    shape = LlavaShape()
    base = prefill_flops(shape, [576] * 32)
    assert 8.0e12 < base["total"] < 9.5e12  # ~2 x 6.5e9 weights x 636 tokens + attention
    assert llm_layer_flops(shape, 100) < llm_layer_flops(shape, 200)
    half = prefill_flops(shape, [288] * 32, merged=288)
    assert 0.5 < half["total"] / base["total"] < 0.6
