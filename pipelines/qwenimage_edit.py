"""``TokenPruningQwenImageEditPipeline``: the stock diffusers edit pipeline on the forked transformer.

Everything the stock ``QwenImageEditPipeline`` takes still works; ``__call__`` adds
``pruning_mode`` (``"none" | "mlp" | "full" | "kv"``, see ``pruning/edit/reference_reuse.py``) and
``refresh_steps``. With ``pruning_mode="none"`` the call *is* the stock call (bit-identical
output, tested). Otherwise a ``ReferenceTokenReuse`` controller rides along in
``attention_kwargs`` into the fork's fenced branches, and its cache is freed when the call
ends, also on an exception. Statistics of the last call: ``pipe.last_reuse_stats``.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline

from models.qwenimage.transformer_qwenimage import QwenImageTransformer2DModel
from pruning.edit.reference_reuse import ATTENTION_KWARG, MODES, ReferenceTokenReuse, validate_mode

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

STOCK_DEFAULT_STEPS = 50  # QwenImageEditPipeline.__call__'s default num_inference_steps


class TokenPruningQwenImageEditPipeline(QwenImageEditPipeline):
    """``QwenImageEditPipeline`` whose transformer is the fork with reference-token reuse."""

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
        settings (``LIGHTNING_SCHEDULER_CONFIG``).
        """
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
            pipe.load_lora_weights(lora, **lora_kwargs)
            pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(LIGHTNING_SCHEDULER_CONFIG)
        return pipe

    def __call__(
        self,
        *args,
        pruning_mode: str = "none",
        refresh_steps: str | list[int] | tuple[int, ...] | None = None,
        **kwargs,
    ):
        """The stock ``__call__`` plus ``pruning_mode`` and ``refresh_steps`` (default: steps 1, 3, 5, ...)."""
        validate_mode(pruning_mode)
        if not isinstance(self.transformer, QwenImageTransformer2DModel):
            raise TypeError(
                "TokenPruningQwenImageEditPipeline needs the forked transformer "
                "(models.qwenimage.transformer_qwenimage.QwenImageTransformer2DModel); load it with from_pretrained"
            )
        image = kwargs.get("image", args[0] if args else None)
        if isinstance(image, (list, tuple)) and len(image) > 1:
            raise ValueError(
                f"QwenImageEditPipeline edits one reference image, got {len(image)}; "
                "pass a single image (multi-image editing is QwenImageEditPlusPipeline)"
            )
        num_steps = kwargs.get("num_inference_steps", STOCK_DEFAULT_STEPS)
        if pruning_mode == "none":
            self.last_reuse_stats = {"mode": "none", "refresh_steps": list(range(1, num_steps + 1)), "cache_bytes": 0}
            return super().__call__(*args, **kwargs)

        controller = ReferenceTokenReuse(pruning_mode, num_steps=num_steps, refresh_steps=refresh_steps)
        kwargs["attention_kwargs"] = {**(kwargs.get("attention_kwargs") or {}), ATTENTION_KWARG: controller}
        try:
            return super().__call__(*args, **kwargs)
        finally:
            self.last_reuse_stats = {
                "mode": pruning_mode,
                "refresh_steps": list(controller.refresh_steps),
                "reuse_steps": controller.reuse_steps(),
                "cache_bytes": controller.peak_cache_bytes,
                "tokens": dict(controller.token_counts),
                "calls": [vars(record) for record in controller.history],
            }
            controller.clear()


__all__ = ["TokenPruningQwenImageEditPipeline", "LIGHTNING_SCHEDULER_CONFIG", "MODES"]
