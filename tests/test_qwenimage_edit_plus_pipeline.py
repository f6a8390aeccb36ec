"""``TokenPruningQwenImageEditPlusPipeline`` (Qwen-Image-Edit-2509 / 2511) on the embedded tiny Plus pipeline.

Mode ``none`` is the stock ``QwenImageEditPlusPipeline`` bit for bit with one and with two reference images;
every reference image's tokens are reference tokens (cached on refresh steps, reused on the others), also for
references of different sizes, under true CFG (one cache per branch), for a batch of two images, and under
``zero_cond_t`` (Edit-2511); the cache is freed when the call ends, also on an exception; ``edit_pipeline_class``
picks the pipeline from ``model_index.json``; a LoRA in the published Lightning files' key layout loads into the fork.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import QwenImageEditPlusPipeline

from data.media import make_sample_image
from models.tiny.qwenimage_edit import tiny_qwenimage_edit_dir, tiny_qwenimage_edit_plus_dir
from pipelines.qwenimage_edit import (
    TokenPruningQwenImageEditPipeline,
    TokenPruningQwenImageEditPlusPipeline,
    edit_pipeline_class,
)
from pipelines.qwenimage_edit_limits import reference_dims
from tests.test_qwenimage_edit_pipeline import assert_cache_freed_when_a_step_fails

SIZE = 64  # output; the stock pipeline still VAE-encodes every reference at ~1 MP


def tokens_of(image) -> int:
    width, height = reference_dims(image.size)
    return (width // 16) * (height // 16)


@pytest.fixture(scope="module")
def pipe():
    pipe = TokenPruningQwenImageEditPlusPipeline.from_pretrained(tiny_qwenimage_edit_plus_dir())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def images():
    # two references of different sizes (and aspect ratios): 1248x832 and 1024x1024 px for the VAE
    return [make_sample_image(size=(192, 128), seed=1), make_sample_image(size=(96, 96), seed=2)]


def edit(pipe, image, **kwargs):
    defaults = dict(prompt="put the circle from picture 1 into picture 2", num_inference_steps=2, height=SIZE,
                    width=SIZE, true_cfg_scale=1.0, output_type="np", generator=torch.Generator().manual_seed(0))
    return pipe(image=image, **{**defaults, **kwargs}).images


@pytest.mark.parametrize("count", [1, 2])
def test_mode_none_reproduces_the_stock_plus_pipeline_bit_exactly(pipe, images, count):
    stock = QwenImageEditPlusPipeline.from_pretrained(tiny_qwenimage_edit_plus_dir())
    stock.set_progress_bar_config(disable=True)
    expected = edit(stock, images[:count])
    assert np.array_equal(edit(pipe, images[:count], pruning_mode="none"), expected)
    # a schedule that refreshes on every step computes everything: also the stock output
    assert np.array_equal(edit(pipe, images[:count], pruning_mode="kv", refresh_steps="all"), expected)


@pytest.mark.parametrize("mode", ["mlp", "full", "kv"])
def test_every_reference_image_is_cached_and_reused(pipe, images, mode):
    baseline = edit(pipe, images, num_inference_steps=3)
    out = edit(pipe, images, num_inference_steps=3, pruning_mode=mode, refresh_steps="once")
    assert out.shape == baseline.shape and np.isfinite(out).all()
    assert not np.array_equal(out, baseline)
    stats = pipe.last_reuse_stats
    assert stats["refresh_steps"] == [1] and stats["reuse_steps"] == [2, 3]
    assert stats["tokens"]["denoise"] == (SIZE // 16) ** 2
    assert stats["tokens"]["reference"] == tokens_of(images[0]) + tokens_of(images[1])
    dim = pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim
    per_block = stats["tokens"]["reference"] * dim * 4 * (2 if mode == "kv" else 1)
    assert stats["cache_bytes"] == pipe.transformer.config.num_layers * per_block


def test_reuse_step_skips_every_reference_token_in_full_and_kv(pipe, images):
    """On a reuse step of ``full`` / ``kv`` the image stream holds the denoise rows only: no query or MLP row for
    any reference token of either image (``to_q`` counts rows)."""
    rows = []
    handle = pipe.transformer.transformer_blocks[0].attn.to_q.register_forward_hook(
        lambda module, args, out: rows.append(args[0].shape[1]))
    try:
        edit(pipe, images, num_inference_steps=2, pruning_mode="kv", refresh_steps="once")
    finally:
        handle.remove()
    denoise, reference = (SIZE // 16) ** 2, tokens_of(images[0]) + tokens_of(images[1])
    assert rows == [denoise + reference, denoise]


def test_true_cfg_and_two_images_per_prompt_keep_one_cache_per_branch(pipe, images):
    out = edit(pipe, images, pruning_mode="full", true_cfg_scale=2.0, negative_prompt="blurry",
               num_images_per_prompt=2, num_inference_steps=2)
    assert out.shape[0] == 2
    calls = [(c["step"], c["branch"], c["reuse"]) for c in pipe.last_reuse_stats["calls"]]
    assert calls == [(1, "cond", False), (1, "uncond", False), (2, "cond", True), (2, "uncond", True)]


def test_zero_cond_t_pipeline_edit_2511_matches_stock_and_reuses(images):
    pipe = TokenPruningQwenImageEditPlusPipeline.from_pretrained(tiny_qwenimage_edit_plus_dir(zero_cond_t=True))
    stock = QwenImageEditPlusPipeline.from_pretrained(tiny_qwenimage_edit_plus_dir(zero_cond_t=True))
    for p in (pipe, stock):
        p.set_progress_bar_config(disable=True)
    assert pipe.transformer.config.zero_cond_t
    assert np.array_equal(edit(pipe, images, pruning_mode="none"), edit(stock, images))
    # under zero_cond_t the reference tokens are modulated at t = 0 on every step: kv and full agree
    kv = edit(pipe, images, pruning_mode="kv", refresh_steps="once")
    full = edit(pipe, images, pruning_mode="full", refresh_steps="once")
    np.testing.assert_allclose(kv, full, atol=1e-4)


def test_cache_is_freed_when_the_call_ends_and_on_an_exception(pipe, images):
    assert_cache_freed_when_a_step_fails(pipe, lambda **kw: edit(pipe, images, pruning_mode="kv", **kw))


@pytest.mark.parametrize("image, message", [
    ([], "empty list"),
    (["not an image"], r"image\[0\] must be a reference image"),
    (np.zeros((8, 8, 3)), "image must be a reference image"),
])
def test_bad_reference_images_fail_before_any_work(pipe, image, message):
    with pytest.raises(ValueError, match=message):
        edit(pipe, image, pruning_mode="kv")


def test_model_index_picks_the_pipeline(tmp_path):
    assert edit_pipeline_class(tiny_qwenimage_edit_dir()) is TokenPruningQwenImageEditPipeline
    assert edit_pipeline_class(tiny_qwenimage_edit_plus_dir()) is TokenPruningQwenImageEditPlusPipeline
    with pytest.raises(ValueError, match="load it with TokenPruningQwenImageEditPlusPipeline"):
        TokenPruningQwenImageEditPipeline.from_pretrained(tiny_qwenimage_edit_plus_dir())
    (tmp_path / "model_index.json").write_text('{"_class_name": "FluxPipeline", "_diffusers_version": "0.42.1"}')
    with pytest.raises(ValueError, match="'FluxPipeline' pipeline"):
        edit_pipeline_class(tmp_path)


def lightning_state_dict(transformer, layout: str, rank: int = 4, alpha: float = 0.5) -> dict[str, torch.Tensor]:
    """A LoRA for ``transformer`` with the key layout of lightx2v's Lightning files: per linear layer of every block
    ``<module>.lora_down.weight`` [rank, in], ``<module>.lora_up.weight`` [out, rank] and ``<module>.alpha`` (the
    files' rank is 64 with alpha 8, as reported for Qwen-Image-2512-Lightning in sglang issue #17086);
    ``layout="diffusion_model"`` puts the ComfyUI prefix ``diffusion_model.`` in front and names the pair
    ``lora_A`` / ``lora_B``, the other layout those files are distributed in."""
    generator = torch.Generator().manual_seed(0)
    names = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
             "attn.add_v_proj", "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj",
             "txt_mlp.net.2", "img_mod.1", "txt_mod.1"]
    down, up = ("lora_A", "lora_B") if layout == "diffusion_model" else ("lora_down", "lora_up")
    prefix = "diffusion_model." if layout == "diffusion_model" else ""
    state = {}
    for index, block in enumerate(transformer.transformer_blocks):
        for name in names:
            linear = block.get_submodule(name)
            key = f"{prefix}transformer_blocks.{index}.{name}"
            state[f"{key}.{down}.weight"] = torch.randn(rank, linear.in_features, generator=generator) * 0.1
            state[f"{key}.{up}.weight"] = torch.randn(linear.out_features, rank, generator=generator) * 0.1
            state[f"{key}.alpha"] = torch.tensor(alpha)
    return state


@pytest.mark.parametrize("layout", ["lightning", "diffusion_model"])
def test_lora_in_the_lightning_key_layout_loads_into_the_fork(tmp_path, images, layout):
    from safetensors.torch import save_file

    plain = TokenPruningQwenImageEditPlusPipeline.from_pretrained(tiny_qwenimage_edit_plus_dir())
    save_file(lightning_state_dict(plain.transformer, layout), tmp_path / "lightning.safetensors")
    lora = TokenPruningQwenImageEditPlusPipeline.from_pretrained(
        tiny_qwenimage_edit_plus_dir(), lora=str(tmp_path / "lightning.safetensors"))
    for p in (plain, lora):
        p.set_progress_bar_config(disable=True)
    blocks = len(lora.transformer.transformer_blocks)
    (adapter,) = lora.get_active_adapters()
    adapted = [n for n, _ in lora.transformer.named_modules() if n.endswith(f".lora_A.{adapter}")]
    assert len(adapted) == blocks * 14  # every linear layer named in the file got its adapter
    assert not np.array_equal(edit(lora, images), edit(plain, images))
    assert np.isfinite(edit(lora, images, pruning_mode="kv", refresh_steps="once")).all()
