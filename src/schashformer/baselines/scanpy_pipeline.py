"""scanpy's standard pipeline: normalize, log1p, HVG, scale, PCA, kNN, Leiden (or k-means).

Leiden at a given number of clusters is found by bisection on the resolution, reusing
one neighbour graph, so the comparison with methods that are told K is fair.
"""

from __future__ import annotations

import time
import warnings

import anndata as ad
import numpy as np


def _preprocess_pca(adata: ad.AnnData, *, seed: int, n_top_genes: int, n_pcs: int, scale: bool) -> tuple[ad.AnnData, dict]:
    import scanpy as sc

    info = {}
    start = time.perf_counter()
    a = ad.AnnData(adata.X.copy())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.pp.normalize_total(a, target_sum=1e4)
        sc.pp.log1p(a)
        sc.pp.highly_variable_genes(a, n_top_genes=min(n_top_genes, a.n_vars), flavor="seurat", subset=True)
        if scale:
            sc.pp.scale(a, max_value=10)
    info["time_preprocess"] = time.perf_counter() - start
    start = time.perf_counter()
    sc.pp.pca(a, n_comps=min(n_pcs, a.n_vars - 1, a.n_obs - 1), random_state=seed)
    info["time_pca"] = time.perf_counter() - start
    return a, info


def _leiden(a: ad.AnnData, resolution: float, seed: int) -> np.ndarray:
    import scanpy as sc

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sc.tl.leiden(a, resolution=resolution, random_state=seed, flavor="igraph", n_iterations=2, directed=False,
                     key_added="_leiden")
    return a.obs["_leiden"].astype(int).to_numpy()


def scanpy_leiden(adata: ad.AnnData, n_clusters: int | None = None, *, resolution: float = 1.0, seed: int = 0,
                  n_top_genes: int = 2000, n_pcs: int = 50, n_neighbors: int = 15, scale: bool = True):
    """Labels and info from scanpy's pipeline; with ``n_clusters``, the resolution giving that many clusters.

    Returns (labels (cells,), info dict with the resolution, clusters found and time per step).
    """
    import scanpy as sc

    a, info = _preprocess_pca(adata, seed=seed, n_top_genes=n_top_genes, n_pcs=n_pcs, scale=scale)
    start = time.perf_counter()
    sc.pp.neighbors(a, n_neighbors=n_neighbors, random_state=seed)
    info["time_neighbors"] = time.perf_counter() - start
    start = time.perf_counter()
    labels = _leiden(a, resolution, seed)
    if n_clusters is not None:
        lo, hi, best = 0.01, 5.0, (abs(labels.max() + 1 - n_clusters), resolution, labels)
        for _ in range(25):
            k = labels.max() + 1
            if k == n_clusters:
                break
            lo, hi = (resolution, hi) if k < n_clusters else (lo, resolution)
            resolution = (lo + hi) / 2
            labels = _leiden(a, resolution, seed)
            gap = abs(labels.max() + 1 - n_clusters)
            if gap < best[0] or (gap == best[0] and resolution > best[1]):
                best = (gap, resolution, labels)
        _, resolution, labels = best
    info.update(time_leiden=time.perf_counter() - start, resolution=resolution, n_clusters_found=int(labels.max() + 1))
    return labels, info


def pca_kmeans(adata: ad.AnnData, n_clusters: int, *, seed: int = 0, n_top_genes: int = 2000, n_pcs: int = 50):
    """k-means with K clusters on scanpy's 50 principal components; returns (labels, info)."""
    from sklearn.cluster import KMeans

    a, info = _preprocess_pca(adata, seed=seed, n_top_genes=n_top_genes, n_pcs=n_pcs, scale=True)
    start = time.perf_counter()
    labels = KMeans(n_clusters, n_init=10, random_state=seed).fit_predict(a.obsm["X_pca"])
    info["time_kmeans"] = time.perf_counter() - start
    return labels, info
