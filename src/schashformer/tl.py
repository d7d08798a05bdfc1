"""scanpy-style tools: functions that take an AnnData and write results under named keys."""

from __future__ import annotations

import time
from datetime import datetime, timezone

import anndata as ad
import numpy as np
import pandas as pd

from . import __version__, record
from .errors import ParameterError
from .model import SCHashFormer
from .preprocess import count_matrix
from .validate import check_adata, resolve

from .annotate import annotate  # noqa: E402,F401  (label transfer; lives in its own module)
from .rare import rare_populations  # noqa: E402,F401  (per-label / per-cluster scores)


def cluster(adata: ad.AnnData, n_clusters: int | None = None, *, labels_key: str | None = None,
            batch_key: str | None = None, layer: str | None = None, key_added: str = "schashformer",
            overwrite: bool = False, copy: bool = False, return_model: bool = False, resume: bool = False,
            **params):
    """Cluster cells with scHashFormer and write the results into ``adata``.

    Parameters
    ----------
    adata : AnnData with raw counts (cells x genes) in ``.X`` or ``layer``.
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

    Writes
    ------
    ``obsm[f"X_{key_added}"]`` (cells, latent) embedding; ``obs[key_added]`` categorical clusters;
    ``obsm[f"{key_added}_codes"]`` (cells, hash heads) bucket ids; ``uns[key_added]``, the run
    record (:mod:`schashformer.record`): ``version``, ``versions``, ``seed``, ``params`` (every
    parameter that defines the result, :meth:`SCHashFormer.result_params`, with ``labels_key``,
    ``batch_key``, ``layer``, ``device`` and ``device_used``), ``data_checksum`` (SHA-256 of
    the clustered count matrix), ``timings``, ``bucket_stats``, with labels ``metrics`` and, when
    ``n_clusters`` was None, ``n_clusters_estimated`` (also ``model.n_clusters_``).

    Returns
    -------
    The AnnData if ``copy``, else None; with ``return_model`` a tuple (that, model).
    """
    check_adata(adata)
    model = SCHashFormer.from_params({"n_clusters": n_clusters, **params})
    adata = adata.copy() if copy else adata
    keys = {"obs": key_added, "obsm": f"X_{key_added}", "uns": key_added}
    taken = [f"{where}[{k!r}]" for where, k in keys.items() if k in getattr(adata, where)]
    if taken and not overwrite:
        raise ParameterError(f"{', '.join(taken)} already hold results; pass overwrite=True or another key_added")

    model.fit(adata, batch_key=batch_key, labels_key=labels_key, layer=layer, resume=resume)
    start = time.perf_counter()
    if getattr(model, "out_of_core_", False):  # the matrix may be on disk (backed): checksum chunk by chunk
        from .streaming import CountSource, data_checksum

        checksum = data_checksum(CountSource.from_anndata(adata, layer), getattr(model, "stream_scan_", None))
    else:
        checksum = record.data_checksum(count_matrix(adata, layer))
    timings = {**model.timings_, "checksum": {"seconds": round(time.perf_counter() - start, 3)}}
    write_results(adata, model, key_added=key_added, labels_key=labels_key, batch_key=batch_key, layer=layer,
                  checksum=checksum, timings=timings)
    out = adata if copy else None
    return (out, model) if return_model else out


def write_results(adata: ad.AnnData, model: SCHashFormer, *, key_added: str = "schashformer",
                  labels_key: str | None = None, batch_key: str | None = None, layer: str | None = None,
                  checksum: str | None = None, timings: dict | None = None) -> None:
    """Store a fitted model's embedding, labels, codes and run record in ``adata``.

    ``checksum`` defaults to :func:`schashformer.record.data_checksum` of the counts in ``layer``.
    """
    labels = pd.Categorical(np.where(model.labels_ >= 0, model.labels_.astype(str), None),
                            categories=[str(k) for k in range(model.n_clusters_)])
    adata.obs[key_added] = labels
    adata.obsm[f"X_{key_added}"] = model.embedding_.astype(np.float32)
    adata.obsm[f"{key_added}_codes"] = model.codes_.astype(np.int64)
    run = {
        "version": __version__,
        "versions": record.versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seed": int(model.seed),
        "params": {**{k: ("" if v is None else v) for k, v in model.result_params().items()},
                   "labels_key": labels_key or "", "batch_key": batch_key or "", "layer": layer or "",
                   "device": str(model.device), "device_used": str(resolve(model.device))},
        "data_checksum": checksum or record.data_checksum(count_matrix(adata, layer)),
        "checksum_of": "X" if layer is None else f"layers[{layer!r}]",
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
        from .metrics import clustering_scores

        run["metrics"] = clustering_scores(adata.obs[labels_key].to_numpy(), labels.to_numpy())
    adata.uns[key_added] = run
from .integration import integration  # noqa: E402,F401  (batch mixing / biology scores)
from .trajectory import trajectory  # noqa: E402,F401  (PAGA + diffusion pseudotime on the embedding)
from .integration import integrate  # noqa: E402,F401  (batch alignment within clusters)
