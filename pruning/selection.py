"""Training-free token selection: one protocol for every system, one registry of methods.

A *selector* is a function ``selector(ctx: SelectionContext) -> keep [B, Vc]``: 0/1 over the vision
tokens still in play at one layer, a subset of ``ctx.alive``, the same count in every row. The
system's runtime builds the context where it prunes and drops what the selector does not keep,
exactly as for its own (learned or attention-based) selection, so every method runs through the
same code at the same place. System C's runtime calls selectors at the input of LLM layers
(``pruning/llava/runtime.py``), system B's after its pruning layer K (``pruning/video/runtime.py``).

A peer method is one function (or callable class) plus one registry entry::

    @register_selector("random")
    class RandomSelector: ...

    selector = make_selector("random", keep=64, seed=0)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class SelectionContext:
    """What a selector sees at the input of pruning layer ``layer_idx`` (``Vc`` vision tokens in play).

    Drop mode: only the surviving vision tokens are in play (``alive`` is all ones); mask mode
    (training): all V image positions, with ``alive`` the cumulative (differentiable) keep mask so far.
    A selector class with ``needs_previous_layer_attention = True`` (FastV) gets
    ``previous_layer_attention``: the attention each row received from the last row in layer
    ``layer_idx - 1``, recorded by a fence in the forked attention from its own queries and keys.
    One with ``needs_question_attention = True`` (PruneVid's stage 2) gets ``question_attention``:
    the attention the question rows give each vision token in layer ``layer_idx`` itself.
    One with ``needs_vision_attention = True`` (VisionZip) gets ``vision_attention``: the attention the vision
    tower's CLS token gives each patch in the tower's feature layer (system C; recorded by a fence in the forked
    LLaVA's ``get_image_features``).

    A selector returns the keep mask, or a :class:`Selection` whose ``hidden`` also replaces the kept tokens'
    hidden states (a merging method: VisionZip's contextual tokens); the runtime writes them before it drops.
    """

    layer_idx: int
    mode: str  # "drop" | "mask"
    vision_hidden: torch.Tensor  # [B, Vc, D] hidden states entering the layer
    alive: torch.Tensor  # [B, Vc] 1 = still alive (float; straight-through in mask mode)
    vision_cols: torch.Tensor  # [B, Vc] index of each token among the prompt's V image tokens
    vision_rows: torch.Tensor  # [B, Vc] row of each token in ``hidden_states``
    question_hidden: torch.Tensor  # [B, Lq, D] hidden states of the question tokens
    question_mask: torch.Tensor  # [B, Lq] 1 = a real question token
    hidden_states: torch.Tensor  # [B, Tc, D] the whole current sequence
    attention_mask: torch.Tensor | None  # [B, Tc] 2-D padding mask of the current rows (None: no padding)
    position_embeddings: tuple[torch.Tensor, torch.Tensor]  # (cos, sin) of the current rows
    previous_layer_attention: torch.Tensor | None  # [B, Tc] attention each row received from the last row in
    # layer layer_idx - 1 (mean over heads); only for selectors with needs_previous_layer_attention = True
    training: bool
    temperature: float
    generator: torch.Generator | None = None
    question_attention: torch.Tensor | None = None  # [B, Vc] attention the question rows give each token at this
    # layer (max over heads and question queries); only for selectors with needs_question_attention = True
    groups: torch.Tensor | None = None  # [B, Vc] group id of each token (system B: a stage-1 segment's static
    # tokens, or one frame's dynamic tokens), for selectors that keep a share of every group
    vision_attention: torch.Tensor | None = None  # [B, Vc] attention the vision tower's CLS token gives each patch
    # in the tower's feature layer (mean over heads); only for selectors with needs_vision_attention = True


@dataclass
class Selection:
    """What a merging selector returns: ``keep [B, Vc]`` as any selector's, and ``hidden [B, Vc, D]``, the hidden
    states the kept tokens carry on (rows not kept are ignored)."""

    keep: torch.Tensor
    hidden: torch.Tensor


Selector = Callable[[SelectionContext], "torch.Tensor | Selection"]
"""``selector(ctx) -> keep [B, Vc]`` (0/1, a subset of ``ctx.alive``, the same count in every row), or a
:class:`Selection` (keep and the kept tokens' new hidden states)."""


SELECTORS: dict[str, Callable[..., Selector]] = {}
"""Registered training-free methods: name -> factory of a selector (``make_selector(name, **kwargs)``)."""


def register_selector(name: str) -> Callable:
    """Class or function decorator: register a selector factory under ``name`` (unique)."""

    def register(factory):
        if name in SELECTORS and SELECTORS[name] is not factory:
            raise ValueError(f"a selector named {name!r} is already registered ({SELECTORS[name]!r})")
        SELECTORS[name] = factory
        return factory

    return register


BUILTIN_SELECTOR_MODULES = ("pruning.llava.baselines", "pruning.video.prunevid")
"""Modules whose selectors register themselves when imported (random, fastv, divprune, visionzip; prunevid,
last_token_attention)."""


def make_selector(name: str, **kwargs) -> Selector:
    """A registered selector, built with ``kwargs`` (e.g. ``keep=64``); the built-in ones are imported on first use."""
    if name not in SELECTORS:
        import importlib

        for module in BUILTIN_SELECTOR_MODULES:
            importlib.import_module(module)
    if name not in SELECTORS:
        raise ValueError(f"unknown selector {name!r}; registered: {', '.join(sorted(SELECTORS)) or 'none'}")
    return SELECTORS[name](**kwargs)


def topk_keep(scores: torch.Tensor, alive: torch.Tensor, k: int) -> torch.Tensor:
    """0/1 ``[B, V]``: the ``k`` highest ``scores`` among ``alive`` (ties: lower index first)."""
    masked = scores.float().masked_fill(alive <= 0.5, float("-inf"))
    order = torch.sort(masked, dim=-1, descending=True, stable=True).indices[:, :k]
    return torch.zeros_like(alive).scatter(1, order, 1.0)


__all__ = ["SELECTORS", "Selection", "SelectionContext", "Selector", "make_selector", "register_selector", "topk_keep"]
