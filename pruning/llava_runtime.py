"""System C at run time: the machinery the fenced branches of ``models/llava/modeling_llava.py`` call.

How pruning reaches the model
-----------------------------
``attach_pruning(model, config)`` builds a :class:`VisionTokenPruning` module (the learned token
merger, the pruner heads at the scaled ``pruning_layers``, the temperature, optional training-free
``selectors``) and sets it as the optional submodule ``model.model.vision_pruning`` of the forked
``LlavaModel``. The fork built with upstream arguments alone has no such attribute: every fence
checks ``getattr(self, "vision_pruning", None)`` and, when it is missing or disabled, runs the
upstream statements unchanged. ``detach_pruning`` removes it again.

With it attached, three fences call into this module:

1. ``LlavaModel.get_image_features``: between the CLIP feature selection and the projector,
   :meth:`VisionTokenPruning.merge` merges ``[n_img, N, Dv]`` -> ``[n_img, M, Dv]`` (576 -> 288 on
   LLaVA-1.5-7B; 64 -> 32 on the tiny model), so the projector runs on M tokens.
2. ``LlavaModel.forward``: :meth:`VisionTokenPruning.scatter_merged_tokens` puts merged token ``m``
   at the sequence position of its centre (the other ``N - M`` image placeholders get zeros and
   are dropped before layer 0), so the upstream ``masked_scatter`` and the prompt's original
   numbering are kept; then :func:`run_language_model` replaces ``self.language_model(...)``.
3. ``LlavaForConditionalGeneration.forward``: labels are gathered at the rows that survived.

The decoder loop (:func:`run_language_model`)
---------------------------------------------
Runs ``embed -> layers -> norm`` of the language model (an upstream ``LlamaModel``) with its own
decoder-layer modules, mask function (``create_causal_mask``) and rotary embedding, exactly as
``LlamaModel.forward`` does, plus the pruning steps. A *selector* runs at the **input** of each
pruning layer ``p``: the learned :class:`~pruning.llava_pruning.LayerPruner` (vision hidden states
attend to the question tokens, the text after the image) or a training-free baseline
(``pruning/llava_baselines.py``). Tokens it drops take no part in layer ``p`` and any later layer.

* ``mode="drop"`` (inference; the default in eval mode): tokens are **physically removed**. The
  hidden states, the 2-D padding mask, the position ids (the survivors keep their original
  positions) and the rotary ``(cos, sin)`` are gathered at the surviving rows and the causal mask
  is rebuilt for the shorter sequence. Layer ``l``'s KV cache is filled during prefill by the
  tokens alive at layer ``l``, so each layer's cache holds exactly its survivors (layers before
  the first drop keep every token, later ones fewer: the same key set the masked computation
  attends to). The kept rows of each group of layers are stored on the cache
  (``cache.vision_pruning_state``); a decode step builds, per group, the padding mask of its
  cache (``attention_mask[:, kept rows]`` + the new tokens), so ``generate`` continues with the
  original numbering: ``generate`` passes ``position_ids`` (the original prefill length + step);
  without them the next position is ``state.seen`` (the original length + tokens since).
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
merger and keep ratios 1.0 the loop is bit-identical to upstream (tested with ``torch.equal``).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from pruning.llava_config import (
    VisionTokenPruningConfig,
    scale_pruning_layers,
)
from pruning.llava_pruning import LayerPruner, MergerOutput, TokenMerger, keep_mask

MASK_EPS = 1e-20
"""Keep-policy floor of the training-time attention bias ``log(keep + MASK_EPS)`` (-46 for a dropped key)."""

MODES = ("auto", "drop", "mask")

# ----------------------------------------------------------------------------- selection context


@dataclass
class SelectionContext:
    """What a selector sees at the input of pruning layer ``layer_idx`` (``Vc`` vision tokens in play).

    Drop mode: only the surviving vision tokens are in play (``alive`` is all ones); mask mode:
    all V image positions, with ``alive`` the cumulative (differentiable) keep mask so far.
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
    language_model: nn.Module
    previous_layer_input: torch.Tensor | None  # [B, Tc', D] hidden states that entered layer_idx - 1
    previous_position_embeddings: tuple[torch.Tensor, torch.Tensor] | None
    previous_attention_mask: torch.Tensor | None
    training: bool
    temperature: float
    generator: torch.Generator | None = None


Selector = Callable[[SelectionContext], torch.Tensor]
"""``selector(ctx) -> keep [B, Vc]`` (0/1, a subset of ``ctx.alive``, the same count in every row)."""


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
    merger_output: MergerOutput | None = None
    merge_keep: torch.Tensor | None = None  # [B, V] image positions holding a merged token (stage 1)
    layer_tokens: list[int] = field(default_factory=list)  # sequence length (alive tokens) entering each layer
    kept_rows: torch.Tensor | None = None  # [B, T_out] original rows of the returned hidden states (drop mode)
    sequence_length: int = 0  # T of the prompt (original numbering)


@dataclass
class PrunedCacheState:
    """Stored on the KV cache after a pruned prefill: enough to build every later decode mask."""

    mode: str  # "drop": group caches hold only ``rows``; "mask": all rows, ``key_keep`` hides the dropped
    prefill_length: int  # T0, original numbering
    seen: int  # original-numbering tokens seen so far (T0 + decoded)
    groups: list[tuple[int, torch.Tensor]]  # (first layer, [B, T_g] kept original rows or [B, T0] key keep)


# ----------------------------------------------------------------------------- the module


class VisionTokenPruning(nn.Module):
    """Pruning state attached to a forked ``LlavaModel`` as ``vision_pruning`` (see the module docstring).

    Args:
        config: the system-C config (``pruning.llava_config``).
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
        self.merger_embeddings: Callable[[torch.Tensor], torch.Tensor] | None = None  # set by attach_pruning
        self._pass: dict[str, Any] = {}  # this forward: question mask, merge keep (consumed by the decoder loop)
        self._merge: dict[str, Any] = {}  # the last merge (generate encodes images before the forward)
        self._question: dict[str, Any] | None = None  # question context of the next merge
        self._output_rows: torch.Tensor | None = None

    # ------------------------------------------------------------------ switches

    @property
    def merges(self) -> bool:
        """Whether stage 1 (the merger) runs in this pass."""
        return self.enabled and self.merger is not None

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

    # ------------------------------------------------------------------ fence 0: pass context

    def begin_pass(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor,
                   attention_mask: torch.Tensor | None, kwargs: dict[str, Any]) -> None:
        """Called by ``LlavaModel.forward`` before the image features: records the question tokens.

        ``kwargs["vision_question_mask"]`` ([B, T] bool, popped) marks the question tokens
        explicitly (training passes it so the pruners never see the answer); otherwise the
        question is the text after the last image token (a prompt during generation).
        """
        question_mask = kwargs.pop("vision_question_mask", None)
        if question_mask is None and input_ids is not None and self.image_token_id is not None:
            question_mask = default_question_mask(input_ids == self.image_token_id, attention_mask)
        self._pass = {"question_mask": question_mask}
        if question_mask is not None and self._question is None:
            self._question = {"question_mask": question_mask, "inputs_embeds": inputs_embeds}
        self._output_rows = None  # set by a pruned prefill (drop mode): rows of the returned sequence

    def set_question(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     question_mask: torch.Tensor | None = None) -> None:
        """Give a ``question_aware`` merger its question before ``generate``.

        ``generate`` encodes the images (``get_image_features``) before the first forward, so the
        merger cannot see the prompt there; call this with the prompt first. Used by the next merge.
        """
        if question_mask is None:
            question_mask = default_question_mask(input_ids == self.image_token_id, attention_mask)
        embeddings = self.merger_embeddings(input_ids) if self.merger_embeddings is not None else None
        if embeddings is None:
            raise ValueError("set_question needs the model's input embeddings (attach with attach_pruning)")
        self._question = {"question_mask": question_mask, "inputs_embeds": embeddings}

    # ------------------------------------------------------------------ fence 1: merger

    def merge(self, image_features: torch.Tensor) -> torch.Tensor:
        """``[n_img, N, Dv]`` CLIP features -> ``[n_img, M, Dv]`` merged features (stage 1)."""
        question = question_mask = None
        context, self._question = self._question, None
        if self.merger.merger_type == "question_aware":
            if context is None:
                raise ValueError("merger_type='question_aware' needs the question: call the model with input_ids, or "
                                 "call model.model.vision_pruning.set_question(input_ids, attention_mask) before generate")
            qm, embeds = context["question_mask"], context["inputs_embeds"]
            if qm.shape[0] != image_features.shape[0]:
                raise ValueError(f"merger_type='question_aware' needs one image per prompt, got {image_features.shape[0]} "
                                 f"images for {qm.shape[0]} prompts")
            idx, valid = _rows_of(qm.bool().to(embeds.device))
            question = embeds.gather(1, idx[..., None].expand(-1, -1, embeds.shape[-1])).to(image_features.dtype)
            question_mask = valid
        out = self.merger(image_features, temperature=self.temperature, question=question,
                          question_mask=question_mask, generator=self.generator)
        self._merge = {"merger_output": out, "num_tokens": image_features.shape[1]}
        return out.tokens

    def scatter_merged_tokens(self, image_features: torch.Tensor) -> torch.Tensor:
        """``[n_img * M, D]`` projected merged tokens -> ``[n_img * N, D]`` in placeholder layout.

        Merged token ``m`` of an image goes to the placeholder of its centre (ascending, so the
        order is kept); the other placeholders get zeros and are dropped before layer 0
        (``merge_keep``). Features that were not merged by this module are returned unchanged.
        """
        record, self._merge = self._merge, {}
        out: MergerOutput | None = record.get("merger_output")
        if out is None:
            return image_features
        n_img, m = out.centre_indices.shape
        n = record["num_tokens"]
        if image_features.shape[0] != n_img * m:
            return image_features
        full = image_features.new_zeros(n_img, n, image_features.shape[-1])
        idx = out.centre_indices.to(image_features.device)
        full.scatter_(1, idx[..., None].expand(-1, -1, image_features.shape[-1]), image_features.view(n_img, m, -1))
        keep = torch.zeros(n_img, n, dtype=torch.bool, device=image_features.device).scatter_(1, idx, True)
        self._pass["merge_keep"] = keep
        self._pass["merger_output"] = out
        return full.view(n_img * n, -1)

    # ------------------------------------------------------------------ fence 3: labels

    def labels_for_output(self, labels: torch.Tensor) -> torch.Tensor:
        """Labels aligned with the returned (possibly shorter) sequence."""
        rows = self._output_rows
        if rows is None or rows.shape[1] == labels.shape[1]:
            return labels
        return labels.gather(1, rows.to(labels.device))

    # ------------------------------------------------------------------ selection

    def select(self, ctx: SelectionContext) -> torch.Tensor:
        """Keep mask ``[B, Vc]`` at ``ctx.layer_idx`` (a selector override, else the learned pruner)."""
        if ctx.layer_idx in self.selectors:
            keep = self.selectors[ctx.layer_idx](ctx)
            return keep.to(ctx.alive.dtype) * (ctx.alive if ctx.mode == "mask" else 1.0)
        pruner = self.pruners[str(ctx.layer_idx)]
        logits = pruner(ctx.vision_hidden, ctx.question_hidden, ctx.question_mask, alive=ctx.alive.detach() > 0.5)
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
    embed = inner.get_input_embeddings()
    pruning.merger_embeddings = lambda ids: embed(ids.to(embed.weight.device))  # not a submodule: no weights copied
    inner.vision_pruning = pruning
    return pruning


def detach_pruning(model: nn.Module) -> VisionTokenPruning | None:
    """Remove and return the attached pruning module (the model is upstream-equivalent again)."""
    inner = _llava_model(model)
    pruning = getattr(inner, "vision_pruning", None)
    if pruning is not None:
        del inner.vision_pruning
    return pruning


def get_pruning(model: nn.Module) -> VisionTokenPruning | None:
    return getattr(_llava_model(model), "vision_pruning", None)


def pruning_checkpoint(pruning: VisionTokenPruning) -> dict[str, Any]:
    """Everything needed to rebuild the learned stages: config, weights, temperature, layers."""
    return {
        "config": pruning.config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in pruning.state_dict().items()},
        "temperature": pruning.temperature,
        "pruning_layers": pruning.pruning_layers,
        "use_merger": pruning.merger is not None,
        "use_pruners": pruning.pruners is not None,
    }


def load_pruning(model: nn.Module, checkpoint: dict[str, Any], dtype: torch.dtype | None = None) -> VisionTokenPruning:
    """Attach the learned stages saved by :func:`pruning_checkpoint` to ``model``."""
    from pruning.llava_config import config_from_dict

    config = config_from_dict(checkpoint["config"], source="checkpoint")
    pruning = attach_pruning(model, config, use_merger=checkpoint["use_merger"], use_pruners=checkpoint["use_pruners"],
                             dtype=dtype)
    if pruning.pruning_layers != list(checkpoint["pruning_layers"]):
        raise ValueError(f"checkpoint was trained with pruning layers {checkpoint['pruning_layers']}, "
                         f"this model gives {pruning.pruning_layers}")
    pruning.load_state_dict(checkpoint["state_dict"])
    pruning.temperature = float(checkpoint["temperature"])
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


def _check_language_model(lm: nn.Module) -> None:
    missing = [name for name in ("embed_tokens", "layers", "norm", "rotary_emb", "config") if not hasattr(lm, name)]
    if missing:
        raise TypeError(f"vision-token pruning runs the decoder loop of a Llama-style language model; "
                        f"{type(lm).__name__} lacks {missing}")


# ----------------------------------------------------------------------------- the decoder loop


def run_language_model(
    language_model: nn.Module,
    pruning: VisionTokenPruning,
    *,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    past_key_values: Any,
    inputs_embeds: torch.Tensor,
    image_token_mask: torch.Tensor | None,
    **kwargs: Any,
):
    """``self.language_model(...)`` of ``LlavaModel.forward`` with vision-token pruning (see module doc).

    ``image_token_mask [B, T]``: the image placeholder positions of this call (None: no image).
    Returns a ``BaseModelOutputWithPast`` (``last_hidden_state`` holds only the surviving rows in
    drop mode; ``pruning.last_trace.kept_rows`` maps them to the prompt's rows).
    """
    from transformers.cache_utils import DynamicCache
    from transformers.masking_utils import create_causal_mask
    from transformers.modeling_outputs import BaseModelOutputWithPast

    lm = language_model
    state: PrunedCacheState | None = getattr(past_key_values, "vision_pruning_state", None)
    has_images = image_token_mask is not None and bool(image_token_mask.any())
    merge_keep: torch.Tensor | None = pruning._pass.get("merge_keep")
    question_mask: torch.Tensor | None = pruning._pass.get("question_mask")
    merger_output = pruning._pass.get("merger_output")
    pruning._pass = {}

    if not has_images and state is None:
        # Nothing to prune and no pruned cache to respect (text-only prompt): the upstream call.
        pruning.last_trace = None
        return lm(attention_mask=attention_mask, position_ids=position_ids, past_key_values=past_key_values,
                  inputs_embeds=inputs_embeds, **kwargs)

    _check_language_model(lm)
    config = lm.config
    output_hidden_states = kwargs.pop("output_hidden_states", None)
    output_hidden_states = config.output_hidden_states if output_hidden_states is None else output_hidden_states
    kwargs.pop("output_attentions", None)
    kwargs.pop("return_dict", None)
    use_cache = kwargs.pop("use_cache", None)
    use_cache = config.use_cache if use_cache is None else use_cache

    if has_images and state is not None:
        raise ValueError("vision-token pruning: a prompt with images cannot continue an already pruned cache; "
                         "start a new cache for each image prompt")
    if use_cache and past_key_values is None:
        past_key_values = DynamicCache(config=config)

    if not has_images:
        return _decode_step(lm, state, attention_mask=attention_mask, position_ids=position_ids,
                            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                            output_hidden_states=output_hidden_states, **kwargs)

    if past_key_values is not None and past_key_values.get_seq_length() > 0:
        raise ValueError("vision-token pruning prunes a whole prompt: pass an empty cache with an image prompt "
                         f"(the cache already holds {past_key_values.get_seq_length()} tokens)")

    mode = pruning.resolved_mode()
    if mode == "mask" and config._attn_implementation not in ("eager", "sdpa"):
        raise ValueError(f"mode='mask' adds a differentiable bias to the attention mask, which needs "
                         f"attn_implementation 'sdpa' or 'eager' (got {config._attn_implementation!r})")

    b, t, _ = inputs_embeds.shape
    device = inputs_embeds.device
    if position_ids is None:
        position_ids = torch.arange(t, device=device).unsqueeze(0)
    vision_rows0, v = _vision_columns(image_token_mask.to(device).bool())
    if question_mask is None:
        question_mask = default_question_mask(image_token_mask.bool(), attention_mask)
    question_mask = question_mask.to(device).bool()
    if merge_keep is not None:
        merge_keep = merge_keep.to(device).reshape(b, v)

    trace = PruningTrace(mode=mode, sequence_length=t, merger_output=merger_output, merge_keep=merge_keep)
    trace.num_vision_tokens.append(merger_output.selection_mask.shape[1] if merger_output is not None else v)
    trace.stage_names.append("vision tower")
    if merge_keep is not None:
        trace.num_vision_tokens.append(int(merge_keep[0].sum()))
        trace.stage_names.append("merger")

    # Exactly LlavaModel -> LlamaModel.forward up to the layers (mask, rotary): the no-drop path is upstream's.
    causal_mask = create_causal_mask(config=config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                     past_key_values=past_key_values, position_ids=position_ids)
    hidden = inputs_embeds
    position_embeddings = lm.rotary_emb(hidden, position_ids=position_ids)
    all_hidden = [hidden] if output_hidden_states else None
    selection_layers = set(pruning.selection_layers())
    layers = lm.layers[: config.num_hidden_layers]
    bad = sorted(layer for layer in selection_layers if layer >= len(layers))
    if bad:
        raise ValueError(f"pruning layers {bad} do not exist in a {len(layers)}-layer language model")

    if mode == "drop":
        hidden = _prefill_drop(lm, pruning, trace, layers, hidden, causal_mask, position_embeddings, position_ids,
                               attention_mask, past_key_values, use_cache, vision_rows0, merge_keep, question_mask,
                               selection_layers, all_hidden, kwargs)
    else:
        hidden = _prefill_mask(lm, pruning, trace, layers, hidden, causal_mask, position_embeddings, position_ids,
                               attention_mask, past_key_values, use_cache, vision_rows0, merge_keep, question_mask,
                               selection_layers, all_hidden, kwargs)
    hidden = lm.norm(hidden)
    if all_hidden is not None:
        all_hidden[-1] = hidden  # like upstream: the last entry is the normed output
    pruning.last_trace = trace
    pruning._output_rows = trace.kept_rows
    return BaseModelOutputWithPast(
        last_hidden_state=hidden,
        past_key_values=past_key_values if use_cache else None,
        hidden_states=tuple(all_hidden) if all_hidden is not None else None,
    )


def _selection_context(pruning, lm, layer_idx, mode, hidden, vis_rows, alive, vision_cols, question_mask_rows,
                       attention_mask, position_embeddings, prev) -> SelectionContext:
    q_idx, q_valid = _rows_of(question_mask_rows)
    d = hidden.shape[-1]
    return SelectionContext(
        layer_idx=layer_idx,
        mode=mode,
        vision_hidden=hidden.gather(1, vis_rows[..., None].expand(-1, -1, d)),
        alive=alive,
        vision_cols=vision_cols,
        vision_rows=vis_rows,
        question_hidden=hidden.gather(1, q_idx[..., None].expand(-1, -1, d)),
        question_mask=q_valid,
        hidden_states=hidden,
        attention_mask=attention_mask,
        position_embeddings=position_embeddings,
        language_model=lm,
        previous_layer_input=prev[0] if prev else None,
        previous_position_embeddings=prev[1] if prev else None,
        previous_attention_mask=prev[2] if prev else None,
        training=pruning.training,
        temperature=pruning.temperature,
        generator=pruning.generator,
    )


def _prefill_drop(lm, pruning, trace, layers, hidden, causal_mask, position_embeddings, position_ids,
                  attention_mask, cache, use_cache, vision_rows0, merge_keep, question_mask, selection_layers,
                  all_hidden, kwargs):
    """Prefill with physical removal (see the module docstring, ``mode="drop"``)."""
    from transformers.masking_utils import create_causal_mask

    b, t, _ = hidden.shape
    device = hidden.device
    v = vision_rows0.shape[1]
    rows = torch.arange(t, device=device).expand(b, t)  # original row of each current row
    is_vision = torch.zeros(b, t, dtype=torch.bool, device=device).scatter_(1, vision_rows0, True)
    col_of_row = torch.full((b, t), -1, dtype=torch.long, device=device)
    col_of_row.scatter_(1, vision_rows0, torch.arange(v, device=device).expand(b, v))
    is_question = question_mask
    pos = position_ids
    am = attention_mask if (attention_mask is not None and attention_mask.dim() == 2) else None
    cos_sin = position_embeddings
    groups: list[tuple[int, torch.Tensor]] = []
    alive_cols = torch.arange(v, device=device).expand(b, v)
    dirty = False
    prev = None

    def drop(keep_rows: torch.Tensor) -> None:
        nonlocal rows, is_vision, col_of_row, is_question, pos, am, cos_sin, hidden, dirty, prev
        counts = keep_rows.sum(1)
        if not bool((counts == counts[0]).all()):
            raise ValueError(f"a selector kept different token counts per row: {counts.tolist()}")
        sel = keep_rows.nonzero()[:, 1].view(b, int(counts[0]))
        hidden = _gather_rows(hidden, sel)
        rows, is_vision = _gather_rows(rows, sel), _gather_rows(is_vision, sel)
        col_of_row, is_question = _gather_rows(col_of_row, sel), _gather_rows(is_question, sel)
        pos = _gather_rows(pos, sel)
        am = _gather_rows(am, sel) if am is not None else None
        cos_sin = (_gather_rows(cos_sin[0], sel), _gather_rows(cos_sin[1], sel))
        dirty, prev = True, None

    def keep_vision(keep_vis: torch.Tensor) -> torch.Tensor:
        """[B, Vc] keep over the current vision rows -> [B, Tc] keep over all current rows."""
        keep_rows = torch.ones_like(is_vision)
        keep_rows[is_vision] = keep_vis.reshape(-1).bool()
        return keep_rows

    if merge_keep is not None:  # stage 1 leftovers: placeholders without a merged token never enter layer 0
        drop(keep_vision(merge_keep.gather(1, alive_cols)))
        alive_cols = alive_cols[merge_keep].view(b, -1)

    for i, layer in enumerate(layers):
        if i in selection_layers:
            vis_rows = is_vision.nonzero()[:, 1].view(b, -1)
            ctx = _selection_context(pruning, lm, i, "drop", hidden, vis_rows,
                                     torch.ones(vis_rows.shape, dtype=hidden.dtype, device=device),
                                     alive_cols, is_question, am, cos_sin, prev)
            with torch.no_grad():
                keep_vis = pruning.select(ctx).detach() > 0.5
            full = torch.zeros(b, v, dtype=torch.bool, device=device)
            full.scatter_(1, alive_cols, keep_vis)
            trace.keep[i] = full
            drop(keep_vision(keep_vis))
            alive_cols = alive_cols[keep_vis].view(b, -1)
            trace.num_vision_tokens.append(alive_cols.shape[1])
            trace.stage_names.append(f"layer {i}")
        if dirty:
            groups.append((i, rows))
            mask_2d = am if am is not None else torch.ones(rows.shape, dtype=torch.bool, device=device)
            causal_mask = create_causal_mask(config=lm.config, inputs_embeds=hidden, attention_mask=mask_2d,
                                             past_key_values=cache, position_ids=pos, layer_idx=i)
            dirty = False
        trace.layer_tokens.append(hidden.shape[1])
        prev = (hidden, cos_sin, am)
        hidden = layer(hidden, attention_mask=causal_mask, position_embeddings=cos_sin, position_ids=pos,
                       past_key_values=cache, use_cache=use_cache, **kwargs)
        if all_hidden is not None:
            all_hidden.append(hidden)
    trace.kept_rows = rows
    if cache is not None and use_cache:
        if not groups or groups[0][0] != 0:
            groups.insert(0, (0, torch.arange(t, device=device).expand(b, t)))
        cache.vision_pruning_state = PrunedCacheState("drop", t, t, groups)
    return hidden


def _prefill_mask(lm, pruning, trace, layers, hidden, causal_mask, position_embeddings, position_ids,
                  attention_mask, cache, use_cache, vision_rows0, merge_keep, question_mask, selection_layers,
                  all_hidden, kwargs):
    """Prefill with differentiable masking (see the module docstring, ``mode="mask"``)."""
    b, t, _ = hidden.shape
    device, dtype = hidden.device, hidden.dtype
    v = vision_rows0.shape[1]
    cols = torch.arange(v, device=device).expand(b, v)
    policy = torch.ones(b, v, dtype=dtype, device=device) if merge_keep is None else merge_keep.to(dtype)
    am = attention_mask if (attention_mask is not None and attention_mask.dim() == 2) else None
    pad = am.bool() if am is not None else torch.ones(b, t, dtype=torch.bool, device=device)
    ar = torch.arange(t, device=device)
    allowed = (ar[None, :, None] >= ar[None, None, :]) & pad[:, None, :]  # [B, T(q), T(k)]
    base = torch.zeros(b, 1, t, t, dtype=dtype, device=device).masked_fill(~allowed[:, None], torch.finfo(dtype).min)
    groups: list[tuple[int, torch.Tensor]] = []

    def biased_mask(i: int) -> torch.Tensor:
        key_bias = torch.zeros(b, t, dtype=torch.float32, device=device)
        log_keep = torch.log(policy.float() + MASK_EPS)
        # Gradient only through kept keys (d bias / d keep = 1 there). Through a dropped key it would be
        # e^{s_k} / Z * (v_k - out) (the 1e20 of 1 / (keep + eps) times a 1e-20 attention weight): unbounded,
        # summed over queries, heads and layers, and a first-order "re-add a little of it" signal that outliers
        # dominate. Values are unchanged: kept 0, dropped -46.
        log_keep = torch.where(policy.detach() > 0.5, log_keep, log_keep.detach())
        key_bias = key_bias.scatter(1, vision_rows0, log_keep)
        hard = torch.ones(b, t, dtype=torch.bool, device=device).scatter(1, vision_rows0, policy.detach() > 0.5)
        groups.append((i, hard))
        return base + key_bias.to(dtype)[:, None, None, :]

    prev = None
    for i, layer in enumerate(layers):
        changed = i == 0 and merge_keep is not None
        if i in selection_layers:
            ctx = _selection_context(pruning, lm, i, "mask", hidden, vision_rows0, policy, cols, question_mask,
                                     am, position_embeddings, prev)
            policy = pruning.select(ctx)
            trace.keep[i] = policy
            trace.num_vision_tokens.append(int((policy[0].detach() > 0.5).sum()))
            trace.stage_names.append(f"layer {i}")
            changed = True
        if changed:
            causal_mask = biased_mask(i)
        trace.layer_tokens.append(t - v + int((policy[0].detach() > 0.5).sum()))
        prev = (hidden, position_embeddings, am)
        hidden = layer(hidden, attention_mask=causal_mask, position_embeddings=position_embeddings,
                       position_ids=position_ids, past_key_values=cache, use_cache=use_cache, **kwargs)
        if all_hidden is not None:
            all_hidden.append(hidden)
    trace.kept_rows = None
    if cache is not None and use_cache:
        if not groups or groups[0][0] != 0:
            groups.insert(0, (0, torch.ones(b, t, dtype=torch.bool, device=device)))
        cache.vision_pruning_state = PrunedCacheState("mask", t, t, groups)
    return hidden


def _decode_step(lm, state: PrunedCacheState, *, attention_mask, position_ids, past_key_values, inputs_embeds,
                 use_cache, output_hidden_states, **kwargs):
    """A forward over new text tokens after a pruned prefill: per layer group, the mask of its cache."""
    from transformers.masking_utils import create_causal_mask
    from transformers.modeling_outputs import BaseModelOutputWithPast

    if past_key_values is None:
        raise ValueError("a pruned prefill can only be continued with its KV cache")
    config = lm.config
    hidden = inputs_embeds
    q = hidden.shape[1]
    if position_ids is None:
        position_ids = (torch.arange(q, device=hidden.device) + state.seen).unsqueeze(0)
    position_embeddings = lm.rotary_emb(hidden, position_ids=position_ids)
    am = attention_mask if (attention_mask is not None and attention_mask.dim() == 2) else None
    t0 = state.prefill_length
    if am is not None and am.shape[1] != state.seen + q:
        raise ValueError(f"attention_mask covers {am.shape[1]} tokens, expected {state.seen + q} "
                         f"(the {t0}-token prompt in its original numbering + {state.seen - t0 + q} new tokens)")
    layers = lm.layers[: config.num_hidden_layers]
    bounds = [g[0] for g in state.groups] + [len(layers)]
    all_hidden = [hidden] if output_hidden_states else None
    for (start, info), end in zip(state.groups, bounds[1:]):
        if state.mode == "drop":
            key_2d = None if am is None else torch.cat([am[:, :t0].gather(1, info.to(am.device)), am[:, t0:]], dim=1)
        else:
            prompt = info.to(hidden.device) if am is None else (am[:, :t0].bool() & info.to(am.device))
            tail = (torch.ones(hidden.shape[0], state.seen - t0 + q, dtype=torch.bool, device=hidden.device)
                    if am is None else am[:, t0:].bool())
            key_2d = torch.cat([prompt, tail], dim=1)
        causal_mask = create_causal_mask(config=config, inputs_embeds=hidden, attention_mask=key_2d,
                                         past_key_values=past_key_values, position_ids=position_ids, layer_idx=start)
        for layer in layers[start:end]:
            hidden = layer(hidden, attention_mask=causal_mask, position_embeddings=position_embeddings,
                           position_ids=position_ids, past_key_values=past_key_values, use_cache=use_cache, **kwargs)
            if all_hidden is not None:
                all_hidden.append(hidden)
    state.seen += q
    hidden = lm.norm(hidden)
    if all_hidden is not None:
        all_hidden[-1] = hidden
    return BaseModelOutputWithPast(last_hidden_state=hidden, past_key_values=past_key_values,
                                   hidden_states=tuple(all_hidden) if all_hidden is not None else None)


__all__ = [
    "ForcedSelector",
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
    "load_pruning",
    "num_image_tokens",
    "pruning_checkpoint",
    "run_language_model",
]
