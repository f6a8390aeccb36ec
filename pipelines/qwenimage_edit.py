"""``TokenPruningQwenImageEditPipeline`` and ``TokenPruningQwenImageEditPlusPipeline``: the stock diffusers edit
pipelines (Qwen-Image-Edit; Qwen-Image-Edit-2509 / 2511, one or several reference images) on the forked transformer.

Everything the stock ``QwenImageEditPipeline`` / ``QwenImageEditPlusPipeline`` takes still works; ``__call__`` adds
``pruning_mode`` (``"none" | "mlp" | "full" | "kv"``, see ``pruning/edit/reference_reuse.py``) and
``refresh_steps``. With ``pruning_mode="none"`` the call *is* the stock call (bit-identical
output, tested). Otherwise the call runs inside ``reference_reuse(self.transformer, ...)``: a diffusers
hook on the forked transformer keeps one cache per true-CFG branch (the stock pipeline's
``cache_context("cond")`` / ``("uncond")``) and is removed, caches freed, when the call ends, also on
an exception. Statistics of the last call: ``pipe.last_reuse_stats``.

In the Plus pipeline every reference image's tokens are reference tokens: the stock call concatenates
their latents after the noisy latents (``[B, L_denoise + L_reference_1 + L_reference_2 + ..., C]``), so one
cache holds them all. :func:`edit_pipeline_class` picks the class from a directory's ``model_index.json``.

Inputs are checked before any work, each failure one ``ValueError`` line that names the argument and
the rule (``pipelines/qwenimage_edit_limits.py`` says where every limit comes from): ``image`` must be
a PIL image (Plus: or a list of them); ``height``/``width`` ``None`` or a positive multiple of 16 (the stock call rounds 17 down
to 16 and turns 0 into ~1024 px); at most the scheduler's ``max_image_seq_len`` output tokens; the
prompt and the image grids within the transformer's 4096 RoPE positions. A prompt longer than
``max_sequence_length`` tokens (default 512, at most 1024) is truncated to it with a warning, where
the stock edit pipeline ignores ``max_sequence_length``. The denoising progress bar reads ``denoise``.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import logging
import math
import os
import signal
import sys
import threading
from typing import Any

import PIL.Image
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline, QwenImageEditPlusPipeline

from models.qwenimage.transformer_qwenimage import QwenImageTransformer2DModel
from pipelines.qwenimage_edit_limits import (
    DEFAULT_MAX_SEQUENCE_LENGTH,
    REFERENCE_AREA,
    EditInputError,
    LoRALoadError,
    check_lora_source,
    check_reference_area,
    check_max_sequence_length,
    explain_lora_failure,
    output_size,
    reference_dims,
    rope_image_extent,
)
from pruning.edit.reference_reuse import MODES, reference_reuse, validate_mode
from pruning.common import check_int

logger = logging.getLogger(__name__)

# Scheduler settings published with Qwen-Image-Lightning (4/8-step LoRAs): flow matching with a
# dynamic, exponential time shift whose base and max shift are both log(3).
LIGHTNING_SCHEDULER_CONFIG: dict[str, Any] = {
    "base_image_seq_len": 256,
    "base_shift": math.log(3),
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": math.log(3),
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": None,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}

STOCK_DEFAULT_STEPS = 50  # QwenImageEditPipeline.__call__'s (and the Plus pipeline's) default num_inference_steps

# ----------------------------------------------------------------------------- reference_area
# The stock __call__ encodes every reference at calculate_dimensions(1024 * 1024, ratio) (the Plus pipeline:
# calculate_dimensions(VAE_IMAGE_SIZE, ratio), also 1024 * 1024), a literal inside the call. To encode it at another
# area without copying the call, the stock module's calculate_dimensions is wrapped, on the first call that asks
# for another area, by a function that substitutes the area of the current call (a context variable: other calls
# and other threads see upstream's function unchanged). The call passes an explicit output size, so only the
# reference's size changes (the Plus pipeline's 384 x 384 condition image for the text encoder is another area and
# stays as it is).

_reference_area: contextvars.ContextVar[int] = contextvars.ContextVar("reference_area", default=REFERENCE_AREA)


def _area_aware(calculate_dimensions):
    def calculate_dimensions_at_reference_area(target_area, ratio):
        if target_area == REFERENCE_AREA:
            target_area = _reference_area.get()
        return calculate_dimensions(target_area, ratio)

    calculate_dimensions_at_reference_area.upstream = calculate_dimensions
    return calculate_dimensions_at_reference_area


@contextlib.contextmanager
def _encode_reference_at(stock_class: type, area: int):
    """Within the block, ``stock_class.__call__`` encodes its reference image(s) at ``area`` px instead of 1024 x 1024."""
    if area == REFERENCE_AREA:
        yield
        return
    module = sys.modules[stock_class.__module__]
    if not hasattr(module.calculate_dimensions, "upstream"):
        module.calculate_dimensions = _area_aware(module.calculate_dimensions)
    token = _reference_area.set(area)
    try:
        yield
    finally:
        _reference_area.reset(token)


@contextlib.contextmanager
def _ctrl_c_held():
    """Hold Ctrl-C for the block; yields a list that is non-empty if it was pressed (the caller re-raises it).

    A KeyboardInterrupt inside ``tqdm.__init__`` (right after the bar first prints) leaves a half-built bar whose
    ``__del__`` prints a traceback at exit; held, the interrupt is delivered a moment later, to a whole bar.
    """
    pending: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield pending
        return
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        yield pending
    finally:
        signal.signal(signal.SIGINT, previous)


class _ReferenceReuseEditPipeline:
    """What both token-pruning edit pipelines add to their stock class (the next class in the MRO): loading with
    the forked transformer, input checks before any work, and ``pruning_mode`` / ``refresh_steps`` on ``__call__``."""

    stock_class: type  # the diffusers pipeline it extends
    last_reuse_stats: dict[str, Any] | None = None

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *,
        lora: str | None = None,
        lora_weight_name: str | None = None,
        **kwargs,
    ):
        """Load any diffusers-format Qwen-Image-Edit directory or hub id, with the forked transformer.

        ``lora``: a Lightning LoRA (a .safetensors file, a directory or a hub id; ``lora_weight_name``
        picks the file inside a repo, e.g. ``Qwen-Image-Edit-Lightning-4steps-V1.0.safetensors``)
        applied with ``load_lora_weights``; the scheduler is then switched to the Lightning
        settings (``LIGHTNING_SCHEDULER_CONFIG``). A LoRA that cannot be found or loaded raises
        ``LoRALoadError`` naming the LoRA (a missing local one before the model is loaded).
        """
        check_lora_source(lora, lora_weight_name)
        config_kwargs = {k: kwargs[k] for k in ("local_files_only", "revision") if k in kwargs}
        named = DiffusionPipeline.load_config(pretrained_model_name_or_path, **config_kwargs).get("_class_name")
        if named in EDIT_PIPELINES and named != cls.stock_class.__name__:  # e.g. Edit-2509 weights in the Edit pipeline
            raise ValueError(f"{str(pretrained_model_name_or_path)!r} is a {named} model: load it with "
                             f"{EDIT_PIPELINES[named].__name__} (edit_pipeline_class picks the right one)")
        transformer = kwargs.pop("transformer", None)
        if transformer is None:
            transformer_kwargs = {k: kwargs[k] for k in ("dtype", "torch_dtype", "local_files_only", "revision") if k in kwargs}
            transformer = QwenImageTransformer2DModel.from_pretrained(
                pretrained_model_name_or_path, subfolder="transformer", **transformer_kwargs
            )
        # load every other component the stock way, then register the fork as the transformer
        pipe = super().from_pretrained(pretrained_model_name_or_path, transformer=None, **kwargs)
        pipe.register_modules(transformer=transformer)
        if lora is not None:
            lora_kwargs = {"weight_name": lora_weight_name} if lora_weight_name else {}
            try:
                pipe.load_lora_weights(lora, **lora_kwargs)
            except Exception as error:  # noqa: BLE001 - any failure here is the LoRA's, not the model's
                raise explain_lora_failure(lora, lora_weight_name, error) from error
            pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(LIGHTNING_SCHEDULER_CONFIG)
        return pipe

    def progress_bar(self, iterable=None, total=None):
        """The stock bar, labelled with what it counts (``denoise`` steps) unless ``set_progress_bar_config`` says."""
        config = getattr(self, "_progress_bar_config", {})
        if not isinstance(config, dict):
            return super().progress_bar(iterable=iterable, total=total)
        self._progress_bar_config = {"desc": "denoise", "unit": "step", **config}
        try:
            with _ctrl_c_held() as pressed:
                bar = super().progress_bar(iterable=iterable, total=total)
        finally:
            self._progress_bar_config = config
        if pressed:
            bar.close()
            signal.raise_signal(signal.SIGINT)  # now to the usual handler: KeyboardInterrupt
        return bar

    def _reference_images(self, call: dict[str, Any]) -> list[PIL.Image.Image]:
        """The call's reference images, checked (``call["image"]`` normalised from a tuple to a list)."""
        raise NotImplementedError

    def _check_call(self, call: dict[str, Any], reference_area: int = REFERENCE_AREA) -> None:
        """Every argument rule of an edit, before any work (``EditInputError``, a ``ValueError``, one line); with
        another ``reference_area`` than upstream's, the output size is made explicit in ``call``."""
        images = self._reference_images(call)
        steps = call.get("num_inference_steps", STOCK_DEFAULT_STEPS)
        check_int("num_inference_steps", steps, lo=1, error=EditInputError)
        per_prompt = call.get("num_images_per_prompt", 1)
        check_int("num_images_per_prompt", per_prompt, lo=1, error=EditInputError)
        check_max_sequence_length(call.get("max_sequence_length", DEFAULT_MAX_SEQUENCE_LENGTH))
        max_tokens = int(self.scheduler.config.get("max_image_seq_len", 4096))  # the stock calculate_shift default
        # the output size follows the last reference image (the Plus pipeline's rule; the Edit pipeline has one)
        height, width = output_size(call.get("height"), call.get("width"), images[-1].size, max_tokens,
                                    reference_area=reference_area)
        if reference_area != REFERENCE_AREA:  # upstream's default output size (~1 MP), made explicit: only the reference shrinks
            call["height"], call["width"] = height, width
        pos_embed = getattr(self.transformer, "pos_embed", None)
        if hasattr(pos_embed, "pos_freqs") and hasattr(pos_embed, "scale_rope"):
            sizes = [(height, width)] + [reference_dims(image.size, reference_area)[::-1] for image in images]
            extent = rope_image_extent(sizes, pos_embed.scale_rope)
            self._rope_check = (extent, int(pos_embed.pos_freqs.shape[0]))

    def _truncate_prompt(self, prompt, max_length: int, name: str):
        """``prompt`` cut to its first ``max_length`` tokens, with a warning (only when it is longer)."""
        if not (isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(p, str) for p in prompt))):
            return prompt  # None, or a wrong type that the stock check_inputs reports
        tokenizer = getattr(self.processor, "tokenizer", None) or self.tokenizer
        out = []
        for text in [prompt] if isinstance(prompt, str) else prompt:
            ids = tokenizer(text, add_special_tokens=False, truncation=True, max_length=max_length + 1)["input_ids"]
            if len(ids) > max_length:
                logger.warning(
                    f"{name} is longer than max_sequence_length={max_length} tokens: truncated to its first "
                    f"{max_length} tokens (pass max_sequence_length, at most 1024, to keep more)"
                )
                text = tokenizer.decode(ids[:max_length])
            out.append(text)
        return out[0] if isinstance(prompt, str) else out

    def encode_prompt(self, *args, **kwargs):
        """The stock ``encode_prompt``; then text and image must fit the transformer's RoPE table (one line if not)."""
        prompt_embeds, prompt_embeds_mask = super().encode_prompt(*args, **kwargs)
        check = getattr(self, "_rope_check", None)
        if check is not None and check[0] + prompt_embeds.shape[1] > check[1]:
            extent, positions = check
            raise EditInputError(
                f"prompt: the text takes {prompt_embeds.shape[1]} RoPE positions (prompt, template and the reference "
                f"image's vision tokens) after the image grids' {extent}, more than the transformer's {positions}: "
                f"shorten the prompt (max_sequence_length) or use a smaller or less elongated size"
            )
        return prompt_embeds, prompt_embeds_mask

    def __call__(
        self,
        *args,
        pruning_mode: str = "none",
        refresh_steps: str | list[int] | tuple[int, ...] | None = None,
        reference_area: int = REFERENCE_AREA,
        **kwargs,
    ):
        """The stock ``__call__`` plus ``pruning_mode``, ``refresh_steps`` (default: steps 1, 3, 5, ...) and
        ``reference_area``: the area in px at which each reference image is VAE-encoded (upstream's 1024 x 1024 by
        default; 512 * 512 gives a quarter of the reference tokens). The output size is unchanged by it."""
        validate_mode(pruning_mode)
        check_reference_area(reference_area)
        if not isinstance(self.transformer, QwenImageTransformer2DModel):
            raise TypeError(
                f"{type(self).__name__} needs the forked transformer "
                "(models.qwenimage.transformer_qwenimage.QwenImageTransformer2DModel); load it with from_pretrained"
            )
        stock_call = inspect.signature(self.stock_class.__call__)
        call = dict(stock_call.bind(self, *args, **kwargs).arguments)  # every argument by name
        del call["self"]
        self._rope_check = None
        self._check_call(call, reference_area)
        max_length = call.get("max_sequence_length", DEFAULT_MAX_SEQUENCE_LENGTH)
        for name in ("prompt", "negative_prompt"):
            if name in call:
                call[name] = self._truncate_prompt(call[name], max_length, name)
        num_steps = call.get("num_inference_steps", STOCK_DEFAULT_STEPS)
        try:
            if pruning_mode == "none":
                self.last_reuse_stats = {"mode": "none", "refresh_steps": list(range(1, num_steps + 1)), "cache_bytes": 0}
                with _encode_reference_at(self.stock_class, reference_area):
                    return super().__call__(**call)

            with _encode_reference_at(self.stock_class, reference_area), \
                    reference_reuse(self.transformer, pruning_mode, num_steps, refresh_steps) as reuse:
                try:
                    return super().__call__(**call)
                finally:
                    self.last_reuse_stats = {
                        "mode": pruning_mode,
                        "refresh_steps": list(reuse.refresh_steps),
                        "reuse_steps": reuse.reuse_steps(),
                        "cache_bytes": reuse.peak_cache_bytes,
                        "tokens": dict(reuse.token_counts),
                        "calls": [vars(record) for record in reuse.history],
                    }
        finally:
            self._rope_check = None


class TokenPruningQwenImageEditPipeline(_ReferenceReuseEditPipeline, QwenImageEditPipeline):
    """``QwenImageEditPipeline`` (Qwen-Image-Edit: one reference image) on the fork with reference-token reuse."""

    stock_class = QwenImageEditPipeline

    def _reference_images(self, call: dict[str, Any]) -> list[PIL.Image.Image]:
        image = call.get("image")
        if isinstance(image, (list, tuple)) and len(image) > 1:
            raise EditInputError(
                f"QwenImageEditPipeline edits one reference image, got {len(image)}; pass a single image, or use "
                "TokenPruningQwenImageEditPlusPipeline (Qwen-Image-Edit-2509 / 2511) for several"
            )
        if isinstance(image, tuple):
            call["image"] = image = list(image)
        first = image[0] if isinstance(image, list) and image else image
        if not isinstance(first, PIL.Image.Image):
            got = "None" if image is None else ("an empty list" if isinstance(image, list) and not image
                                                else type(first).__name__)
            raise EditInputError(
                f"image must be the reference image as a PIL.Image.Image (or a list of one), got {got}"
            )
        return [first]


class TokenPruningQwenImageEditPlusPipeline(_ReferenceReuseEditPipeline, QwenImageEditPlusPipeline):
    """``QwenImageEditPlusPipeline`` (Qwen-Image-Edit-2509 / 2511: one or several reference images) on the fork with
    reference-token reuse: the tokens of every reference image are cached on refresh steps and reused on the others."""

    stock_class = QwenImageEditPlusPipeline

    def _reference_images(self, call: dict[str, Any]) -> list[PIL.Image.Image]:
        image = call.get("image")
        if isinstance(image, tuple):
            call["image"] = image = list(image)
        images = image if isinstance(image, list) else [image]
        if not images:
            raise EditInputError("image must be one or several reference images (PIL.Image.Image), got an empty list")
        for index, each in enumerate(images):
            if not isinstance(each, PIL.Image.Image):
                where = "image" if not isinstance(image, list) else f"image[{index}]"
                raise EditInputError(
                    f"{where} must be a reference image as a PIL.Image.Image, got {type(each).__name__}"
                )
        return images


EDIT_PIPELINES = {
    "QwenImageEditPipeline": TokenPruningQwenImageEditPipeline,
    "QwenImageEditPlusPipeline": TokenPruningQwenImageEditPlusPipeline,
}
"""The stock class a diffusers directory's ``model_index.json`` names -> the token-pruning pipeline that extends it."""


def edit_pipeline_class(pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> type:
    """The token-pruning pipeline for a Qwen-Image-Edit directory or hub id, from its ``model_index.json``
    (``_class_name``): Qwen-Image-Edit -> :class:`TokenPruningQwenImageEditPipeline`, Edit-2509 / 2511 ->
    :class:`TokenPruningQwenImageEditPlusPipeline`. Another pipeline: one-line ``ValueError``."""
    config = DiffusionPipeline.load_config(pretrained_model_name_or_path, **kwargs)
    name = config.get("_class_name")
    if name not in EDIT_PIPELINES:
        raise ValueError(
            f"{str(pretrained_model_name_or_path)!r} holds a {name!r} pipeline (model_index.json), not one of "
            f"{', '.join(EDIT_PIPELINES)}: pass a Qwen-Image-Edit, Edit-2509 or Edit-2511 model"
        )
    return EDIT_PIPELINES[name]


__all__ = [
    "EDIT_PIPELINES",
    "LIGHTNING_SCHEDULER_CONFIG",
    "MODES",
    "EditInputError",
    "LoRALoadError",
    "TokenPruningQwenImageEditPipeline",
    "TokenPruningQwenImageEditPlusPipeline",
    "edit_pipeline_class",
]
