"""Counts -> model inputs, sparse end to end.

scanpy conventions: normalize_total(1e4) -> log1p -> highly variable genes (seurat
flavour) -> per-gene standardisation clipped at +-10. The standardisation is *not*
applied to the stored matrix (that would densify it): we keep the sparse log-normalised
matrix plus per-gene mean/std, and :mod:`schashformer.data` standardises one minibatch
at a time. Raw counts of the selected genes and per-cell size factors are kept for the
ZINB likelihood.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .errors import InputError, ParameterError

TARGET_SUM = 1e4
CLIP = 10.0


@dataclass
class GeneStats:
    """What a trained model needs to prepare new cells exactly as it prepared its training cells."""

    genes: np.ndarray  # (genes,) selected gene names
    mean: np.ndarray  # (genes,) mean of log-normalised expression
    std: np.ndarray  # (genes,) its standard deviation (1 where constant)
    median_library: float  # median counts of the selected genes per cell; size factor denominator

    def to_dict(self) -> dict:
        return {"genes": self.genes.astype(str), "mean": self.mean, "std": self.std,
                "median_library": float(self.median_library)}

    @classmethod
    def from_dict(cls, d: dict) -> "GeneStats":
        return cls(np.asarray(d["genes"]).astype(str), np.asarray(d["mean"], np.float32),
                   np.asarray(d["std"], np.float32), float(d["median_library"]))


@dataclass
class Prepared:
    """Model-ready data for the kept cells (cells x selected genes)."""

    counts: sp.csr_matrix  # raw counts, float32
    logn: sp.csr_matrix  # log1p(counts / total * 1e4), float32
    size_factors: np.ndarray  # (cells,) float32
    stats: GeneStats
    cell_mask: np.ndarray  # (input cells,) bool: which input cells were kept

    @property
    def n_cells(self) -> int:
        return self.counts.shape[0]

    @property
    def n_genes(self) -> int:
        return self.counts.shape[1]

    def standardised(self, rows) -> np.ndarray:
        """Dense standardised expression of ``rows``: (len(rows), genes) float32."""
        x = self.logn[rows].toarray()
        x -= self.stats.mean
        x /= self.stats.std
        return np.clip(x, -CLIP, CLIP, out=x)


def count_matrix(adata: ad.AnnData, layer: str | None = None) -> sp.csr_matrix:
    """The (cells x genes) matrix of ``adata`` (or one of its layers) as CSR float32."""
    if layer is not None and layer not in adata.layers:
        raise InputError(f"layer {layer!r} not found; available layers: {list(adata.layers)}")
    x = adata.X if layer is None else adata.layers[layer]
    if x is None:
        raise InputError("adata.X is empty (None); pass layer= to use a layer of counts")
    if not sp.issparse(x):
        x = sp.csr_matrix(np.asarray(x))
    return sp.csr_matrix(x, dtype=np.float32)


def validate_counts(x: sp.csr_matrix, allow_noncounts: bool = False, where: str = "adata.X") -> None:
    """Reject empty, non-finite, negative and (unless allowed) non-integer matrices."""
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise InputError(f"{where} is empty: {x.shape[0]} cells x {x.shape[1]} genes")
    data = x.data
    n_bad = int(np.count_nonzero(~np.isfinite(data)))
    if n_bad:
        raise InputError(f"{where} has {n_bad} NaN/inf values; expected raw counts")
    n_neg = int(np.count_nonzero(data < 0))
    if n_neg:
        raise InputError(f"{where} has {n_neg} negative values (min {data.min():g}); expected raw counts")
    if not allow_noncounts:
        frac = np.abs(data - np.round(data))
        n_frac = int(np.count_nonzero(frac > 1e-3))
        if n_frac:
            raise InputError(
                f"{where} has {n_frac} non-integer values (e.g. {data[frac > 1e-3][0]:g}); the ZINB loss needs raw "
                "counts. Pass the counts layer (layer=...) or allow_noncounts=True (--allow-noncounts) for "
                "pre-normalised input"
            )


def prepare(adata: ad.AnnData, *, n_top_genes: int = 2000, layer: str | None = None,
            allow_noncounts: bool = False, stats: GeneStats | None = None) -> Prepared:
    """Prepare raw counts for training (``stats=None``) or for a trained model (``stats`` given).

    Parameters
    ----------
    adata : AnnData with raw counts in ``.X`` (or ``layer``), cells x genes.
    n_top_genes : number of highly variable genes to keep (all genes if fewer).
    layer : layer holding the counts instead of ``.X``.
    allow_noncounts : accept non-integer (pre-normalised) values.
    stats : gene statistics of a trained model; its genes are selected (missing ones are
        zero-filled with a warning) and its mean/std reused.

    Returns
    -------
    Prepared with cells of zero total counts removed (see ``cell_mask``).
    """
    if n_top_genes < 1:
        raise ParameterError(f"n_top_genes must be >= 1, got {n_top_genes}")
    x = count_matrix(adata, layer)
    validate_counts(x, allow_noncounts, where="adata.X" if layer is None else f"adata.layers[{layer!r}]")

    total = np.asarray(x.sum(1)).ravel()
    cell_mask = total > 0
    if not cell_mask.any():
        raise InputError(f"all {x.shape[0]} cells have zero counts; nothing to cluster")
    x, total = x[cell_mask], total[cell_mask]
    logn = _log_normalise(x, total)

    if stats is None:
        cols = _select_genes(logn, n_top_genes)
        genes = np.asarray(adata.var_names[cols]).astype(str)
        counts, logn = x[:, cols], logn[:, cols]
        mean, std = _mean_std(logn)
        median_library = float(np.median(np.asarray(counts.sum(1)).ravel()))
        if median_library <= 0:
            median_library = 1.0
        stats = GeneStats(genes, mean, std, median_library)
    else:
        counts, logn = (_align_genes(m, adata.var_names, stats.genes) for m in (x, logn))

    library = np.asarray(counts.sum(1)).ravel()
    size_factors = np.maximum(library / stats.median_library, 1e-3).astype(np.float32)
    return Prepared(sp.csr_matrix(counts), sp.csr_matrix(logn), size_factors, stats, cell_mask)


def _log_normalise(x: sp.csr_matrix, total: np.ndarray) -> sp.csr_matrix:
    scale = (TARGET_SUM / total).astype(np.float32)
    out = sp.csr_matrix(sp.diags(scale) @ x, dtype=np.float32)
    np.log1p(out.data, out=out.data)
    return out


def _mean_std(x: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    n = x.shape[0]
    mean = np.asarray(x.mean(0)).ravel()
    sq = np.asarray(x.multiply(x).mean(0)).ravel()
    var = np.maximum(sq - mean**2, 0.0) * n / max(n - 1, 1)
    std = np.sqrt(var)
    std[std == 0] = 1.0
    return mean.astype(np.float32), std.astype(np.float32)


def _select_genes(logn: sp.csr_matrix, n_top_genes: int) -> np.ndarray:
    """Column indices of the highly variable genes among genes detected in >= 1 cell."""
    detected = np.flatnonzero(np.diff(logn.tocsc().indptr) > 0)
    if detected.size == 0:
        raise InputError("no gene has a non-zero count in the kept cells; nothing to cluster")
    if detected.size <= n_top_genes:
        return detected
    import scanpy as sc

    sub = ad.AnnData(logn[:, detected])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hvg = sc.pp.highly_variable_genes(sub, n_top_genes=n_top_genes, flavor="seurat", inplace=False)
    return detected[np.asarray(hvg["highly_variable"], bool)]


def _align_genes(x: sp.csr_matrix, var_names: pd.Index, genes: np.ndarray) -> sp.csr_matrix:
    """Columns of ``x`` in the order of ``genes``; genes absent from ``var_names`` become zeros."""
    pos = pd.Index(np.asarray(var_names).astype(str)).get_indexer(genes)
    missing = int((pos < 0).sum())
    if missing == len(genes):
        raise InputError(f"none of the model's {len(genes)} genes are in the input's var_names "
                         f"(e.g. model gene {genes[0]!r}, input gene {var_names[0]!r})")
    if missing:
        warnings.warn(f"{missing} of the model's {len(genes)} genes are missing from the input; "
                      "they are filled with zeros", stacklevel=3)
    present = np.flatnonzero(pos >= 0)
    # Scatter the present columns into their model positions with a sparse 0/1 matrix.
    scatter = sp.csr_matrix((np.ones(present.size, np.float32), (np.arange(present.size), present)),
                            shape=(present.size, len(genes)))
    return sp.csr_matrix(x[:, pos[present]] @ scatter, dtype=np.float32)
