"""The Qwen2.5-VL fork with pruning disabled is bit-identical to upstream transformers.

Both classes are loaded with ``from_pretrained`` from the same embedded tiny Qwen2.5-VL directory
and fed inputs made by the real ``Qwen2_5_VLProcessor`` and chat template: one image, and one
8-frame video. Every comparison is ``torch.equal``, never a tolerance. Also checks that the
embedded model loads offline, is deterministic, and that its tokenizer and processor behave like
Qwen2.5-VL-Instruct's.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoProcessor, Qwen2_5_VLProcessor, Qwen2Tokenizer
from transformers import Qwen2_5_VLForConditionalGeneration as UpstreamQwen
from transformers.video_utils import VideoMetadata

from models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLForConditionalGeneration as ForkQwen
from data.media import make_sample_image, make_sample_video
from models.tiny.qwen2_5_vl import build_tiny_qwen2_5_vl, tiny_qwen2_5_vl_dir
from models.tiny.qwen_tokenizer import SPECIAL_TOKENS, build_qwen2_tokenizer

MAX_NEW_TOKENS = 12
MIN_NEW_TOKENS = 10
NUM_FRAMES = 8
VIDEO_FPS = 2.0  # the frames stand for a clip sampled at 2 fps, as qwen-vl-utils samples videos
GENERATE_SETTINGS = dict(
    do_sample=False,
    max_new_tokens=MAX_NEW_TOKENS,
    min_new_tokens=MIN_NEW_TOKENS,
    use_cache=True,
    return_dict_in_generate=True,
    output_logits=True,
)


def chat_prompt(processor: Qwen2_5_VLProcessor, media_type: str, question: str) -> str:
    """The Qwen2.5-VL-Instruct prompt for one image or video and one question, through the saved chat template."""
    conversation = [{"role": "user", "content": [{"type": media_type}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True)


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return tiny_qwen2_5_vl_dir()


@pytest.fixture(scope="module")
def processor(model_dir: Path) -> Qwen2_5_VLProcessor:
    return AutoProcessor.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def upstream(model_dir: Path) -> UpstreamQwen:
    return UpstreamQwen.from_pretrained(model_dir).eval()


@pytest.fixture(scope="module")
def fork(model_dir: Path) -> ForkQwen:
    return ForkQwen.from_pretrained(model_dir).eval()


@pytest.fixture(scope="module")
def image_inputs(processor: Qwen2_5_VLProcessor) -> dict[str, torch.Tensor]:
    """One non-square image (smart-resized to 112x140 px: 8x10 patches, 20 visual tokens) and a question."""
    image = make_sample_image((140, 112), seed=1)
    prompt = chat_prompt(processor, "image", "Describe this image.")
    return processor(images=image, text=prompt, return_tensors="pt")


@pytest.fixture(scope="module")
def video_inputs(processor: Qwen2_5_VLProcessor) -> dict[str, torch.Tensor]:
    """Eight 112x112 frames as a uint8 array [T, H, W, 3] (4x8x8 patches, 64 visual tokens) and a question."""
    video = make_sample_video(NUM_FRAMES, (112, 112), seed=2)
    metadata = VideoMetadata(total_num_frames=NUM_FRAMES, fps=VIDEO_FPS)
    prompt = chat_prompt(processor, "video", "What happens in the video?")
    return processor(videos=[video], video_metadata=[metadata], text=prompt, return_tensors="pt")


@pytest.fixture(scope="module", params=["image", "video"])
def media_inputs(request: pytest.FixtureRequest) -> dict[str, torch.Tensor]:
    return request.getfixturevalue(f"{request.param}_inputs")


def test_fork_is_a_distinct_class_from_upstream() -> None:
    assert ForkQwen is not UpstreamQwen
    assert ForkQwen.__module__ == "models.qwen2_5_vl.modeling_qwen2_5_vl"


def test_tiny_dir_loads_offline_with_auto_processor(model_dir: Path, processor: Qwen2_5_VLProcessor) -> None:
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    assert isinstance(processor, Qwen2_5_VLProcessor)
    assert type(processor.tokenizer) is Qwen2Tokenizer
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessor"
    assert type(processor.video_processor).__name__ == "Qwen2VLVideoProcessor"


@pytest.mark.parametrize("model_class", [UpstreamQwen, ForkQwen], ids=["upstream", "fork"])
def test_tiny_dir_loads_every_weight_into_both_classes(model_dir: Path, model_class: type) -> None:
    _, info = model_class.from_pretrained(model_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_tiny_dir_stores_the_original_qwen2_5_vl_checkpoint_layout(model_dir: Path) -> None:
    """Like real checkpoints (``model.layers.*``, ``visual.*``), so loading runs upstream's key conversion."""
    prefixes = {name.split(".")[0] + "." + name.split(".")[1] for name in load_file(model_dir / "model.safetensors")}
    assert prefixes == {"lm_head.weight", "model.embed_tokens", "model.layers", "model.norm", "visual.blocks",
                        "visual.merger", "visual.patch_embed"}  # fmt: skip


def test_fork_and_upstream_state_dicts_are_identical(upstream: UpstreamQwen, fork: ForkQwen) -> None:
    upstream_state, fork_state = upstream.state_dict(), fork.state_dict()
    assert upstream_state.keys() == fork_state.keys()
    assert all(torch.equal(upstream_state[name], fork_state[name]) for name in upstream_state)


def test_tokenizer_has_qwen_special_tokens_in_order_after_the_bpe_vocabulary(processor: Qwen2_5_VLProcessor) -> None:
    tokenizer = build_qwen2_tokenizer()
    assert type(tokenizer) is Qwen2Tokenizer
    ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    assert ids == list(range(tokenizer.vocab_size, tokenizer.vocab_size + len(SPECIAL_TOKENS)))
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token) == ("<|im_end|>", "<|endoftext|>", None)
    text = "What happens in the video? Zebras, 3 cats & 42 héllo!"
    encoded = tokenizer(text).input_ids
    assert tokenizer.decode(encoded) == text  # byte-level: any text round-trips
    assert len(tokenizer("Describe this image.").input_ids) == 4  # corpus words are single tokens
    assert processor.tokenizer(text).input_ids == encoded  # the saved tokenizer encodes the same


def test_chat_template_is_qwen2_5_vl_instruct(processor: Qwen2_5_VLProcessor) -> None:
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|video_pad|><|vision_end|>Q?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert chat_prompt(processor, "video", "Q?") == expected
    assert chat_prompt(processor, "image", "Q?") == expected.replace("<|video_pad|>", "<|image_pad|>")


def test_processor_gives_one_pad_token_per_merged_2x2_patch(
    upstream: UpstreamQwen, image_inputs: dict[str, torch.Tensor], video_inputs: dict[str, torch.Tensor]
) -> None:
    assert image_inputs["image_grid_thw"].tolist() == [[1, 8, 10]]
    assert (image_inputs["input_ids"] == upstream.config.image_token_id).sum().item() == 20
    assert image_inputs["pixel_values"].shape == (80, 3 * 2 * 14 * 14)
    assert video_inputs["video_grid_thw"].tolist() == [[4, 8, 8]]
    assert (video_inputs["input_ids"] == upstream.config.video_token_id).sum().item() == 64
    assert video_inputs["second_per_grid_ts"].tolist() == [1.0]  # 2 frames per temporal patch at 2 fps


@torch.no_grad()
def test_fork_forward_logits_and_hidden_states_are_bit_identical(
    upstream: UpstreamQwen, fork: ForkQwen, media_inputs: dict[str, torch.Tensor]
) -> None:
    expected = upstream(**media_inputs, output_hidden_states=True)
    actual = fork(**media_inputs, output_hidden_states=True)
    assert torch.isfinite(expected.logits).all()
    assert torch.equal(actual.logits, expected.logits)
    num_layers = upstream.config.text_config.num_hidden_layers
    assert len(actual.hidden_states) == len(expected.hidden_states) == num_layers + 1
    for layer, (got, want) in enumerate(zip(actual.hidden_states, expected.hidden_states)):
        assert torch.equal(got, want), f"hidden state {layer} differs"


@torch.no_grad()
def test_fork_greedy_generate_with_kv_cache_gives_identical_tokens_and_logits(
    upstream: UpstreamQwen, fork: ForkQwen, media_inputs: dict[str, torch.Tensor]
) -> None:
    expected = upstream.generate(**media_inputs, **GENERATE_SETTINGS)
    actual = fork.generate(**media_inputs, **GENERATE_SETTINGS)
    prompt_length = media_inputs["input_ids"].shape[1]
    new_tokens = expected.sequences[0, prompt_length:]
    assert len(new_tokens) >= MIN_NEW_TOKENS
    assert len(set(new_tokens.tolist())) > 2, "the tiny model's greedy decoding collapsed into a loop"
    assert torch.equal(actual.sequences, expected.sequences)
    assert all(torch.equal(got, want) for got, want in zip(actual.logits, expected.logits, strict=True))


def test_building_the_tiny_model_twice_gives_identical_files(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    for directory in (first, second):
        directory.mkdir()
        build_tiny_qwen2_5_vl(directory)
    first_state = load_file(first / "model.safetensors")
    second_state = load_file(second / "model.safetensors")
    assert first_state.keys() == second_state.keys()
    assert all(torch.equal(first_state[name], second_state[name]) for name in first_state)
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json", "processor_config.json",
                 "chat_template.jinja", "generation_config.json"):  # fmt: skip
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
