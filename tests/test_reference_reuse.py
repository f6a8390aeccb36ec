"""Reference-token reuse in the forked Qwen-Image transformer.

A tiny transformer with random weights stands in for the real one; the properties proven:
refresh steps are the baseline bit for bit; a reuse step's denoise output equals an
independent plain-torch computation from the block weights and the cached states; `full` and
`kv` do no query/MLP work for the reference tokens; the cache has the stated size; CFG
branches (diffusers' cache_context names) keep separate caches; schedules are validated;
the hook attaches and detaches cleanly. Where it matters, the properties are proven for one reference image and
for two of different sizes (the Plus pipeline's layout: every reference's tokens after the noisy latents).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import QwenImageTransformer2DModel as UpstreamTransformer

from models.qwenimage.transformer_qwenimage import QwenImageTransformer2DModel as ForkTransformer
from diffusers.hooks.hooks import HookRegistry

from pruning.edit.reference_reuse import (
    HOOK_NAME,
    ReferenceReuseHook,
    ReferenceTokenReuse,
    reference_reuse,
    resolve_refresh_steps,
)

BATCH, TEXT_LEN = 2, 7
DENOISE_HW, REFERENCE_HW = (4, 4), (6, 4)  # reference image of another size than the output
L1, L2 = DENOISE_HW[0] * DENOISE_HW[1], REFERENCE_HW[0] * REFERENCE_HW[1]
TWO_REFERENCES_HW = (REFERENCE_HW, (2, 4))  # Qwen-Image-Edit-2509 / 2511 with two reference images
REFERENCE_LAYOUTS = pytest.mark.parametrize("references", [(REFERENCE_HW,), TWO_REFERENCES_HW], ids=["1ref", "2refs"])
CONFIG = dict(
    patch_size=2, in_channels=16, out_channels=4, num_layers=3, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=24, axes_dims_rope=(4, 6, 6),
)


def build_pair(zero_cond_t: bool):
    torch.manual_seed(0)
    upstream = UpstreamTransformer(**CONFIG, zero_cond_t=zero_cond_t).eval()
    fork = ForkTransformer(**CONFIG, zero_cond_t=zero_cond_t).eval()
    fork.load_state_dict(upstream.state_dict())
    return upstream, fork


def reference_len(references=(REFERENCE_HW,)) -> int:
    return sum(h * w for h, w in references)


def make_inputs(seed: int, timestep: float, text_seed: int = 100, references=(REFERENCE_HW,)):
    g = torch.Generator().manual_seed(seed)
    reference = torch.randn(BATCH, reference_len(references), CONFIG["in_channels"],
                            generator=torch.Generator().manual_seed(7))
    noisy = torch.randn(BATCH, L1, CONFIG["in_channels"], generator=g)
    gt = torch.Generator().manual_seed(text_seed)
    text = torch.randn(BATCH, TEXT_LEN, CONFIG["joint_attention_dim"], generator=gt)
    mask = torch.ones(BATCH, TEXT_LEN, dtype=torch.long)
    mask[1, 5:] = 0  # second prompt is shorter: padded keys must stay masked
    return dict(
        hidden_states=torch.cat([noisy, reference], dim=1),
        encoder_hidden_states=text,
        encoder_hidden_states_mask=mask,
        timestep=torch.full((BATCH,), timestep),
        img_shapes=[[(1, *DENOISE_HW), *[(1, *hw) for hw in references]]] * BATCH,
        return_dict=False,
    )


_HOOKS: dict[int, ReferenceReuseHook] = {}


@torch.no_grad()
def call(model, inputs, controller=None, branch="cond"):
    """One transformer call as a pipeline makes it: inside ``cache_context(branch)``, with ``controller``'s hook attached.

    Tests interleave several edits on one model, so the hook of each edit is kept (with its state) and swapped in.
    """
    if controller is None:
        return model(**inputs)[0]
    registry = HookRegistry.check_if_exists_or_initialize(model)
    current = registry.get_hook(HOOK_NAME)
    if current is None or current.reuse is not controller:
        if current is not None:
            registry.remove_hook(HOOK_NAME, recurse=False)
        registry.register_hook(_HOOKS.setdefault(id(controller), ReferenceReuseHook(controller)), HOOK_NAME)
    with model.cache_context(branch):
        return model(**inputs)[0]


# ------------------------------------------------------------------------ schedule


def test_default_schedule_refreshes_on_odd_steps_and_once_means_step_one():
    assert resolve_refresh_steps(None, 4) == (1, 3)
    assert resolve_refresh_steps("alternate", 5) == (1, 3, 5)
    assert resolve_refresh_steps("once", 4) == (1,)
    assert resolve_refresh_steps("all", 3) == (1, 2, 3)
    assert resolve_refresh_steps("1,2", 4) == (1, 2)


@pytest.mark.parametrize("bad, message", [([0, 1], "1..4"), ([1, 5], "1..4"), ([2, 3], "must include step 1"), ("x", "comma")])
def test_schedule_naming_a_missing_step_is_rejected(bad, message):
    with pytest.raises(ValueError, match=message):
        resolve_refresh_steps(bad, 4)


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="unknown pruning mode"):
        ReferenceTokenReuse("fast", num_steps=4)


# ------------------------------------------------------------------------ refresh = baseline


@REFERENCE_LAYOUTS
@pytest.mark.parametrize("zero_cond_t", [False, True])
@pytest.mark.parametrize("mode", ["none", "mlp", "full", "kv"])
def test_refresh_step_equals_baseline_transformer_call_bit_exactly(mode, zero_cond_t, references):
    upstream, fork = build_pair(zero_cond_t)
    controller = ReferenceTokenReuse(mode, num_steps=4)
    for step, t in enumerate((0.9, 0.7, 0.5), start=1):  # refresh, reuse, refresh
        inputs = make_inputs(seed=step, timestep=t, references=references)
        out = call(fork, inputs, controller)
        if step in controller.refresh_steps:
            assert torch.equal(out, call(upstream, inputs)), f"step {step}"


@pytest.mark.parametrize("mode", ["mlp", "full", "kv"])
def test_reuse_step_stays_close_to_the_baseline_and_full_kv_return_denoise_rows(mode):
    upstream, fork = build_pair(False)
    controller = ReferenceTokenReuse(mode, num_steps=4)
    call(fork, make_inputs(1, 0.9), controller)
    inputs = make_inputs(2, 0.7)
    out = call(fork, inputs, controller)
    expected_rows = L1 + L2 if mode == "mlp" else L1
    assert out.shape == (BATCH, expected_rows, 4 * CONFIG["out_channels"])
    baseline = call(upstream, inputs)[:, :L1]
    assert not torch.equal(out[:, :L1], baseline)  # reuse really changed the computation
    assert (out[:, :L1] - baseline).abs().max() < 0.05 * baseline.abs().max()


# ------------------------------------------------------------------------ independent reference


def _linear(x, layer):
    return x @ layer.weight.T + layer.bias


def _rms(x, norm):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight


def _rope(x, freqs):
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs[None, :, None, :]).flatten(3)


def _modulation(params, index, batch):
    """params [B or 2B, 3D] -> per-row shift, scale, gate [B, L, D] (index selects the t=0 half)."""
    shift, scale, gate = params.chunk(3, dim=-1)
    if index is None:
        return shift[:, None], scale[:, None], gate[:, None]
    pick = lambda p: torch.where(index[..., None] == 0, p[:batch, None], p[batch:, None])  # noqa: E731
    return pick(shift), pick(scale), pick(gate)


def _heads(x, attn):
    return x.unflatten(-1, (attn.heads, -1))


def independent_block_denoise_output(block, inputs, mode, cache, block_index, img_freqs, txt_freqs, ref_index):
    """Plain-torch reuse-step output of one block for the L1 denoise rows (the test's own reference)."""
    attn, d = block.attn, block.dim
    hs, txt, temb = inputs["hidden_states"], inputs["encoder_hidden_states"], inputs["temb"]
    mask, index = inputs["encoder_hidden_states_mask"], inputs["modulate_index"]
    batch = hs.shape[0]
    img_params = _linear(F.silu(temb), block.img_mod[1])
    txt_params = _linear(F.silu(temb[:batch] if block.zero_cond_t else temb), block.txt_mod[1])
    img_mod1, img_mod2 = img_params.chunk(2, dim=-1)
    txt_mod1 = txt_params.chunk(2, dim=-1)[0]
    ln = lambda x: F.layer_norm(x, (d,), eps=1e-6)  # noqa: E731

    den = hs[:, :L1]
    den_index = index[:, :L1] if index is not None else None
    shift, scale, gate1 = _modulation(img_mod1, den_index, batch)
    den_mod = ln(den) * (1 + scale) + shift
    tshift, tscale, tgate1 = _modulation(txt_mod1, None, batch)
    txt_mod = ln(txt) * (1 + tscale) + tshift

    q = torch.cat([_rope(_rms(_heads(_linear(txt_mod, attn.add_q_proj), attn), attn.norm_added_q), txt_freqs),
                   _rope(_rms(_heads(_linear(den_mod, attn.to_q), attn), attn.norm_q), img_freqs[:L1])], dim=1)
    k_den = _rope(_rms(_heads(_linear(den_mod, attn.to_k), attn), attn.norm_k), img_freqs[:L1])
    v_den = _heads(_linear(den_mod, attn.to_v), attn)
    if mode == "kv":
        k_ref, v_ref = cache.keys[block_index], cache.values[block_index]
    else:  # full: from the cached block input under this step's modulation
        rshift, rscale, _ = _modulation(img_mod1, ref_index, batch)
        ref_mod = ln(cache.states[block_index]) * (1 + rscale) + rshift
        k_ref = _rope(_rms(_heads(_linear(ref_mod, attn.to_k), attn), attn.norm_k), img_freqs[L1:])
        v_ref = _heads(_linear(ref_mod, attn.to_v), attn)
    k = torch.cat([_rope(_rms(_heads(_linear(txt_mod, attn.add_k_proj), attn), attn.norm_added_k), txt_freqs), k_den, k_ref], 1)
    v = torch.cat([_heads(_linear(txt_mod, attn.add_v_proj), attn), v_den, v_ref], 1)

    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    key_ok = torch.cat([mask.bool(), torch.ones(batch, k.shape[1] - txt.shape[1], dtype=torch.bool)], dim=1)
    scores = scores.masked_fill(~key_ok[:, None, None, :], float("-inf"))
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).flatten(2)
    den = den + gate1 * _linear(out[:, txt.shape[1]:], attn.to_out[0])

    shift2, scale2, gate2 = _modulation(img_mod2, den_index, batch)
    mlp_in = ln(den) * (1 + scale2) + shift2
    mlp = _linear(F.gelu(_linear(mlp_in, block.img_mlp.net[0].proj), approximate="tanh"), block.img_mlp.net[2])
    return den + gate2 * mlp


@REFERENCE_LAYOUTS
@pytest.mark.parametrize("zero_cond_t", [False, True])
@pytest.mark.parametrize("mode", ["full", "kv"])
def test_reuse_step_denoise_output_matches_independent_reference(mode, zero_cond_t, references):
    _, fork = build_pair(zero_cond_t)
    controller = ReferenceTokenReuse(mode, num_steps=4)
    call(fork, make_inputs(1, 0.9, references=references), controller)
    cache = controller.branches["cond"].cache

    captured = {}

    def capture(index):
        def pre(module, args, kwargs):
            captured.setdefault(index, {})["in"] = kwargs

        def post(module, args, kwargs, output):
            captured[index]["out"] = output[1]

        return pre, post

    handles = []
    for index, block in enumerate(fork.transformer_blocks):
        pre, post = capture(index)
        handles += [block.register_forward_pre_hook(pre, with_kwargs=True), block.register_forward_hook(post, with_kwargs=True)]
    inputs = make_inputs(2, 0.7, references=references)
    call(fork, inputs, controller)
    for handle in handles:
        handle.remove()

    img_freqs, txt_freqs = fork.pos_embed(inputs["img_shapes"], max_txt_seq_len=TEXT_LEN, device=torch.device("cpu"))
    ref_index = torch.ones(BATCH, reference_len(references), dtype=torch.int) if zero_cond_t else None
    with torch.no_grad():
        for index, block in enumerate(fork.transformer_blocks):
            block_in = captured[index]["in"]  # hidden_states [B, L1, D]: the stream holds denoise rows only
            assert block_in["hidden_states"].shape[1] == L1
            expected = independent_block_denoise_output(
                block, block_in, mode, cache, index, img_freqs, txt_freqs, ref_index
            )
            torch.testing.assert_close(captured[index]["out"], expected, rtol=1e-5, atol=1e-5)


def test_mlp_reuse_takes_reference_rows_from_cache_and_runs_mlp_on_denoise_rows_only():
    _, fork = build_pair(False)
    controller = ReferenceTokenReuse("mlp", num_steps=4)
    refresh_outputs = {}
    handles = [
        block.register_forward_hook(lambda m, a, o, i=i: refresh_outputs.__setitem__(i, o[1].clone()))
        for i, block in enumerate(fork.transformer_blocks)
    ]
    call(fork, make_inputs(1, 0.9), controller)
    for h in handles:
        h.remove()
    reuse_outputs = {}
    handles = [
        block.register_forward_hook(lambda m, a, o, i=i: reuse_outputs.__setitem__(i, o[1].clone()))
        for i, block in enumerate(fork.transformer_blocks)
    ]
    call(fork, make_inputs(2, 0.7), controller)
    for h in handles:
        h.remove()
    for i in refresh_outputs:
        assert torch.equal(reuse_outputs[i][:, L1:], refresh_outputs[i][:, L1:])
        assert not torch.equal(reuse_outputs[i][:, :L1], refresh_outputs[i][:, :L1])


# ------------------------------------------------------------------------ work skipped, memory used


def count_rows(model, names):
    rows = {name: 0 for name in names}
    handles = []
    for block in model.transformer_blocks:
        modules = {"to_q": block.attn.to_q, "to_k": block.attn.to_k, "to_v": block.attn.to_v,
                   "to_out": block.attn.to_out[0], "img_mlp": block.img_mlp.net[0].proj}
        for name in names:
            handles.append(modules[name].register_forward_hook(
                lambda m, args, out, name=name: rows.__setitem__(name, rows[name] + args[0].shape[:-1].numel())))
    return rows, handles


@REFERENCE_LAYOUTS
@pytest.mark.parametrize("mode", ["full", "kv", "mlp"])
def test_reuse_step_linear_rows_show_no_query_or_mlp_work_for_reference_tokens(mode, references):
    _, fork = build_pair(False)
    controller = ReferenceTokenReuse(mode, num_steps=4)
    call(fork, make_inputs(1, 0.9, references=references), controller)
    rows, handles = count_rows(fork, ["to_q", "to_k", "to_v", "to_out", "img_mlp"])
    call(fork, make_inputs(2, 0.7, references=references), controller)
    for h in handles:
        h.remove()
    blocks, l2 = CONFIG["num_layers"], reference_len(references)
    ref_kv_rows = 0 if mode == "kv" else l2  # `full` projects K/V from the cached block input; `mlp` runs attention
    query_rows = L1 + l2 if mode == "mlp" else L1
    assert rows["to_q"] == blocks * BATCH * query_rows
    assert rows["to_out"] == blocks * BATCH * query_rows
    assert rows["img_mlp"] == blocks * BATCH * L1
    assert rows["to_k"] == rows["to_v"] == blocks * BATCH * (L1 + ref_kv_rows)


@REFERENCE_LAYOUTS
@pytest.mark.parametrize("mode, factor", [("mlp", 1), ("full", 1), ("kv", 2)])
def test_cache_bytes_equal_blocks_times_reference_tokens_times_width(mode, factor, references):
    _, fork = build_pair(False)
    controller = ReferenceTokenReuse(mode, num_steps=4)
    call(fork, make_inputs(1, 0.9, references=references), controller)
    dim = CONFIG["num_attention_heads"] * CONFIG["attention_head_dim"]
    assert controller.cache_bytes() == controller.peak_cache_bytes
    assert controller.cache_bytes() == CONFIG["num_layers"] * BATCH * reference_len(references) * dim * 4 * factor
    controller.clear()
    assert controller.cache_bytes() == 0


def test_cfg_branches_keep_separate_caches():
    """Two calls per step (cond, uncond) with different prompts: each reuse uses its own branch's cache.

    The branch is the diffusers cache context the pipeline opens around each call, not a timestep comparison.
    """
    _, fork = build_pair(False)
    both = ReferenceTokenReuse("full", num_steps=2, refresh_steps="once")
    cond_only = ReferenceTokenReuse("full", num_steps=2, refresh_steps="once")
    uncond_only = ReferenceTokenReuse("full", num_steps=2, refresh_steps="once")
    outs = {}
    for step, t in enumerate((0.9, 0.6), start=1):
        cond, uncond = make_inputs(step, t, text_seed=1), make_inputs(step, t, text_seed=2)
        outs[("both", "cond", step)] = call(fork, cond, both)
        outs[("both", "uncond", step)] = call(fork, uncond, both, branch="uncond")
        outs[("single", "cond", step)] = call(fork, cond, cond_only)
        outs[("single", "uncond", step)] = call(fork, uncond, uncond_only, branch="uncond")
    assert len(both.branches) == 2
    assert [(r.step, r.branch, r.reuse) for r in both.history] == [
        (1, "cond", False), (1, "uncond", False), (2, "cond", True), (2, "uncond", True)]
    for branch in ("cond", "uncond"):
        assert torch.equal(outs[("both", branch, 2)], outs[("single", branch, 2)])


def test_mlp_and_full_give_the_same_denoise_output_full_just_skips_the_work():
    """In `mlp` the reference rows entering block b are the cached output of block b-1, i.e. exactly the
    cached block input that `full` projects its K/V from: the denoise rows see the same keys/values."""
    _, fork = build_pair(True)
    outputs = {}
    for mode in ("mlp", "full"):
        controller = ReferenceTokenReuse(mode, num_steps=4)
        call(fork, make_inputs(1, 0.9), controller)
        outputs[mode] = call(fork, make_inputs(2, 0.7), controller)[:, :L1]
    torch.testing.assert_close(outputs["mlp"], outputs["full"], rtol=1e-5, atol=1e-6)


def test_kv_equals_full_under_zero_cond_t_where_reference_modulation_never_changes():
    """Under zero_cond_t the reference tokens are modulated with t=0 on every step, so the K/V that `full`
    recomputes from the cached block input are the K/V that `kv` cached: the two modes agree."""
    _, fork = build_pair(True)
    outputs = {}
    for mode in ("full", "kv"):
        controller = ReferenceTokenReuse(mode, num_steps=4)
        call(fork, make_inputs(1, 0.9), controller)
        outputs[mode] = call(fork, make_inputs(2, 0.7), controller)
    torch.testing.assert_close(outputs["kv"], outputs["full"], rtol=1e-5, atol=1e-6)
    _, plain = build_pair(False)  # without zero_cond_t the modulation moves with t and the modes differ
    for mode in ("full", "kv"):
        controller = ReferenceTokenReuse(mode, num_steps=4)
        call(plain, make_inputs(1, 0.9), controller)
        outputs[mode] = call(plain, make_inputs(2, 0.7), controller)
    assert not torch.allclose(outputs["kv"], outputs["full"], rtol=1e-4, atol=1e-5)


def test_reuse_attaches_as_a_hook_and_detaches_to_the_upstream_forward():
    """``with reference_reuse(...)`` attaches, always detaches (also on an error), and frees the caches."""
    upstream, fork = build_pair(False)
    inputs = make_inputs(1, 0.9)
    with reference_reuse(fork, "kv", num_steps=2, refresh_steps="once") as reuse:
        with fork.cache_context("cond"):
            fork(**inputs)
        assert reuse.cache_bytes() > 0
    assert HookRegistry.check_if_exists_or_initialize(fork).get_hook(HOOK_NAME) is None and reuse.cache_bytes() == 0
    with pytest.raises(RuntimeError, match="boom"), reference_reuse(fork, "kv", num_steps=2):
        raise RuntimeError("boom")
    assert HookRegistry.check_if_exists_or_initialize(fork).get_hook(HOOK_NAME) is None
    assert torch.equal(call(fork, inputs), call(upstream, inputs))  # detached: the upstream forward


def test_a_call_outside_a_cache_context_is_one_clear_error():
    _, fork = build_pair(False)
    with reference_reuse(fork, "full", num_steps=2), pytest.raises(ValueError, match="cache_context"):
        fork(**make_inputs(1, 0.9))
