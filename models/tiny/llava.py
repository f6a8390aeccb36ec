"""Embedded default LLaVA-1.5: a tiny CLIP + Llama model, its tokenizer and processor, built in code.

Everything here is deterministic and offline:

* ``build_llama_tokenizer`` trains a small byte-fallback BPE (the Llama/SentencePiece layout:
  ``<unk> <s> </s>``, 256 byte tokens, then characters and merges) with a pure-Python trainer
  on a fixed built-in corpus, and wraps it in the real ``transformers.LlamaTokenizer``;
  ``<image>`` and ``<pad>`` are added as special tokens, as in ``llava-hf/llava-1.5-7b-hf``.
  The corpus holds the vocabulary of the shapes VQA task (colours, shapes, counts,
  positions, yes/no and the question templates), so those words are one or few tokens.
* ``tiny_llava_config`` is a ``LlavaConfig`` with the LLaVA-1.5 wiring (CLIP tower, feature
  layer -2, "default" selection dropping CLS, 2-layer GELU projector, Llama LLM) at toy size.
* ``build_tiny_llava`` writes the upstream ``LlavaForConditionalGeneration`` with seeded
  weights and the real ``LlavaProcessor`` via ``save_pretrained``; ``tiny_llava_dir`` caches
  that directory, which is then loaded back with ``from_pretrained`` like real weights.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlamaTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from models.tiny import cached_model_dir, seeded_init_
from models.tiny.bpe import learn_merges

VERSION = 2
"""Bump whenever anything below changes the built directory."""

SEED = 0
IMAGE_SIZE = 112
PATCH_SIZE = 14
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # CLS dropped by the "default" strategy
BPE_VOCAB_SIZE = 768  # cap before <pad> and <image>; training stops sooner, when no pair repeats

UNK, BOS, EOS, PAD, IMAGE_TOKEN = "<unk>", "<s>", "</s>", "<pad>", "<image>"
SPACE = "\u2581"  # SentencePiece's "▁", which Llama's Metaspace pre-tokenizer puts for spaces

# LLaVA-1.5 chat template of llava-hf/llava-1.5-7b-hf: "USER: <image>\n{question} ASSISTANT:".
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}"
    "{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}"
    "{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' ' }}{% endgeneration %}"
    "{% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
SHAPES = ("circle", "square", "triangle")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
POSITIONS = ("left", "right", "above", "below", "top", "bottom", "middle", "center")
GENERAL_TEXT = (
    "A photo of a small image with simple shapes on a plain background.",
    "The picture shows a red circle, a blue square and a green triangle.",
    "There is one shape in the image. There are two shapes in the image.",
    "Yes, it is. No, it is not. The answer is yes. The answer is no.",
    "Describe the image. Answer the question with a single word or number.",
    "Which shape is the largest? Which colour is the smallest shape?",
    "The object on the left is bigger than the object on the right.",
    "Count the objects. What is in the picture? Where is the shape?",
    "a an and are at be big by colour color does for from has have how in is it many "
    "more most next number object objects of on or picture same shape shapes size small "
    "than that the there these this to what where which with word yes no",
    "0 1 2 3 4 5 6 7 8 9 10 11 12",
)


def _vocabulary_line() -> str:
    """Every task word on its own, so each one becomes a single ``▁word`` token."""
    words = COLOURS + SHAPES + tuple(f"{shape}s" for shape in SHAPES) + NUMBER_WORDS + POSITIONS
    words += ("yes", "no", "Yes", "No", "of", "the", "is", "are", "there", "What", "How", "many", "Is")
    return " ".join(words + tuple(str(digit) for digit in range(10)))


def _question_lines() -> list[str]:
    """Questions and answers of the shapes VQA task, one line each."""
    lines = []
    for colour in COLOURS:
        lines.append(f"The {colour} shape. It is {colour}. {colour.capitalize()}.")
    for shape in SHAPES:
        lines.append(f"What colour is the {shape}? What color is the {shape}?")
        lines.append(f"How many {shape}s are there? Is there a {shape}? {shape.capitalize()}.")
        for colour in COLOURS:
            lines.append(f"How many {colour} {shape}s are there? The {colour} {shape}.")
    for a in SHAPES:
        for b in SHAPES:
            lines.append(f"Is the {a} left of the {b}? Is the {a} right of the {b}?")
            lines.append(f"Is the {a} above the {b}? Is the {a} below the {b}?")
    for position in POSITIONS:
        lines.append(f"Which shape is at the {position}? The shape on the {position}.")
    for digit, word in enumerate(NUMBER_WORDS):
        lines.append(f"There are {word} shapes. {word.capitalize()}. {digit}.")
    return lines


def tokenizer_corpus() -> list[str]:
    """The fixed training corpus: chat-formatted VQA lines plus some general text."""
    lines = list(GENERAL_TEXT) + [_vocabulary_line()] * 2
    for line in _question_lines():
        lines.append(line)
        lines.append(f"USER: {IMAGE_TOKEN}\n{line} ASSISTANT: yes")
    return lines


def _pretokenize(text: str) -> list[str]:
    """Split text into words the way Llama's Metaspace(prepend_scheme="first", split=False) sees them.

    Added tokens (``<image>``) cut the text into segments; only the first segment gets the
    leading ``▁``; spaces become ``▁`` and each ``▁`` starts a new word.
    """
    words: list[str] = []
    for index, segment in enumerate(text.split(IMAGE_TOKEN)):
        segment = (SPACE if index == 0 else "") + segment.replace(" ", SPACE)
        current = ""
        for char in segment:
            if char == SPACE and current:
                words.append(current)
                current = ""
            current += char
        if current:
            words.append(current)
    return words


def train_bpe(corpus: list[str], vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train a byte-fallback BPE in the Llama layout; pure Python, so identical on every machine.

    Vocabulary order: ``<unk> <s> </s>``, ``<0x00>``..``<0xFF>``, the corpus characters
    (sorted), then one token per merge until ``vocab_size`` or no pair occurs twice.
    """
    vocab = {token: index for index, token in enumerate([UNK, BOS, EOS])}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    word_counts = Counter(word for line in corpus for word in _pretokenize(line))
    for char in sorted({char for word in word_counts for char in word}):
        vocab.setdefault(char, len(vocab))
    return learn_merges(word_counts, vocab, vocab_size)


def build_llama_tokenizer() -> LlamaTokenizer:
    """The tiny Llama tokenizer (BOS added, left padding) with ``<image>`` and ``<pad>`` special tokens."""
    vocab, merges = train_bpe(tokenizer_corpus(), BPE_VOCAB_SIZE)
    tokenizer = LlamaTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        add_bos_token=True,
        padding_side="left",
    )
    tokenizer.add_special_tokens({"pad_token": PAD, "extra_special_tokens": [IMAGE_TOKEN]})
    return tokenizer


def tiny_vision_config(image_size: int = IMAGE_SIZE, width: int = 64, layers: int = 3) -> CLIPVisionConfig:
    """CLIP ViT at toy size: 112 px, 14 px patches (8x8 + CLS), hidden 64, 3 layers (or ``image_size``, ``width``,
    ``layers``)."""
    return CLIPVisionConfig(
        image_size=image_size,
        patch_size=PATCH_SIZE,
        num_channels=3,
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        projection_dim=64,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )


def tiny_text_config(tokenizer: LlamaTokenizer) -> LlamaConfig:
    """Llama at toy size: hidden 128, 8 layers, 4 query heads / 2 KV heads, MLP 344 (2.69x)."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def tiny_llava_config(tokenizer: LlamaTokenizer | None = None, image_size: int = IMAGE_SIZE,
                      vision_width: int = 64, vision_layers: int = 3) -> LlavaConfig:
    """LLaVA-1.5 wiring at toy size (feature layer -2, "default" strategy, GELU projector)."""
    tokenizer = tokenizer if tokenizer is not None else build_llama_tokenizer()
    return LlavaConfig(
        vision_config=tiny_vision_config(image_size, vision_width, vision_layers),
        text_config=tiny_text_config(tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(image_size // PATCH_SIZE) ** 2,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def build_llava_processor(tokenizer: LlamaTokenizer, image_size: int = IMAGE_SIZE) -> LlavaProcessor:
    """The real ``LlavaProcessor``: CLIP preprocessing at 112 px (or ``image_size``) and ``<image>`` -> 64 image
    tokens (one per 14 px patch)."""
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        chat_template=LLAVA_CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )


def build_tiny_llava(save_dir: Path, image_size: int = IMAGE_SIZE, vision_width: int = 64,
                     vision_layers: int = 3) -> None:
    """Write the seeded upstream ``LlavaForConditionalGeneration`` and its processor to ``save_dir``."""
    tokenizer = build_llama_tokenizer()
    model = LlavaForConditionalGeneration(tiny_llava_config(tokenizer, image_size, vision_width, vision_layers))
    seeded_init_(model, seed=SEED)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    # transformers' default on-disk layout: the original llava-hf key names, the same layout as real
    # llava-hf checkpoints, converted at load time (the fork opts into the conversions too).
    model.save_pretrained(save_dir)
    build_llava_processor(tokenizer, image_size).save_pretrained(save_dir)


def tiny_llava_dir() -> Path:
    """Directory of the embedded tiny LLaVA-1.5 (built once into the cache)."""
    return cached_model_dir("llava", VERSION, build_tiny_llava)


CLUTTER_IMAGE_SIZE = 224
"""The cluttered-scene task's images (``data.vqa_clutter``): 16x16 patches, 256 vision tokens."""
CLUTTER_VISION = dict(vision_width=128, vision_layers=4)
"""Its CLIP tower, wider and deeper than the 112 px one: a shape spans several patches, and telling it from a part
of its outline needs the neighbouring patches (at width 64, 3 layers, a linear probe read a patch's shape 42% right
after 1000 steps, against 99% for its colour)."""
CLUTTER_VERSION = 1


def tiny_clutter_llava_dir() -> Path:
    """The embedded tiny LLaVA-1.5 at 224 px (256 vision tokens), its tower as :data:`CLUTTER_VISION`, the same
    tokenizer and LLM: the start of the cluttered-scene base."""
    return cached_model_dir("llava-224px", CLUTTER_VERSION,
                            lambda save_dir: build_tiny_llava(save_dir, CLUTTER_IMAGE_SIZE, **CLUTTER_VISION))
