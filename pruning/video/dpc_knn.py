"""DPC-KNN: density-peaks clustering with k-nearest-neighbour densities (vectorized torch).

Used by PruneVid for temporal segmentation (frames) and spatial token
merging (tokens). The definitions follow TCFormer's ``cluster_dpc_knn`` (which PruneVid
reuses), with the random jitter replaced by deterministic tie-breaking:

* distance   ``d_ij = ||x_i - x_j||_2 / sqrt(D)``, Euclidean on the raw features, or on the
  L2-normalised features with ``normalize=True``; the ``1 / sqrt(D)`` scale is TCFormer's;
* density    ``rho_i = exp(-mean_{j in kNN(i)} d_ij^2)`` where ``kNN(i)`` are the ``k`` points
  nearest to ``x_i`` *including ``x_i`` itself* (distance 0), as TCFormer's
  ``topk(dist, k, largest=False)`` over the full distance matrix; ``k`` is clamped to ``N``;
* denser     point ``j`` is denser than point ``i`` iff ``rho_j > rho_i``, or ``rho_j == rho_i``
  and ``j < i`` (a strict total order: ties go to the lower index, no random jitter);
* delta      ``delta_i = min_{j denser than i} d_ij``; for the densest point (the only one
  with no denser point) ``delta = max_{i,j} d_ij``, the largest distance in the set (as TCFormer's
  and the official PruneVid code's ``dist_max``);
* centers    the ``C`` points with the largest score ``rho_i * delta_i`` (ties: lower index
  first), returned in ascending index order; the ranking is done in log space
  (``log rho + log delta``), the same order as the product but immune to ``exp`` underflow
  when features are far apart;
* labels     each point goes to its nearest center (ties: the center listed first in
  ``center_indices``); a center is always its own label. Labels are positions in
  ``center_indices``, i.e. in ``[0, C)``, and every label is used.

Distances are computed in float64 without the matmul shortcut (exact, deterministic,
``d_ii == 0``), so results do not depend on device or input dtype beyond rounding of the input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pruning.common import check_int

__all__ = [
    "pairwise_distances",
    "dpc_knn_density",
    "dpc_knn_distance_to_denser",
    "dpc_knn_centers",
    "dpc_knn_assign",
    "cluster",
]


def _check_points(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"DPC-KNN expects points of shape [N, D], got {shape}")


def pairwise_distances(x: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """``[N, D] -> [N, N]`` float64 distances ``||x_i - x_j|| / sqrt(D)`` (exact, ``d_ii = 0``)."""
    _check_points(x)
    x = x.detach().to(torch.float64)
    if normalize:
        x = F.normalize(x, dim=-1)
    dist = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")
    return dist / max(x.shape[1], 1) ** 0.5


def _log_density(dist: torch.Tensor, k: int) -> torch.Tensor:
    """``[N, N] -> [N]`` ``log rho = -mean of squared distances to the k nearest (self included)``."""
    k = min(k, dist.shape[0])
    nearest = torch.topk(dist, k, dim=-1, largest=False).values  # values are tie-independent
    return -(nearest**2).mean(dim=-1)


def _distance_to_denser(dist: torch.Tensor, density: torch.Tensor) -> torch.Tensor:
    """``[N, N], [N] -> [N]`` delta; only the order of ``density`` is used."""
    n = dist.shape[0]
    if n == 0:
        return dist.new_zeros(0)
    index = torch.arange(n, device=dist.device)
    # denser[i, j]: point j is denser than point i (strict total order, ties to the lower index)
    rho_i, rho_j = density[:, None], density[None, :]
    denser = (rho_j > rho_i) | ((rho_j == rho_i) & (index[None, :] < index[:, None]))
    to_denser = dist.masked_fill(~denser, float("inf")).min(dim=-1).values
    return torch.where(denser.any(dim=-1), to_denser, dist.max())


def _centers(dist: torch.Tensor, num_clusters: int, k: int) -> torch.Tensor:
    n = dist.shape[0]
    if n <= num_clusters:
        return torch.arange(n, device=dist.device)
    log_rho = _log_density(dist, k)
    delta = _distance_to_denser(dist, log_rho)  # log is increasing: same order as rho
    log_score = log_rho + torch.log(delta)  # delta == 0 (duplicate points) -> -inf
    order = torch.sort(log_score, descending=True, stable=True).indices  # ties: lower index first
    return torch.sort(order[:num_clusters]).values


def _assign(dist: torch.Tensor, center_indices: torch.Tensor) -> torch.Tensor:
    labels = dist[:, center_indices].argmin(dim=-1)  # first minimum: center listed first
    labels[center_indices] = torch.arange(center_indices.numel(), device=dist.device)
    return labels


def dpc_knn_density(x: torch.Tensor, k: int, normalize: bool = False) -> torch.Tensor:
    """Local density ``rho [N]`` (float64) of points ``x [N, D]``.

    ``rho_i = exp(-mean_{j in kNN(i)} d_ij^2)`` over the ``min(k, N)`` nearest points,
    ``x_i`` itself included (PruneVid / TCFormer definition, see the module docstring).
    """
    _check_points(x)
    check_int("k", k, lo=1)
    return _log_density(pairwise_distances(x, normalize), k).exp()


def dpc_knn_distance_to_denser(x: torch.Tensor, density: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """``delta [N]`` (float64): distance from each point of ``x [N, D]`` to its nearest denser point.

    ``density [N]`` may be ``rho`` or any strictly increasing function of it (e.g. ``log rho``):
    only its order is used; equal densities are ordered by index (lower index = denser). The
    densest point gets the largest distance in the set.
    """
    _check_points(x)
    if density.shape != (x.shape[0],):
        raise ValueError(f"density must have shape [{x.shape[0]}], got {tuple(density.shape)}")
    return _distance_to_denser(pairwise_distances(x, normalize), density.to(torch.float64))


def dpc_knn_centers(x: torch.Tensor, num_clusters: int, k: int, normalize: bool = False) -> torch.Tensor:
    """``center_indices [C]`` (ascending LongTensor), ``C = min(num_clusters, N)``.

    The ``C`` points of ``x [N, D]`` with the largest ``rho * delta`` (ties: lower index). With
    ``N <= num_clusters`` every point is a center.
    """
    _check_points(x)
    check_int("num_clusters", num_clusters, lo=1)
    check_int("k", k, lo=1)
    return _centers(pairwise_distances(x, normalize), num_clusters, k)


def dpc_knn_assign(x: torch.Tensor, center_indices: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """``labels [N]`` in ``[0, C)``: each point of ``x [N, D]`` goes to its nearest center.

    ``labels[i] = c`` means point ``i`` belongs to center ``center_indices[c]``; centers are
    their own label; distance ties go to the center listed first.
    """
    _check_points(x)
    center_indices = torch.as_tensor(center_indices, dtype=torch.long, device=x.device)
    n = x.shape[0]
    if center_indices.dim() != 1 or (n > 0 and center_indices.numel() == 0):
        raise ValueError(f"center_indices must be a non-empty 1-D index tensor, got shape {tuple(center_indices.shape)}")
    if center_indices.numel() and (center_indices.min() < 0 or center_indices.max() >= n):
        raise ValueError(f"center_indices must lie in [0, {n}), got {center_indices.tolist()}")
    if center_indices.unique().numel() != center_indices.numel():
        raise ValueError(f"center_indices must be distinct, got {center_indices.tolist()}")
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=x.device)
    return _assign(pairwise_distances(x, normalize), center_indices)


def cluster(x: torch.Tensor, num_clusters: int, k: int, normalize: bool = False) -> torch.Tensor:
    """``labels [N]`` in ``[0, min(num_clusters, N))``: DPC-KNN clustering of ``x [N, D]``.

    ``N <= num_clusters`` (``N == 1`` included): every point is its own cluster,
    ``labels = arange(N)``. ``k >= N`` is clamped to ``N``. ``N == 0`` gives an empty tensor.
    """
    _check_points(x)
    check_int("num_clusters", num_clusters, lo=1)
    check_int("k", k, lo=1)
    n = x.shape[0]
    if n <= num_clusters:
        return torch.arange(n, device=x.device)
    dist = pairwise_distances(x, normalize)
    return _assign(dist, _centers(dist, num_clusters, k))
