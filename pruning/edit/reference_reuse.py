"""Cross-step reuse of reference-image token states in Qwen-Image-Edit.

The edit transformer runs its image stream over ``[B, L_denoise + L_image, D]``: the noisy
latents being denoised (``denoise_len`` = L1 tokens) followed by the latents of the reference
image (``reference_len`` = L2 tokens). The reference latents never change during an edit, so
their per-block states change little between denoising steps. On a *refresh* step everything
is computed exactly as upstream and the reference tokens' per-block states are cached; on a
*reuse* step part of the reference tokens' work is skipped and the cache stands in:

=======  ==========================================================================  ==================================
mode     reuse step, reference tokens                                               cached per block (refresh step)
=======  ==========================================================================  ==================================
``none`` the baseline: nothing cached, nothing skipped                              --
``mlp``  attention over all tokens as usual; norm2 + MLP skipped, block output      block output  ``[B, L_image, D]``
         taken from the cache
``full`` no queries: no Q, no attention output row, no to_out, no MLP; K/V          block input   ``[B, L_image, D]``
         projected from the cached block input under this step's modulation
``kv``   no projection at all: the cached K/V (after norm_k and RoPE) are the keys   K and V       ``2 x [B, L_image, H, d]``
=======  ==========================================================================  ==================================

The final ``proj_out`` rows of the reference tokens are discarded by the pipeline
(``noise_pred[:, :latents.size(1)]``), so in ``full``/``kv`` the reference rows leave the image
stream entirely on reuse steps and the transformer returns ``[B, L_denoise, C]``.

The hooks that call into this module sit in fenced branches of
``models/qwenimage/transformer_qwenimage.py``; a controller is handed to the transformer as
``attention_kwargs={"reference_token_reuse": controller}``. It tells steps apart by the
``timestep`` of each transformer call (calls that share a timestep are the CFG branches of one
step: branch 0 = cond, branch 1 = uncond), and keeps one cache per branch, never mixed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import prod
from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn

MODES = ("none", "mlp", "full", "kv")
REUSE_MODES = ("mlp", "full", "kv")
ATTENTION_KWARG = "reference_token_reuse"


# ----------------------------------------------------------------------------- schedule


def resolve_refresh_steps(refresh_steps: str | Sequence[int] | None, num_steps: int) -> tuple[int, ...]:
    """1-based steps on which every token is computed and the cache refreshed.

    * ``None`` / ``"alternate"`` (default): steps 1, 3, 5, ... (for 4 steps: 1 and 3, the
      default 4-step schedule: step 2 reuses step 1, step 4 reuses step 3);
    * ``"once"``: only step 1; every later step reuses it;
    * ``"all"``: every step (no reuse; equals the baseline);
    * a sequence of step numbers, which must contain 1 (nothing is cached before step 1).
    """
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_steps!r}")
    if refresh_steps is None or refresh_steps == "alternate":
        return tuple(range(1, num_steps + 1, 2))
    if refresh_steps == "once":
        return (1,)
    if refresh_steps == "all":
        return tuple(range(1, num_steps + 1))
    if isinstance(refresh_steps, str):
        try:
            refresh_steps = [int(s) for s in refresh_steps.replace(" ", "").split(",") if s]
        except ValueError:
            raise ValueError(
                f"refresh_steps {refresh_steps!r} is not 'alternate', 'once', 'all' or a comma-separated list of steps"
            ) from None
    steps = tuple(sorted(set(int(s) for s in refresh_steps)))
    bad = [s for s in steps if not 1 <= s <= num_steps]
    if bad:
        raise ValueError(f"refresh_steps names step(s) {bad} but the run has steps 1..{num_steps}")
    if 1 not in steps:
        raise ValueError(f"refresh_steps {list(steps)} must include step 1: nothing is cached before the first step")
    return steps


def validate_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown pruning mode {mode!r}; choose one of {', '.join(MODES)}")
    return mode


# ----------------------------------------------------------------------------- cache


@dataclass
class ReferenceTokenCache:
    """Per-block states of the reference tokens for one CFG branch.

    ``states[b]``: ``[B, L_image, D]`` (block output in ``mlp``, block input in ``full``);
    ``keys[b]``/``values[b]``: ``[B, L_image, H, d]`` in ``kv``.
    """

    states: dict[int, torch.Tensor] = field(default_factory=dict)
    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    values: dict[int, torch.Tensor] = field(default_factory=dict)

    def nbytes(self) -> int:
        tensors = [*self.states.values(), *self.keys.values(), *self.values.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def clear(self) -> None:
        self.states.clear()
        self.keys.clear()
        self.values.clear()


# ----------------------------------------------------------------------------- one transformer call


@dataclass
class ReferenceReuseCall:
    """What one transformer call does with the reference tokens (handed down to every block)."""

    mode: str
    is_reuse: bool  # False: a refresh step (upstream computation, cache written)
    denoise_len: int
    reference_len: int
    cache: ReferenceTokenCache
    reference_freqs: torch.Tensor | None = None  # RoPE rows of the reference tokens, [L_image, d/2] complex
    reference_modulate_index: torch.Tensor | None = None  # zero_cond_t index rows, [B, L_image]
    controller: "ReferenceTokenReuse | None" = None

    def end(self) -> None:
        """The call is over: let the controller account the cache size."""
        if self.controller is not None:
            self.controller.end_call()

    @property
    def drops_reference_rows(self) -> bool:
        """``full``/``kv`` reuse: the reference rows leave the image stream for the whole call."""
        return self.is_reuse and self.mode in ("full", "kv")

    def split_reference_rows(self, hidden_states, image_rotary_emb, modulate_index):
        """Keep only the denoise rows of the image stream.

        hidden_states ``[B, L1 + L2, D]`` -> ``[B, L1, D]``; RoPE image rows ``[L1 + L2, d/2]`` ->
        ``[L1, d/2]`` (the reference rows are kept for the reference keys); ``modulate_index``
        ``[B, L1 + L2]`` -> ``[B, L1]``.
        """
        l1 = self.denoise_len
        img_freqs, txt_freqs = image_rotary_emb
        self.reference_freqs = img_freqs[l1:]
        if modulate_index is not None:
            self.reference_modulate_index = modulate_index[:, l1:]
            modulate_index = modulate_index[:, :l1]
        return hidden_states[:, :l1], (img_freqs[:l1], txt_freqs), modulate_index

    def block(self, index: int) -> "BlockReferenceReuse":
        return BlockReferenceReuse(call=self, index=index)


@dataclass
class BlockReferenceReuse:
    """The view of one block (``index``) on the reference-token cache of the current call."""

    call: ReferenceReuseCall
    index: int
    reference_states: torch.Tensor | None = None  # full reuse: modulated reference rows [B, L2, D]

    # -- refresh steps: record ------------------------------------------------------------

    def record_block_input(self, hidden_states: torch.Tensor) -> None:
        """``full`` refresh: cache the block's input rows of the reference tokens ``[B, L2, D]``."""
        if self.call.mode == "full" and not self.call.is_reuse:
            self.call.cache.states[self.index] = hidden_states[:, self.call.denoise_len :].detach().clone()

    def record_block_output(self, hidden_states: torch.Tensor) -> None:
        """``mlp`` refresh: cache the block's output rows of the reference tokens ``[B, L2, D]``."""
        if self.call.mode == "mlp" and not self.call.is_reuse:
            self.call.cache.states[self.index] = hidden_states[:, self.call.denoise_len :].detach().clone()

    # -- reuse steps ----------------------------------------------------------------------

    def prepare_attention(self, block: "nn.Module", img_mod1: torch.Tensor) -> "BlockReferenceReuse":
        """``full`` reuse: the reference rows' attention input from the cached block input.

        cached input ``[B, L2, D]`` -> ``img_norm1`` -> this step's shift/scale (the t=0 half
        under ``zero_cond_t``) -> ``self.reference_states`` ``[B, L2, D]``.
        """
        if self.call.mode == "full" and self.call.is_reuse:
            cached_input = self.call.cache.states[self.index]
            modulate_index = self.call.reference_modulate_index
            # Copied from diffusers.models.transformers.transformer_qwenimage.QwenImageTransformerBlock.forward with self->block, hidden_states->cached_input
            img_normed = block.img_norm1(cached_input)
            img_modulated, img_gate1 = block._modulate(img_normed, img_mod1, modulate_index)
            # End copied
            self.reference_states = img_modulated
        return self

    @property
    def appended_key_len(self) -> int:
        """Number of reference key rows appended after the image stream's own keys."""
        return self.call.reference_len if self.call.drops_reference_rows else 0

    def extend_keys_values(self, attn: "nn.Module", img_key: torch.Tensor, img_value: torch.Tensor):
        """Record (``kv`` refresh) or append (``full``/``kv`` reuse) the reference K/V rows.

        img_key/img_value: ``[B, L_stream, H, d]`` after norm_k and RoPE. On a reuse step the
        stream holds the L1 denoise rows and the result is ``[B, L1 + L2, H, d]``.
        """
        call = self.call
        if call.mode == "kv" and not call.is_reuse:
            call.cache.keys[self.index] = img_key[:, call.denoise_len :].detach().clone()
            call.cache.values[self.index] = img_value[:, call.denoise_len :].detach().clone()
            return img_key, img_value
        if not call.drops_reference_rows:
            return img_key, img_value
        if call.mode == "kv":
            ref_key, ref_value = call.cache.keys[self.index], call.cache.values[self.index]
        else:
            ref_key, ref_value = project_reference_key_value(attn, self.reference_states, call.reference_freqs)
        return torch.cat([img_key, ref_key], dim=1), torch.cat([img_value, ref_value], dim=1)

    @property
    def skips_reference_mlp(self) -> bool:
        return self.call.mode == "mlp" and self.call.is_reuse

    def mlp_on_denoise_rows(self, block, hidden_states, img_mod2, modulate_index) -> torch.Tensor:
        """``mlp`` reuse: norm2 + MLP on the denoise rows only; reference rows from the cache.

        hidden_states ``[B, L1 + L2, D]`` (after the attention residual) -> ``[B, L1 + L2, D]``.
        """
        l1 = self.call.denoise_len
        denoise = hidden_states[:, :l1]
        index = modulate_index[:, :l1] if modulate_index is not None else None
        # Copied from diffusers.models.transformers.transformer_qwenimage.QwenImageTransformerBlock.forward with self->block, hidden_states->denoise, modulate_index->index
        img_normed2 = block.img_norm2(denoise)
        img_modulated2, img_gate2 = block._modulate(img_normed2, img_mod2, index)
        img_mlp_output = block.img_mlp(img_modulated2)
        denoise = denoise + img_gate2 * img_mlp_output
        # End copied
        return torch.cat([denoise, self.call.cache.states[self.index]], dim=1)


def project_reference_key_value(attn, reference_states: torch.Tensor, reference_freqs: torch.Tensor):
    """K/V of the reference tokens exactly as the upstream processor computes image K/V.

    reference_states ``[B, L2, D]`` -> to_k / to_v -> ``[B, L2, H, d]`` -> norm_k -> RoPE.
    No to_q: the reference tokens issue no queries on reuse steps.
    """
    from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

    # Copied from diffusers.models.transformers.transformer_qwenimage.QwenDoubleStreamAttnProcessor2_0.__call__ with hidden_states->reference_states, img_key->key, img_value->value
    key = attn.to_k(reference_states)
    value = attn.to_v(reference_states)
    # ...
    head_dim = attn.inner_dim // attn.heads
    # ...
    key = key.unflatten(-1, (-1, head_dim))
    value = value.unflatten(-1, (-1, head_dim))
    # ...
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    # End copied
    if reference_freqs is not None:  # upstream: `if image_rotary_emb is not None:`, here the reference rows of img_freqs
        # Copied from diffusers.models.transformers.transformer_qwenimage.QwenDoubleStreamAttnProcessor2_0.__call__ with img_key->key, img_freqs->reference_freqs
        key = apply_rotary_emb_qwen(key, reference_freqs, use_real=False)
        # End copied
    return key, value


# ----------------------------------------------------------------------------- controller


@dataclass
class StepRecord:
    step: int  # 1-based
    branch: int
    reuse: bool


class ReferenceTokenReuse:
    """Owns the schedule and the per-branch caches for one edit (one pipeline call).

    >>> controller = ReferenceTokenReuse("full", num_steps=4)            # refresh on 1 and 3
    >>> transformer(..., attention_kwargs={"reference_token_reuse": controller})
    """

    def __init__(self, mode: str, num_steps: int, refresh_steps: str | Sequence[int] | None = None):
        self.mode = validate_mode(mode)
        self.num_steps = num_steps
        self.refresh_steps = resolve_refresh_steps(refresh_steps, num_steps)
        self.caches: list[ReferenceTokenCache] = []
        self.history: list[StepRecord] = []
        self.peak_cache_bytes = 0
        self.token_counts: dict[str, int] = {}
        self._last_timestep: float | None = None
        self._step = 0  # 1-based index of the current step (0: none yet)
        self._branch = -1

    def begin_call(
        self, timestep: torch.Tensor, img_shapes, hidden_states_len: int, text_len: int = 0
    ) -> ReferenceReuseCall:
        """Start one transformer call: work out step/branch, refresh or reuse, L1 and L2."""
        t = float(timestep.reshape(-1)[0])
        if t != self._last_timestep:
            self._step += 1
            self._branch = 0
            self._last_timestep = t
        else:
            self._branch += 1
        if self._step > self.num_steps:
            raise RuntimeError(
                f"transformer called for step {self._step} but the controller was built for {self.num_steps} steps"
            )
        while len(self.caches) <= self._branch:
            self.caches.append(ReferenceTokenCache())

        shapes = img_shapes[0]
        denoise_len = prod(shapes[0])
        reference_len = sum(prod(s) for s in shapes[1:])
        if denoise_len + reference_len != hidden_states_len:
            raise ValueError(
                f"img_shapes give {denoise_len} denoise + {reference_len} reference tokens but the image stream has "
                f"{hidden_states_len}: reference-token reuse needs the edit pipeline's [noisy latents, image latents] layout"
            )
        is_reuse = self.mode != "none" and reference_len > 0 and self._step not in self.refresh_steps
        self.history.append(StepRecord(self._step, self._branch, is_reuse))
        self.token_counts = {"denoise": denoise_len, "image": reference_len, "text": text_len}
        cache = self.caches[self._branch]
        if not is_reuse:
            cache.clear()
        return ReferenceReuseCall(
            mode=self.mode,
            is_reuse=is_reuse,
            denoise_len=denoise_len,
            reference_len=reference_len,
            cache=cache,
            controller=self,
        )

    def end_call(self) -> None:
        self.peak_cache_bytes = max(self.peak_cache_bytes, self.cache_bytes())

    def cache_bytes(self) -> int:
        return sum(cache.nbytes() for cache in self.caches)

    def clear(self) -> None:
        """Free every cached tensor (called when a pipeline call ends, also on an exception)."""
        for cache in self.caches:
            cache.clear()
        self.caches.clear()

    def reuse_steps(self) -> list[int]:
        return [s for s in range(1, self.num_steps + 1) if s not in self.refresh_steps]
