"""PruneVid's runtime for the Qwen2.5-VL fork: attach/detach, and the per-generation state its fences call.

Attach PruneVid to a model, then generate as usual::

    with prunevid(model, preset("default")) as pv:
        out = model.generate(**inputs, do_sample=False, max_new_tokens=32, return_dict_in_generate=True)
    pv.state_for(out.past_key_values).stats   # token counts at every stage, KV lengths, how importance was computed

:func:`attach_prunevid` sets the attribute ``Qwen2_5_VLModel.prunevid`` to a :class:`PruneVid` (the
configuration and the stage-2 selector); :func:`detach_prunevid` (or leaving the ``with`` block, also on
an exception) removes it, and the fork is upstream again, bit for bit. Each generation gets its own
:class:`PruneVidState`, created explicitly by the fork's first fence when a forward starts on an empty KV
cache (the prefill) and registered under that cache (a weak reference: it goes with the cache); the
decoding forwards on the same cache find it there. The forked ``Qwen2_5_VLModel.forward`` hands the state
down to the text model in the keyword ``prunevid_state``; nothing is stored on the cache or on any
upstream object. With nothing attached, or a configuration with every stage off, the upstream statements
run unchanged.

Sequence layouts. Positions are counted in three layouts of the prompt (batch 1):

* **original** ``[L]``: the processor's ``input_ids`` (M-RoPE position ids, ``rope_deltas`` and
  ``generate``'s 2-D ``attention_mask`` always stay in this numbering);
* **stage 1** ``[L1]``: after spatial-temporal merging; ``stage1_kept [L1]`` are the original
  positions that survive (every non-video token, and each merged token's *source*, the earliest
  member of its cluster, whose M-RoPE ``(t, h, w)`` the merged token takes);
* **stage 2** ``[L2]``: after attention pruning at ``pruning_layer`` K; ``stage2_kept [L2]`` are
  indices into the stage-1 layout (every non-video token and the kept video tokens).

After prefill, the KV cache of layer ``i`` holds the stage-1 layout if ``i <= K`` and stage 3 is off,
the stage-2 layout otherwise, followed by the decoded tokens. ``generate``'s 2-D mask (original length +
new tokens) is translated to layer 0's layout before the language model sees it
(:meth:`PruneVidState.translate_attention_mask`); a materialised 4-D mask is re-sliced for the layers
after K when their cache is shorter (:meth:`PruneVidState.after_layer`).

Stage-2 selection goes through the selector protocol shared with system C (``pruning/selection.py``):
the default is the registered ``"prunevid"`` selector (the question's attention at layer K, top
``keep_ratio`` globally or per stage-1 group); ``attach_prunevid(model, config, selector=...)`` runs
any other registered method at the same place.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache

from pruning.selection import SelectionContext, Selector, make_selector
from pruning.video.prunevid import (
    MergeResult,
    PruneVidConfig,
    merge_video_tokens,
    question_query_positions,
    selection_group_ids,
    visual_token_importance,
)

__all__ = [
    "PruneVid",
    "PruneVidState",
    "attach_prunevid",
    "cache_nbytes",
    "compress_cache_layers",
    "detach_prunevid",
    "get_prunevid",
    "logger",
    "prunevid",
]

logger = logging.getLogger("pruning.video.prunevid")


def _log(verbose: bool, message: str, *args) -> None:
    logger.log(logging.INFO if verbose else logging.DEBUG, message, *args)


def _video_grids(video_grid_thw, merge_size, video_token_counts, position_ids, video_positions, total) -> list[tuple[int, int]]:
    """``[(T_grid, N), ...]`` per video: LLM-side grid steps and tokens per step.

    From ``video_grid_thw`` (``t, h / merge, w / merge``) when the caller passed it. ``generate()``
    pre-encodes the videos and drops ``video_grid_thw`` before the forward pass; the grid is then
    read back from the M-RoPE position ids it computed from that grid: within a video the ``(h, w)``
    rows run through the ``N`` raster positions once per grid step, so ``N`` is the distance to
    the first repeat of the first token's ``(h, w)`` (robust to any temporal spacing).
    """
    if video_grid_thw is not None:
        return [(int(t), int(h) // merge_size * (int(w) // merge_size)) for t, h, w in video_grid_thw.tolist()]
    if position_ids is None or position_ids.dim() != 3:
        raise ValueError(
            "PruneVid needs the video grid: pass video_grid_thw, or 3-D M-RoPE position_ids (generate() passes them)"
        )
    rows = position_ids[-3:, 0].to(video_positions.device)  # [3, L] (t, h, w) of batch row 0
    counts = video_token_counts if video_token_counts is not None else [total]
    grids, offset = [], 0
    for count in counts:
        hw = rows[1:, video_positions[offset : offset + count]]  # [2, count]
        repeats = ((hw[0] == hw[0, 0]) & (hw[1] == hw[1, 0])).nonzero().flatten()
        n = int(repeats[1]) if repeats.numel() > 1 else count
        if count % n:
            raise ValueError(f"cannot read the video grid from the position ids ({count} tokens, {n} per grid step)")
        grids.append((count // n, n))
        offset += count
    return grids


@dataclass
class PruneVidState:
    """The PruneVid state of one generation: the configuration, then what prefill decided (read by the fork).

    Created by :meth:`PruneVid.state_for_forward` when a forward starts on an empty KV cache, filled
    during that prefill forward by the fork's fences, read by the decoding forwards on the same cache.
    ``stats`` is a flat dict of JSON-friendly numbers for reports.
    """

    config: PruneVidConfig
    selector: Selector
    num_layers: int
    verbose: bool = False
    prompt_length: int = 0
    stage1_kept: torch.Tensor | None = None  # [L1] original positions, sorted
    merges: list[MergeResult] = field(default_factory=list)  # one per video
    visual_positions: torch.Tensor | None = None  # [V] video-token indices in the stage-1 layout
    visual_groups: torch.Tensor | None = None  # [V] selection_group_ids (offset per video)
    question_positions: torch.Tensor | None = None  # [Q] stage-1 layout: tokens after the last visual token
    question_positions_original: torch.Tensor | None = None  # [Q] the same tokens, original layout
    attention_mask_stage1: torch.Tensor | None = None  # [1, L1] 2-D mask in the stage-1 layout (or None)
    question_queries: torch.Tensor | None = None  # [1, H, Q, d] layer K's queries of the question rows (after RoPE)
    attention_scaling: float | None = None  # layer K's softmax scale
    importance: torch.Tensor | None = None  # [V] float32 (selectors that rank by the question's attention)
    kept_visual: torch.Tensor | None = None  # [V2] indices into visual_positions
    stage2_kept: torch.Tensor | None = None  # [L2] stage-1 indices, sorted
    compressed: bool = False
    kv_length_after_prefill: list[int] | None = None  # set when the prefill forward ends
    stats: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------------------ switches

    @property
    def in_prefill(self) -> bool:
        """True during the forward that created this state (the prefill), False in the decoding forwards."""
        return self.kv_length_after_prefill is None

    @property
    def pruning_layer(self) -> int:
        return self.config.pruning_layer

    @property
    def stage1_length(self) -> int:
        return int(self.stage1_kept.numel()) if self.stage1_kept is not None else self.prompt_length

    @property
    def needs_question_attention(self) -> bool:
        """The stage-2 selector ranks by the question's attention at layer K (PruneVid's own selection)."""
        return bool(getattr(self.selector, "needs_question_attention", False))

    def layer_layout(self, layer_idx: int) -> str:
        """``"stage1"`` or ``"stage2"``: which prompt layout the KV cache of ``layer_idx`` holds after prefill."""
        if self.stage2_kept is None:
            return "stage1"
        if self.compressed or layer_idx > self.pruning_layer:
            return "stage2"
        return "stage1"

    def layout_positions(self, layer_idx: int) -> torch.Tensor:
        """``[L_i]`` original positions of the prompt entries in the KV cache of ``layer_idx`` after prefill."""
        kept = self.stage1_kept
        if self.layer_layout(layer_idx) == "stage2":
            kept = kept[self.stage2_kept.to(kept.device)]
        return kept

    # ------------------------------------------------------------------------------ prefill, before the LLM

    def begin_prefill(
        self,
        *,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        video_embeds: torch.Tensor | None,
        video_grid_thw: torch.Tensor | None,
        model_config,
        video_token_counts: list[int] | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Stage 1 (and the bookkeeping stage 2 needs). ``inputs_embeds [1, L, D] -> [1, L1, D]``.

        Called once, by the fork, right after the video features were scattered into
        ``inputs_embeds``. Finds the video tokens, merges each video's tokens with
        :func:`pruning.video.prunevid.merge_video_tokens` (identity when stage 1 is off), and records
        the stage-1 layout, the visual positions and group ids for stage 2, and the question
        rows (every token after the last visual token; never the system prompt).
        """
        if inputs_embeds.shape[0] != 1:
            raise ValueError(
                f"PruneVid supports batch size 1 (one video and one question per call), got a batch of "
                f"{inputs_embeds.shape[0]}: run the samples one at a time"
            )
        if input_ids is None:
            raise ValueError("PruneVid needs input_ids (to find the video and question tokens), not only inputs_embeds")
        device = inputs_embeds.device
        length = input_ids.shape[1]
        self.prompt_length = length
        ids = input_ids[0]
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("PruneVid expects a 2-D attention_mask [1, L] (or None)")
        mask_1d = attention_mask[0].to(device) if attention_mask is not None else None

        video_positions = (ids == model_config.video_token_id).nonzero().flatten().to(device)  # [Nv] original
        visual_like = (ids == model_config.video_token_id) | (ids == model_config.image_token_id)
        self.stats.update(
            prompt_tokens=length,
            tokens_before_stage1=int(video_positions.numel()),
            pruning_layer=self.pruning_layer if self.config.enable_pruning else None,
            num_layers=self.num_layers,
        )
        _log(
            self.verbose,
            "PruneVid prefill: prompt of %d tokens, %d video tokens (token id %d) at positions %s..%s, "
            "video_grid_thw=%s",
            length,
            video_positions.numel(),
            model_config.video_token_id,
            int(video_positions[0]) if video_positions.numel() else "-",
            int(video_positions[-1]) if video_positions.numel() else "-",
            video_grid_thw.tolist() if video_grid_thw is not None else "(pre-encoded by generate; read from the position ids)",
        )

        keep_original = torch.ones(length, dtype=torch.bool, device=device)
        merged_rows = []  # (original positions, merged tokens) per video
        group_ids = []
        visual_original = []
        if video_embeds is not None and video_positions.numel():
            grids = _video_grids(
                video_grid_thw, model_config.vision_config.spatial_merge_size, video_token_counts,
                position_ids, video_positions, video_embeds.shape[0],
            )
            offset = 0
            group_offset = 0
            for grid_t, n in grids:
                count = grid_t * n
                tokens = video_embeds[offset : offset + count].reshape(grid_t, n, -1)  # [T_grid, N, D]
                positions = video_positions[offset : offset + count]  # original sequence positions
                merge = merge_video_tokens(tokens, self.config)
                self.merges.append(merge)
                sources = positions[merge.source_positions.to(device)]  # [M] original positions
                keep_original[positions] = False
                keep_original[sources] = True
                merged_rows.append((sources, merge.merged_tokens))
                groups = selection_group_ids(merge).to(device)
                group_ids.append(groups + group_offset)
                group_offset += int(groups.max()) + 1
                visual_original.append(sources)
                _log(
                    self.verbose,
                    "stage 1%s: video [T_grid=%d, N=%d, D=%d] (one grid step = %d frames), %d temporal segment(s) "
                    "over grid steps %s, %d static + %d dynamic merged tokens: %d -> %d video tokens",
                    "" if self.config.enable_stage1 else " (off)",
                    grid_t, n, tokens.shape[-1], model_config.vision_config.temporal_patch_size,
                    len(merge.segments), merge.segments, int(merge.is_static.sum()), int((~merge.is_static).sum()),
                    merge.tokens_before_stage1, merge.tokens_after_stage1,
                )
                offset += count

        self.stage1_kept = keep_original.nonzero().flatten()  # [L1] original positions
        if merged_rows and self.config.enable_stage1:
            embeds = inputs_embeds.clone()
            for sources, merged in merged_rows:
                embeds[0, sources] = merged.to(embeds.dtype)
            inputs_embeds = embeds[:, self.stage1_kept]
        # (stage 1 off: every position is kept and inputs_embeds is returned untouched)
        stage1_index = torch.full((length,), -1, dtype=torch.long, device=device)
        stage1_index[self.stage1_kept] = torch.arange(self.stage1_kept.numel(), device=device)
        if visual_original:
            self.visual_positions = stage1_index[torch.cat(visual_original)]
            self.visual_groups = torch.cat(group_ids)
        else:
            self.visual_positions = torch.zeros(0, dtype=torch.long, device=device)
            self.visual_groups = torch.zeros(0, dtype=torch.long, device=device)
        if mask_1d is not None:
            self.attention_mask_stage1 = attention_mask[:, self.stage1_kept.to(attention_mask.device)]

        if visual_like.any():
            last_visual = int(visual_like.nonzero().flatten()[-1])
            self.question_positions_original = question_query_positions(ids, last_visual, mask_1d)
            self.question_positions = stage1_index[self.question_positions_original.to(device)]
        tokens_after_stage1 = int(self.visual_positions.numel())
        self.stats.update(
            tokens_after_stage1=tokens_after_stage1,
            stage1_sequence_length=int(self.stage1_kept.numel()),
            num_segments=[len(m.segments) for m in self.merges],
            # stage 1's static/dynamic split: original tokens and merged tokens of each kind
            static_tokens_before_stage1=sum(int(m.is_static[m.cluster_members].sum()) for m in self.merges),
            dynamic_tokens_before_stage1=sum(int((~m.is_static[m.cluster_members]).sum()) for m in self.merges),
            static_tokens_after_stage1=sum(int(m.is_static.sum()) for m in self.merges),
            dynamic_tokens_after_stage1=sum(int((~m.is_static).sum()) for m in self.merges),
            question_tokens=int(self.question_positions.numel()) if self.question_positions is not None else 0,
            # until stage 2 runs, its input and output are the stage-1 tokens
            tokens_before=tokens_after_stage1,
            tokens_after=tokens_after_stage1,
        )
        return inputs_embeds

    def slice_position_ids(self, position_ids: torch.Tensor | None) -> torch.Tensor | None:
        """Keep the original-numbering position ids of the stage-1 layout: ``[..., L] -> [..., L1]``.

        The M-RoPE rows (``t, h, w``) of every surviving token are its original ones (a merged
        token's are its source's). A leading *text* row (``generate``'s 4-row layout) only sizes masks
        and FlashAttention's packed-sequence detection, which read it as cache slots: it becomes
        ``0..L1-1`` so the shorter sequence is not mistaken for several packed ones.
        """
        if not self.config.enable_stage1 or self.stage1_length == self.prompt_length:
            return position_ids
        if position_ids is None:
            raise ValueError(
                "PruneVid stage 1 needs the M-RoPE position ids of the full sequence: pass mm_token_type_ids "
                "(the Qwen2.5-VL processor returns them) or position_ids"
            )
        kept = self.stage1_kept.to(position_ids.device)
        sliced = position_ids[..., kept]
        if sliced.dim() == 3 and sliced.shape[0] == 4:
            sliced = sliced.clone()
            sliced[0] = torch.arange(kept.numel(), device=sliced.device, dtype=sliced.dtype)
        return sliced

    def translate_attention_mask(self, attention_mask):
        """A 2-D mask in the original layout -> the layout of layer 0's KV cache (+ the uncached new tokens).

        Prefill: ``[1, L] -> [1, L1]``. Decoding: ``generate`` keeps ``[1, L + t]`` (original prompt +
        generated tokens) while layer 0 caches ``L_0 + t - 1`` entries: the prompt columns are taken at
        layer 0's kept positions and the generated tokens' columns are appended. 4-D masks, dicts and
        ``None`` pass through.
        """
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
            return attention_mask
        if self.in_prefill:
            if self.stage1_length == self.prompt_length:
                return attention_mask
            return attention_mask[:, self.stage1_kept.to(attention_mask.device)]
        layout = self.layout_positions(0).to(attention_mask.device)
        if layout.numel() == self.prompt_length:
            return attention_mask
        return torch.cat([attention_mask[:, layout], attention_mask[:, self.prompt_length :]], dim=-1)

    def decode_position_ids(self, cache: Cache, inputs_embeds, attention_mask, rope_deltas):
        """M-RoPE position ids ``[3, 1, q]`` of new tokens when the caller did not pass any.

        They continue the ORIGINAL numbering (the prompt's ``L`` tokens, whatever was removed) plus
        the full-sequence ``rope_deltas``; upstream would count the shorter cache instead.
        """
        seq = inputs_embeds.shape[1]
        last = self.num_layers - 1
        decoded = cache.get_seq_length(last) - self.kv_length_after_prefill[last]
        start = self.prompt_length + decoded
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            positions = (attention_mask.long().cumsum(-1) - 1)[:, -seq:]
        else:
            positions = torch.arange(start, start + seq, device=inputs_embeds.device)[None]
        positions = positions.to(inputs_embeds.device).view(1, 1, -1).expand(3, 1, -1)
        if rope_deltas is not None:
            positions = positions + rope_deltas.to(positions.device)
        return positions

    # ------------------------------------------------------------------------------ inside the LLM

    def wants_question_queries(self, layer_idx: int) -> bool:
        return (
            self.in_prefill
            and self.config.enable_pruning
            and layer_idx == self.pruning_layer
            and self.needs_question_attention
            and self.visual_positions is not None
            and self.visual_positions.numel() > 0
        )

    @property
    def scored_question_positions(self) -> torch.Tensor:
        """``[Q]`` stage-1 rows whose attention scores the visual tokens: every question row, or only the last one
        for a selector with ``question_rows = "last"`` (FastV's criterion)."""
        if getattr(self.selector, "question_rows", "all") == "last":
            return self.question_positions[-1:]
        return self.question_positions

    def record_question_queries(self, query_states: torch.Tensor, scaling: float) -> None:
        """Layer K's queries (after q_proj and RoPE) at the scored question rows: ``[1, H, L1, d] -> [1, H, Q, d]``."""
        self.question_queries = query_states[:, :, self.scored_question_positions.to(query_states.device)].detach()
        self.attention_scaling = scaling

    def acts_after_layer(self, layer_idx: int) -> bool:
        if layer_idx != self.pruning_layer or not self.config.enable_pruning:
            return False
        if self.in_prefill:
            has_visual = self.visual_positions is not None and self.visual_positions.numel() > 0
            return has_visual and (self.question_queries is not None or not self.needs_question_attention)
        return self.stage2_kept is not None and not self.compressed

    def after_layer(
        self,
        layer_idx: int,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        text_position_ids: torch.Tensor | None,
        causal_mask_mapping: dict,
        cache: Cache,
    ):
        """Stage 2 (+ stage 3) after layer K in prefill; mask re-slicing for layers > K in decoding.

        Returns ``(hidden_states, position_embeddings, text_position_ids, causal_mask_mapping)``.
        """
        if self.in_prefill:
            return self._prune(layer_idx, hidden_states, position_embeddings, text_position_ids, causal_mask_mapping, cache)
        # Decoding without stage 3: layers 0..K cache the stage-1 layout, layers K+1.. the stage-2
        # layout. A materialised mask was sized for layer 0: keep its columns of the stage-2 prompt
        # entries and of every decoded token. (``None``, e.g. batch-1 SDPA decoding: nothing to do.)
        mapping = {}
        for key, mask in causal_mask_mapping.items():
            if isinstance(mask, torch.Tensor):
                l1 = self.stage1_length
                columns = torch.cat(
                    [self.stage2_kept.to(mask.device), torch.arange(l1, mask.shape[-1], device=mask.device)]
                )
                mask = mask[..., columns]
            elif mask is not None:
                raise NotImplementedError(
                    f"PruneVid cannot re-slice a {type(mask).__name__} attention mask: use attn_implementation='sdpa' or 'eager'"
                )
            mapping[key] = mask
        return hidden_states, position_embeddings, text_position_ids, mapping

    def _prune(self, layer_idx, hidden_states, position_embeddings, text_position_ids, causal_mask_mapping, cache):
        device = hidden_states.device
        cos, sin = position_embeddings  # [1, L1, d]
        vpos = self.visual_positions.to(device)  # [V] stage-1 rows of the visual tokens
        qpos = self.question_positions.to(device) if self.question_positions is not None else vpos[:0]
        scored = self.scored_question_positions.to(device) if self.question_positions is not None else vpos[:0]
        with torch.no_grad():  # the selection is discrete; the slicing below stays differentiable
            importance, how = None, None
            if self.needs_question_attention:
                importance, how = self._question_attention(layer_idx, hidden_states.shape[1], scored, cache)
            elif getattr(self.selector, "needs_previous_layer_attention", False):
                raise ValueError(
                    "this selector ranks by the previous layer's attention, which system B does not record: use "
                    "'last_token_attention' (FastV's criterion at the pruning layer itself)"
                )
            ctx = SelectionContext(
                layer_idx=layer_idx,
                mode="drop",
                vision_hidden=hidden_states[:, vpos],
                alive=torch.ones(1, vpos.numel(), device=device),
                vision_cols=torch.arange(vpos.numel(), device=device)[None],
                vision_rows=vpos[None],
                question_hidden=hidden_states[:, qpos],
                question_mask=torch.ones(1, qpos.numel(), device=device),
                hidden_states=hidden_states,
                attention_mask=self.attention_mask_stage1,
                position_embeddings=position_embeddings,
                previous_layer_attention=None,
                training=False,
                temperature=1.0,
                question_attention=importance[None] if importance is not None else None,
                groups=self.visual_groups.to(device)[None],
            )
            keep_mask = self.selector(ctx)  # [1, V] 0/1
            if keep_mask.shape != (1, vpos.numel()):
                raise ValueError(
                    f"the stage-2 selector returned a keep mask of shape {tuple(keep_mask.shape)}, expected (1, {vpos.numel()})"
                )
            kept_visual = (keep_mask[0] > 0.5).nonzero().flatten()  # [V2] sorted
            keep = torch.ones(hidden_states.shape[1], dtype=torch.bool, device=device)
            keep[vpos] = False
            keep[vpos[kept_visual]] = True
            kept = keep.nonzero().flatten()  # [L2] stage-1 indices
        self.importance, self.kept_visual, self.stage2_kept = importance, kept_visual, kept
        self.question_queries = None
        selector_name = getattr(self.selector, "name", None) or getattr(self.selector, "__name__", type(self.selector).__name__)
        self.stats.update(
            tokens_before=int(vpos.numel()),
            tokens_after=int(kept_visual.numel()),
            stage2_sequence_length=int(kept.numel()),
            selection=self.config.selection,
            selector=selector_name,
            importance=how,
        )
        _log(
            self.verbose,
            "stage 2 at layer %d: selector %s (%s): %d -> %d visual tokens, sequence %d -> %d",
            layer_idx, selector_name, how or "no question attention", vpos.numel(), kept_visual.numel(),
            hidden_states.shape[1], kept.numel(),
        )

        # Really remove the tokens: index-select every per-token tensor the later layers read.
        hidden_states = hidden_states[:, kept]
        position_embeddings = (cos[:, kept], sin[:, kept])
        if text_position_ids is not None:
            # cache-slot numbering (see slice_position_ids): 0..L2-1
            text_position_ids = torch.arange(kept.numel(), device=device, dtype=text_position_ids.dtype)[None].expand(
                text_position_ids.shape[0], -1
            )
        mapping = {}
        for key, mask in causal_mask_mapping.items():
            if isinstance(mask, torch.Tensor):
                mask = mask[:, :, kept.to(mask.device)][..., kept.to(mask.device)]
            elif mask is not None:
                raise NotImplementedError(
                    f"PruneVid cannot slice a {type(mask).__name__} attention mask: use attn_implementation='sdpa' or 'eager'"
                )
            mapping[key] = mask
        if self.attention_mask_stage1 is not None:
            self.attention_mask_stage1 = self.attention_mask_stage1[:, kept.to(self.attention_mask_stage1.device)]
        if self.config.enable_cache_compression:
            compress_cache_layers(cache, range(layer_idx + 1), kept)
            self.compressed = True
            _log(self.verbose, "stage 3: KV cache of layers 0..%d compressed to %d entries", layer_idx, kept.numel())
        return hidden_states, position_embeddings, text_position_ids, mapping

    def _question_attention(self, layer_idx: int, length: int, qpos: torch.Tensor, cache: Cache):
        """``(importance [V], description)``: the attention layer K's question rows give each visual token."""
        # Queries: layer K's own, recorded in its attention after q_proj and RoPE at the question rows.
        query = self.question_queries  # [1, H, Q, d]
        # Keys: exactly what layer K attended to -- its KV cache, just written (after k_proj and RoPE).
        keys = cache.layers[layer_idx].keys  # [1, Hkv, L1, d]
        if keys is None or keys.shape[-2] != length:
            raise RuntimeError(
                f"PruneVid expected layer {layer_idx}'s cache to hold the {length} prefill keys, "
                f"found {None if keys is None else keys.shape[-2]}: start each generation on an empty cache"
            )
        importance = visual_token_importance(
            query, keys, self.visual_positions.to(keys.device), self.attention_scaling,
            attention_mask=self.attention_mask_stage1, query_positions=qpos,
        )[0]  # [V]
        _log(
            self.verbose,
            "stage 2 importance at layer %d: %d visual tokens from %d question queries (stage-1 positions %d..%d) "
            "x %d keys, %d heads (GQA %d KV heads), computed from the layer's own projections per head and query "
            "chunk (no attention matrix, no output_attentions); min/mean/max %.4g/%.4g/%.4g",
            layer_idx, importance.numel(), qpos.numel(), int(qpos[0]), int(qpos[-1]), keys.shape[-2],
            query.shape[1], keys.shape[1], float(importance.min()), float(importance.float().mean()),
            float(importance.max()),
        )
        how = (
            f"layer {layer_idx}'s own queries (q_proj+RoPE) of the {qpos.numel()} question rows x its cached keys "
            f"({keys.shape[-2]}), softmax over all keys, max over queries then heads; no output_attentions"
        )
        return importance, how

    # ------------------------------------------------------------------------------ end of a forward

    def end_forward(self, cache: Cache) -> None:
        """End of the prefill forward: record the KV length per layer and the totals (decoding: nothing)."""
        if not self.in_prefill:
            return
        lengths = [cache.get_seq_length(i) for i in range(len(cache.layers))]
        self.kv_length_after_prefill = lengths
        tokens_before_stage1 = self.stats.get("tokens_before_stage1", 0)
        tokens_after = self.stats.get("tokens_after", 0)
        self.stats.update(
            kv_cache_length_per_layer=lengths,
            kv_cache_bytes=cache_nbytes(cache),
            total_compression_ratio=(1.0 - tokens_after / tokens_before_stage1) if tokens_before_stage1 else 0.0,
        )
        _log(
            self.verbose,
            "PruneVid prefill done: visual tokens %d -> %d (stage 1) -> %d (stage 2), total compression %.1f%%; "
            "KV cache length per layer %s (%d bytes)",
            tokens_before_stage1, self.stats.get("tokens_after_stage1", 0), tokens_after,
            100 * self.stats["total_compression_ratio"], lengths, self.stats["kv_cache_bytes"],
        )


# ============================================================================= the KV cache (transformers' API)


def compress_cache_layers(cache: Cache, layer_indices, kept: torch.Tensor) -> None:
    """Stage 3: layers' ``keys/values [B, Hkv, L1, d] -> [B, Hkv, L2, d]`` (index-select, no zero-masking).

    Those layers then decode against the shorter cache; ``get_seq_length`` / ``get_mask_sizes`` report
    the real (shorter) lengths, which is what mask construction needs. Decoding positions do not come
    from the cache length (see :meth:`PruneVidState.decode_position_ids`).
    """
    for i in layer_indices:
        layer = cache.layers[i]
        if not layer.is_initialized or layer.keys is None:
            continue
        index = kept.to(layer.keys.device)
        layer.keys = layer.keys.index_select(-2, index)
        layer.values = layer.values.index_select(-2, index)


def cache_nbytes(cache: Cache) -> int:
    """Bytes held by the cached keys and values."""
    total = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


# ============================================================================= attach / detach


class PruneVid:
    """PruneVid attached to one Qwen2.5-VL model: the configuration, the stage-2 selector, and the
    per-generation states (one per KV cache, weakly referenced, so each goes with its cache).

    The fork's first fence calls :meth:`state_for_forward` at every forward; nothing else holds state.
    """

    def __init__(self, config: PruneVidConfig, *, num_layers: int, selector: Selector | None = None,
                 verbose: bool = False) -> None:
        config.validate_for_model(num_layers)
        self.config, self.num_layers, self.verbose = config, num_layers, verbose
        self.selector = selector if selector is not None else make_selector(
            "prunevid", keep_ratio=config.keep_ratio, grouping=config.selection
        )
        self.states: weakref.WeakKeyDictionary[Cache, PruneVidState] = weakref.WeakKeyDictionary()

    @property
    def active(self) -> bool:
        """Any stage on (else the fork runs the upstream path, bit-identical to transformers)."""
        return self.config.any_stage_on

    def state_for_forward(self, past_key_values: Cache | None, use_cache: bool | None, model_config
                          ) -> tuple[PruneVidState | None, Cache | None]:
        """``(state, cache)`` for one forward: a new state on an empty cache (a prefill), registered under the
        cache; the cache's own in a decoding forward; ``None`` when PruneVid is off or the cache was filled
        without it (then the forward runs upstream). With no cache given, the ``DynamicCache`` that upstream's
        text model would create is created here, so the state has a key."""
        if not self.active:
            return None, past_key_values
        if past_key_values is None:
            if use_cache is False:
                raise ValueError("PruneVid needs the KV cache: call the model with use_cache=True (the default)")
            past_key_values = DynamicCache(config=model_config)
        if past_key_values.get_seq_length() == 0:
            state = PruneVidState(config=self.config, selector=self.selector, num_layers=self.num_layers,
                                  verbose=self.verbose)
            self.states[past_key_values] = state
            return state, past_key_values
        return self.states.get(past_key_values), past_key_values

    def state_for(self, cache: Cache) -> PruneVidState:
        """The state of the generation that filled ``cache`` (its ``stats``, kept indices, ...)."""
        if not self.active:
            raise KeyError("every PruneVid stage is off in this configuration: generations keep no state")
        if cache not in self.states:
            raise KeyError("no PruneVid generation ran on this cache while PruneVid was attached")
        return self.states[cache]


def _qwen_model(model: nn.Module) -> nn.Module:
    """The ``Qwen2_5_VLModel`` of a ``Qwen2_5_VLForConditionalGeneration`` (or the model itself)."""
    from models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    inner = getattr(model, "model", model)
    if not isinstance(inner, Qwen2_5_VLModel):
        raise TypeError(
            f"PruneVid attaches to the forked Qwen2.5-VL (models.qwen2_5_vl.modeling_qwen2_5_vl), got "
            f"{type(model).__name__}: load the model with that module's Qwen2_5_VLForConditionalGeneration"
        )
    return inner


def attach_prunevid(model: nn.Module, config: PruneVidConfig | None = None, *, selector: Selector | None = None,
                    verbose: bool = False) -> PruneVid:
    """Attach PruneVid to the forked Qwen2.5-VL ``model`` (as ``model.model.prunevid``) and return it.

    ``config`` is checked against the model's depth; ``selector`` replaces PruneVid's own stage-2
    selection (any registered method of ``pruning.selection``); ``verbose`` logs each stage at INFO.
    """
    inner = _qwen_model(model)
    if getattr(inner, "prunevid", None) is not None:
        raise RuntimeError("PruneVid is already attached to this model: detach_prunevid(model) first")
    runtime = PruneVid(
        config if config is not None else PruneVidConfig(),
        num_layers=inner.config.get_text_config().num_hidden_layers,
        selector=selector,
        verbose=verbose,
    )
    inner.prunevid = runtime
    return runtime


def detach_prunevid(model: nn.Module) -> PruneVid | None:
    """Remove and return the attached runtime (the model is upstream-equivalent again)."""
    inner = _qwen_model(model)
    runtime = getattr(inner, "prunevid", None)
    if runtime is not None:
        del inner.prunevid
    return runtime


def get_prunevid(model: nn.Module) -> PruneVid | None:
    return getattr(_qwen_model(model), "prunevid", None)


@contextlib.contextmanager
def prunevid(model: nn.Module, config: PruneVidConfig | None = None, **attach_kwargs: Any) -> Iterator[PruneVid]:
    """``with prunevid(model, config) as pv: model.generate(...)``: attach, run, always detach."""
    runtime = attach_prunevid(model, config, **attach_kwargs)
    try:
        yield runtime
    finally:
        detach_prunevid(model)
