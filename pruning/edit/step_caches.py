"""diffusers' own step caches on the forked Qwen-Image transformer: what users pick instead of reference reuse.

diffusers 0.42.1 ships training-free caches that skip transformer work on some denoising steps, attached with
``transformer.enable_cache(config)`` (``CacheMixin``) and removed with ``disable_cache()``:

* ``FirstBlockCacheConfig(threshold)``: run the first block; if its output changed by less than ``threshold``
  (relative L1) since the last fully computed step, skip the other blocks and add their cached residual;
* ``TaylorSeerCacheConfig(cache_interval, disable_cache_before_step, max_order)``: compute the attention and MLP
  modules every ``cache_interval`` steps and extrapolate their outputs with a Taylor series in between;
* ``MagCacheConfig(threshold, retention_ratio, num_inference_steps, mag_ratios)``: skip the blocks while the
  accumulated, pre-calibrated change in residual magnitude stays under ``threshold`` (``mag_ratios`` come from a
  calibration run, ``calibrate=True``, :func:`calibrate_mag_ratios`).

The block-level caches look up the block class in diffusers' ``TransformerBlockRegistry`` (which output is the
image stream, which the text stream). The fork's ``QwenImageTransformerBlock`` is a copy of upstream's, a different
class object, so :func:`register_fork_blocks` registers it with upstream's own metadata before a cache is attached.

:class:`WorkCounter` counts, per transformer call, which blocks' attention and MLPs actually ran: the cached steps'
share of the real-shape FLOPs follows from it (``evaluation.flops.qwenimage_counted_flops``).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch

CACHE_METHODS = ("first_block_cache", "taylorseer_cache", "mag_cache")


def register_fork_blocks() -> None:
    """Give the fork's block class upstream's ``TransformerBlockRegistry`` entry (idempotent)."""
    from diffusers.hooks._helpers import TransformerBlockRegistry
    from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformerBlock as UpstreamBlock

    from models.qwenimage.transformer_qwenimage import QwenImageTransformerBlock as ForkBlock

    upstream = TransformerBlockRegistry.get(UpstreamBlock)
    if ForkBlock not in TransformerBlockRegistry._registry:
        from diffusers.hooks._helpers import TransformerBlockMetadata

        TransformerBlockRegistry.register(ForkBlock, TransformerBlockMetadata(
            return_hidden_states_index=upstream.return_hidden_states_index,
            return_encoder_hidden_states_index=upstream.return_encoder_hidden_states_index))


def cache_config(name: str, num_steps: int, mag_ratios: list[float] | None = None, **overrides):
    """The diffusers cache config called ``name`` (``CACHE_METHODS``), set for ``num_steps`` sampling steps.

    Defaults, chosen for 4 steps: FirstBlockCache threshold 0.2 (diffusers' examples use 0.05-0.2 for 28-50 steps;
    at 4 steps consecutive steps differ more); TaylorSeer computes steps 1 and 2 and every second step after
    (``disable_cache_before_step=2``, ``cache_interval=2``, first order); MagCache threshold 0.06 and
    ``retention_ratio`` 0.25 (step 1 always computed) with calibrated ``mag_ratios``.
    """
    from diffusers import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    if name == "first_block_cache":
        return FirstBlockCacheConfig(**{"threshold": 0.2, **overrides})
    if name == "taylorseer_cache":
        return TaylorSeerCacheConfig(**{"cache_interval": 2, "disable_cache_before_step": 2, "max_order": 1,
                                        "taylor_factors_dtype": torch.float32, **overrides})
    if name == "mag_cache":
        if mag_ratios is None and not overrides.get("calibrate"):
            raise ValueError("mag_cache needs mag_ratios from a calibration run (calibrate_mag_ratios)")
        return MagCacheConfig(**{"threshold": 0.06, "retention_ratio": 0.25, "num_inference_steps": num_steps,
                                 "mag_ratios": mag_ratios, **overrides})
    raise ValueError(f"unknown cache {name!r}; expected one of {CACHE_METHODS}")


@contextmanager
def step_cache(transformer, config) -> Iterator[None]:
    """``transformer.enable_cache(config)`` for the block, ``disable_cache()`` after it (also on an exception)."""
    register_fork_blocks()
    transformer.enable_cache(config)
    try:
        yield
    finally:
        transformer.disable_cache()


def calibrate_mag_ratios(run_edit, transformer, num_steps: int) -> list[float]:
    """MagCache's ``mag_ratios`` for this model: ``run_edit()`` (one edit of ``num_steps`` steps) under a calibrating
    ``MagCacheConfig``, whose hook records the per-step ratio of residual magnitudes in its state.

    The hook clears that record (after printing it) when it reaches ``num_inference_steps``, and the pipeline resets
    the hooks' state when its call ends; so the calibration runs for one step more than the edit has, and the record
    is read from the hook's state after every transformer call.
    """
    from diffusers.hooks import HookRegistry

    register_fork_blocks()
    transformer.enable_cache(cache_config("mag_cache", num_steps + 1, calibrate=True))
    recorded: list[float] = []

    def read_ratios(*_):  # after every transformer call: the pipeline resets stateful hooks when its call ends
        for module in transformer.modules():
            registry = getattr(module, "_diffusers_hook", None)
            for hook in registry.hooks.values() if isinstance(registry, HookRegistry) else ():
                for state in getattr(getattr(hook, "state_manager", None), "_state_cache", {}).values():
                    ratios = getattr(state, "calibration_ratios", None)
                    if ratios and len(ratios) > len(recorded):
                        recorded[:] = [float(r) for r in ratios]

    handle = transformer.register_forward_hook(read_ratios)
    try:
        run_edit()
        if len(recorded) != num_steps:
            raise RuntimeError(f"MagCache calibration recorded {len(recorded)} ratios for {num_steps} steps")
        return list(recorded)
    finally:
        handle.remove()
        transformer.disable_cache()


@dataclass
class WorkCounter:
    """Counts, over a run, how many times each block's attention, image MLP and text MLP ran (a forward pre-hook on
    each part's first Linear, so a cache that skips or predicts the part is seen doing so), and how many transformer
    calls there were."""

    transformer: torch.nn.Module
    counts: dict[str, int] = field(default_factory=lambda: {"attn": 0, "img_mlp": 0, "txt_mlp": 0, "calls": 0})

    def __post_init__(self) -> None:
        self._handles = [self.transformer.register_forward_pre_hook(lambda *_: self._count("calls"))]
        for block in self.transformer.transformer_blocks:
            for name in ("attn", "img_mlp", "txt_mlp"):
                # the part's first Linear: a cache that hooks the part itself (TaylorSeer) replaces its forward, so
                # a hook on the part would fire for predicted outputs too; its Linears run only when it computes
                first = next(m for m in getattr(block, name).modules() if isinstance(m, torch.nn.Linear))
                self._handles.append(first.register_forward_pre_hook(lambda *_, name=name: self._count(name)))

    def _count(self, name: str) -> None:
        self.counts[name] += 1

    def reset(self) -> None:
        self.counts = {key: 0 for key in self.counts}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
