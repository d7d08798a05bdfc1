"""SCHashFormer: the user-facing estimator (data set-up, training, embedding, saving).

The networks live in :mod:`schashformer.nn`, the training loops in
:mod:`schashformer.train`; this module wires them to AnnData, like a scikit-learn
estimator: ``fit`` / ``transform`` / ``predict`` / ``fit_predict`` / ``save`` / ``load``.
"""

from __future__ import annotations

import logging
import resource
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch

from . import buckets, resources
from . import n_clusters as n_clusters_mod
from .data import CellData
from .errors import InputError, OutputExistsError, ParameterError
from .nn import ClusterHead, LSHIndexer, NeighbourhoodEncoder, ZINBDecoder
from .checkpoint import PHASES, Checkpointer, fingerprint_arrays
from .preprocess import GeneStats, Prepared, expand_to_cells, prepare, principal_axes
from .train import Stage2, TrainConfig, hash_cells, sorted_orders, token_features, train_indexer
from .validate import check_adata, check_params, is_int, one_line, resolve

log = logging.getLogger(__name__)
_MODEL_FILE = "model.pt"


def _keeps_global_rng(fit):
    """Run ``fit`` with torch's and numpy's global generators seeded (dropout and module initialisation
    draw from torch's) and give the caller's generator states back afterwards
    (``torch.random.fork_rng``): fitting a model never reseeds the user's random state."""
    import functools

    @functools.wraps(fit)
    def wrapped(self, *args, **kwargs):
        device = resolve(self.device)
        cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
        log.info("scHashFormer: fitting on %s", device)
        numpy_state = np.random.get_state()
        try:
            with torch.random.fork_rng(devices=cuda):
                return fit(self, *args, **kwargs)
        finally:
            np.random.set_state(numpy_state)

    return wrapped


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


class SCHashFormer:
    """Learnable-LSH + local-attention clustering of single-cell counts.

    Parameters
    ----------
    n_clusters : number of clusters K (2 <= K <= cells), or None to estimate it: after stage-2
        pre-training, Leiden on the hash-neighbourhood kNN graph of z at ``resolution`` gives K
        and the partition that initialises the clustering head (:mod:`schashformer.n_clusters`).
    resolution : Leiden resolution used when ``n_clusters`` is None (> 0; default 0.5): higher
        gives more, finer clusters, lower fewer, coarser ones. Ignored when K is given.
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
    **params : any field of :class:`schashformer.train.TrainConfig`.

    Attributes after ``fit``
    ------------------------
    labels_ : (cells,) cluster of each input cell (-1 for cells with zero counts).
    n_clusters_ : the number of clusters used: ``n_clusters``, or the estimate when it was None.
    embedding_ : (cells, latent) embedding z (zeros for cells with zero counts).
    codes_ : (cells, hash_heads) hash bucket ids.
    bucket_stats_ : list of per-head bucket statistics.
    timings_ : wall time (s) and peak resident memory (GiB) per stage.
    history_ : training losses.
    """

    def __init__(self, n_clusters: int | None = None, *, resolution: float = n_clusters_mod.DEFAULT_RESOLUTION,
                 n_top_genes: int = 2000,
                 seed: int = 0, device: str = "auto", allow_noncounts: bool = False, progress: bool = True,
                 checkpoint_dir: str | Path | None = None, checkpoint_every: int = 100, keep_checkpoint: bool = False,
                 **params):
        check_params(params)
        self.resolution = n_clusters_mod.check_resolution(resolution)
        for name, value, low in (("seed", seed, 0), ("n_top_genes", n_top_genes, 1),
                                 ("checkpoint_every", checkpoint_every, 0)):
            if not is_int(value) or value < low:
                raise ParameterError(f"{name} must be an integer >= {low}, got {value!r}")
        self.n_clusters, self.n_top_genes, self.seed = n_clusters, n_top_genes, seed
        self.n_clusters_ = n_clusters  # the K used: None until fit estimates it when not given
        self.device, self.allow_noncounts, self.progress = device, allow_noncounts, progress
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.checkpoint_every, self.keep_checkpoint = checkpoint_every, keep_checkpoint
        self.config = TrainConfig(**params)
        self.config.validate()
        self._fitted = False

    # ------------------------------------------------------------------ fitting
    @_keeps_global_rng
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
        if stats is None and (adata.isbacked or adata.n_obs > self.config.train_cells):
            from .streaming import CountSource, fit_out_of_core

            return fit_out_of_core(self, CountSource.from_anndata(adata, layer), batch_key=batch_key,
                                   labels_key=labels_key, resume=resume)
        for key, what in ((batch_key, "batch_key"), (labels_key, "labels_key")):
            if key is not None and key not in adata.obs:
                raise InputError(f"{what} {key!r} is not a column of adata.obs (columns: {list(adata.obs.columns)})")
            if key is not None and adata.n_obs and adata.obs[key].isna().all():
                raise InputError(f"{what} {key!r}: every value is missing")
        known_k = self.n_clusters is not None
        if known_k and (not is_int(self.n_clusters) or self.n_clusters < 2):
            raise ParameterError(f"n_clusters must be an integer >= 2, got {self.n_clusters!r} "
                                 "(or None to estimate it)")
        if known_k and self.n_clusters > adata.n_obs:
            raise ParameterError(f"n_clusters={self.n_clusters} is larger than the number of cells ({adata.n_obs})")
        if resume and self.checkpoint_dir is None:
            raise ParameterError("resume=True needs checkpoint_dir= (where the checkpoint to resume is)")
        # stats given = training on the subsample of a larger input (streaming.fit_out_of_core)
        cfg, device = (self.config if stats is None else self.config.for_subsample()), resolve(self.device)
        counts = adata.layers[layer] if layer is not None and layer in adata.layers else adata.X
        resources.check_fits(resources.fit_bytes(counts, self.n_clusters or n_clusters_mod.MEMORY_K, cfg),
                             f"clustering {adata.n_obs} cells x {adata.n_vars} genes",
                             "free memory, use a machine with more, or cluster a subset of the cells")
        self._seed_everything()
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
        n_batches = data.n_batches

        ckpt = self._checkpointer(prep, data, device, rng)
        state = ckpt.load() if ckpt is not None and resume else None
        if ckpt is not None and not resume:
            ckpt.remove()  # a fresh fit never leaves another run's files to be resumed by mistake
        if state is not None:
            log.info("resuming from %s (%s, step %d)", ckpt.path, state["phase"], state["step"])

        def at(phase):  # the checkpoint was written exactly here: continue from it
            return state is not None and state["phase"] == phase

        def past(phase):  # the checkpoint is at or after this point: skip the work, load its result
            return state is not None and PHASES.index(state["phase"]) >= PHASES.index(phase)

        with self._stage("stage1_hashing"):
            axes = None if cfg.input_pcs == 0 else torch.from_numpy(principal_axes(prep, cfg.input_pcs))
            self.indexer_ = LSHIndexer(prep.n_genes, cfg.hidden, cfg.hash_latent, cfg.hash_heads,
                                       cfg.bits_for(prep.n_cells), n_batches, cfg.dropout, axes).to(device)
            if ckpt is not None:
                ckpt.modules["indexer"] = self.indexer_
            if past("stage1_done"):
                ckpt.load_modules(state)
                history = list(state["history1"])
                codes, h, hidden = ckpt.load_hashes()
            else:
                history = train_indexer(self.indexer_, data, cfg, rng, self.progress, ckpt,
                                        state if at("stage1") else None)
                codes, h, hidden = hash_cells(self.indexer_, data, cfg.infer_batch)
                if ckpt is not None:
                    ckpt.save_hashes(codes, h, hidden)
                    ckpt.extra["history1"] = history
                    ckpt.save("stage1_done")
            if ckpt is not None:
                ckpt.extra["history1"] = history
            if at("stage1_done"):
                ckpt.restore_rngs(state)
            labels = None if labels_key is None else np.asarray(adata.obs[labels_key])[prep.cell_mask]
            self.bucket_stats_ = buckets.bucket_stats(codes, labels)
            if known_k:
                self._warn_few_buckets(codes)

        with self._stage("stage2_encoder"):
            self.token_axes_ = None if cfg.token_pcs == 0 else principal_axes(prep, cfg.token_pcs).astype(np.float32)
            tokens, self.token_scale_ = token_features(prep, hidden, self.token_axes_)
            # unknown K: the clustering head is built once K is estimated, after pre-training
            self.n_clusters_ = self.n_clusters
            self._build_stage2(tokens.shape[1], prep.n_genes, n_batches, device)
            stage2 = Stage2(self.encoder_, self.decoder_, self.head_, data, tokens, sorted_orders(codes, h), cfg, rng)
            if ckpt is not None:
                ckpt.modules.update(encoder=self.encoder_, decoder=self.decoder_)
                if known_k:
                    ckpt.modules["head"] = self.head_
            if past("pretrain_done"):
                ckpt.load_modules(state)
                stage2.history = list(state["history2"])
            else:
                stage2.pretrain(self.progress, ckpt, state if at("pretrain") else None)
                if ckpt is not None:
                    ckpt.save("pretrain_done", history2=stage2.history)
            if at("pretrain_done"):
                ckpt.restore_rngs(state)

        with self._stage("stage2_clustering"):
            if not known_k:
                self._estimate_k(stage2, state if past("centres") else None)
                if ckpt is not None:
                    ckpt.modules["head"] = self.head_
                    ckpt.extra["n_clusters_estimated"] = int(self.n_clusters_)
            if past("centres"):
                ckpt.load_modules(state)
                kmeans_labels = state["kmeans_labels"].numpy()
            else:  # K given or estimated: k-means on z places the K centres (measured: better than Leiden's partition)
                kmeans_labels = stage2.init_centres(self.seed)
            if ckpt is not None:
                ckpt.extra["kmeans_labels"] = torch.from_numpy(np.asarray(kmeans_labels, dtype=np.int64))
                if not past("centres"):
                    ckpt.save("centres", history2=stage2.history)
            if at("centres"):
                ckpt.restore_rngs(state)
            self.kmeans_labels_ = expand_to_cells(kmeans_labels, prep.cell_mask, -1)
            if past("done"):
                ckpt.load_modules(state)
                stage2.history = list(state["history2"])
            else:
                stage2.cluster(self.progress, ckpt, state if at("cluster") else None)
                if ckpt is not None:
                    ckpt.save("done", history2=stage2.history)
            z = stage2.embed_all()
            q = stage2.soft_assign_all(z)

        self.history_ = history + stage2.history
        self.codes_ = expand_to_cells(codes, prep.cell_mask, -1)
        self.embedding_ = expand_to_cells(z, prep.cell_mask, 0.0)
        self.labels_ = expand_to_cells(q.argmax(1), prep.cell_mask, -1)
        self.n_removed_cells_ = int((~prep.cell_mask).sum())
        self.max_attention_elements_ = self.encoder_.max_scores_numel
        self._fitted = True
        if ckpt is not None and not self.keep_checkpoint:
            ckpt.remove()
        return self

    def fit_predict(self, adata: ad.AnnData, **kwargs) -> np.ndarray:
        """``fit`` then return ``labels_``."""
        return self.fit(adata, **kwargs).labels_

    # ------------------------------------------------------------------ new cells
    def transform(self, adata: ad.AnnData, *, layer: str | None = None) -> np.ndarray:
        """Embedding (cells, latent) of new cells measured on the training genes.

        New cells are hashed by the trained indexer and attend to each other within
        their own sorted chunks; cells with zero counts on the model's genes get zeros.
        """
        self._check_fitted()
        prep = prepare(adata, layer=layer, allow_noncounts=self.allow_noncounts, stats=self.stats_)
        z = self._embed(prep)
        return expand_to_cells(z, prep.cell_mask, 0.0)

    def predict(self, adata: ad.AnnData, *, layer: str | None = None) -> np.ndarray:
        """Cluster of each new cell (argmax of the soft assignment); -1 for cells with zero counts."""
        self._check_fitted()
        prep = prepare(adata, layer=layer, allow_noncounts=self.allow_noncounts, stats=self.stats_)
        z = self._embed(prep)
        with torch.no_grad():
            self.head_.eval()
            q = self.head_(torch.from_numpy(z).to(self.head_.centres.device)).cpu().numpy()
        return expand_to_cells(q.argmax(1), prep.cell_mask, -1)

    def _embed(self, prep: Prepared) -> np.ndarray:
        data = CellData(prep, device=self.head_.centres.device)
        codes, h, hidden = hash_cells(self.indexer_, data, self.config.infer_batch)
        tokens, _ = token_features(prep, hidden, self.token_axes_, self.token_scale_)
        stage2 = Stage2(self.encoder_, self.decoder_, self.head_, data, tokens, sorted_orders(codes, h), self.config,
                        np.random.default_rng(self.seed))
        return stage2.embed_all()

    def _build_stage2(self, token_width: int, n_genes: int, n_batches: int, device) -> None:
        """Encoder, decoder and clustering head; with ``token_residual`` z has the token's width.

        The head needs K: with ``n_clusters_`` still None (K to be estimated) it is left None.
        """
        cfg = self.config
        z_dim = token_width if cfg.token_residual else cfg.latent
        self.encoder_ = NeighbourhoodEncoder(token_width, cfg.d_model, cfg.attn_heads, z_dim, cfg.layers, cfg.dropout,
                                             cfg.token_residual, cfg.attention).to(device)
        self.decoder_ = ZINBDecoder(z_dim, n_genes, cfg.hidden // 2, n_batches).to(device)
        self.head_ = None if self.n_clusters_ is None else ClusterHead(self.n_clusters_, z_dim).to(device)

    def _estimate_k(self, stage2: Stage2, state: dict | None) -> None:
        """Estimate K on the pre-trained z (or take it from a checkpoint ``state`` past that point) and
        build the clustering head for it. Only K is kept: k-means at that K then places the centres, as
        when K is given (on the benchmark data the Leiden partition itself was a worse start)."""
        if state is not None:
            self.n_clusters_ = int(state["n_clusters_estimated"])
        else:
            cfg = self.config
            z = stage2.embed_all()
            self.n_clusters_, _ = n_clusters_mod.estimate(z, stage2.orders, cfg.chunk_size, resolution=self.resolution,
                                                          n_neighbors=cfg.graph_neighbors, seed=self.seed)
            log.info("estimated number of clusters: %d (resolution %g)", self.n_clusters_, self.resolution)
        self.head_ = ClusterHead(self.n_clusters_, self.encoder_.n_latent).to(stage2.data.device)
        stage2.head = self.head_

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the trained model to directory ``path`` (``model.pt`` inside)."""
        self._check_fitted()
        path = Path(path)
        target = path / _MODEL_FILE
        if target.exists() and not overwrite:
            raise OutputExistsError(f"{target} already exists; pass overwrite=True to replace it")
        path.mkdir(parents=True, exist_ok=True)
        state = {
            "init": {"n_clusters": self.n_clusters, "resolution": self.resolution, "n_top_genes": self.n_top_genes,
                     "seed": self.seed,
                     "allow_noncounts": self.allow_noncounts, **self.config.to_dict()},
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
        """Rebuild a model (on the CPU) from the dictionary :meth:`save` wrote."""
        init = dict(state["init"])
        model = cls(init.pop("n_clusters"), resolution=init.pop("resolution", n_clusters_mod.DEFAULT_RESOLUTION), n_top_genes=init.pop("n_top_genes"),
                    seed=init.pop("seed"), allow_noncounts=init.pop("allow_noncounts"), device=device, progress=False,
                    **init)
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
        model._build_stage2(cfg.hash_latent + n_pcs, n_genes, n_batches, "cpu")
        for name in ("indexer", "encoder", "decoder", "head"):
            getattr(model, name + "_").load_state_dict(state[name])
        return model

    # ------------------------------------------------------------------ helpers
    def _check_fitted(self) -> None:
        if not self._fitted:
            raise ParameterError("this SCHashFormer is not fitted yet; call fit(adata) first")

    def _warn_few_buckets(self, codes: np.ndarray) -> None:
        """Warn when there are fewer distinct hash buckets (combined over heads) than clusters.

        Not an error: stage 2 embeds every cell from its own features too and k-means can split a
        bucket (3 simulated types in 2 buckets, 1 head of 1 bit: ARI 0.84 against 0.99 with the
        automatic bits), but neighbourhoods from so few buckets carry little structure.
        """
        n_buckets = len(np.unique(codes, axis=0))
        if self.n_clusters > n_buckets:
            warnings.warn(f"n_clusters={self.n_clusters} exceeds the {n_buckets} distinct hash buckets the cells fall "
                          f"into (combined over {codes.shape[1]} heads of {self.indexer_.n_bits} bits); clusters will "
                          "split buckets and may be poorer: use more hash_bits or fewer clusters, or check for "
                          "duplicated cells", UserWarning, stacklevel=3)

    def _checkpointer(self, prep: Prepared, data: CellData, device: torch.device,
                      rng: np.random.Generator) -> Checkpointer | None:
        """The fit's checkpointer (None without ``checkpoint_dir``), with the fingerprint of this run."""
        if self.checkpoint_dir is None:
            return None
        from . import __version__

        batch = np.zeros(0, np.int64) if data.batch_index is None else data.batch_index
        c = prep.counts
        fingerprint = {"version": __version__, "device_type": device.type, "seed": int(self.seed),
                       "n_clusters": -1 if self.n_clusters is None else int(self.n_clusters),
                       "resolution": float(self.resolution), "n_top_genes": int(self.n_top_genes),
                       "allow_noncounts": bool(self.allow_noncounts),
                       "params": repr(sorted(self.config.to_dict().items())),
                       "data": fingerprint_arrays(c.indptr, c.indices, c.data, prep.size_factors, prep.stats.mean,
                                                  prep.stats.std, batch, prep.cell_mask,
                                                  np.asarray(prep.stats.genes, dtype=str))}
        return Checkpointer(self.checkpoint_dir, self.checkpoint_every, fingerprint, rng)

    def _seed_everything(self) -> None:
        """Seed the global generators; ``fit`` (:func:`_keeps_global_rng`) restores the caller's states after."""
        torch.manual_seed(self.seed)
        np.random.seed(self.seed % 2**32)

    @contextmanager
    def _stage(self, name: str):
        start = time.perf_counter()
        yield
        self.timings_[name] = {"seconds": round(time.perf_counter() - start, 3), "peak_rss_gib": round(_peak_rss_gib(), 3)}
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
