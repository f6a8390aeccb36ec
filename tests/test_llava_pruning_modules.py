"""Unit tests of system C's modules and config (pruning/llava/modules.py, pruning/llava/config.py)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from pruning.llava.config import (
    ConfigError,
    LossConfig,
    MergerConfig,
    TemperatureConfig,
    VisionTokenPruningConfig,
    config_from_dict,
    keep_count,
    load_config,
    scale_pruning_layers,
    temperature_at,
    vision_token_trajectory,
)
from pruning.llava.modules import (
    Discriminator,
    LayerPruner,
    TokenMerger,
    adversarial_losses,
    distinctiveness,
    gumbel_topk,
    keep_mask,
    merge_sparsity_loss,
    task_loss,
    token_budget_loss,
    total_generator_loss,
)

CONFIG_PATH = Path(__file__).resolve().parents[1] / "configs" / "vision_token_pruning.yaml"


def _hard_topk(logits: torch.Tensor, k: int) -> torch.Tensor:
    return torch.zeros_like(logits).scatter_(-1, logits.topk(k, dim=-1).indices, 1.0)


# ----------------------------------------------------------------------------- gumbel_topk


@pytest.mark.parametrize("noise", [True, False])
@pytest.mark.parametrize("k", [1, 5, 16])
def test_gumbel_topk_forward_value_has_exactly_k_ones(noise, k):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 16, generator=g)
    mask, idx = gumbel_topk(logits, k, temperature=0.7, noise=noise, generator=g)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert mask.sum(-1).tolist() == [float(k)] * 3
    assert idx.shape == (3, k)
    assert torch.equal(mask.gather(1, idx), torch.ones(3, k))
    assert (idx.diff(dim=-1) > 0).all()  # ascending positions


def test_gumbel_topk_without_noise_at_low_temperature_equals_hard_topk():
    g = torch.Generator().manual_seed(1)
    logits = torch.stack([torch.randperm(32, generator=g) for _ in range(4)]).float() * 0.1  # gaps >= 0.1
    mask, idx = gumbel_topk(logits, 8, temperature=1e-3, noise=False)
    assert torch.equal(mask, _hard_topk(logits, 8))
    assert torch.equal(idx, logits.topk(8, dim=-1).indices.sort(-1).values)
    soft, _ = gumbel_topk(logits, 8, temperature=1e-3, hard=False, noise=False)  # the relaxation itself
    assert torch.allclose(soft, mask, atol=1e-4)


def test_gumbel_topk_gives_nonzero_gradients_to_logits():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 20, generator=g, requires_grad=True)
    weights = torch.randn(2, 20, generator=g)
    mask, _ = gumbel_topk(logits, 6, temperature=1.0, generator=g)
    (mask * weights).sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert (logits.grad != 0).all()


def test_gumbel_topk_noise_is_reproducible_with_a_seeded_generator():
    logits = torch.randn(2, 20, generator=torch.Generator().manual_seed(3))
    a, _ = gumbel_topk(logits, 5, generator=torch.Generator().manual_seed(7))
    b, _ = gumbel_topk(logits, 5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- merger


@pytest.mark.parametrize("merger_type", ["simple", "question_aware"])
@pytest.mark.parametrize("n,m", [(64, 32), (49, 7), (20, 20), (10, 1)])
def test_merger_returns_exactly_target_merge_tokens(merger_type, n, m):
    torch.manual_seed(0)
    merger = TokenMerger(24, merger_type, target_merge_tokens=m, d_internal=32, num_heads=4, question_dim=12)
    x = torch.randn(2, n, 24)
    q, qmask = torch.randn(2, 5, 12), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    for training in (True, False):
        merger.train(training)
        out = merger(x, temperature=0.5, question=q, question_mask=qmask, generator=torch.Generator().manual_seed(0))
        assert out.tokens.shape == (2, m, 24)
        assert out.assignment.shape == out.merge_weights.shape == (2, n, m)
        assert out.importance_logits.shape == (2, n) and out.centre_indices.shape == (2, m)
        assert out.selection_mask.sum(-1).tolist() == [float(m)] * 2
        assert torch.isfinite(out.tokens).all()


def test_merger_uses_merge_ratio_when_target_is_none_and_from_config_scales_to_the_tower():
    merger = TokenMerger(8, target_merge_tokens=None, merge_ratio=0.25, d_internal=16)
    assert merger(torch.randn(1, 40, 8)).tokens.shape == (1, 10, 8)
    assert TokenMerger.from_config(8, MergerConfig(), num_input_tokens=64).target_merge_tokens == 32
    assert TokenMerger.from_config(8, MergerConfig(), num_input_tokens=576).target_merge_tokens == 288
    with pytest.raises(ValueError, match="target_merge_tokens"):
        TokenMerger(8, target_merge_tokens=288, d_internal=16)(torch.randn(1, 64, 8))


def test_merged_tokens_are_convex_combinations_of_the_inputs():
    torch.manual_seed(1)
    merger = TokenMerger(16, "simple", target_merge_tokens=12, d_internal=32).eval()
    x = torch.randn(3, 48, 16)
    out = merger(x, temperature=0.1)  # low temperature: some centres receive little mass
    ones_rows, ones_cols = torch.ones(3, 48), torch.ones(3, 12)
    assert torch.allclose(out.assignment.sum(-1), ones_rows, atol=1e-5)  # each token: unit mass over centres
    assert torch.allclose(out.merge_weights.sum(1), ones_cols, atol=1e-5)  # each merged token: weights sum to 1
    assert (out.merge_weights >= 0).all()
    assert torch.allclose(out.tokens, out.merge_weights.transpose(1, 2) @ x, atol=1e-5)
    lo, hi = x.min(1, keepdim=True).values, x.max(1, keepdim=True).values
    assert ((out.tokens >= lo - 1e-5) & (out.tokens <= hi + 1e-5)).all()  # inside the inputs' bounding box


def test_merger_eval_is_deterministic_and_picks_the_top_importance_centres():
    torch.manual_seed(2)
    merger = TokenMerger(16, target_merge_tokens=6, d_internal=16).eval()
    x = torch.randn(2, 30, 16)
    a, b = merger(x), merger(x)
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.centre_indices, a.importance_logits.topk(6, -1).indices.sort(-1).values)


def test_merger_training_sends_gradients_to_the_importance_head():
    torch.manual_seed(3)
    merger = TokenMerger(16, "question_aware", target_merge_tokens=8, d_internal=16).train()
    out = merger(torch.randn(2, 24, 16), question=torch.randn(2, 4, 16), generator=torch.Generator().manual_seed(0))
    (out.tokens.square().sum() + merge_sparsity_loss(out.assignment)).backward()
    grads = [p.grad for p in merger.importance.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    assert merger.cross_attn.q.weight.grad.abs().sum() > 0


def test_distinctiveness_ranks_the_odd_tokens_first_and_ignores_dead_ones():
    torch.manual_seed(4)
    background = torch.randn(1, 1, 16)
    x = background + 0.05 * torch.randn(2, 12, 16)  # twelve look-alike tokens per row
    x[:, 3] = torch.randn(16)  # one object each
    x[:, 8] = torch.randn(16)
    score = distinctiveness(x)
    assert set(score[0].topk(2).indices.tolist()) == {3, 8}
    torch.testing.assert_close(score.mean(-1), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(score.std(-1, unbiased=False), torch.ones(2), atol=1e-4, rtol=0)
    alive = torch.ones(2, 12, dtype=torch.bool)
    alive[:, 8] = False  # a dropped token scores 0 and no longer counts in the others' means
    masked = distinctiveness(x, alive)
    assert torch.equal(masked[:, 8], torch.zeros(2)) and masked[0].argmax() == 3
    kept = [i for i in range(12) if i != 8]
    torch.testing.assert_close(masked[:, kept], distinctiveness(x[:, kept]), atol=1e-5, rtol=1e-5)


def test_merger_prior_scale_adds_the_distinctiveness_prior_and_is_learnable():
    x = torch.randn(2, 20, 16, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(5)
    plain = TokenMerger(16, target_merge_tokens=5, d_internal=16)
    torch.manual_seed(5)
    with_prior = TokenMerger(16, target_merge_tokens=5, d_internal=16, prior_scale=3.0)
    torch.testing.assert_close(with_prior.importance_logits(x), plain.importance_logits(x) + 3.0 * distinctiveness(x))
    assert with_prior.prior_scale.requires_grad


def test_merger_gives_gradients_to_tokens_that_are_not_centres():
    """The value gate: a non-centre token's importance logit gets a gradient (the keys alone reach only centres)."""
    torch.manual_seed(6)
    merger = TokenMerger(16, target_merge_tokens=4, d_internal=16).train()
    x = torch.randn(1, 16, 16)
    logits = merger.importance_logits(x).detach().requires_grad_(True)
    merger.importance_logits = lambda *a, **k: logits  # the same logits, now a leaf we can read the gradient of
    out = merger(x, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.tokens, (out.merge_weights.transpose(1, 2) @ x))  # the gate has value exactly 1
    out.tokens.square().sum().backward()
    not_centres = torch.ones(16, dtype=torch.bool)
    not_centres[out.centre_indices[0]] = False
    assert (logits.grad[0, not_centres].abs() > 0).sum() >= 8


def test_question_aware_merger_without_question_raises():
    merger = TokenMerger(8, "question_aware", target_merge_tokens=2, d_internal=8, num_heads=2)
    with pytest.raises(ValueError, match="question"):
        merger(torch.randn(1, 4, 8))


# ----------------------------------------------------------------------------- pruner


def test_pruner_logits_shape_and_fully_padded_question_stays_finite():
    torch.manual_seed(4)
    pruner = LayerPruner(32, d_internal=16, num_heads=4)
    logits = pruner(torch.randn(2, 20, 32), torch.randn(2, 6, 32), torch.tensor([[1] * 6, [0] * 6]))
    assert logits.shape == (2, 20) and torch.isfinite(logits).all()


@pytest.mark.parametrize("ratio", [0.7, 0.5, 0.25, 1.0])
def test_pruner_keep_mask_at_inference_keeps_the_requested_count_deterministically(ratio):
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(5))
    mask = keep_mask(logits, ratio, training=False)
    k = keep_count(40, ratio)
    assert mask.sum(-1).tolist() == [float(k)] * 3
    assert torch.equal(mask, _hard_topk(logits, k))
    assert torch.equal(mask, keep_mask(logits, ratio, training=False))


def test_pruner_keep_mask_respects_prev_mask_dropped_stays_dropped():
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(2, 30, generator=g)
    prev = keep_mask(torch.randn(2, 30, generator=g), 0.6)  # 18 alive per row
    logits = logits + 100.0 * (1 - prev)  # dropped tokens score highest: still must stay dropped
    for training in (False, True):
        mask = keep_mask(logits, 0.5, temperature=0.5, training=training, prev_mask=prev, generator=g)
        assert (mask[prev == 0] == 0).all()
        assert mask.sum(-1).tolist() == [float(keep_count(18, 0.5))] * 2
        assert set(mask.unique().tolist()) <= {0.0, 1.0}


def test_pruner_keep_mask_in_training_is_differentiable_through_the_chain():
    torch.manual_seed(7)
    pruner = LayerPruner(16, d_internal=16, num_heads=2)
    vision, question = torch.randn(2, 24, 16), torch.randn(2, 5, 16)
    g = torch.Generator().manual_seed(0)
    m1 = keep_mask(pruner(vision, question), 0.7, 1.0, training=True, generator=g)
    m2 = keep_mask(pruner(vision * m1.unsqueeze(-1), question), 0.75, 1.0, training=True, prev_mask=m1, generator=g)
    assert m2.sum(-1).tolist() == [float(keep_count(keep_count(24, 0.7), 0.75))] * 2
    (m2 * torch.randn(2, 24)).sum().backward()
    assert pruner.predictor.fc2.weight.grad.abs().sum() > 0


def test_keep_ratio_one_without_prev_mask_keeps_everything():
    assert torch.equal(keep_mask(torch.randn(2, 9), 1.0), torch.ones(2, 9))


# ----------------------------------------------------------------------------- discriminator, losses


def test_discriminator_maps_token_sets_to_one_logit_per_sample():
    torch.manual_seed(8)
    disc = Discriminator(32, d_hidden=16)
    h = torch.randn(3, 11, 32)
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2] = 0  # fully masked row: still finite
    out = disc(h, mask)
    assert out.shape == (3,) and torch.isfinite(out).all()
    assert disc(h).shape == (3,)
    h2 = h.clone()
    h2[1, 5:] = 1e3  # padded positions do not matter
    assert torch.allclose(disc(h2, mask)[1], out[1])


def test_losses_are_finite_and_weighted_by_the_config():
    torch.manual_seed(9)
    d_real, d_fake = torch.randn(4), torch.randn(4, requires_grad=True)
    d_loss, g_loss = adversarial_losses(d_real, d_fake)
    expected_g = torch.nn.functional.softplus(-d_fake).mean()  # -log sigmoid(D(fake)): non-saturating
    assert torch.allclose(g_loss, expected_g)
    assert torch.isfinite(d_loss) and d_loss > 0

    logits, labels = torch.randn(2, 7, 13), torch.randint(0, 13, (2, 7))
    labels[0, :4] = -100
    t = task_loss(logits, labels)
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 13), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(t, ref)
    assert task_loss(logits, torch.full((2, 7), -100)).item() == 0.0

    uniform, onehot = torch.full((2, 5, 4), 0.25), torch.eye(4)[torch.randint(0, 4, (2, 5))]
    assert math.isclose(merge_sparsity_loss(uniform).item(), 1.0, rel_tol=1e-6)
    assert merge_sparsity_loss(onehot).item() < 1e-6

    masks = [torch.ones(2, 10), torch.cat([torch.ones(2, 5), torch.zeros(2, 5)], -1)]
    assert math.isclose(token_budget_loss(masks, [1.0, 0.5]).item(), 0.0, abs_tol=1e-12)
    assert math.isclose(token_budget_loss(masks, [0.8, 0.5]).item(), (0.2**2) / 2, rel_tol=1e-5)

    cfg = LossConfig(adv_loss_weight=1.0, task_loss_weight=25.0, merge_sparsity_weight=1e-4, budget_loss_weight=2.0)
    parts = {"adv": torch.tensor(0.5), "task": torch.tensor(2.0), "merge_sparsity": torch.tensor(3.0),
             "budget": torch.tensor(0.1)}
    total = total_generator_loss(parts, cfg)
    assert math.isclose(total.item(), 0.5 + 50.0 + 3e-4 + 0.2, rel_tol=1e-6)
    assert math.isclose(total_generator_loss({"task": torch.tensor(2.0)}, cfg).item(), 50.0)
    with pytest.raises(KeyError):
        total_generator_loss({"nope": torch.tensor(1.0)}, cfg)


def test_paired_feature_matching_is_the_relative_squared_distance_at_the_answer_rows() -> None:
    from pruning.llava.modules import paired_feature_matching

    real = torch.tensor([[[3.0, 4.0], [1.0, 0.0]], [[0.0, 2.0], [9.0, 9.0]]])  # [B=2, T=2, D=2]
    fake = torch.tensor([[[3.0, 5.0], [7.0, 7.0]], [[1.0, 2.0], [0.0, 0.0]]], requires_grad=True)
    rows = torch.tensor([[True, False], [True, False]])
    loss = paired_feature_matching(real, fake, rows)
    assert math.isclose(loss.item(), (1.0 + 1.0) / (25.0 + 4.0), rel_tol=1e-6)  # rows (0,0) and (1,0) only
    loss.backward()
    assert fake.grad[:, 1].abs().sum() == 0  # no gradient through the rows not compared
    assert paired_feature_matching(real, real.clone(), rows).item() == 0.0
    assert paired_feature_matching(real, fake, torch.zeros(2, 2, dtype=torch.bool)).item() == 0.0
    cfg = LossConfig(feature_match_weight=4.0)
    assert math.isclose(total_generator_loss({"feature_match": torch.tensor(0.5)}, cfg).item(), 2.0)


def test_answer_attention_teacher_averages_layers_heads_and_answer_rows_over_the_image_tokens() -> None:
    from pruning.llava.modules import answer_attention_teacher

    gen = torch.Generator().manual_seed(0)
    b, h, t = 2, 3, 6
    attentions = [torch.rand(b, h, t, t, generator=gen).softmax(-1) for _ in range(2)]
    rows = torch.tensor([[0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 1, 0]], dtype=torch.bool)
    image = torch.tensor([[0, 1, 1, 0, 0, 0], [1, 0, 1, 0, 0, 0]], dtype=torch.bool)
    teacher = answer_attention_teacher(attentions, rows, image)
    for i in range(b):  # a loop over the definition, one prompt at a time
        acc = torch.zeros(t)
        for a in attentions:
            for head in range(h):
                acc += a[i, head][rows[i]].mean(0)
        expected = acc[image[i]] / acc[image[i]].sum()
        torch.testing.assert_close(teacher[i], expected)
    torch.testing.assert_close(teacher.sum(-1), torch.ones(b))


def test_merged_teacher_keeps_the_total_mass_at_the_centres() -> None:
    from pruning.llava.modules import merged_teacher

    teacher = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    assignment = torch.tensor([[[1.0, 0.0], [0.5, 0.5], [0.0, 1.0], [0.0, 1.0]]])  # [B, N=4, M=2]
    out = merged_teacher(teacher, assignment, torch.tensor([[1, 3]]))
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.2, 0.0, 0.8]]))


def test_attention_distillation_is_the_kl_to_the_renormalised_teacher_over_the_alive_tokens() -> None:
    from pruning.llava.modules import attention_distillation

    teacher = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    alive = torch.tensor([[True, False, True, True]])
    p = torch.tensor([0.1, 0.3, 0.4]) / 0.8
    exact = torch.zeros(1, 4)
    exact[0, [0, 2, 3]] = p.log()
    exact[0, 1] = 123.0  # a dead token's score does not matter
    assert attention_distillation(exact, teacher, alive).abs().item() < 1e-6
    logits = torch.zeros(1, 4, requires_grad=True)
    loss = attention_distillation(logits, teacher, alive)
    q = torch.full((3,), 1 / 3)
    assert math.isclose(loss.item(), float((p * (p / q).log()).sum()), rel_tol=1e-5)
    loss.backward()
    assert logits.grad[0, 1] == 0  # no gradient to a dead token
    assert logits.grad[0, 3] < 0 < logits.grad[0, 0]  # raise the most attended, lower the least
    cfg = LossConfig(attention_distill_weight=3.0)
    assert math.isclose(total_generator_loss({"attention_distill": torch.tensor(0.5)}, cfg).item(), 1.5)


# ----------------------------------------------------------------------------- schedules, layers


@pytest.mark.parametrize("rate", [0.05, 0.5, 1.0, 50.0])
@pytest.mark.parametrize("total", [2, 7, 1000])
def test_temperature_schedule_hits_its_endpoints_and_is_monotone(rate, total):
    cfg = TemperatureConfig(temperature=1.0, temperature_min=0.1, temperature_anneal_rate=rate)
    taus = [temperature_at(s, total, cfg) for s in range(total)]
    assert taus[0] == 1.0 and taus[-1] == 0.1
    assert all(b <= a for a, b in zip(taus, taus[1:]))
    assert all(0.1 <= t <= 1.0 for t in taus)
    assert temperature_at(total + 5, total, cfg) == 0.1 and temperature_at(-1, total, cfg) == 1.0


def test_scale_pruning_layers_maps_to_a_strictly_increasing_in_range_result():
    assert scale_pruning_layers([10, 20, 31], 32, 8) == [2, 4, 7]
    assert scale_pruning_layers([10, 20, 31], 32) == [10, 20, 31]
    for n in range(3, 33):
        out = scale_pruning_layers([10, 20, 31], 32, n)
        assert all(0 <= layer < n for layer in out) and all(b > a for a, b in zip(out, out[1:]))
        assert out[-1] == n - 1  # the last layer maps to the last layer
    with pytest.raises(ValueError):
        scale_pruning_layers([10, 20, 31], 32, 2)


# ----------------------------------------------------------------------------- config


def test_config_defaults_load_from_the_yaml_file():
    cfg = load_config(CONFIG_PATH)
    assert cfg == VisionTokenPruningConfig()
    m, p, a, loss, o = cfg.merger, cfg.pruner, cfg.anneal, cfg.loss, cfg.optim
    assert (m.merge_ratio, m.target_merge_tokens) == (0.5, 288)
    assert (p.pruning_layers, p.pruner_d_internal, p.pruner_num_heads) == ((10, 20, 31), 512, 4)
    assert (a.temperature, a.temperature_min, a.temperature_anneal_rate) == (1.0, 0.1, 0.5)
    assert (loss.adv_loss_weight, loss.task_loss_weight, loss.merge_sparsity_weight) == (1.0, 25.0, 1e-4)
    assert (o.lr_merger, o.lr_pruners, o.lr_discriminator) == (2e-5, 2e-5, 5e-4)
    assert vision_token_trajectory(576, cfg) == [576, 288, 202, 152, 102]  # + ~100 text: 676, 388, 302, 252, 202


def test_config_accepts_flat_keys_and_numeric_strings(tmp_path):
    path = tmp_path / "flat.yaml"
    path.write_text("merger_type: question_aware\nlr_merger: 3e-5\npruning_layers: [1, 2]\nkeep_ratios: [0.5, 0.5]\n")
    cfg = load_config(path)
    assert cfg.merger.merger_type == "question_aware" and cfg.optim.lr_merger == 3e-5
    assert cfg.pruner.pruning_layers == (1, 2) and cfg.pruner.keep_ratios == (0.5, 0.5)
    assert config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "text,key",
    [
        ("merger:\n  merge_ratoi: 0.5\n", "merge_ratoi"),
        ("bogus_key: 1\n", "bogus_key"),
        ("merger:\n  lr_merger: 1.0e-5\n", "lr_merger"),
    ],
)
def test_config_unknown_key_raises_config_error_naming_the_key(tmp_path, text, key):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert "\n" not in msg and repr(key) in msg and "allowed" in msg


@pytest.mark.parametrize(
    "text,key,value",
    [
        ("merger:\n  merge_ratio: 1.5\n", "merge_ratio", "1.5"),
        ("target_merge_tokens: 0\n", "target_merge_tokens", "0"),
        ("anneal:\n  temperature_min: 2.0\n", "temperature_min", "2.0"),
        ("pruner:\n  pruner_num_heads: 3\n", "pruner_num_heads", "3"),
        ("merger_type: fancy\n", "merger_type", "fancy"),
        ("lr_discriminator: -1.0\n", "lr_discriminator", "-1.0"),
        ("pruner:\n  pruner_prior_scale: -0.5\n", "pruner_prior_scale", "-0.5"),
        ("merger_prior_scale: -1\n", "merger_prior_scale", "-1"),
    ],
)
def test_config_out_of_range_value_raises_one_line_config_error(tmp_path, text, key, value):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    # says what is allowed: "<key>=<value> is invalid; allowed: ..." or, for integers (pruning.common.check_int, one
    # wording for every system), "<key> must be an integer >= 1, got <value>"
    assert "\n" not in msg and key in msg and value in msg and ("allowed" in msg or "must be an integer" in msg)


def test_config_missing_file_raises_a_one_line_error(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_config(tmp_path / "absent.yaml")
    assert "\n" not in str(info.value) and "absent.yaml" in str(info.value)


def test_config_dataclasses_validate_on_direct_construction():
    with pytest.raises(ConfigError, match="merge_ratio"):
        MergerConfig(merge_ratio=0.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        MergerConfig().merge_ratio = 0.3  # type: ignore[misc]
