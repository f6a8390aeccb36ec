"""System C at run time: the state that the fences of the forked LLaVA and Llama files call.

How pruning reaches the model
-----------------------------
``attach_pruning(model, config)`` (or ``with llava_pruning(model, config):``) builds a
:class:`VisionTokenPruning` module (the learned token merger, the pruner heads at the scaled
``pruning_layers``, the temperature, optional training-free ``selectors``) and sets it as the
optional submodule ``model.model.vision_pruning`` of the forked ``LlavaModel``, whose language model
is the forked ``LlamaModel`` (``models/llama/modeling_llama.py``). A fork built with upstream
arguments alone has no such submodule and every fence runs the upstream statements unchanged;
``detach_pruning`` (or leaving the ``with`` block) removes it again.

Each forward of the forked LLaVA opens one :class:`LlavaPruningPass` (``VisionTokenPruning.open_pass``)
and hands it down in ``kwargs["vision_token_pruning"]``; the fences call its methods:

1. ``LlavaModel.get_image_features`` returns the selected CLIP features unprojected when a merger is
   attached; ``LlavaModel.forward`` merges them (:meth:`LlavaPruningPass.merge`, ``[n_img, N, Dv]``
   -> ``[n_img, M, Dv]``, 576 -> 288 on LLaVA-1.5-7B, 64 -> 32 on the tiny model; the question is
   known there, so a ``question_aware`` merger needs no set-up call), runs the projector on the
   M tokens and puts merged token ``m`` at the placeholder of its centre
   (:meth:`~LlavaPruningPass.scatter_merged_tokens`; the other ``N - M`` placeholders get zeros and
   never enter layer 0), so the upstream ``masked_scatter`` and the prompt's numbering are kept.
2. The forked ``LlamaModel.forward`` calls :meth:`~LlavaPruningPass.begin_language_model` and, at
   the input of every decoder layer, :meth:`~LlavaPruningPass.before_layer`, which returns the
   layer's new inputs (:class:`LayerInputs`) where pruning changes them.
3. ``LlavaForConditionalGeneration.forward`` gathers the labels at the rows that survived.

Selection and the two modes
---------------------------
A *selector* runs at the **input** of each pruning layer ``p``: the learned
:class:`~pruning.llava.modules.LayerPruner` (vision hidden states attend to the question tokens,
the text after the image) or a training-free baseline (``pruning/llava/baselines.py``). Tokens it
drops take no part in layer ``p`` and any later layer.

* ``mode="drop"`` (inference; the default in eval mode): tokens are **physically removed**. The
  hidden states, the 2-D padding mask, the position ids (the survivors keep their original
  positions) and the rotary ``(cos, sin)`` are gathered at the surviving rows and the fork rebuilds
  the causal mask for the shorter sequence. Layer ``l``'s KV cache is filled during prefill by the
  tokens alive at layer ``l``, so each layer's cache holds exactly its survivors. The kept rows of
  each group of layers are registered under the cache (``VisionTokenPruning.cache_states``, a weak
  mapping: nothing is stored on the cache); a decode step builds, per group, the padding mask of its
  cache (``attention_mask[:, kept rows]`` + the new tokens), so ``generate`` continues with the
  original numbering: ``generate`` passes ``position_ids`` (the original prefill length + step);
  without them the next position is ``seen`` (the original length + tokens since).
* ``mode="mask"`` (training; the default in train mode): the full sequence runs; a dropped key is
  hidden by an additive attention bias ``log(keep + 1e-20)`` (0 for kept keys, -46 for dropped
  ones, i.e. a weight of 1e-20 relative to a kept key of the same score), where ``keep`` is the
  straight-through Gumbel-top-k mask, so the gradient reaches the pruner heads through the kept
  keys (``d bias / d keep = 1`` there; through a dropped key the DynamicViT-style derivative
  ``e^{s_k} / Z (v_k - out)`` is unbounded and outlier-dominated, so it is cut), and the
  gradient reaching each learned keep mask is projected onto budget-preserving directions
  (minus its mean over the row's alive tokens: with a fixed top-k count only relative scores
  matter; without it every kept token gets the same "keep more" push and the heads reinforce
  whatever they keep). Masks multiply: a token dropped at one layer stays dropped at every later one.

Both modes give the same result on the same decisions (tested at 1e-5 relative), and with no
merger and keep ratios 1.0 the forks are bit-identical to upstream (tested with ``torch.equal``).
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from pruning.llava.config import (
    VisionTokenPruningConfig,
    scale_pruning_layers,
)
from pruning.llava.modules import (
    LayerPruner,
    MergerOutput,
    TokenMerger,
    attention_distillation,
    keep_mask,
    merged_teacher,
)
from pruning.selection import Selection, SelectionContext, Selector

MASK_EPS = 1e-20
"""Keep-policy floor of the training-time attention bias ``log(keep + MASK_EPS)`` (-46 for a dropped key)."""

MODES = ("auto", "drop", "mask")

# ----------------------------------------------------------------------------- selection context




class ForcedSelector:
    """Replays recorded decisions: ``keep [B, V]`` over the prompt's V image tokens."""

    def __init__(self, keep: torch.Tensor) -> None:
        self.keep = keep.detach().bool()

    def __call__(self, ctx: SelectionContext) -> torch.Tensor:
        keep = self.keep.to(ctx.vision_cols.device).gather(1, ctx.vision_cols)
        return keep.to(ctx.alive.dtype) * (ctx.alive.detach() > 0.5).to(ctx.alive.dtype)


class _BudgetProjectedGradient(torch.autograd.Function):
    """Identity forward; backward subtracts the mean gradient over the alive tokens of each row.

    A top-k keep mask has a fixed budget: raising every score together changes nothing, only
    the scores relative to each other matter. Projecting the mask gradient onto sum-zero
    directions (per row, over the alive tokens) removes the common "keep more" push that every
    kept token receives, so a useful kept token is pushed up and a less useful one down.
    """

    @staticmethod
    def forward(ctx, mask: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(alive)
        return mask.view_as(mask)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (alive,) = ctx.saved_tensors
        w = alive.to(grad.dtype)
        mean = (grad * w).sum(-1, keepdim=True) / w.sum(-1, keepdim=True).clamp(min=1.0)
        return (grad - mean) * w, None


# ----------------------------------------------------------------------------- trace and cache state


@dataclass
class PruningTrace:
    """What the last pruned prefill did (``VisionTokenPruning.last_trace``; kept through its decode steps)."""

    mode: str
    num_vision_tokens: list[int] = field(default_factory=list)  # tower, [after merger], after each pruning layer
    stage_names: list[str] = field(default_factory=list)
    keep: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [B, V] cumulative keep (straight-through in mask mode)
    keep_logits: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # layer -> ([B, V] a learned pruner head's keep logits, [B, V] bool: the tokens alive when it chose); mask mode
    merger_output: MergerOutput | None = None
    merge_keep: torch.Tensor | None = None  # [B, V] image positions holding a merged token (stage 1)
    layer_tokens: list[int] = field(default_factory=list)  # sequence length (alive tokens) entering each layer
    kept_rows: torch.Tensor | None = None  # [B, T_out] original rows of the returned hidden states (drop mode)
    sequence_length: int = 0  # T of the prompt (original numbering)


@dataclass
class PrunedCacheState:
    """What a pruned prefill leaves for its decode steps (registered under its cache): every later decode mask."""

    mode: str  # "drop": group caches hold only ``rows``; "mask": all rows, ``key_keep`` hides the dropped
    prefill_length: int  # T0, original numbering
    seen: int  # original-numbering tokens seen so far (T0 + decoded)
    groups: list[tuple[int, torch.Tensor]]  # (first layer, [B, T_g] kept original rows or [B, T0] key keep)


def stage_distillation(trace: PruningTrace, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over the learned stages of a mask-mode prefill of the listwise KL to ``teacher [B, N]``, the unpruned
    answer attention over the N image tokens (:func:`~pruning.llava.modules.answer_attention_teacher`): the merger's
    importance logits over the N tower tokens, and each pruner head's keep logits over the tokens alive when it
    chose, where a merged token carries its members' teacher mass (:func:`~pruning.llava.modules.merged_teacher`).
    Raises if the prefill ran no learned stage."""
    terms, out = [], trace.merger_output
    if out is not None:
        terms.append(attention_distillation(out.importance_logits, teacher))
        teacher = merged_teacher(teacher, out.assignment, out.centre_indices)
    terms += [attention_distillation(logits, teacher, alive) for logits, alive in trace.keep_logits.values()]
    if not terms:
        raise ValueError("attention distillation needs a learned stage: this prefill ran neither the merger nor a "
                         "pruner head")
    return torch.stack(terms).mean()


# ----------------------------------------------------------------------------- the module


class VisionTokenPruning(nn.Module):
    """Pruning state attached to a forked ``LlavaModel`` as ``vision_pruning`` (see the module docstring).

    Args:
        config: the system-C config (``pruning.llava.config``).
        vision_dim: CLIP hidden size (the merger sits before the projector).
        text_dim: LLM hidden size (pruner heads; question width of a question-aware merger).
        num_layers: LLM layer count; ``config.pruner.pruning_layers`` (given for a
            ``num_layers_real``-layer LLM) are scaled to it with ``scale_pruning_layers``.
        num_vision_tokens: image tokens per image (576 real, 64 tiny): sizes the merger.
        image_token_id: placeholder id (default question mask: text after the last image token).
        use_merger / use_pruners: build the learned stages (baselines use neither, only ``selectors``).
        selectors: ``{layer: selector}`` overriding / adding selection at those layers.
    """

    def __init__(
        self,
        config: VisionTokenPruningConfig,
        *,
        vision_dim: int,
        text_dim: int,
        num_layers: int,
        num_vision_tokens: int,
        image_token_id: int | None = None,
        num_layers_real: int = 32,
        num_tokens_real: int = 576,
        use_merger: bool = True,
        use_pruners: bool = True,
        selectors: dict[int, Selector] | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.num_layers = num_layers
        self.num_vision_tokens = num_vision_tokens
        self.image_token_id = image_token_id
        if num_layers == num_layers_real:
            layers = scale_pruning_layers(config.pruner.pruning_layers, num_layers_real)
        else:
            layers = scale_pruning_layers(config.pruner.pruning_layers, num_layers_real, num_layers)
        self.pruning_layers: list[int] = list(layers)
        self.keep_ratios: dict[int, float] = dict(zip(self.pruning_layers, config.pruner.keep_ratios))
        self.merger = (
            TokenMerger.from_config(vision_dim, config.merger, num_vision_tokens, question_dim=text_dim,
                                    ) if use_merger else None
        )
        if self.merger is not None:  # the config's count is for the real tower; resolve it for this one
            self.merger.target_merge_tokens = config.merger.resolve_num_tokens(num_vision_tokens, num_tokens_real)
        self.pruners = (
            nn.ModuleDict({str(layer): LayerPruner.from_config(text_dim, config.pruner) for layer in self.pruning_layers})
            if use_pruners else None
        )
        self.selectors: dict[int, Selector] = dict(selectors or {})
        self.enabled = True
        self.use_learned_pruners = True
        self.mode = "auto"
        self.temperature = float(config.anneal.temperature)
        self.generator: torch.Generator | None = None
        self.last_trace: PruningTrace | None = None
        # Decode state of each KV cache that a pruned prefill filled (kept rows per layer group, tokens seen),
        # keyed by the cache object and dropped with it: nothing is stored on the cache itself.
        self.cache_states: weakref.WeakKeyDictionary[Any, PrunedCacheState] = weakref.WeakKeyDictionary()

    # ------------------------------------------------------------------ switches

    @property
    def merges(self) -> bool:
        """Whether stage 1 (the merger) runs in this pass."""
        return self.enabled and self.merger is not None

    @property
    def needs_vision_attention(self) -> bool:
        """Whether a selector ranks patches by the vision tower's CLS attention (VisionZip), which the forked
        ``get_image_features`` then records."""
        return self.enabled and any(getattr(s, "needs_vision_attention", False) for s in self.selectors.values())

    def selection_layers(self) -> list[int]:
        layers = set(self.selectors)
        if self.pruners is not None and self.use_learned_pruners:
            layers |= {int(k) for k in self.pruners}
        return sorted(layers)

    def resolved_mode(self) -> str:
        if self.mode not in MODES:
            raise ValueError(f"vision_pruning.mode={self.mode!r}; allowed: {', '.join(MODES)}")
        if self.mode == "auto":
            return "mask" if self.training else "drop"
        return self.mode

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the upstream path inside the block (e.g. the unpruned "real" pass of GAN training)."""
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous

    @contextlib.contextmanager
    def using(self, *, mode: str | None = None, selectors: dict[int, Selector] | None = None,
              learned_pruners: bool | None = None) -> Iterator[None]:
        """Temporarily set the mode, the selectors and/or whether the learned pruner heads select."""
        saved = (self.mode, self.selectors, self.use_learned_pruners)
        try:
            if mode is not None:
                self.mode = mode
            if selectors is not None:
                self.selectors = dict(selectors)
            if learned_pruners is not None:
                self.use_learned_pruners = learned_pruners
            yield
        finally:
            self.mode, self.selectors, self.use_learned_pruners = saved

    def force_decisions(self, trace: PruningTrace) -> dict[int, Selector]:
        """Selectors replaying ``trace``'s decisions (use with ``using(selectors=..., learned_pruners=False)``)."""
        return {layer: ForcedSelector(keep) for layer, keep in trace.keep.items()}

    # ------------------------------------------------------------------ per-call state

    def open_pass(self, *, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
                  past_key_values: Any, question_mask: torch.Tensor | None = None) -> "LlavaPruningPass":
        """The state of one forward of the forked LLaVA (prefill or decode step), handed to every fence.

        ``question_mask [B, T]`` marks the question tokens explicitly (training passes it, so the
        pruners never see the answer); default: the non-padding text after the last image token.
        A forward whose cache was filled by a pruned prefill is a decode step of that prefill.
        """
        decode_state = self.cache_states.get(past_key_values) if past_key_values is not None else None
        return LlavaPruningPass(self, input_ids=input_ids, attention_mask=attention_mask,
                                question_mask=question_mask, decode_state=decode_state)

    def cache_state(self, past_key_values: Any) -> PrunedCacheState | None:
        """What a pruned prefill left for the decode steps of ``past_key_values`` (None: not pruned)."""
        return self.cache_states.get(past_key_values)

    # ------------------------------------------------------------------ selection

    def select(self, ctx: SelectionContext, trace: PruningTrace | None = None) -> torch.Tensor | Selection:
        """Keep mask ``[B, Vc]`` at ``ctx.layer_idx`` (a selector override, else the learned pruner), or a merging
        selector's :class:`~pruning.selection.Selection` (drop mode only). A learned pruner head records its keep
        logits in ``trace.keep_logits`` when ``trace`` is given."""
        if ctx.layer_idx in self.selectors:
            keep = self.selectors[ctx.layer_idx](ctx)
            if isinstance(keep, Selection):
                if ctx.mode == "mask":
                    raise ValueError(f"selector {type(self.selectors[ctx.layer_idx]).__name__} merges tokens, which "
                                     "only drop mode (inference) supports: set vision_pruning.mode = 'drop'")
                return Selection(keep.keep.to(ctx.alive.dtype), keep.hidden)
            return keep.to(ctx.alive.dtype) * (ctx.alive if ctx.mode == "mask" else 1.0)
        pruner = self.pruners[str(ctx.layer_idx)]
        alive = ctx.alive.detach() > 0.5  # [B, Vc] the tokens this head chooses among
        logits = pruner(ctx.vision_hidden, ctx.question_hidden, ctx.question_mask, alive=alive)
        if trace is not None:
            trace.keep_logits[ctx.layer_idx] = (logits, alive)
        prev = ctx.alive if ctx.mode == "mask" else None
        keep = keep_mask(logits, self.keep_ratios[ctx.layer_idx], temperature=ctx.temperature,
                         training=self.training, prev_mask=prev, generator=self.generator)
        if ctx.mode == "mask" and keep.requires_grad:
            keep = _BudgetProjectedGradient.apply(keep, ctx.alive.detach() > 0.5)
        return keep

    def trainable_parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {
            "merger": list(self.merger.parameters()) if self.merger is not None else [],
            "pruners": list(self.pruners.parameters()) if self.pruners is not None else [],
        }


# ----------------------------------------------------------------------------- the per-call state


@dataclass
class DropRows:
    """Row bookkeeping of an inference prefill (``mode="drop"``): what each current row of the sequence is."""

    num_vision: int  # V: image tokens of the prompt
    attention_mask: torch.Tensor | None  # [B, T_cur] 2-D padding mask of the current rows (None: no padding)
    rows: torch.Tensor  # [B, T_cur] original row of each current row
    is_vision: torch.Tensor  # [B, T_cur] an image token still in the sequence
    is_question: torch.Tensor  # [B, T_cur] a question token
    alive_cols: torch.Tensor  # [B, Vc] index among the V image tokens of each surviving one

    def gather(self, sel: torch.Tensor) -> None:
        """Keep the current rows ``sel [B, T_new]``."""
        self.rows, self.is_vision = _gather_rows(self.rows, sel), _gather_rows(self.is_vision, sel)
        self.is_question = _gather_rows(self.is_question, sel)
        self.attention_mask = _gather_rows(self.attention_mask, sel)


@dataclass
class MaskRows:
    """Row bookkeeping of a training prefill (``mode="mask"``): the full sequence with a differentiable keep policy."""

    num_vision: int  # V
    length: int  # T
    vision_rows: torch.Tensor  # [B, V] rows of the image tokens
    attention_mask: torch.Tensor | None  # [B, T] 2-D padding mask (None: no padding)
    question_mask: torch.Tensor  # [B, T] question tokens
    policy: torch.Tensor  # [B, V] cumulative keep (straight-through), 1 before any selection
    base_bias: torch.Tensor  # [B, 1, T, T] causal + padding additive mask


@dataclass
class LayerInputs:
    """What the forked Llama decoder loop feeds layer ``l`` after :meth:`LlavaPruningPass.before_layer`."""

    hidden_states: torch.Tensor  # [B, T_l, D]
    position_ids: torch.Tensor  # [B or 1, T_l] original positions of the rows
    position_embeddings: tuple[torch.Tensor, torch.Tensor]  # rotary (cos, sin) of the rows
    attention_mask: torch.Tensor | None  # [B, K] 2-D key padding mask: the fork builds the causal mask from it
    attention_bias: torch.Tensor | None = None  # [B, 1, T, T] additive mask used as is (training, mask mode)


class LlavaPruningPass:
    """System C's state for one forward of the forked LLaVA: a prefill or one decode step.

    Created by :meth:`VisionTokenPruning.open_pass` in the outermost forked ``forward`` and handed
    down in ``kwargs["vision_token_pruning"]``; the fences call, in this order:

    1. ``merge`` + ``scatter_merged_tokens`` (``LlavaModel.forward``, stage 1, prefill with images);
    2. ``set_image_tokens`` (``LlavaModel.forward``, before the language model);
    3. ``begin_language_model`` and ``before_layer`` for every layer (forked ``LlamaModel.forward``);
    4. ``labels_for_output`` (``LlavaForConditionalGeneration.forward``).

    A prefill with images registers its decode state under the cache it fills
    (``VisionTokenPruning.cache_states``). A pass without images and without such a cache
    (a text-only prompt) changes nothing: the upstream computation runs.
    """

    def __init__(self, pruning: VisionTokenPruning, *, input_ids: torch.Tensor | None,
                 attention_mask: torch.Tensor | None, question_mask: torch.Tensor | None,
                 decode_state: PrunedCacheState | None) -> None:
        self.pruning = pruning
        self.mode = pruning.resolved_mode()
        self.decode_state = decode_state
        self.prompt_image_mask = (input_ids == pruning.image_token_id) if (
            input_ids is not None and pruning.image_token_id is not None) else None  # [B, T]
        self.question_mask = question_mask  # [B, T] or None (default: the text after the last image token)
        self.attention_mask = attention_mask if (attention_mask is not None and attention_mask.dim() == 2) else None
        self.merger_output: MergerOutput | None = None
        self.merge_keep: torch.Tensor | None = None  # [n_img, N] placeholders holding a merged token
        self.image_token_mask: torch.Tensor | None = None  # [B, T] image placeholders of this call
        self.vision_attention: torch.Tensor | None = None  # [n_img, N] tower CLS attention (VisionZip-style selectors)
        self.trace: PruningTrace | None = None
        self.kept_rows: torch.Tensor | None = None  # [B, T_out] prompt rows of the returned sequence (drop mode)
        self.prefill = False  # set by begin_language_model: a prompt with images is being pruned
        self.attention_layers: set[int] = set()  # layers whose last-row attention a selector needs
        self.row_state: DropRows | MaskRows | None = None  # per-row bookkeeping of this prefill

    # ------------------------------------------------------------------ stage 1 (LlavaModel.forward)

    @property
    def merges(self) -> bool:
        """Whether this call merges image tokens (stage 1): a prefill with a merger attached."""
        return self.decode_state is None and self.pruning.merges

    def merge(self, image_features: torch.Tensor, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """``[n_img * N, Dv]`` selected CLIP features -> ``[n_img, M, Dv]`` merged features.

        ``inputs_embeds [B, T, D]`` gives a ``question_aware`` merger the question tokens.
        """
        pruning = self.pruning
        n = pruning.num_vision_tokens
        if image_features.shape[0] % n:
            raise ValueError(f"the vision-token merger expects {n} features per image, got {image_features.shape[0]} rows")
        features = image_features.view(-1, n, image_features.shape[-1])
        question = question_mask = None
        if pruning.merger.merger_type == "question_aware":
            qm = self._question_mask()
            if qm is None:
                raise ValueError("merger_type='question_aware' needs the question: call the model with input_ids "
                                 "(or pass vision_question_mask)")
            if qm.shape[0] != features.shape[0]:
                raise ValueError(f"merger_type='question_aware' needs one image per prompt, got {features.shape[0]} "
                                 f"images for {qm.shape[0]} prompts")
            idx, valid = _rows_of(qm.bool().to(inputs_embeds.device))
            question = inputs_embeds.gather(1, idx[..., None].expand(-1, -1, inputs_embeds.shape[-1]))
            question, question_mask = question.to(features.dtype), valid
        out = pruning.merger(features, temperature=pruning.temperature, question=question,
                             question_mask=question_mask, generator=pruning.generator)
        self.merger_output = out
        return out.tokens

    def scatter_merged_tokens(self, merged_features: torch.Tensor) -> torch.Tensor:
        """``[n_img, M, D]`` projected merged tokens -> ``[n_img * N, D]`` in placeholder layout.

        Merged token ``m`` goes to the placeholder of its centre (ascending: the order is kept); the
        other placeholders get zeros and never enter layer 0 (``merge_keep``).
        """
        out = self.merger_output
        n_img, m = out.centre_indices.shape
        n, d = self.pruning.num_vision_tokens, merged_features.shape[-1]
        full = merged_features.new_zeros(n_img, n, d)
        idx = out.centre_indices.to(merged_features.device)
        full.scatter_(1, idx[..., None].expand(-1, -1, d), merged_features.reshape(n_img, m, d))
        self.merge_keep = torch.zeros(n_img, n, dtype=torch.bool, device=full.device).scatter_(1, idx, True)
        return full.view(n_img * n, d)

    def set_image_tokens(self, image_token_mask: torch.Tensor | None) -> None:
        """``[B, T]`` image placeholder rows of this call (None: no image in this call)."""
        self.image_token_mask = image_token_mask

    def set_vision_attention(self, vision_attention: torch.Tensor | None) -> None:
        """``[n_img, N]`` attention the vision tower's CLS token gives each patch in its feature layer (recorded only
        when a selector needs it; :func:`pruning.llava.baselines.tower_cls_attention`)."""
        self.vision_attention = vision_attention

    def _question_mask(self) -> torch.Tensor | None:
        if self.question_mask is not None:
            return self.question_mask
        image_mask = self.prompt_image_mask if self.prompt_image_mask is not None else self.image_token_mask
        return None if image_mask is None else default_question_mask(image_mask, self.attention_mask)

    # ------------------------------------------------------------------ stage 2 (forked LlamaModel.forward)

    def begin_language_model(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None,
                             position_ids: torch.Tensor | None, past_key_values: Any) -> torch.Tensor | None:
        """Start the decoder loop; returns the position ids it must use (None: upstream's default)."""
        has_images = self.image_token_mask is not None and bool(self.image_token_mask.any())
        if self.decode_state is not None:
            if has_images:
                raise ValueError("vision-token pruning: a prompt with images cannot continue an already pruned cache; "
                                 "start a new cache for each image prompt")
            return self._begin_decode(inputs_embeds, attention_mask, position_ids)
        if not has_images:
            self.pruning.last_trace = None
            return position_ids  # text only: nothing to prune, upstream
        if past_key_values is not None and past_key_values.get_seq_length() > 0:
            raise ValueError("vision-token pruning prunes a whole prompt: pass an empty cache with an image prompt "
                             f"(the cache already holds {past_key_values.get_seq_length()} tokens)")
        self._begin_prefill(inputs_embeds, attention_mask, past_key_values)
        return position_ids

    def _begin_prefill(self, inputs_embeds, attention_mask, past_key_values) -> None:
        pruning, mode = self.pruning, self.mode
        b, t, _ = inputs_embeds.shape
        device = inputs_embeds.device
        vision_rows, v = _vision_columns(self.image_token_mask.to(device).bool())
        question_mask = self._question_mask()
        question_mask = question_mask.to(device).bool()
        merge_keep = self.merge_keep.to(device).reshape(b, v) if self.merge_keep is not None else None
        self.merge_keep = merge_keep
        am = attention_mask if (attention_mask is not None and attention_mask.dim() == 2) else None
        layers = pruning.selection_layers()
        if layers and layers[-1] >= pruning.num_layers:
            raise ValueError(f"pruning layers {[x for x in layers if x >= pruning.num_layers]} do not exist in a "
                             f"{pruning.num_layers}-layer language model")

        trace = PruningTrace(mode=mode, sequence_length=t, merger_output=self.merger_output, merge_keep=merge_keep)
        trace.num_vision_tokens.append(self.merger_output.selection_mask.shape[1] if self.merger_output is not None else v)
        trace.stage_names.append("vision tower")
        if merge_keep is not None:
            trace.num_vision_tokens.append(int(merge_keep[0].sum()))
            trace.stage_names.append("merger")
        self.trace = pruning.last_trace = trace
        self.prefill = True
        self.selection_layers = set(layers)
        self.last_row_attention: dict[int, torch.Tensor] = {}  # layer -> [B, T_l] (recorded for FastV-style selectors)
        self.attention_layers = {layer - 1 for layer in layers if layer >= 1 and getattr(
            pruning.selectors.get(layer), "needs_previous_layer_attention", False)}
        self.groups: list[tuple[int, torch.Tensor]] = []
        if mode == "drop":
            self.row_state = DropRows(
                num_vision=v, attention_mask=am, rows=torch.arange(t, device=device).expand(b, t),
                is_vision=torch.zeros(b, t, dtype=torch.bool, device=device).scatter_(1, vision_rows, True),
                is_question=question_mask, alive_cols=torch.arange(v, device=device).expand(b, v),
            )  # fmt: skip
        else:
            pad = am.bool() if am is not None else torch.ones(b, t, dtype=torch.bool, device=device)
            ar = torch.arange(t, device=device)
            allowed = (ar[None, :, None] >= ar[None, None, :]) & pad[:, None, :]  # [B, T(q), T(k)]
            dtype = inputs_embeds.dtype
            self.row_state = MaskRows(
                num_vision=v, length=t, vision_rows=vision_rows, attention_mask=am, question_mask=question_mask,
                policy=(torch.ones(b, v, dtype=dtype, device=device) if merge_keep is None else merge_keep.to(dtype)),
                base_bias=torch.zeros(b, 1, t, t, dtype=dtype, device=device).masked_fill(
                    ~allowed[:, None], torch.finfo(dtype).min),
            )  # fmt: skip
        if past_key_values is not None:
            pruning.cache_states[past_key_values] = PrunedCacheState(mode, t, t, self.groups)

    def _begin_decode(self, inputs_embeds, attention_mask, position_ids) -> torch.Tensor:
        state = self.decode_state
        q = inputs_embeds.shape[1]
        if position_ids is None:
            position_ids = (torch.arange(q, device=inputs_embeds.device) + state.seen).unsqueeze(0)
        am = attention_mask if (attention_mask is not None and attention_mask.dim() == 2) else None
        t0 = state.prefill_length
        if am is not None and am.shape[1] != state.seen + q:
            raise ValueError(f"attention_mask covers {am.shape[1]} tokens, expected {state.seen + q} "
                             f"(the {t0}-token prompt in its original numbering + {state.seen - t0 + q} new tokens)")
        key_masks: dict[int, torch.Tensor | None] = {}
        for start, info in state.groups:
            if state.mode == "drop":
                key_masks[start] = None if am is None else torch.cat(
                    [am[:, :t0].gather(1, info.to(am.device)), am[:, t0:]], dim=1)
            else:
                device = inputs_embeds.device
                prompt = info.to(device) if am is None else (am[:, :t0].bool() & info.to(am.device))
                tail = (torch.ones(inputs_embeds.shape[0], state.seen - t0 + q, dtype=torch.bool, device=device)
                        if am is None else am[:, t0:].bool())
                key_masks[start] = torch.cat([prompt, tail], dim=1)
        self.decode_key_masks = key_masks
        state.seen += q
        return position_ids

    def before_layer(self, layer_idx: int, hidden_states: torch.Tensor, position_ids: torch.Tensor,
                     position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> LayerInputs | None:
        """The inputs of decoder layer ``layer_idx`` when pruning changes them, else None."""
        if self.decode_state is not None:
            if layer_idx not in self.decode_key_masks:
                return None
            return LayerInputs(hidden_states, position_ids, position_embeddings, self.decode_key_masks[layer_idx])
        if not self.prefill:
            return None
        if self.mode == "drop":
            return self._before_layer_drop(layer_idx, hidden_states, position_ids, position_embeddings)
        return self._before_layer_mask(layer_idx, hidden_states, position_ids, position_embeddings)

    def _context(self, layer_idx, hidden, vision_rows, alive, vision_cols, question_rows, attention_mask,
                 position_embeddings) -> SelectionContext:
        q_idx, q_valid = _rows_of(question_rows)
        d = hidden.shape[-1]
        return SelectionContext(
            layer_idx=layer_idx,
            mode=self.mode,
            vision_hidden=hidden.gather(1, vision_rows[..., None].expand(-1, -1, d)),
            alive=alive,
            vision_cols=vision_cols,
            vision_rows=vision_rows,
            question_hidden=hidden.gather(1, q_idx[..., None].expand(-1, -1, d)),
            question_mask=q_valid,
            hidden_states=hidden,
            attention_mask=attention_mask,
            position_embeddings=position_embeddings,
            previous_layer_attention=self.last_row_attention.get(layer_idx - 1),
            vision_attention=(None if self.vision_attention is None
                              else self.vision_attention.to(hidden.device).reshape(vision_cols.shape[0], -1).gather(1, vision_cols)),
            training=self.pruning.training,
            temperature=self.pruning.temperature,
            generator=self.pruning.generator,
        )

    def _before_layer_drop(self, i, hidden, position_ids, position_embeddings) -> LayerInputs | None:
        """Inference: physical removal (see the module docstring, ``mode="drop"``)."""
        r, trace = self.row_state, self.trace
        b, device = hidden.shape[0], hidden.device
        state = {"hidden": hidden, "pos": position_ids, "cos_sin": position_embeddings}
        changed = False

        def drop(keep_vision: torch.Tensor) -> None:
            """``[B, Vc]`` keep over the current vision rows: remove every other vision row."""
            keep_rows = torch.ones_like(r.is_vision)
            keep_rows[r.is_vision] = keep_vision.reshape(-1).bool()
            counts = keep_rows.sum(1)
            if not bool((counts == counts[0]).all()):
                raise ValueError(f"a selector kept different token counts per row: {counts.tolist()}")
            sel = keep_rows.nonzero()[:, 1].view(b, int(counts[0]))
            r.gather(sel)
            state["hidden"], state["pos"] = _gather_rows(state["hidden"], sel), _gather_rows(state["pos"], sel)
            cos, sin = state["cos_sin"]
            state["cos_sin"] = (_gather_rows(cos, sel), _gather_rows(sin, sel))
            self.last_row_attention.clear()  # recorded on rows that no longer exist

        if i == 0 and self.merge_keep is not None:  # stage 1 leftovers: placeholders without a merged token
            drop(self.merge_keep.gather(1, r.alive_cols))
            r.alive_cols = r.alive_cols[self.merge_keep].view(b, -1)
            changed = True
        if i in self.selection_layers:
            vis_rows = r.is_vision.nonzero()[:, 1].view(b, -1)
            ctx = self._context(i, state["hidden"], vis_rows,
                                torch.ones(vis_rows.shape, dtype=hidden.dtype, device=device),
                                r.alive_cols, r.is_question, r.attention_mask, state["cos_sin"])
            with torch.no_grad():
                chosen = self.pruning.select(ctx)
            if isinstance(chosen, Selection):  # a merging selector: its kept tokens carry new hidden states
                d = state["hidden"].shape[-1]
                state["hidden"] = state["hidden"].scatter(1, vis_rows[..., None].expand(-1, -1, d),
                                                          chosen.hidden.to(state["hidden"].dtype))
                chosen = chosen.keep
            keep_vis = chosen.detach() > 0.5
            full = torch.zeros(b, r.num_vision, dtype=torch.bool, device=device)
            full.scatter_(1, r.alive_cols, keep_vis)
            trace.keep[i] = full
            drop(keep_vis)
            r.alive_cols = r.alive_cols[keep_vis].view(b, -1)
            trace.num_vision_tokens.append(r.alive_cols.shape[1])
            trace.stage_names.append(f"layer {i}")
            changed = True
        if changed or i == 0:  # a new group of layers with its own cached rows (layer 0 always starts one)
            self.groups.append((i, r.rows))
        self.kept_rows = trace.kept_rows = r.rows
        trace.layer_tokens.append(state["hidden"].shape[1])
        if not changed:
            return None
        mask_2d = r.attention_mask if r.attention_mask is not None else torch.ones(r.rows.shape, dtype=torch.bool, device=device)
        return LayerInputs(state["hidden"], state["pos"], state["cos_sin"], mask_2d)

    def _before_layer_mask(self, i, hidden, position_ids, position_embeddings) -> LayerInputs | None:
        """Training: differentiable masking (see the module docstring, ``mode="mask"``)."""
        r, trace = self.row_state, self.trace
        b, t, device, dtype = hidden.shape[0], r.length, hidden.device, hidden.dtype
        changed = i == 0 and self.merge_keep is not None
        if i in self.selection_layers:
            cols = torch.arange(r.num_vision, device=device).expand(b, r.num_vision)
            ctx = self._context(i, hidden, r.vision_rows, r.policy, cols, r.question_mask, r.attention_mask,
                                position_embeddings)
            r.policy = self.pruning.select(ctx, trace)
            trace.keep[i] = r.policy
            trace.num_vision_tokens.append(int((r.policy[0].detach() > 0.5).sum()))
            trace.stage_names.append(f"layer {i}")
            changed = True
        policy = r.policy
        trace.layer_tokens.append(t - r.num_vision + int((policy[0].detach() > 0.5).sum()))
        if i == 0 and not changed:
            self.groups.append((0, torch.ones(b, t, dtype=torch.bool, device=device)))
        if not changed:
            return None
        # Gradient only through kept keys (d bias / d keep = 1 there). Through a dropped key it would be
        # e^{s_k} / Z * (v_k - out) (the 1e20 of 1 / (keep + eps) times a 1e-20 attention weight): unbounded,
        # summed over queries, heads and layers, and a first-order "re-add a little of it" signal that outliers
        # dominate. Values are unchanged: kept 0, dropped -46.
        log_keep = torch.log(policy.float() + MASK_EPS)
        log_keep = torch.where(policy.detach() > 0.5, log_keep, log_keep.detach())
        key_bias = torch.zeros(b, t, dtype=torch.float32, device=device).scatter(1, r.vision_rows, log_keep)
        hard = torch.ones(b, t, dtype=torch.bool, device=device).scatter(1, r.vision_rows, policy.detach() > 0.5)
        self.groups.append((i, hard))
        bias = r.base_bias + key_bias.to(dtype)[:, None, None, :]
        return LayerInputs(hidden, position_ids, position_embeddings, None, attention_bias=bias)

    # ------------------------------------------------------------------ attention probe (forked LlamaAttention)

    @property
    def probes_attention(self) -> bool:
        """Whether a selector of this prefill needs the last row's attention of the layer before it (FastV)."""
        return self.prefill and bool(self.attention_layers)

    def wants_last_row_attention(self, layer_idx: int) -> bool:
        return self.prefill and layer_idx in self.attention_layers

    def record_last_row_attention(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor,
                                  scaling: float) -> None:
        """``query [B, H, 1, d]`` of the last row, ``key [B, H, T_l, d]`` (post-RoPE, KV heads repeated).

        Stores the last row's softmax attention over the layer's rows, mean over heads: ``[B, T_l]``.
        Padding keys are masked with the current 2-D padding mask (the last row sees every earlier row).
        """
        scores = (query @ key.transpose(-1, -2)).squeeze(2).float() * scaling  # [B, H, T_l]
        pad = self.row_state.attention_mask if self.row_state is not None else None
        if pad is not None:
            scores = scores.masked_fill(~pad.bool().to(scores.device)[:, None, :], float("-inf"))
        self.last_row_attention[layer_idx] = scores.softmax(-1).mean(1)

    # ------------------------------------------------------------------ labels (LlavaForConditionalGeneration)

    def labels_for_output(self, labels: torch.Tensor) -> torch.Tensor:
        """Labels ``[B, T]`` aligned with the returned (possibly shorter, drop mode) sequence."""
        rows = self.kept_rows
        if rows is None or rows.shape[1] == labels.shape[1]:
            return labels
        return labels.gather(1, rows.to(labels.device))


# ----------------------------------------------------------------------------- attach / detach / save


def _llava_model(model: nn.Module) -> nn.Module:
    """The forked ``LlavaModel`` inside ``model`` (``LlavaForConditionalGeneration`` or ``LlavaModel``)."""
    inner = getattr(model, "model", model)
    if type(inner).__module__ != "models.llava.modeling_llava" or type(inner).__name__ != "LlavaModel":
        raise TypeError(
            f"vision-token pruning needs the forked LLaVA (models.llava.modeling_llava), got "
            f"{type(model).__module__}.{type(model).__name__}: load the model with "
            "models.llava.modeling_llava.LlavaForConditionalGeneration.from_pretrained(...)"
        )
    return inner


def num_image_tokens(config) -> int:
    """Image tokens per image of a LLaVA config (CLIP: (image_size / patch_size)^2, CLS dropped)."""
    vc = config.vision_config
    n = (vc.image_size // vc.patch_size) ** 2
    return n if config.vision_feature_select_strategy == "default" else n + 1


def attach_pruning(
    model: nn.Module,
    config: VisionTokenPruningConfig | None = None,
    *,
    use_merger: bool = True,
    use_pruners: bool = True,
    selectors: dict[int, Selector] | None = None,
    dtype: torch.dtype | None = None,
) -> VisionTokenPruning:
    """Build a :class:`VisionTokenPruning` for ``model`` and attach it as ``model.model.vision_pruning``.

    The pruning layers of ``config`` (given for the real 32-layer LLM) are scaled to the model's
    depth; the merger count is resolved for its tower (576 -> 288, 64 -> 32). The module gets the
    model's device and dtype (``dtype``: another one, e.g. float32 heads under bf16 autocast).
    Returns it (already attached).
    """
    inner = _llava_model(model)
    _check_language_model(inner.language_model)
    config = config if config is not None else VisionTokenPruningConfig()
    cfg = inner.config
    if selectors:
        bad = [layer for layer in selectors if not 0 <= layer < cfg.text_config.num_hidden_layers]
        if bad:
            raise ValueError(f"selector layers {bad} out of range for a {cfg.text_config.num_hidden_layers}-layer LLM")
    pruning = VisionTokenPruning(
        config,
        vision_dim=cfg.vision_config.hidden_size * (1 if isinstance(cfg.vision_feature_layer, int) else len(cfg.vision_feature_layer)),
        text_dim=cfg.text_config.hidden_size,
        num_layers=cfg.text_config.num_hidden_layers,
        num_vision_tokens=num_image_tokens(cfg),
        image_token_id=cfg.image_token_id,
        use_merger=use_merger,
        use_pruners=use_pruners,
        selectors=selectors,
    )
    param = next(inner.parameters())
    pruning.to(device=param.device, dtype=dtype or param.dtype)
    pruning.train(inner.training)
    inner.vision_pruning = pruning
    return pruning


def detach_pruning(model: nn.Module) -> VisionTokenPruning | None:
    """Remove and return the attached pruning module (the model is upstream-equivalent again)."""
    inner = _llava_model(model)
    pruning = getattr(inner, "vision_pruning", None)
    if pruning is not None:
        del inner.vision_pruning
    return pruning


@contextlib.contextmanager
def llava_pruning(model: nn.Module, config: VisionTokenPruningConfig | None = None, **attach_kwargs: Any
                  ) -> Iterator[VisionTokenPruning]:
    """``with llava_pruning(model, config) as vp: model.generate(...)``: attach, run, always detach.

    Inside the block the forked LLaVA prunes; after it (also on an exception) the model is the
    upstream-equivalent fork again. ``attach_kwargs`` go to :func:`attach_pruning`.
    """
    pruning = attach_pruning(model, config, **attach_kwargs)
    try:
        yield pruning
    finally:
        detach_pruning(model)


def get_pruning(model: nn.Module) -> VisionTokenPruning | None:
    return getattr(_llava_model(model), "vision_pruning", None)


def pruning_checkpoint(pruning: VisionTokenPruning, **provenance: Any) -> dict[str, Any]:
    """Everything needed to rebuild the learned stages: config, weights, temperature, layers.

    ``provenance`` (keyword arguments) is stored beside them, e.g. ``run_id``, ``base_model`` and
    ``base_fingerprint`` (the base the stages were trained on, which the evaluation checks) and ``steps``.
    ``format`` names the layout (files without it, from before provenance was stored, load too).
    """
    return {
        "format": "vision-token-pruning-stages/2",
        "config": pruning.config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in pruning.state_dict().items()},
        "temperature": pruning.temperature,
        "pruning_layers": pruning.pruning_layers,
        "use_merger": pruning.merger is not None,
        "use_pruners": pruning.pruners is not None,
        **provenance,
    }


def load_pruning(model: nn.Module, checkpoint: dict[str, Any], dtype: torch.dtype | None = None) -> VisionTokenPruning:
    """Attach the learned stages saved by :func:`pruning_checkpoint` to ``model``.

    A checkpoint that is not a stage file, or whose stages do not fit ``model`` (another architecture),
    is a one-line ``ValueError``; the model is left as it was.
    """
    from pruning.llava.config import ConfigError, config_from_dict

    if not isinstance(checkpoint, dict):
        raise ValueError(f"not a pruning stage file: a {type(checkpoint).__name__}, not a dict")
    missing = [key for key in ("config", "state_dict", "temperature", "pruning_layers", "use_merger", "use_pruners")
               if key not in checkpoint]
    if missing:
        raise ValueError(f"not a pruning stage file: no {', '.join(repr(k) for k in missing)}")
    try:
        config = config_from_dict(checkpoint["config"], source="checkpoint")
    except ConfigError as error:
        raise ValueError(" ".join(str(error).split())) from None
    previous = get_pruning(model)
    pruning = attach_pruning(model, config, use_merger=checkpoint["use_merger"], use_pruners=checkpoint["use_pruners"],
                             dtype=dtype)
    try:
        if pruning.pruning_layers != list(checkpoint["pruning_layers"]):
            raise ValueError(f"checkpoint was trained with pruning layers {checkpoint['pruning_layers']}, "
                             f"this model gives {pruning.pruning_layers}")
        expected = pruning.state_dict()
        saved = checkpoint["state_dict"]
        absent = sorted(set(expected) - set(saved))
        extra = sorted(set(saved) - set(expected))
        wrong = [k for k in expected if k in saved and tuple(saved[k].shape) != tuple(expected[k].shape)]
        if absent or extra or wrong:
            parts = []
            if wrong:
                k = wrong[0]
                parts.append(f"{len(wrong)} tensor(s) of another shape, e.g. {k} {list(saved[k].shape)} in the "
                             f"checkpoint, {list(expected[k].shape)} here")
            if absent:
                parts.append(f"{len(absent)} missing, e.g. {absent[0]}")
            if extra:
                parts.append(f"{len(extra)} unexpected, e.g. {extra[0]}")
            raise ValueError(f"the checkpoint's stages do not fit this model ({'; '.join(parts)})")
        pruning.load_state_dict(saved)
        pruning.temperature = float(checkpoint["temperature"])
    except Exception:
        detach_pruning(model)
        if previous is not None:
            _llava_model(model).vision_pruning = previous
        raise
    return pruning


# ----------------------------------------------------------------------------- helpers


def default_question_mask(image_mask: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """``[B, T]``: the (non-padding) tokens after the last image token of each row."""
    t = image_mask.shape[1]
    ar = torch.arange(t, device=image_mask.device)
    last = torch.where(image_mask, ar, torch.full_like(ar, -1)).max(dim=1, keepdim=True).values  # [B, 1]
    mask = ar[None, :] > last
    mask = mask & (last >= 0)
    if attention_mask is not None and attention_mask.dim() == 2:
        mask = mask & attention_mask.bool().to(mask.device)
    return mask


def _rows_of(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``mask [B, T]`` -> ``(idx [B, L], valid [B, L])``: the True rows of each row, left-aligned, padded."""
    counts = mask.sum(1)
    length = max(int(counts.max().item()) if mask.numel() else 0, 1)
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :length]
    valid = torch.arange(length, device=mask.device)[None, :] < counts[:, None]
    return order, valid


def _gather_rows(x: torch.Tensor | None, sel: torch.Tensor) -> torch.Tensor | None:
    """Gather ``x [B or 1, T, ...]`` at rows ``sel [B, T']`` along dim 1."""
    if x is None:
        return None
    if x.shape[0] != sel.shape[0]:
        x = x.expand(sel.shape[0], *x.shape[1:])
    index = sel.view(*sel.shape, *([1] * (x.dim() - 2))).expand(*sel.shape, *x.shape[2:])
    return x.gather(1, index)


def _vision_columns(image_mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``[B, T]`` image-token mask -> rows ``[B, V]`` of the image tokens (equal V per row required)."""
    counts = image_mask.sum(1)
    if not bool((counts == counts[0]).all()):
        raise ValueError(f"vision-token pruning needs the same number of image tokens in every row, got {counts.tolist()}")
    v = int(counts[0].item())
    rows = image_mask.nonzero()[:, 1].view(image_mask.shape[0], v)
    return rows, v


def _check_language_model(language_model: nn.Module) -> None:
    """Token dropping lives in the forked Llama decoder loop; any other language model cannot prune."""
    cls = type(language_model)
    if cls.__module__ != "models.llama.modeling_llama" or cls.__name__ != "LlamaModel":
        raise TypeError(f"vision-token pruning drops tokens in the decoder loop of the forked Llama "
                        f"(models.llama.modeling_llama.LlamaModel); this LLaVA's language model is "
                        f"{cls.__module__}.{cls.__name__}")


__all__ = [
    "ForcedSelector",
    "LayerInputs",
    "LlavaPruningPass",
    "MASK_EPS",
    "PrunedCacheState",
    "PruningTrace",
    "SelectionContext",
    "Selector",
    "VisionTokenPruning",
    "attach_pruning",
    "default_question_mask",
    "detach_pruning",
    "get_pruning",
    "llava_pruning",
    "load_pruning",
    "num_image_tokens",
    "pruning_checkpoint",
    "stage_distillation",
]
