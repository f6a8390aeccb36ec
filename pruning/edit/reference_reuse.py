"""Cross-step reuse of reference-image token states in Qwen-Image-Edit.

The edit transformer runs its image stream over ``[B, L_denoise + L_reference, D]``: the noisy
latents being denoised (``denoise_len`` = L1 tokens) followed by the latents of the reference
image (``reference_len`` = L2 tokens). The reference latents never change during an edit, so
their per-block states change little between denoising steps. On a *refresh* step everything
is computed exactly as upstream and the reference tokens' per-block states are cached; on a
*reuse* step part of the reference tokens' work is skipped and the cache stands in:

=======  ==========================================================================  ==================================
mode     reuse step, reference tokens                                               cached per block (refresh step)
=======  ==========================================================================  ==================================
``none`` the baseline: nothing cached, nothing skipped                              --
``mlp``  attention over all tokens as usual; norm2 + MLP skipped, block output      block output  ``[B, L_reference, D]``
         taken from the cache
``full`` no queries: no Q, no attention output row, no to_out, no MLP; K/V          block input   ``[B, L_reference, D]``
         projected from the cached block input under this step's modulation
``kv``   no projection at all: the cached K/V (after norm_k and RoPE) are the keys   K and V       ``2 x [B, L_reference, H, d]``
=======  ==========================================================================  ==================================

The final ``proj_out`` rows of the reference tokens are discarded by the pipeline
(``noise_pred[:, :latents.size(1)]``), so in ``full``/``kv`` the reference rows leave the image
stream entirely on reuse steps and the transformer returns ``[B, L_denoise, C]``.

The fences that call into this module sit in ``models/qwenimage/transformer_qwenimage.py``.
``with reference_reuse(transformer, mode, num_steps, refresh_steps):`` (or
``apply_reference_reuse`` / ``remove_reference_reuse``) registers a diffusers hook
(:class:`ReferenceReuseHook`) on the transformer. The pipelines open ``cache_context("cond")``
(and ``cache_context("uncond")`` under true CFG) around every transformer call; the hook keeps
one :class:`ReferenceReuseBranch` per context name (diffusers' ``StateManager``), each with its
own step count and cache, never mixed, and hands the current one to the forward in
``attention_kwargs["reference_token_reuse"]``. Detached, the transformer runs upstream's code.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from math import prod
from typing import TYPE_CHECKING

import torch
from diffusers.hooks.hooks import BaseState, HookRegistry, ModelHook, StateManager

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

    ``states[b]``: ``[B, L_reference, D]`` (block output in ``mlp``, block input in ``full``);
    ``keys[b]``/``values[b]``: ``[B, L_reference, H, d]`` in ``kv``.
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
    reference_freqs: torch.Tensor | None = None  # RoPE rows of the reference tokens, [L_reference, d/2] complex
    reference_modulate_index: torch.Tensor | None = None  # zero_cond_t index rows, [B, L_reference]
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
    reference_states: torch.Tensor | None = None  # full reuse: modulated reference rows [B, L2, D] (set by the block)

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

    @property
    def needs_reference_states(self) -> bool:
        """``full`` reuse: the block must rebuild the reference rows' attention input from the cached block input."""
        return self.call.mode == "full" and self.call.is_reuse

    def cached_block_input(self) -> torch.Tensor:
        """``full`` reuse: this block's input rows of the reference tokens on the last refresh step, ``[B, L2, D]``."""
        return self.call.cache.states[self.index]

    @property
    def reference_modulate_index(self) -> torch.Tensor | None:
        """``zero_cond_t`` modulation index of the reference rows ``[B, L2]`` (None without zero_cond_t)."""
        return self.call.reference_modulate_index

    @property
    def denoise_len(self) -> int:
        return self.call.denoise_len

    @property
    def appended_key_len(self) -> int:
        """Number of reference key rows appended after the image stream's own keys."""
        return self.call.reference_len if self.call.drops_reference_rows else 0

    def reference_keys_values(self, attn: "nn.Module", img_key: torch.Tensor, img_value: torch.Tensor):
        """Record (``kv`` refresh) the reference K/V rows, or return those to append (``full``/``kv`` reuse).

        img_key/img_value: ``[B, L_stream, H, d]`` after norm_k and RoPE. On a reuse step the stream
        holds the L1 denoise rows, and the result is the reference rows ``([B, L2, H, d], [B, L2, H, d])``
        that the processor appends after them, in the same concatenation as the text rows (one copy of
        the keys, not two). Otherwise None: the keys are the upstream ones.
        """
        call = self.call
        if call.mode == "kv" and not call.is_reuse:
            call.cache.keys[self.index] = img_key[:, call.denoise_len :].detach().clone()
            call.cache.values[self.index] = img_value[:, call.denoise_len :].detach().clone()
            return None
        if not call.drops_reference_rows:
            return None
        if call.mode == "kv":
            return call.cache.keys[self.index], call.cache.values[self.index]
        return project_reference_key_value(attn, self.reference_states, call.reference_freqs)

    @property
    def skips_reference_mlp(self) -> bool:
        return self.call.mode == "mlp" and self.call.is_reuse

    def with_cached_block_output(self, denoise_states: torch.Tensor) -> torch.Tensor:
        """``mlp`` reuse: the block's output ``[B, L1, D]`` of the denoise rows + the cached reference rows -> ``[B, L1 + L2, D]``."""
        return torch.cat([denoise_states, self.call.cache.states[self.index]], dim=1)


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


# ----------------------------------------------------------------------------- per-edit state, per-branch state, hook


@dataclass
class StepRecord:
    step: int  # 1-based step of this branch
    branch: str  # the pipeline's cache_context name: "cond" or "uncond"
    reuse: bool


class ReferenceTokenReuse:
    """The reuse plan and statistics of one edit (one pipeline call); the branches hold the caches.

    >>> with reference_reuse(pipe.transformer, "full", num_steps=4) as reuse:   # refresh on 1 and 3
    ...     pipe(...)                               # cache_context("cond") / ("uncond") pick the branch
    >>> reuse.peak_cache_bytes, reuse.history
    """

    def __init__(self, mode: str, num_steps: int, refresh_steps: str | Sequence[int] | None = None):
        self.mode = validate_mode(mode)
        self.num_steps = num_steps
        self.refresh_steps = resolve_refresh_steps(refresh_steps, num_steps)
        self.branches: dict[str, ReferenceReuseBranch] = {}
        self.history: list[StepRecord] = []
        self.peak_cache_bytes = 0
        self.token_counts: dict[str, int] = {}

    def end_call(self) -> None:
        self.peak_cache_bytes = max(self.peak_cache_bytes, self.cache_bytes())

    def cache_bytes(self) -> int:
        return sum(branch.cache.nbytes() for branch in self.branches.values())

    def clear(self) -> None:
        """Free every cached tensor (when the edit ends, also on an exception)."""
        for branch in self.branches.values():
            branch.reset()
        self.branches.clear()

    def reuse_steps(self) -> list[int]:
        return [s for s in range(1, self.num_steps + 1) if s not in self.refresh_steps]


class ReferenceReuseBranch(BaseState):
    """The cache and step count of one true-CFG branch (one ``cache_context`` name) of one edit."""

    def __init__(self, reuse: ReferenceTokenReuse) -> None:
        self.reuse = reuse
        self.name: str | None = None  # the cache_context name, set when the hook first meets the branch
        self.cache = ReferenceTokenCache()
        self.step = 0  # steps this branch has run (1-based index of the current one)

    def reset(self) -> None:
        self.cache.clear()
        self.step = 0

    def begin_call(self, img_shapes, hidden_states_len: int, text_len: int = 0) -> ReferenceReuseCall:
        """Start one transformer call of this branch: its step, refresh or reuse, L1 and L2."""
        reuse = self.reuse
        self.step += 1
        if self.step > reuse.num_steps:
            raise RuntimeError(f"the transformer ran step {self.step} of branch {self.name!r}, but the reuse plan has "
                               f"{reuse.num_steps} steps: pass num_inference_steps={self.step} or more")
        shapes = img_shapes[0]
        denoise_len = prod(shapes[0])
        reference_len = sum(prod(s) for s in shapes[1:])
        if denoise_len + reference_len != hidden_states_len:
            raise ValueError(
                f"img_shapes give {denoise_len} denoise + {reference_len} reference tokens but the image stream has "
                f"{hidden_states_len}: reference-token reuse needs the edit pipeline's [noisy latents, image latents] layout"
            )
        is_reuse = reuse.mode != "none" and reference_len > 0 and self.step not in reuse.refresh_steps
        reuse.history.append(StepRecord(self.step, self.name, is_reuse))
        reuse.token_counts = {"denoise": denoise_len, "reference": reference_len, "text": text_len}
        if not is_reuse:
            self.cache.clear()
        return ReferenceReuseCall(mode=reuse.mode, is_reuse=is_reuse, denoise_len=denoise_len,
                                  reference_len=reference_len, cache=self.cache, controller=reuse)


class ReferenceReuseHook(ModelHook):
    """diffusers hook on the forked transformer: hands the current branch's state to the fork's fences.

    Stateful like diffusers' cache hooks: a ``StateManager`` keeps one :class:`ReferenceReuseBranch`
    per ``cache_context`` name, which the pipelines open around every transformer call
    (``"cond"``, and ``"uncond"`` under true CFG), so the two branches never share a cache.
    """

    _is_stateful = True

    def __init__(self, reuse: ReferenceTokenReuse) -> None:
        super().__init__()
        self.reuse = reuse
        self.state_manager = StateManager(ReferenceReuseBranch, init_args=(reuse,))

    def pre_forward(self, module, *args, **kwargs):
        try:
            name = self.state_manager.context.name
        except ValueError:
            raise ValueError("reference-token reuse tells true-CFG branches apart by the diffusers cache context: call "
                             "the transformer inside `with transformer.cache_context(\"cond\"):` (the pipelines do)") from None
        branch = self.state_manager.get_state()
        if branch.name is None:
            branch.name = name
            self.reuse.branches[name] = branch
        kwargs["attention_kwargs"] = {**(kwargs.get("attention_kwargs") or {}), ATTENTION_KWARG: branch}
        return args, kwargs

    def reset_state(self, module):
        self.state_manager.reset()
        self.reuse.clear()
        return module


HOOK_NAME = "reference_token_reuse"


def apply_reference_reuse(transformer: "nn.Module", reuse: ReferenceTokenReuse) -> ReferenceReuseHook:
    """Attach ``reuse`` to the forked transformer (a diffusers hook); :func:`remove_reference_reuse` detaches it."""
    from models.qwenimage.transformer_qwenimage import QwenImageTransformer2DModel

    if not isinstance(transformer, QwenImageTransformer2DModel):
        raise TypeError("reference-token reuse needs the forked transformer "
                        "(models.qwenimage.transformer_qwenimage.QwenImageTransformer2DModel), got "
                        f"{type(transformer).__module__}.{type(transformer).__name__}")
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    if registry.get_hook(HOOK_NAME) is not None:
        raise ValueError("reference-token reuse is already attached to this transformer; detach it first")
    hook = ReferenceReuseHook(reuse)
    registry.register_hook(hook, HOOK_NAME)
    return hook


def remove_reference_reuse(transformer: "nn.Module") -> None:
    """Detach the hook (no-op if none) and free its caches: the transformer is upstream-equivalent again."""
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    hook = registry.get_hook(HOOK_NAME)
    if hook is not None:
        hook.reset_state(transformer)
        registry.remove_hook(HOOK_NAME, recurse=False)


@contextmanager
def reference_reuse(transformer: "nn.Module", mode: str, num_steps: int,
                    refresh_steps: str | Sequence[int] | None = None) -> Iterator[ReferenceTokenReuse]:
    """``with reference_reuse(pipe.transformer, "kv", 4, "once") as reuse: pipe(...)``: attach, run, always detach.

    Yields the edit's :class:`ReferenceTokenReuse` (plan and statistics); its caches are freed on exit.
    """
    reuse = ReferenceTokenReuse(mode, num_steps=num_steps, refresh_steps=refresh_steps)
    apply_reference_reuse(transformer, reuse)
    try:
        yield reuse
    finally:
        remove_reference_reuse(transformer)
