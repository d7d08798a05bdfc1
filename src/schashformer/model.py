"""SCHashFormer: the user-facing estimator (data set-up, training, embedding, saving).

The networks live in :mod:`schashformer.nn`, the training loops in
:mod:`schashformer.train`; this module wires them to AnnData, like a scikit-learn
estimator: ``fit`` / ``transform`` / ``predict`` / ``fit_predict`` / ``save`` / ``load``.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import time
import typing
import warnings
from contextlib import contextmanager
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch
from sklearn.base import BaseEstimator

from . import buckets, engine, record, resources, streaming
from . import n_clusters as n_clusters_mod
from .checkpoint import Checkpointer, fingerprint_arrays
from .data import CellData
from .errors import InputError, OutputExistsError, ParameterError
from .nn import ClusterHead, LSHIndexer
from .preprocess import (
    DEFAULT_N_TOP_GENES,
    GeneStats,
    Prepared,
    expand_to_cells,
    prepare,
)
from .train import TrainConfig
from .validate import check_adata, check_params, one_line, resolve, warn_narrow
from .version import __version__

log = logging.getLogger(__name__)
_MODEL_FILE = "model.pt"


_TRAIN = TrainConfig()  # the training defaults, read by the signature below (written nowhere else)
TRAIN_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))
# parameters that change how a fit runs (where, with what output, with which checkpoints), not what it
# computes: every other parameter defines the result and goes into save, the checkpoint fingerprint and
# the run record that `schashformer rerun` repeats
RUN_ONLY = ("device", "progress", "checkpoint_dir", "checkpoint_every", "keep_checkpoint")


class SCHashFormer(BaseEstimator):
    """Learnable-LSH + local-attention clustering of single-cell counts.

    A scikit-learn estimator: the constructor only stores its arguments (``get_params``,
    ``set_params`` and ``sklearn.base.clone`` work); :meth:`check_params` checks them and
    ``fit`` calls it first. The training parameters are the fields of the training configuration
    (``schashformer.train.TrainConfig``), with its defaults; :attr:`config` builds it.

    Parameters
    ----------
    n_clusters : number of clusters K (2 <= K <= cells), or None to estimate it: after stage-2
        pre-training, Leiden on the hash-neighbourhood kNN graph of z at ``resolution`` gives K
        and the partition that initialises the clustering head (:mod:`schashformer.n_clusters`).
    resolution : Leiden resolution used when ``n_clusters`` is None (> 0; default
        :data:`schashformer.n_clusters.DEFAULT_RESOLUTION`): higher gives more, finer clusters,
        lower fewer, coarser ones. Ignored when K is given.
    n_top_genes : highly variable genes used as input (all genes if fewer).
    seed : random seed; fixes every random choice on the CPU.
    device : 'auto' (CUDA when available), 'cpu' or 'cuda'.
    allow_noncounts : accept non-integer (pre-normalised) input.
    progress : show progress bars.
    checkpoint_dir : directory for checkpoints (None: no checkpoints). ``fit`` writes the state
        there every ``checkpoint_every`` training steps and at the end of each phase, atomically;
        ``fit(..., resume=True)`` continues a killed fit from it and ends with the same labels as
        an uninterrupted fit (on the CPU, same seed). See :mod:`schashformer.checkpoint`.
    checkpoint_every : training steps between checkpoints (0: only at the end of each phase).
    keep_checkpoint : keep the final checkpoint after a successful ``fit`` (by default it is deleted;
        the command line keeps it until the result files are written).

    Other Parameters
    ----------------
    input_pcs, hash_heads, hash_bits, hidden, hash_latent, stage1_steps, stage1_batch, tau, mask_rate, \
input_noise, w_zinb, w_contrastive, bucket_weight, detach_codes, w_balance, w_quantisation
        Stage 1, the hasher (each a field of ``TrainConfig``, documented there): ``input_pcs`` > 0
        projects on this many principal axes before the encoder; ``hash_bits`` None is
        log2(cells / 16) clipped to [4, 16]; ``tau`` is the contrastive temperature;
        ``input_noise`` the view noise in units of the mean absolute standardised input.
    chunk_size, chunks_per_batch, d_model, attn_heads, layers, latent, token_pcs, token_residual, \
attention, stage2_pretrain_steps, stage2_cluster_steps, scale_steps, update_interval, tol, w_consistency, w_neighbour, pool_mates, w_kl, \
w_zinb_stage2, dropout, lr, weight_decay, grad_clip, kmeans_n_init, init, graph_neighbors, graph_chunk, infer_batch, mixed_precision
        Stage 2, the neighbourhood Transformer and clustering head. With ``scale_steps`` (off by
        default) its two step counts are caps: on fewer than ~1,070 cells (at 128 query cells a step) each phase passes over the
        cells a fixed number of times instead (at least 50 steps), ~20% faster on 200-cell data. ``latent`` is the width of z
        without ``token_residual``; ``update_interval`` the steps between target refreshes;
        ``tol`` stops when fewer labels change; ``w_kl`` weighs the KL clustering loss and
        ``w_zinb_stage2`` the stage-2 ZINB loss; ``target_balance`` is the exponent of
        the cluster size in DEC's target (1: DEC's, favours equal sizes; 0: none; None, the default: 1 after a k-means start, 0 after a graph start); ``query_noise`` (> 0) trains the neighbourhood Transformer to
        restore noised query tokens from their hash neighbours (own token hidden from attention);
        ``attention_neighbours`` (> 0) lets each query attend only to that many keys of its window, the
        nearest to its own token (0: the whole window); ``w_neighbour`` (> 0) weighs a stage-2 term pulling
        each cell's z towards the z of its most similar chunk mate (a reason for the update to read the window);
        ``pool_mates`` (> 0) adds to each cell's stage-2 reconstruction target the counts of that many most similar
        chunk mates;
        ``zinb_genes`` is the number of genes (a fresh random
        subset each step) in both stages' ZINB loss (None: all); ``init`` is 'auto' (k-means on z or Leiden at K on z's kNN graph, whichever partition has the higher silhouette), 'kmeans' or 'leiden' (on the hash kNN graph); ``graph_chunk`` is the cells per chunk of that graph's candidate windows (K estimation too), apart from the attention's ``chunk_size``; ``mixed_precision`` trains in bfloat16
        autocast on a CUDA GPU, and the out-of-core passes hash and embed every cell in bfloat16 where the
        hardware has bf16 units (CUDA GPUs, CPUs with AVX512-BF16 or AMX); False keeps everything float32.
    train_cells, stage1_steps_subsample
        Large inputs (more cells, or a backed AnnData) train on a subsample of ``train_cells``
        cells and embed all in streaming passes; ``stage1_steps_subsample`` caps the stage-1
        steps then (None: no cap).

    Attributes
    ----------
    labels_ : (cells,) cluster of each input cell (-1 for cells with zero counts).
    n_clusters_ : the number of clusters used: ``n_clusters``, or the estimate when it was None.
    embedding_ : (cells, latent) embedding z (zeros for cells with zero counts).
    codes_ : (cells, hash_heads) hash bucket ids.
    bucket_stats_ : list of per-head bucket statistics.
    timings_ : wall time (s) and peak resident memory (GiB) per stage.
    history_ : training losses.
    kmeans_labels_ : (cells,) the partition that placed the cluster centres before the clustering phase
        (k-means or Leiden, see ``init``; the name is kept for saved results), None when it saw a subsample.
    """

    def __init__(self, n_clusters: int | None = None, *,
                 resolution: float = n_clusters_mod.DEFAULT_RESOLUTION, n_top_genes: int = DEFAULT_N_TOP_GENES,
                 seed: int = 0, device: str | torch.device = "auto", allow_noncounts: bool = False,
                 progress: bool = True, checkpoint_dir: str | Path | None = None, checkpoint_every: int = 100,
                 keep_checkpoint: bool = False,
                 # stage 1: hasher
                 input_pcs: int = _TRAIN.input_pcs, hash_heads: int = _TRAIN.hash_heads,
                 hash_bits: int | None = _TRAIN.hash_bits, hidden: int = _TRAIN.hidden,
                 hash_latent: int = _TRAIN.hash_latent, stage1_steps: int = _TRAIN.stage1_steps,
                 stage1_batch: int = _TRAIN.stage1_batch, tau: float = _TRAIN.tau,
                 mask_rate: float = _TRAIN.mask_rate, input_noise: float = _TRAIN.input_noise,
                 w_zinb: float = _TRAIN.w_zinb, w_contrastive: float = _TRAIN.w_contrastive,
                 bucket_weight: float = _TRAIN.bucket_weight, detach_codes: bool = _TRAIN.detach_codes,
                 w_balance: float = _TRAIN.w_balance, w_quantisation: float = _TRAIN.w_quantisation,
                 # stage 2: neighbourhood Transformer + clustering head
                 chunk_size: int = _TRAIN.chunk_size, chunks_per_batch: int = _TRAIN.chunks_per_batch,
                 d_model: int = _TRAIN.d_model, attn_heads: int = _TRAIN.attn_heads, layers: int = _TRAIN.layers,
                 latent: int = _TRAIN.latent, token_pcs: int = _TRAIN.token_pcs,
                 token_residual: bool = _TRAIN.token_residual, attention: bool = _TRAIN.attention,
                 stage2_pretrain_steps: int = _TRAIN.stage2_pretrain_steps,
                 stage2_cluster_steps: int = _TRAIN.stage2_cluster_steps, scale_steps: bool = _TRAIN.scale_steps,
                 update_interval: int = _TRAIN.update_interval, tol: float = _TRAIN.tol,
                 query_noise: float = _TRAIN.query_noise, attention_neighbours: int = _TRAIN.attention_neighbours,
                 w_consistency: float = _TRAIN.w_consistency, w_neighbour: float = _TRAIN.w_neighbour,
                 pool_mates: int = _TRAIN.pool_mates,
                 w_kl: float = _TRAIN.w_kl,
                 w_zinb_stage2: float = _TRAIN.w_zinb_stage2, target_balance: float | None = _TRAIN.target_balance,
                 zinb_genes: int | None = _TRAIN.zinb_genes,
                 dropout: float = _TRAIN.dropout,
                 lr: float = _TRAIN.lr, weight_decay: float = _TRAIN.weight_decay,
                 grad_clip: float = _TRAIN.grad_clip, kmeans_n_init: int = _TRAIN.kmeans_n_init,
                 init: str = _TRAIN.init, graph_neighbors: int = _TRAIN.graph_neighbors, graph_chunk: int = _TRAIN.graph_chunk,
                 infer_batch: int = _TRAIN.infer_batch, mixed_precision: bool = _TRAIN.mixed_precision,
                 # large inputs: training on a subsample
                 train_cells: int = _TRAIN.train_cells,
                 stage1_steps_subsample: int | None = _TRAIN.stage1_steps_subsample):
        # scikit-learn convention: store every argument unchanged under its own name, nothing else
        arguments = dict(locals())
        del arguments["self"]
        vars(self).update(arguments)

    @classmethod
    def from_params(cls, params: dict) -> "SCHashFormer":
        """The estimator with ``params`` (a dict of constructor arguments); an unknown name is a
        :class:`ParameterError` naming it, not a TypeError. Values are checked by :meth:`check_params`."""
        unknown = sorted(set(params) - set(PARAM_DEFAULTS))
        if unknown:
            raise ParameterError(f"unknown parameter(s) {unknown}; see schashformer.SCHashFormer")
        return cls(**params)

    def check_params(self) -> None:
        """Check every parameter (types and ranges): :class:`ParameterError` naming the first at fault.

        ``fit`` runs it first; the command line and ``main.py`` run it before reading any data.
        Checks that need the data (``n_clusters`` at most the number of cells) are made by ``fit``.
        """
        n_clusters_mod.check_resolution(self.resolution)
        check_params(self.get_params(), PARAM_TYPES)

    @property
    def config(self) -> TrainConfig:
        """The training configuration: a :class:`TrainConfig` of this estimator's training parameters,
        checked, built anew on each access (change parameters with ``set_params``, not through it)."""
        params = {name: getattr(self, name) for name in TRAIN_FIELDS}
        check_params(params, PARAM_TYPES)
        return TrainConfig(**params)

    def result_params(self) -> dict:
        """The parameters that define the result (all but :data:`RUN_ONLY`), as plain Python values:
        what :meth:`save`, the checkpoint fingerprint and the run record (``rerun``) store."""
        return {name: value.item() if isinstance(value, np.generic) else value
                for name, value in self.get_params().items() if name not in RUN_ONLY}

    # ------------------------------------------------------------------ fitting
    def fit(self, adata: ad.AnnData, *, batch_key: str | None = None, labels_key: str | None = None,
            layer: str | None = None, resume: bool = False, stats: GeneStats | None = None) -> "SCHashFormer":
        """Train both stages on ``adata`` (raw counts, cells x genes) and cluster its cells.

        ``labels_key`` is used only to report bucket purity, never for training. With
        ``resume=True`` and a checkpoint in ``checkpoint_dir`` written by the same run (same
        data, parameters, seed, device type and package version), training continues from
        it; without a checkpoint the fit starts from the beginning. ``resume=False`` starts
        afresh and replaces any checkpoint there.

        Inputs with more than ``train_cells`` cells (a TrainConfig field, default 50,000) and
        AnnData opened with ``backed='r'`` go through the out-of-core path
        (:func:`schashformer.streaming.fit_out_of_core`): gene statistics from one streaming pass,
        training on a random subsample of ``train_cells`` cells, then hashing, encoding and
        assignment of every cell in streaming passes. ``stats`` (GeneStats) fixes the genes and
        their standardisation instead of computing them from ``adata`` (that path uses it).
        """
        check_adata(adata)
        self.check_params()
        if stats is None and (adata.isbacked or adata.n_obs > self.config.train_cells):
            return streaming.fit_out_of_core(self, streaming.CountSource.from_anndata(adata, layer), batch_key=batch_key,
                                   labels_key=labels_key, resume=resume)
        for key, what in ((batch_key, "batch_key"), (labels_key, "labels_key")):
            if key is not None and key not in adata.obs:
                raise InputError(f"{what} {key!r} is not a column of adata.obs (columns: {list(adata.obs.columns)})")
            if key is not None and adata.n_obs and adata.obs[key].isna().all():
                raise InputError(f"{what} {key!r}: every value is missing")
        known_k = self.n_clusters is not None
        if known_k and self.n_clusters > adata.n_obs:
            raise ParameterError(f"n_clusters={self.n_clusters} is larger than the number of cells ({adata.n_obs})")
        if not known_k:  # a resolution too high for this many cells would collapse K to 2 after training
            n_clusters_mod.check_resolution_for(self.resolution, adata.n_obs, self.config.graph_neighbors)
        if resume and self.checkpoint_dir is None:
            raise ParameterError("resume=True needs checkpoint_dir= (where the checkpoint to resume is)")
        # stats given = training on the subsample of a larger input (streaming.fit_out_of_core)
        cfg, device = (self.config if stats is None else self.config.for_subsample()), resolve(self.device)
        log.info("scHashFormer: fitting on %s", device)
        counts = adata.layers[layer] if layer is not None and layer in adata.layers else adata.X
        resources.check_fits(resources.fit_bytes(counts, self.n_clusters or n_clusters_mod.MEMORY_K, cfg),
                             f"clustering {adata.n_obs} cells x {adata.n_vars} genes",
                             "free memory, use a machine with more, or cluster a subset of the cells")
        rng = np.random.default_rng(self.seed)
        self.timings_ = {}

        with self._stage("preprocess"):
            prep = prepare(adata, n_top_genes=self.n_top_genes, layer=layer, allow_noncounts=self.allow_noncounts,
                           stats=stats)
            if known_k and prep.n_cells < self.n_clusters:
                raise ParameterError(f"n_clusters={self.n_clusters} exceeds the {prep.n_cells} cells with counts")
            batch_index, self.batch_categories_ = self._batches(adata, batch_key, prep.cell_mask)
            data = CellData(prep, batch_index, len(self.batch_categories_), device)
        self.stats_ = prep.stats
        warn_narrow(cfg, prep.n_genes, prep.n_cells)

        ckpt = None if self.checkpoint_dir is None else self.checkpointer(prep, data, device, rng, self.checkpoint_dir)
        state = ckpt.load() if ckpt is not None and resume else None
        if ckpt is not None and not resume:
            ckpt.remove()  # a fresh fit never leaves another run's files to be resumed by mistake
        if state is not None:
            log.info("resuming from %s (%s, step %d)", ckpt.path, state["phase"], state["step"])

        labels = None if labels_key is None else np.asarray(adata.obs[labels_key])[prep.cell_mask]

        def on_codes(codes):
            self.bucket_stats_ = buckets.bucket_stats(codes, labels)
            if known_k:
                self._warn_few_buckets(codes, cfg.bits_for(prep.n_cells))

        result = engine.fit(prep, data, cfg, n_clusters=self.n_clusters, resolution=self.resolution, seed=self.seed,
                            rng=rng, checkpoint=ckpt, state=state, progress=self.progress, stage=self._stage,
                            on_codes=on_codes, reduced_precision=stats is not None)
        self.adopt(result, prep.cell_mask)
        if ckpt is not None and not self.keep_checkpoint:
            ckpt.remove()
        return self

    def adopt(self, result: engine.FitResult, cell_mask: np.ndarray) -> None:
        """Set the fitted attributes from the engine's result (every fit path ends here).

        ``result`` holds every kept cell (gathered from all processes); ``cell_mask`` (input cells,)
        marks the kept ones among the input cells.
        """
        self.indexer_, self.encoder_, self.decoder_, self.head_ = (result.indexer, result.encoder, result.decoder,
                                                                   result.head)
        self.n_clusters_ = int(result.n_clusters)
        self.token_axes_, self.token_scale_ = result.token_axes, result.token_scale
        self.history_ = result.history
        self.codes_ = expand_to_cells(result.codes_all, cell_mask, -1)
        self.embedding_ = expand_to_cells(result.z, cell_mask, 0.0)
        self.labels_ = expand_to_cells(result.q.argmax(1), cell_mask, -1)
        self.kmeans_labels_ = (None if result.kmeans_labels is None
                               else expand_to_cells(result.kmeans_labels, cell_mask, -1))
        self.n_removed_cells_ = int((~cell_mask).sum())
        self.max_attention_elements_ = self.encoder_.max_scores_numel
        self._fitted = True

    def fit_predict(self, adata: ad.AnnData, **kwargs) -> np.ndarray:
        """``fit`` then return ``labels_``."""
        return self.fit(adata, **kwargs).labels_

    # ------------------------------------------------------------------ new cells
    def transform(self, adata: ad.AnnData, *, layer: str | None = None) -> np.ndarray:
        """Embedding (cells, latent) of new cells measured on the training genes.

        New cells are hashed by the trained indexer and attend to each other within
        their own sorted chunks; cells with zero counts on the model's genes get zeros.
        """
        self.check_fitted()
        prep = prepare(adata, layer=layer, allow_noncounts=self.allow_noncounts, stats=self.stats_)
        z = self._embed(prep)
        return expand_to_cells(z, prep.cell_mask, 0.0)

    def predict(self, adata: ad.AnnData, *, layer: str | None = None) -> np.ndarray:
        """Cluster of each new cell (argmax of the soft assignment); -1 for cells with zero counts."""
        self.check_fitted()
        prep = prepare(adata, layer=layer, allow_noncounts=self.allow_noncounts, stats=self.stats_)
        z = self._embed(prep)
        with torch.no_grad():
            self.head_.eval()
            q = self.head_(torch.from_numpy(z).to(self.head_.centres.device)).cpu().numpy()
        return expand_to_cells(q.argmax(1), prep.cell_mask, -1)

    def _embed(self, prep: Prepared) -> np.ndarray:
        cfg, device = self.config, self.head_.centres.device
        codes, h, hidden = engine.hash_cells(self.indexer_, CellData(prep, device=device), cfg.infer_batch)
        tokens, _ = engine.token_features(prep, hidden, self.token_axes_, self.token_scale_)
        return engine.embed_tokens(self.encoder_, tokens, engine.sorted_orders(codes, engine.tie_break_keys(h)), cfg, device)

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the trained model to directory ``path`` (``model.pt`` inside)."""
        self.check_fitted()
        path = Path(path)
        target = path / _MODEL_FILE
        if target.exists() and not overwrite:
            raise OutputExistsError(f"{target} already exists; pass overwrite=True to replace it")
        path.mkdir(parents=True, exist_ok=True)
        state = {
            "init": self.result_params(),
            "stats": {"genes": [str(g) for g in self.stats_.genes], "mean": torch.from_numpy(self.stats_.mean),
                      "std": torch.from_numpy(self.stats_.std), "median_library": float(self.stats_.median_library)},
            "batch_categories": list(map(str, self.batch_categories_)),
            "n_bits": self.indexer_.n_bits, "n_clusters_": int(self.n_clusters_),
            "indexer": self.indexer_.state_dict(), "encoder": self.encoder_.state_dict(),
            "decoder": self.decoder_.state_dict(), "head": self.head_.state_dict(),
        }
        if self.token_axes_ is not None:
            state["tokens"] = {"axes": torch.from_numpy(self.token_axes_), "scale": float(self.token_scale_)}
        tmp = target.with_name("." + _MODEL_FILE + ".tmp")
        torch.save(state, tmp)
        tmp.replace(target)
        return target

    @classmethod
    def load(cls, path: str | Path, *, device: str = "auto") -> "SCHashFormer":
        """Load a model written by :meth:`save` (a directory or its ``model.pt``)."""
        path = Path(path)
        target = path / _MODEL_FILE if path.is_dir() else path
        if not target.exists():
            raise InputError(f"{target}: no saved scHashFormer model there")
        try:
            state = torch.load(target, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a corrupt file
            raise InputError(f"{target}: not a readable scHashFormer model ({type(exc).__name__})") from None
        dev = resolve(device)
        try:
            model = cls._from_state(state, device)
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
            raise InputError(f"{target}: not a scHashFormer model this version can load ({one_line(exc)})") from None
        for name in ("indexer", "encoder", "decoder", "head"):
            getattr(model, name + "_").to(dev).eval()
        model._fitted = True
        return model

    @classmethod
    def _from_state(cls, state: dict, device: str) -> "SCHashFormer":
        """Rebuild a model (on the CPU) from the dictionary :meth:`save` wrote.

        Parameters it lacks (``resolution`` in models saved before it existed) take their defaults; the names older
        versions used are renamed (:func:`schashformer.record.rename_legacy`).
        """
        init = record.rename_legacy(dict(state["init"]))
        model = cls.from_params({**init, "device": device, "progress": False})
        model.n_clusters_ = int(state.get("n_clusters_", model.n_clusters))
        cfg, st = model.config, state["stats"]
        model.stats_ = GeneStats(np.asarray(st["genes"]), st["mean"].numpy(), st["std"].numpy(), st["median_library"])
        model.batch_categories_ = state["batch_categories"]
        n_genes, n_batches = len(model.stats_.genes), len(model.batch_categories_)
        axes = state["indexer"].get("projection")
        model.indexer_ = LSHIndexer(n_genes, cfg.hidden, cfg.hash_latent, cfg.hash_heads, state["n_bits"], n_batches,
                                    cfg.dropout, None if axes is None else torch.zeros_like(axes))
        tokens = state.get("tokens")
        model.token_axes_ = None if tokens is None else tokens["axes"].numpy()
        model.token_scale_ = None if tokens is None else tokens["scale"]
        n_pcs = 0 if tokens is None else model.token_axes_.shape[1]
        model.encoder_, model.decoder_ = engine.build_stage2(cfg, cfg.hash_latent + n_pcs, n_genes, n_batches, "cpu")
        model.head_ = ClusterHead(model.n_clusters_, model.encoder_.n_latent)
        for name in ("indexer", "encoder", "decoder", "head"):
            getattr(model, name + "_").load_state_dict(state[name])
        return model

    # ------------------------------------------------------------------ helpers
    def check_fitted(self) -> None:
        if not getattr(self, "_fitted", False):
            raise ParameterError("this SCHashFormer is not fitted yet; call fit(adata) first")

    def _warn_few_buckets(self, codes: np.ndarray, n_bits: int) -> None:
        """Warn when there are fewer distinct hash buckets (combined over heads) than clusters.

        Not an error: stage 2 embeds every cell from its own features too and k-means can split a
        bucket (3 simulated types in 2 buckets, 1 head of 1 bit: ARI 0.84 against 0.99 with the
        automatic bits), but neighbourhoods from so few buckets carry little structure.
        """
        n_buckets = len(np.unique(codes, axis=0))
        if self.n_clusters > n_buckets:
            warnings.warn(f"n_clusters={self.n_clusters} exceeds the {n_buckets} distinct hash buckets the cells fall "
                          f"into (combined over {codes.shape[1]} heads of {n_bits} bits); clusters will "
                          "split buckets and may be poorer: use more hash_bits or fewer clusters, or check for "
                          "duplicated cells", UserWarning, stacklevel=3)

    def checkpointer(self, prep: Prepared, data: CellData, device: torch.device, rng: np.random.Generator,
                     directory: str | Path) -> Checkpointer:
        """The checkpointer of a fit on ``prep`` in ``directory``, with the fingerprint of this run
        (package version, data, every parameter, seed, device type)."""
        batch = np.zeros(0, np.int64) if data.batch_index is None else data.batch_index
        c = prep.counts
        # one entry per parameter that defines the result, so a refusal names the parameter that differs
        fingerprint = {**self.result_params(), "version": __version__, "device_type": device.type,
                       "data": fingerprint_arrays(c.indptr, c.indices, c.data, prep.size_factors, prep.stats.mean,
                                                  prep.stats.std, batch, prep.cell_mask,
                                                  np.asarray(prep.stats.genes, dtype=str))}
        return Checkpointer(directory, self.checkpoint_every, fingerprint, rng)

    @contextmanager
    def _stage(self, name: str):
        start = time.perf_counter()
        yield
        self.timings_[name] = {"seconds": round(time.perf_counter() - start, 3), "peak_rss_gib": round(resources.peak_rss_gib(), 3)}
        log.info("%s: %.1f s", name, self.timings_[name]["seconds"])

    @staticmethod
    def _batches(adata: ad.AnnData, batch_key: str | None, cell_mask: np.ndarray):
        if batch_key is None:
            return None, []
        col = adata.obs[batch_key]
        if col.isna().any():
            raise InputError(f"batch_key {batch_key!r} has {int(col.isna().sum())} missing values")
        cats = pd.Categorical(col.astype(str))
        return cats.codes[cell_mask].astype(np.int64), list(cats.categories)


# every constructor parameter with its default, in signature order, and its annotation: the list that
# tl, the command line, the configs, save, the checkpoint fingerprint and rerun derive theirs from
PARAM_DEFAULTS = {name: p.default for name, p in inspect.signature(SCHashFormer.__init__).parameters.items()
                  if name != "self"}
PARAM_TYPES = {name: hint for name, hint in typing.get_type_hints(SCHashFormer.__init__).items() if name != "return"}
