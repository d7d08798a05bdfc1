"""Technical batch effects added to real counts: pseudo-batches with known cell types.

A labeled data set is split at random into ``n_batches`` pseudo-batches, and each batch gets
the kinds of technical shift seen between real runs (Tran et al. 2020; Luecken et al. 2022):

* capture efficiency: every count is binomially thinned with a per-batch keep probability
  (the batch's library sizes shrink, and its counts are resampled, not just rescaled);
* gene-specific efficiency: a log-normal multiplicative factor per (batch, gene), applied by
  thinning, so a gene's detection rate changes between batches as with a different chemistry;
* extra dropout: a per-batch fraction of the remaining nonzero entries set to zero.

Counts stay integers and only ever go down, so the result is a valid count matrix. Cell types
are untouched, so mixing and biology can both be scored against the truth.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import InputError, ParameterError


def add_batch_effects(adata: ad.AnnData, n_batches: int = 3, *, capture: tuple[float, ...] | None = None,
                      gene_sd: float = 0.5, dropout: tuple[float, ...] | None = None, batch_key: str = "batch",
                      seed: int = 0) -> ad.AnnData:
    """A copy of ``adata`` (raw counts) split into ``n_batches`` pseudo-batches with technical shifts.

    Parameters
    ----------
    adata : AnnData with integer counts in ``.X`` (cells x genes).
    n_batches : number of pseudo-batches (cells assigned uniformly at random).
    capture : per-batch probability of keeping each molecule (default 1.0, 0.6, 0.35, ... for
        batch 0, 1, 2, ...: library sizes differ up to ~3-fold, as between runs of one protocol).
    gene_sd : sd of the log-normal per (batch, gene) efficiency factor; factors are divided by
        their maximum over genes and batches' geometric mean is kept, so they act as thinning.
    dropout : per-batch fraction of nonzero entries additionally zeroed (default 0, 0.1, 0.2, ...).
    batch_key : ``obs`` column written with the batch of each cell (``batch0``, ``batch1``, ...).
    seed : random seed.

    Returns
    -------
    New AnnData (CSR float32 counts) with ``obs[batch_key]`` and ``uns["batch_effects"]`` (the
    parameters used, and the per-batch median library size).
    """
    if n_batches < 2:
        raise ParameterError(f"n_batches must be >= 2, got {n_batches}")
    if batch_key in adata.obs:
        raise InputError(f"obs already has a column {batch_key!r}; pass another batch_key")
    capture = tuple(capture) if capture is not None else tuple(float(c) for c in np.geomspace(1.0, 0.35, n_batches))
    dropout = tuple(dropout) if dropout is not None else tuple(0.1 * b for b in range(n_batches))
    if len(capture) != n_batches or len(dropout) != n_batches:
        raise ParameterError(f"capture and dropout need {n_batches} values each, got {len(capture)} and {len(dropout)}")
    if not all(0 < c <= 1 for c in capture) or not all(0 <= d < 1 for d in dropout):
        raise ParameterError(f"capture must be in (0, 1] and dropout in [0, 1); got {capture}, {dropout}")
    x = sp.csr_matrix(adata.X, dtype=np.float64, copy=True)
    if x.data.size and (np.any(x.data < 0) or not np.allclose(x.data, np.round(x.data))):
        raise InputError("add_batch_effects needs raw integer counts in .X")
    rng = np.random.default_rng(seed)
    batch = rng.integers(n_batches, size=adata.n_obs)
    log_eff = rng.normal(0.0, gene_sd, (n_batches, adata.n_vars))
    log_eff -= log_eff.max(1, keepdims=True)  # each batch's best gene keeps every molecule
    log_eff -= log_eff.mean(1, keepdims=True) - log_eff.mean()  # same mean effect in each batch ...
    eff = np.exp(log_eff - log_eff.max())  # ... and all factors <= 1, so they can be applied by thinning

    rows = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))
    b = batch[rows]
    keep_p = np.asarray(capture)[b] * eff[b, x.indices]
    data = rng.binomial(np.round(x.data).astype(np.int64), keep_p).astype(np.float64)
    data[rng.uniform(size=data.size) < np.asarray(dropout)[b]] = 0.0
    x.data = data
    x.eliminate_zeros()

    out = ad.AnnData(x.astype(np.float32), obs=adata.obs.copy(), var=adata.var.copy())
    names = [f"batch{i}" for i in range(n_batches)]
    out.obs[batch_key] = pd.Categorical([names[i] for i in batch], categories=names)
    libs = np.asarray(x.sum(1)).ravel()
    out.uns["batch_effects"] = {"n_batches": n_batches, "capture": list(capture), "gene_sd": gene_sd,
                                "dropout": list(dropout), "seed": seed,
                                "median_library": {n: float(np.median(libs[batch == i])) for i, n in enumerate(names)}}
    return out
