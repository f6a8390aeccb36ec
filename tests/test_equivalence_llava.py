"""The LLaVA fork with pruning disabled is bit-identical to upstream transformers.

Both classes are loaded with ``from_pretrained`` from the same embedded tiny LLaVA-1.5
directory; every comparison is ``torch.equal``, never a tolerance. Also checks that the
embedded model is deterministic and that its tokenizer and processor behave like LLaVA-1.5's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoProcessor, LlamaTokenizer, LlavaProcessor
from transformers import LlavaForConditionalGeneration as UpstreamLlava

from models.llava.modeling_llava import LlavaForConditionalGeneration as ForkLlava
from models.tiny.llava import (
    IMAGE_TOKEN,
    NUM_IMAGE_TOKENS,
    build_llama_tokenizer,
    build_tiny_llava,
    tiny_llava_dir,
)

QUESTIONS = ("What colour is the circle?", "How many squares are there in the picture on the left?")
MAX_NEW_TOKENS = 12
MIN_NEW_TOKENS = 10


def make_test_image(size: tuple[int, int], seed: int) -> Image.Image:
    """A deterministic RGB test image: a plain background with a few coloured rectangles."""
    rng = np.random.default_rng(seed)
    width, height = size
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    pixels[:] = rng.integers(0, 256, size=3, dtype=np.uint8)
    for _ in range(3):
        x0, y0 = rng.integers(0, width // 2), rng.integers(0, height // 2)
        x1, y1 = x0 + rng.integers(8, width // 2), y0 + rng.integers(8, height // 2)
        pixels[y0:y1, x0:x1] = rng.integers(0, 256, size=3, dtype=np.uint8)
    return Image.fromarray(pixels)


def chat_prompt(processor: LlavaProcessor, question: str) -> str:
    """The LLaVA-1.5 prompt for one image and one question, through the saved chat template."""
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True)


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return tiny_llava_dir()


@pytest.fixture(scope="module")
def processor(model_dir: Path) -> LlavaProcessor:
    return AutoProcessor.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def upstream(model_dir: Path) -> UpstreamLlava:
    return UpstreamLlava.from_pretrained(model_dir).eval()


@pytest.fixture(scope="module")
def fork(model_dir: Path) -> ForkLlava:
    return ForkLlava.from_pretrained(model_dir).eval()


@pytest.fixture(scope="module")
def single_inputs(processor: LlavaProcessor) -> dict[str, torch.Tensor]:
    """One image (non-square, so resize + centre crop run) and one question."""
    image = make_test_image((150, 120), seed=1)
    return processor(images=image, text=chat_prompt(processor, QUESTIONS[0]), return_tensors="pt")


@pytest.fixture(scope="module")
def batch_inputs(processor: LlavaProcessor) -> dict[str, torch.Tensor]:
    """Two images and two questions of different lengths, left padded."""
    images = [make_test_image((150, 120), seed=2), make_test_image((112, 140), seed=3)]
    prompts = [chat_prompt(processor, question) for question in QUESTIONS]
    return processor(images=images, text=prompts, padding=True, return_tensors="pt")


def test_fork_is_a_distinct_class_from_upstream() -> None:
    assert ForkLlava is not UpstreamLlava
    assert ForkLlava.__module__ == "models.llava.modeling_llava"


@pytest.mark.parametrize("model_class", [UpstreamLlava, ForkLlava], ids=["upstream", "fork"])
def test_tiny_dir_loads_every_weight_into_both_classes(model_dir: Path, model_class: type) -> None:
    _, info = model_class.from_pretrained(model_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_fork_and_upstream_state_dicts_are_identical(upstream: UpstreamLlava, fork: ForkLlava) -> None:
    upstream_state, fork_state = upstream.state_dict(), fork.state_dict()
    assert upstream_state.keys() == fork_state.keys()
    assert all(torch.equal(upstream_state[name], fork_state[name]) for name in upstream_state)


def test_tokenizer_round_trips_question_and_keeps_image_token_whole(processor: LlavaProcessor) -> None:
    tokenizer = build_llama_tokenizer()
    assert isinstance(tokenizer, LlamaTokenizer)
    text = "What colour is the circle?"
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert len(ids) <= 8, tokenizer.convert_ids_to_tokens(ids)  # task words are whole tokens
    image_ids = tokenizer(IMAGE_TOKEN, add_special_tokens=False).input_ids
    assert image_ids == [tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)]
    assert processor.tokenizer(text).input_ids == ids  # the saved tokenizer encodes the same


def test_processor_expands_image_token_to_one_per_patch(
    processor: LlavaProcessor, upstream: UpstreamLlava, single_inputs: dict[str, torch.Tensor]
) -> None:
    assert chat_prompt(processor, "Q?") == "USER: <image>\nQ? ASSISTANT:"
    image_token_count = (single_inputs["input_ids"] == upstream.config.image_token_id).sum().item()
    assert image_token_count == NUM_IMAGE_TOKENS == 64
    assert single_inputs["pixel_values"].shape == (1, 3, 112, 112)


@torch.no_grad()
def test_fork_forward_logits_and_hidden_states_are_bit_identical(
    upstream: UpstreamLlava, fork: ForkLlava, single_inputs: dict[str, torch.Tensor]
) -> None:
    expected = upstream(**single_inputs, output_hidden_states=True)
    actual = fork(**single_inputs, output_hidden_states=True)
    assert torch.equal(actual.logits, expected.logits)
    num_layers = upstream.config.text_config.num_hidden_layers
    assert len(actual.hidden_states) == len(expected.hidden_states) == num_layers + 1
    for layer, (got, want) in enumerate(zip(actual.hidden_states, expected.hidden_states)):
        assert torch.equal(got, want), f"hidden state {layer} differs"
    assert torch.equal(actual.image_hidden_states, expected.image_hidden_states)


@torch.no_grad()
def test_fork_greedy_generate_batch_of_two_left_padded_is_bit_identical(
    upstream: UpstreamLlava, fork: ForkLlava, batch_inputs: dict[str, torch.Tensor]
) -> None:
    assert (batch_inputs["attention_mask"][:, 0] == 0).any(), "the batch must contain left padding"
    settings = dict(
        do_sample=False,
        max_new_tokens=MAX_NEW_TOKENS,
        min_new_tokens=MIN_NEW_TOKENS,
        use_cache=True,
        return_dict_in_generate=True,
        output_logits=True,
    )
    expected = upstream.generate(**batch_inputs, **settings)
    actual = fork.generate(**batch_inputs, **settings)
    prompt_length = batch_inputs["input_ids"].shape[1]
    assert expected.sequences.shape[1] - prompt_length >= MIN_NEW_TOKENS
    assert torch.equal(actual.sequences, expected.sequences)
    assert all(torch.equal(got, want) for got, want in zip(actual.logits, expected.logits, strict=True))


def test_building_the_tiny_model_twice_gives_identical_files(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    for directory in (first, second):
        directory.mkdir()
        build_tiny_llava(directory)
    first_state = load_file(first / "model.safetensors")
    second_state = load_file(second / "model.safetensors")
    assert first_state.keys() == second_state.keys()
    assert all(torch.equal(first_state[name], second_state[name]) for name in first_state)
    for name in ("tokenizer.json", "config.json", "processor_config.json", "chat_template.jinja"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
