"""Clustering scores against known labels: ARI, NMI, ACC (Hungarian), macro F1, homogeneity, completeness."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment
from sklearn import metrics as skm

from .errors import ParameterError


def _prepare(y_true, y_pred) -> tuple[np.ndarray, np.ndarray, int]:
    y_true, y_pred = pd.Series(np.asarray(y_true, dtype=object)), pd.Series(np.asarray(y_pred, dtype=object))
    if len(y_true) != len(y_pred):
        raise ParameterError(f"labels and clusters differ in length: {len(y_true)} vs {len(y_pred)}")
    keep = ~(y_true.isna() | y_pred.isna())
    return y_true[keep].astype(str).to_numpy(), y_pred[keep].astype(str).to_numpy(), int((~keep).sum())


def _matching(t: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    """Contingency table (labels x clusters) and the Hungarian cluster -> label map."""
    labels, ti = np.unique(t, return_inverse=True)
    clusters, pi = np.unique(p, return_inverse=True)
    table = np.zeros((labels.size, clusters.size), dtype=np.int64)
    np.add.at(table, (ti, pi), 1)
    rows, cols = linear_sum_assignment(-table)
    return labels, table, {clusters[c]: labels[r] for r, c in zip(rows, cols)}


def cluster_accuracy(y_true, y_pred) -> float:
    """Fraction of cells whose cluster maps to their label under the best one-to-one matching."""
    t, p, _ = _prepare(y_true, y_pred)
    _, table, _ = _matching(t, p)
    rows, cols = linear_sum_assignment(-table)
    return float(table[rows, cols].sum() / max(len(t), 1))


def clustering_scores(y_true, y_pred) -> dict:
    """ARI, NMI, ACC, macro F1 (over true labels, after matching), homogeneity, completeness.

    Cells whose label or cluster is missing are excluded and counted in ``n_unlabeled``.
    """
    t, p, n_missing = _prepare(y_true, y_pred)
    labels, _, mapping = _matching(t, p)
    mapped = np.array([mapping.get(c, "\0unmatched") for c in p], dtype=object)
    return {
        "ari": float(skm.adjusted_rand_score(t, p)),
        "nmi": float(skm.normalized_mutual_info_score(t, p)),
        "acc": float((mapped == t).mean()),
        "f1_macro": float(skm.f1_score(t, mapped, labels=labels, average="macro", zero_division=0)),
        "homogeneity": float(skm.homogeneity_score(t, p)),
        "completeness": float(skm.completeness_score(t, p)),
        "n_clusters": int(np.unique(p).size),
        "n_labels": int(labels.size),
        "n_unlabeled": n_missing,
    }


def per_label_scores(y_true, y_pred) -> pd.DataFrame:
    """Per true label: cells, fraction, matched cluster, precision, recall and F1."""
    t, p, _ = _prepare(y_true, y_pred)
    labels, _, mapping = _matching(t, p)
    inverse = {lab: c for c, lab in mapping.items()}
    mapped = np.array([mapping.get(c, "\0unmatched") for c in p], dtype=object)
    prec, rec, f1, n = skm.precision_recall_fscore_support(t, mapped, labels=labels, zero_division=0)
    return pd.DataFrame({"n_cells": n, "fraction": n / len(t), "matched_cluster": [inverse.get(l, "") for l in labels],
                         "precision": prec, "recall": rec, "f1": f1}, index=pd.Index(labels, name="label"))
