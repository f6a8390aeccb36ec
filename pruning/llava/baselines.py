"""Training-free baselines for system C, token budgets, and the analytic FLOP model of the comparison.

Baselines are *selectors* (``pruning.selection.Selector``, registered in ``pruning.selection.SELECTORS``):
the fork's decoder loop calls them at the input of a layer with a
:class:`~pruning.selection.SelectionContext` and drops
what they do not keep, exactly as it does for the learned pruner heads (so every method is run
by the same code, at the same places).

* :class:`RandomSelector` (layer 0): ``k`` vision tokens uniformly at random (seeded).
* :class:`FastVSelector` (layer ``K >= 1``; FastV, Chen et al. 2024): rank the vision tokens by
  the attention they receive from the last prompt token in layer ``K - 1`` (mean over heads;
  recorded by a fence in the forked ``LlamaAttention`` from that layer's own post-RoPE queries and
  keys, for the last row only: no ``output_attentions``, no attention matrix over all queries),
  keep the top ``k`` for layers ``K`` onwards.
* :class:`DivPruneSelector` (layer 0; DivPrune, Alvar et al. 2025): max-min diversity on the
  vision features entering the LLM (projector outputs), cosine distance, the greedy solution of
  the paper: first the token whose nearest neighbour is farthest, then repeatedly the token
  farthest from the selected set.
* :class:`VisionZipSelector` (layer 0; VisionZip, Yang et al. 2025): the dominant tokens by the vision
  tower's CLS attention in its feature layer (``tower_cls_attention``, recorded by a fence in the forked
  ``get_image_features``), plus contextual tokens that merge the remaining ones into a few targets; the
  merged states replace the targets' (a :class:`~pruning.selection.Selection`).

Token budget (documented choice)
--------------------------------
Methods prune at different depths, so "the same budget" is defined by compute: the budget ``b``
is the mean, over the LLM's layers, of the fraction of the image's vision tokens present in the
layer (``sum_l V_l / (L * V)``), which is what the LLM's vision-token FLOPs scale with. For a
method pruning once before layer 0 that is simply the kept fraction; FastV at layer ``K`` keeps
``x`` with ``(K V + (L - K) x) / (L V) = b`` (``K`` is lowered when ``b`` is too small for it);
the learned method keeps its trained merger (50%) and scales its per-layer keep ratios
``r_i -> r_i ** alpha`` (bisection on ``alpha``) to meet ``b`` as closely as integer counts allow; below what
the merger's tokens alone cost before the first pruning layer, the merger keeps ``round(b V)`` centres.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from pruning.common import round_half_up
from pruning.llava.config import keep_count
from pruning.selection import SELECTORS, Selection, SelectionContext, Selector, make_selector, register_selector, topk_keep

# ----------------------------------------------------------------------------- helpers


def _k_for(ctx: SelectionContext, k: int) -> int:
    alive = int((ctx.alive[0] > 0.5).sum())
    return max(1, min(k, alive))


# ----------------------------------------------------------------------------- selectors


@register_selector("random")
class RandomSelector:
    """Keep ``keep`` vision tokens uniformly at random (``torch.Generator`` seeded once)."""

    name = "random"

    def __init__(self, keep: int, seed: int = 0) -> None:
        self.keep, self.generator = keep, torch.Generator().manual_seed(seed)

    def __call__(self, ctx: SelectionContext) -> torch.Tensor:
        scores = torch.rand(ctx.alive.shape, generator=self.generator).to(ctx.alive.device)
        return topk_keep(scores, ctx.alive, _k_for(ctx, self.keep))


@register_selector("fastv")
class FastVSelector:
    """FastV: attention received from the last prompt token in the previous layer, top ``keep``."""

    name = "fastv"

    def __init__(self, keep: int) -> None:
        self.keep = keep

    needs_previous_layer_attention = True  # the runtime records it in layer K - 1 (pruning.selection)

    def __call__(self, ctx: SelectionContext) -> torch.Tensor:
        if ctx.previous_layer_attention is None or ctx.layer_idx < 1:
            raise ValueError("FastV ranks with the previous layer's attention: select at a layer >= 1, "
                             "with no other pruning at the layer before")
        received = ctx.previous_layer_attention.gather(1, ctx.vision_rows)
        return topk_keep(received, ctx.alive, _k_for(ctx, self.keep))


@register_selector("divprune")
class DivPruneSelector:
    """DivPrune: greedy max-min diversity (cosine distance) over the vision features, ``keep`` tokens."""

    name = "divprune"

    def __init__(self, keep: int) -> None:
        self.keep = keep

    @staticmethod
    def select_diverse(features: torch.Tensor, alive: torch.Tensor, k: int) -> torch.Tensor:
        """``features [B, V, D]``, ``alive [B, V]`` -> 0/1 ``[B, V]`` with ``k`` diverse tokens per row."""
        f = torch.nn.functional.normalize(features.float(), dim=-1)
        dist = 1.0 - f @ f.transpose(1, 2)  # [B, V, V]
        dead = alive <= 0.5
        dist = dist.masked_fill(dead[:, None, :] | dead[:, :, None], float("nan"))
        b, v, _ = dist.shape
        keep = torch.zeros_like(alive)
        # first: the token whose nearest other token is farthest
        nn_dist = dist.clone()
        nn_dist.diagonal(dim1=1, dim2=2).fill_(float("inf"))
        nearest = torch.nan_to_num(nn_dist, nan=float("inf")).min(-1).values.masked_fill(dead, float("-inf"))
        chosen = nearest.argmax(-1)  # [B]
        keep[torch.arange(b), chosen] = 1.0
        to_set = torch.nan_to_num(dist[torch.arange(b), chosen], nan=float("-inf"))  # [B, V] distance to the set
        for _ in range(k - 1):
            candidate = to_set.masked_fill(keep > 0.5, float("-inf"))
            chosen = candidate.argmax(-1)
            keep[torch.arange(b), chosen] = 1.0
            to_set = torch.minimum(to_set, torch.nan_to_num(dist[torch.arange(b), chosen], nan=float("-inf")))
        return keep

    def __call__(self, ctx: SelectionContext) -> torch.Tensor:
        return self.select_diverse(ctx.vision_hidden, ctx.alive, _k_for(ctx, self.keep))


@register_selector("visionzip")
class VisionZipSelector:
    """VisionZip (Yang et al. 2025): ``keep`` tokens = the dominant ones, the top of the vision tower's CLS attention,
    plus contextual tokens that merge the rest.

    Of ``keep``, ``round(keep * dominant_share)`` (54 / 64 in the paper, at every budget) are the patches the tower's
    CLS token attends to most in its feature layer (``ctx.vision_attention``). The others become ``keep - dominant``
    contextual tokens: targets taken uniformly (every ``r // c``-th of the ``r`` remaining tokens, in order), every other
    remaining token assigned to its most similar target (cosine), and each contextual token = its target + the mean of
    its assigned tokens (the paper's code). A contextual token sits at its target's place in the sequence.

    Two documented differences from the paper, both from running at the LLM input through the selector protocol:
    the merge is on the projected features (the paper merges CLIP features before the projector) and the similarity
    is measured on them (the paper uses the feature layer's keys).
    """

    name = "visionzip"
    needs_vision_attention = True  # the forked get_image_features records it (tower_cls_attention)

    def __init__(self, keep: int, dominant_share: float = 54 / 64) -> None:
        if not 0.0 < dominant_share <= 1.0:
            raise ValueError(f"dominant_share={dominant_share} must be in (0, 1]")
        self.keep, self.dominant_share = keep, dominant_share

    def __call__(self, ctx: SelectionContext) -> Selection:
        if ctx.vision_attention is None:
            raise ValueError("VisionZip ranks patches by the vision tower's CLS attention: run it through the forked "
                             "LLaVA's vision_pruning (which records it) before the first LLM layer")
        k = _k_for(ctx, self.keep)
        dominant_count = max(1, min(k, round_half_up(k * self.dominant_share)))
        contextual_count = k - dominant_count
        dominant = topk_keep(ctx.vision_attention, ctx.alive, dominant_count)  # [B, Vc]
        hidden = ctx.vision_hidden.clone()
        keep = dominant.clone()
        rest = (ctx.alive > 0.5) & (dominant < 0.5)  # [B, Vc]
        if contextual_count > 0:
            for row in range(hidden.shape[0]):
                remaining = rest[row].nonzero().flatten()  # ascending
                if remaining.numel() == 0:
                    continue
                step = max(1, remaining.numel() // contextual_count)
                targets = remaining[::step][:contextual_count]
                others = remaining[~torch.isin(remaining, targets)]
                keep[row, targets] = 1.0
                if others.numel() == 0:
                    continue
                features = torch.nn.functional.normalize(ctx.vision_hidden[row].float(), dim=-1)
                nearest = (features[others] @ features[targets].T).argmax(-1)  # [others] -> target slot
                sums = torch.zeros(len(targets), hidden.shape[-1], dtype=torch.float32, device=hidden.device)
                sums.index_add_(0, nearest, ctx.vision_hidden[row, others].float())
                counts = torch.bincount(nearest, minlength=len(targets)).clamp(min=1)[:, None]
                hidden[row, targets] = (ctx.vision_hidden[row, targets].float() + sums / counts).to(hidden.dtype)
        return Selection(keep, hidden)


def tower_cls_attention(vision_tower: torch.nn.Module, hidden_states: tuple[torch.Tensor, ...],
                        feature_layer: int) -> torch.Tensor:
    """``[n_img, N]``: the attention the CLS token gives each patch in the CLIP encoder layer that produces
    ``hidden_states[feature_layer]`` (softmax over CLS + patches, mean over heads; CLS's own weight dropped).

    Computed from that layer's own pre-attention LayerNorm, query and key projections on its input
    ``hidden_states[feature_layer - 1]``, for the CLS query only: what ``output_attentions=True`` returns with eager
    attention (tested), which SDPA does not return."""
    encoder_layers = getattr(vision_tower, "vision_model", vision_tower).encoder.layers
    index = feature_layer % len(hidden_states)  # hidden_states[i] is the output of encoder layer i - 1
    if index < 1:
        raise ValueError(f"vision_feature_layer={feature_layer} selects the embeddings, which no attention produced")
    layer = encoder_layers[index - 1]
    attention = layer.self_attn
    x = layer.layer_norm1(hidden_states[index - 1])  # [n_img, 1 + N, Dv]
    n_img, length, _ = x.shape
    heads, head_dim = attention.num_heads, attention.head_dim
    query = attention.q_proj(x[:, :1]).view(n_img, 1, heads, head_dim).transpose(1, 2)  # [n_img, H, 1, d]
    key = attention.k_proj(x).view(n_img, length, heads, head_dim).transpose(1, 2)  # [n_img, H, 1 + N, d]
    weights = ((query @ key.transpose(-1, -2)) * attention.scale).float().softmax(-1)  # [n_img, H, 1, 1 + N]
    return weights[:, :, 0, 1:].mean(1)


# ----------------------------------------------------------------------------- budgets


@dataclass(frozen=True)
class Schedule:
    """Vision tokens per LLM layer of one method at one budget, and how it was set up."""

    method: str
    budget: float  # requested
    layer_tokens: tuple[int, ...]  # vision tokens present in each LLM layer
    num_vision_tokens: int  # per image, before any reduction
    selector_layer: int | None = None  # baselines: where the selector runs
    keep: int | None = None  # baselines: tokens kept by the selector
    keep_ratios: tuple[float, ...] | None = None  # learned: per pruning layer
    merged: int | None = None  # learned: merger output

    @property
    def achieved(self) -> float:
        """The budget actually met: mean fraction of the vision tokens present per LLM layer."""
        return sum(self.layer_tokens) / (len(self.layer_tokens) * self.num_vision_tokens)


def one_shot_schedule(method: str, budget: float, num_layers: int, num_vision: int, layer: int = 0) -> Schedule:
    """Random / DivPrune: keep ``round(b V)`` before layer ``layer`` (0)."""
    k = max(1, min(num_vision, round_half_up(budget * num_vision)))
    tokens = tuple([num_vision] * layer + [k] * (num_layers - layer))
    return Schedule(method, budget, tokens, num_vision, selector_layer=layer, keep=k)


def fastv_schedule(budget: float, num_layers: int, num_vision: int, layer: int = 2) -> Schedule:
    """FastV at ``layer`` (lowered until at least one token can be kept within the budget)."""
    for k_layer in range(layer, 0, -1):
        x = (budget * num_layers * num_vision - k_layer * num_vision) / (num_layers - k_layer)
        keep = round_half_up(x)
        if keep >= 1:
            keep = min(keep, num_vision)
            tokens = tuple([num_vision] * k_layer + [keep] * (num_layers - k_layer))
            return Schedule("fastv", budget, tokens, num_vision, selector_layer=k_layer, keep=keep)
    tokens = tuple([num_vision] + [1] * (num_layers - 1))
    return Schedule("fastv", budget, tokens, num_vision, selector_layer=1, keep=1)


def learned_layer_tokens(num_layers: int, num_vision: int, merged: int, pruning_layers: Sequence[int],
                         keep_ratios: Sequence[float]) -> tuple[int, ...]:
    ratios = dict(zip(pruning_layers, keep_ratios))
    tokens, alive = [], merged
    for layer in range(num_layers):
        if layer in ratios:
            alive = keep_count(alive, ratios[layer])
        tokens.append(alive)
    return tuple(tokens)


def learned_schedule(budget: float | None, num_layers: int, num_vision: int, merged: int,
                     pruning_layers: Sequence[int], keep_ratios: Sequence[float]) -> Schedule:
    """The learned method at ``budget`` (None: as trained, ``merged`` tokens out of the merger).

    The pruner heads keep the ratios they were trained at, and the merger's count scales to the budget (it ranks its
    centres, so any count runs): the count whose tokens per layer come closest to the budget. Above what
    ``num_vision`` merged tokens cost with those ratios, the merger keeps every token and the ratios relax to
    ``r ** alpha`` (``alpha`` in [0, 1]). Squeezing the ratios with the merger fixed instead scored 9 points lower
    on the cluttered task at budget 0.25, but 1-4 points higher at 0.35 and 0.5 (docs/BENCHMARKS.md)."""
    if budget is None:
        tokens = learned_layer_tokens(num_layers, num_vision, merged, pruning_layers, keep_ratios)
        return Schedule("learned", float("nan"), tokens, num_vision, keep_ratios=tuple(keep_ratios), merged=merged)
    target = budget * num_layers * num_vision

    def tokens_for(count: int, alpha: float = 1.0) -> tuple[int, ...]:
        return learned_layer_tokens(num_layers, num_vision, count, pruning_layers,
                                    [min(1.0, r ** alpha) for r in keep_ratios])

    # sum(tokens) is non-decreasing in the merged count: the closest count (the smaller one on a tie)
    count = min(range(1, num_vision + 1), key=lambda m: (abs(sum(tokens_for(m)) - target), m))
    alpha = 1.0
    if count == num_vision and sum(tokens_for(count)) < target:  # relax the ratios: sum is non-increasing in alpha
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if sum(tokens_for(count, mid)) > target else (lo, mid)
        alpha = min((lo, hi), key=lambda a: abs(sum(tokens_for(count, a)) - target))
    ratios = tuple(min(1.0, r ** alpha) for r in keep_ratios)
    return Schedule("learned", budget, tokens_for(count, alpha), num_vision, keep_ratios=ratios, merged=count)


def schedule_selectors(schedule: Schedule, seed: int = 0) -> dict[int, "Selector"]:
    """``{layer: selector}`` for a baseline schedule, from the selector registry (``pruning.selection``)."""
    if schedule.method not in SELECTORS:
        raise ValueError(f"no selector for method {schedule.method!r}; registered: {', '.join(sorted(SELECTORS))}")
    options = {"seed": seed} if schedule.method == "random" else {}
    return {schedule.selector_layer: make_selector(schedule.method, keep=schedule.keep, **options)}


BASELINES = ("random", "fastv", "divprune", "visionzip")
"""The training-free methods system C compares against, in table order."""


def baseline_schedule(method: str, budget: float, num_layers: int, num_vision: int, fastv_layer: int = 2) -> Schedule:
    if method == "fastv":
        return fastv_schedule(budget, num_layers, num_vision, fastv_layer)
    if method in ("random", "divprune", "visionzip"):
        return one_shot_schedule(method, budget, num_layers, num_vision)
    raise ValueError(f"unknown baseline {method!r}; allowed: {', '.join(BASELINES)}")


__all__ = [
    "DivPruneSelector",
    "FastVSelector",
    "RandomSelector",
    "VisionZipSelector",
    "BASELINES",
    "Schedule",
    "baseline_schedule",
    "fastv_schedule",
    "learned_layer_tokens",
    "learned_schedule",
    "schedule_selectors",
    "tower_cls_attention",
    "one_shot_schedule",
    "topk_keep",
]
