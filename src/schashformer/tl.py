"""scanpy-style tools: functions that take an AnnData and write results under named keys."""

from __future__ import annotations

import sys
import time
from datetime import datetime, timezone

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from . import buckets, record
from .annotate import annotate  # noqa: E402,F401  (label transfer; lives in its own module)
from .errors import InputError, ParameterError
from .integration import (
    integrate,  # noqa: E402,F401  (batch alignment within clusters)
    integration,  # noqa: E402,F401  (batch mixing / biology scores)
)
from .metrics import clustering_scores
from .model import SCHashFormer
from .preprocess import count_matrix, resolve_counts
from .rare import rare_populations  # noqa: E402,F401  (per-label / per-cluster scores)
from .streaming import CountSource, data_checksum
from .train import TrainConfig
from .trajectory import trajectory  # noqa: E402,F401  (PAGA + diffusion pseudotime on the embedding)
from .validate import check_adata, resolve
from .version import __version__


def cluster(adata: ad.AnnData, n_clusters: int | None = None, *, labels_key: str | None = None,
            batch_key: str | None = None, layer: str | None = None, key_added: str = "schashformer",
            overwrite: bool = False, copy: bool = False, return_model: bool = False, resume: bool = False,
            neighbors_key: str | None = "schashformer_neighbors", n_neighbors: int = 15, **params):
    """Cluster cells with scHashFormer and write the results into ``adata``.

    Parameters
    ----------
    adata : AnnData with raw counts (cells x genes) in ``.X`` or ``layer``. When ``.X`` is not counts
        (e.g. log-normalised) and ``layer`` is None, ``layers["counts"]`` or else ``adata.raw`` is
        used when it holds counts, with a logged warning naming it (``uns[key_added]["checksum_of"]``
        records it); otherwise the error names the problem.
    n_clusters : number of clusters K; None (default) estimates it (Leiden on the hash-neighbourhood
        graph of the embedding at ``resolution``, see :mod:`schashformer.n_clusters`).
    labels_key : ``obs`` column of known cell types; used only for evaluation (metrics).
    batch_key : ``obs`` column of batches, a covariate of the ZINB decoders.
    layer : layer holding the raw counts instead of ``X``.
    **params : any parameter of :class:`SCHashFormer` (``resolution``, ``n_top_genes``, ``seed``,
        ``device``, ``allow_noncounts``, ``progress``, ``checkpoint_dir``, ``checkpoint_every``,
        ``keep_checkpoint`` and every training parameter), with its default there; an unknown
        name is a :class:`ParameterError`.
    key_added : prefix of the keys written.
    overwrite : replace results already stored under ``key_added``.
    copy : work on a copy and return it.
    return_model : also return the trained :class:`SCHashFormer`.
    resume : continue from the checkpoint in ``checkpoint_dir`` (see :meth:`SCHashFormer.fit`).
    neighbors_key : where the hash-neighbourhood kNN graph is written, in scanpy's layout
        (:func:`hash_neighbors`), so that ``sc.tl.umap(adata, neighbors_key=...)``, ``sc.tl.leiden``,
        ``sc.tl.paga`` and :func:`trajectory` need no neighbour search; None: no graph.
    n_neighbors : neighbours per cell in that graph (counting the cell itself, as scanpy does).

    Writes
    ------
    ``obsm[f"X_{key_added}"]`` (cells, latent) embedding; ``obs[key_added]`` categorical clusters;
    ``obsm[f"{key_added}_codes"]`` (cells, hash heads) bucket ids; ``uns[key_added]``, the run
    record (:mod:`schashformer.record`): ``version``, ``versions``, ``seed``, ``params`` (every
    parameter that defines the result, :meth:`SCHashFormer.result_params`, with ``labels_key``,
    ``batch_key``, ``layer``, ``device`` and ``device_used``), ``data_checksum`` (SHA-256 of
    the clustered count matrix), ``timings``, ``bucket_stats``, with labels ``metrics`` and, when
    ``n_clusters`` was None, ``n_clusters_estimated`` (also ``model.n_clusters_``). With
    ``neighbors_key``: ``obsp[f"{neighbors_key}_connectivities"]``, ``obsp[f"{neighbors_key}_distances"]``
    (cells, cells) and ``uns[neighbors_key]`` (see :func:`hash_neighbors`).

    Returns
    -------
    The AnnData if ``copy``, else None; with ``return_model`` a tuple (that, model).
    """
    check_adata(adata)
    model = SCHashFormer.from_params({"n_clusters": n_clusters, **params})
    adata = adata.copy() if copy else adata
    keys = {"obs": [key_added], "obsm": [f"X_{key_added}"], "uns": [key_added] + ([neighbors_key] if neighbors_key else [])}
    taken = [f"{where}[{k!r}]" for where, ks in keys.items() for k in ks if k in getattr(adata, where)]
    if taken and not overwrite:
        raise ParameterError(f"{', '.join(taken)} already hold results; pass overwrite=True or another key_added")

    # log-normalised X with counts in layers["counts"] or .raw (scanpy's usual layout): use those, and say so
    source, layer, counts_from = resolve_counts(adata, layer, params.get("allow_noncounts", False))
    model.fit(source, batch_key=batch_key, labels_key=labels_key, layer=layer, resume=resume)
    start = time.perf_counter()
    if getattr(model, "out_of_core_", False):  # the matrix may be on disk (backed): checksum chunk by chunk

        checksum = data_checksum(CountSource.from_anndata(source, layer), getattr(model, "stream_scan_", None))
    else:
        checksum = record.data_checksum(count_matrix(source, layer))
    timings = {**model.timings_, "checksum": {"seconds": round(time.perf_counter() - start, 3)}}
    write_results(adata, model, key_added=key_added, labels_key=labels_key, batch_key=batch_key, layer=layer,
                  checksum=checksum, timings=timings, counts_from=counts_from)
    if neighbors_key:
        start = time.perf_counter()
        hash_neighbors(adata, use_rep=f"X_{key_added}", codes_key=f"{key_added}_codes",
                       chunk_size=model.config.graph_chunk, n_neighbors=n_neighbors, key_added=neighbors_key)
        adata.uns[key_added]["params"]["neighbors_key"] = neighbors_key
        adata.uns[key_added]["timings"]["neighbors"] = {"seconds": round(time.perf_counter() - start, 3)}
    if model.progress:
        print(f"scHashFormer: {adata.n_obs} cells clustered on {resolve(model.device)}", file=sys.stderr)
    out = adata if copy else None
    return (out, model) if return_model else out


def write_results(adata: ad.AnnData, model: SCHashFormer, *, key_added: str = "schashformer",
                  labels_key: str | None = None, batch_key: str | None = None, layer: str | None = None,
                  checksum: str | None = None, timings: dict | None = None, counts_from: str | None = None) -> None:
    """Store a fitted model's embedding, labels, codes and run record in ``adata``.

    ``checksum`` defaults to :func:`schashformer.record.data_checksum` of the counts in ``layer``;
    ``counts_from`` names where the counts were read (default ``.X`` or ``layer``).
    """
    # from the integer codes: no string per cell (10^7 cells would take ~1 GB of them); -1 = missing
    labels = pd.Categorical.from_codes(np.where(model.labels_ >= 0, model.labels_, -1),
                                       categories=[str(k) for k in range(model.n_clusters_)])
    adata.obs[key_added] = labels
    adata.obsm[f"X_{key_added}"] = model.embedding_.astype(np.float32, copy=False)
    adata.obsm[f"{key_added}_codes"] = model.codes_.astype(np.int64, copy=False)
    run = {
        "version": __version__,
        "versions": record.versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seed": int(model.seed),
        "params": {**{k: ("" if v is None else v) for k, v in model.result_params().items()},
                   "labels_key": labels_key or "", "batch_key": batch_key or "", "layer": layer or "",
                   "device": str(model.device), "device_used": str(resolve(model.device))},
        "data_checksum": checksum or record.data_checksum(count_matrix(adata, layer)),
        "checksum_of": counts_from.removeprefix("adata.") if counts_from else ("X" if layer is None else f"layers[{layer!r}]"),
        "shape": np.asarray(adata.shape, dtype=np.int64),
        "timings": timings or model.timings_,
        "bucket_stats": pd.DataFrame(model.bucket_stats_).to_dict(orient="list"),
        "n_removed_cells": model.n_removed_cells_,
        "genes": np.asarray(model.stats_.genes, dtype=str),
        # losses of both stages (stage as text: 1, 2-pretrain, 2-cluster), for pl.training_curves
        "history": pd.DataFrame(getattr(model, "history_", []) or {"stage": [], "step": [], "loss": []})
        .astype({"stage": str}).to_dict(orient="list"),
    }
    if model.n_clusters is None:  # K was estimated (params["n_clusters"] is "", so a rerun estimates again)
        run["n_clusters_estimated"] = int(model.n_clusters_)
    if labels_key is not None:

        run["metrics"] = clustering_scores(adata.obs[labels_key].to_numpy(), labels.to_numpy())
    adata.uns[key_added] = run



class PrecomputedNeighbors:
    """A kNN "transformer" (scikit-learn's ``KNeighborsTransformer`` interface, as ``sc.pp.neighbors``
    accepts it) that hands back a graph found beforehand instead of searching.

    Parameters
    ----------
    distances : (cells, cells) CSR, row i holding the Euclidean distances to its ``n_neighbors - 1``
        nearest other cells, nearest first (the cell itself is not stored, as in scanpy).
    n_neighbors : neighbours per cell counting the cell itself (scanpy's convention).
    """

    def __init__(self, distances, n_neighbors: int):
        self.distances = distances
        self.n_neighbors = int(n_neighbors)

    def get_params(self, deep: bool = True) -> dict:
        return {"n_neighbors": self.n_neighbors}

    def fit(self, x, y=None):
        if x.shape[0] != self.distances.shape[0]:
            raise InputError(f"the precomputed graph has {self.distances.shape[0]} cells, the data {x.shape[0]}")
        return self

    def transform(self, x):
        return self.distances

    def fit_transform(self, x, y=None):
        return self.fit(x).transform(x)


def hash_neighbors(adata: ad.AnnData, *, use_rep: str = "X_schashformer", codes_key: str = "schashformer_codes",
                   chunk_size: int | None = None, n_neighbors: int = 15, method: str = "gauss",
                   key_added: str = "schashformer_neighbors", copy: bool = False):
    """kNN graph of the embedding from its hash neighbourhoods, written where ``sc.pp.neighbors`` writes.

    Candidates of a cell are the cells of its chunk and the two adjacent chunks in every hash head's
    sorted order (:func:`schashformer.buckets.hash_knn`; cells sorted by bucket id, ties broken along
    the first principal axis of the embedding); the ``n_neighbors - 1`` nearest candidates in
    ``obsm[use_rep]`` are a cell's neighbours. No global kNN search: O(cells x heads x chunk).
    Connectivities are then computed by scanpy itself (``sc.pp.neighbors`` with this graph as its
    transformer), so ``sc.tl.umap``, ``sc.tl.leiden``, ``sc.tl.paga``, ``sc.tl.diffmap`` and
    ``sc.tl.dpt`` take it with ``neighbors_key=key_added``. Cells with fewer candidates than
    ``n_neighbors - 1`` (only in tiny data sets) get theirs from an exact search over all cells.

    Parameters
    ----------
    adata : AnnData with ``obsm[use_rep]`` (cells, latent) and ``obsm[codes_key]`` (cells, heads).
    use_rep : the embedding.
    codes_key : the hash bucket ids.
    chunk_size : cells per chunk of the candidate windows; default the run record's ``graph_chunk``
        (``uns["schashformer"]["params"]``; its ``chunk_size`` in records written before ``graph_chunk``
        existed), else :attr:`TrainConfig.graph_chunk <schashformer.train.TrainConfig>` (16).
    n_neighbors : neighbours per cell, counting the cell itself (scanpy's convention).
    method : connectivities kernel, ``"gauss"`` (default; the kernel of diffusion pseudotime, plain
        numpy) or ``"umap"`` (scanpy's default; its first call in a process spends ~40 s compiling
        numba code). ``sc.tl.umap``, ``sc.tl.leiden`` and ``sc.tl.paga`` take either (``sc.tl.umap``
        logs that Gaussian connectivities "have not been computed using umap"; the layout is still
        made from them).
    key_added : the neighbours key: ``uns[key_added]``, ``obsp[f"{key_added}_connectivities"]``,
        ``obsp[f"{key_added}_distances"]``.
    copy : work on a copy and return it.

    Writes
    ------
    ``obsp[f"{key_added}_distances"]`` (cells, cells) CSR, ``n_neighbors - 1`` Euclidean distances per
    row; ``obsp[f"{key_added}_connectivities"]`` (cells, cells) CSR, symmetric weights; ``uns[key_added]``
    in scanpy's format: ``connectivities_key``, ``distances_key``, ``params`` (``n_neighbors``,
    ``method``, ``metric``, ``use_rep``, ``random_state``, plus ``knn="hash"``, ``codes_key``,
    ``chunk_size``).

    Returns
    -------
    The AnnData if ``copy``, else None.
    """
    import scanpy as sc


    for key, where in ((use_rep, "obsm"), (codes_key, "obsm")):
        if key not in getattr(adata, where):
            raise InputError(f"adata.{where} has no {key!r} (keys: {list(getattr(adata, where))}); "
                             "run tl.cluster first")
    if method not in ("umap", "gauss"):
        raise ParameterError(f"method must be 'umap' or 'gauss', got {method!r}")
    if not isinstance(n_neighbors, (int, np.integer)) or isinstance(n_neighbors, bool) or n_neighbors < 2:
        raise ParameterError(f"n_neighbors must be an integer >= 2, got {n_neighbors!r}")
    adata = adata.copy() if copy else adata
    if chunk_size is None:
        rec = adata.uns.get(use_rep.removeprefix("X_"), {})
        params = rec.get("params", {}) if isinstance(rec, dict) else {}
        chunk_size = int(params.get("graph_chunk") or params.get("chunk_size") or TrainConfig.graph_chunk)
    z = np.asarray(adata.obsm[use_rep], dtype=np.float32)
    codes = np.asarray(adata.obsm[codes_key])
    n = z.shape[0]
    k = int(min(n_neighbors, n)) - 1  # other cells per row
    if k < 1:
        raise InputError(f"{n} cells are too few for a neighbour graph")
    idx, dist = buckets.hash_knn(z, buckets.hash_orders(codes, z), chunk_size, k)
    if idx.shape[1] < k:  # fewer candidates than neighbours wanted: pad the columns
        pad = k - idx.shape[1]
        idx = np.hstack([idx, np.full((n, pad), -1, np.int64)])
        dist = np.hstack([dist, np.full((n, pad), np.inf, np.float32)])
    short = np.flatnonzero((idx < 0).any(1))
    if short.size:  # too few hash candidates (tiny data): an exact search for those cells only
        from sklearn.neighbors import NearestNeighbors

        d_ex, i_ex = NearestNeighbors(n_neighbors=k + 1).fit(z).kneighbors(z[short])
        for row, (di, ii) in zip(short, zip(d_ex, i_ex)):
            keep = ii != row
            idx[row], dist[row] = ii[keep][:k], di[keep][:k]
    distances = sp.csr_matrix((dist.ravel().astype(np.float32), idx.ravel().astype(np.int32),
                               np.arange(0, n * k + 1, k)), shape=(n, n))  # rows nearest first, as scanpy reads them
    sc.pp.neighbors(adata, use_rep=use_rep, method=method, key_added=key_added,
                    transformer=PrecomputedNeighbors(distances, k + 1))
    adata.uns[key_added]["params"].update(knn="hash", codes_key=codes_key, chunk_size=int(chunk_size),
                                          n_neighbors=int(k + 1))
    return adata if copy else None
