"""``TokenPruningQwenImageEditPipeline`` on the embedded tiny Qwen-Image-Edit model.

Mode ``none`` is the stock pipeline bit for bit; every reuse mode runs end to end (batch 2,
true CFG, a reference image whose size differs from the output); the cache is freed when
the call ends, also on an exception; bad arguments fail before any work.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import QwenImageEditPipeline

from data.media import make_sample_image
from models.tiny.qwenimage_edit import tiny_qwenimage_edit_dir
from diffusers.hooks.hooks import HookRegistry

from pipelines.qwenimage_edit import TokenPruningQwenImageEditPipeline
from pruning.edit.reference_reuse import HOOK_NAME, reference_reuse

SIZE = 64  # output; the stock pipeline still encodes the reference at ~1 MP (4096 tokens)


@pytest.fixture(scope="module")
def pipe():
    pipe = TokenPruningQwenImageEditPipeline.from_pretrained(tiny_qwenimage_edit_dir())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def image():
    return make_sample_image(size=(192, 128), seed=1)  # aspect ratio differs from the square output


def edit(pipe, image, **kwargs):
    defaults = dict(prompt="make the circle blue", num_inference_steps=2, height=SIZE, width=SIZE,
                    true_cfg_scale=1.0, output_type="np", generator=torch.Generator().manual_seed(0))
    return pipe(image=image, **{**defaults, **kwargs}).images


def test_mode_none_reproduces_the_stock_pipeline_bit_exactly(pipe, image):
    stock = QwenImageEditPipeline.from_pretrained(tiny_qwenimage_edit_dir())
    stock.set_progress_bar_config(disable=True)
    expected = edit(stock, image)
    assert np.array_equal(edit(pipe, image, pruning_mode="none"), expected)
    # a schedule that refreshes on every step computes everything: also the stock output
    assert np.array_equal(edit(pipe, image, pruning_mode="kv", refresh_steps="all"), expected)


@pytest.mark.parametrize("mode", ["mlp", "full", "kv"])
def test_reuse_modes_run_end_to_end_and_report_stats(pipe, image, mode):
    baseline = edit(pipe, image, num_inference_steps=3)
    out = edit(pipe, image, num_inference_steps=3, pruning_mode=mode, refresh_steps="once")
    assert out.shape == baseline.shape and np.isfinite(out).all()
    assert not np.array_equal(out, baseline)
    stats = pipe.last_reuse_stats
    assert stats["refresh_steps"] == [1] and stats["reuse_steps"] == [2, 3]
    assert stats["tokens"]["denoise"] == (SIZE // 16) ** 2
    dim = pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim
    per_block = stats["tokens"]["reference"] * dim * 4 * (2 if mode == "kv" else 1)
    assert stats["cache_bytes"] == pipe.transformer.config.num_layers * per_block


def test_true_cfg_and_batch_two_keep_one_cache_per_branch(pipe, image):
    out = edit(pipe, image, pruning_mode="full", true_cfg_scale=2.0, negative_prompt="blurry",
               num_images_per_prompt=2, num_inference_steps=2)
    assert out.shape[0] == 2
    calls = [(c["step"], c["branch"], c["reuse"]) for c in pipe.last_reuse_stats["calls"]]
    assert calls == [(1, "cond", False), (1, "uncond", False), (2, "cond", True), (2, "uncond", True)]


def assert_cache_freed_when_a_step_fails(pipe, run) -> None:
    """``run(callback_on_step_end=...)`` edits with ``pipe``; the callback raises after the first step: the cache held
    bytes then, and after the exception it is empty and the hook detached."""
    seen = {}

    def fail_after_first_step(pipeline, step, timestep, callback_kwargs):
        controller = HookRegistry.check_if_exists_or_initialize(pipeline.transformer).get_hook(HOOK_NAME).reuse
        seen["controller"], seen["bytes"] = controller, controller.cache_bytes()
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        run(callback_on_step_end=fail_after_first_step)
    assert seen["bytes"] > 0
    assert seen["controller"].cache_bytes() == 0 and not seen["controller"].branches
    assert HookRegistry.check_if_exists_or_initialize(pipe.transformer).get_hook(HOOK_NAME) is None  # detached


def test_cache_is_freed_when_the_call_ends_and_on_an_exception(pipe, image):
    assert_cache_freed_when_a_step_fails(pipe, lambda **kw: edit(pipe, image, pruning_mode="mlp", **kw))


@pytest.mark.parametrize("kwargs, message", [
    (dict(pruning_mode="fast"), "unknown pruning mode"),
    (dict(pruning_mode="kv", refresh_steps=[1, 5]), "names step"),
    (dict(pruning_mode="kv", refresh_steps=[2]), "must include step 1"),
])
def test_bad_arguments_fail_before_any_work(pipe, image, kwargs, message):
    with pytest.raises(ValueError, match=message):
        edit(pipe, image, **kwargs)


def test_several_reference_images_give_a_clear_error(pipe, image):
    with pytest.raises(ValueError, match="one reference image"):
        edit(pipe, [image, image], pruning_mode="kv")


def test_lightning_lora_loads_into_the_fork_and_switches_the_scheduler(tmp_path, image):
    import math

    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    donor = TokenPruningQwenImageEditPipeline.from_pretrained(tiny_qwenimage_edit_dir())
    donor.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, param in donor.transformer.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(0)) * 0.5)
    QwenImageEditPipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(donor.transformer),
                                            weight_name="lightning.safetensors")

    plain = TokenPruningQwenImageEditPipeline.from_pretrained(tiny_qwenimage_edit_dir())
    lora = TokenPruningQwenImageEditPipeline.from_pretrained(tiny_qwenimage_edit_dir(), lora=str(tmp_path),
                                                             lora_weight_name="lightning.safetensors")
    assert type(lora.transformer) is type(plain.transformer)
    assert lora.scheduler.config.max_shift == lora.scheduler.config.base_shift == math.log(3)
    assert lora.scheduler.config.time_shift_type == "exponential"
    for p in (plain, lora):
        p.set_progress_bar_config(disable=True)
    assert not np.array_equal(edit(lora, image), edit(plain, image))
    # reuse still works on the LoRA-adapted transformer
    assert np.isfinite(edit(lora, image, pruning_mode="kv", refresh_steps="once")).all()


def test_the_stock_pipeline_with_the_hook_attached_equals_the_pruning_pipeline(pipe, image):
    """``with reference_reuse(transformer, ...)`` on a stock ``QwenImageEditPipeline`` (true CFG on): same image."""
    stock = QwenImageEditPipeline(**pipe.components)
    stock.set_progress_bar_config(disable=True)
    settings = dict(true_cfg_scale=2.0, negative_prompt="blurry")
    expected = edit(pipe, image, pruning_mode="full", refresh_steps="once", **settings)
    with reference_reuse(stock.transformer, "full", num_steps=2, refresh_steps="once") as reuse:
        got = edit(stock, image, **settings)
    assert np.array_equal(got, expected)
    assert [(r.step, r.branch, r.reuse) for r in reuse.history] == [
        (1, "cond", False), (1, "uncond", False), (2, "cond", True), (2, "uncond", True)]
