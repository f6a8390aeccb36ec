"""System C inside the forked LLaVA: the fenced merger + pruner branches and the decoder loop they call.

* attached-but-off (disabled, or a setting that removes nothing) is bit-identical to upstream;
* the merger yields exactly its target count inside the model (64 -> 32 tiny, 576 -> 288 real);
* physical dropping (inference) equals the differentiable masked computation (training) on the
  same keep decisions, and generation from a physically pruned prefill equals independent
  references: the upstream language model fed only the kept tokens at their original positions,
  and a from-scratch eager loop over the per-layer surviving key sets (no KV cache at all);
* gradients of the masked computation reach the merger and every pruner head;
* bad configuration is reported clearly.

All on the embedded tiny LLaVA-1.5 (random weights; pruning heads freshly initialised).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor
from transformers import LlavaForConditionalGeneration as UpstreamLlava
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from models.llava.modeling_llava import LlavaForConditionalGeneration as ForkLlava
from models.tiny.llava import tiny_llava_dir
from pruning.llava.config import (
    ConfigError,
    MergerConfig,
    PrunerConfig,
    VisionTokenPruningConfig,
    config_from_dict,
    load_config,
    vision_token_trajectory,
)
from pruning.llava.modules import TokenMerger
from pruning.llava.runtime import ForcedSelector, attach_pruning, detach_pruning, get_pruning
from tests.test_equivalence_llava import QUESTIONS, chat_prompt, make_test_image

NEW_TOKENS = 6
GEN = dict(do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, use_cache=True,
           return_dict_in_generate=True, output_logits=True)


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return tiny_llava_dir()


@pytest.fixture(scope="module")
def processor(model_dir):
    return AutoProcessor.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def upstream(model_dir) -> UpstreamLlava:
    return UpstreamLlava.from_pretrained(model_dir).eval()


@pytest.fixture()
def fork(model_dir) -> ForkLlava:
    return ForkLlava.from_pretrained(model_dir).eval()


@pytest.fixture(scope="module")
def batch_inputs(processor):
    """Two images, two questions of different lengths, left padded."""
    images = [make_test_image((150, 120), seed=2), make_test_image((112, 140), seed=3)]
    prompts = [chat_prompt(processor, q) for q in QUESTIONS]
    inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    assert (inputs["attention_mask"][:, 0] == 0).any()
    return inputs


def _attach(model, seed: int = 0, **kwargs):
    torch.manual_seed(seed)  # pruning heads: deterministic fresh init
    return attach_pruning(model, **kwargs)


def _keep_all_config() -> VisionTokenPruningConfig:
    return VisionTokenPruningConfig(pruner=PrunerConfig(keep_ratios=(1.0, 1.0, 1.0)))


def _assert_generate_equal(got, want) -> None:
    assert torch.equal(got.sequences, want.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.logits, want.logits, strict=True))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# ----------------------------------------------------------------------------- no-op settings


def test_fork_built_from_upstream_arguments_has_no_pruning(fork) -> None:
    assert getattr(fork.model, "vision_pruning", None) is None
    assert get_pruning(fork) is None
    assert not any("vision_pruning" in name for name in fork.state_dict())


@torch.no_grad()
def test_attached_but_disabled_is_bit_identical_to_upstream(fork, upstream, batch_inputs) -> None:
    pruning = _attach(fork)
    pruning.enabled = False
    expected = upstream(**batch_inputs, output_hidden_states=True)
    actual = fork(**batch_inputs, output_hidden_states=True)
    assert torch.equal(actual.logits, expected.logits)
    assert all(torch.equal(a, b) for a, b in zip(actual.hidden_states, expected.hidden_states, strict=True))
    _assert_generate_equal(fork.generate(**batch_inputs, **GEN), upstream.generate(**batch_inputs, **GEN))
    pruning.enabled = True
    with pruning.disabled():
        assert torch.equal(fork(**batch_inputs).logits, expected.logits)


@torch.no_grad()
def test_keep_everything_runs_the_pruning_loop_bit_identically(fork, upstream, batch_inputs) -> None:
    """No merger, keep ratios 1.0: the fork's own decoder loop (with pruner heads running) == upstream."""
    pruning = _attach(fork, config=_keep_all_config(), use_merger=False)
    expected = upstream(**batch_inputs, output_hidden_states=True)
    actual = fork(**batch_inputs, output_hidden_states=True)
    assert pruning.last_trace is not None and pruning.last_trace.num_vision_tokens == [64, 64, 64, 64]
    assert torch.equal(actual.logits, expected.logits)
    assert len(actual.hidden_states) == len(expected.hidden_states) == 9
    assert all(torch.equal(a, b) for a, b in zip(actual.hidden_states, expected.hidden_states, strict=True))
    _assert_generate_equal(fork.generate(**batch_inputs, **GEN), upstream.generate(**batch_inputs, **GEN))
    detach_pruning(fork)
    assert torch.equal(fork(**batch_inputs).logits, expected.logits)


# ----------------------------------------------------------------------------- merger


def test_merger_config_counts_real_and_tiny() -> None:
    cfg = VisionTokenPruningConfig()
    assert cfg.merger.resolve_num_tokens(576) == 288 and cfg.merger.resolve_num_tokens(64) == 32
    assert vision_token_trajectory(576, cfg) == [576, 288, 202, 152, 102]
    merger = TokenMerger.from_config(1024, cfg.merger, num_input_tokens=576).eval()  # CLIP-L/14-336 width
    with torch.no_grad():
        assert merger(torch.randn(1, 576, 1024)).tokens.shape == (1, 288, 1024)


@torch.no_grad()
def test_merger_returns_exactly_the_target_tokens_inside_the_model(fork, batch_inputs) -> None:
    pruning = _attach(fork, config=_keep_all_config())
    out = fork(**batch_inputs)
    trace = pruning.last_trace
    target = MergerConfig().resolve_num_tokens(64)
    assert target == 32 and pruning.merger.target_merge_tokens == 32
    assert trace.merger_output.tokens.shape == (2, 32, fork.config.vision_config.hidden_size)
    assert trace.merge_keep.sum(1).tolist() == [32, 32]
    assert trace.num_vision_tokens == [64, 32, 32, 32, 32]
    t = batch_inputs["input_ids"].shape[1]
    assert trace.layer_tokens == [t - 32] * 8  # the 32 leftover placeholders never enter layer 0
    assert out.logits.shape[1] == t - 32
    # the projector ran on the merged tokens only: image_hidden_states hold 32 non-zero rows per image
    rows = out.image_hidden_states.view(2, 64, -1).abs().sum(-1) > 0
    assert torch.equal(rows, trace.merge_keep)


# ----------------------------------------------------------------------------- drop == mask


@torch.no_grad()
def test_physical_dropping_equals_masked_computation_on_the_same_decisions(fork, batch_inputs) -> None:
    pruning = _attach(fork)
    dropped = fork(**batch_inputs)
    trace = pruning.last_trace
    assert trace.mode == "drop" and trace.num_vision_tokens == [64, 32, 22, 17, 11]
    t = batch_inputs["input_ids"].shape[1]
    assert trace.layer_tokens == [t - 32] * 2 + [t - 42] * 2 + [t - 47] * 3 + [t - 53]
    assert dropped.logits.shape[1] == t - 53
    with pruning.using(mode="mask", selectors=pruning.force_decisions(trace), learned_pruners=False):
        masked = fork(**batch_inputs)
    assert pruning.last_trace.mode == "mask" and masked.logits.shape[1] == t
    assert _rel(dropped.logits[:, -1], masked.logits[:, -1]) < 1e-5
    kept = trace.kept_rows  # every surviving non-padding row agrees, not just the last one
    real = batch_inputs["attention_mask"].gather(1, kept).bool()
    masked_kept = masked.logits.gather(1, kept[..., None].expand(-1, -1, masked.logits.shape[-1]))
    assert _rel(dropped.logits[real], masked_kept[real]) < 1e-5
    with pruning.using(mode="mask"):  # the pruner heads themselves make the same decisions in mask mode
        fork(**batch_inputs)
    assert all(torch.equal(trace.keep[k], pruning.last_trace.keep[k] > 0.5) for k in trace.keep)


@torch.no_grad()
def test_generate_from_masked_prefill_equals_generate_from_dropped_prefill(fork, batch_inputs) -> None:
    pruning = _attach(fork)
    dropped = fork.generate(**batch_inputs, **GEN)
    forced = pruning.force_decisions(pruning.last_trace)
    with pruning.using(mode="mask", selectors=forced, learned_pruners=False):
        masked = fork.generate(**batch_inputs, **GEN)
    assert torch.equal(dropped.sequences, masked.sequences)
    assert all(_rel(a, b) < 1e-5 for a, b in zip(dropped.logits, masked.logits, strict=True))


# ----------------------------------------------------------------------------- independent references


def _left_padded_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def test_generate_with_input_drops_equals_upstream_language_model_on_kept_tokens(
    fork, upstream, batch_inputs
) -> None:
    """Drops before layer 0 only: the same as upstream run on the kept tokens at their original positions."""
    g = torch.Generator().manual_seed(7)
    keep = torch.zeros(2, 64, dtype=torch.bool)
    for row in range(2):
        keep[row, torch.randperm(64, generator=g)[:20]] = True
    pruning = _attach(fork, use_merger=False, use_pruners=False, selectors={0: ForcedSelector(keep)})
    got = fork.generate(**batch_inputs, **GEN)
    assert pruning.last_trace.num_vision_tokens == [64, 20]

    embeds = upstream.model.get_input_embeddings()(batch_inputs["input_ids"])
    image = torch.cat(upstream.model.get_image_features(pixel_values=batch_inputs["pixel_values"]).pooler_output)
    image_mask = batch_inputs["input_ids"] == upstream.config.image_token_id
    embeds = embeds.masked_scatter(image_mask[..., None], image)
    keep_rows = ~image_mask
    keep_rows[image_mask] = keep.reshape(-1)
    sel = keep_rows.nonzero()[:, 1].view(2, -1)
    kept_embeds = embeds.gather(1, sel[..., None].expand(-1, -1, embeds.shape[-1]))
    kept_mask = batch_inputs["attention_mask"].gather(1, sel)
    kept_positions = _left_padded_positions(batch_inputs["attention_mask"]).gather(1, sel)
    want = upstream.generate(inputs_embeds=kept_embeds, attention_mask=kept_mask, position_ids=kept_positions, **GEN)
    assert torch.equal(got.sequences[:, -NEW_TOKENS:], want.sequences[:, -NEW_TOKENS:])
    assert all(_rel(a, b) < 1e-5 for a, b in zip(got.logits, want.logits, strict=True))


def _reference_logits(model, embeds, attention_mask, positions, alive_per_layer) -> torch.Tensor:
    """From-scratch eager forward over the full sequence: layer l's keys are ``alive_per_layer[l]`` [B, T].

    No KV cache, no sequence slicing: dropped tokens are simply invisible as keys from their
    pruning layer on. Returns the last position's logits.
    """
    lm = model.model.language_model
    b, t, _ = embeds.shape
    h = embeds
    cos, sin = lm.rotary_emb(h, positions)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    for layer, alive in zip(lm.layers, alive_per_layer, strict=True):
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        q = attn.q_proj(x).view(b, t, -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(b, t, -1, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(b, t, -1, attn.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k = k.repeat_interleave(attn.num_key_value_groups, dim=1)
        v = v.repeat_interleave(attn.num_key_value_groups, dim=1)
        allowed = causal[None] & (alive & attention_mask.bool())[:, None, :]
        allowed = allowed | torch.eye(t, dtype=torch.bool)[None]  # every row sees itself (padding rows: no NaN)
        scores = (q @ k.transpose(-1, -2)) * attn.scaling
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        out = scores.softmax(-1) @ v
        h = h + attn.o_proj(out.transpose(1, 2).reshape(b, t, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.lm_head(lm.norm(h))[:, -1]


@torch.no_grad()
def test_generate_with_layer_drops_equals_a_from_scratch_reference_without_kv_cache(fork, batch_inputs) -> None:
    """Merger + pruner heads at layers [2, 4, 7]: KV-cached decoding == recomputing everything, every step."""
    pruning = _attach(fork)
    got = fork.generate(**batch_inputs, **GEN)
    trace = pruning.last_trace
    assert trace.num_vision_tokens == [64, 32, 22, 17, 11]

    # The prompt's embeddings as the decoder loop received them (merged tokens at their centres). hidden_states[0]
    # is what layer 0 receives: in mask mode the whole prompt (drop mode removes the merger's leftovers first).
    with pruning.using(mode="mask"):
        prompt_out = fork(**batch_inputs, output_hidden_states=True)
    embeds = prompt_out.hidden_states[0]
    image_mask = batch_inputs["input_ids"] == fork.config.image_token_id
    b, t0 = image_mask.shape
    alive_vision = [trace.merge_keep]
    current = trace.merge_keep
    for layer in range(8):
        current = trace.keep.get(layer, current)
        alive_vision.append(current)
    alive_vision = alive_vision[1:]

    ids = batch_inputs["input_ids"]
    mask = batch_inputs["attention_mask"]
    embed_tokens = fork.model.get_input_embeddings()
    for step in range(NEW_TOKENS):
        t = embeds.shape[1]
        alive_per_layer = []
        for alive in alive_vision:
            full = torch.ones(b, t, dtype=torch.bool)
            full[:, :t0][image_mask] = alive.reshape(-1)
            alive_per_layer.append(full)
        logits = _reference_logits(fork, embeds, mask, _left_padded_positions(mask), alive_per_layer)
        assert _rel(got.logits[step], logits) < 1e-5, step
        next_ids = got.sequences[:, ids.shape[1] + step]
        assert torch.equal(logits.argmax(-1), next_ids), step
        embeds = torch.cat([embeds, embed_tokens(next_ids)[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones(b, 1, dtype=mask.dtype)], dim=1)


@torch.no_grad()
def test_decode_positions_continue_the_original_numbering(fork, processor) -> None:
    """Without position_ids, the first decode token gets position T (the original prompt length), not T_kept."""
    inputs = processor(images=make_test_image((112, 112), seed=5), text=chat_prompt(processor, QUESTIONS[0]),
                       return_tensors="pt")
    pruning = _attach(fork)
    t = inputs["input_ids"].shape[1]
    prefill = fork(**inputs, use_cache=True)
    cache = prefill.past_key_values
    assert pruning.cache_state(cache).seen == t
    assert [cache.get_seq_length(layer) for layer in range(8)] == pruning.last_trace.layer_tokens
    next_id = prefill.logits[:, -1:].argmax(-1)
    mask = torch.ones(1, t + 1, dtype=torch.long)
    snapshot = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]

    def step(position_ids):
        for layer, (k, v) in zip(cache.layers, snapshot):
            layer.keys, layer.values = k.clone(), v.clone()
        pruning.cache_state(cache).seen = t
        return fork(input_ids=next_id, attention_mask=mask, past_key_values=cache, position_ids=position_ids).logits

    implicit = step(None)
    assert torch.equal(implicit, step(torch.tensor([[t]])))
    assert not torch.allclose(implicit, step(torch.tensor([[t - 53]])))


# ----------------------------------------------------------------------------- training path


def test_masked_training_forward_sends_gradients_to_merger_and_every_pruner(fork, batch_inputs) -> None:
    fork.requires_grad_(False)
    pruning = _attach(fork)
    fork.train()
    pruning.train()
    pruning.temperature = 0.5
    pruning.generator = torch.Generator().manual_seed(0)
    out = fork(**batch_inputs)
    assert pruning.last_trace.mode == "mask" and out.logits.shape[1] == batch_inputs["input_ids"].shape[1]
    assert pruning.last_trace.num_vision_tokens == [64, 32, 22, 17, 11]
    out.logits[:, -1].logsumexp(-1).sum().backward()
    assert pruning.merger.importance.fc2.weight.grad.abs().sum() > 0
    for layer, head in pruning.pruners.items():
        assert head.predictor.fc2.weight.grad is not None and head.predictor.fc2.weight.grad.abs().sum() > 0, layer
    assert all(p.grad is None for p in fork.model.language_model.parameters())


def test_attention_distillation_reaches_the_merger_and_every_pruner_over_the_tokens_alive_when_it_chose(
        fork, batch_inputs) -> None:
    from pruning.llava.modules import answer_attention_teacher, attention_distillation, merged_teacher
    from pruning.llava.runtime import stage_distillation

    fork.requires_grad_(False)
    pruning = _attach(fork)
    image_mask = batch_inputs["input_ids"] == fork.config.image_token_id
    rows = torch.zeros_like(image_mask)
    rows[:, -1] = True  # the row that predicts the answer's first token
    fork.config.text_config._attn_implementation = "eager"
    with torch.no_grad(), pruning.disabled():
        attentions = fork(**batch_inputs, output_attentions=True).attentions
    fork.config.text_config._attn_implementation = "sdpa"
    teacher = answer_attention_teacher(attentions, rows, image_mask)
    assert teacher.shape == (2, 64) and torch.allclose(teacher.sum(-1), torch.ones(2))

    fork.train()
    pruning.train()
    pruning.temperature = 0.5
    pruning.generator = torch.Generator().manual_seed(0)
    fork(**batch_inputs)
    trace = pruning.last_trace
    assert sorted(trace.keep_logits) == sorted(int(k) for k in pruning.pruners)
    alive_counts = [int(alive[0].sum()) for _, alive in trace.keep_logits.values()]
    assert alive_counts == trace.num_vision_tokens[1:-1]  # each head chose among the survivors of the stage before
    loss = stage_distillation(trace, teacher)
    out = trace.merger_output  # the same loss, term by term
    merged = merged_teacher(teacher, out.assignment, out.centre_indices)
    terms = [attention_distillation(out.importance_logits, teacher)]
    terms += [attention_distillation(logits, merged, alive) for logits, alive in trace.keep_logits.values()]
    torch.testing.assert_close(loss, torch.stack(terms).mean())
    loss.backward()
    assert pruning.merger.importance.fc2.weight.grad.abs().sum() > 0
    for layer, head in pruning.pruners.items():
        assert head.predictor.fc2.weight.grad is not None and head.predictor.fc2.weight.grad.abs().sum() > 0, layer
    assert all(p.grad is None for p in fork.model.language_model.parameters())


def test_keep_mask_gradients_are_bounded_and_budget_preserving(fork, batch_inputs) -> None:
    """Training-mode keep gradients are finite and bounded; the heads receive them projected to sum zero."""
    from pruning.llava.runtime import _BudgetProjectedGradient

    fork.requires_grad_(False)
    pruning = _attach(fork)
    fork.train()
    pruning.temperature = 0.5
    pruning.generator = torch.Generator().manual_seed(1)
    out = fork(**batch_inputs)
    trace = pruning.last_trace
    for keep in trace.keep.values():
        keep.retain_grad()
    out.logits[:, -1].logsumexp(-1).sum().backward()
    for layer, keep in trace.keep.items():  # no 1 / (keep + eps) blow-up through dropped keys
        assert torch.isfinite(keep.grad).all() and keep.grad.abs().max() < 1e3, layer
    # the projection itself: minus the mean over the alive tokens of each row, nothing to dead tokens
    mask = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.0]], requires_grad=True)
    alive = torch.tensor([[True, True, True, False], [True, True, True, True]])
    weights = torch.tensor([[4.0, 1.0, 1.0, 9.0], [2.0, 2.0, 6.0, 2.0]])
    (_BudgetProjectedGradient.apply(mask, alive) * weights).sum().backward()
    assert torch.equal(mask.grad, torch.tensor([[2.0, -1.0, -1.0, 0.0], [-1.0, -1.0, 3.0, -1.0]]))


def test_labels_follow_the_surviving_rows_in_drop_mode(fork, batch_inputs) -> None:
    pruning = _attach(fork)
    labels = batch_inputs["input_ids"].masked_fill(batch_inputs["input_ids"] == fork.config.image_token_id, -100)
    with torch.no_grad():
        out = fork(**batch_inputs, labels=labels)
    assert out.logits.shape[1] == pruning.last_trace.kept_rows.shape[1] and torch.isfinite(out.loss)


# ----------------------------------------------------------------------------- errors


def test_configuration_errors_are_reported_clearly(tmp_path, fork, upstream, batch_inputs) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("pruner:\n  pruning_layers: [10, 20, 31]\n  keep_ratios: [0.5, 0.5]\n")
    with pytest.raises(ConfigError, match=r"keep_ratios=\[0.5, 0.5\] is invalid; allowed: one ratio per pruning layer \(3\)"):
        load_config(bad)
    with pytest.raises(ConfigError, match="unknown key 'lr_merger' in section 'merger'; it belongs in section 'optim'"):
        config_from_dict({"merger": {"lr_merger": 1e-4}})
    with pytest.raises(TypeError, match="needs the forked LLaVA"):
        attach_pruning(upstream)
    with pytest.raises(ValueError, match="cannot place 9 pruning layers in a 8-layer model"):
        attach_pruning(fork, VisionTokenPruningConfig(pruner=PrunerConfig(pruning_layers=tuple(range(9)),
                                                                          keep_ratios=(0.9,) * 9)))
    with pytest.raises(ValueError, match=r"selector layers \[8\] out of range for a 8-layer LLM"):
        attach_pruning(fork, selectors={8: ForcedSelector(torch.ones(2, 64))})
    pruning = attach_pruning(fork)
    pruning.mode = "masked"
    with pytest.raises(ValueError, match="vision_pruning.mode='masked'; allowed: auto, drop, mask"):
        fork(**batch_inputs)


def _run_script(*args: str) -> subprocess.CompletedProcess:
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], cwd=root, env=env, capture_output=True, text=True, timeout=120)


def test_scripts_report_bad_input_in_one_line(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("merger:\n  merger_type: fancy\n")
    run = _run_script("scripts/train_llava_pruner.py", "--config", str(bad), "--output-dir", str(tmp_path / "out"))
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert run.stderr.startswith("error: ") and "merger_type='fancy' is invalid; allowed: 'simple' | 'question_aware'" in run.stderr
    run = _run_script("scripts/train_llava_pruner.py", "--set", "lr_pruners=-1", "--output-dir", str(tmp_path / "out"))
    assert run.returncode == 2 and "lr_pruners=-1 is invalid" in run.stderr and run.stderr.count("\n") == 1
    run = _run_script("scripts/eval_llava_pruning.py", "--budgets", "0.3,1.5")
    assert run.returncode == 2 and run.stderr == "error: --budgets must be fractions in (0, 1], got '0.3,1.5'\n"
    run = _run_script("scripts/eval_llava_pruning.py", "--checkpoint", str(tmp_path / "missing.pt"))
    assert run.returncode == 2 and "no trained pruner at" in run.stderr and run.stderr.count("\n") == 1


@torch.no_grad()
def test_question_aware_merger_in_forward_and_generate(fork, batch_inputs) -> None:
    cfg = VisionTokenPruningConfig(merger=MergerConfig(merger_type="question_aware"))
    pruning = _attach(fork, config=cfg)
    out = fork(**batch_inputs)  # forward: the question comes from input_ids
    assert pruning.last_trace.num_vision_tokens == [64, 32, 22, 17, 11] and torch.isfinite(out.logits).all()
    # generate encodes the images before the first forward; the merge waits for the forward, where the question is
    generated = fork.generate(**batch_inputs, do_sample=False, max_new_tokens=3, min_new_tokens=3)
    first = generated[:, batch_inputs["input_ids"].shape[1]]
    assert torch.equal(first, out.logits[:, -1].argmax(-1))  # the same first token as the plain forward


def test_discriminator_compares_the_rows_that_predict_the_answer() -> None:
    from pruning.llava.modules import answer_position_mask

    labels = torch.tensor([[-100, -100, -100, 7, 2], [-100, -100, 5, 2, -100]])
    expected = torch.tensor([[False, False, True, True, False], [False, True, True, False, False]])
    assert torch.equal(answer_position_mask(labels), expected)


def test_pruner_training_resumed_from_a_checkpoint_ends_where_the_uninterrupted_run_ends(tmp_path) -> None:
    """train_llava_pruner.py: checkpoints, JSON log, final file; --resume continues the same trajectory."""
    import json
    import shutil

    from models.tiny.llava import tiny_llava_dir

    common = ["scripts/train_llava_pruner.py", "--task", "shapes", "--model-path", str(tiny_llava_dir()), "--max-steps", "4",
              "--eval-size", "2", "--set", "batch_size=2", "--set", "eval_every=0", "--set", "log_every=1",
              "--set", "save_every=2"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run = _run_script(*common, "--output-dir", str(full))
    assert run.returncode == 0, run.stderr[-2000:]
    assert (full / "checkpoint-2" / "state.pt").is_file() and (full / "pruning_final.pt").is_file()
    assert (full / "pruning_last.pt").is_file() and not (full / "pruning_best.pt").exists()
    selected = torch.load(full / "pruning_final.pt", weights_only=False)
    assert selected["temperature"] == 0.1 and selected["steps"] in (0, 4)  # stages run at temperature_min
    log = json.loads((full / "train_log.json").read_text())
    assert [h["step"] for h in log["history"]] == [0, 1, 2, 3] and log["step"] == 4
    assert all(math.isfinite(h["g_total"]) and math.isfinite(h["d_loss"]) for h in log["history"])
    assert log["history"][0]["temperature"] == 1.0 and log["history"][-1]["temperature"] == 0.1

    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")  # as if the run had stopped after step 2
    run = _run_script(*common, "--output-dir", str(resumed), "--resume")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "resumed from" in run.stdout + run.stderr
    a = torch.load(full / "pruning_final.pt", weights_only=False)["state_dict"]
    b = torch.load(resumed / "pruning_final.pt", weights_only=False)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda hist: [{k: v for k, v in h.items() if k != "seconds"} for h in hist]  # noqa: E731
    assert strip(json.loads((resumed / "train_log.json").read_text())["history"]) == strip(log["history"])


def test_the_ablation_trains_each_variant_and_tabulates_its_accuracy_with_a_standard_error(tmp_path) -> None:
    import json

    from models.tiny.llava import tiny_llava_dir

    out = tmp_path / "ablation"
    run = _run_script("scripts/ablate_llava_pruner.py", "--task", "shapes", "--model-path", str(tiny_llava_dir()),
                      "--variants", "untrained,task_only", "--max-steps", "2", "--eval-size", "2",
                      "--num-questions", "4", "--budgets", "0.5", "--set", "batch_size=2", "--set", "eval_every=0",
                      "--output-dir", str(out))
    assert run.returncode == 0, run.stderr[-2000:]
    table = json.loads((out / "ablation.json").read_text())
    assert list(table["variants"]) == ["untrained", "task_only"]
    assert set(table["variants"]["untrained"]) == {"unpruned", "untrained_as_trained", "untrained"}
    assert set(table["variants"]["task_only"]) == {"unpruned", "learned_as_trained", "learned"}
    assert (out / "task_only" / "pruning_final.pt").is_file()
    trained = torch.load(out / "task_only" / "pruning_final.pt", weights_only=False)
    assert trained["config"]["loss"]["adv_loss_weight"] == 0.0
    assert table["selection"]["task_only"]["selected_step"] in (0, 2) and "untrained" not in table["selection"]
    again = _run_script("scripts/ablate_llava_pruner.py", "--task", "shapes", "--model-path", str(tiny_llava_dir()),
                        "--variants", "task_only", "--evaluate-only", "--num-questions", "4", "--budgets", "0.5",
                        "--output-dir", str(out))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "training" not in again.stdout  # the same stages, evaluated again
    merged = json.loads((out / "ablation.json").read_text())
    assert merged["variants"] == table["variants"]  # task_only evaluated again, untrained kept from the first run
    missing = _run_script("scripts/ablate_llava_pruner.py", "--variants", "full_gan", "--evaluate-only",
                          "--output-dir", str(out))
    assert missing.returncode == 2 and "no trained stages" in missing.stderr and missing.stderr.count("\n") == 1
    run = _run_script("scripts/ablate_llava_pruner.py", "--variants", "magic", "--output-dir", str(out))
    assert run.returncode == 2 and "--variants: unknown ['magic']" in run.stderr and run.stderr.count("\n") == 1


def test_pruner_training_with_attention_distillation_logs_the_term_and_restores_sdpa(tmp_path) -> None:
    import json

    run = _run_script("scripts/train_llava_pruner.py", "--task", "shapes", "--model-path", str(tiny_llava_dir()),
                      "--max-steps", "2", "--eval-size", "2", "--set", "batch_size=2", "--set", "eval_every=0",
                      "--set", "log_every=1", "--set", "attention_distill_weight=2", "--output-dir", str(tmp_path))
    assert run.returncode == 0, run.stderr[-2000:]
    log = json.loads((tmp_path / "train_log.json").read_text())
    assert all(h["g_attention_distill"] > 0 and math.isfinite(h["g_attention_distill"]) for h in log["history"])
    assert log["config"]["loss"]["attention_distill_weight"] == 2.0


def test_eager_attention_is_restored_after_the_block_even_on_error() -> None:
    from tests.script_loader import load_script

    module = load_script("train_llava_pruner")

    class Config:
        class text_config:
            _attn_implementation = "sdpa"

    class Model:
        config = Config

    with module.eager_attention(Model):
        assert Model.config.text_config._attn_implementation == "eager"
    assert Model.config.text_config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError), module.eager_attention(Model):
        raise RuntimeError("boom")
    assert Model.config.text_config._attn_implementation == "sdpa"
    with module.eager_attention(Model, active=False):
        assert Model.config.text_config._attn_implementation == "sdpa"
