"""Golden cases: outputs of the embedded models at fixed seeds (``make golden`` rewrites them).

Each function builds its inputs from seeds only, runs the fork, and returns exact values
(token ids, token counts) and tensor summaries. Later systems register their pruned
configurations here too.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from tests.golden_utils import golden_case, summarize

GREEDY = dict(do_sample=False, max_new_tokens=10, min_new_tokens=10, use_cache=True,
              return_dict_in_generate=True, output_logits=True)


# ----------------------------------------------------------------------------- Qwen2.5-VL


@lru_cache(maxsize=1)
def _qwen2_5_vl():
    from transformers import AutoProcessor

    from models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
    from models.tiny.qwen2_5_vl import tiny_qwen2_5_vl_dir

    path = tiny_qwen2_5_vl_dir()
    return AutoProcessor.from_pretrained(path), Qwen2_5_VLForConditionalGeneration.from_pretrained(path).eval()


def _qwen_inputs(media: str):
    from transformers.video_utils import VideoMetadata

    from data.media import make_sample_image, make_sample_video

    processor, _ = _qwen2_5_vl()
    question = "Describe this image." if media == "image" else "What happens in the video?"
    conversation = [{"role": "user", "content": [{"type": media}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    if media == "image":
        return processor(images=make_sample_image((140, 112), seed=1), text=prompt, return_tensors="pt")
    return processor(videos=make_sample_video(8, (112, 112), seed=2), text=prompt, return_tensors="pt",
                     video_metadata=[VideoMetadata(total_num_frames=8, fps=2.0)])


def _qwen_case(media: str) -> dict:
    _, model = _qwen2_5_vl()
    inputs = _qwen_inputs(media)
    with torch.no_grad():
        out = model.generate(**inputs, **GREEDY)
    prompt_len = inputs["input_ids"].shape[1]
    return {
        "prompt_len": prompt_len,
        "new_token_ids": out.sequences[0, prompt_len:].tolist(),
        "first_step_logits": summarize(out.logits[0]),
        "last_step_logits": summarize(out.logits[-1]),
    }


@golden_case("qwen2_5_vl_image_generate")
def qwen2_5_vl_image_generate():
    return _qwen_case("image")


@golden_case("qwen2_5_vl_video_generate")
def qwen2_5_vl_video_generate():
    return _qwen_case("video")


# ----------------------------------------------------------------------------- LLaVA


@golden_case("llava_batch2_generate")
def llava_batch2_generate():
    from PIL import Image
    from transformers import AutoProcessor

    from models.llava.modeling_llava import LlavaForConditionalGeneration
    from models.tiny.llava import tiny_llava_dir
    from data.media import make_sample_image

    path = tiny_llava_dir()
    processor = AutoProcessor.from_pretrained(path)
    model = LlavaForConditionalGeneration.from_pretrained(path).eval()
    questions = ["What colour is the circle?", "How many squares are there in this picture?"]
    prompts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                                             add_generation_prompt=True) for q in questions]
    images: list[Image.Image] = [make_sample_image((112, 112), seed=s) for s in (3, 4)]
    inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**inputs, **GREEDY, pad_token_id=processor.tokenizer.pad_token_id)
    prompt_len = inputs["input_ids"].shape[1]
    return {
        "prompt_len": prompt_len,
        "new_token_ids": out.sequences[:, prompt_len:].tolist(),
        "first_step_logits": summarize(out.logits[0]),
        "last_step_logits": summarize(out.logits[-1]),
    }


# ----------------------------------------------------------------------------- Qwen-Image-Edit


@lru_cache(maxsize=1)
def _edit_pipe():
    from models.tiny.qwenimage_edit import tiny_qwenimage_edit_dir
    from pipelines.qwenimage_edit import TokenPruningQwenImageEditPipeline

    pipe = TokenPruningQwenImageEditPipeline.from_pretrained(tiny_qwenimage_edit_dir())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _edit_case(mode: str, refresh_steps=None) -> dict:
    from data.media import make_sample_image

    pipe = _edit_pipe()
    image = pipe(
        image=make_sample_image((128, 128), seed=0), prompt="make the circle blue", num_inference_steps=4,
        height=64, width=64, true_cfg_scale=1.0, output_type="pt", pruning_mode=mode, refresh_steps=refresh_steps,
        generator=torch.Generator().manual_seed(0),
    ).images
    stats = pipe.last_reuse_stats
    return {"image": summarize(image), "refresh_steps": stats["refresh_steps"], "cache_bytes": stats["cache_bytes"]}


@golden_case("qwenimage_edit_none")
def qwenimage_edit_none():
    return _edit_case("none")


@golden_case("qwenimage_edit_mlp")
def qwenimage_edit_mlp():
    return _edit_case("mlp")


@golden_case("qwenimage_edit_full")
def qwenimage_edit_full():
    return _edit_case("full")


@golden_case("qwenimage_edit_kv")
def qwenimage_edit_kv():
    return _edit_case("kv")


@golden_case("qwenimage_edit_kv_once")
def qwenimage_edit_kv_once():
    return _edit_case("kv", "once")


@lru_cache(maxsize=2)
def _edit_plus_pipe(zero_cond_t: bool):
    from models.tiny.qwenimage_edit import tiny_qwenimage_edit_plus_dir
    from pipelines.qwenimage_edit import TokenPruningQwenImageEditPlusPipeline

    pipe = TokenPruningQwenImageEditPlusPipeline.from_pretrained(tiny_qwenimage_edit_plus_dir(zero_cond_t))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _edit_plus_case(mode: str, refresh_steps=None, zero_cond_t: bool = False) -> dict:
    """Qwen-Image-Edit-2509 layout (2511 with ``zero_cond_t``), two reference images of different sizes."""
    from data.media import make_sample_image

    pipe = _edit_plus_pipe(zero_cond_t)
    images = [make_sample_image((192, 128), seed=1), make_sample_image((96, 96), seed=2)]
    image = pipe(
        image=images, prompt="put the circle of picture 1 into picture 2", num_inference_steps=4, height=64,
        width=64, true_cfg_scale=1.0, output_type="pt", pruning_mode=mode, refresh_steps=refresh_steps,
        generator=torch.Generator().manual_seed(0),
    ).images
    stats = pipe.last_reuse_stats
    return {"image": summarize(image), "refresh_steps": stats["refresh_steps"], "cache_bytes": stats["cache_bytes"],
            "tokens": stats.get("tokens")}


@golden_case("qwenimage_edit_plus_none")
def qwenimage_edit_plus_none():
    return _edit_plus_case("none")


@golden_case("qwenimage_edit_plus_kv_once")
def qwenimage_edit_plus_kv_once():
    return _edit_plus_case("kv", "once")


@golden_case("qwenimage_edit_plus_2511_full")
def qwenimage_edit_plus_2511_full():
    return _edit_plus_case("full", zero_cond_t=True)


# ----------------------------------------------------------------------------- PruneVid (Qwen2.5-VL)


@lru_cache(maxsize=1)
def _prunevid_base():
    from data.demo_video import demo_video_path
    from pipelines.prunevid import Qwen25VLPruneVid

    pipe = Qwen25VLPruneVid(preset="baseline", num_frames=16)
    inputs = pipe.prepare_inputs(demo_video_path(), "What is moving in the video, and in which direction?")
    return pipe, inputs


def _prunevid_case(preset: str) -> dict:
    base, inputs = _prunevid_base()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pipe = base.with_config(preset)
    try:
        result = pipe.generate_from_inputs(inputs, max_new_tokens=8)
    finally:
        torch.set_num_threads(threads)
    keys = ("generated_ids", "tokens_before_stage1", "tokens_after_stage1", "tokens_before", "tokens_after",
            "kv_cache_length_per_layer", "pruning_layer")
    return {key: result[key] for key in keys} | {"first_step_logits": summarize(pipe._last_logits[0])}


def _register_prunevid_cases():
    for preset in ("baseline", "stage2_only", "stage1_only", "default", "conservative", "aggressive"):
        golden_case(f"prunevid_{preset}")(lambda preset=preset: _prunevid_case(preset))


_register_prunevid_cases()
