"""Out-of-core clustering: count matrices larger than the training subsample, read in row chunks.

The in-memory path (:func:`schashformer.preprocess.prepare` + :meth:`SCHashFormer.fit`) holds four
sparse copies of the counts and passes over every cell in every training phase. At atlas scale
(10^5 .. 10^6+ cells) :func:`fit_out_of_core` replaces it by:

1. **one streaming pass** over row chunks of the file (:class:`CountSource`): count validation,
   per-gene sums of the log-normalised values and of the normalised counts (their squares too),
   which give the highly variable genes (scanpy's ``seurat`` flavour, :func:`schashformer.preprocess.select_genes`) and the
   standardisation mean/std of every cell, exactly as :func:`prepare` computes them in memory;
   the same pass keeps the rows of a seeded random **training subsample** (``TrainConfig.train_cells``);
2. **training on the subsample** with the global gene statistics: the unchanged two-stage
   :meth:`SCHashFormer.fit` (fixed step counts, so training cost does not grow with the data);
3. **a second streaming pass** that standardises one chunk at a time and hashes every cell
   (bucket ids, continuous codes) and builds its stage-2 token (stage-1 hidden + principal components);
4. **encoding and assignment** of every cell: sort-and-chunk local attention over the hash-sorted
   order of all cells (attention cost per cell is fixed: C x 2C scores), then the Student-t head.

Memory is the subsample (O(its non-zeros)), one chunk of rows, and O(cells) small per-cell arrays
(tokens, codes, embedding: ~200 floats per cell): never a dense cells x genes array and never the
whole input matrix. Time is linear in cells: two reads of the file, one hashing pass, one
attention pass. The same code runs on CUDA (``device='cuda'``), where the per-chunk tensors move to
the GPU. Both per-cell passes run under :func:`schashformer.engine.inference_precision` (bfloat16 on
GPUs and on CPUs with bf16 units), and so do stage 2's embeddings of the training subsample; the training
steps themselves are float32 on the CPU.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata.io import read_elem, sparse_dataset, write_elem
from tqdm.auto import tqdm

from . import buckets, engine, record, resources
from .errors import InputError, ParameterError
from .io import safe_frame, safe_uns
from .preprocess import (
    CLIP,
    TARGET_SUM,
    GeneSums,
    expand_to_cells,
    gene_stats,
    log_normalise,
    select_genes,
    validate_counts,
)

log = logging.getLogger(__name__)
#: dtype in which :func:`hash_all` holds every cell's token for the attention pass (see there)
TOKEN_DTYPE = np.float16
CHUNK_ROWS = 32768  # rows read and prepared at once: ~ 32768 x (nnz per row) x 8 bytes of CSR


# ----------------------------------------------------------------------------- row chunks
class CountSource:
    """A cells x genes count matrix served in row chunks (CSR float32), in memory or in a ``.h5ad`` file.

    Use :meth:`from_h5ad` (the matrix stays on disk; anndata's ``sparse_dataset`` reads row slices
    of a CSR ``X`` or layer, h5py those of a dense one) or :meth:`from_anndata` (an AnnData in
    memory, or one opened with ``backed='r'``).

    Attributes: ``n_obs``, ``n_vars``, ``obs`` (DataFrame), ``var_names`` (Index), ``path`` (None in memory).
    """

    def __init__(self, matrix, obs: pd.DataFrame, var_names: pd.Index, where: str, path: Path | None = None,
                 handle: h5py.File | None = None):
        self._x, self.obs, self.var_names, self.where, self.path, self._handle = matrix, obs, var_names, where, path, handle
        self.n_obs, self.n_vars = int(matrix.shape[0]), int(matrix.shape[1])

    @classmethod
    def from_h5ad(cls, path: str | Path, layer: str | None = None) -> "CountSource":
        """Open ``path`` read-only; ``obs`` and ``var`` are read, the matrix is not."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: no such file")
        try:
            f = h5py.File(path, "r")
        except OSError as exc:
            raise InputError(f"{path}: not a readable HDF5/h5ad file ({exc})") from None
        try:
            key = "X" if layer is None else f"layers/{layer}"
            if key not in f:
                raise InputError(f"{path}: no {key} in the file"
                                 + (f" (layers: {list(f['layers'])})" if layer and "layers" in f else ""))
            node = f[key]
            if isinstance(node, h5py.Group):
                enc = node.attrs.get("encoding-type", "")
                if enc == "csc_matrix":
                    raise InputError(f"{path}: {key} is stored column-major (CSC); out-of-core reading needs rows: "
                                     "rewrite it as CSR (adata.X = adata.X.tocsr(); adata.write_h5ad(...))")
                matrix = sparse_dataset(node)
            else:
                matrix = node
            obs = read_elem(f["obs"])
            var = read_elem(f["var"])
        except InputError:
            f.close()
            raise
        except (KeyError, ValueError, TypeError, OSError) as exc:
            f.close()
            raise InputError(f"{path}: cannot be read as h5ad ({type(exc).__name__}: {str(exc)[:120]})") from None
        where = f"{path.name}:{key}"
        return cls(matrix, obs, pd.Index(np.asarray(var.index).astype(str)), where, path, f)

    @classmethod
    def from_anndata(cls, adata: ad.AnnData, layer: str | None = None) -> "CountSource":
        """Rows of ``adata.X`` (or ``layer``); a backed AnnData is read from its file."""
        if adata.isbacked and layer is None:
            return cls.from_h5ad(adata.filename)
        if layer is not None and layer not in adata.layers:
            raise InputError(f"layer {layer!r} not found; available layers: {list(adata.layers)}")
        x = adata.X if layer is None else adata.layers[layer]
        if x is None:
            raise InputError("adata.X is empty (None); pass layer= to use a layer of counts")
        where = "adata.X" if layer is None else f"adata.layers[{layer!r}]"
        return cls(x, adata.obs, pd.Index(np.asarray(adata.var_names).astype(str)), where)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows ``start:stop`` as CSR float32."""
        block = self._x[start:stop]
        if not sp.issparse(block):
            block = np.asarray(block)
            if block.dtype.kind not in "biuf":
                raise InputError(f"{self.where} has dtype {block.dtype}; expected numbers")
        return sp.csr_matrix(block, dtype=np.float32)

    def chunks(self, chunk_rows: int = CHUNK_ROWS, desc: str | None = None, progress: bool = False):
        """Yield (start, CSR float32 rows start:start + chunk_rows) over all rows."""
        bar = tqdm(total=self.n_obs, desc=desc, unit="cells", disable=not progress, leave=False)
        for start in range(0, self.n_obs, chunk_rows):
            block = self.rows(start, min(start + chunk_rows, self.n_obs))
            yield start, block
            bar.update(block.shape[0])
        bar.close()

    def chunk_adata(self, start: int, block: sp.csr_matrix) -> ad.AnnData:
        """An AnnData of one chunk (all genes), named like the source's genes."""
        a = ad.AnnData(block)
        a.var_names = self.var_names
        return a


# ----------------------------------------------------------------------------- pass 1: statistics
@dataclass
class StreamStats:
    """What the first pass gathers: per-gene sums over kept cells and the training subsample."""

    sums: GeneSums  # per-gene sums over every kept cell
    cell_mask: np.ndarray  # (cells,) total > 0
    sample_rows: np.ndarray  # (m,) sorted rows of the training subsample
    canonical_nnz: np.ndarray  # (cells,) non-zeros per row after canonicalisation (checksum)
    digests: tuple  # running SHA-256 of the canonical indices and data (checksum)
    sample: list = field(default_factory=list)  # CSR chunks of the subsample's rows (all genes)


def scan(source: CountSource, sample_rows: np.ndarray, *, allow_noncounts: bool = False,
         chunk_rows: int = CHUNK_ROWS, progress: bool = False) -> StreamStats:
    """First pass: validate the counts, accumulate per-gene sums (:class:`GeneSums`, as the in-memory
    :func:`schashformer.preprocess.prepare` does), keep the ``sample_rows``."""
    g = source.n_vars
    if source.n_obs == 0 or g == 0:
        raise InputError(f"{source.where} is empty: {source.n_obs} cells x {g} genes")
    st = StreamStats(GeneSums.zeros(g), np.zeros(source.n_obs, bool), np.asarray(sample_rows, np.int64),
                     np.zeros(source.n_obs, np.int64), (hashlib.sha256(), hashlib.sha256()))
    for start, x in source.chunks(chunk_rows, "reading: statistics", progress):
        stop = start + x.shape[0]
        validate_counts(x, allow_noncounts, where=f"{source.where} (rows {start}..{stop - 1})")
        x.sum_duplicates()
        x.eliminate_zeros()
        st.canonical_nnz[start:stop] = np.diff(x.indptr)
        record.update_row_digests(x, st.digests)
        total = np.asarray(x.sum(1), dtype=np.float64).ravel()
        if not np.isfinite(total).all():
            raise InputError(f"{source.where}: the counts of some cells sum beyond the float range; expected raw counts")
        keep = total > 0
        st.cell_mask[start:stop] = keep
        lo, hi = np.searchsorted(st.sample_rows, [start, stop])
        if hi > lo:
            st.sample.append(x[st.sample_rows[lo:hi] - start])
        if not keep.all():
            x, total = x[keep], total[keep]
        st.sums = st.sums + GeneSums.of(log_normalise(x, total))
    if st.sums.n == 0:
        raise InputError(f"all {source.n_obs} cells of {source.where} have zero counts; nothing to cluster")
    return st


# ----------------------------------------------------------------------------- the fit
def fit_out_of_core(model, source: CountSource, *, batch_key: str | None = None, labels_key: str | None = None,
                    resume: bool = False, chunk_rows: int = CHUNK_ROWS):
    """Fit ``model`` (:class:`~schashformer.model.SCHashFormer`) on every cell of ``source`` out of core.

    Trains on a random subsample of ``model.config.train_cells`` cells (seeded by ``model.seed``)
    with gene statistics from all cells, then hashes, encodes and assigns every cell in streaming
    passes. Sets the fitted attributes as :meth:`SCHashFormer.fit` does (``labels_``, ``embedding_``,
    ``codes_``, ``bucket_stats_``, ``timings_`` with one entry per pass) plus ``train_rows_``
    (the subsample) and ``out_of_core_ = True``.
    """
    cfg = model.config
    n = source.n_obs
    for key, what in ((batch_key, "batch_key"), (labels_key, "labels_key")):
        if key is not None and key not in source.obs:
            raise InputError(f"{what} {key!r} is not a column of obs (columns: {list(source.obs.columns)})")
    if model.n_clusters is not None and model.n_clusters > n:
        raise ParameterError(f"n_clusters={model.n_clusters} is larger than the number of cells ({n})")
    timings = {}
    start_time = [time.perf_counter()]

    def done(name: str):
        now = time.perf_counter()
        timings[name] = {"seconds": round(now - start_time[0], 3), "peak_rss_gib": round(resources.peak_rss_gib(), 3)}
        log.info("%s: %.1f s", name, timings[name]["seconds"])
        start_time[0] = now

    m = int(min(cfg.train_cells, n))
    sample_rows = np.sort(np.random.default_rng(model.seed).choice(n, size=m, replace=False))
    resources.check_fits(out_of_core_bytes(source, m, model.n_clusters or 64, cfg),
                         f"clustering {n} cells x {source.n_vars} genes out of core",
                         "free memory, lower train_cells, or use a machine with more")

    st = scan(source, sample_rows, allow_noncounts=model.allow_noncounts, chunk_rows=chunk_rows,
              progress=model.progress)
    cols = select_genes(st.sums, model.n_top_genes)
    sub = ad.AnnData(sp.vstack(st.sample, format="csr") if st.sample else sp.csr_matrix((0, source.n_vars)),
                     obs=source.obs.iloc[sample_rows].copy())
    sub.var_names = source.var_names
    st.sample = []
    # median library of the selected genes: from the subsample (the size-factor denominator only)
    lib = np.asarray(sub.X[:, cols].sum(1)).ravel()
    lib = lib[lib > 0]
    stats = gene_stats(st.sums, cols, source.var_names, float(np.median(lib)) if lib.size else 1.0)
    model.stream_scan_ = st  # kept for the checksum (canonical non-zeros per row)
    done("read_statistics")

    model.fit(sub, batch_key=batch_key, labels_key=labels_key, resume=resume, stats=stats)
    sub_timings = {f"train_{k}": v for k, v in model.timings_.items()}
    timings.update(sub_timings)
    start_time[0] = time.perf_counter()
    del sub

    device = next(model.indexer_.parameters()).device
    # batches enter only the ZINB decoders (training): inference needs none
    codes, ties, tokens, cell_mask = hash_all(model, source, chunk_rows=chunk_rows)
    done("hash_all")

    orders = engine.sorted_orders(codes, ties)
    del ties
    z = encode_all(model, tokens, orders, device)
    del tokens, orders
    done("encode_all")
    labels = assign_all(model, z, device)
    done("assign_all")

    model.labels_ = expand_to_cells(labels, cell_mask, -1)
    model.embedding_ = expand_to_cells(z, cell_mask, 0.0)
    model.codes_ = expand_to_cells(codes, cell_mask, -1)
    lab = None if labels_key is None else np.asarray(source.obs[labels_key])[cell_mask]
    model.bucket_stats_ = buckets.bucket_stats(codes, lab)
    model.n_removed_cells_ = int((~cell_mask).sum())
    model.train_rows_ = sample_rows
    model.out_of_core_ = True
    model.timings_ = timings
    return model


def chunk_logn(block: sp.csr_matrix, columns: np.ndarray) -> tuple[sp.csr_matrix, np.ndarray]:
    """Log-normalised values of the model's genes for one chunk, and its kept-cell mask.

    ``columns`` (model genes,) are the source column of each model gene. The arithmetic is that of
    :func:`schashformer.preprocess.prepare` (size from all genes, float32), so values are identical;
    only the model's columns are normalised and the raw counts are not kept (inference needs neither).
    """
    total = np.asarray(block.sum(1), dtype=np.float64).ravel()
    keep = total > 0
    x = block[keep][:, columns] if not keep.all() else block[:, columns]
    logn = sp.csr_matrix(sp.diags((TARGET_SUM / total[keep]).astype(np.float32)) @ x, dtype=np.float32)
    np.log1p(logn.data, out=logn.data)
    return logn, keep


def standardise(logn: sp.csr_matrix, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Dense standardised rows (rows, genes) float32 on ``mean``'s device, clipped at +-CLIP: the values of
    ``Prepared.standardised`` (the same float32 operations, in place), on torch's threads (numpy's are one)."""
    x = torch.from_numpy(logn.toarray()).to(mean.device)
    return x.sub_(mean).div_(std).clamp_(-CLIP, CLIP)


@torch.no_grad()
def hash_all(model, source: CountSource, *, chunk_rows: int = CHUNK_ROWS):
    """Second pass: bucket ids (cells, H), tie-break keys (cells, H), tokens (cells, T), kept-cell mask.

    Each chunk is log-normalised on the model's genes (:func:`chunk_logn`), standardised one
    minibatch at a time, hashed by the stage-1 indexer and projected on the token principal axes;
    only per-cell results are kept, written into arrays allocated once for all cells (no list of
    parts and no concatenated copy). The continuous codes (cells, H, bits) are reduced to their
    tie-break keys (:func:`engine.tie_break_keys`) as they come, the only use inference has for them.

    Tokens are stored in float16 (the attention pass reads them back as float32): with the float32
    embedding beside them they are the largest per-cell arrays (2 GB in float32 at 10^7 cells), and
    float16's ~5e-4 relative rounding is far below the distances that separate cells (z moves by
    ~1e-3; the 10^6-cell ARI is unchanged, docs/METHOD_CHOICES.md).
    """
    indexer, cfg, stats = model.indexer_, model.config, model.stats_
    indexer.eval()
    device = next(indexer.parameters()).device
    axes = None if model.token_axes_ is None else torch.from_numpy(model.token_axes_).to(device)
    mean, std = (torch.from_numpy(np.asarray(v, np.float32)).to(device) for v in (stats.mean, stats.std))
    columns = source.var_names.get_indexer(stats.genes)
    if (columns < 0).any():
        missing = str(stats.genes[np.flatnonzero(columns < 0)[0]])
        raise InputError(f"{source.where}: {int((columns < 0).sum())} of the model's genes are missing (e.g. {missing!r})")
    n, n_heads = source.n_obs, indexer.n_heads
    codes = np.empty((n, n_heads), np.int64)
    ties = np.empty((n, n_heads), np.float64)
    tokens = np.empty((n, model.encoder_.n_latent), TOKEN_DTYPE)
    cell_mask = np.zeros(n, bool)
    kept = 0
    for start, block in source.chunks(chunk_rows, "hashing all cells", model.progress):
        logn, keep = chunk_logn(block, columns)
        cell_mask[start:start + len(keep)] = keep
        for s in range(0, logn.shape[0], cfg.infer_batch):
            x = standardise(logn[s:s + cfg.infer_batch], mean, std)
            with engine.inference_precision(device, cfg):
                hidden, h = indexer(x)
            hidden, h = hidden.float(), h.float()
            pcs = None if axes is None else x @ axes  # float32, as the in-memory tokens (engine.token_features)
            rows = slice(kept, kept + len(x))
            codes[rows] = indexer.codes(h).cpu().numpy()
            ties[rows] = engine.tie_break_keys(h.cpu().numpy())
            tok = hidden if pcs is None else torch.cat([hidden, model.token_scale_ * pcs], 1)
            tokens[rows] = tok.cpu().numpy()
            kept += len(x)
    # views, not copies, of the kept cells' rows
    return codes[:kept], ties[:kept], tokens[:kept], cell_mask


@torch.no_grad()
def encode_all(model, tokens: np.ndarray, orders: list[np.ndarray], device: torch.device) -> np.ndarray:
    """Embedding z (cells, latent) of every cell: local attention over the hash-sorted order of all cells,
    under :func:`engine.inference_precision`; z itself is float32."""
    return engine.embed_tokens(model.encoder_, tokens, orders, model.config, device,
                               reduced_precision=True).astype(np.float32, copy=False)


@torch.no_grad()
def assign_all(model, z: np.ndarray, device: torch.device, batch: int = 65536) -> np.ndarray:
    """argmax of the Student-t soft assignment per cell, in batches (never cells x cells)."""
    model.head_.eval()
    out = [model.head_(torch.from_numpy(z[s:s + batch]).to(device)).argmax(1).cpu().numpy()
           for s in range(0, len(z), batch)]
    return np.concatenate(out) if out else np.zeros(0, np.int64)


# ----------------------------------------------------------------------------- memory and checksum
def out_of_core_bytes(source: CountSource, train_cells: int, n_clusters: int, cfg) -> int:
    """Low estimate of the memory :func:`fit_out_of_core` holds: the training subsample as the
    in-memory fit needs it, one chunk, and the per-cell arrays of the inference passes."""
    nnz_per_row = _nnz_per_row(source)
    sub_nnz = int(train_cells * nnz_per_row)
    sub = resources.fit_bytes(sp.csr_matrix((train_cells, source.n_vars)), n_clusters, cfg) + \
        4 * sub_nnz * resources.CSR_BYTES_PER_VALUE
    chunk = int(CHUNK_ROWS * nnz_per_row * resources.CSR_BYTES_PER_VALUE * 3)
    token = cfg.hash_latent + cfg.token_pcs
    # float16 tokens and float32 z; int64 codes, float64 tie-break keys and int64 sorted orders per head;
    # one head's int64 chunk table; the kept-cell mask (hash_all, encode_all)
    per_cell = (2 + 4) * token + 8 * 3 * cfg.hash_heads + 8 + 1
    return int(sub + chunk + source.n_obs * per_cell)


def _nnz_per_row(source: CountSource) -> float:
    x = source._x
    if hasattr(x, "group") and "data" in getattr(x, "group", {}):  # anndata sparse_dataset
        return x.group["data"].shape[0] / max(source.n_obs, 1)
    if sp.issparse(x):
        return x.nnz / max(source.n_obs, 1)
    return float(source.n_vars)  # dense: an upper bound


def data_checksum(source: CountSource, st: StreamStats | None = None, chunk_rows: int = CHUNK_ROWS) -> str:
    """:func:`schashformer.record.data_checksum` of the whole matrix, computed chunk by chunk.

    Same bytes in the same order (canonical CSR), so a file and the same counts in memory give the
    same checksum. With the :class:`StreamStats` of :func:`scan` no further pass over the data is needed.
    """
    if st is not None and st.digests is not None:
        nnz, (indices, data) = st.canonical_nnz, st.digests
    else:
        indices, data, parts = hashlib.sha256(), hashlib.sha256(), []
        for _, x in source.chunks(chunk_rows):
            x = _canonical(x)
            parts.append(np.diff(x.indptr))
            record.update_row_digests(x, (indices, data))
        nnz = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    indptr = np.zeros(source.n_obs + 1, np.int64)
    np.cumsum(nnz, out=indptr[1:])
    return record.combine_checksum((source.n_obs, source.n_vars), record.array_digest(indptr, np.int64), indices, data)


def _canonical(x: sp.csr_matrix) -> sp.csr_matrix:
    x.sum_duplicates()
    x.eliminate_zeros()
    return x


# ----------------------------------------------------------------------------- results on disk
def write_result_h5ad(source_path: Path, target: Path, obs: pd.DataFrame, obsm: dict, uns: dict) -> Path:
    """``target`` = the input file plus the results: a file copy (X never loaded), then obs, obsm and
    uns entries written with anndata's ``write_elem``. Atomic (hidden temporary file, then rename)."""
    tmp = target.with_name("." + target.name + ".tmp")
    try:
        shutil.copyfile(source_path, tmp)
        with h5py.File(tmp, "a") as f:
            del f["obs"]
            write_elem(f, "obs", safe_frame(obs))
            for key, value in obsm.items():
                if "obsm" not in f:
                    write_elem(f, "obsm", {})
                if key in f["obsm"]:
                    del f["obsm"][key]
                write_elem(f["obsm"], key, value)
            old = read_elem(f["uns"]) if "uns" in f else {}
            if "uns" in f:
                del f["uns"]
            write_elem(f, "uns", safe_uns({**old, **uns}, "uns"))
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
