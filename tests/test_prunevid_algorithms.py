"""PruneVid algorithms: DPC-KNN, stage-1 merging, stage-2 importance/selection.

Pure tensor functions on small synthetic inputs with fixed seeds; the model wiring is tested
elsewhere. DPC-KNN is checked against a brute-force pure-python reference written from the
definitions in ``pruning/video/dpc_knn.py``; attention importance against a naive full-softmax
(eager) computation.
"""

from __future__ import annotations

import math

import pytest
import torch

from pruning.video.dpc_knn import (
    cluster,
    dpc_knn_assign,
    dpc_knn_centers,
    dpc_knn_density,
    dpc_knn_distance_to_denser,
    pairwise_distances,
)
from pruning.video.prunevid import (
    PRESET_NAMES,
    PRESETS,
    PruneVidConfig,
    mean_pairwise_cosine,
    merge_video_tokens,
    num_clusters_for,
    num_temporal_segments,
    preset,
    question_query_positions,
    refine_temporal_labels,
    select_keep_indices,
    selection_group_ids,
    static_dynamic_split,
    temporal_segments,
    visual_token_importance,
)

# ============================================================================= brute-force DPC-KNN


def ref_distances(points: list[list[float]]) -> list[list[float]]:
    dim = len(points[0])
    return [
        [math.sqrt(sum((a - b) ** 2 for a, b in zip(p, q))) / math.sqrt(dim) for q in points] for p in points
    ]


def ref_density(dist: list[list[float]], k: int) -> list[float]:
    k = min(k, len(dist))
    return [math.exp(-sum(d * d for d in sorted(row)[:k]) / k) for row in dist]  # self (0) included


def ref_delta(dist: list[list[float]], rho: list[float]) -> list[float]:
    n = len(dist)
    out = []
    for i in range(n):
        denser = [j for j in range(n) if rho[j] > rho[i] or (rho[j] == rho[i] and j < i)]
        # the densest point: the largest distance in the whole set (TCFormer's / the official code's dist_max)
        out.append(min(dist[i][j] for j in denser) if denser else max(max(row) for row in dist))
    return out


def ref_centers(dist, rho, delta, num_clusters: int) -> list[int]:
    n = len(dist)
    if n <= num_clusters:
        return list(range(n))
    score = [rho[i] * delta[i] for i in range(n)]
    return sorted(sorted(range(n), key=lambda i: (-score[i], i))[:num_clusters])


def ref_labels(dist, centers: list[int]) -> list[int]:
    labels = []
    for i in range(len(dist)):
        if i in centers:
            labels.append(centers.index(i))
            continue
        best = 0
        for c in range(1, len(centers)):
            if dist[i][centers[c]] < dist[i][centers[best]]:
                best = c
        labels.append(best)
    return labels


CASES = [(seed, n, dim, k, c) for seed, (n, dim, k, c) in enumerate(
    [(5, 3, 2, 2), (8, 4, 5, 3), (12, 6, 3, 4), (17, 5, 5, 5), (23, 8, 4, 7), (30, 16, 5, 9), (30, 2, 7, 12), (9, 3, 20, 4)]
)]


@pytest.mark.parametrize("seed,n,dim,k,num_clusters", CASES)
def test_dpc_knn_equals_bruteforce_reference(seed, n, dim, k, num_clusters):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)
    points = x.tolist()
    dist = ref_distances(points)
    rho = ref_density(dist, k)
    delta = ref_delta(dist, rho)
    centers = ref_centers(dist, rho, delta, num_clusters)
    labels = ref_labels(dist, centers)

    torch.testing.assert_close(pairwise_distances(x), torch.tensor(dist, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    density = dpc_knn_density(x, k)
    torch.testing.assert_close(density, torch.tensor(rho, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        dpc_knn_distance_to_denser(x, density), torch.tensor(delta, dtype=torch.float64), rtol=1e-12, atol=1e-12
    )
    assert dpc_knn_centers(x, num_clusters, k).tolist() == centers
    assert dpc_knn_assign(x, torch.tensor(centers)).tolist() == labels
    assert cluster(x, num_clusters, k).tolist() == labels
    assert sorted(set(labels)) == list(range(num_clusters))  # every cluster used


def test_dpc_knn_float32_input_gives_same_clusters_as_float64():
    x = torch.randn(25, 6, generator=torch.Generator().manual_seed(7))
    assert cluster(x, 6, 5).tolist() == cluster(x.double(), 6, 5).tolist()


def test_dpc_knn_distance_to_denser_uses_only_density_order():
    x = torch.randn(15, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    density = dpc_knn_density(x, 4)
    torch.testing.assert_close(dpc_knn_distance_to_denser(x, density), dpc_knn_distance_to_denser(x, density.log()))


def test_dpc_knn_ties_are_broken_by_index_deterministically():
    # identical points: equal densities; the lowest index is the densest, duplicates have delta 0
    x = torch.zeros(4, 3, dtype=torch.float64)
    density = dpc_knn_density(x, 2)
    assert density.tolist() == [1.0] * 4
    assert dpc_knn_distance_to_denser(x, density).tolist() == [0.0] * 4
    assert dpc_knn_centers(x, 2, 2).tolist() == [0, 1]
    assert cluster(x, 2, 2).tolist() == [0, 1, 0, 0]  # distance ties: the center listed first
    # two tight groups, all densities equal (k=2: nearest neighbour at 0.1): index order decides
    y = torch.tensor([[0.0, 0.0], [0.0, 0.1], [5.0, 5.0], [5.0, 5.1], [0.1, 0.0]], dtype=torch.float64)
    assert dpc_knn_centers(y, 2, 2).tolist() == [0, 2]
    assert cluster(y, 2, 2).tolist() == [0, 0, 1, 1, 0]
    assert all(cluster(y, 2, 2).tolist() == [0, 0, 1, 1, 0] for _ in range(3))


def test_dpc_knn_edge_cases():
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    assert cluster(x, 4, 5).tolist() == [0, 1, 2, 3]  # N == num_clusters: each point its own
    assert cluster(x, 9, 5).tolist() == [0, 1, 2, 3]  # N < num_clusters
    assert dpc_knn_centers(x, 9, 2).tolist() == [0, 1, 2, 3]
    assert cluster(x[:1], 1, 5).tolist() == [0]  # N == 1
    assert dpc_knn_density(x[:1], 5).tolist() == [1.0]
    assert dpc_knn_distance_to_denser(x[:1], torch.ones(1)).tolist() == [0.0]
    assert cluster(x, 1, 5).tolist() == [0, 0, 0, 0]  # one cluster
    # k >= N is clamped to N
    torch.testing.assert_close(dpc_knn_density(x, 100), dpc_knn_density(x, 4))
    assert cluster(x[:0], 2, 3).numel() == 0
    with pytest.raises(ValueError, match="num_clusters must be an integer >= 1"):
        cluster(x, 0, 3)
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        dpc_knn_density(x, 0)
    with pytest.raises(ValueError, match=r"shape \[N, D\]"):
        cluster(torch.zeros(2, 3, 4), 2, 2)
    with pytest.raises(ValueError, match="distinct"):
        dpc_knn_assign(x, torch.tensor([1, 1]))


# ============================================================================= stage 1: temporal segments


def three_scene_frames(seed: int = 0, frames_per_scene: int = 4, dim: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scenes = torch.randn(3, dim, generator=g) * 3.0
    noise = torch.randn(3, frames_per_scene, dim, generator=g) * 0.1
    return (scenes[:, None, :] + noise).reshape(3 * frames_per_scene, dim)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_temporal_segments_split_three_scenes_at_the_cuts(seed):
    frames = three_scene_frames(seed)
    assert temporal_segments(frames, 0.25, k=5) == [(0, 4), (4, 8), (8, 12)]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("num_frames,ratio", [(1, 0.25), (2, 0.5), (7, 0.3), (12, 0.25), (16, 0.5), (9, 1.0)])
def test_temporal_segments_contiguous_cover_and_count(seed, num_frames, ratio):
    # random frames: labels interleave in time; "exact" merges runs down to the count, "official" refines
    # the labels (a cluster keeps its longest runs) and may leave fewer segments than clusters
    frames = torch.randn(num_frames, 8, generator=torch.Generator().manual_seed(seed))
    exact = temporal_segments(frames, ratio, k=3, segmentation="exact")
    official = temporal_segments(frames, ratio, k=3)
    assert len(exact) == num_temporal_segments(num_frames, ratio, "exact") == max(1, math.floor(num_frames * ratio + 0.5))
    assert 1 <= len(official) <= max(num_temporal_segments(num_frames, ratio), 1) + num_frames // 2
    for segments in (exact, official):
        assert segments[0][0] == 0 and segments[-1][1] == num_frames
        assert all(a < b for a, b in segments)
        assert all(segments[i][1] == segments[i + 1][0] for i in range(len(segments) - 1))


def test_num_temporal_segments_truncates_as_published_or_rounds_half_up_when_exact():
    assert num_temporal_segments(10, 0.25) == 2  # int(2.5)
    assert num_temporal_segments(90, 0.7) == 62  # int(62.99999999999999), as the official code computes it
    assert num_temporal_segments(2, 0.1) == 1  # at least one
    assert num_temporal_segments(10, 0.25, "exact") == 3  # 2.5 -> 3
    assert num_temporal_segments(2, 0.1, "exact") == 1
    assert num_temporal_segments(10, 0.3, "exact") == 3


@pytest.mark.parametrize(
    "labels,expected",
    [
        ([0, 0, 1, 0, 0], [0, 0, 0, 0, 0]),  # both runs of 0 are longest (kept); 1 (a single frame) joins the left
        ([0, 1, 1, 1, 2, 2], [1, 1, 1, 1, 2, 2]),  # 0 has only a 1-frame run: the only neighbour takes it
        ([0, 0, 0, 1, 0, 2, 2], [0, 0, 0, 0, 0, 2, 2]),  # the short run of 0 and the lone 1: the longer neighbour (left)
        ([0, 1, 0, 1], [0, 0, 0, 0]),  # every run has length 1: nothing keeps a label, default 0
        ([3, 3, 1, 1, 3, 2, 2], [3, 3, 1, 1, 1, 2, 2]),  # a tie (2 vs 2): the left neighbour
        ([5], [0]),  # one frame
    ],
)
def test_refine_temporal_labels_follows_the_published_refine_clusters(labels, expected):
    assert refine_temporal_labels(labels) == expected


def test_num_clusters_for_keeps_small_sets_as_published_or_takes_the_ceiling():
    assert [num_clusters_for(n, 0.5) for n in (1, 14, 15, 31)] == [1, 14, 7, 15]
    assert num_clusters_for(90, 0.7) == 62  # int(62.99999999999999), as the official code computes it
    assert [num_clusters_for(n, 0.5, "ceil") for n in (1, 14, 15, 31)] == [1, 7, 8, 16]


# ============================================================================= stage 1: static / dynamic


GRID = 4  # 4 x 4 tokens per frame
BLOB_PATH = [1, 2, 5, 6]  # the blob's position in frames 0..3 (inside the top region)


def synthetic_video(seed: int = 0, dim: int = 32, noise: float = 0.02):
    """4 frames of 4x4 tokens: two background regions (top / bottom half) plus a blob moving
    through positions 1, 2, 5, 6. Returns ``video [4, 16, D]``, region of each position, blob."""
    g = torch.Generator().manual_seed(seed)
    regions = torch.randn(2, dim, generator=g)
    region_of = torch.tensor([0] * 8 + [1] * 8)
    background = regions[region_of] + torch.randn(GRID * GRID, dim, generator=g) * 0.05
    video = background[None].repeat(len(BLOB_PATH), 1, 1) + torch.randn(len(BLOB_PATH), GRID * GRID, dim, generator=g) * noise
    blob = torch.randn(dim, generator=g) * 1.5
    for frame, pos in enumerate(BLOB_PATH):
        video[frame, pos] = blob + torch.randn(dim, generator=g) * noise
    return video, region_of, blob


def test_static_dynamic_split_marks_blob_path_dynamic_and_background_static():
    video, _, _ = synthetic_video()
    static = static_dynamic_split(video, tau=0.8)
    assert (~static).nonzero().flatten().tolist() == BLOB_PATH
    assert static.sum().item() == GRID * GRID - len(BLOB_PATH)


def test_mean_pairwise_cosine_matches_loop_and_single_frame_is_dynamic():
    x = torch.randn(5, 7, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cos = torch.nn.functional.cosine_similarity
    expected = torch.stack([
        torch.stack([cos(x[i, n], x[j, n], dim=0) for i in range(5) for j in range(i + 1, 5)]).mean() for n in range(7)
    ])
    torch.testing.assert_close(mean_pairwise_cosine(x), expected)
    assert not static_dynamic_split(x[:1], 0.8).any()  # one frame: all dynamic


# ============================================================================= stage 1: merging


def stage1_config(**overrides) -> PruneVidConfig:
    """Stage 1 with ceil cluster counts: the tiny sets below (16 positions) are clustered at all."""
    return preset("stage1_only", **{"temporal_segment_ratio": 0.25, "cluster_count": "ceil", **overrides})


def check_merge_invariants(video: torch.Tensor, result) -> None:
    num_frames, num_positions, _ = video.shape
    flat = video.reshape(-1, video.shape[-1])
    members = result.cluster_members
    assert members.shape == (num_frames * num_positions,)
    assert members.min() >= 0 and members.max() < result.tokens_after_stage1
    assert torch.bincount(members, minlength=result.tokens_after_stage1).min() >= 1  # no empty cluster
    for m in range(result.tokens_after_stage1):  # merged token = mean of its members
        torch.testing.assert_close(result.merged_tokens[m], flat[members == m].mean(dim=0), rtol=1e-5, atol=1e-6)
    assert torch.all(result.source_positions[1:] > result.source_positions[:-1])  # original order
    for m, src in enumerate(result.source_positions.tolist()):
        assert members[src] == m and src == (members == m).nonzero().min()  # source = earliest member
    assert torch.equal(result.frame_of_token, result.source_positions // num_positions)
    assert result.tokens_before_stage1 == num_frames * num_positions
    assert result.merged_tokens.shape == (result.tokens_after_stage1, video.shape[-1])


def test_merge_keeps_moving_blob_per_frame_and_merges_static_background():
    video, region_of, _ = synthetic_video()
    result = merge_video_tokens(video, stage1_config())
    check_merge_invariants(video, result)
    assert result.segments == [(0, 4)]
    # 12 static positions -> 6 clusters; 4 dynamic positions -> 2 clusters in each of 4 frames
    assert result.tokens_after_stage1 == 6 + 4 * 2 < result.tokens_before_stage1 == 64
    for frame, pos in enumerate(BLOB_PATH):
        m = result.cluster_members[frame * GRID * GRID + pos]
        assert not result.is_static[m] and result.frame_of_token[m] == frame
        assert (result.cluster_members == m).sum() == 1  # the blob is a cluster of its own
    for m in result.is_static.nonzero().flatten().tolist():
        flat_members = (result.cluster_members == m).nonzero().flatten()
        positions = flat_members % (GRID * GRID)
        assert len(set(region_of[positions].tolist())) == 1  # never mixes the two regions
        assert sorted(set((flat_members // (GRID * GRID)).tolist())) == [0, 1, 2, 3]  # spans all frames
        assert result.frame_of_token[m] == 0


def test_merge_two_segments_random_video_invariants_and_determinism():
    g = torch.Generator().manual_seed(5)
    video = torch.randn(8, 9, 12, generator=g)
    video[4:] += 4 * torch.randn(12, generator=g)  # a scene cut between frame 3 and 4
    video[:, :5] = video[0, :5] + 0.01 * torch.randn(8, 5, 12, generator=g)  # 5 static positions
    config = stage1_config(cluster_ratio=0.5)
    result = merge_video_tokens(video, config)
    check_merge_invariants(video, result)
    assert result.segments == [(0, 4), (4, 8)]
    assert result.tokens_after_stage1 < result.tokens_before_stage1
    for m in range(result.tokens_after_stage1):
        frames = (result.cluster_members == m).nonzero().flatten() // 9
        start, end = result.segments[result.segment_of_token[m]]
        assert frames.min() >= start and frames.max() < end  # clusters never cross segments
        if not result.is_static[m]:
            assert frames.unique().numel() == 1  # dynamic clusters stay within one frame
    again = merge_video_tokens(video.clone(), config)
    assert torch.equal(again.merged_tokens, result.merged_tokens)
    assert torch.equal(again.cluster_members, result.cluster_members)


def test_merge_with_stage1_off_is_identity():
    video = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0))
    result = merge_video_tokens(video, preset("baseline"))
    assert torch.equal(result.merged_tokens, video.reshape(12, 5))
    assert result.tokens_after_stage1 == result.tokens_before_stage1 == 12
    assert result.cluster_members.tolist() == list(range(12))


def test_merge_bfloat16_returns_input_dtype():
    video, _, _ = synthetic_video()
    result = merge_video_tokens(video.to(torch.bfloat16), stage1_config())
    assert result.merged_tokens.dtype == torch.bfloat16


def test_selection_group_ids_static_per_segment_dynamic_per_frame():
    video, _, _ = synthetic_video()
    result = merge_video_tokens(video, stage1_config())
    groups = selection_group_ids(result)
    assert groups.shape == (result.tokens_after_stage1,)
    static_groups = set(groups[result.is_static].tolist())
    assert len(static_groups) == 1
    for frame in range(4):
        dyn = groups[(~result.is_static) & (result.frame_of_token == frame)]
        assert dyn.unique().numel() == 1 and dyn[0].item() not in static_groups
    assert groups.unique().numel() == 1 + 4


# ============================================================================= configuration


def test_presets_have_the_specified_values():
    assert set(PRESETS) == {"baseline", "stage2_only", "stage1_only", "default", "conservative", "aggressive"}
    assert PRESET_NAMES[-1] == "custom"
    base = PRESETS["baseline"]
    assert not (base.enable_stage1 or base.enable_pruning or base.enable_cache_compression)
    s2 = PRESETS["stage2_only"]
    assert not s2.enable_stage1 and s2.enable_pruning and (s2.keep_ratio, s2.pruning_layer) == (0.4, 10)
    s1 = PRESETS["stage1_only"]
    assert s1.enable_stage1 and not s1.enable_pruning
    assert (s1.tau, s1.cluster_ratio, s1.temporal_segment_ratio) == (0.8, 0.5, 0.25)
    for name, values in {
        "default": (0.8, 0.5, 0.25, 0.4), "conservative": (0.9, 0.8, 0.5, 0.6), "aggressive": (0.7, 0.3, 0.25, 0.3),
    }.items():
        c = PRESETS[name]
        assert c.enable_stage1 and c.enable_pruning and c.pruning_layer == 10
        assert (c.tau, c.cluster_ratio, c.temporal_segment_ratio, c.keep_ratio) == values
    assert PruneVidConfig() == PRESETS["default"]


def test_preset_overrides_custom_and_unknown_names():
    assert preset("custom", keep_ratio=0.5) == PruneVidConfig(keep_ratio=0.5)
    assert preset("aggressive", pruning_layer=3).tau == 0.7
    with pytest.raises(ValueError) as err:
        preset("fast")
    message = str(err.value)
    assert "\n" not in message and "'fast'" in message
    assert all(name in message for name in PRESET_NAMES)
    with pytest.raises(ValueError, match="unknown PruneVidConfig field"):
        preset("default", keep=0.5)
    with pytest.raises(ValueError, match="keep_ratio"):
        preset("custom", keep_ratio=1.5)
    with pytest.raises(Exception):
        PRESETS["default"].tau = 0.5  # frozen


@pytest.mark.parametrize("field,value,needle", [
    ("tau", 0.0, r"tau must be a number in \(0, 1\]"),
    ("tau", 1.2, "tau"),
    ("cluster_ratio", 0, "cluster_ratio"),
    ("cluster_ratio", -0.1, "cluster_ratio"),
    ("temporal_segment_ratio", 1.01, "temporal_segment_ratio"),
    ("keep_ratio", 0.0, "keep_ratio"),
    ("keep_ratio", "0.4", "keep_ratio"),
    ("pruning_layer", -1, "pruning_layer must be an integer >= 0"),
    ("pruning_layer", 2.0, "pruning_layer"),
    ("k_neighbors", 0, "k_neighbors must be an integer >= 1"),
    ("selection", "topk", "selection must be one of 'segment', 'segment_ceil', 'global'"),
    ("enable_stage1", 1, "enable_stage1 must be True or False"),
])
def test_config_rejects_out_of_range_values_with_one_line(field, value, needle):
    with pytest.raises(ValueError, match=needle) as err:
        PruneVidConfig(**{field: value})
    assert "\n" not in str(err.value) and repr(value) in str(err.value)


def test_config_boundaries_accepted_and_cache_compression_needs_pruning():
    PruneVidConfig(tau=1.0, cluster_ratio=1.0, temporal_segment_ratio=1.0, keep_ratio=1.0, pruning_layer=0)
    with pytest.raises(ValueError, match="enable_cache_compression=True needs enable_pruning=True"):
        PruneVidConfig(enable_pruning=False, enable_cache_compression=True)


def test_validate_for_model_checks_pruning_layer_against_depth():
    assert PruneVidConfig(pruning_layer=27).validate_for_model(28).pruning_layer == 27
    with pytest.raises(ValueError, match=r"pruning_layer=28 is out of range for a model with 28 layers \(allowed 0..27\)"):
        PruneVidConfig(pruning_layer=28).validate_for_model(28)
    PRESETS["baseline"].validate_for_model(2)  # stage 2 off: the layer is not used
    with pytest.raises(ValueError, match="num_layers"):
        PRESETS["default"].validate_for_model(0)


# ============================================================================= stage 2: importance


def naive_importance(q, k, visual, scaling, query_positions, key_padding=None, additive=None):
    """Eager attention: repeat_kv, full [Lq, Lk] scores, causal mask, softmax in float32."""
    heads, kv_heads = q.shape[1], k.shape[1]
    k_full = k.repeat_interleave(heads // kv_heads, dim=1)  # HF repeat_kv
    scores = torch.matmul(q.float(), k_full.float().transpose(-1, -2)) * scaling  # [B, H, Lq, Lk]
    if additive is not None:
        scores = scores + additive
    causal = torch.arange(k.shape[2])[None, :] <= query_positions[:, None]  # [Lq, Lk]
    allowed = causal[None, None]
    if key_padding is not None:
        allowed = allowed & key_padding[:, None, None, :].bool()
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).nan_to_num(0.0)
    return probs[..., visual].amax(dim=2).amax(dim=1)  # max over queries, then heads


def qk(seed, batch=2, heads=4, kv_heads=2, num_queries=6, num_keys=20, dim=8):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, num_queries, dim, generator=g)
    k = torch.randn(batch, kv_heads, num_keys, dim, generator=g)
    return q, k


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("chunk", [1, 4, 256])
def test_visual_token_importance_equals_naive_softmax_gqa(heads, kv_heads, chunk):
    q, k = qk(0, heads=heads, kv_heads=kv_heads)
    visual = torch.arange(3, 15)
    positions = torch.arange(14, 20)  # the last 6 positions
    got = visual_token_importance(q, k, visual, 8**-0.5, query_chunk_size=chunk)
    torch.testing.assert_close(got, naive_importance(q, k, visual, 8**-0.5, positions), rtol=0, atol=1e-6)
    explicit = visual_token_importance(q, k, visual, 8**-0.5, query_positions=positions, query_chunk_size=chunk)
    torch.testing.assert_close(explicit, got, rtol=0, atol=0)


def test_visual_token_importance_causal_queries_inside_the_sequence():
    q, k = qk(1, num_queries=5, num_keys=24)
    visual = torch.arange(2, 22)
    positions = torch.tensor([4, 9, 10, 15, 18])  # visual keys after a query are hidden from it
    got = visual_token_importance(q, k, visual, 0.3, query_positions=positions, query_chunk_size=2)
    expected = naive_importance(q, k, visual, 0.3, positions)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert torch.all(got[:, visual > 18] == 0)  # after every query: never attended
    assert torch.all(got[:, visual <= 18] > 0)


def test_visual_token_importance_with_padding_and_additive_masks():
    q, k = qk(2)
    visual = torch.arange(0, 12)
    positions = torch.arange(14, 20)
    padding = torch.ones(2, 20, dtype=torch.long)
    padding[1, :3] = 0  # left padding in the second sequence
    got = visual_token_importance(q, k, visual, 0.35, attention_mask=padding)
    torch.testing.assert_close(got, naive_importance(q, k, visual, 0.35, positions, key_padding=padding), rtol=0, atol=1e-6)
    assert torch.all(got[1, :3] == 0)
    additive = torch.randn(2, 1, 6, 20, generator=torch.Generator().manual_seed(9))
    got = visual_token_importance(q, k, visual, 0.35, attention_mask=additive, query_chunk_size=4)
    torch.testing.assert_close(got, naive_importance(q, k, visual, 0.35, positions, additive=additive), rtol=0, atol=1e-6)
    as_bool = padding[:, None, None, :].expand(2, 1, 6, 20).bool()
    got = visual_token_importance(q, k, visual, 0.35, attention_mask=as_bool)
    torch.testing.assert_close(got, naive_importance(q, k, visual, 0.35, positions, key_padding=padding), rtol=0, atol=1e-6)


def test_visual_token_importance_rejects_bad_shapes():
    q, k = qk(0)
    with pytest.raises(ValueError, match="do not match"):
        visual_token_importance(q[:, :3], k, torch.arange(3), 1.0)
    with pytest.raises(ValueError, match="visual_positions"):
        visual_token_importance(q, k, torch.tensor([25]), 1.0)
    with pytest.raises(ValueError, match="query_positions"):
        visual_token_importance(q, k, torch.arange(3), 1.0, query_positions=torch.arange(3))


# ============================================================================= stage 2: selection


def test_select_keep_indices_global_topk_sorted_ties_to_lower_index():
    importance = torch.tensor([0.1, 0.5, 0.3, 0.5, 0.0, 0.3, 0.2, 0.9, 0.3, 0.1])
    assert select_keep_indices(importance, 0.4, mode="global").tolist() == [1, 2, 3, 7]  # 4 kept; 0.3 tie -> index 2
    assert select_keep_indices(importance, 0.25, mode="global").tolist() == [1, 3, 7]  # round(2.5) = 3
    assert select_keep_indices(importance, 0.01, mode="global").tolist() == [7]  # at least one
    assert select_keep_indices(importance, 1.0, mode="global").tolist() == list(range(10))
    assert select_keep_indices(torch.zeros(5), 0.4, mode="global").tolist() == [0, 1]
    assert select_keep_indices(importance, 0.4, mode="global").dtype == torch.long


def test_select_keep_indices_segment_ceil_mode_ceil_per_group():
    importance = torch.tensor([0.9, 0.8, 0.7, 0.1, 0.2, 0.3, 0.6, 0.05, 0.5, 0.5])
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2, 3, 3, 3])
    # ceil(3 * 0.4) = 2, 2, ceil(1 * 0.4) = 1, 2 (tie 0.5/0.5 keeps both)
    assert select_keep_indices(importance, 0.4, groups, mode="segment_ceil").tolist() == [0, 1, 4, 5, 6, 8, 9]
    # the low-importance group still keeps its best token, unlike global selection
    assert select_keep_indices(importance, 0.1, groups, mode="segment_ceil").tolist() == [0, 5, 6, 8]
    assert select_keep_indices(importance, 0.1, mode="global").tolist() == [0]
    # arbitrary (non-dense, unordered) group labels; ties within a group go to the lower index
    same = torch.tensor([7, 7, 7, 7, -2, -2])
    assert select_keep_indices(torch.ones(6), 0.5, same, mode="segment_ceil").tolist() == [0, 1, 4]


def test_select_keep_indices_segment_mode_truncates_per_group_as_published():
    importance = torch.tensor([0.9, 0.8, 0.7, 0.1, 0.2, 0.3, 0.6, 0.05, 0.5, 0.5])
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2, 3, 3, 3])
    # int(3 * 0.4) = 1 per group of 3, int(1 * 0.4) = 0: the lone token of group 2 is dropped
    assert select_keep_indices(importance, 0.4, groups).tolist() == [0, 5, 8]
    assert select_keep_indices(importance, 0.1, groups).tolist() == []  # every group keeps none
    assert select_keep_indices(importance, 1.0, groups).tolist() == list(range(10))


def test_select_keep_indices_segment_mode_matches_loop_reference():
    g = torch.Generator().manual_seed(11)
    importance = torch.rand(40, generator=g).round(decimals=1)  # many ties
    groups = torch.randint(0, 5, (40,), generator=g)
    expected = []
    for gid in groups.unique().tolist():
        members = [i for i in range(40) if groups[i] == gid]
        quota = max(1, math.ceil(len(members) * 0.35))
        expected += sorted(members, key=lambda i: (-importance[i].item(), i))[:quota]
    assert select_keep_indices(importance, 0.35, groups, mode="segment_ceil").tolist() == sorted(expected)


def test_select_keep_indices_errors():
    with pytest.raises(ValueError, match="needs segment_ids"):
        select_keep_indices(torch.rand(4), 0.5, mode="segment")
    with pytest.raises(ValueError, match="mode must be one of"):
        select_keep_indices(torch.rand(4), 0.5, mode="frame")
    with pytest.raises(ValueError, match="keep_ratio"):
        select_keep_indices(torch.rand(4), 0.0, mode="global")


# ============================================================================= question queries


def test_question_query_positions_are_after_the_last_visual_token():
    input_ids = torch.tensor([1, 2, 3, 9, 9, 9, 9, 4, 5, 6])
    assert question_query_positions(input_ids, 6).tolist() == [7, 8, 9]
    assert question_query_positions(input_ids, torch.tensor(8)).tolist() == [9]
    mask = torch.tensor([1, 1, 1, 1, 1, 1, 1, 1, 1, 0])  # right padding
    assert question_query_positions(input_ids, 6, attention_mask=mask).tolist() == [7, 8]
    with pytest.raises(ValueError, match="no question token follows"):
        question_query_positions(input_ids, 9)
    with pytest.raises(ValueError, match="outside the sequence"):
        question_query_positions(input_ids, 10)
    with pytest.raises(ValueError, match=r"shape \[L\]"):
        question_query_positions(input_ids[None], 6)
