"""The video-QA base's training signals: per-token targets agree with the pixels, and the attention supervision
loss is the evidence mass of head 0 at the answer-predicting positions."""

from __future__ import annotations

import numpy as np
import torch

from data.media import PALETTE
from data.video_qa import CELL, DIRECTIONS, FRAMES_PER_STEP, GRID, NUM_STEPS, make_conversation, make_split
from models.tiny.video_qa import (
    attention_mass_loss,
    conversation_turns,
    key_words,
    supervision_targets,
    visual_targets,
)


def test_motion_targets_mark_exactly_the_cells_whose_two_frames_differ_with_the_direction_of_travel():
    samples = make_split("train", 30, seed=0)
    targets = visual_targets(samples)
    motion = targets["motion"].view(len(samples), NUM_STEPS, GRID, GRID)
    assert torch.equal(targets["step"].view(len(samples), NUM_STEPS, GRID, GRID)[3, 5], torch.full((GRID, GRID), 5))
    directions = list(DIRECTIONS)
    for b, sample in enumerate(samples):
        frames = sample.frames().astype(np.int16)
        for step in range(NUM_STEPS):
            first, second = frames[FRAMES_PER_STEP * step], frames[FRAMES_PER_STEP * step + 1]
            for row in range(GRID):
                for col in range(GRID):
                    block = np.s_[row * CELL:(row + 1) * CELL, col * CELL:(col + 1) * CELL]
                    changed = bool((first[block] != second[block]).any())
                    assert changed == bool(motion[b, step, row, col]), (sample.video_id, step, row, col)
                    if changed:  # the colour's centre of mass moves the way the target says
                        colour = PALETTE[sample.scene.object_cells(step)[(row, col)].colour]
                        mask_a, mask_b = ((f[block] == colour).all(-1) for f in (first, second))
                        shift = np.array(np.nonzero(mask_b)).mean(1) - np.array(np.nonzero(mask_a)).mean(1)
                        d_row, d_col = DIRECTIONS[directions[int(motion[b, step, row, col]) - 1]]
                        assert np.sign(np.round(shift)).tolist() == [d_row, d_col]


def test_attention_mass_loss_is_minus_log_of_head_zeros_mass_on_the_target():
    torch.manual_seed(0)
    attentions = [torch.softmax(torch.randn(2, 3, 12, 12), -1) for _ in range(3)]
    rows, queries = torch.tensor([0, 0, 1]), torch.tensor([5, 9, 11])
    target = torch.zeros(3, 12)
    target[0, [1, 2]], target[1, 7], target[2, [0, 3, 4]] = 1, 1, 1
    loss = attention_mass_loss(attentions, rows, queries, target, layers=(1, 2))
    expected = [-torch.log(sum(attentions[layer][row, 0, query, p] for p in positions))
                for layer in (1, 2) for row, query, positions in ((0, 5, [1, 2]), (0, 9, [7]), (1, 11, [0, 3, 4]))]
    assert torch.allclose(loss, torch.stack(expected).mean())


def test_supervision_targets_find_each_answers_query_evidence_tokens_and_its_own_questions_key_words():
    from models.tiny.video_qa import build_processor, build_tokenizer, encode_conversations

    processor = build_processor(build_tokenizer())
    tokenizer = processor.tokenizer
    conversations = [make_conversation(0, "train", i, turns=3) for i in range(2)]
    batch = encode_conversations(processor, conversations)
    video = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    turns = [conversation_turns(c) for c in conversations]
    where = supervision_targets(batch["input_ids"], batch["labels"], tokenizer, video, turns)
    n = 0
    for row, conversation in enumerate(conversations):
        ids = batch["input_ids"][row]
        visual = (ids == video).nonzero().squeeze(1)
        for (question, answer, _), (_, evidence) in zip(conversation.turns, turns[row]):
            assert where["rows"][n] == row
            query = int(where["queries"][n])
            assert tokenizer.decode(ids[query + 1]) == answer  # the next token is the answer (one token)
            assert torch.equal(where["evidence"][n].nonzero().squeeze(1), visual[sorted(set(evidence))])
            words = [tokenizer.decode(ids[p]).strip() for p in where["question"][n].nonzero().squeeze(1)]
            assert words and sorted(words) == sorted(key_words(question)) and set(words) <= set(question.rstrip("?").replace(",", "").split())
            assert all(int(p) < query for p in where["question"][n].nonzero())
            n += 1
    assert n == len(where["rows"])


def test_evidence_indices_are_the_evidence_cells_in_the_mergers_token_order():
    from data.video_qa import evidence_cells

    conversation = make_conversation(0, "train", 3, turns=4)
    colour = visual_targets([conversation])["colour"]
    for (question, answer, qtype), (asked, indices) in zip(conversation.turns, conversation_turns(conversation)):
        cells = evidence_cells(conversation.scene, qtype, question, answer)
        assert asked == question and indices == [s * GRID * GRID + r * GRID + c for s, r, c in cells]
        assert all(colour[i] > 0 for i in indices)  # every evidence token holds an object


def test_asked_attributes_name_the_object_each_question_is_about_read_from_its_own_words():
    """The value supervision's targets: for each turn the asked object's colour, shape and motion, found independently
    here from the question's words and the answer (count questions, about several objects, are ignored)."""
    from data.media import SHAPES
    from models.tiny.video_qa import asked_attributes

    for index in range(40):
        conversation = make_conversation(0, "train", index, 4)
        targets = asked_attributes(conversation)
        assert all(len(v) == len(conversation.turns) for v in targets.values())
        for turn, (question, answer, qtype) in enumerate(conversation.turns):
            if qtype == "count":
                assert [int(targets[k][turn]) for k in ("colour", "shape", "motion")] == [-100] * 3
                continue
            words = question.rstrip("?").replace(",", "").split()
            if qtype in ("colour", "order", "static"):
                (obj,) = [o for o in conversation.scene.objects if o.colour == answer]
            else:  # shape, direction: the colour the question names
                (obj,) = [o for o in conversation.scene.objects if o.colour in words]
            if qtype == "static":
                assert obj.shape in words and not obj.moves
            if qtype == "direction":
                assert obj.shape in words and obj.direction == answer
            if qtype == "shape":
                assert obj.shape == answer
            assert list(PALETTE)[int(targets["colour"][turn])] == obj.colour
            assert SHAPES[int(targets["shape"][turn])] == obj.shape
            motion = int(targets["motion"][turn])
            assert (motion == 0) == (not obj.moves)
            if obj.moves:
                assert list(DIRECTIONS)[motion - 1] == obj.direction


def test_encoding_pads_as_it_needs_and_leaves_the_shared_tokenizer_as_it_found_it():
    from data.video_qa import make_conversation, make_split
    from models.tiny.video_qa import build_processor, build_tokenizer, encode_batch, encode_conversations

    processor = build_processor(build_tokenizer())
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    samples = make_split("val", 2)
    conversations = [make_conversation(0, "train", i) for i in range(2)]
    answered = encode_batch(processor, samples, with_answers=True)  # right-padded: labels sit before the padding
    assert (answered["attention_mask"] == 0).any()  # the two questions differ in length: there is padding
    assert (answered["attention_mask"][:, 0] == 1).all() and tokenizer.padding_side == "left"
    prompts = encode_batch(processor, samples, with_answers=False)  # left-padded for generation
    assert (prompts["attention_mask"][:, -1] == 1).all() and tokenizer.padding_side == "left"
    tokenizer.padding_side = "right"
    encode_conversations(processor, conversations)
    encode_batch(processor, samples, with_answers=False)
    assert tokenizer.padding_side == "right"
