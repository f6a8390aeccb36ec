"""PruneVid as published: the project's stage 1 and stage-2 selection make the official algorithm's decisions.

The reference below is written in this test from the published algorithm (the official code's
``cluster_dpc_knn``, ``refine_clusters``, ``segment_lengths``, ``merge_frames_dynamic`` and
``process_attention``), independently of ``pruning/video``:

* temporal segments: DPC-KNN (k = 7) over the frames' mean features into ``max(1, int(T * ratio))``
  clusters; then each cluster keeps only its longest runs of consecutive frames (all runs of that
  length; none if its longest run is a single frame); every other run takes the label of the longer
  of its two neighbouring runs (the left one on a tie); segments are the runs of the result;
* static positions of a segment: mean pairwise cosine similarity across its frames ``> tau`` (a
  one-frame segment has no pair: all dynamic); static tokens are averaged over the segment's frames;
* cluster counts: a set of more than 14 tokens goes to ``int(n * cluster_ratio)`` DPC-KNN clusters
  (k = 7), a set of 14 or fewer is kept as it is; static once per segment, dynamic per frame;
* stage 2: per segment, the top ``int(n_static * alpha)`` static tokens and, in each frame, the top
  ``int(n_dynamic_per_frame * alpha)`` dynamic tokens by importance.

DPC-KNN is the official one without its random jitter (ties are impossible by construction: the
features are continuous random draws). A merged token is identified by the set of original tokens
it averages, so the project's and the reference's outputs are compared independently of order.
"""

from __future__ import annotations

import math

import pytest
import torch

from pruning.video.prunevid import merge_video_tokens, preset, select_keep_indices, selection_group_ids

K = 7
SMALL_SET = 14


# ============================================================================= the reference


def reference_dpc_knn(x: torch.Tensor, num_clusters: int, k: int = K) -> torch.Tensor:
    """Labels ``[n]`` of the official ``cluster_dpc_knn`` (no jitter; k clamped to n)."""
    n, dim = x.shape
    x = x.double()
    dist = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist") / math.sqrt(dim)
    nearest = torch.topk(dist, min(k, n), dim=-1, largest=False).values
    density = torch.exp(-(nearest**2).mean(dim=-1))
    denser = density[None, :] > density[:, None]  # [i, j]: j is denser than i
    delta = torch.where(denser, dist, dist.max()).min(dim=-1).values
    centers = torch.topk(delta * density, num_clusters).indices
    labels = dist[centers].argmin(dim=0)
    labels[centers] = torch.arange(num_clusters)
    return labels


def runs_of(labels: list[int]) -> list[tuple[int, int, int]]:
    """Maximal runs ``(start, end, label)`` (end exclusive)."""
    runs, start = [], 0
    for t in range(1, len(labels) + 1):
        if t == len(labels) or labels[t] != labels[start]:
            runs.append((start, t, labels[start]))
            start = t
    return runs


def reference_refine(labels: list[int]) -> list[int]:
    refined = list(labels)
    for label in set(labels):
        runs = [(s, e) for s, e, lab in runs_of(labels) if lab == label]
        longest = max(e - s for s, e in runs)
        for s, e in runs:
            if longest == 1 or e - s < longest:
                refined[s:e] = [-1] * (e - s)
    t = 0
    while t < len(refined):
        if refined[t] != -1:
            t += 1
            continue
        start = t
        while t < len(refined) and refined[t] == -1:
            t += 1
        left_label, left_len = None, 0
        if start > 0:
            left_label, i = refined[start - 1], start - 1
            while i >= 0 and refined[i] == left_label:
                i -= 1
            left_len = start - 1 - i
        right_label, right_len = None, 0
        if t < len(refined):
            right_label, i = refined[t], t
            while i < len(refined) and refined[i] == right_label:
                i += 1
            right_len = i - t
        if right_len > left_len:
            new = right_label
        else:
            new = left_label if left_label is not None else right_label
        refined[start:t] = [0 if new is None else new] * (t - start)
    return refined


def reference_merge(features: torch.Tensor, members: list[list[int]], count: int) -> list[frozenset]:
    """Cluster a set (``features [n, D]``, original members of each row) into ``count`` clusters, or keep it."""
    if len(members) <= SMALL_SET:
        return [frozenset(m) for m in members]
    labels = reference_dpc_knn(features, count)
    return [frozenset(i for row, m in enumerate(members) if labels[row] == c for i in m) for c in range(count)]


def reference_stage1(tokens: torch.Tensor, tau: float, cluster_ratio: float, segment_ratio: float):
    """``(segments, static masks per segment, groups)``; ``groups``: per segment, the static merged tokens and,
    per frame, the dynamic merged tokens, each merged token as the frozenset of its original flat indices."""
    num_frames, num_positions, _ = tokens.shape
    labels = reference_dpc_knn(tokens.double().mean(dim=1), max(1, int(num_frames * segment_ratio))).tolist()
    segments = [(s, e) for s, e, _ in runs_of(reference_refine(labels))]
    masks, groups = [], []
    for start, end in segments:
        seg = tokens[start:end].double()
        width = end - start
        if width == 1:
            static = torch.zeros(num_positions, dtype=torch.bool)
        else:
            unit = torch.nn.functional.normalize(seg, dim=-1)
            gram = torch.einsum("wnc,tnc->wtn", unit, unit)
            static = (gram.sum(dim=(0, 1)) - width) / (width * (width - 1)) > tau
        masks.append(static)
        static_pos = static.nonzero().flatten().tolist()
        dynamic_pos = (~static).nonzero().flatten().tolist()
        static_members = [[f * num_positions + p for f in range(start, end)] for p in static_pos]
        static_tokens = reference_merge(
            seg[:, static_pos].mean(dim=0), static_members, int(len(static_pos) * cluster_ratio)
        ) if static_pos else []
        frame_groups = []
        for frame in range(start, end):
            frame_groups.append(reference_merge(
                tokens[frame, dynamic_pos].double(), [[frame * num_positions + p] for p in dynamic_pos],
                int(len(dynamic_pos) * cluster_ratio),
            ) if dynamic_pos else [])
        groups.append((static_tokens, frame_groups))
    return segments, masks, groups


def reference_stage2(groups, importance_of, alpha: float) -> set[frozenset]:
    kept = set()
    for static_tokens, frame_groups in groups:
        for group in [static_tokens, *frame_groups]:
            ranked = sorted(group, key=importance_of, reverse=True)
            kept.update(ranked[: int(len(group) * alpha)])
    return kept


# ============================================================================= inputs


def synthetic_video(seed: int, num_frames: int, num_positions: int, num_objects: int, cut: int | None,
                    noisy_positions: int = 0, dim: int = 24) -> torch.Tensor:
    """``[T, N, D]``: a static background (small noise), objects moving one position per frame, an optional
    scene cut (a new background from frame ``cut``), and ``noisy_positions`` positions that change every frame."""
    g = torch.Generator().manual_seed(seed)
    backgrounds = [torch.randn(num_positions, dim, generator=g) for _ in range(2)]
    objects = torch.randn(num_objects, dim, generator=g) * 2
    starts = torch.randint(0, num_positions, (num_objects,), generator=g)
    frames = []
    for t in range(num_frames):
        frame = backgrounds[int(cut is not None and t >= cut)].clone()
        frame = frame + 0.05 * torch.randn(num_positions, dim, generator=g)
        for o in range(num_objects):
            frame[(starts[o] + t) % num_positions] = objects[o] + 0.05 * torch.randn(dim, generator=g)
        if noisy_positions:
            frame[:noisy_positions] = torch.randn(noisy_positions, dim, generator=g)
        frames.append(frame)
    return torch.stack(frames)


CASES = [  # (seed, T, N, objects, cut, noisy positions)
    (0, 1, 16, 2, None, 0),      # one frame: one one-frame segment, everything dynamic
    (1, 1, 64, 2, None, 0),
    (2, 2, 16, 2, None, 0),      # two frames
    (3, 2, 64, 1, None, 0),
    (4, 3, 64, 2, 1, 0),
    (5, 4, 16, 2, None, 0),      # static set <= 14 (not clustered)
    (6, 4, 64, 2, 2, 0),         # a cut in the middle: segments of 2 frames
    (7, 4, 64, 2, None, 20),     # dynamic sets > 14 per frame (clustered per frame)
    (8, 5, 36, 3, 3, 0),
    (9, 6, 64, 2, 3, 0),
    (10, 8, 64, 2, 4, 0),        # 8 grid steps x 64 positions, two objects, a cut (as in the issue)
    (11, 8, 64, 2, 5, 0),
    (12, 8, 16, 2, 2, 0),
    (13, 8, 64, 2, None, 16),
    (14, 10, 49, 2, 6, 0),
    (15, 12, 64, 2, 7, 0),
    (16, 16, 64, 2, 8, 0),       # 16 grid steps x 64 positions (as in the issue)
    (17, 16, 64, 2, 11, 0),
    (18, 16, 64, 2, 3, 0),
    (19, 16, 16, 2, 9, 0),
    (20, 16, 64, 3, None, 24),
    (21, 7, 64, 2, 1, 0),
    (22, 9, 25, 2, 4, 0),
    (23, 16, 100, 2, 12, 0),
]
PRESETS = ["default", "conservative", "aggressive"]


def members_of(merge, num_tokens: int) -> list[frozenset]:
    """The original flat indices each of the project's merged tokens averages."""
    members: list[set] = [set() for _ in range(merge.tokens_after_stage1)]
    for flat, merged in enumerate(merge.cluster_members.tolist()):
        members[merged].add(flat)
    assert sum(len(m) for m in members) == num_tokens
    return [frozenset(m) for m in members]


# ============================================================================= the property


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("case", CASES, ids=[f"seed{c[0]}-T{c[1]}-N{c[2]}" for c in CASES])
def test_stage1_and_stage2_make_the_official_algorithms_decisions(case, name):
    seed, num_frames, num_positions, num_objects, cut, noisy = case
    config = preset(name)
    tokens = synthetic_video(seed, num_frames, num_positions, num_objects, cut, noisy)
    segments, masks, groups = reference_stage1(tokens, config.tau, config.cluster_ratio, config.temporal_segment_ratio)

    merge = merge_video_tokens(tokens, config)
    assert merge.segments == segments
    for (start, _), mask in zip(segments, masks):
        project_static = merge.is_static[merge.cluster_members[start * num_positions + torch.arange(num_positions)]]
        assert torch.equal(project_static, mask), f"static positions of the segment starting at {start}"
    expected_tokens = {m for static, frames in groups for m in [*static, *(t for f in frames for t in f)]}
    members = members_of(merge, num_frames * num_positions)
    assert merge.tokens_after_stage1 == len(expected_tokens)
    assert set(members) == expected_tokens

    weights = torch.rand(num_frames * num_positions, generator=torch.Generator().manual_seed(1000 + seed)).double()
    importance_of = lambda m: float(weights[sorted(m)].mean())  # noqa: E731  (a continuous score: no ties)
    importance = torch.tensor([importance_of(m) for m in members])
    kept = select_keep_indices(importance, config.keep_ratio, selection_group_ids(merge), config.selection)
    assert {members[i] for i in kept.tolist()} == reference_stage2(groups, importance_of, config.keep_ratio)


def test_the_cases_cover_short_and_long_segments_and_small_and_large_sets():
    """The inputs above reach every branch of the description (checked on the reference itself)."""
    widths, static_sizes, dynamic_sizes = set(), set(), set()
    for seed, num_frames, num_positions, num_objects, cut, noisy in CASES:
        tokens = synthetic_video(seed, num_frames, num_positions, num_objects, cut, noisy)
        segments, masks, _ = reference_stage1(tokens, 0.8, 0.5, 0.25)
        widths.update(e - s for s, e in segments)
        static_sizes.update(int(m.sum()) for m in masks)
        dynamic_sizes.update(int((~m).sum()) for m in masks)
    assert {1, 2} <= widths and max(widths) >= 8
    assert min(static_sizes) <= SMALL_SET < max(static_sizes)
    assert min(dynamic_sizes) <= SMALL_SET < max(dynamic_sizes)
