"""The Llama fork (the decoder loop system C drops tokens in) is bit-identical to upstream without pruning.

``models/llama/modeling_llama.py`` is transformers' file plus fences that only act when the forked
LLaVA hands down its per-call pruning state. Here the fork's ``LlamaForCausalLM`` and upstream's are
loaded with ``from_pretrained`` from the same directory (the tiny LLaVA's text model with seeded
weights) and compared with ``torch.equal``: logits, every hidden state, and batch-2 left-padded
greedy ``generate`` with the KV cache. The LLaVA fork builds its language model from this class.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM as UpstreamLlama
from transformers import LlamaModel as UpstreamLlamaModel

from models.llama.modeling_llama import LlamaForCausalLM as ForkLlama
from models.llama.modeling_llama import LlamaModel as ForkLlamaModel
from models.tiny.llava import build_llama_tokenizer, tiny_text_config

MAX_NEW_TOKENS = 12


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    tokenizer = build_llama_tokenizer()
    torch.manual_seed(0)
    model = UpstreamLlama(tiny_text_config(tokenizer)).eval()
    with torch.no_grad():  # the default init leaves norms at 1: randomise them so every weight matters
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def upstream(model_dir: Path) -> UpstreamLlama:
    return UpstreamLlama.from_pretrained(model_dir).eval()


@pytest.fixture(scope="module")
def fork(model_dir: Path) -> ForkLlama:
    return ForkLlama.from_pretrained(model_dir).eval()


@pytest.fixture(scope="module")
def batch(model_dir: Path) -> dict[str, torch.Tensor]:
    """Two prompts of different lengths, left padded."""
    tokenizer = build_llama_tokenizer()
    tokenizer.padding_side = "left"
    prompts = ["USER: What colour is the circle on the left of the picture? ASSISTANT:", "USER: How many? ASSISTANT:"]
    return tokenizer(prompts, padding=True, return_tensors="pt")


def test_fork_is_a_distinct_class_and_loads_every_weight(model_dir: Path) -> None:
    assert ForkLlama is not UpstreamLlama and ForkLlamaModel is not UpstreamLlamaModel
    assert ForkLlama.__module__ == "models.llama.modeling_llama"
    _, info = ForkLlama.from_pretrained(model_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


@torch.no_grad()
def test_fork_forward_logits_and_hidden_states_are_bit_identical(upstream, fork, batch) -> None:
    expected = upstream(**batch, output_hidden_states=True)
    actual = fork(**batch, output_hidden_states=True)
    assert torch.equal(actual.logits, expected.logits)
    assert len(actual.hidden_states) == len(expected.hidden_states) == upstream.config.num_hidden_layers + 1
    for layer, (got, want) in enumerate(zip(actual.hidden_states, expected.hidden_states)):
        assert torch.equal(got, want), f"hidden state {layer} differs"


@torch.no_grad()
def test_fork_greedy_generate_batch_of_two_left_padded_is_bit_identical(upstream, fork, batch) -> None:
    assert (batch["attention_mask"][:, 0] == 0).any(), "the batch must contain left padding"
    settings = dict(do_sample=False, max_new_tokens=MAX_NEW_TOKENS, min_new_tokens=MAX_NEW_TOKENS, use_cache=True,
                    return_dict_in_generate=True, output_logits=True, pad_token_id=upstream.config.pad_token_id)
    expected = upstream.generate(**batch, **settings)
    actual = fork.generate(**batch, **settings)
    assert expected.sequences.shape[1] - batch["input_ids"].shape[1] == MAX_NEW_TOKENS
    assert torch.equal(actual.sequences, expected.sequences)
    assert all(torch.equal(got, want) for got, want in zip(actual.logits, expected.logits, strict=True))


def test_llava_fork_builds_its_language_model_from_the_llama_fork() -> None:
    from models.llava.modeling_llava import LlavaForConditionalGeneration
    from models.tiny.llava import tiny_llava_dir

    llava = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir())
    assert type(llava.model.language_model) is ForkLlamaModel
