"""PruneVid for Qwen2.5-VL: configuration and the pure tensor algorithms.

Three stages; this module holds the algorithms, the forked model file wires them in.

* **Stage 1, spatial-temporal token merging** (vision tokens, before the LLM):
  :func:`merge_video_tokens` ``[T, N, D] -> [M, D]``: frames are cut into contiguous
  temporal segments (:func:`temporal_segments`), each segment's spatial positions are split
  into static and dynamic ones (:func:`static_dynamic_split`), static tokens are averaged over
  the segment and clustered spatially, dynamic tokens are clustered within each frame, every
  cluster is replaced by its mean (DPC-KNN, :mod:`pruning.video.dpc_knn`).
* **Stage 2, attention-based pruning** at ``pruning_layer``:
  :func:`visual_token_importance` (text-to-visual attention probabilities, max over the
  question queries, then max over heads; computed per head and per query chunk, never the
  full ``[L, L]`` attention) and :func:`select_keep_indices` (top-k per segment and frame, or
  over all visual tokens).
* **Stage 3, KV-cache compression** to the kept indices (``pruning/video/runtime.py``); here only
  the switch ``enable_cache_compression``.

**As published.** By default every decision is the one the official PruneVid code makes
(Visual-AI/PruneVid, ``models/pllava/modeling_pllava.py`` and ``elastic_cache.py``):

====================  ===========================================  ==========================================
knob                  default (``"official"`` / ``"segment"``)       alternative (the project's earlier rule)
====================  ===========================================  ==========================================
``segmentation``      DPC-KNN into ``max(1, int(T * ratio))``        ``"exact"``: ``round(T * ratio)`` clusters,
                      clusters, then ``refine_clusters``: each        then the shortest runs are merged into a
                      cluster keeps its longest runs, other runs      neighbour until exactly that many segments
                      join the longer neighbouring run (left on a     remain (a predictable segment count)
                      tie); often fewer segments than clusters
``cluster_count``     ``int(n * cluster_ratio)`` clusters; a set of  ``"ceil"``: ``ceil(n * cluster_ratio)``,
                      14 tokens or fewer is kept as it is            always clustered (compresses small sets too)
``selection``         ``"segment"``: per segment the top             ``"global"``: top ``round(V * keep_ratio)``
                      ``int(n_static * keep)`` static tokens and,     over all visual tokens;
                      per frame, the top ``int(n_dynamic * keep)``    ``"segment_ceil"``: per group
                      dynamic ones (a group may keep none)            ``max(1, ceil(n * keep))`` (none left empty)
``k_neighbors``       7 (temporal and spatial DPC-KNN)               any ``k >= 1`` (5 before)
====================  ===========================================  ==========================================

``int`` is Python's truncation of the float product, exactly as the official code computes it
(``90 * 0.7 = 62.99999999999999`` gives 62). The ``"exact"``, ``"ceil"`` and ``"segment_ceil"``
counts use a 1e-9 tolerance instead (``round`` is half-up: ``round(2.5) = 3``).

Where the project deliberately differs from the official code: merged tokens are ordered by their
earliest member and take that token's M-RoPE position (Qwen2.5-VL's positions are 3-D ``(t, h, w)``;
the official PLLaVA order, each segment's static tokens then its dynamic tokens frame by frame, would
put a token with a later ``(h, w)`` before an earlier one of the same frame); and stage 3 compresses the
KV cache through transformers' cache API.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Sequence

import torch
import torch.nn.functional as F

from pruning.common import check_int, round_half_up
from pruning.selection import SelectionContext, register_selector, topk_keep
from pruning.video.dpc_knn import cluster

__all__ = [
    "PruneVidConfig",
    "PRESETS",
    "PRESET_NAMES",
    "SELECTION_MODES",
    "SEGMENTATIONS",
    "CLUSTER_COUNTS",
    "SMALL_SET_SIZE",
    "preset",
    "MergeResult",
    "num_temporal_segments",
    "num_clusters_for",
    "refine_temporal_labels",
    "temporal_segments",
    "mean_pairwise_cosine",
    "static_dynamic_split",
    "merge_video_tokens",
    "selection_group_ids",
    "visual_token_importance",
    "select_keep_indices",
    "PruneVidSelector",
    "LastTokenAttentionSelector",
    "question_query_positions",
]

SELECTION_MODES = ("segment", "segment_ceil", "global")
SEGMENTATIONS = ("official", "exact")
CLUSTER_COUNTS = ("official", "ceil")
SMALL_SET_SIZE = 14
"""Stage 1 (``cluster_count="official"``) keeps a set of at most this many tokens unclustered, as the official code."""
_EPS = 1e-9


def _ceil(x: float) -> int:
    return int(math.ceil(x - _EPS))


# ============================================================================= configuration


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def _check_choice(name: str, value, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def _check_unit_interval(name: str, value, recommended: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be a number in (0, 1] (recommended {recommended}), got {value!r}")


@dataclass(frozen=True)
class PruneVidConfig:
    """All PruneVid knobs; validated on construction (one-line ``ValueError`` per bad value).

    Stage 1 (``enable_stage1``): ``tau`` static threshold on the mean pairwise cosine
    similarity of a position across a segment's frames, ``(0, 1]``, recommended 0.7-0.9;
    ``cluster_ratio`` clusters per token kept by spatial DPC-KNN, ``(0, 1]``, recommended
    0.3-0.8; ``temporal_segment_ratio`` temporal clusters per frame, ``(0, 1]``, recommended
    0.1-0.5; ``segmentation`` ``"official"`` or ``"exact"`` (:func:`temporal_segments`);
    ``cluster_count`` ``"official"`` or ``"ceil"`` (:func:`num_clusters_for`).
    Stage 2 (``enable_pruning``): ``keep_ratio`` of the visual tokens kept after
    ``pruning_layer``, ``(0, 1]``, recommended 0.3-0.6; ``pruning_layer >= 0`` (checked against
    the model by :meth:`validate_for_model`); ``selection`` ``"segment"``, ``"segment_ceil"`` or
    ``"global"`` (:func:`select_keep_indices`).
    Stage 3 (``enable_cache_compression``): compress the KV cache of layers
    ``0..pruning_layer`` to the kept tokens; needs ``enable_pruning``.
    ``k_neighbors``: the ``k`` of DPC-KNN densities (temporal and spatial), ``>= 1``.

    The defaults are the ``default`` preset, with the official algorithm's rules (module docstring).
    """

    enable_stage1: bool = True
    tau: float = 0.8
    cluster_ratio: float = 0.5
    temporal_segment_ratio: float = 0.25
    enable_pruning: bool = True
    keep_ratio: float = 0.4
    pruning_layer: int = 10
    enable_cache_compression: bool = True
    selection: str = "segment"
    k_neighbors: int = 7
    segmentation: str = "official"
    cluster_count: str = "official"

    def __post_init__(self) -> None:
        _check_bool("enable_stage1", self.enable_stage1)
        _check_unit_interval("tau", self.tau, "0.7-0.9")
        _check_unit_interval("cluster_ratio", self.cluster_ratio, "0.3-0.8")
        _check_unit_interval("temporal_segment_ratio", self.temporal_segment_ratio, "0.1-0.5")
        _check_bool("enable_pruning", self.enable_pruning)
        _check_unit_interval("keep_ratio", self.keep_ratio, "0.3-0.6")
        check_int("pruning_layer", self.pruning_layer, lo=0)
        _check_bool("enable_cache_compression", self.enable_cache_compression)
        _check_choice("selection", self.selection, SELECTION_MODES)
        check_int("k_neighbors", self.k_neighbors, lo=1)
        _check_choice("segmentation", self.segmentation, SEGMENTATIONS)
        _check_choice("cluster_count", self.cluster_count, CLUSTER_COUNTS)
        if self.enable_cache_compression and not self.enable_pruning:
            raise ValueError(
                "enable_cache_compression=True needs enable_pruning=True "
                "(stage 3 compresses the KV cache to the tokens stage 2 keeps)"
            )

    @property
    def any_stage_on(self) -> bool:
        """Stage 1 or stage 2 on (with both off, the model runs the upstream path with nothing attached)."""
        return bool(self.enable_stage1 or self.enable_pruning)

    def validate_for_model(self, num_layers: int) -> "PruneVidConfig":
        """Check ``pruning_layer`` against a model with ``num_layers`` decoder layers; returns self.

        Only checked when stage 2 is on (``pruning_layer`` is unused otherwise); the allowed
        range is ``0 <= pruning_layer <= num_layers - 1``.
        """
        check_int("num_layers", num_layers, lo=1)
        if self.enable_pruning and self.pruning_layer >= num_layers:
            raise ValueError(
                f"pruning_layer={self.pruning_layer} is out of range for a model with {num_layers} layers "
                f"(allowed 0..{num_layers - 1})"
            )
        return self


#: Named configurations. ``custom`` is not stored: it is ``preset("default", **overrides)``.
#:
#: ==============  ======  =======  ============  ========  ==========  =========================
#: name            stage1  tau      cluster       segment   keep        stage 2/3
#: ==============  ======  =======  ============  ========  ==========  =========================
#: baseline        off     (0.8)    (0.5)         (0.25)    (0.4)       off / off: the unpruned model
#: stage2_only     off     (0.8)    (0.5)         (0.25)    0.4         layer 10, cache compressed
#: stage1_only     on      0.8      0.5           0.25      (0.4)       off / off
#: default         on      0.8      0.5           0.25      0.4         layer 10, cache compressed
#: conservative    on      0.9      0.8           0.5       0.6         layer 10, cache compressed
#: aggressive      on      0.7      0.3           0.25      0.3         layer 10, cache compressed
#: ==============  ======  =======  ============  ========  ==========  =========================
#:
#: Values in parentheses are carried but unused because their stage is off. Every preset uses the official
#: algorithm's rules (``segmentation="official"``, ``cluster_count="official"``, ``selection="segment"``,
#: ``k_neighbors=7``); override them by name for the alternatives.
PRESETS: dict[str, PruneVidConfig] = {
    "baseline": PruneVidConfig(enable_stage1=False, enable_pruning=False, enable_cache_compression=False),
    "stage2_only": PruneVidConfig(enable_stage1=False, keep_ratio=0.4, pruning_layer=10),
    "stage1_only": PruneVidConfig(
        tau=0.8, cluster_ratio=0.5, temporal_segment_ratio=0.25, enable_pruning=False, enable_cache_compression=False
    ),
    "default": PruneVidConfig(tau=0.8, cluster_ratio=0.5, temporal_segment_ratio=0.25, keep_ratio=0.4, pruning_layer=10),
    "conservative": PruneVidConfig(tau=0.9, cluster_ratio=0.8, temporal_segment_ratio=0.5, keep_ratio=0.6),
    "aggressive": PruneVidConfig(tau=0.7, cluster_ratio=0.3, temporal_segment_ratio=0.25, keep_ratio=0.3),
}
PRESET_NAMES = (*PRESETS, "custom")


def preset(name: str, **overrides) -> PruneVidConfig:
    """The named configuration with ``overrides`` applied (and re-validated).

    * ``baseline``: every stage off, the unpruned model (the reference for speed and quality);
    * ``stage2_only``: attention pruning alone, keep 0.4 after layer 10, KV cache compressed;
    * ``stage1_only``: token merging alone, tau 0.8 / cluster 0.5 / segment 0.25;
    * ``default``: tau 0.8 / cluster 0.5 / segment 0.25, keep 0.4 after layer 10;
    * ``conservative`` (precision first): tau 0.9 / cluster 0.8 / segment 0.5, keep 0.6;
    * ``aggressive``: tau 0.7 / cluster 0.3 / segment 0.25, keep 0.3;
    * ``custom``: ``default`` with ``overrides`` (or build ``PruneVidConfig(...)`` directly).

    An unknown name or field raises a one-line ``ValueError`` listing the valid ones.
    """
    if name not in PRESET_NAMES:
        raise ValueError(f"unknown PruneVid preset {name!r}; valid presets: {', '.join(PRESET_NAMES)}")
    valid_fields = [f.name for f in fields(PruneVidConfig)]
    unknown = sorted(set(overrides) - set(valid_fields))
    if unknown:
        raise ValueError(f"unknown PruneVidConfig field(s) {unknown}; valid fields: {', '.join(valid_fields)}")
    return replace(PRESETS["default" if name == "custom" else name], **overrides)


# ============================================================================= stage 1


def num_temporal_segments(num_frames: int, segment_ratio: float, segmentation: str = "official") -> int:
    """Temporal clusters: ``max(1, int(num_frames * segment_ratio))`` (official: truncation), or for
    ``segmentation="exact"`` the segment count ``max(1, round(num_frames * segment_ratio))`` (half-up)."""
    _check_choice("segmentation", segmentation, SEGMENTATIONS)
    if segmentation == "official":
        return max(1, int(num_frames * segment_ratio))
    return max(1, round_half_up(num_frames * segment_ratio))


def num_clusters_for(num_tokens: int, cluster_ratio: float, cluster_count: str = "official") -> int:
    """Clusters for a set of ``num_tokens`` tokens (``num_tokens`` itself: the set is kept as it is).

    * ``"official"``: a set of at most :data:`SMALL_SET_SIZE` (14) tokens is kept; a larger one gets
      ``max(1, int(num_tokens * cluster_ratio))`` clusters (truncation, as the official code);
    * ``"ceil"``: ``ceil(num_tokens * cluster_ratio)``, at least 1 for a non-empty set, at most ``num_tokens``.
    """
    _check_choice("cluster_count", cluster_count, CLUSTER_COUNTS)
    if cluster_count == "official":
        if num_tokens <= SMALL_SET_SIZE:
            return num_tokens
        return max(1, int(num_tokens * cluster_ratio))
    return min(num_tokens, _ceil(num_tokens * cluster_ratio))


def _label_runs(labels: Sequence[int]) -> list[list[int]]:
    """Maximal runs of equal labels along time: ``[[start, end), ...]`` covering ``[0, T)``."""
    runs, start = [], 0
    for t in range(1, len(labels) + 1):
        if t == len(labels) or labels[t] != labels[t - 1]:
            runs.append([start, t])
            start = t
    return runs


def refine_temporal_labels(labels: Sequence[int]) -> list[int]:
    """The official ``refine_clusters`` rule on one video's frame labels ``[T]`` (a new list).

    1. Each label keeps only its longest runs of consecutive frames (every run of that length); a
       label whose longest run is a single frame keeps none.
    2. Every other run (a maximal stretch of frames that lost their label) takes the label of the
       longer of its two neighbouring runs, measured after step 1; the left one on a tie, the only
       one at either end, label 0 when there is none (every frame lost its label).

    The segments are then the maximal runs of the result (:func:`temporal_segments`); two runs of
    the same label stay two segments.
    """
    labels = [int(x) for x in labels]
    refined = list(labels)
    runs = [(start, end, labels[start]) for start, end in _label_runs(labels)]
    for label in set(labels):
        own = [(start, end) for start, end, run_label in runs if run_label == label]
        longest = max(end - start for start, end in own)
        for start, end in own:
            if longest == 1 or end - start < longest:
                refined[start:end] = [-1] * (end - start)
    t = 0
    while t < len(refined):
        if refined[t] != -1:
            t += 1
            continue
        start = t
        while t < len(refined) and refined[t] == -1:
            t += 1
        left_label = refined[start - 1] if start > 0 else None
        left_length = 0
        while left_label is not None and start - 1 - left_length >= 0 and refined[start - 1 - left_length] == left_label:
            left_length += 1
        right_label = refined[t] if t < len(refined) else None
        right_length = 0
        while right_label is not None and t + right_length < len(refined) and refined[t + right_length] == right_label:
            right_length += 1
        if right_length > left_length:
            new_label = right_label
        else:
            new_label = left_label if left_label is not None else right_label
        refined[start:t] = [0 if new_label is None else new_label] * (t - start)
    return refined


def temporal_segments(
    frame_features: torch.Tensor, segment_ratio: float, k: int = 7, segmentation: str = "official"
) -> list[tuple[int, int]]:
    """Contiguous temporal segments ``[(start, end), ...]`` (end exclusive) covering ``[0, T)``.

    ``frame_features [T, D]`` (each frame's tokens mean-pooled) are clustered by DPC-KNN into
    ``S =`` :func:`num_temporal_segments` clusters. Then:

    * ``segmentation="official"``: the labels are refined by :func:`refine_temporal_labels` (the
      official ``refine_clusters``) and every maximal run of the result is a segment. The number of
      segments is often below ``S`` (a cluster that never holds two consecutive frames disappears).
    * ``segmentation="exact"``: every maximal run of the labels is a run (at least ``S`` of them);
      while there are more than ``S`` runs, the shortest run (the earliest among equally short ones)
      is merged into the adjacent run whose mean frame feature has the higher cosine similarity with
      its own (a tie, or only one neighbour: the earlier one / the existing one). Exactly ``S``
      segments result.
    """
    if frame_features.dim() != 2 or frame_features.shape[0] < 1:
        raise ValueError(f"frame_features must have shape [T, D] with T >= 1, got {tuple(frame_features.shape)}")
    _check_unit_interval("segment_ratio", segment_ratio, "0.1-0.5")
    num_frames = frame_features.shape[0]
    num_segments = num_temporal_segments(num_frames, segment_ratio, segmentation)
    labels = cluster(frame_features, num_segments, k).tolist()
    if segmentation == "official":
        return [(start, end) for start, end in _label_runs(refine_temporal_labels(labels))]
    runs = _label_runs(labels)
    feats = frame_features.detach().to(torch.float64)

    def mean_feature(run):
        return feats[run[0] : run[1]].mean(dim=0)

    while len(runs) > num_segments:
        lengths = [end - start for start, end in runs]
        i = lengths.index(min(lengths))
        if i == 0:
            j = 1
        elif i == len(runs) - 1:
            j = i - 1
        else:
            mine = mean_feature(runs[i])
            sim_left = F.cosine_similarity(mine, mean_feature(runs[i - 1]), dim=0).item()
            sim_right = F.cosine_similarity(mine, mean_feature(runs[i + 1]), dim=0).item()
            j = i + 1 if sim_right > sim_left else i - 1
        lo, hi = min(i, j), max(i, j)
        runs[lo:hi + 1] = [[runs[lo][0], runs[hi][1]]]
    return [(start, end) for start, end in runs]


def mean_pairwise_cosine(segment_tokens: torch.Tensor) -> torch.Tensor:
    """``[t, N, D] -> [N]`` (float64): mean cosine similarity over the ``t(t-1)/2`` frame pairs.

    For position ``n``: ``mean_{i<j} cos(x_i,n, x_j,n)``; a zero vector has similarity 0 with
    everything. ``t == 1`` (no pair) gives 0.
    """
    if segment_tokens.dim() != 3:
        raise ValueError(f"segment_tokens must have shape [t, N, D], got {tuple(segment_tokens.shape)}")
    t = segment_tokens.shape[0]
    if t < 2:
        return segment_tokens.new_zeros(segment_tokens.shape[1], dtype=torch.float64)
    unit = F.normalize(segment_tokens.detach().to(torch.float64), dim=-1)  # [t, N, D]
    gram = torch.einsum("ind,jnd->nij", unit, unit)  # [N, t, t]
    off_diagonal = gram.sum(dim=(1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(dim=-1)
    return off_diagonal / (t * (t - 1))


def static_dynamic_split(segment_tokens: torch.Tensor, tau: float) -> torch.Tensor:
    """``static_mask [N]`` (bool) for the tokens ``[t, N, D]`` of one segment's ``t`` frames.

    A spatial position is static iff the mean pairwise cosine similarity of its token across
    the ``t`` frames is ``> tau`` (:func:`mean_pairwise_cosine`). A one-frame segment has no
    pair to compare: every position is dynamic (kept per frame, never averaged over time).
    """
    _check_unit_interval("tau", tau, "0.7-0.9")
    return mean_pairwise_cosine(segment_tokens) > tau


@dataclass
class MergeResult:
    """Stage-1 output for a video of ``T`` frames x ``N`` tokens (flat index ``f * N + n``).

    * ``merged_tokens [M, D]``: each cluster's mean over its original member tokens, in the
      input dtype, ordered by ``source_positions``;
    * ``source_positions [M]``: the flat index of the cluster's *earliest* member (smallest
      flat index: earliest frame, then first in raster order). A static cluster's source is in
      its segment's first frame at the cluster's first spatial position; a dynamic cluster's
      is in its own frame. Sources are distinct and strictly increasing, so the merged
      sequence keeps the original temporal/raster order, and the position ids (M-RoPE
      ``t, h, w``) of a merged token are those of its source token;
    * ``cluster_members [T * N]``: original flat index -> merged index; every original token
      is in exactly one cluster;
    * ``segment_of_token [M]``: segment id; ``is_static [M]``; ``frame_of_token [M]``:
      ``source_positions // N`` (the segment's first frame for static tokens);
    * ``segments``: the temporal segments ``[(start, end), ...]``;
    * ``tokens_before_stage1 = T * N``, ``tokens_after_stage1 = M``.
    """

    merged_tokens: torch.Tensor
    source_positions: torch.Tensor
    cluster_members: torch.Tensor
    segment_of_token: torch.Tensor
    is_static: torch.Tensor
    frame_of_token: torch.Tensor
    segments: list[tuple[int, int]]
    tokens_before_stage1: int
    tokens_after_stage1: int

    @property
    def compression_ratio(self) -> float:
        """Fraction of the visual tokens removed by stage 1."""
        return 1.0 - self.tokens_after_stage1 / max(self.tokens_before_stage1, 1)


def _cluster_means(features: torch.Tensor, labels: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """``[n, D], [n] -> [C, D]`` mean per label (one-hot matmul: deterministic on every device)."""
    one_hot = F.one_hot(labels, num_clusters).to(features.dtype).T  # [C, n]
    return (one_hot @ features) / one_hot.sum(dim=1, keepdim=True)


def _first_member(positions: torch.Tensor, labels: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """``[n], [n] -> [C]`` smallest position per label."""
    first = torch.full((num_clusters,), torch.iinfo(torch.long).max, dtype=torch.long, device=positions.device)
    return first.scatter_reduce(0, labels, positions, reduce="amin")


def merge_video_tokens(video_tokens: torch.Tensor, config: PruneVidConfig) -> MergeResult:
    """Stage 1: ``video_tokens [T, N, D] -> MergeResult`` (``merged_tokens [M, D]``).

    1. segments = :func:`temporal_segments` of the per-frame mean tokens ``[T, D]`` (``config.segmentation``);
    2. per segment, :func:`static_dynamic_split` with ``config.tau``;
    3. static positions: tokens averaged over the segment's frames ``[n_s, D]``, DPC-KNN into
       ``num_clusters_for(n_s)`` clusters (``config.cluster_count``; official: a set of at most 14
       is kept as it is); each cluster's members are the cluster's positions in *every* frame of
       the segment;
    4. dynamic positions: in each frame, DPC-KNN on that frame's dynamic tokens
       ``[n_d, D]`` into ``num_clusters_for(n_d)`` clusters;
    5. every cluster is replaced by the mean of its members (accumulated in at least float32)
       and the clusters are ordered by source position (see :class:`MergeResult`).

    With ``config.enable_stage1 = False`` nothing is merged: one segment ``[(0, T)]``, every
    token dynamic and its own cluster, ``merged_tokens = video_tokens.reshape(T * N, D)``.
    Deterministic: no randomness, ties broken by index.
    """
    if video_tokens.dim() != 3 or min(video_tokens.shape[:2]) < 1:
        raise ValueError(f"video_tokens must have shape [T, N, D] with T, N >= 1, got {tuple(video_tokens.shape)}")
    num_frames, num_positions, dim = video_tokens.shape
    device = video_tokens.device
    total = num_frames * num_positions
    flat_index = torch.arange(total, device=device)

    if not config.enable_stage1:
        return MergeResult(
            merged_tokens=video_tokens.reshape(total, dim),
            source_positions=flat_index,
            cluster_members=flat_index.clone(),
            segment_of_token=torch.zeros(total, dtype=torch.long, device=device),
            is_static=torch.zeros(total, dtype=torch.bool, device=device),
            frame_of_token=flat_index // num_positions,
            segments=[(0, num_frames)],
            tokens_before_stage1=total,
            tokens_after_stage1=total,
        )

    work_dtype = torch.promote_types(video_tokens.dtype, torch.float32)
    tokens = video_tokens.detach().to(work_dtype)
    k = config.k_neighbors
    segments = temporal_segments(tokens.mean(dim=1), config.temporal_segment_ratio, k, config.segmentation)

    def spatial_labels(features: torch.Tensor) -> torch.Tensor:
        """``[n, D] -> [n]`` DPC-KNN labels into ``num_clusters_for(n)`` clusters (a kept set: its own labels)."""
        count = num_clusters_for(features.shape[0], config.cluster_ratio, config.cluster_count)
        if count >= features.shape[0]:
            return torch.arange(features.shape[0], device=features.device)
        return cluster(features, count, k)

    assignment = torch.empty(total, dtype=torch.long, device=device)  # flat index -> cluster id
    means, sources, segment_ids, static_flags = [], [], [], []
    next_cluster = 0

    def add_clusters(features, positions, labels, flat_members, member_labels, segment, static):
        nonlocal next_cluster
        count = int(labels.max()) + 1
        means.append(_cluster_means(features, labels, count))
        sources.append(_first_member(positions, labels, count))
        segment_ids.append(torch.full((count,), segment, dtype=torch.long, device=device))
        static_flags.append(torch.full((count,), static, dtype=torch.bool, device=device))
        assignment[flat_members] = next_cluster + member_labels
        next_cluster += count

    for segment, (start, end) in enumerate(segments):
        seg_tokens = tokens[start:end]  # [t, N, D]
        static_mask = static_dynamic_split(seg_tokens, config.tau)
        frames = torch.arange(start, end, device=device)
        static_pos = static_mask.nonzero().flatten()
        dynamic_pos = (~static_mask).nonzero().flatten()
        if static_pos.numel():
            averaged = seg_tokens[:, static_pos].mean(dim=0)  # [n_s, D]
            labels = spatial_labels(averaged)
            members = (frames[:, None] * num_positions + static_pos[None, :]).flatten()  # [t * n_s]
            add_clusters(
                averaged, start * num_positions + static_pos, labels,
                members, labels.repeat(end - start), segment, True,
            )  # equal member count per position: mean of position means = mean of all members
        if dynamic_pos.numel():
            for frame in range(start, end):
                features = seg_tokens[frame - start, dynamic_pos]  # [n_d, D]
                labels = spatial_labels(features)
                flat = frame * num_positions + dynamic_pos
                add_clusters(features, flat, labels, flat, labels, segment, False)

    source_positions = torch.cat(sources)
    order = torch.argsort(source_positions)  # sources are distinct: a strict order
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=device)
    source_positions = source_positions[order]
    return MergeResult(
        merged_tokens=torch.cat(means)[order].to(video_tokens.dtype),
        source_positions=source_positions,
        cluster_members=rank[assignment],
        segment_of_token=torch.cat(segment_ids)[order],
        is_static=torch.cat(static_flags)[order],
        frame_of_token=source_positions // num_positions,
        segments=segments,
        tokens_before_stage1=total,
        tokens_after_stage1=int(order.numel()),
    )


def selection_group_ids(result: MergeResult) -> torch.Tensor:
    """``[M]`` group id per merged token for ``select_keep_indices(mode="segment")``.

    A segment's static tokens form one group, each frame's dynamic tokens form one group;
    ids are dense (``0..G-1``) in order of first appearance along the merged sequence.
    """
    num_segments = len(result.segments)
    key = torch.where(result.is_static, result.segment_of_token, num_segments + result.frame_of_token)
    _, first_seen = torch.unique(key, return_inverse=True)
    # renumber by first appearance so ids follow the sequence order
    order_of_first = torch.full((int(first_seen.max()) + 1,), key.numel(), dtype=torch.long, device=key.device)
    order_of_first = order_of_first.scatter_reduce(0, first_seen, torch.arange(key.numel(), device=key.device), "amin")
    rank = torch.empty_like(order_of_first)
    rank[torch.argsort(order_of_first)] = torch.arange(order_of_first.numel(), device=key.device)
    return rank[first_seen]


# ============================================================================= stage 2


def visual_token_importance(
    query_states: torch.Tensor,
    key_states: torch.Tensor,
    visual_positions: torch.Tensor,
    scaling: float,
    attention_mask: torch.Tensor | None = None,
    query_positions: torch.Tensor | None = None,
    query_chunk_size: int = 256,
) -> torch.Tensor:
    """Importance ``[B, V]`` (float32, float64 for float64 inputs) of each visual key.

    ``query_states [B, H, Lq, d]`` (the question rows, after RoPE), ``key_states
    [B, Hkv, Lk, d]`` (all keys of the sequence, after RoPE), ``visual_positions [V]`` (key
    indices of the visual tokens), ``scaling`` (``1 / sqrt(d)``).

    ``p[b, h, q, :] = softmax_j(scaling * q . k_j + mask)`` over *all* ``Lk`` keys, exactly as
    eager attention (softmax in float32); importance ``= max_h max_q p[b, h, q, visual]``.

    * causal: the query row at absolute position ``query_positions[q]`` sees keys ``<=`` it;
      ``query_positions [Lq]`` defaults to the last ``Lq`` positions (``Lk - Lq + q``);
    * GQA: head ``h`` uses KV head ``h // (H // Hkv)`` (``repeat_kv``);
    * ``attention_mask``: ``[B, Lk]`` key padding (nonzero/True = real token), or
      ``[B, 1 | H, Lq, Lk]`` either bool (True = may attend) or additive float; applied on top
      of the causal rule. A query row that may attend nothing contributes 0.

    Memory: one ``[B, query_chunk_size, Lk]`` block at a time (per head, per query chunk);
    the full attention matrix is never built.
    """
    if query_states.dim() != 4 or key_states.dim() != 4:
        raise ValueError(
            f"query_states must be [B, H, Lq, d] and key_states [B, Hkv, Lk, d], "
            f"got {tuple(query_states.shape)} and {tuple(key_states.shape)}"
        )
    batch, num_heads, num_queries, head_dim = query_states.shape
    kv_batch, num_kv_heads, num_keys, kv_dim = key_states.shape
    if kv_batch != batch or kv_dim != head_dim or num_heads % num_kv_heads:
        raise ValueError(
            f"query_states {tuple(query_states.shape)} and key_states {tuple(key_states.shape)} do not match "
            "(same B and d, H a multiple of Hkv)"
        )
    check_int("query_chunk_size", query_chunk_size, lo=1)
    device = query_states.device
    visual_positions = torch.as_tensor(visual_positions, dtype=torch.long, device=device).flatten()
    if visual_positions.numel() and (visual_positions.min() < 0 or visual_positions.max() >= num_keys):
        raise ValueError(f"visual_positions must lie in [0, {num_keys}) (the key length)")
    if query_positions is None:
        query_positions = torch.arange(num_keys - num_queries, num_keys, device=device)
    query_positions = torch.as_tensor(query_positions, dtype=torch.long, device=device).flatten()
    if query_positions.numel() != num_queries:
        raise ValueError(f"query_positions must have {num_queries} entries (one per query row), got {query_positions.numel()}")
    if num_queries and (query_positions.min() < 0 or query_positions.max() >= num_keys):
        raise ValueError(f"query_positions must lie in [0, {num_keys}) (the key length)")

    compute_dtype = torch.promote_types(query_states.dtype, torch.float32)
    padding = None
    if attention_mask is not None:
        if attention_mask.dim() == 2:
            if attention_mask.shape != (batch, num_keys):
                raise ValueError(f"a 2-D attention_mask must be [B, Lk] = [{batch}, {num_keys}], got {tuple(attention_mask.shape)}")
            padding = attention_mask.to(device).bool()[:, None, :]  # [B, 1, Lk]
        elif attention_mask.dim() == 4:
            if attention_mask.shape[-2:] != (num_queries, num_keys) or attention_mask.shape[1] not in (1, num_heads):
                raise ValueError(
                    f"a 4-D attention_mask must be [B, 1 or H, Lq, Lk] = [{batch}, 1|{num_heads}, {num_queries}, {num_keys}], "
                    f"got {tuple(attention_mask.shape)}"
                )
        else:
            raise ValueError(f"attention_mask must be [B, Lk] or [B, 1|H, Lq, Lk], got {tuple(attention_mask.shape)}")

    key_index = torch.arange(num_keys, device=device)
    group = num_heads // num_kv_heads
    importance = torch.zeros(batch, visual_positions.numel(), dtype=compute_dtype, device=device)
    with torch.no_grad():
        for head in range(num_heads):
            keys = key_states[:, head // group].to(compute_dtype)  # [B, Lk, d]
            for lo in range(0, num_queries, query_chunk_size):
                hi = min(lo + query_chunk_size, num_queries)
                queries = query_states[:, head, lo:hi].to(compute_dtype)  # [B, c, d]
                scores = torch.matmul(queries, keys.transpose(-1, -2)) * scaling  # [B, c, Lk]
                allowed = (key_index[None, :] <= query_positions[lo:hi, None])[None]  # [1, c, Lk]
                if padding is not None:
                    allowed = allowed & padding
                if attention_mask is not None and attention_mask.dim() == 4:
                    rows = attention_mask[:, 0 if attention_mask.shape[1] == 1 else head, lo:hi].to(device)
                    if rows.dtype == torch.bool:
                        allowed = allowed & rows
                    else:
                        scores = scores + rows.to(compute_dtype)
                scores = scores.masked_fill(~allowed, float("-inf"))
                probs = torch.softmax(scores, dim=-1)
                probs = torch.nan_to_num(probs, nan=0.0)  # rows with no allowed key
                chunk_max = probs[..., visual_positions].amax(dim=1)  # [B, V]
                importance = torch.maximum(importance, chunk_max)
    return importance


def select_keep_indices(
    importance: torch.Tensor,
    keep_ratio: float,
    segment_ids: torch.Tensor | None = None,
    mode: str = "segment",
) -> torch.Tensor:
    """Sorted LongTensor of the kept visual indices for ``importance [V]``.

    Groups are given by ``segment_ids [V]`` (any integer labels; e.g. :func:`selection_group_ids`: a
    segment's static tokens, each frame's dynamic tokens):

    * ``segment`` (the official ``process_attention``): in each group the ``int(n_group * keep_ratio)``
      most important (truncation: a group of fewer than ``1 / keep_ratio`` tokens keeps none);
    * ``segment_ceil``: in each group the ``max(1, ceil(n_group * keep_ratio))`` most important, so
      every group keeps a token;
    * ``global``: the ``max(1, round(V * keep_ratio))`` most important of all (round half-up).

    Ties go to the lower index; NaN counts as least important.
    """
    if importance.dim() != 1:
        raise ValueError(f"importance must have shape [V], got {tuple(importance.shape)}")
    _check_unit_interval("keep_ratio", keep_ratio, "0.3-0.6")
    if mode not in SELECTION_MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, SELECTION_MODES))}, got {mode!r}")
    num_visual = importance.numel()
    if num_visual == 0:
        return torch.zeros(0, dtype=torch.long, device=importance.device)
    scores = torch.nan_to_num(importance.detach().to(torch.float64), nan=float("-inf"))
    by_importance = torch.sort(scores, descending=True, stable=True).indices  # ties: lower index first
    if mode == "global":
        keep = max(1, round_half_up(num_visual * keep_ratio))
        return torch.sort(by_importance[:keep]).values

    if segment_ids is None:
        raise ValueError(f"mode={mode!r} needs segment_ids [V] (one group id per visual token)")
    segment_ids = torch.as_tensor(segment_ids, device=importance.device).flatten()
    if segment_ids.numel() != num_visual:
        raise ValueError(f"segment_ids must have {num_visual} entries (one per visual token), got {segment_ids.numel()}")
    _, group = torch.unique(segment_ids, return_inverse=True)  # dense ids 0..G-1
    # within-group order by importance: stable sort of the importance order by group
    order = by_importance[torch.sort(group[by_importance], stable=True).indices]
    sizes = torch.bincount(group)
    group_start = torch.cumsum(sizes, 0) - sizes
    rank_in_group = torch.arange(num_visual, device=importance.device) - group_start[group[order]]
    if mode == "segment":
        quota = [int(n * keep_ratio) for n in sizes.tolist()]
    else:
        quota = [max(1, _ceil(n * keep_ratio)) for n in sizes.tolist()]
    quota = torch.tensor(quota, device=importance.device)
    return torch.sort(order[rank_in_group < quota[group[order]]]).values


@register_selector("prunevid")
class PruneVidSelector:
    """PruneVid's stage-2 selection as a selector: the top ``keep_ratio`` of the vision tokens by the
    question's attention at the pruning layer (``ctx.question_attention``), over all of them
    (``grouping="global"``) or within each group of ``ctx.groups`` (``"segment"``); see
    :func:`select_keep_indices`."""

    name = "prunevid"
    needs_question_attention = True  # the runtime computes it from layer K's own queries and keys

    def __init__(self, keep_ratio: float, grouping: str = "segment") -> None:
        _check_unit_interval("keep_ratio", keep_ratio, "0.3-0.6")
        if grouping not in SELECTION_MODES:
            raise ValueError(f"grouping must be one of {', '.join(map(repr, SELECTION_MODES))}, got {grouping!r}")
        self.keep_ratio, self.grouping = keep_ratio, grouping

    def __call__(self, ctx: SelectionContext) -> torch.Tensor:
        if ctx.question_attention is None:
            raise ValueError("the prunevid selector needs ctx.question_attention (the question's attention per token)")
        keep = torch.zeros_like(ctx.alive)
        for row in range(keep.shape[0]):
            groups = ctx.groups[row] if ctx.groups is not None else None
            kept = select_keep_indices(ctx.question_attention[row], self.keep_ratio, groups, self.grouping)
            keep[row, kept] = 1.0
        return keep


@register_selector("last_token_attention")
class LastTokenAttentionSelector:
    """FastV's criterion at the pruning layer: the ``keep`` vision tokens that the prompt's last token attends to
    most (max over heads), for system B, whose runtime computes that attention from layer K's own queries."""

    name = "last_token_attention"
    needs_question_attention = True
    question_rows = "last"  # the runtime scores with the last question row only

    def __init__(self, keep: int) -> None:
        check_int("keep", keep, lo=1)
        self.keep = keep

    def __call__(self, ctx: SelectionContext) -> torch.Tensor:
        if ctx.question_attention is None:
            raise ValueError("last_token_attention needs ctx.question_attention (the last token's attention per token)")
        return topk_keep(ctx.question_attention, ctx.alive, min(self.keep, int((ctx.alive[0] > 0.5).sum())))


def question_query_positions(
    input_ids: torch.Tensor, last_visual_position: int, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``[L] -> [Q]`` positions ``last_visual_position + 1 .. L - 1``: the question queries.

    Everything after the last visual token (the vision-end marker, the question, the chat
    template's tail); never the system prompt or anything before the video. With
    ``attention_mask [L]``, padded positions (0/False) are left out. Raises when no token
    follows the last visual token.
    """
    if input_ids.dim() != 1:
        raise ValueError(f"input_ids must have shape [L] (one sequence), got {tuple(input_ids.shape)}")
    length = input_ids.numel()
    if isinstance(last_visual_position, torch.Tensor):
        last_visual_position = int(last_visual_position)
    check_int("last_visual_position", last_visual_position, lo=0)
    if last_visual_position >= length:
        raise ValueError(f"last_visual_position={last_visual_position} is outside the sequence of length {length}")
    positions = torch.arange(last_visual_position + 1, length, device=input_ids.device)
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have shape [{length}], got {tuple(attention_mask.shape)}")
        positions = positions[attention_mask.to(input_ids.device).bool()[positions]]
    if positions.numel() == 0:
        raise ValueError(f"no question token follows the last visual token (position {last_visual_position} of {length})")
    return positions
