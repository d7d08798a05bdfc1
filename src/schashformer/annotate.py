"""Label transfer: map query cells onto a trained model and vote among reference neighbours.

Data flow: query counts -> the model's genes (missing filled with zeros, extra ignored, both
with a warning) -> trained hasher (bucket codes per hash head) -> stage-2 tokens -> embedding z.
Candidate neighbours of a query cell are the reference cells next to it in each head's sorted
hash order (the same sort-and-chunk order that stage 2 attends over, :mod:`schashformer.buckets`):
a query cell's key is located in the reference's sorted keys by binary search and the ``window``
reference cells on either side are taken, per head. The ``n_neighbors`` nearest candidates vote,
weighted by inverse distance to the fourth power, in the vote space (``space``): by default z, the
stage-2 tokens (stage-1 hidden layer + principal components) and the reference's top 50 principal
components of its centred, unscaled log expression, each part scaled to unit root-mean-square norm
over the reference. Each label's
tally is divided by its reference frequency to the power ``class_balance`` (0.5 by default), so
that a type that is rare in the reference but common in the query is not out-voted by the
reference's majority types. Cost O(query x heads x window) plus O(cells log cells) for the sort
and O(reference nnz x genes) for the principal axes: no all-pairs distances, no global kNN index.

Why not z alone: z is trained with a clustering objective on the reference, which pulls small
reference types into the large clusters next to them. Transferring across donors (mouse pancreas,
mouse1 -> mouse2: 9 reference alpha cells, 182 query alpha cells) the vote in z called every query
alpha cell delta; the tokens keep the small types apart. On worm neurons kNN on 50 principal
components beats both z and the tokens, hence the third part (benchmarks/results/annotation.md).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd

from . import engine
from .data import CellData
from .errors import InputError, ParameterError
from .model import SCHashFormer
from .preprocess import Prepared, prepare, principal_axes
from .validate import check_adata, is_int

log = logging.getLogger(__name__)
UNKNOWN = "unknown"
SPACES = ("combined", "z", "tokens", "pcs")  # vote spaces: all three of z, the tokens and VOTE_PCS PCs, or one alone
DEFAULT_SPACE = "combined"
DEFAULT_CLASS_BALANCE = 0.5  # label tallies / (reference label frequency) ** this
VOTE_PCS = 50  # principal components of the reference (the model's genes, centred, unscaled) in the vote space
WEIGHT_POWER = 4.0  # a neighbour's vote weight: 1 / distance ** this (relative to the nearest candidate)


@dataclass
class Mapped:
    """Cells embedded by a trained model: rows are the kept cells (``prep.cell_mask``)."""

    prep: Prepared
    codes: np.ndarray  # (cells, heads) bucket ids
    keys: np.ndarray  # (cells, heads) float64 sort keys: bucket id, then position inside the bucket
    z: np.ndarray  # (cells, latent) embedding
    tokens: np.ndarray  # (cells, token width) stage-2 tokens: stage-1 hidden layer + scaled principal components


def sort_keys(codes: np.ndarray, ties: np.ndarray) -> np.ndarray:
    """(cells, heads) scalar keys whose order is :func:`schashformer.engine.sorted_orders`' order.

    The continuous tie-break (:func:`schashformer.engine.tie_break_keys`) lies in [0, 2), so
    ``code * 4 + tie`` sorts by code first.
    """
    return codes.astype(np.float64) * 4.0 + ties


def map_cells(model, adata: ad.AnnData, *, layer: str | None = None, where: str = "query") -> Mapped:
    """Hash and embed ``adata`` with a fitted :class:`~schashformer.SCHashFormer` (cells attend within their own set)."""
    model.check_fitted()
    genes = pd.Index(np.asarray(model.stats_.genes).astype(str))
    extra = int((~pd.Index(np.asarray(adata.var_names).astype(str)).isin(genes)).sum())
    if extra and where != "reference":  # the reference is usually the training data: all but the model's genes are extra
        warnings.warn(f"{where}: {extra} of its {adata.n_vars} genes are not among the model's {len(genes)} genes "
                      "and are ignored", UserWarning, stacklevel=3)
    with warnings.catch_warnings():
        # name the data set in the missing-genes warning of prepare
        warnings.simplefilter("ignore", UserWarning)
        missing = int((~genes.isin(np.asarray(adata.var_names).astype(str))).sum())
        prep = prepare(adata, layer=layer, allow_noncounts=model.allow_noncounts, stats=model.stats_)
    if missing:
        warnings.warn(f"{where}: {missing} of the model's {len(genes)} genes are missing and filled with zeros",
                      UserWarning, stacklevel=3)
    data = CellData(prep, device=model.head_.centres.device)
    codes, h, hidden = engine.hash_cells(model.indexer_, data, model.config.infer_batch)
    tokens, _ = engine.token_features(prep, hidden, model.token_axes_, model.token_scale_)
    ties = engine.tie_break_keys(h)
    z = engine.embed_tokens(model.encoder_, tokens, engine.sorted_orders(codes, ties), model.config, data.device)
    return Mapped(prep, codes, sort_keys(codes, ties), z, tokens)


def reference_pcs(ref: Prepared, qry: Prepared, n_comps: int = VOTE_PCS,
                  batch: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Both data sets projected on the top ``n_comps`` principal axes of the reference's log-normalised
    expression, centred by the model's gene means and not scaled (:func:`schashformer.preprocess.principal_axes`
    with ``scaled=False``: a genes x genes Gram matrix, linear in cells). Row batches: never a dense
    cells x genes copy.

    Not scaled, as in scanpy's ``ingest``: dividing by each gene's standard deviation lifts the
    low-variance genes, whose values shift most between donors. Mouse pancreas mouse1 -> mouse2
    (seed 0): accuracy 0.863 with standardised genes, 0.939 centred only (kNN on PCA: 0.803 -> 0.916).
    """
    axes = principal_axes(ref, n_comps, scaled=False)

    def project(prep: Prepared) -> np.ndarray:
        return np.concatenate([prep.centred(np.arange(s, min(s + batch, prep.n_cells))) @ axes
                               for s in range(0, prep.n_cells, batch)]).astype(np.float32)

    return project(ref), project(qry)


def vote_space(ref: Mapped, qry: Mapped, space: str) -> tuple[np.ndarray, np.ndarray]:
    """(reference, query) coordinates the vote measures distances in (see :data:`SPACES`).

    ``"combined"`` puts z, the stage-2 tokens and the reference's top :data:`VOTE_PCS` principal
    components side by side, each divided by its root-mean-square norm over the reference cells so
    that the three parts weigh the same whatever their widths and scales.
    """
    if space == "z":
        return ref.z, qry.z
    if space == "tokens":
        return ref.tokens, qry.tokens
    pcs = reference_pcs(ref.prep, qry.prep)
    if space == "pcs":
        return pcs
    parts_r, parts_q = [], []
    for r, q in ((ref.z, qry.z), (ref.tokens, qry.tokens), pcs):
        scale = float(np.sqrt((r.astype(np.float64) ** 2).sum(1).mean())) or 1.0
        parts_r.append(r / scale)
        parts_q.append(q / scale)
    return (np.concatenate(parts_r, axis=1).astype(np.float32), np.concatenate(parts_q, axis=1).astype(np.float32))


def hash_candidates(ref_keys: np.ndarray, query_keys: np.ndarray, window: int) -> np.ndarray:
    """Reference cells next to each query cell in every head's sorted hash order.

    Parameters
    ----------
    ref_keys : (reference cells, heads) sort keys (:func:`sort_keys`).
    query_keys : (query cells, heads) sort keys of the same hasher.
    window : reference cells taken on each side of the query's position, per head.

    Returns
    -------
    (query cells, heads * 2 * window) reference indices, -1 where a window runs off the order
    or repeats a cell found by an earlier head.
    """
    n_ref, n_heads = ref_keys.shape
    offsets = np.arange(-window, window)
    out = []
    for k in range(n_heads):
        order = np.argsort(ref_keys[:, k], kind="stable")
        pos = np.searchsorted(ref_keys[order, k], query_keys[:, k])  # where the query would sit in the order
        idx = pos[:, None] + offsets[None, :]
        valid = (idx >= 0) & (idx < n_ref)
        out.append(np.where(valid, order[np.clip(idx, 0, n_ref - 1)], -1))
    cand = np.sort(np.concatenate(out, axis=1), axis=1)
    cand[:, 1:][cand[:, 1:] == cand[:, :-1]] = -1  # the same reference cell found by several heads
    return cand


def vote(z_query: np.ndarray, z_ref: np.ndarray, ref_labels: np.ndarray, candidates: np.ndarray, n_neighbors: int,
         n_labels: int, block: int = 512, class_balance: float = 0.0,
         power: float = WEIGHT_POWER) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distance-weighted vote of the ``n_neighbors`` nearest candidates in the vote space.

    ``ref_labels`` are integer codes in [0, n_labels) (-1: unlabeled, never a candidate).
    Weights are 1 / distance ** ``power``, the distance offset by a tenth of the nearest
    candidate's so that exact duplicates do not take all the weight. Each label's tally is then
    divided by (its share of the labelled reference cells) ** ``class_balance``: 0 is the plain
    vote, 1 the vote under equal label priors. Returns (label code (query,), confidence = winning
    share of the balanced tally (query,), mean distance to the chosen neighbours (query,)); a query
    cell without any candidate gets label -1 and confidence 0. Memory O(block x candidates x width):
    ~40 MB at the defaults (512 x 144 x 134 float32), whatever the number of cells.
    """
    n = len(z_query)
    best = np.full(n, -1, dtype=np.int64)
    conf = np.zeros(n)
    mean_d = np.full(n, np.inf)
    cand = np.where((candidates >= 0) & (ref_labels[np.maximum(candidates, 0)] >= 0), candidates, -1)
    k = min(n_neighbors, cand.shape[1])
    freq = np.bincount(ref_labels[ref_labels >= 0], minlength=n_labels).astype(np.float64)
    freq /= max(freq.sum(), 1.0)
    prior = np.where(freq > 0, freq, 1.0) ** float(class_balance)  # labels with no reference cell never win anyway
    for s in range(0, n, block):
        c = cand[s:s + block]
        d = np.sqrt(((z_ref[np.maximum(c, 0)] - z_query[s:s + block, None, :]) ** 2).sum(-1))
        d[c < 0] = np.inf
        near = np.argpartition(d, k - 1, axis=1)[:, :k]
        dn = np.take_along_axis(d, near, axis=1)
        lab = ref_labels[np.take_along_axis(c, near, axis=1)]
        ok = np.isfinite(dn)
        d0 = np.where(ok, dn, np.inf).min(1, keepdims=True)
        d0 = np.where(np.isfinite(d0), d0, 1.0).astype(np.float64)
        base = np.where(ok, dn, 0.0).astype(np.float64) + 0.1 * d0 + 1e-12
        # relative to the nearest neighbour's (>= 1): no overflow at high powers, the vote shares are unchanged
        w = np.where(ok, (base / (1.1 * d0 + 1e-12)) ** -float(power), 0.0)
        tally = np.zeros((len(c), n_labels))
        np.add.at(tally, (np.repeat(np.arange(len(c)), k), np.where(ok, lab, 0).ravel()), w.ravel())
        tally /= prior
        total = tally.sum(1)
        has = total > 0
        best[s:s + block] = np.where(has, tally.argmax(1), -1)
        conf[s:s + block] = np.where(has, tally.max(1) / np.where(has, total, 1), 0.0)
        mean_d[s:s + block] = np.where(has, np.where(ok, dn, 0).sum(1) / np.maximum(ok.sum(1), 1), np.inf)
    return best, conf, mean_d


def check_transfer_args(query: ad.AnnData, reference: ad.AnnData, labels_key: str, *, n_neighbors, window,
                        min_confidence, class_balance, space) -> None:
    """Reject bad inputs of :func:`transfer_labels` with a message naming the argument."""
    check_adata(query)
    check_adata(reference)
    if labels_key not in reference.obs:
        raise InputError(f"labels_key {labels_key!r} is not a column of reference.obs "
                         f"(columns: {list(reference.obs.columns)})")
    for name, value, low in (("n_neighbors", n_neighbors, 1), ("window", window, 1)):
        if not is_int(value) or value < low:
            raise ParameterError(f"{name} must be an integer >= {low}, got {value!r}")
    for name, value in (("min_confidence", min_confidence), ("class_balance", class_balance)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
                or not 0.0 <= float(value) <= 1.0:
            raise ParameterError(f"{name} must be a number in [0, 1], got {value!r}")
    if space not in SPACES:
        raise ParameterError(f"space must be one of {SPACES}, got {space!r}")


def transfer_labels(model, query: ad.AnnData, reference: ad.AnnData, labels_key: str, *, n_neighbors: int = 15,
                    window: int = 24, min_confidence: float = 0.5, space: str = DEFAULT_SPACE,
                    class_balance: float = DEFAULT_CLASS_BALANCE, layer: str | None = None,
                    reference_layer: str | None = None) -> dict:
    """Label transfer from ``reference`` to ``query`` through ``model``'s hash index.

    Returns a dict: ``labels`` (query cells,) object array (``"unknown"`` below ``min_confidence``
    and for cells with zero counts), ``predicted`` (the vote's winner before the threshold),
    ``confidence`` (query cells,) float, ``embedding`` (query cells, latent), ``n_candidates``
    (mean distinct candidates per query cell).
    """
    check_transfer_args(query, reference, labels_key, n_neighbors=n_neighbors, window=window,
                        min_confidence=min_confidence, class_balance=class_balance, space=space)
    raw = reference.obs[labels_key]
    if raw.isna().all():
        raise InputError(f"labels_key {labels_key!r}: every reference label is missing")
    ref = map_cells(model, reference, layer=reference_layer, where="reference")
    qry = map_cells(model, query, layer=layer, where="query")
    names, codes = np.unique(raw[ref.prep.cell_mask].dropna().astype(str), return_inverse=True)
    ref_labels = np.full(ref.prep.n_cells, -1, dtype=np.int64)
    ref_labels[np.flatnonzero(raw[ref.prep.cell_mask].notna().to_numpy())] = codes
    if UNKNOWN in names:
        raise InputError(f"reference.obs[{labels_key!r}] already uses the label {UNKNOWN!r}, which marks "
                         "low-confidence cells; rename it")
    cand = hash_candidates(ref.keys, qry.keys, window)
    x_ref, x_qry = vote_space(ref, qry, space)
    best, conf, _ = vote(x_qry, x_ref, ref_labels, cand, n_neighbors, len(names), class_balance=class_balance)
    predicted = np.where(best >= 0, names[np.maximum(best, 0)], UNKNOWN).astype(object)
    called = np.where(conf >= min_confidence, predicted, UNKNOWN).astype(object)
    n = query.n_obs
    mask = qry.prep.cell_mask
    out_labels = np.full(n, UNKNOWN, dtype=object)
    out_pred = np.full(n, UNKNOWN, dtype=object)
    out_conf = np.zeros(n)
    emb = np.zeros((n, qry.z.shape[1]), dtype=np.float32)
    out_labels[mask], out_pred[mask], out_conf[mask], emb[mask] = called, predicted, conf, qry.z
    return {"labels": out_labels, "predicted": out_pred, "confidence": out_conf, "embedding": emb,
            "categories": list(names), "n_candidates": float(((cand >= 0).sum(1)).mean())}


def annotate(query: ad.AnnData, reference: ad.AnnData, labels_key: str, *, model=None, n_neighbors: int = 15,
             window: int = 24, min_confidence: float = 0.5, space: str = DEFAULT_SPACE,
             class_balance: float = DEFAULT_CLASS_BALANCE, key_added: str = "schashformer_annotation",
             layer: str | None = None, reference_layer: str | None = None, overwrite: bool = False,
             copy: bool = False, model_params: dict | None = None, return_model: bool = False):
    """Transfer ``reference.obs[labels_key]`` to ``query`` by nearest neighbours in the scHashFormer embedding.

    Both data sets are embedded by the trained ``model`` (the query on the model's genes: missing
    genes are filled with zeros and extra genes ignored, each with a warning). Candidate neighbours
    of a query cell are the ``window`` reference cells on either side of it in every hash head's
    sorted order (the hash index; no all-pairs search); the ``n_neighbors`` nearest in the vote
    space (``space``) vote, weighted by inverse distance to the fourth power, and each label's tally
    is divided by its reference frequency to the power ``class_balance``.

    Parameters
    ----------
    query : AnnData of raw counts (cells x genes) to annotate.
    reference : AnnData of raw counts with known labels, usually the data ``model`` was fitted on.
    labels_key : ``reference.obs`` column of labels (missing labels are never voted for).
    model : fitted :class:`~schashformer.SCHashFormer` (e.g. ``tl.cluster(..., return_model=True)``)
        or the directory of a saved one; None (default) fits one on ``reference`` first, with as
        many clusters as it has labels (the labels themselves are not used for training).
    model_params : with ``model=None``, keyword arguments of :class:`~schashformer.SCHashFormer`
        for that fit (e.g. ``{"seed": 1, "device": "cpu", "progress": False}`` or training fields).
    return_model : also return the model used (the one fitted here, or ``model`` loaded).
    n_neighbors : neighbours that vote.
    window : candidates per side and hash head (up to ``2 * window * hash_heads`` per query cell).
    min_confidence : cells whose winning vote share is below this are labelled ``"unknown"``.
    space : where neighbours are measured: ``"combined"`` (default) z, the stage-2 tokens (stage-1
        hidden layer + the model's principal components) and the reference's top 50 principal
        components of its centred (not scaled) log expression side by side, each part scaled to unit RMS
        norm over the reference; ``"z"``, ``"tokens"`` or ``"pcs"`` one of them alone. z is trained
        to cluster the reference and merges small reference types into large ones, which costs
        accuracy when such a type is common in the query (e.g. another donor); the principal
        components keep the fine structure that the model's short tokens lose on some data (worm
        neurons).
    class_balance : in [0, 1]; each label's weighted tally is divided by its share of the
        reference cells to this power. 0 votes as the reference is composed (a type with few
        reference cells is out-voted near a large one), 1 as if all labels were equally frequent;
        the default 0.5 is in between.
    key_added : keys written (below).
    layer, reference_layer : layers holding the counts instead of ``.X``.
    overwrite : replace results already stored under ``key_added``.
    copy : annotate a copy of ``query`` and return it.

    Writes (into ``query``)
    -----------------------
    ``obs[key_added]`` categorical label (reference labels + ``"unknown"``; cells with zero counts
    are ``"unknown"``); ``obs[f"{key_added}_confidence"]`` (cells,) weighted vote share in [0, 1];
    ``obsm[f"X_{key_added}"]`` (cells, latent) the query's embedding; ``uns[key_added]`` the
    parameters, the reference's size and the fraction of unknown cells.

    Returns
    -------
    The annotated copy if ``copy``, else None; with ``return_model`` a tuple (that, model).
    """

    check_transfer_args(query, reference, labels_key, n_neighbors=n_neighbors, window=window,
                        min_confidence=min_confidence, class_balance=class_balance, space=space)
    keys = {"obs": [key_added, f"{key_added}_confidence"], "obsm": [f"X_{key_added}"], "uns": [key_added]}
    taken = [f"{where}[{k!r}]" for where, ks in keys.items() for k in ks if k in getattr(query, where)]
    if taken and not overwrite:
        raise ParameterError(f"{', '.join(taken)} already hold results; pass overwrite=True or another key_added")
    fitted_here = model is None
    if model is None:
        params = dict(model_params or {})
        n_labels = int(reference.obs[labels_key].dropna().nunique())
        params.setdefault("n_clusters", n_labels if 2 <= n_labels <= reference.n_obs else None)
        log.info("annotate: no model given; fitting scHashFormer on the reference (%d cells, %s clusters)",
                 reference.n_obs, params["n_clusters"])
        model = SCHashFormer(params.pop("n_clusters"), **params).fit(reference, layer=reference_layer)
    elif not isinstance(model, SCHashFormer):
        model = SCHashFormer.load(model)
    elif model_params:
        raise ParameterError("model_params is for the model fitted when model=None; model= was given")
    query = query.copy() if copy else query
    res = transfer_labels(model, query, reference, labels_key, n_neighbors=n_neighbors, window=window,
                          min_confidence=min_confidence, space=space, class_balance=class_balance, layer=layer,
                          reference_layer=reference_layer)
    query.obs[key_added] = pd.Categorical(res["labels"], categories=res["categories"] + [UNKNOWN])
    query.obs[f"{key_added}_confidence"] = res["confidence"].astype(np.float32)
    query.obsm[f"X_{key_added}"] = res["embedding"]
    query.uns[key_added] = {"labels_key": labels_key, "n_neighbors": int(n_neighbors), "window": int(window),
                            "min_confidence": float(min_confidence), "space": space,
                            "class_balance": float(class_balance), "n_reference_cells": int(reference.n_obs),
                            "mean_candidates": res["n_candidates"],
                            "unknown_fraction": float((res["labels"] == UNKNOWN).mean()),
                            "model_fitted_on_reference": bool(fitted_here)}
    out = query if copy else None
    return (out, model) if return_model else out
