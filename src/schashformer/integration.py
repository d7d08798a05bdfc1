"""Batch integration scores: batch mixing and conservation of biology on an embedding.

Both sides are scored so that under-mixing (batches stay apart) and over-mixing (cell types
merged to hide batches) both show:

* mixing: iLISI (graph-based inverse Simpson index of batches, Korsunsky et al. 2019, scaled
  to [0, 1] as in scib: 0 = one batch per neighbourhood, 1 = batches as mixed as possible),
  kBET acceptance rate (Büttner et al. 2019, per cell type as in scib) and batch ASW
  (scib: 1 - |silhouette on batch| within each cell type, averaged);
* biology: cell-type ASW (scib: (silhouette on labels + 1) / 2), cLISI (scib: 1 = one cell
  type per neighbourhood) and ARI / NMI of clusters against cell types.

Definitions follow scib (Luecken et al. 2022, "Benchmarking atlas-level data integration in
single-cell genomics", Nat. Methods 19:41); scib itself is not a dependency. Every score here
needs a kNN search or silhouettes on the cells given: for very large data, score a subsample.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.metrics import (
    adjusted_rand_score,
    normalized_mutual_info_score,
    silhouette_samples,
    silhouette_score,
)
from sklearn.neighbors import NearestNeighbors

from .errors import InputError, ParameterError


def _codes(values, what: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    s = pd.Series(np.asarray(values, dtype=object).ravel())
    if len(s) != n:
        raise ParameterError(f"{what} has {len(s)} entries but the embedding has {n} cells")
    if s.isna().any():
        raise InputError(f"{what} has {int(s.isna().sum())} missing values")
    cats = pd.Categorical(s.astype(str))
    return cats.codes.astype(np.int64), np.asarray(cats.categories)


def _knn(x: np.ndarray, k: int) -> np.ndarray:
    """Indices (cells, k) of each cell's k nearest other cells (Euclidean)."""
    k = min(k, len(x) - 1)
    idx = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x, return_distance=True)
    dist, ind = idx
    return dist[:, 1:], ind[:, 1:]


def _simpson(dist: np.ndarray, ind: np.ndarray, codes: np.ndarray, n_cats: int, perplexity: float) -> np.ndarray:
    """Inverse Simpson index per cell of ``codes`` among its neighbours, Gaussian-weighted to ``perplexity``.

    Harmony's ``compute_lisi``: the kernel width of each cell is bisected (vectorised over cells)
    so that the entropy of its neighbour weights equals log(perplexity).
    """
    target = np.log(perplexity)
    d2 = dist**2
    beta = np.ones(len(d2))
    lo, hi = np.zeros(len(d2)), np.full(len(d2), np.inf)
    for _ in range(50):
        w = np.exp(-(d2 - d2[:, :1]) * beta[:, None])
        p = w / w.sum(1, keepdims=True)
        entropy = -(p * np.log(np.clip(p, 1e-300, None))).sum(1)
        too_flat = entropy > target  # too many effective neighbours: sharpen
        lo = np.where(too_flat, beta, lo)
        hi = np.where(too_flat, hi, beta)
        beta = np.where(np.isinf(hi), beta * 2, (lo + hi) / 2)
        if np.all(np.abs(entropy - target) < 1e-5):
            break
    neighbour_codes = codes[ind]
    frac = np.stack([(p * (neighbour_codes == c)).sum(1) for c in range(n_cats)], axis=1)  # no (cells, k, cats)
    return 1.0 / (frac**2).sum(1)


def lisi(embedding: np.ndarray, values, *, n_neighbors: int = 90, perplexity: float = 30.0) -> np.ndarray:
    """Local inverse Simpson index (cells,) of ``values`` (batches or labels) on the embedding's kNN graph.

    Between 1 (every neighbour shares one value) and the number of distinct values.
    """
    x = np.asarray(embedding, dtype=np.float64)
    codes, cats = _codes(values, "values", len(x))
    dist, ind = _knn(x, n_neighbors)
    return _simpson(dist, ind, codes, len(cats), min(perplexity, ind.shape[1] / 3))


def ilisi(embedding, batches, **kwargs) -> float:
    """Median iLISI scaled to [0, 1] (scib): (median - 1) / (batches - 1); 1 = fully mixed."""
    n_batches = pd.Series(np.asarray(batches, dtype=object)).nunique()
    if n_batches < 2:
        raise InputError("iLISI needs at least 2 batches")
    return float((np.median(lisi(embedding, batches, **kwargs)) - 1) / (n_batches - 1))


def clisi(embedding, labels, **kwargs) -> float:
    """Median cLISI scaled to [0, 1] (scib): (labels - median) / (labels - 1); 1 = types kept apart."""
    n_labels = pd.Series(np.asarray(labels, dtype=object)).nunique()
    if n_labels < 2:
        raise InputError("cLISI needs at least 2 cell types")
    return float((n_labels - np.median(lisi(embedding, labels, **kwargs))) / (n_labels - 1))


def kbet_acceptance(embedding, batches, labels=None, *, n_neighbors: int = 25, alpha: float = 0.05,
                    min_cells: int = 10) -> float:
    """kBET acceptance rate: fraction of cells whose neighbourhood batch counts pass a chi-square test.

    Each cell's ``n_neighbors`` nearest cells (itself included) are tested against the batch
    frequencies expected; the rate is the fraction with p >= ``alpha`` (1 = well mixed). With
    ``labels`` the test runs within each cell type on that type's cells and against that type's
    batch frequencies (scib), so unequal cell-type composition between batches is not counted
    as poor mixing; types with fewer than ``min_cells`` cells or a single batch are skipped and
    the rate is the mean over the remaining types. NaN when no type can be scored.
    """
    x = np.asarray(embedding, dtype=np.float64)
    b, bcats = _codes(batches, "batches", len(x))
    groups = [np.arange(len(x))] if labels is None else \
        [np.flatnonzero(lab == c) for lab, cats in [_codes(labels, "labels", len(x))] for c in range(len(cats))]
    rates = []
    for rows in groups:
        present = np.unique(b[rows])
        if len(rows) < min_cells or len(present) < 2:
            continue
        k = min(n_neighbors, len(rows))
        _, ind = NearestNeighbors(n_neighbors=k).fit(x[rows]).kneighbors(x[rows])
        local = b[rows][ind]  # (cells, k) batch codes, the cell itself included as in kBET
        observed = np.stack([(local == c).sum(1) for c in present], axis=1)
        expected = np.bincount(b[rows], minlength=len(bcats))[present] / len(rows) * k
        chi2 = ((observed - expected) ** 2 / expected).sum(1)
        p = stats.chi2.sf(chi2, df=len(present) - 1)
        rates.append(float((p >= alpha).mean()))
    return float(np.mean(rates)) if rates else float("nan")


def batch_asw(embedding, batches, labels) -> float:
    """scib's batch ASW: per cell type, mean of 1 - |silhouette of the cell on batch|; then mean over types.

    1 = batches indistinguishable within every type, 0 = batches separated. Types in one batch
    only are skipped.
    """
    x = np.asarray(embedding, dtype=np.float64)
    b, _ = _codes(batches, "batches", len(x))
    lab, cats = _codes(labels, "labels", len(x))
    scores = []
    for c in range(len(cats)):
        rows = np.flatnonzero(lab == c)
        if len(np.unique(b[rows])) < 2 or len(rows) <= len(np.unique(b[rows])):
            continue
        scores.append(float(np.mean(1 - np.abs(silhouette_samples(x[rows], b[rows])))))
    return float(np.mean(scores)) if scores else float("nan")


def label_asw(embedding, labels) -> float:
    """Cell-type ASW scaled to [0, 1] (scib): (silhouette on labels + 1) / 2; 1 = compact, separate types."""
    x = np.asarray(embedding, dtype=np.float64)
    lab, cats = _codes(labels, "labels", len(x))
    if len(cats) < 2:
        raise InputError("cell-type ASW needs at least 2 cell types")
    return float((silhouette_score(x, lab) + 1) / 2)


def integration_scores(embedding, batches, labels, clusters=None, *, n_neighbors: int = 90,
                       kbet_neighbors: int = 25) -> dict:
    """All mixing and biology scores of one embedding (cells, dims), as a flat dict.

    Parameters
    ----------
    embedding : (cells, dims) array.
    batches : (cells,) batch of each cell.
    labels : (cells,) known cell type of each cell.
    clusters : (cells,) cluster of each cell, for ARI / NMI against ``labels`` (optional).
    n_neighbors : neighbourhood size of iLISI / cLISI (scib: 90).
    kbet_neighbors : neighbourhood size of kBET.

    Returns
    -------
    ``ilisi``, ``kbet``, ``batch_asw`` (mixing, higher = more mixed), ``label_asw``, ``clisi``
    and, with clusters, ``ari`` / ``nmi`` (biology, higher = better kept), plus ``mixing`` and
    ``biology``, the means of each group (scib's aggregate, without weights).
    """
    x = np.asarray(embedding, dtype=np.float64)
    if x.ndim != 2 or not np.isfinite(x).all():
        raise InputError(f"the embedding must be a finite (cells, dims) array, got shape {x.shape}")
    out = {
        "ilisi": ilisi(x, batches, n_neighbors=n_neighbors),
        "kbet": kbet_acceptance(x, batches, labels, n_neighbors=kbet_neighbors),
        "batch_asw": batch_asw(x, batches, labels),
        "label_asw": label_asw(x, labels),
        "clisi": clisi(x, labels, n_neighbors=n_neighbors),
    }
    if clusters is not None:
        lab, _ = _codes(labels, "labels", len(x))
        cl, _ = _codes(clusters, "clusters", len(x))
        out["ari"] = float(adjusted_rand_score(lab, cl))
        out["nmi"] = float(normalized_mutual_info_score(lab, cl))
    out["mixing"] = float(np.nanmean([out["ilisi"], out["kbet"], out["batch_asw"]]))
    out["biology"] = float(np.nanmean([out[k] for k in ("label_asw", "clisi", "ari", "nmi") if k in out]))
    return out


def align_batches(embedding: np.ndarray, batches, clusters, *, shrinkage: float = 10.0) -> np.ndarray:
    """Remove each batch's offset within each cluster: z_i - w (mean of i's batch in i's cluster - cluster mean).

    The correction step of Harmony (Korsunsky et al. 2019) with the clusters given (hard, e.g.
    scHashFormer's own) instead of Harmony's soft, batch-diverse ones, in one pass. Offsets are
    estimated inside each cluster, so batches with different cell-type composition are not
    pulled onto each other (a global per-batch centring was tried and did that: see
    docs/METHOD_CHOICES.md, "Batches"), and a cluster found in one batch only is left as it is:
    clusters are never merged, the correction only aligns batches within a cluster. The
    weight w = n / (n + ``shrinkage``), n the cells of that batch in that cluster, keeps offsets
    of a handful of cells from moving them much. Linear time, no neighbour search.

    Parameters
    ----------
    embedding : (cells, dims) array.
    batches, clusters : (cells,) batch and cluster of each cell (missing clusters: left uncorrected).

    Returns
    -------
    (cells, dims) float32 corrected embedding.
    """
    x = np.asarray(embedding, dtype=np.float64)
    b, _ = _codes(batches, "batches", len(x))
    cl = pd.Series(np.asarray(clusters, dtype=object).ravel())
    if len(cl) != len(x):
        raise ParameterError(f"clusters has {len(cl)} entries but the embedding has {len(x)} cells")
    out = x.copy()
    for c in pd.unique(cl.dropna()):
        rows = np.flatnonzero((cl == c).to_numpy())
        centre = x[rows].mean(0)
        for batch in np.unique(b[rows]):
            sub = rows[b[rows] == batch]
            weight = len(sub) / (len(sub) + shrinkage)
            out[sub] -= weight * (x[sub].mean(0) - centre)
    return out.astype(np.float32)


def integrate(adata, batch_key: str, *, key: str = "schashformer", shrinkage: float = 10.0,
              key_added: str | None = None, overwrite: bool = False) -> None:
    """Align batches within each cluster of a clustering in ``adata`` (scanpy-style; :func:`align_batches`).

    Parameters
    ----------
    adata : AnnData clustered by :func:`schashformer.tl.cluster` (ideally with ``batch_key``, so the
        ZINB decoders already explain count differences between batches).
    batch_key : ``obs`` column of batches.
    key : the clustering: embedding ``obsm[f"X_{key}"]``, clusters ``obs[key]``.
    shrinkage : cells-equivalent prior that shrinks the offset of small (batch, cluster) groups.
    key_added : name of the result (default ``f"{key}_integrated"``).
    overwrite : replace an embedding already stored there.

    Writes ``obsm[f"X_{key_added}"]`` (cells, dims): the batch-aligned embedding (clusters unchanged),
    and ``obs[key_added]``, a copy of the clusters, so ``key=key_added`` works in the other tools.
    """
    key_added = key_added or f"{key}_integrated"
    rep = f"X_{key}"
    if rep not in adata.obsm or key not in adata.obs:
        raise InputError(f"obsm[{rep!r}] / obs[{key!r}] not found; run schashformer.tl.cluster first")
    if batch_key not in adata.obs:
        raise InputError(f"batch_key {batch_key!r} is not a column of adata.obs (columns: {list(adata.obs.columns)})")
    if f"X_{key_added}" in adata.obsm and not overwrite:
        raise ParameterError(f"obsm['X_{key_added}'] already holds results; pass overwrite=True or another key_added")
    adata.obsm[f"X_{key_added}"] = align_batches(adata.obsm[rep], adata.obs[batch_key].to_numpy(),
                                                 adata.obs[key].to_numpy(), shrinkage=shrinkage)
    adata.obs[key_added] = adata.obs[key].copy()


def integration(adata, batch_key: str, labels_key: str, *, key: str = "schashformer", use_rep: str | None = None,
                key_added: str | None = None, overwrite: bool = False, **kwargs) -> dict:
    """Mixing and biology scores of an embedding in ``adata`` (scanpy-style; :func:`integration_scores`).

    Parameters
    ----------
    adata : AnnData with an embedding in ``obsm``.
    batch_key : ``obs`` column of batches.
    labels_key : ``obs`` column of known cell types.
    key : the clustering: embedding ``obsm[f"X_{key}"]`` and clusters ``obs[key]`` (ARI / NMI
        are left out when that column is absent).
    use_rep : another ``obsm`` key to score instead of ``X_{key}`` (e.g. ``"X_pca"``).
    key_added : ``uns`` key written (default ``f"{key}_integration"``).
    overwrite : replace scores already stored there.
    **kwargs : passed to :func:`integration_scores` (``n_neighbors``, ``kbet_neighbors``).

    Returns the scores, also written as a dict to ``uns[key_added]``.
    """
    rep = use_rep or f"X_{key}"
    key_added = key_added or f"{key}_integration"
    if rep not in adata.obsm:
        raise InputError(f"obsm[{rep!r}] not found (obsm keys: {list(adata.obsm.keys())}); run "
                         "schashformer.tl.cluster first or pass use_rep=")
    for k, what in ((batch_key, "batch_key"), (labels_key, "labels_key")):
        if k not in adata.obs:
            raise InputError(f"{what} {k!r} is not a column of adata.obs (columns: {list(adata.obs.columns)})")
    if key_added in adata.uns and not overwrite:
        raise ParameterError(f"uns[{key_added!r}] already holds results; pass overwrite=True or another key_added")
    clusters = adata.obs[key].to_numpy() if key in adata.obs else None
    keep = ~(adata.obs[labels_key].isna().to_numpy() | adata.obs[batch_key].isna().to_numpy())
    if clusters is not None:
        keep &= ~adata.obs[key].isna().to_numpy()  # cells with zero counts have no cluster
    if keep.sum() < 3:
        raise InputError(f"fewer than 3 cells have a batch, a label{' and a cluster' if clusters is not None else ''}")
    scores = integration_scores(np.asarray(adata.obsm[rep])[keep], adata.obs[batch_key].to_numpy()[keep],
                                adata.obs[labels_key].to_numpy()[keep],
                                None if clusters is None else clusters[keep], **kwargs)
    scores["n_cells_scored"] = int(keep.sum())
    adata.uns[key_added] = dict(scores)
    return scores
