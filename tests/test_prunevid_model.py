"""PruneVid inside the Qwen2.5-VL fork: stages 1-3 with ``with prunevid(model, config):``.

All on the embedded tiny Qwen2.5-VL (6 layers, pruning after layer K = 2, given explicitly) and the demo video (8 frames
of 112x112 px: 4 grid steps x 16 tokens = 64 video tokens, a static textured background with two
objects moving one token cell per grid step). Every check is against something computed without the
fork's pruning code: upstream transformers, eager attention probabilities, or the decoder layers run
by the test itself on the kept tokens.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from transformers import AutoProcessor, DynamicCache, LogitsProcessorList
from transformers import Qwen2_5_VLForConditionalGeneration as UpstreamQwen
from transformers.video_utils import VideoMetadata

import pruning.video.runtime as prunevid_runtime
from models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLForConditionalGeneration as ForkQwen
from data.demo_video import make_demo_frames, object_cells, static_cells
from models.tiny.qwen2_5_vl import tiny_qwen2_5_vl_dir
from pruning.video.prunevid import PruneVidConfig, preset, select_keep_indices
from pruning.video.runtime import PruneVidState, attach_prunevid, detach_prunevid, get_prunevid, prunevid

K = 2  # pruning layer of the 6-layer model, explicit (the presets' 10 of 28 scales to 1: scale_layer_index)
NUM_FRAMES = 8
TOKENS_PER_STEP = 16  # 112x112 px -> 4x4 merged tokens
QUESTION = "What is moving in the video?"
GREEDY = dict(do_sample=False, max_new_tokens=6, return_dict_in_generate=True, output_logits=True)


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """The tiny model's matrices are too small to gain from intra-op threads; on a busy 2-core machine the
    OpenMP threads of two processes make every op ~100x slower. One thread here, restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir():
    return tiny_qwen2_5_vl_dir()


@pytest.fixture(scope="module")
def processor(model_dir):
    return AutoProcessor.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def fork(model_dir):
    return ForkQwen.from_pretrained(model_dir).eval()


@pytest.fixture(scope="module")
def fork_eager(model_dir):
    return ForkQwen.from_pretrained(model_dir, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def inputs(processor):
    conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    metadata = VideoMetadata(total_num_frames=NUM_FRAMES, fps=4.0)
    return dict(processor(videos=[make_demo_frames(NUM_FRAMES)], video_metadata=[metadata], text=prompt, return_tensors="pt"))


@contextlib.contextmanager
def attached(model, config: PruneVidConfig, **attach_kwargs):
    """``(cache, state_of)``: PruneVid attached for the block, a fresh cache, and ``state_of()`` -> its PruneVidState."""
    cache = DynamicCache(config=model.config)
    with prunevid(model, config, **attach_kwargs) as runtime:
        yield cache, lambda: runtime.state_for(cache) if runtime.active else None


def generate_with(model, config: PruneVidConfig, **kwargs):
    """``(generate output, PruneVidState)`` of one generation with PruneVid attached."""
    with attached(model, config) as (cache, state_of):
        out = model.generate(**kwargs, past_key_values=cache)
        return out, state_of()


def forward_with(model, config: PruneVidConfig, **kwargs):
    """``(forward output, PruneVidState)`` of one prefill forward with PruneVid attached."""
    with attached(model, config) as (cache, state_of):
        out = model(**kwargs, past_key_values=cache, use_cache=True)
        return out, state_of()


def stage2(**overrides) -> PruneVidConfig:
    return preset("stage2_only", pruning_layer=K, **overrides)


def video_positions(model, inputs) -> torch.Tensor:
    return (inputs["input_ids"][0] == model.config.video_token_id).nonzero().flatten()


@torch.no_grad()
def reference_full_sequence(model, inputs):
    """Input embeddings, M-RoPE position ids and rope_deltas of the full prompt, built by the test from upstream pieces."""
    base = model.model
    embeds = base.get_input_embeddings()(inputs["input_ids"])
    video = torch.cat(base.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"]).pooler_output)
    mask = (inputs["input_ids"] == model.config.video_token_id)[..., None]
    embeds = embeds.masked_scatter(mask, video)
    position_ids, rope_deltas = base.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], video_grid_thw=inputs["video_grid_thw"],
        second_per_grid_ts=inputs["second_per_grid_ts"], attention_mask=inputs["attention_mask"],
    )  # fmt: skip
    return embeds, position_ids, rope_deltas


@torch.no_grad()
def eager_importance(fork_eager, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """``(importance [V], question positions)`` from layer K's eager attention probabilities (output_attentions)."""
    out = fork_eager(**inputs, output_attentions=True)
    probs = out.attentions[K][0]  # [H, L, L]
    visual = video_positions(fork_eager, inputs)
    questions = torch.arange(int(visual[-1]) + 1, inputs["input_ids"].shape[1])
    return probs[:, questions][:, :, visual].amax(dim=1).amax(dim=0), questions


class StepRecorder:
    """Logits processor recording the KV length of every layer at every decoding step (read-only)."""

    def __init__(self, cache):
        self.cache, self.lengths = cache, []

    def __call__(self, input_ids, scores):
        self.lengths.append([self.cache.get_seq_length(i) for i in range(len(self.cache.layers))])
        return scores


# ============================================================================= disabled / no-op == baseline


@torch.no_grad()
def test_every_stage_disabled_is_bit_identical_to_upstream_generate(model_dir, fork, inputs):
    upstream = UpstreamQwen.from_pretrained(model_dir).eval()
    expected = upstream.generate(**inputs, **GREEDY)
    runs = {
        "fork, no cache argument (upstream arguments only)": fork.generate(**inputs, **GREEDY),
        "fork, plain DynamicCache": fork.generate(**inputs, past_key_values=DynamicCache(config=fork.config), **GREEDY),
        "fork, PruneVid attached with every stage off (baseline)": generate_with(
            fork, preset("baseline"), **inputs, **GREEDY
        )[0],
    }
    assert len(set(expected.sequences[0, -GREEDY["max_new_tokens"] :].tolist())) > 1
    for name, actual in runs.items():
        assert torch.equal(actual.sequences, expected.sequences), name
        assert all(torch.equal(a, b) for a, b in zip(actual.logits, expected.logits, strict=True)), name


@torch.no_grad()
@pytest.mark.parametrize("compress", [True, False], ids=["stage3_on", "stage3_off"])
def test_stage2_with_keep_ratio_one_generates_the_baseline_tokens(fork, inputs, compress):
    expected = fork.generate(**inputs, **GREEDY)
    actual, state = generate_with(fork, stage2(keep_ratio=1.0, enable_cache_compression=compress), **inputs, **GREEDY)
    assert state.stats["tokens_after"] == state.stats["tokens_before"] == 64
    assert torch.equal(actual.sequences, expected.sequences)


# ============================================================================= stage 2: scores and reference


@torch.no_grad()
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_importance_without_output_attentions_equals_eager_attention_max_max(fork, fork_eager, inputs, impl):
    reference, _ = eager_importance(fork_eager, inputs)
    model = fork if impl == "sdpa" else fork_eager
    assert model.config.text_config._attn_implementation == impl
    _, state = forward_with(model, stage2(), **inputs)  # plain prefill: output_attentions is never asked for
    importance = state.importance
    assert importance.shape == reference.shape == (64,)
    torch.testing.assert_close(importance, reference, rtol=1e-5, atol=1e-7)


@torch.no_grad()
@pytest.mark.parametrize("selection", ["global", "segment", "segment_ceil"])
def test_stage2_prefill_equals_layers_run_by_the_test_on_exactly_the_kept_tokens(fork, fork_eager, inputs, selection):
    keep_ratio = 0.4
    pruned, state = forward_with(fork, stage2(keep_ratio=keep_ratio, selection=selection), **inputs)

    # Which tokens to keep, from eager attention probabilities and the test's own groups (one per grid step).
    importance, _ = eager_importance(fork_eager, inputs)
    groups = torch.arange(64) // TOKENS_PER_STEP
    kept_visual = select_keep_indices(importance, keep_ratio, groups, selection)
    visual = video_positions(fork, inputs)
    length = inputs["input_ids"].shape[1]
    keep = torch.ones(length, dtype=torch.bool)
    keep[visual] = False
    keep[visual[kept_visual]] = True
    kept = keep.nonzero().flatten()
    assert torch.equal(state.stage2_kept, kept)
    expected_count = {  # 64 tokens; stage 1 off: groups are the 4 grid steps of 16 tokens
        "global": max(1, math.floor(64 * keep_ratio + 0.5)),
        "segment": 4 * int(16 * keep_ratio),  # as published: truncation per group
        "segment_ceil": 4 * math.ceil(16 * keep_ratio),
    }[selection]
    assert kept_visual.numel() == expected_count

    # Independent reference: the decoder layers run by the test; after layer K only the kept rows, each with
    # its ORIGINAL position (its own cos/sin row); causal attention among them (SDPA is_causal).
    lm = fork.model.language_model
    hidden, position_ids, _ = reference_full_sequence(fork, inputs)
    cos, sin = lm.rotary_emb(hidden, position_ids)
    for index, layer in enumerate(lm.layers):
        if index == K + 1:
            hidden, cos, sin = hidden[:, kept], cos[:, kept], sin[:, kept]
        hidden = layer(hidden, attention_mask=None, position_embeddings=(cos, sin))
    hidden = lm.norm(hidden)
    logits = fork.lm_head(hidden[:, -1:])
    assert pruned.logits.shape[1] == kept.numel() < length  # the sequence really got shorter
    torch.testing.assert_close(pruned.logits[:, -1:], logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fork.model.language_model.norm.weight, lm.norm.weight)  # (same modules, no copy)


@torch.no_grad()
def test_question_queries_are_the_tokens_after_the_last_visual_token_never_the_system_prompt(
    fork, processor, inputs, monkeypatch
):
    seen = {}
    original = prunevid_runtime.visual_token_importance

    def spy(query_states, key_states, visual_positions, scaling, attention_mask=None, query_positions=None, **kw):
        seen.update(queries=query_states.shape[2], positions=query_positions.clone(), keys=key_states.shape[2])
        return original(query_states, key_states, visual_positions, scaling, attention_mask, query_positions, **kw)

    monkeypatch.setattr(prunevid_runtime, "visual_token_importance", spy)
    _, state = forward_with(fork, stage2(), **inputs)
    ids = inputs["input_ids"][0]
    tokens = processor.tokenizer.convert_ids_to_tokens(ids.tolist())
    user_turn = max(i for i, t in enumerate(tokens) if t == "<|im_start|>" and i < int(video_positions(fork, inputs)[0]))
    system_rows = set(range(user_turn))  # "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    last_visual = int(video_positions(fork, inputs)[-1])
    expected = list(range(last_visual + 1, ids.numel()))
    assert seen["positions"].tolist() == expected == state.question_positions_original.tolist()
    assert seen["queries"] == len(expected) and seen["keys"] == ids.numel()
    assert not system_rows & set(expected) and len(system_rows) > 5
    assert tokens[expected[0]] == "<|vision_end|>" and "assistant" in "".join(tokens[expected[-3] :])


# ============================================================================= stage 3: cache lengths


@torch.no_grad()
@pytest.mark.parametrize("compress", [True, False], ids=["stage3_on", "stage3_off"])
def test_kv_cache_length_per_layer_after_prefill_and_after_each_decode_step(fork, inputs, compress):
    config = preset("default", pruning_layer=K, enable_cache_compression=compress, selection="global")
    with attached(fork, config) as (cache, state_of):
        recorder = StepRecorder(cache)
        out = fork.generate(**inputs, past_key_values=cache, logits_processor=LogitsProcessorList([recorder]), **GREEDY)
        stats = state_of().stats
    length = inputs["input_ids"].shape[1]
    merged = stats["tokens_after_stage1"]
    assert 0 < merged < 64
    l1 = length - 64 + merged  # stage 1: the video tokens became `merged` tokens
    kept = max(1, math.floor(merged * config.keep_ratio + 0.5))
    l2 = l1 - merged + kept  # stage 2: top-k of the visual tokens after layer K
    assert stats["tokens_after"] == kept
    num_steps = out.sequences.shape[1] - length
    assert len(recorder.lengths) == num_steps
    for step, lengths in enumerate(recorder.lengths):  # step 0: right after prefill
        expected = [(l2 if compress or layer > K else l1) + step for layer in range(6)]
        assert lengths == expected, f"step {step}"
    assert stats["kv_cache_length_per_layer"] == recorder.lengths[0]


@torch.no_grad()
@pytest.mark.parametrize("compress", [True, False], ids=["stage3_on", "stage3_off"])
def test_left_padded_prompt_decodes_like_the_unpadded_one_eager_and_sdpa(fork, fork_eager, processor, inputs, compress):
    """The 2-D mask (original length + new tokens) is translated to each layer's shorter cache layout.

    Two left pad tokens make generate() keep a real mask; eager materialises the 4-D mask, which the
    layers after K must see re-sliced to their shorter cache when stage 3 is off.
    """
    pad = processor.tokenizer.pad_token_id
    padded = dict(inputs)
    padded["input_ids"] = torch.cat([torch.full((1, 2), pad), inputs["input_ids"]], 1)
    padded["attention_mask"] = torch.cat([torch.zeros(1, 2, dtype=torch.long), inputs["attention_mask"]], 1)
    padded["mm_token_type_ids"] = torch.cat([torch.zeros_like(inputs["mm_token_type_ids"][:, :2]), inputs["mm_token_type_ids"]], 1)
    config = preset("default", pruning_layer=K, enable_cache_compression=compress)
    for model in (fork, fork_eager):
        plain, _ = generate_with(model, config, **inputs, **GREEDY)
        with_pad, _ = generate_with(model, config, **padded, **GREEDY)
        assert torch.equal(plain.sequences[:, -6:], with_pad.sequences[:, -6:])
        for a, b in zip(plain.logits, with_pad.logits, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    sdpa, _ = generate_with(fork, config, **inputs, **GREEDY)
    eager, _ = generate_with(fork_eager, config, **inputs, **GREEDY)
    assert torch.equal(sdpa.sequences, eager.sequences)


# ============================================================================= stage 1 and positions


@torch.no_grad()
def test_stage1_keeps_the_moving_objects_per_grid_step_and_merges_the_static_background(fork, inputs):
    seen = {}
    hook = fork.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(kwargs), with_kwargs=True
    )
    try:
        _, state = forward_with(fork, preset("stage1_only"), **inputs)
    finally:
        hook.remove()
    merge = state.merges[0]
    assert merge.tokens_before_stage1 == 64 and merge.tokens_after_stage1 < 64
    assert merge.segments == [(0, 4)]  # 4 grid steps (pairs of frames), round(4 * 0.25) = 1 segment
    columns = 4
    for step in range(4):  # one grid step = frames 2*step, 2*step + 1
        for row, col in object_cells(NUM_FRAMES)[2 * step]:
            member = int(merge.cluster_members[step * TOKENS_PER_STEP + row * columns + col])
            assert not merge.is_static[member], f"object cell {(row, col)} at grid step {step} was averaged over time"
            assert int(merge.frame_of_token[member]) == step  # kept in its own grid step's clusters
    for row, col in static_cells(NUM_FRAMES):
        members = {int(merge.cluster_members[s * TOKENS_PER_STEP + row * columns + col]) for s in range(4)}
        assert len(members) == 1 and merge.is_static[members.pop()], f"background cell {(row, col)} was not merged"

    # The sequence really shrank, and each kept token carries its original M-RoPE position (merged: its source's).
    _, position_ids, _ = reference_full_sequence(fork, inputs)
    length = inputs["input_ids"].shape[1]
    assert seen["inputs_embeds"].shape[1] == length - 64 + merge.tokens_after_stage1 == state.stage1_kept.numel()
    assert torch.equal(seen["position_ids"][-3:], position_ids[..., state.stage1_kept])
    sources = video_positions(fork, inputs)[merge.source_positions]
    assert set(sources.tolist()) <= set(state.stage1_kept.tolist())


@torch.no_grad()
@pytest.mark.parametrize("name", ["default", "stage1_only"])
def test_decoding_after_pruning_continues_the_original_position_numbering(fork, inputs, name):
    config = preset(name, pruning_layer=K)
    expected, _ = generate_with(fork, config, **inputs, **GREEDY)
    _, position_ids, rope_deltas = reference_full_sequence(fork, inputs)
    assert torch.equal(fork.model.rope_deltas, rope_deltas)  # rope_deltas of the FULL sequence
    length = inputs["input_ids"].shape[1]
    for explicit in (True, False):  # positions given by the caller, or left to the fork (None)
        with attached(fork, config) as (cache, _):
            out = fork(**inputs, past_key_values=cache, use_cache=True)
            tokens = [int(out.logits[0, -1].argmax())]
            for step in range(GREEDY["max_new_tokens"] - 1):
                position = (torch.tensor(length + step) + rope_deltas).view(1, 1, 1).expand(3, 1, 1) if explicit else None
                out = fork(input_ids=torch.tensor([[tokens[-1]]]), position_ids=position, past_key_values=cache, use_cache=True)
                tokens.append(int(out.logits[0, -1].argmax()))
        assert cache.get_seq_length(0) < length + len(tokens)  # the cache is shorter than the numbering
        assert tokens == expected.sequences[0, length:].tolist(), f"explicit positions={explicit}"


# ============================================================================= errors


@torch.no_grad()
def test_batch_larger_than_one_bad_pruning_layer_double_attach_and_no_cache_give_clear_errors(model_dir, fork, inputs):
    batch = {k: torch.cat([v, v]) if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v for k, v in inputs.items()}
    batch["pixel_values_videos"] = torch.cat([inputs["pixel_values_videos"]] * 2)
    batch["video_grid_thw"] = torch.cat([inputs["video_grid_thw"]] * 2)
    batch["second_per_grid_ts"] = torch.cat([inputs["second_per_grid_ts"]] * 2)
    with pytest.raises(ValueError, match="batch size 1"):
        forward_with(fork, stage2(), **batch)
    with pytest.raises(ValueError, match=r"pruning_layer=6 is out of range for a model with 6 layers"):
        attach_prunevid(fork, preset("stage2_only", pruning_layer=6))
    assert get_prunevid(fork) is None  # a refused attach leaves nothing behind
    with prunevid(fork, stage2()):
        with pytest.raises(RuntimeError, match="already attached"):
            attach_prunevid(fork, stage2())
        with pytest.raises(ValueError, match="use_cache=True"):
            fork(**inputs, use_cache=False)
    with pytest.raises(TypeError, match="forked Qwen2.5-VL"):
        attach_prunevid(UpstreamQwen.from_pretrained(model_dir), stage2())


# ============================================================================= attach / detach and the selector protocol


@torch.no_grad()
def test_leaving_the_with_block_detaches_even_on_an_exception_and_the_fork_is_upstream_again(fork, inputs):
    expected = fork.generate(**inputs, **GREEDY)
    with pytest.raises(KeyboardInterrupt):
        with prunevid(fork, preset("default", pruning_layer=K)):
            assert get_prunevid(fork) is not None
            raise KeyboardInterrupt
    assert get_prunevid(fork) is None and not hasattr(fork.model, "prunevid")
    after = fork.generate(**inputs, **GREEDY)
    assert torch.equal(after.sequences, expected.sequences)
    assert all(torch.equal(a, b) for a, b in zip(after.logits, expected.logits, strict=True))
    runtime = attach_prunevid(fork, preset("default", pruning_layer=K))
    assert detach_prunevid(fork) is runtime and detach_prunevid(fork) is None


@torch.no_grad()
def test_each_generation_gets_its_own_state_registered_under_its_cache(fork, inputs):
    config = preset("default", pruning_layer=K)
    with prunevid(fork, config) as runtime:
        caches = [DynamicCache(config=fork.config) for _ in range(2)]
        for cache in caches:
            fork.generate(**inputs, past_key_values=cache, max_new_tokens=2, do_sample=False)
        first, second = (runtime.state_for(cache) for cache in caches)
    assert isinstance(first, PruneVidState) and first is not second
    assert first.stats == second.stats and not first.in_prefill
    with pytest.raises(KeyError, match="no PruneVid generation"):
        runtime.state_for(DynamicCache(config=fork.config))


@torch.no_grad()
def test_a_selector_from_the_shared_protocol_replaces_stage2_selection_at_layer_k(fork, inputs):
    """Any ``SelectionContext -> keep [B, V]`` function runs where PruneVid's own selection does (layer K)."""
    seen = {}

    def every_third(ctx):
        seen.update(layer=ctx.layer_idx, question_attention=ctx.question_attention, groups=ctx.groups)
        keep = torch.zeros_like(ctx.alive)
        keep[:, ::3] = 1.0
        return keep

    with attached(fork, stage2(), selector=every_third) as (cache, state_of):
        fork(**inputs, past_key_values=cache, use_cache=True)
        state = state_of()
    visual = video_positions(fork, inputs)
    assert seen["layer"] == K and seen["question_attention"] is None  # no attention computed for it
    assert seen["groups"].shape == (1, 64)
    assert torch.equal(state.kept_visual, torch.arange(0, 64, 3))
    length = inputs["input_ids"].shape[1]
    keep = torch.ones(length, dtype=torch.bool)
    keep[visual] = False
    keep[visual[::3]] = True
    assert torch.equal(state.stage2_kept, keep.nonzero().flatten())
    assert state.stats["selector"] == "every_third"


@torch.no_grad()
def test_last_token_attention_keeps_the_visual_tokens_the_last_prompt_row_attends_to_most_at_layer_k(fork, fork_eager, inputs):
    """FastV's criterion in system B, against layer K's eager attention probabilities of the last row."""
    from pruning.selection import make_selector

    out = fork_eager(**inputs, output_attentions=True)
    visual = video_positions(fork, inputs)
    received = out.attentions[K][0][:, -1, visual].amax(dim=0)  # [V]: max over heads, the last row
    expected = torch.sort(torch.sort(received, descending=True, stable=True).indices[:20]).values
    with attached(fork, stage2(), selector=make_selector("last_token_attention", keep=20)) as (cache, state_of):
        fork(**inputs, past_key_values=cache, use_cache=True)
        state = state_of()
    assert state.question_queries is None and state.stats["selector"] == "last_token_attention"
    assert torch.equal(state.kept_visual, expected)
