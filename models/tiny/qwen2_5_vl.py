"""Embedded default Qwen2.5-VL: the real architecture at toy size, with its real processor, built in code.

* ``tiny_qwen2_5_vl_config`` keeps every structural feature of Qwen2.5-VL-7B-Instruct: a windowed
  ViT with full-attention blocks (``fullatt_block_indexes``), SwiGLU + RMSNorm, 14 px patches,
  temporal patch 2, 2x2 patch merger projecting to the text width; a Qwen2 decoder with grouped
  query attention (2 query heads per KV head), an MLP 5.3x as wide as the residual stream (7B:
  18944 / 3584) and multimodal RoPE whose ``mrope_section`` splits the rotary half-dimension in
  the 7B's proportions (16/24/24 of 64 -> 2/3/3 of 8). Token ids come from the tiny tokenizer.
* ``build_tiny_qwen2_5_vl`` writes the upstream ``Qwen2_5_VLForConditionalGeneration`` with seeded
  weights and the real ``Qwen2_5_VLProcessor`` (``Qwen2VLImageProcessor``, ``Qwen2VLVideoProcessor``,
  tokenizer and chat template of ``models.tiny.qwen_tokenizer``) via ``save_pretrained``.
* ``tiny_qwen2_5_vl_dir`` caches that directory; it is loaded back with ``from_pretrained`` exactly
  like real weights, by the upstream class or by the fork.

Pixel limits are small so the demo media stay cheap: an image is resized to at most 224x224 px
(a 112x112 image gives 8x8 patches = 16 visual tokens, 224x224 gives 64) and a video frame to at
most 112x112 px (8 frames of 112x112 give 4x8x8 patches = 64 visual tokens).
"""

from __future__ import annotations

from pathlib import Path

from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Tokenizer,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

from models.tiny import cached_model_dir, seeded_init_
from models.tiny.qwen_tokenizer import (
    ENDOFTEXT,
    IM_END,
    IMAGE_PAD,
    QWEN2_VL_CHAT_TEMPLATE,
    VIDEO_PAD,
    VISION_END,
    VISION_PAD,
    VISION_START,
    build_qwen2_tokenizer,
)

VERSION = 1
"""Bump whenever anything below changes the built directory."""

SEED = 0
WEIGHT_STD = 0.1
"""Std of the seeded weights: 0.02 (the initializer default) leaves a 64-wide model so close to the identity
that greedy decoding falls into a one- or two-token loop; 0.1 keeps it finite and lets images change the output."""
PATCH_SIZE = 14
TEMPORAL_PATCH_SIZE = 2
MERGE_SIZE = 2
IMAGE_MIN_PIXELS = 56 * 56  # upstream default
IMAGE_MAX_PIXELS = 224 * 224  # <= 64 visual tokens per image
VIDEO_MIN_PIXELS = 56 * 56
VIDEO_MAX_PIXELS = 112 * 112  # <= 16 visual tokens per 2 frames
VIDEO_FPS = 2.0  # frames per second sampled by the processor when it samples (upstream default)


def tiny_vision_config_kwargs(hidden_size: int) -> dict:
    """Qwen2.5-VL ViT at toy size: 4 blocks (0, 2 windowed; 1, 3 full), width 64, 4 heads, merger to ``hidden_size``.

    ``window_size`` is 56 px = 2x2 merged units, so a 112x112 image already spans 2x2 windows and
    the window attention path really runs.
    """
    return dict(
        depth=4,
        hidden_size=64,
        intermediate_size=172,  # 7B: 3420 / 1280 = 2.67x
        num_heads=4,
        in_channels=3,
        patch_size=PATCH_SIZE,
        spatial_merge_size=MERGE_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        tokens_per_second=2,
        window_size=56,
        fullatt_block_indexes=[1, 3],
        out_hidden_size=hidden_size,
        hidden_act="silu",
    )


def tiny_text_config_kwargs(tokenizer: Qwen2Tokenizer) -> dict:
    """Qwen2 decoder at toy size: width 64, 6 layers, 4 query / 2 KV heads (head dim 16), MLP 340, M-RoPE [2, 3, 3]."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=340,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_act="silu",
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        use_sliding_window=False,
        max_window_layers=6,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [2, 3, 3]},
        bos_token_id=tokenizer.convert_tokens_to_ids(ENDOFTEXT),
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
        pad_token_id=tokenizer.convert_tokens_to_ids(ENDOFTEXT),
    )


def tiny_qwen2_5_vl_config(tokenizer: Qwen2Tokenizer | None = None) -> Qwen2_5_VLConfig:
    """The Qwen2.5-VL wiring at toy size, with image/video/vision-start/end ids taken from the tokenizer."""
    tokenizer = tokenizer if tokenizer is not None else build_qwen2_tokenizer()
    text = tiny_text_config_kwargs(tokenizer)
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=tiny_vision_config_kwargs(text["hidden_size"]),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_PAD),
        video_token_id=tokenizer.convert_tokens_to_ids(VIDEO_PAD),
        vision_start_token_id=tokenizer.convert_tokens_to_ids(VISION_START),
        vision_end_token_id=tokenizer.convert_tokens_to_ids(VISION_END),
        vision_token_id=tokenizer.convert_tokens_to_ids(VISION_PAD),
        tie_word_embeddings=False,
    )


def build_image_processor() -> Qwen2VLImageProcessor:
    """Qwen2-VL image preprocessing (smart resize to multiples of 28 px, CLIP mean/std) with small pixel limits."""
    return Qwen2VLImageProcessor(
        min_pixels=IMAGE_MIN_PIXELS,
        max_pixels=IMAGE_MAX_PIXELS,
        patch_size=PATCH_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        merge_size=MERGE_SIZE,
    )


def build_video_processor() -> Qwen2VLVideoProcessor:
    """Qwen2-VL video preprocessing with small per-frame pixel limits (frames are not resampled by default)."""
    return Qwen2VLVideoProcessor(
        min_pixels=VIDEO_MIN_PIXELS,
        max_pixels=VIDEO_MAX_PIXELS,
        patch_size=PATCH_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        merge_size=MERGE_SIZE,
        fps=VIDEO_FPS,
        cap_pixels_per_frame=True,
    )


def build_qwen2_5_vl_processor(tokenizer: Qwen2Tokenizer | None = None) -> Qwen2_5_VLProcessor:
    """The real ``Qwen2_5_VLProcessor`` around the tiny tokenizer, with the Qwen2.5-VL chat template."""
    tokenizer = tokenizer if tokenizer is not None else build_qwen2_tokenizer()
    return Qwen2_5_VLProcessor(
        image_processor=build_image_processor(),
        tokenizer=tokenizer,
        video_processor=build_video_processor(),
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )


def build_seeded_qwen2_5_vl(
    tokenizer: Qwen2Tokenizer, seed: int, std: float = WEIGHT_STD
) -> Qwen2_5_VLForConditionalGeneration:
    """The upstream model with weights drawn from ``seed`` and the generation settings of Qwen2.5-VL-Instruct."""
    model = Qwen2_5_VLForConditionalGeneration(tiny_qwen2_5_vl_config(tokenizer))
    seeded_init_(model, seed=seed, std=std)
    generation = model.generation_config
    generation.bos_token_id = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    generation.eos_token_id = [tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(ENDOFTEXT)]
    generation.pad_token_id = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    return model


def build_tiny_qwen2_5_vl(save_dir: Path) -> None:
    """Write the seeded upstream ``Qwen2_5_VLForConditionalGeneration`` and its processor to ``save_dir``."""
    tokenizer = build_qwen2_tokenizer()
    # transformers 5 writes the original Qwen2.5-VL checkpoint layout (``model.layers.*``, ``visual.*``), as
    # in the real checkpoints; from_pretrained converts it back for the upstream class and for the fork.
    build_seeded_qwen2_5_vl(tokenizer, SEED).save_pretrained(save_dir)
    build_qwen2_5_vl_processor(tokenizer).save_pretrained(save_dir)


def tiny_qwen2_5_vl_dir() -> Path:
    """Directory of the embedded tiny Qwen2.5-VL (built once into the cache)."""
    return cached_model_dir("qwen2_5_vl", VERSION, build_tiny_qwen2_5_vl)
