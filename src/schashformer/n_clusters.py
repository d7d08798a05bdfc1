"""Estimating the number of clusters K when it is not given (``n_clusters=None``).

The default (chosen by measurement, see docs/METHOD_CHOICES.md, "Number of clusters unknown")
is Leiden community detection (igraph's, RB-configuration modularity at ``resolution``, default DEFAULT_RESOLUTION) on
the sparse kNN graph of the stage-2 embedding z whose neighbours come from the hash
neighbourhoods only (:func:`schashformer.buckets.hash_knn_graph`): O(cells x heads x chunk)
to build, near-linear to partition, and never a global kNN search. K is the number of
communities with at least ``min_size`` cells; smaller ones (a few outlier cells) do not
count as clusters. ``resolution`` gives finer (> 1) or coarser (< 1) clusters. A resolution so
high that no community could reach the minimum size (:func:`max_resolution`, 10 for 300 cells) is
refused before training; if Leiden still leaves fewer than two communities of that size, the
resolution is halved until it does not, with a warning (never the silent fall-back to two clusters).

The alternatives measured against it are kept for the benchmark (``method=``):
``"silhouette"`` (k-means on a subsample of z over a range of K, the K of best silhouette).
"""

from __future__ import annotations

import contextlib
import math
import random
import warnings

import igraph as ig
import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import silhouette_score
from sklearn.neighbors import NearestNeighbors

from . import buckets
from .errors import ParameterError
from .validate import is_int

METHODS = ("leiden", "silhouette")
DEFAULT_RESOLUTION = 0.5  # chosen by benchmarks/estimate_k.py, see docs/METHOD_CHOICES.md
MEMORY_K = 100  # K assumed by the memory estimate before K is known (the per-cell cost of K is small)
# best_by_silhouette: a later partition must beat an earlier one's silhouette by more than this fraction. On 10x
# PBMC the k-means and Leiden starts scored 0.4937 and 0.4939 (ARI 0.79 and 0.75): a tie decided by Leiden's
# random seed (docs/METHOD_CHOICES.md, "Leiden by igraph")
SILHOUETTE_TIE = 0.005
MIN_SIZE_FRACTION = 0.005  # communities below 0.5% of the cells (and at most 10 cells) are not counted as clusters


def check_resolution(resolution) -> float:
    """``resolution`` as a float > 0, or a ParameterError naming the value."""
    ok = (is_int(resolution) or isinstance(resolution, (float, np.floating))) and math.isfinite(resolution)
    if not ok or resolution <= 0:
        raise ParameterError(f"resolution must be a number > 0 (default {DEFAULT_RESOLUTION}; higher gives more clusters), "
                             f"got {resolution!r}")
    return float(resolution)


def min_size_for(n_cells: int) -> int:
    """The smallest community counted as a cluster: 0.5% of the cells, at least 2, at most 10."""
    return max(2, min(10, math.ceil(MIN_SIZE_FRACTION * n_cells)))


def max_resolution(n_cells: int, n_neighbors: int = 15) -> float:
    """The highest Leiden resolution that can still give communities of ``min_size_for(n_cells)`` cells.

    In the RB-configuration model a community of m cells whose ~k neighbours each lie inside it holds
    about m k / 2 edges against resolution x (m k)^2 / (2 N k) expected, so it survives only below
    about N / (m k); half of that leaves room for neighbours outside the community. Above it every
    community falls under the minimum size and K would collapse (measured: 300 PBMC cells, k = 15,
    bound 10: resolution 5 gave 25 clusters, 50 and 1000 fell back to 2).
    """
    return max(1.0, n_cells / (min_size_for(n_cells) * max(n_neighbors, 1)))


def check_resolution_for(resolution: float, n_cells: int, n_neighbors: int = 15) -> None:
    """Refuse, before training, a resolution so high that every Leiden community would be too small to count."""
    top = max_resolution(n_cells, n_neighbors)
    if resolution > top:
        raise ParameterError(f"resolution={resolution:g} is too high for {n_cells} cells: above about {top:g} Leiden "
                             f"splits them into communities smaller than {min_size_for(n_cells)} cells, which do not "
                             f"count as clusters; use a resolution <= {top:g} or give n_clusters (--n-clusters)")


def as_igraph(graph) -> ig.Graph:
    """Undirected, unweighted igraph ``Graph`` of a symmetric sparse ``graph`` (cells, cells): one edge per pair."""
    coo = graph.tocoo()
    upper = coo.row < coo.col
    return ig.Graph(n=graph.shape[0], edges=np.column_stack([coo.row[upper], coo.col[upper]]).tolist())


@contextlib.contextmanager
def _igraph_seeded(seed: int):
    """igraph draws from one process-wide generator: seed a private one for the block, then restore the default."""
    ig.set_random_number_generator(random.Random(seed))
    try:
        yield
    finally:
        ig.set_random_number_generator(random)


def leiden(graph, resolution: float = 1.0, seed: int = 0, n_iterations: int = 2) -> np.ndarray:
    """Leiden partition (RB-configuration modularity at ``resolution``) of ``graph``: a symmetric sparse (cells, cells)
    matrix or an :func:`as_igraph` graph.

    igraph's own Leiden (``Graph.community_leiden``, the algorithm of leidenalg, which scanpy's ``flavor="igraph"``
    also uses): 10-15x faster than leidenalg on the same graph (20,000 cells: 0.15 s against 2.4 s a run;
    docs/METHOD_CHOICES.md, "Leiden by igraph"). Returns labels (cells,) numbered 0.. by decreasing community size.
    """
    g = graph if isinstance(graph, ig.Graph) else as_igraph(graph)
    with _igraph_seeded(seed):
        membership = np.asarray(g.community_leiden(objective_function="modularity", resolution=resolution,
                                                   n_iterations=n_iterations).membership, dtype=np.int64)
    sizes = np.bincount(membership)
    rank = np.empty_like(sizes)
    rank[np.argsort(-sizes, kind="stable")] = np.arange(len(sizes))
    return rank[membership]


def centroids(z: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(K, d) float32 mean of ``z`` (cells, d) over the cells of each label 0..K-1."""
    k = int(labels.max()) + 1
    sums = np.zeros((k, z.shape[1]), dtype=np.float64)
    np.add.at(sums, labels, z)
    return (sums / np.bincount(labels, minlength=k)[:, None]).astype(np.float32)


def significant(labels: np.ndarray, min_size: int | None = None) -> np.ndarray:
    """Labels of the communities with at least ``min_size`` cells (default: 0.5% of the cells, at most 10)."""
    sizes = np.bincount(labels)
    if min_size is None:
        min_size = min_size_for(len(labels))
    big = np.flatnonzero(sizes >= min_size)
    return big if len(big) >= 2 else np.argsort(-sizes)[:2]


def merge_small(z: np.ndarray, labels: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Move cells of communities not in ``keep`` to the nearest kept community centroid; relabel 0..len(keep)-1."""
    centres = np.stack([z[labels == k].mean(0) for k in keep])
    out = np.full(len(labels), -1, dtype=np.int64)
    for new, k in enumerate(keep):
        out[labels == k] = new
    rest = out < 0
    if rest.any():
        d = ((z[rest, None, :] - centres[None]) ** 2).sum(-1)
        out[rest] = d.argmin(1)
    return out


def estimate(z: np.ndarray, orders: list[np.ndarray], chunk_size: int, *, resolution: float = DEFAULT_RESOLUTION,
             n_neighbors: int = 15, seed: int = 0, method: str = "leiden",
             max_clusters: int | None = None) -> tuple[int, np.ndarray]:
    """Estimate K from the embedding ``z`` (cells, d) and the hash-sorted ``orders`` (one per head).

    Returns (K, labels (cells,) in 0..K-1): the partition whose centroids initialise the
    clustering head. ``method`` "leiden" (default) or "silhouette" (see the module docstring).
    """
    resolution = check_resolution(resolution)
    n = len(z)
    if method == "leiden":
        graph = buckets.hash_knn_graph(z, orders, chunk_size, n_neighbors)
        labels = leiden(graph, resolution, seed)
        used = resolution
        # too fine: fewer than two communities reach the minimum size although there are many; lower the
        # resolution (halving) until two do, instead of silently falling back to the two largest fragments
        while len(np.flatnonzero(np.bincount(labels) >= min_size_for(n))) < 2 and labels.max() + 1 > 2 and used > 1e-3:
            used /= 2
            labels = leiden(graph, used, seed)
        if used != resolution:
            warnings.warn(f"resolution={resolution:g} split the {n} cells into communities smaller than "
                          f"{min_size_for(n)} cells; used resolution {used:g} instead", UserWarning, stacklevel=2)
        labels = merge_small(z, labels, significant(labels))
    elif method == "silhouette":
        labels = silhouette_kmeans(z, seed=seed, max_clusters=max_clusters or 30)
    else:
        raise ParameterError(f"method must be one of {METHODS}, got {method!r}")
    if max_clusters is not None and labels.max() + 1 > max_clusters:
        labels = KMeans(max_clusters, n_init=3, random_state=seed).fit_predict(z)
    if labels.max() + 1 < 2 and n >= 2:  # one community: nothing to cluster, still give two clusters
        labels = KMeans(2, n_init=3, random_state=seed).fit_predict(z)
    return int(labels.max() + 1), labels.astype(np.int64)


def silhouette_kmeans(z: np.ndarray, *, seed: int = 0, min_clusters: int = 2, max_clusters: int = 30,
                      subsample: int = 3000) -> np.ndarray:
    """k-means on a subsample of ``z`` for K in [min, max]; the K of the best silhouette, fitted on every cell."""

    rng = np.random.default_rng(seed)
    sub = z[rng.choice(len(z), min(subsample, len(z)), replace=False)]
    best_k, best_s = min_clusters, -np.inf
    for k in range(min_clusters, min(max_clusters, len(sub) - 1) + 1):
        lab = KMeans(k, n_init=3, random_state=seed).fit_predict(sub)
        s = silhouette_score(sub, lab)
        if s > best_s:
            best_k, best_s = k, s
    return KMeans(best_k, n_init=3, random_state=seed).fit_predict(z).astype(np.int64)


def leiden_with_k(graph, n_clusters: int, seed: int, max_iter: int = 30) -> np.ndarray:
    """:func:`leiden` on ``graph`` at the resolution that gives ``n_clusters``, found by bisection (the closest K
    reached if none gives it exactly)."""
    g = as_igraph(graph)
    lo, hi, resolution = 0.0, None, 1.0
    best = None
    for _ in range(max_iter):
        labels = leiden(g, resolution, seed)
        k = labels.max() + 1
        if best is None or abs(k - n_clusters) < abs(best.max() + 1 - n_clusters):
            best = labels
        if k == n_clusters:
            break
        if k < n_clusters:
            lo = resolution
            resolution = resolution * 2 if hi is None else (lo + hi) / 2
        else:
            hi = resolution
            resolution = (lo + hi) / 2
    return best


def knn_graph(z: np.ndarray, n_neighbors: int = 15):
    """Exact kNN graph of ``z`` (cells, d): (cells, cells) CSR, symmetric (union), 0/1 weights.

    A global search (scikit-learn), used on the training cells only (at most ``train_cells``); the
    hash graph (:func:`schashformer.buckets.hash_knn_graph`) is too local to partition types that differ
    on a few genes (docs/METHOD_CHOICES.md, "Unequal type sizes")."""
    k = min(n_neighbors, len(z) - 1)
    nbrs = NearestNeighbors(n_neighbors=k + 1).fit(z).kneighbors(z, return_distance=False)[:, 1:]
    return buckets.neighbour_graph(nbrs)


def best_by_silhouette(z: np.ndarray, partitions: dict[str, np.ndarray], seed: int,
                       sample: int = 5000, tie: float = SILHOUETTE_TIE) -> tuple[str, dict[str, float]]:
    """The name of the partition of ``z`` with the highest silhouette (on one shared subsample of at most
    ``sample`` cells) and every candidate's silhouette; candidates with fewer than two labels are skipped.

    A later candidate replaces an earlier one only with a silhouette higher by more than the fraction ``tie``:
    list the preferred partition first, so that a tie (two partitions of one structure, whose scores differ
    by the randomness of the clustering) keeps it.
    """
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(z), sample, replace=False) if len(z) > sample else np.arange(len(z))
    scores = {name: float(silhouette_score(z[rows], labels[rows])) for name, labels in partitions.items()
              if 1 < np.unique(labels[rows]).size < len(rows)}
    best = None
    for name, score in scores.items():
        if best is None or score > scores[best] + tie * abs(scores[best]):
            best = name
    return best, scores
