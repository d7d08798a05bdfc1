"""scanpy's standard pipeline: normalize, log1p, HVG, scale, PCA, kNN, Leiden (or k-means).

Leiden at a given number of clusters is found by bisection on the resolution, reusing
one neighbour graph, so the comparison with methods that are told K is fair.
"""

from __future__ import annotations

import time
import warnings

import anndata as ad
import numpy as np
import scipy.sparse as sp
from sklearn.cluster import KMeans

from ..errors import InputError, ParameterError

RESOLUTION_RANGE = (0.01, 5.0)
MAX_LEIDEN_CALLS = 25


def _check_int(name: str, value, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ParameterError(f"{name} must be an integer {bound}, got {value!r}")
    return int(value)


def _preprocess_pca(adata: ad.AnnData, *, seed: int = 0, n_top_genes: int = 2000, n_pcs: int = 50,
                    scale: bool = True) -> tuple[ad.AnnData, dict]:
    """A new AnnData (the input is untouched) normalised, logged, HVG-subset, scaled, with ``obsm['X_pca']``.

    Returns it with ``time_preprocess`` and ``time_pca`` (seconds).
    """
    import scanpy as sc

    if adata.n_obs < 3 or adata.n_vars < 2:
        raise InputError(f"need at least 3 cells and 2 genes, got {adata.n_obs} x {adata.n_vars}")
    _check_int("n_top_genes", n_top_genes, 2)
    _check_int("n_pcs", n_pcs, 1)
    info = {}
    start = time.perf_counter()
    X = adata.X
    X = sp.csr_matrix(X, dtype=np.float32, copy=True) if sp.issparse(X) else np.array(X, dtype=np.float32, copy=True)
    values = X.data if sp.issparse(X) else X
    if not np.all(np.isfinite(values)):
        raise InputError("adata.X holds non-finite values; raw counts expected")
    if values.size and values.min() < 0:
        raise InputError(f"adata.X holds negative values (min {values.min():g}); raw counts expected")
    a = ad.AnnData(X)
    a.obs_names, a.var_names = adata.obs_names.copy(), adata.var_names.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.normalize_total(a, target_sum=1e4)
        sc.pp.log1p(a)
        sc.pp.highly_variable_genes(a, n_top_genes=min(n_top_genes, a.n_vars), flavor="seurat", subset=True)
        if scale:
            sc.pp.scale(a, max_value=10)
    info["time_preprocess"] = time.perf_counter() - start
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.pca(a, n_comps=min(n_pcs, a.n_vars - 1, a.n_obs - 1), random_state=seed)
    info["time_pca"] = time.perf_counter() - start
    return a, info


def pca_embedding(adata: ad.AnnData, *, seed: int = 0, n_top_genes: int = 2000, n_pcs: int = 50) -> np.ndarray:
    """(cells, n_pcs) scanpy PCA of raw counts: normalise, log1p, HVG (seurat), scale, PCA; input untouched."""
    return _preprocess_pca(adata, seed=seed, n_top_genes=n_top_genes, n_pcs=n_pcs)[0].obsm["X_pca"]


def _leiden(a: ad.AnnData, resolution: float, seed: int) -> np.ndarray:
    import scanpy as sc

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            sc.tl.leiden(a, resolution=resolution, random_state=seed, flavor="igraph", n_iterations=2,
                         directed=False, key_added="_leiden")
        except (TypeError, ValueError):  # older scanpy without the igraph flavour
            sc.tl.leiden(a, resolution=resolution, random_state=seed, key_added="_leiden")
    return a.obs["_leiden"].astype(int).to_numpy()


def scanpy_leiden(adata: ad.AnnData, n_clusters: int | None = None, *, resolution: float = 1.0, seed: int = 0,
                  n_top_genes: int = 2000, n_pcs: int = 50, n_neighbors: int = 15, scale: bool = True):
    """Labels and info from scanpy's pipeline; with ``n_clusters``, the resolution giving that many clusters.

    ``adata.X`` must hold raw counts (sparse or dense); it is not modified. With ``n_clusters`` the
    resolution is bisected in [0.01, 5] (at most 25 Leiden runs on one graph); if exactly K is never
    reached the resolution whose cluster count is closest is kept, the larger one on a tie.

    Returns (labels (cells,) int, info dict: resolution, n_clusters_found, time_preprocess, time_pca,
    time_neighbors, time_leiden, n_leiden_calls).
    """
    if n_clusters is not None:
        _check_int("n_clusters", n_clusters, 1, adata.n_obs)
    if not np.isfinite(resolution) or resolution <= 0:
        raise ParameterError(f"resolution must be > 0, got {resolution!r}")
    a, info = neighbour_graph(adata, seed=seed, n_top_genes=n_top_genes, n_pcs=n_pcs, n_neighbors=n_neighbors,
                              scale=scale)
    start = time.perf_counter()
    labels, resolution, calls = leiden_on_graph(a, n_clusters, resolution=resolution, seed=seed)
    info.update(time_leiden=time.perf_counter() - start, resolution=float(resolution),
                n_clusters_found=int(labels.max() + 1), n_leiden_calls=calls)
    return labels, info


def neighbour_graph(adata: ad.AnnData, *, seed: int = 0, n_top_genes: int = 2000, n_pcs: int = 50,
                    n_neighbors: int = 15, scale: bool = True) -> tuple[ad.AnnData, dict]:
    """A new AnnData with scanpy's kNN graph on the PCA of ``adata``'s raw counts (input untouched),
    ready for :func:`leiden_on_graph`; several Leiden runs can share it. Returns it and
    info (time_preprocess, time_pca, time_neighbors in seconds)."""
    import scanpy as sc

    _check_int("n_neighbors", n_neighbors, 2)
    a, info = _preprocess_pca(adata, seed=seed, n_top_genes=n_top_genes, n_pcs=n_pcs, scale=scale)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.neighbors(a, n_neighbors=min(n_neighbors, a.n_obs - 1), random_state=seed)
    info["time_neighbors"] = time.perf_counter() - start
    return a, info


def leiden_on_graph(a: ad.AnnData, n_clusters: int | None = None, *, resolution: float = 1.0, seed: int = 0):
    """Leiden on the neighbour graph already in ``a`` (``sc.pp.neighbors``), at ``resolution`` or,
    with ``n_clusters``, at the resolution giving that many clusters (bisection in [0.01, 5], at most
    25 Leiden runs; if K is never hit, the closest count wins, the larger resolution on a tie).

    Returns (labels (cells,) int, resolution used, number of Leiden runs).
    """
    labels = _leiden(a, resolution, seed)
    calls = 1
    if n_clusters is not None:
        lo, hi = RESOLUTION_RANGE
        if not lo <= resolution <= hi:
            resolution = 1.0
            labels = _leiden(a, resolution, seed)
            calls += 1
        best = (abs(labels.max() + 1 - n_clusters), -resolution, resolution, labels)
        while labels.max() + 1 != n_clusters and calls < MAX_LEIDEN_CALLS:
            if labels.max() + 1 < n_clusters:
                lo = resolution
            else:
                hi = resolution
            resolution = (lo + hi) / 2
            labels = _leiden(a, resolution, seed)
            calls += 1
            candidate = (abs(labels.max() + 1 - n_clusters), -resolution, resolution, labels)
            if candidate[:2] < best[:2]:
                best = candidate
        _, _, resolution, labels = best
    return labels, resolution, calls


def pca_kmeans(adata: ad.AnnData, n_clusters: int, *, seed: int = 0, n_top_genes: int = 2000, n_pcs: int = 50):
    """k-means (10 starts) with K clusters on scanpy's principal components; returns (labels, info).

    info holds time_preprocess, time_pca and time_kmeans (seconds).
    """
    _check_int("n_clusters", n_clusters, 1, adata.n_obs)
    a, info = _preprocess_pca(adata, seed=seed, n_top_genes=n_top_genes, n_pcs=n_pcs, scale=True)
    start = time.perf_counter()
    labels = KMeans(n_clusters, n_init=10, random_state=seed).fit_predict(a.obsm["X_pca"])
    info["time_kmeans"] = time.perf_counter() - start
    return labels.astype(np.int64), info
