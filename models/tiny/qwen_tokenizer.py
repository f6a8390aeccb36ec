"""Embedded Qwen2 tokenizer: a small byte-level BPE with the real Qwen2.5-VL special tokens and chat template.

Everything is built in code, deterministically and offline:

* the pre-tokenizer is the real one of ``transformers.Qwen2Tokenizer`` (Qwen2's split regex,
  then GPT-2 byte-to-unicode mapping), so words are cut exactly as the real tokenizer cuts them;
* the BPE merges are learned by a pure-Python trainer (ties broken by the smallest pair, so the
  result is the same on every machine) on a fixed built-in English corpus; training runs until
  no adjacent pair occurs twice, which makes **every word seen at least twice a single token**;
* the vocabulary is laid out like Qwen's: the 256 byte symbols (GPT-2 order), then one token per
  merge, then the special tokens ``<|endoftext|>`` ... ``<|video_pad|>`` in Qwen's order;
* the chat template is the one shipped with Qwen2.5-VL-Instruct (``<|im_start|>`` turns, default
  system prompt, ``<|vision_start|><|image_pad|><|vision_end|>`` / ``<|video_pad|>`` per item).

The corpus contains the diffusers Qwen-Image(-Edit) prompt templates, so their system prefixes
tokenize into exactly as many tokens as with the real Qwen tokenizer (64 for the edit template,
34 for the text-to-image one): the pipelines' hard-coded ``prompt_template_encode_start_idx``
then drops exactly the system prefix, as with real weights.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache

from transformers import Qwen2Tokenizer

from models.tiny.bpe import learn_merges

BPE_VOCAB_SIZE = 1024
"""Cap on byte symbols + merges; training normally stops earlier, when no pair repeats."""

ENDOFTEXT = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
VISION_PAD, IMAGE_PAD, VIDEO_PAD = "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"
SPECIAL_TOKENS = (
    ENDOFTEXT,
    IM_START,
    IM_END,
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    VISION_START,
    VISION_END,
    VISION_PAD,
    IMAGE_PAD,
    VIDEO_PAD,
)
"""The Qwen2/Qwen2.5-VL special tokens, in the order of their ids (151643..151656 in the real vocabulary)."""

# Chat template of Qwen/Qwen2.5-VL-*-Instruct (chat_template.json), verbatim.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# The prompt templates of diffusers' QwenImageEditPipeline and QwenImagePipeline (system prefix + user turn).
QWENIMAGE_EDIT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
QWENIMAGE_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black", "pink", "brown", "gray")
SHAPES = ("circle", "square", "triangle", "star", "ball", "box", "rectangle")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
EDIT_INSTRUCTIONS = (
    "Change the color of the {shape} to {colour}.",
    "Make the {shape} {colour}.",
    "Add a small {colour} {shape} in the top left corner.",
    "Remove the {colour} {shape}.",
    "Replace the background with a {colour} sky.",
    "Turn the picture into a watercolor painting.",
    "Make it look like an oil painting in the style of Van Gogh.",
    "Change the background to a beach at sunset.",
)
VIDEO_LINES = (
    "What happens in the video? The {colour} {shape} moves from left to right.",
    "Describe this video. A {colour} {shape} is moving across a plain background.",
    "In which direction does the {colour} {shape} move? It moves up. It moves down.",
    "How many {shape}s appear in the video? There are {number} {shape}s.",
)
GENERAL_TEXT = (
    "You are a helpful assistant.",
    "Describe this image. What is in the picture? Where is the object?",
    "The image shows a red circle, a blue square and a green triangle on a white background.",
    "Select the best answer to the following multiple-choice question based on the video.",
    "Respond with only the letter (A, B, C, D or E) of the correct option.",
    "Answer with the option's letter from the given choices directly. The best answer is",
    "A. left B. right C. up D. down E. still",
    "Question: Options: Answer: Yes, it is. No, it is not. The answer is yes. The answer is no.",
    "first second third last frame frames time before after during begin end start stop",
    "Picture 1: Video 1: Picture 2: Video 2:",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 100 2024 2025",
)


@lru_cache(maxsize=1)
def _pre_tokenizer():
    """The real Qwen2 pre-tokenizer (split regex + byte-level), taken from an empty ``Qwen2Tokenizer``."""
    return Qwen2Tokenizer(vocab={ENDOFTEXT: 0}, merges=[]).backend_tokenizer.pre_tokenizer


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode map used by byte-level BPE (Qwen's vocabulary order)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {byte: chr(code) for byte, code in zip(printable, codes)}


def tokenizer_corpus(extra_lines: Sequence[str] = ()) -> list[str]:
    """The fixed training corpus: chat and pipeline templates, edit instructions, video QA and general text
    (then ``extra_lines``, e.g. a trained testbed's questions and answers)."""
    lines = [QWENIMAGE_EDIT_TEMPLATE.format(""), QWENIMAGE_TEMPLATE.format("")] * 2
    lines += list(GENERAL_TEXT) * 2
    lines.append(" ".join(COLOURS + SHAPES + NUMBER_WORDS))
    for index, colour in enumerate(COLOURS):
        shape, number = SHAPES[index % len(SHAPES)], NUMBER_WORDS[index % len(NUMBER_WORDS)]
        for template in EDIT_INSTRUCTIONS + VIDEO_LINES:
            lines.append(template.format(colour=colour, shape=shape, number=number))
    return lines + list(extra_lines)


def _pretokenize(text: str) -> list[str]:
    """Byte-level words of ``text`` as the Qwen2 tokenizer sees them; special tokens cut the text first."""
    pattern = "(" + "|".join(re.escape(token) for token in SPECIAL_TOKENS) + ")"
    words: list[str] = []
    for segment in re.split(pattern, text):
        if segment and segment not in SPECIAL_TOKENS:
            words.extend(word for word, _ in _pre_tokenizer().pre_tokenize_str(segment))
    return words


def train_byte_level_bpe(corpus: list[str], vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train a byte-level BPE; pure Python with a total order on ties, so identical on every machine.

    Vocabulary: the 256 byte symbols in GPT-2 order, then one token per merge, until
    ``vocab_size`` or until the most frequent pair occurs fewer than twice.
    """
    vocab = {symbol: index for index, symbol in enumerate(bytes_to_unicode().values())}
    word_counts = Counter(word for line in corpus for word in _pretokenize(line))
    return learn_merges(word_counts, vocab, vocab_size)


def build_qwen2_tokenizer(extra_lines: Sequence[str] = ()) -> Qwen2Tokenizer:
    """The tiny Qwen2 tokenizer: trained BPE, Qwen2.5-VL special tokens and chat template.

    Like Qwen2.5-VL-Instruct's: no BOS, ``eos_token`` = ``<|im_end|>``, ``pad_token`` =
    ``<|endoftext|>``, no unknown token (byte-level BPE covers every input), right padding.
    ``extra_lines`` join the BPE corpus (the default tokenizer has none).
    """
    vocab, merges = train_byte_level_bpe(tokenizer_corpus(extra_lines), BPE_VOCAB_SIZE)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        errors="replace",
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )
    tokenizer.add_special_tokens({"extra_special_tokens": list(SPECIAL_TOKENS[1:])})
    tokenizer.eos_token = IM_END
    return tokenizer
