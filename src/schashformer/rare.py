"""Rare populations: how well each label, rare ones in particular, is recovered by a clustering.

Scores come from :mod:`schashformer.metrics` (``per_label_scores``, ``per_cluster_scores``); this
module reads them from an AnnData and stores them next to the clustering, scanpy style.
"""

from __future__ import annotations

import anndata as ad
import pandas as pd

from .errors import InputError, ParameterError
from .metrics import per_cluster_scores, per_label_scores
from .validate import check_adata

RARE_FRACTION = 0.02  # a label holding fewer than 2% of the labeled cells is "rare"


def rare_populations(adata: ad.AnnData, labels_key: str, *, key: str = "schashformer",
                     max_fraction: float = RARE_FRACTION, matching: str = "hungarian", key_added: str | None = None,
                     overwrite: bool = False) -> pd.DataFrame:
    """Per-label and per-cluster precision, recall and F1 of the clustering ``obs[key]`` against ``obs[labels_key]``.

    Parameters
    ----------
    adata : AnnData holding both columns (cells with a missing label or cluster are left out).
    labels_key : ``obs`` column of known cell types.
    key : ``obs`` column of clusters (by default scHashFormer's).
    max_fraction : labels with fewer than this fraction of the labeled cells are flagged ``rare``.
    matching : ``"hungarian"`` (one cluster per label, as ACC / macro F1) or ``"majority"`` (each
        cluster to its majority label; fair to methods returning more clusters than labels).
    key_added : ``uns`` key written; default ``f"{key}_populations"``.
    overwrite : replace a table already stored there.

    Returns
    -------
    Per-label DataFrame (index: label; n_cells, fraction, matched_cluster, precision, recall, f1,
    rare), rarest first.

    Writes
    ------
    ``uns[key_added]``: ``per_label`` and ``per_cluster`` (dicts of columns, index included),
    ``labels_key``, ``key``, ``max_fraction``, ``matching``, ``rare_f1_mean`` (mean F1 over rare
    labels; NaN when none is rare).
    """
    check_adata(adata)
    for what, col in (("labels_key", labels_key), ("key", key)):
        if col not in adata.obs:
            raise InputError(f"{what} {col!r} is not a column of adata.obs (columns: {list(adata.obs.columns)})")
    if not 0 < float(max_fraction) <= 1:
        raise ParameterError(f"max_fraction must be in (0, 1], got {max_fraction!r}")
    key_added = key_added or f"{key}_populations"
    if key_added in adata.uns and not overwrite:
        raise ParameterError(f"uns[{key_added!r}] already holds results; pass overwrite=True or another key_added")
    y, p = adata.obs[labels_key].to_numpy(), adata.obs[key].to_numpy()
    labels = per_label_scores(y, p, matching=matching)
    labels["rare"] = labels["fraction"] < max_fraction
    labels = labels.sort_values("n_cells", kind="stable")
    clusters = per_cluster_scores(y, p)
    rare = labels[labels["rare"]]
    adata.uns[key_added] = {
        "per_label": labels.reset_index().to_dict(orient="list"),
        "per_cluster": clusters.reset_index().to_dict(orient="list"),
        "labels_key": labels_key, "key": key, "max_fraction": float(max_fraction), "matching": matching,
        "rare_f1_mean": float(rare["f1"].mean()) if len(rare) else float("nan"),
    }
    return labels
