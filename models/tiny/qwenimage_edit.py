"""Embedded default Qwen-Image-Edit: the full diffusers pipeline at toy size, built in code.

``build_tiny_qwenimage_edit`` writes a directory with the layout of ``Qwen/Qwen-Image-Edit``
(``model_index.json`` plus ``transformer/ vae/ text_encoder/ tokenizer/ processor/ scheduler/``)
that ``diffusers.QwenImageEditPipeline.from_pretrained(dir)`` loads like the real one:

* ``transformer``: ``QwenImageTransformer2DModel`` (MMDiT, dual-stream blocks, 3D RoPE), 3 blocks,
  2 heads of 32 (inner width 64), RoPE axes (8, 12, 12) = head dim, ``in_channels`` = 4 x z_dim
  (2x2 latent patches), ``joint_attention_dim`` = the text encoder's width;
* ``vae``: ``AutoencoderKLQwenImage`` with the real z_dim 16, the real ``latents_mean`` /
  ``latents_std`` and the real three down-sampling levels (``vae_scale_factor`` 8), but only 4 base
  channels and one residual block per level: the stock pipeline VAE-encodes the reference image at
  ~1024x1024 px whatever the output size, and this keeps that to a fraction of a second on a CPU;
* ``text_encoder``: the tiny Qwen2.5-VL of ``models.tiny.qwen2_5_vl`` with its own seed;
* ``tokenizer`` / ``processor``: the tiny Qwen2 tokenizer and a real ``Qwen2VLProcessor``
  (the classes the stock pipeline names);
* ``scheduler``: ``FlowMatchEulerDiscreteScheduler`` with Qwen-Image's scheduler config
  (dynamic exponential shifting, ``shift_terminal`` 0.02).

``build_tiny_qwenimage_edit_plus`` writes the same components in the layout of
``Qwen/Qwen-Image-Edit-2509`` (``model_index.json`` naming ``QwenImageEditPlusPipeline``: one or several
reference images, each VAE-encoded at ~1 MP and shown to the text encoder at 384x384 px); ``zero_cond_t=True``
gives the Edit-2511 variant (reference tokens modulated at t = 0).

Weights come from ``seeded_init_`` with fixed seeds. The VAE's RMS norms keep their scale in a
parameter named ``gamma`` (not ``weight``), which ``seeded_init_`` draws around 0; it is moved to
1 + N(0, std) like every other norm weight, otherwise the VAE would output a constant.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImageEditPipeline,
    QwenImageEditPlusPipeline,
    QwenImageTransformer2DModel,
)
from transformers import Qwen2Tokenizer, Qwen2VLProcessor

from models.tiny import cached_model_dir, seeded_init_
from models.tiny.qwen2_5_vl import (
    build_image_processor,
    build_seeded_qwen2_5_vl,
    build_video_processor,
)
from models.tiny.qwen_tokenizer import QWEN2_VL_CHAT_TEMPLATE, build_qwen2_tokenizer

VERSION = 1
"""Bump whenever anything below changes the built directory."""

TEXT_ENCODER_SEED = 1
TRANSFORMER_SEED = 2
VAE_SEED = 3
TRANSFORMER_STD = 0.1
"""0.1 (not the initializer's 0.02) so the adaLN gates are not ~0 and the blocks change the velocity; the 2-step
edit's latents then have std ~1.3, and the decoded image ~0.17 around mid-grey."""
VAE_STD = 0.1

Z_DIM = 16
# The real AutoencoderKLQwenImage defaults (Qwen/Qwen-Image-Edit vae/config.json).
LATENTS_MEAN = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
]  # fmt: skip
LATENTS_STD = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
]  # fmt: skip

# scheduler/scheduler_config.json of Qwen/Qwen-Image and Qwen/Qwen-Image-Edit.
SCHEDULER_CONFIG = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}


def tiny_transformer_config(joint_attention_dim: int, zero_cond_t: bool = False) -> dict:
    """``QwenImageTransformer2DModel`` arguments at toy size (Qwen-Image: 60 blocks, 24 heads of 128)."""
    return dict(
        patch_size=2,
        in_channels=4 * Z_DIM,
        out_channels=Z_DIM,
        num_layers=3,
        attention_head_dim=32,
        num_attention_heads=2,
        joint_attention_dim=joint_attention_dim,
        guidance_embeds=False,
        axes_dims_rope=(8, 12, 12),
        zero_cond_t=zero_cond_t,
    )


def tiny_vae_config() -> dict:
    """``AutoencoderKLQwenImage`` arguments: real z_dim, latent statistics and 3 down-sampling levels, 4 base channels."""
    return dict(
        base_dim=4,
        z_dim=Z_DIM,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False, True, True],
        dropout=0.0,
        latents_mean=LATENTS_MEAN,
        latents_std=LATENTS_STD,
    )


@torch.no_grad()
def _recentre_vae_norm_scales_(vae: AutoencoderKLQwenImage) -> None:
    """Move the VAE's RMS-norm ``gamma`` scales from N(0, std), as ``seeded_init_`` draws any non-``weight``
    tensor, to the 1 + N(0, std) it gives every other norm weight."""
    for name, parameter in vae.named_parameters():
        if name.endswith("gamma"):
            parameter.add_(1.0)


def build_tiny_transformer(joint_attention_dim: int, zero_cond_t: bool = False) -> QwenImageTransformer2DModel:
    """The seeded upstream tiny transformer (``zero_cond_t`` as in Qwen-Image-Edit-2511 when True)."""
    transformer = QwenImageTransformer2DModel(**tiny_transformer_config(joint_attention_dim, zero_cond_t))
    seeded_init_(transformer, seed=TRANSFORMER_SEED, std=TRANSFORMER_STD)
    return transformer


def build_tiny_vae() -> AutoencoderKLQwenImage:
    """The seeded upstream tiny VAE."""
    vae = AutoencoderKLQwenImage(**tiny_vae_config())
    seeded_init_(vae, seed=VAE_SEED, std=VAE_STD)
    _recentre_vae_norm_scales_(vae)
    return vae


def build_qwen2_vl_processor(tokenizer: Qwen2Tokenizer) -> Qwen2VLProcessor:
    """The ``Qwen2VLProcessor`` the stock edit pipeline names, with the tiny pixel limits."""
    return Qwen2VLProcessor(
        image_processor=build_image_processor(),
        tokenizer=tokenizer,
        video_processor=build_video_processor(),
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )


def build_tiny_qwenimage_edit_pipeline(pipeline_class: type = QwenImageEditPipeline, zero_cond_t: bool = False):
    """The stock ``pipeline_class`` (``QwenImageEditPipeline`` or ``QwenImageEditPlusPipeline``) assembled from the
    seeded tiny components (in memory); ``zero_cond_t``: the transformer of Qwen-Image-Edit-2511."""
    tokenizer = build_qwen2_tokenizer()
    text_encoder = build_seeded_qwen2_5_vl(tokenizer, seed=TEXT_ENCODER_SEED)
    return pipeline_class(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=build_tiny_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        processor=build_qwen2_vl_processor(tokenizer),
        transformer=build_tiny_transformer(text_encoder.config.text_config.hidden_size, zero_cond_t=zero_cond_t),
    )


def build_tiny_qwenimage_edit(save_dir: Path) -> None:
    """Write the tiny pipeline in the diffusers layout (``model_index.json`` + one folder per component)."""
    build_tiny_qwenimage_edit_pipeline().save_pretrained(save_dir)


def tiny_qwenimage_edit_dir() -> Path:
    """Directory of the embedded tiny Qwen-Image-Edit pipeline (built once into the cache)."""
    return cached_model_dir("qwenimage_edit", VERSION, build_tiny_qwenimage_edit)


def build_tiny_qwenimage_edit_plus(save_dir: Path, zero_cond_t: bool = False) -> None:
    """Write the tiny pipeline in the layout of Qwen-Image-Edit-2509 (``zero_cond_t``: 2511)."""
    build_tiny_qwenimage_edit_pipeline(QwenImageEditPlusPipeline, zero_cond_t=zero_cond_t).save_pretrained(save_dir)


def tiny_qwenimage_edit_plus_dir(zero_cond_t: bool = False) -> Path:
    """Directory of the embedded tiny Qwen-Image-Edit-2509 pipeline (``zero_cond_t``: 2511), built once into the cache."""
    name = "qwenimage_edit_plus_2511" if zero_cond_t else "qwenimage_edit_plus"
    return cached_model_dir(name, VERSION, lambda save_dir: build_tiny_qwenimage_edit_plus(save_dir, zero_cond_t))
