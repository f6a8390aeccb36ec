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
    VisionZipSelector,
    baseline_schedule,
    schedule_selectors,
    tower_cls_attention,
)
from pruning.llava.runtime import llava_pruning
from pruning.selection import SELECTORS, Selection, SelectionContext, make_selector, register_selector, topk_keep
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
    assert {"random", "fastv", "divprune", "visionzip"} <= set(SELECTORS)
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


# ----------------------------------------------------------------------------- VisionZip


@torch.no_grad()
def test_tower_cls_attention_equals_what_eager_attention_returns(batch_inputs) -> None:
    """The CLS row computed from the feature layer's own LayerNorm / q / k equals ``output_attentions`` of the same
    tower run with eager attention (which SDPA does not return)."""
    eager = ForkLlava.from_pretrained(tiny_llava_dir(), attn_implementation="eager").eval()
    tower = eager.model.vision_tower
    out = tower(batch_inputs["pixel_values"], output_hidden_states=True, output_attentions=True)
    layer = eager.config.vision_feature_layer  # -2: LLaVA-1.5's feature layer
    expected = out.attentions[layer][:, :, 0, 1:].float().mean(1)  # [n_img, N]
    got = tower_cls_attention(tower, out.hidden_states, layer)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="selects the embeddings"):
        tower_cls_attention(tower, out.hidden_states, 0)


def visionzip_reference(attention, features, keep, dominant_share=54 / 64):
    """VisionZip's selection and merge for one image, written as the paper's code does it: ``attention [V]``,
    ``features [V, D]`` -> (kept indices ascending, their states)."""
    v = len(attention)
    dominant_count = int(keep * dominant_share + 0.5)
    dominant = sorted(sorted(range(v), key=lambda i: (-float(attention[i]), i))[:dominant_count])
    remaining = [i for i in range(v) if i not in dominant]
    contextual_count = keep - dominant_count
    step = max(1, len(remaining) // contextual_count)
    targets = remaining[::step][:contextual_count]
    others = [i for i in remaining if i not in targets]
    unit = torch.nn.functional.normalize(features, dim=-1)
    states = {i: features[i].clone() for i in dominant}
    for slot, t in enumerate(targets):
        mine = [o for o in others if int((unit[o] @ unit[targets].T).argmax()) == slot]
        states[t] = features[t] + (torch.stack([features[o] for o in mine]).mean(0) if mine else 0.0)
    kept = sorted(states)
    return kept, torch.stack([states[i] for i in kept])


def test_visionzip_keeps_the_dominant_tokens_and_merges_the_rest_as_the_paper_does() -> None:
    gen = torch.Generator().manual_seed(0)
    b, v, d, keep = 3, 40, 16, 12
    attention = torch.rand(b, v, generator=gen).softmax(-1)
    features = torch.randn(b, v, d, generator=gen)
    ctx = SelectionContext(layer_idx=0, mode="drop", vision_hidden=features, alive=torch.ones(b, v),
                           vision_cols=torch.arange(v).expand(b, v), vision_rows=torch.arange(v).expand(b, v),
                           question_hidden=torch.zeros(b, 1, d), question_mask=torch.ones(b, 1, dtype=torch.bool),
                           hidden_states=features, attention_mask=None, position_embeddings=(None, None),
                           previous_layer_attention=None, training=False, temperature=1.0, vision_attention=attention)
    selection = VisionZipSelector(keep=keep)(ctx)
    assert isinstance(selection, Selection) and (selection.keep.sum(1) == keep).all()
    for row in range(b):
        kept, states = visionzip_reference(attention[row], features[row], keep)
        assert selection.keep[row].nonzero().flatten().tolist() == kept
        torch.testing.assert_close(selection.hidden[row, kept], states)
    with pytest.raises(ValueError, match="CLS attention"):
        VisionZipSelector(keep=keep)(SelectionContext(**{**ctx.__dict__, "vision_attention": None}))


@torch.no_grad()
def test_visionzip_runs_in_the_fork_on_the_towers_cls_attention(fork, batch_inputs) -> None:
    """Through ``vision_pruning``: the CLS attention reaches the selector, ``keep`` tokens enter layer 0, the merged
    states replace the targets' (the logits differ from dominant-only selection of the same tokens), and training's
    mask mode refuses a merging selector in one line."""
    seen = {}

    class Capture(VisionZipSelector):
        def __call__(self, ctx):
            seen["attention"], seen["cols"] = ctx.vision_attention, ctx.vision_cols
            return super().__call__(ctx)

    with llava_pruning(fork, use_merger=False, use_pruners=False, selectors={0: Capture(keep=10)}) as vp:
        merged = fork(**batch_inputs).logits
        assert vp.last_trace.num_vision_tokens == [64, 10]
        kept = vp.last_trace.keep[0]
    out = fork.model.vision_tower(batch_inputs["pixel_values"], output_hidden_states=True)
    expected = tower_cls_attention(fork.model.vision_tower, out.hidden_states, fork.config.vision_feature_layer)
    torch.testing.assert_close(seen["attention"], expected)
    plain = lambda ctx: kept.to(ctx.alive.dtype)  # noqa: E731 - the same tokens, without the merge
    with llava_pruning(fork, use_merger=False, use_pruners=False, selectors={0: plain}):
        unmerged = fork(**batch_inputs).logits
    assert merged.shape == unmerged.shape and not torch.allclose(merged, unmerged)
    with llava_pruning(fork, use_merger=False, use_pruners=False, selectors={0: VisionZipSelector(keep=10)}) as vp:
        vp.mode = "mask"
        with pytest.raises(ValueError, match="merges tokens, which only drop mode"):
            fork(**batch_inputs)


def test_eval_llava_pruning_writes_each_methods_accuracy_with_its_standard_error(tmp_path, capsys) -> None:
    """``--task clutter --seed --num-questions --stats-json``: one entry per method and budget, named
    ``<method>_<budget>`` (several budgets), with the binomial standard error and the clutter task's types."""
    import json
    import math

    from models.tiny.llava import tiny_clutter_llava_dir
    from tests.script_loader import run_script_in_process

    stats = tmp_path / "stats.json"
    result = run_script_in_process("eval_llava_pruning", [
        "--task", "clutter", "--model-path", str(tiny_clutter_llava_dir()), "--methods", "random,visionzip",
        "--budgets", "0.25,0.5", "--seed", "3", "--num-questions", "10", "--batch-size", "10", "--timing-batches", "1",
        "--output", str(tmp_path / "eval.json"), "--stats-json", str(stats)], capsys)
    assert result.returncode == 0, result.stderr
    methods = json.loads(stats.read_text())["methods"]
    assert list(methods) == ["unpruned", "random_0.25", "visionzip_0.25", "random_0.5", "visionzip_0.5"]
    for name, entry in methods.items():
        assert set(entry) == {"accuracy", "accuracy_se", "budget", "per_type"}
        assert math.isclose(entry["accuracy_se"], math.sqrt(entry["accuracy"] * (1 - entry["accuracy"]) / 10))
        assert list(entry["per_type"]) == ["colour", "shape", "count", "position", "relation"]
    assert methods["visionzip_0.25"]["budget"] == 0.25
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["task"] == "clutter" and report["seed"] == 3
    visionzip = [r for r in report["results"] if r["method"] == "visionzip"]
    assert [r["vision_tokens_after_each_stage_tiny"] for r in visionzip] == [[256, 64], [256, 128]]
