"""Clustering scores against known labels: ARI, NMI, ACC (Hungarian), macro F1, homogeneity, completeness.

Labels and clusters may be strings or integers; they are compared as strings (an integral float
such as ``2.0``, which appears when an integer column holds NaN, is written as ``"2"``). Cells whose
label or cluster is missing (None/NaN) are left out. Predicted clusters are mapped to labels by the
one-to-one matching that maximises agreement (Hungarian algorithm on the contingency table); with
more clusters than labels the unmatched clusters count as errors, with fewer the unmatched labels
get no cells.
"""

from __future__ import annotations

import numbers

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment
from sklearn import metrics as skm

from .errors import InputError, ParameterError

_UNMATCHED = "\0unmatched"


def _as_str(value) -> str:
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and float(value).is_integer():
        return str(int(value))
    return str(value)


def encode_labels(y_true, y_pred) -> tuple[np.ndarray, np.ndarray, int]:
    """Both label vectors as strings with missing entries removed, and how many were removed."""
    t = pd.Series(np.asarray(y_true, dtype=object).ravel())
    p = pd.Series(np.asarray(y_pred, dtype=object).ravel())
    if len(t) != len(p):
        raise ParameterError(f"labels and clusters differ in length: {len(t)} vs {len(p)}")
    keep = ~(t.isna() | p.isna()).to_numpy()
    if not keep.any():
        raise InputError(f"no cell has both a label and a cluster (all {len(t)} missing)")
    return _as_strings(t[keep]), _as_strings(p[keep]), int((~keep).sum())


def _as_strings(values: pd.Series) -> np.ndarray:
    """Object array of :func:`_as_str` values, converting each distinct value once (atlas-sized inputs)."""
    codes, uniques = pd.factorize(values)
    return _objects([_as_str(v) for v in uniques])[codes]


def _objects(items: list) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


def _unique(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(values, return_inverse=True)`` for string arrays, by hashing instead of sorting every entry."""
    codes, uniques = pd.factorize(values)
    uniques = np.asarray(uniques, dtype=object)
    order = np.argsort(uniques.astype(str), kind="stable")
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    return uniques[order], rank[codes]


def hungarian_matching(t: np.ndarray, p: np.ndarray):
    """Labels, clusters, contingency table (labels x clusters), cluster codes (cells,) and the
    Hungarian cluster -> label map."""
    labels, clusters, table, rows, cols, _, pi = _contingency(t, p)
    return labels, clusters, table, pi, {clusters[c]: labels[r] for r, c in zip(rows, cols)}


def _contingency(t: np.ndarray, p: np.ndarray):
    """Labels, clusters, contingency table, the Hungarian matching (rows, cols) and the codes (cells,)."""
    labels, ti = _unique(t)
    clusters, pi = _unique(p)
    table = np.zeros((labels.size, clusters.size), dtype=np.int64)
    np.add.at(table, (ti, pi), 1)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return labels, clusters, table, rows, cols, ti, pi


def _mapped(clusters: np.ndarray, codes: np.ndarray, mapping: dict) -> np.ndarray:
    """Each cell's label under ``mapping``, from its cluster code (an index into ``clusters``)."""
    return _objects([mapping.get(c, _UNMATCHED) for c in clusters])[codes]


def cluster_accuracy(y_true, y_pred) -> float:
    """Fraction of cells whose cluster maps to their label under the best one-to-one matching."""
    t, p, _ = encode_labels(y_true, y_pred)
    _, clusters, _, codes, mapping = hungarian_matching(t, p)
    return float((_mapped(clusters, codes, mapping) == t).mean())


def clustering_scores(y_true, y_pred) -> dict:
    """ARI, NMI, ACC, macro F1 (over true labels, after matching), homogeneity, completeness.

    Also ``n_clusters`` and ``n_labels`` (among scored cells) and ``n_unlabeled``: cells left out
    because their label or cluster is missing.
    """
    t, p, n_missing = encode_labels(y_true, y_pred)
    labels, _, table, rows, cols, ti, pi = _contingency(t, p)
    # scores from integer codes: sklearn sorts string labels on every call, slow at 10^6 cells
    matched = np.zeros(labels.size)
    matched[rows] = table[rows, cols]
    predicted = np.zeros(labels.size)  # cells whose cluster maps to each label
    predicted[rows] = table[:, cols].sum(0)
    f1 = np.divide(2 * matched, table.sum(1) + predicted, out=np.zeros(labels.size), where=matched > 0)
    return {
        "ari": float(skm.adjusted_rand_score(ti, pi)),
        "nmi": float(skm.normalized_mutual_info_score(ti, pi)),
        "acc": float(matched.sum() / len(t)),
        "f1_macro": float(f1.mean()),
        "homogeneity": float(skm.homogeneity_score(ti, pi)),
        "completeness": float(skm.completeness_score(ti, pi)),
        "n_clusters": int(table.shape[1]),
        "n_labels": int(labels.size),
        "n_unlabeled": n_missing,
    }


MATCHINGS = ("hungarian", "majority")


def _label_map(t: np.ndarray, p: np.ndarray, matching: str):
    """Labels, clusters, cluster codes (cells,) and the cluster -> label map: one-to-one (Hungarian)
    or each cluster to its majority label."""
    if matching not in MATCHINGS:
        raise ParameterError(f"matching must be one of {MATCHINGS}, got {matching!r}")
    labels, clusters, table, codes, mapping = hungarian_matching(t, p)
    if matching == "majority":
        mapping = {c: labels[table[:, j].argmax()] for j, c in enumerate(clusters)}
    return labels, clusters, codes, mapping


def per_label_scores(y_true, y_pred, matching: str = "hungarian") -> pd.DataFrame:
    """Per true label (index, as strings): n_cells, fraction, matched_cluster, precision, recall, f1.

    ``matching="hungarian"`` (default): one cluster per label, the one-to-one matching of
    :func:`clustering_scores` (``matched_cluster`` is "" for a label left without a cluster).
    ``matching="majority"``: every cluster goes to its majority label, so a label may collect
    several clusters (``matched_cluster`` joins them with ","), which suits methods that return
    more clusters than labels (e.g. Leiden at a fixed resolution). A cell is predicted as the
    label its cluster maps to; precision, recall and F1 follow.
    """
    t, p, _ = encode_labels(y_true, y_pred)
    labels, clusters, codes, mapping = _label_map(t, p, matching)
    inverse: dict[str, list[str]] = {}
    for c, lab in sorted(mapping.items()):
        inverse.setdefault(lab, []).append(c)
    prec, rec, f1, n = skm.precision_recall_fscore_support(t, _mapped(clusters, codes, mapping), labels=labels, zero_division=0)
    return pd.DataFrame(
        {"n_cells": n, "fraction": n / len(t), "matched_cluster": [",".join(inverse.get(lab, [])) for lab in labels],
         "precision": prec, "recall": rec, "f1": f1},
        index=pd.Index(labels, name="label"),
    )


def per_cluster_scores(y_true, y_pred) -> pd.DataFrame:
    """Per predicted cluster (index, as strings): how well it captures one label.

    Columns: n_cells, majority_label (most frequent true label in the cluster), precision (its
    share of the cluster, i.e. purity), recall (share of that label's cells that fall in the
    cluster), f1, and hungarian_label (the label the one-to-one matching gives it, "" if none).
    """
    t, p, _ = encode_labels(y_true, y_pred)
    labels, clusters, table, _, mapping = hungarian_matching(t, p)
    major = table.argmax(0)
    hits = table[major, np.arange(clusters.size)]
    size, label_size = table.sum(0), table.sum(1)[major]
    prec, rec = hits / size, hits / label_size
    f1 = np.where(prec + rec > 0, 2 * prec * rec / np.maximum(prec + rec, 1e-300), 0.0)
    return pd.DataFrame(
        {"n_cells": size, "majority_label": labels[major], "precision": prec, "recall": rec, "f1": f1,
         "hungarian_label": [mapping.get(c, "") for c in clusters]},
        index=pd.Index(clusters, name="cluster"),
    )


def rare_label_scores(y_true, y_pred, max_fraction: float = 0.02, matching: str = "hungarian") -> pd.DataFrame:
    """:func:`per_label_scores` restricted to rare labels: those holding < ``max_fraction`` of the labeled cells.

    An empty table (same columns) when no label is that rare.
    """
    if not 0 < float(max_fraction) <= 1:
        raise ParameterError(f"max_fraction must be in (0, 1], got {max_fraction!r}")
    table = per_label_scores(y_true, y_pred, matching=matching)
    return table[table["fraction"] < max_fraction]
