"""Training-free selection through one protocol (``pruning.selection``) and the FastV attention probe.

FastV ranks vision tokens by the attention they receive from the last prompt token in the layer
before its pruning layer. A fence in the forked ``LlamaAttention`` records that row's attention
from the layer's own post-RoPE queries and keys; here it is checked against an independent
recomputation from that layer's input hidden states (the pre-move implementation of FastV).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoProcessor
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from models.llava.modeling_llava import LlavaForConditionalGeneration as ForkLlava
from models.tiny.llava import tiny_llava_dir
from pruning.llava.baselines import (
    DivPruneSelector,
    FastVSelector,
    RandomSelector,
    baseline_schedule,
    schedule_selectors,
)
from pruning.llava.runtime import llava_pruning
from pruning.selection import SELECTORS, SelectionContext, make_selector, register_selector, topk_keep
from tests.test_equivalence_llava import QUESTIONS, chat_prompt, make_test_image


@pytest.fixture(scope="module")
def fork():
    return ForkLlava.from_pretrained(tiny_llava_dir()).eval()


@pytest.fixture(scope="module")
def batch_inputs():
    processor = AutoProcessor.from_pretrained(tiny_llava_dir())
    images = [make_test_image((150, 120), seed=2), make_test_image((112, 140), seed=3)]
    prompts = [chat_prompt(processor, q) for q in QUESTIONS]
    return processor(images=images, text=prompts, padding=True, return_tensors="pt")


def test_registry_builds_every_training_free_method_by_name() -> None:
    assert {"random", "fastv", "divprune"} <= set(SELECTORS)
    assert isinstance(make_selector("random", keep=3, seed=1), RandomSelector)
    assert isinstance(make_selector("fastv", keep=3), FastVSelector)
    assert isinstance(make_selector("divprune", keep=3), DivPruneSelector)
    with pytest.raises(ValueError, match="unknown selector 'nope'; registered: .*divprune"):
        make_selector("nope", keep=3)
    with pytest.raises(ValueError, match="already registered"):
        register_selector("random")(lambda keep: None)


def test_a_peer_method_is_one_function_and_one_registry_entry(fork, batch_inputs) -> None:
    """Register a new selector (keep the first k tokens) and run it in the fork by name."""
    name = "first_k_for_test"
    register_selector(name)(lambda keep: lambda ctx: topk_keep(-ctx.vision_cols.float(), ctx.alive, keep))
    try:
        with llava_pruning(fork, use_merger=False, use_pruners=False, selectors={0: make_selector(name, keep=5)}) as vp:
            with torch.no_grad():
                fork(**batch_inputs)
            assert vp.last_trace.num_vision_tokens == [64, 5]
            assert torch.equal(vp.last_trace.keep[0], torch.arange(64).expand(2, 64) < 5)
    finally:
        SELECTORS.pop(name)
    assert getattr(fork.model, "vision_pruning", None) is None  # the with block detached it


@torch.no_grad()
def test_fastv_probe_equals_an_independent_recomputation_from_the_layer_input(fork, batch_inputs) -> None:
    layer_k = 2
    seen: dict[str, torch.Tensor] = {}

    class Capture(FastVSelector):
        def __call__(self, ctx: SelectionContext) -> torch.Tensor:
            seen["attention"], seen["rows"] = ctx.previous_layer_attention, ctx.vision_rows
            return super().__call__(ctx)

    unpruned = fork(**batch_inputs, output_hidden_states=True)
    with llava_pruning(fork, use_merger=False, use_pruners=False, selectors={layer_k: Capture(keep=10)}) as vp:
        fork(**batch_inputs)
        assert vp.last_trace.num_vision_tokens == [64, 10]

    # Reference: layer K-1's input (no token dropped before K) -> its q/k projections + RoPE -> last row's softmax.
    lm = fork.model.language_model
    layer = lm.layers[layer_k - 1]
    attn = layer.self_attn
    x = layer.input_layernorm(unpruned.hidden_states[layer_k - 1])
    b, t, _ = x.shape
    mask = batch_inputs["attention_mask"].bool()
    positions = torch.arange(t).expand(b, t)  # a plain forward numbers the rows 0..T-1 whatever the padding
    cos, sin = lm.rotary_emb(x, position_ids=positions)
    q = attn.q_proj(x[:, -1:]).view(b, 1, -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(b, t, -1, attn.head_dim).transpose(1, 2)
    q, _ = apply_rotary_pos_emb(q, q, cos[:, -1:], sin[:, -1:])
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2)).squeeze(2).float() * attn.scaling
    reference = scores.masked_fill(~mask[:, None, :], float("-inf")).softmax(-1).mean(1)

    assert seen["attention"].shape == (b, t)
    assert torch.allclose(seen["attention"], reference, atol=1e-6, rtol=1e-5)
    received = reference.gather(1, seen["rows"])
    expected_keep = topk_keep(received, torch.ones_like(received), 10).bool()
    assert torch.equal(vp.last_trace.keep[layer_k], expected_keep)


def test_schedule_selectors_come_from_the_registry() -> None:
    selectors = schedule_selectors(baseline_schedule("fastv", 0.5, 8, 64))
    assert list(selectors) == [2] and isinstance(selectors[2], FastVSelector)
