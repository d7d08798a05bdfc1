"""Multi-process training on ``torch.distributed``: DistributedDataParallel, launched by ``torchrun``.

One process per rank (a GPU with the nccl backend, ``LOCAL_RANK`` picking the GPU, or a CPU
process with gloo). The data flow follows the single-process fit step by step; what changes
is where each cell lives and which numbers are reduced across ranks:

1. **Shards.** Rank r reads rows ``[r N / W, (r + 1) N / W)`` of the input only (``.h5ad``:
   anndata backed mode; X/Y ``.h5``: an h5py row slice; other formats are read whole and
   sliced). A cell's *home* is the rank that read it.
2. **Gene statistics** are identical on every rank: per-shard sufficient statistics
   (detections, sums and squared sums of the normalised expression, the genes x genes Gram
   matrix for the principal axes) are all-reduced, the per-cell library sizes all-gathered
   for the size-factor median, and the seurat-flavour highly variable genes are computed
   from the reduced sums (:func:`seurat_hvg`, the same arithmetic as scanpy's).
3. **Stage 1.** Every rank draws the *same global* minibatch from a generator seeded alike
   (global row ids, plus the masking and noise of the whole batch) and computes its own
   rows. The ZINB term is a sum over cells (each rank adds its share); the in-batch terms
   (contrastive, bit balance, quantisation) need the whole batch, so the small hash
   embeddings h (batch x heads x bits) are all-gathered. DDP averages the gradients, so a
   step is the single-process step up to rounding and dropout masks.
4. **Sort and chunk.** Hash codes (a few ints per cell) are all-gathered; every rank computes
   the same global sorted order per hash head. The sorted order is cut into W contiguous
   ranges of whole chunks; rank r owns the chunks that start in its range and fetches the
   tokens, counts and size factors of those cells (plus a halo of one chunk on each side for
   the look-back and the shifted chunk borders) from their home ranks with ``all_to_all``.
   A chunk's tokens therefore always sit on one rank: attention needs no communication.
5. **Stage 2.** The global chunk batches are drawn from the shared generator (as in one
   process); each rank computes the chunks it owns; DDP averages the gradients.
6. **Clustering.** z of every cell is sent home; k-means runs on rank 0 on all z (or a
   uniform subsample of :data:`KMEANS_MAX_CELLS`) and the centres are broadcast; the DEC
   cluster frequencies f_j = sum_i q_ij are all-reduced, so the target P is the global one.
7. **Result.** Rank 0 gathers labels, embeddings and codes and writes one result, the same
   files as ``schashformer cluster``.

Launch: ``schashformer cluster IN --n-clusters K --out DIR --nproc N`` (one node) or
``torchrun ... -m schashformer.distributed cluster IN ...`` (several nodes); see
docs/DISTRIBUTED.md for the design, launch commands and measured figures.
"""

from __future__ import annotations

import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from . import buckets, errors
from .data import CellData
from .errors import InputError, ParameterError, SCHashFormerError, TrainingError
from .nn import ClusterHead, LSHIndexer, NeighbourhoodEncoder, ZINBDecoder, zinb_nll
from .nn.cluster_head import kl_loss
from .nn.lsh import bit_balance_loss, bucket_contrastive_loss
from .preprocess import (GeneStats, Prepared, _log_normalise, check_names, count_matrix, expand_to_cells,
                         validate_counts)
from .train import TrainConfig, _ChunkCursor, _optimiser, _RowCursor, view_noise_sd

log = logging.getLogger(__name__)

KMEANS_MAX_CELLS = 200_000  # k-means on rank 0 sees every z up to this many cells, a uniform subsample beyond
ERROR_FILE_ENV = "SCHASHFORMER_ERROR_FILE"  # where a worker leaves its one-line error for the launcher


# ----------------------------------------------------------------------------- process group
@dataclass
class Context:
    """This process's place in the group: rank, world size, compute device, backend."""

    rank: int
    world: int
    device: torch.device
    backend: str

    @property
    def comm_device(self) -> torch.device:
        """nccl moves CUDA tensors only; gloo CPU tensors."""
        return self.device if self.backend == "nccl" else torch.device("cpu")


def init(device: str = "auto", backend: str | None = None) -> Context:
    """Join the process group torchrun set up (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` ... in the environment).

    ``device`` 'auto' takes GPU ``LOCAL_RANK`` when CUDA is available, else the CPU; the
    backend is nccl on GPUs and gloo on CPUs unless ``backend`` names one.
    """
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        raise ParameterError("not started by torchrun (RANK / WORLD_SIZE are not set); use "
                             "'schashformer cluster ... --nproc N' or see docs/DISTRIBUTED.md")
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise ParameterError("device='cuda' was requested but no CUDA GPU is available; use --device cpu or auto")
    if device not in ("auto", "cpu", "cuda"):
        raise ParameterError(f"device must be auto, cpu or cuda with --nproc, got {device!r}")
    if want_cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        if local >= torch.cuda.device_count():
            raise ParameterError(f"local rank {local} has no GPU of its own ({torch.cuda.device_count()} GPUs): "
                                 "start at most one process per GPU (--nproc) or use --device cpu")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    backend = backend or ("nccl" if want_cuda else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return Context(dist.get_rank(), dist.get_world_size(), dev, backend)


def shard_bounds(n: int, world: int) -> np.ndarray:
    """Row boundaries (world + 1,) of ``world`` contiguous, near-equal shards of ``n`` rows."""
    return (np.arange(world + 1, dtype=np.int64) * n) // world


# ----------------------------------------------------------------------------- collectives on numpy arrays
def _to(ctx: Context, a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(ctx.comm_device)


def allreduce(ctx: Context, a: np.ndarray) -> np.ndarray:
    """Sum of ``a`` over ranks (float64 for sums of many cells)."""
    t = _to(ctx, np.asarray(a, dtype=np.float64))
    dist.all_reduce(t)
    return t.cpu().numpy()


def allgather(ctx: Context, a: np.ndarray) -> np.ndarray:
    """Rows of ``a`` (any length per rank) from every rank, concatenated in rank order."""
    a = np.ascontiguousarray(a)
    n = torch.tensor([len(a)], device=ctx.comm_device)
    sizes = [torch.zeros_like(n) for _ in range(ctx.world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    pad = np.zeros((max(sizes),) + a.shape[1:], dtype=a.dtype)
    pad[: len(a)] = a
    parts = [torch.empty_like(_to(ctx, pad)) for _ in range(ctx.world)]
    dist.all_gather(parts, _to(ctx, pad))
    return np.concatenate([p.cpu().numpy()[:s] for p, s in zip(parts, sizes)])


def alltoall(ctx: Context, rows: np.ndarray, send_counts: np.ndarray) -> np.ndarray:
    """Send ``rows`` (grouped by destination: ``send_counts[r]`` rows to rank r); returns the rows received,
    grouped by source rank."""
    sc = torch.as_tensor(np.asarray(send_counts, dtype=np.int64), device=ctx.comm_device)
    rc = torch.empty_like(sc)
    dist.all_to_all_single(rc, sc)
    rows = np.ascontiguousarray(rows)
    width = int(np.prod(rows.shape[1:], dtype=np.int64))
    out = torch.empty(int(rc.sum()) * width, dtype=torch.from_numpy(rows[:0]).dtype, device=ctx.comm_device)
    dist.all_to_all_single(out, _to(ctx, rows.reshape(-1)), (rc * width).tolist(), (sc * width).tolist())
    return out.cpu().numpy().reshape((-1,) + rows.shape[1:])


def owner_of(bounds: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Rank owning each position, for contiguous ranges ``bounds`` (world + 1,)."""
    return np.searchsorted(bounds, positions, side="right") - 1


class RowStore:
    """Rows this rank holds, keyed by global cell id, and the exchange that fetches rows held elsewhere.

    Parameters
    ----------
    ids : (n,) sorted global ids of the rows held here.
    """

    def __init__(self, ctx: Context, ids: np.ndarray):
        self.ctx, self.ids = ctx, np.asarray(ids, dtype=np.int64)

    def fetch(self, table: np.ndarray, want: np.ndarray, where: np.ndarray) -> np.ndarray:
        """Rows of ``table`` (aligned with ``ids`` on each rank) for global ids ``want`` held by ranks ``where``."""
        order = np.argsort(where, kind="stable")
        counts = np.bincount(where, minlength=self.ctx.world)
        recv = self._exchange_counts(counts)
        asked = alltoall(self.ctx, want[order], counts)
        reply = alltoall(self.ctx, table[self._local(asked)], recv)
        out = np.empty_like(reply)
        out[order] = reply
        return out

    def fetch_csr(self, matrix: sp.csr_matrix, want: np.ndarray, where: np.ndarray) -> sp.csr_matrix:
        """Rows of the CSR ``matrix`` (aligned with ``ids``) for global ids ``want`` held by ranks ``where``."""
        order = np.argsort(where, kind="stable")
        counts = np.bincount(where, minlength=self.ctx.world)
        recv = self._exchange_counts(counts)
        asked = self._local(alltoall(self.ctx, want[order], counts))
        nnz = np.diff(matrix.indptr)[asked]
        got_nnz = alltoall(self.ctx, nnz, recv)  # per requested row, in request order
        sub = matrix[asked]
        send_nnz = _per_group(nnz, recv)  # entries to each requesting rank
        indices = alltoall(self.ctx, sub.indices.astype(np.int64), send_nnz)
        data = alltoall(self.ctx, sub.data, send_nnz)
        indptr = np.concatenate([[0], np.cumsum(got_nnz)])
        got = sp.csr_matrix((data, indices, indptr), shape=(len(want), matrix.shape[1]))
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return got[inverse]

    def _exchange_counts(self, counts: np.ndarray) -> np.ndarray:
        return alltoall(self.ctx, np.asarray(counts, np.int64), np.ones(self.ctx.world, np.int64))

    def _local(self, want: np.ndarray) -> np.ndarray:
        pos = np.searchsorted(self.ids, want)
        if len(want) and (pos.max() >= len(self.ids) or not np.array_equal(self.ids[pos], want)):
            raise RuntimeError("a rank was asked for rows it does not hold")  # a bug, never user input
        return pos


def _per_group(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Sums of ``values`` over consecutive groups of ``counts`` rows."""
    csum = np.concatenate([[0], np.cumsum(values, dtype=np.int64)])
    ends = np.cumsum(counts)
    return csum[ends] - csum[ends - counts]


class _GatherRows(torch.autograd.Function):
    """All-gather rows (autograd-aware): forward concatenates every rank's rows in rank order;
    backward returns this rank's slice of the gradient only.

    Every rank computes the same loss of the gathered tensor and multiplies it by the world
    size; DDP's gradient average then sums each rank's share, which is the full gradient.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, counts: list[int], rank: int) -> torch.Tensor:
        biggest = max(counts)
        pad = x.new_zeros((biggest,) + x.shape[1:])
        pad[: len(x)] = x
        parts = [torch.empty_like(pad) for _ in counts]
        dist.all_gather(parts, pad.contiguous())
        ctx.lo, ctx.n = sum(counts[:rank]), counts[rank]
        return torch.cat([p[:c] for p, c in zip(parts, counts)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad[ctx.lo:ctx.lo + ctx.n], None, None


def agree(ctx: Context, fn, *args, **kwargs):
    """Run ``fn`` on every rank; if it raised a package error on any rank, raise it on all of them.

    Without this, one rank rejecting its shard would leave the others waiting in a collective.
    """
    try:
        result, failure = fn(*args, **kwargs), None
    except SCHashFormerError as exc:
        result, failure = None, (type(exc).__name__, str(exc))
    failures = [None] * ctx.world
    dist.all_gather_object(failures, failure)
    for rank, f in enumerate(failures):
        if f is not None:
            cls = getattr(errors, f[0], SCHashFormerError)
            raise cls(f[1] if ctx.world == 1 else f"rank {rank}: {f[1]}")
    return result


# ----------------------------------------------------------------------------- reading a shard
def read_shard(ctx: Context, path: str | Path, *, format: str | None = None, labels_key: str | None = None,
               transpose: bool = False, layer: str | None = None) -> tuple[ad.AnnData, int, int]:
    """This rank's contiguous shard of the cells of ``path``; returns (shard, total cells, first row).

    ``.h5ad`` is read through :class:`schashformer.streaming.CountSource` (row slices of ``X`` or
    ``layer``; a ``.h5ad`` with ``layer`` gives a shard holding that layer only) and X/Y ``.h5``
    through h5py, so only the shard's rows are read; other formats are read whole and sliced.
    """
    from . import io

    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    fmt = io._check_format(format) if format is not None else io._guess_format(path)
    if fmt == "h5ad":  # the out-of-core reader of the streaming path: CSR row slices, the rest stays on disk
        from .streaming import CountSource

        source = CountSource.from_h5ad(path, layer=layer)
        try:
            n = source.n_obs
            lo, hi = (int(b) for b in shard_bounds(n, ctx.world)[ctx.rank:ctx.rank + 2])
            rows = source.rows(lo, hi)
            obs = source.obs.iloc[lo:hi].copy()
            obs.index = obs.index.astype(str)
            var = pd.DataFrame(index=source.var_names)
        finally:
            source.close()
        shard = ad.AnnData(rows, obs=obs, var=var) if layer is None else ad.AnnData(obs=obs, var=var,
                                                                                    layers={layer: rows})
        return shard, n, lo
    if fmt == "xy_h5":
        import h5py

        with h5py.File(path, "r") as f:
            if "X" not in f or f["X"].ndim != 2:
                raise InputError(f"{path}: HDF5 file has no 2-D dataset 'X' (found: {sorted(f.keys())})")
            n = f["X"].shape[0]
            lo, hi = (int(b) for b in shard_bounds(n, ctx.world)[ctx.rank:ctx.rank + 2])
            io._check_dtype(path, f["X"].dtype)
            block = 8192  # dense on disk: densify a block of rows at a time, never the whole shard
            x = sp.vstack([sp.csr_matrix(np.asarray(f["X"][s:min(s + block, hi)], dtype=np.float32))
                           for s in range(lo, hi, block)] or [sp.csr_matrix((0, f["X"].shape[1]), dtype=np.float32)],
                          format="csr")
            y = f["Y"][lo:hi] if "Y" in f else None
        shard = ad.AnnData(x)
        shard.obs_names = [f"cell{i}" for i in range(lo, hi)]
        shard.var_names = [f"gene{j}" for j in range(x.shape[1])]
        if y is not None:
            shard.obs[labels_key or "label"] = io._labels_as_str(np.asarray(y).ravel())
        return shard, n, lo
    full = io.read(path, format=format, labels_key=labels_key, transpose=transpose)
    lo, hi = (int(b) for b in shard_bounds(full.n_obs, ctx.world)[ctx.rank:ctx.rank + 2])
    return full[lo:hi].copy(), full.n_obs, lo


# ----------------------------------------------------------------------------- global gene statistics
def seurat_hvg(n: int, s1: np.ndarray, s2: np.ndarray, n_top_genes: int) -> np.ndarray:
    """Indices of the ``n_top_genes`` highly variable genes (scanpy's 'seurat' flavour) from sums.

    ``s1``, ``s2`` (genes,) are the sums over all ``n`` cells of expm1(log-normalised expression)
    and of its square: what scanpy computes from the whole matrix, reduced across shards instead.
    Empty result: no gene has a defined dispersion (the caller falls back to the variance).
    """
    from .streaming import normalised_dispersion

    mean = s1 / n
    var = (s2 / n - mean**2) * (n / (n - 1) if n > 1 else 1.0)
    norm = normalised_dispersion(mean, var)
    finite = norm[~np.isnan(norm)]
    if finite.size == 0:
        return np.zeros(0, dtype=np.int64)
    cutoff = np.sort(finite)[::-1][min(n_top_genes, finite.size) - 1]
    return np.flatnonzero(np.nan_to_num(norm, nan=-np.inf) >= cutoff)


def _prepare_local(adata: ad.AnnData, layer: str | None, allow_noncounts: bool):
    check_names(adata)
    x = count_matrix(adata, layer)
    validate_counts(x, allow_noncounts, where="adata.X" if layer is None else f"adata.layers[{layer!r}]")
    total = np.asarray(x.sum(1)).ravel()
    if not np.isfinite(total).all():
        raise InputError(f"the counts of {int((~np.isfinite(total)).sum())} cells sum beyond the float32 range; "
                         "expected raw counts")
    return x, total


def prepare_shard(ctx: Context, adata: ad.AnnData, *, n_top_genes: int = 2000, layer: str | None = None,
                  allow_noncounts: bool = False) -> Prepared:
    """:func:`schashformer.preprocess.prepare` of this rank's shard with statistics of *all* shards.

    Cells with zero counts are dropped locally; detections, gene sums, squared sums and the
    library sizes are reduced across ranks, so every rank selects the same genes with the same
    mean, standard deviation and size-factor median.
    """
    x, total = agree(ctx, _prepare_local, adata, layer, allow_noncounts)
    cell_mask = total > 0
    n_kept = int(allreduce(ctx, np.array([cell_mask.sum()]))[0])
    if n_kept == 0:
        raise InputError(f"all {int(allreduce(ctx, np.array([len(total)]))[0])} cells have zero counts; "
                         "nothing to cluster")
    x, total = x[cell_mask], total[cell_mask]
    logn = _log_normalise(x, total)
    detected = np.flatnonzero(allreduce(ctx, np.diff(logn.tocsc().indptr)) > 0)
    if detected.size == 0:
        raise InputError("no gene has a non-zero count in the kept cells; nothing to cluster")
    if detected.size <= n_top_genes:
        cols = detected
    else:
        sub = logn[:, detected]
        e = sub.copy()
        np.expm1(e.data, out=e.data)
        sums = allreduce(ctx, np.stack([np.asarray(e.sum(0, dtype=np.float64)).ravel(),
                                        np.asarray(e.multiply(e).sum(0, dtype=np.float64)).ravel(),
                                        np.asarray(sub.sum(0, dtype=np.float64)).ravel(),
                                        np.asarray(sub.multiply(sub).sum(0, dtype=np.float64)).ravel()]))
        chosen = seurat_hvg(n_kept, sums[0], sums[1], n_top_genes)
        if chosen.size == 0:  # no defined dispersion: the most variable genes, as preprocess does
            var = sums[3] / n_kept - (sums[2] / n_kept) ** 2
            chosen = np.sort(np.argsort(-var, kind="stable")[:n_top_genes])
        cols = detected[chosen]
    counts, logn = x[:, cols], logn[:, cols]
    moments = allreduce(ctx, np.stack([np.asarray(logn.sum(0, dtype=np.float64)).ravel(),
                                       np.asarray(logn.multiply(logn).sum(0, dtype=np.float64)).ravel()]))
    mean = moments[0] / n_kept
    std = np.sqrt(np.maximum(moments[1] / n_kept - mean**2, 0.0) * n_kept / max(n_kept - 1, 1))
    std[std == 0] = 1.0
    library = np.asarray(counts.sum(1)).ravel()
    median_library = float(np.median(allgather(ctx, library.astype(np.float32))))
    stats = GeneStats(np.asarray(adata.var_names[cols]).astype(str), mean.astype(np.float32), std.astype(np.float32),
                      median_library if median_library > 0 else 1.0)
    size_factors = np.clip(library / stats.median_library, 1e-3, 1e30).astype(np.float32)
    return Prepared(sp.csr_matrix(counts), sp.csr_matrix(logn), size_factors, stats, cell_mask)


def principal_axes_global(ctx: Context, prep: Prepared, n_comps: int, n_cells: int, chunk: int = 65536) -> np.ndarray:
    """:func:`schashformer.preprocess.principal_axes` with the genes x genes Gram matrix summed over ranks."""
    logn, st = prep.logn, prep.stats
    g = logn.shape[1]
    gram = np.zeros((g, g), dtype=np.float64)
    for start in range(0, logn.shape[0], chunk):
        block = logn[start:start + chunk]
        gram += (block.T @ block).toarray()
    gram = allreduce(ctx, gram)
    n_comps = int(min(n_comps, g, n_cells))
    mean, std = st.mean.astype(np.float64), st.std.astype(np.float64)
    corr = (gram / n_cells - np.outer(mean, mean)) / np.outer(std, std)
    _, vecs = np.linalg.eigh(corr)
    axes = vecs[:, ::-1][:, :n_comps]
    axes *= np.sign(axes[np.abs(axes).argmax(0), np.arange(n_comps)])
    return axes.astype(np.float32)


# ----------------------------------------------------------------------------- stage 1
class _Stage1Loss(nn.Module):
    """The hasher's loss on this rank's rows of a global minibatch (the module DDP wraps)."""

    def __init__(self, indexer: LSHIndexer, cfg: TrainConfig, world: int, rank: int):
        super().__init__()
        self.indexer, self.cfg, self.world, self.rank = indexer, cfg, world, rank

    def forward(self, x1, x2, counts, sf, onehot, sizes: list[int]):
        cfg, ix, n_batch = self.cfg, self.indexer, sum(sizes)
        hidden1, hidden2 = ix.encode(x1), ix.encode(x2)
        src1, src2 = (hidden1.detach(), hidden2.detach()) if cfg.detach_codes else (hidden1, hidden2)
        h1 = _GatherRows.apply(ix.soft_codes(src1), sizes, self.rank)
        h2 = _GatherRows.apply(ix.soft_codes(src2), sizes, self.rank)
        terms = {"contrastive": bucket_contrastive_loss(h1, h2, ix.codes(h1.detach()), cfg.tau, cfg.bucket_weight),
                 "balance": bit_balance_loss(h1), "quantisation": (h1 - h1.detach().round()).abs().mean()}
        loss = (cfg.w_contrastive * terms["contrastive"] + cfg.w_balance * terms["balance"]
                + cfg.w_quantisation * terms["quantisation"])
        local = torch.zeros((), device=x1.device)
        if not len(x1):  # no rows here this step: still touch every parameter so DDP's reduction completes
            local = sum(p.sum() for p in self.parameters()) * 0.0
        elif cfg.w_zinb > 0:
            zinb = zinb_nll(counts, *ix.decoder(hidden1, sf, onehot)) * (len(x1) / n_batch)  # this rank's share
            local = cfg.w_zinb * zinb
        # every rank holds the whole batch's in-batch terms: scale by W, DDP divides by W again
        return self.world * (local + loss), local.detach(), {k: v.detach() for k, v in terms.items()}


def train_indexer(ctx: Context, indexer: LSHIndexer, data: CellData, home: np.ndarray, cfg: TrainConfig,
                  rng: np.random.Generator, progress: bool) -> list[dict]:
    """Stage 1 with DDP: the global minibatches of a one-process run, each rank computing its own rows.

    ``home`` (world + 1,) are the global-id bounds of each rank's kept cells.
    """
    n_global, n_genes = int(home[-1]), data.n_genes
    model = _ddp(ctx, _Stage1Loss(indexer, cfg, ctx.world, ctx.rank), unused=cfg.w_zinb == 0)
    params = list(indexer.parameters())
    opt = _optimiser(params, cfg)
    batch = min(cfg.stage1_batch, n_global)
    gen = torch.Generator(device=data.device).manual_seed(int(rng.integers(2**31)))
    rows_of = _RowCursor(n_global, batch, rng)
    noise = view_noise_sd(data, cfg, reduce=lambda pair: allreduce(ctx, pair))
    history = []
    indexer.train()
    bar = tqdm(range(cfg.stage1_steps), desc=f"stage 1: hashing ({ctx.world} ranks)", disable=not progress,
               leave=False)
    for step in bar:
        rows = rows_of.next()
        if len(rows) < 2:
            continue
        owner = owner_of(home, rows)
        mine = np.flatnonzero(owner == ctx.rank)
        sizes = np.bincount(owner, minlength=ctx.world).tolist()
        local = rows[mine] - home[ctx.rank]
        x = data.inputs(local)
        counts, sf, onehot = data.targets(local)
        # the whole batch's masks and noise, drawn as one process draws them; keep this rank's rows
        pick = torch.from_numpy(mine).to(data.device)
        shape, keep = (len(rows), n_genes), 1.0 - cfg.mask_rate
        x1 = x * (torch.rand(shape, generator=gen, device=data.device)[pick] < keep)
        x2 = x * (torch.rand(shape, generator=gen, device=data.device)[pick] < keep)
        if noise > 0:
            x1 = x1 + noise * torch.randn(shape, generator=gen, device=data.device)[pick]
            x2 = x2 + noise * torch.randn(shape, generator=gen, device=data.device)[pick]
        loss, zinb_share, terms = model(x1, x2, counts, sf, onehot, sizes)
        value = _global_loss(ctx, loss, cfg, "stage 1 (hashing)", step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        if step % 10 == 0 or step == cfg.stage1_steps - 1:
            history.append({"stage": 1, "step": step, "loss": value, **{k: v.item() for k, v in terms.items()}})
            bar.set_postfix(loss=f"{value:.3f}")
    return history


def _ddp(ctx: Context, module: nn.Module, unused: bool = False) -> DDP:
    """DDP around ``module``; buffers are constants (bit weights, fixed projections): never re-sent per step.

    ``unused``: some parameters never get a gradient (the ablations ``w_zinb=0``, ``attention=False``).
    """
    with warnings.catch_warnings():  # newer torch renames broadcast_buffers; the old name works on 2.2 .. 2.14
        warnings.filterwarnings("ignore", message=".*broadcast_buffers", category=FutureWarning)
        return DDP(module, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                   broadcast_buffers=False, find_unused_parameters=unused)


def _global_loss(ctx: Context, loss: torch.Tensor, cfg: TrainConfig, stage: str, step: int) -> float:
    """The whole batch's loss (mean of the ranks' scaled losses); a non-finite one stops every rank alike."""
    t = loss.detach().to(ctx.comm_device, torch.float64).reshape(1)
    dist.all_reduce(t)
    value = float(t) / ctx.world
    if not np.isfinite(value):
        raise TrainingError(f"{stage}, step {step}: loss became {value}; lower lr (now {cfg.lr}) or check the "
                            "input counts")
    return value


@torch.no_grad()
def hash_cells(indexer: LSHIndexer, data: CellData, batch: int):
    """Codes (cells, H), tie-break keys (cells, H) and hidden (cells, n_latent) of this rank's cells."""
    from .train import hash_cells as local_hash

    if data.n_cells == 0:  # a shard whose cells all had zero counts
        return (np.zeros((0, indexer.n_heads), np.int64), np.zeros((0, indexer.n_heads)),
                np.zeros((0, indexer.encoder[-1].normalized_shape[0]), np.float32))
    codes, h, hidden = local_hash(indexer, data, batch)
    return codes, h @ (2.0 ** -np.arange(h.shape[2])), hidden


# ----------------------------------------------------------------------------- stage 2
class ChunkLayout:
    """Which sorted chunks each rank owns, and the rows (tokens, counts, P) it needs for them.

    Every rank knows the global sorted order of every hash head (from the all-gathered codes).
    The sorted positions are cut into W contiguous ranges of whole chunks (the same ranges for
    every head); rank r owns the chunks whose first query falls in range r, for any shift of the
    chunk borders. It holds the rows of the cells at positions [lo - C, hi + C) of every head,
    enough for the queries and the look-back chunk of all its chunks.
    """

    def __init__(self, ctx: Context, orders: list[np.ndarray], chunk_size: int):
        self.ctx, self.orders, self.c = ctx, orders, chunk_size
        n = len(orders[0])
        n_chunks = -(-n // chunk_size)
        self.bounds = np.minimum(chunk_size * ((np.arange(ctx.world + 1) * n_chunks) // ctx.world), n)
        self.bounds[-1] = n
        lo, hi = self.bounds[ctx.rank], self.bounds[ctx.rank + 1]
        halo = np.arange(lo - chunk_size, hi + chunk_size) % n if hi > lo else np.zeros(0, np.int64)
        self.ids = np.unique(np.concatenate([order[halo] for order in orders]))  # sorted global ids held here

    def owner(self, head: int, shift: int, chunk_ids: np.ndarray) -> np.ndarray:
        """Rank owning each chunk of head ``head``'s order cut at ``shift``."""
        n = len(self.orders[head])
        return owner_of(self.bounds, (shift + chunk_ids * self.c) % n)

    def local(self, cells: np.ndarray) -> np.ndarray:
        """Row of each global id (-1 = none, kept as 0 and masked) in the tables held here."""
        return np.searchsorted(self.ids, np.maximum(cells, 0))


class _Stage2Loss(nn.Module):
    """Encoder + decoder (+ clustering head) loss on this rank's chunks of a global batch (wrapped by DDP)."""

    def __init__(self, encoder: NeighbourhoodEncoder, decoder: ZINBDecoder, head: ClusterHead | None,
                 cfg: TrainConfig, world: int):
        super().__init__()
        self.encoder, self.decoder, self.head, self.cfg, self.world = encoder, decoder, head, cfg, world

    def forward(self, x, mask, counts, sf, onehot, p, share: float):
        if x is None:  # no chunk here this step: touch every parameter so DDP's reduction completes
            zero = sum(q.sum() for q in self.parameters()) * 0.0
            return zero, zero.detach(), None
        c = self.cfg.chunk_size
        z = self.encoder(x, mask, n_query=c)[mask[:, -c:]]
        zinb = zinb_nll(counts, *self.decoder(z, sf, onehot))
        loss = self.cfg.w_zinb_stage2 * zinb
        kl = None
        if self.head is not None:
            kl = kl_loss(p, self.head(z))
            loss = loss + self.cfg.w_kl * kl
        # share = this rank's fraction of the batch's query cells: the losses are means over cells
        return self.world * share * loss, zinb.detach(), None if kl is None else kl.detach()


class DistributedStage2:
    """Stage 2 over the rank's chunks; mirrors :class:`schashformer.train.Stage2`.

    Parameters
    ----------
    home : (world + 1,) global-id bounds of each rank's kept cells (their *home* rank).
    features : (home cells, token width) tokens of this rank's home cells.
    data : this rank's home cells (counts, size factors, batches).
    orders : global sorted order per hash head (identical on every rank).
    """

    def __init__(self, ctx: Context, encoder, decoder, head, data: CellData, features: np.ndarray,
                 home: np.ndarray, orders: list[np.ndarray], cfg: TrainConfig, rng: np.random.Generator):
        self.ctx, self.encoder, self.decoder, self.head = ctx, encoder, decoder, head
        self.data, self.home, self.orders, self.cfg, self.rng = data, home, orders, cfg, rng
        self.history: list[dict] = []
        self.layout = ChunkLayout(ctx, orders, cfg.chunk_size)
        ids = self.layout.ids
        self.home_store = RowStore(ctx, np.arange(home[ctx.rank], home[ctx.rank + 1]))
        where = owner_of(home, ids)
        # the rows of the cells of the chunks this rank owns, fetched once from their home ranks
        self.features = torch.from_numpy(self.home_store.fetch(features, ids, where)).to(data.device)
        self.counts = self.home_store.fetch_csr(data.prepared.counts, ids, where)
        self.sf = self.home_store.fetch(data.prepared.size_factors, ids, where)
        self.batch_index = None
        if data.n_batches:
            self.batch_index = self.home_store.fetch(data.batch_index, ids, where)
        self.where = where
        self.p = None  # target distribution of the held cells
        self.steps_done = 0

    # ------------------------------------------------------------------ passes
    def _inputs(self, tokens: np.ndarray):
        c = self.cfg.chunk_size
        mask = tokens >= 0
        dev = self.data.device
        x = self.features[torch.from_numpy(self.layout.local(tokens)).to(dev)]
        query = tokens[:, -c:][mask[:, -c:]]
        return x, torch.from_numpy(mask).to(dev), query

    def _targets(self, query: np.ndarray):
        rows = self.layout.local(query)
        dev = self.data.device
        counts = torch.from_numpy(self.counts[rows].toarray()).to(dev)
        sf = torch.from_numpy(self.sf[rows]).to(dev)
        onehot = None
        if self.data.n_batches:
            b = torch.from_numpy(self.batch_index[rows]).to(dev)
            onehot = torch.nn.functional.one_hot(b, self.data.n_batches).float()
        return counts, sf, onehot

    def pretrain(self, progress: bool) -> None:
        self._run(self.cfg.stage2_pretrain_steps, with_kl=False, progress=progress)

    def cluster(self, progress: bool) -> None:
        self._run(self.cfg.stage2_cluster_steps, with_kl=True, progress=progress)

    def _run(self, n_steps: int, with_kl: bool, progress: bool) -> None:
        cfg, ctx = self.cfg, self.ctx
        net = _Stage2Loss(self.encoder, self.decoder, self.head if with_kl else None, cfg, ctx.world)
        model = _ddp(ctx, net, unused=not cfg.attention)
        params = [p for m in ([self.encoder, self.decoder] + ([self.head] if with_kl else [])) for p in m.parameters()]
        opt = _optimiser(params, cfg)
        batches = _ChunkCursor(self.orders, cfg, self.rng)  # same global draws on every rank
        last_labels = None
        desc = ("stage 2: clustering" if with_kl else "stage 2: encoder") + f" ({ctx.world} ranks)"
        bar = tqdm(range(n_steps), desc=desc, disable=not progress, leave=False)
        for step in bar:
            if with_kl and step % cfg.update_interval == 0:
                q = self.soft_assign_home()
                labels = q.argmax(1)
                if last_labels is not None:
                    changed = allreduce(ctx, np.array([(labels != last_labels).sum()]))[0] / self.home[-1]
                    bar.set_postfix(changed=f"{changed:.4f}")
                    if changed < cfg.tol:
                        log.info("stage 2 converged at step %d (%.4f%% labels changed)", step, 100 * changed)
                        break
                last_labels = labels
                self._refresh_target(q)
            for m in (self.encoder, self.decoder, self.head):
                m.train()
            tokens = batches.next()
            ids = batches.ids[batches.pos - cfg.chunks_per_batch:batches.pos]
            head = batches.epoch % len(self.orders)
            mine = self.layout.owner(head, batches.shift, ids) == ctx.rank
            n_query = int((tokens[:, -cfg.chunk_size:] >= 0).sum())
            if mine.any():
                x, mask, query = self._inputs(tokens[mine])
                counts, sf, onehot = self._targets(query)
                p = None
                if with_kl:
                    p = torch.from_numpy(self.p[self.layout.local(query)]).to(self.data.device)
                loss, zinb, kl = model(x, mask, counts, sf, onehot, p, len(query) / n_query)
            else:
                loss, zinb, kl = model(None, None, None, None, None, None, 0.0)
            value = _global_loss(ctx, loss, cfg, desc, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            self.steps_done = step + 1
            if step % 10 == 0:
                self.history.append({"stage": "2-cluster" if with_kl else "2-pretrain", "step": step, "loss": value})

    def _refresh_target(self, q_home: np.ndarray) -> None:
        """P from the home q with the cluster frequencies f_j summed over all ranks, sent to the chunk owners."""
        f = allreduce(self.ctx, q_home.sum(0))
        weight = q_home.astype(np.float64) ** 2 / f
        p_home = (weight / weight.sum(1, keepdims=True)).astype(np.float32)
        self.p = self.home_store.fetch(p_home, self.layout.ids, self.where)

    @torch.no_grad()
    def embed_home(self) -> np.ndarray:
        """z (home cells, latent) of this rank's home cells: mean over the heads' chunkings at shift 0."""
        self.encoder.eval()
        c, lay = self.cfg.chunk_size, self.layout
        lo, hi = lay.bounds[self.ctx.rank], lay.bounds[self.ctx.rank + 1]
        per_batch = max(1, self.cfg.infer_batch // c)
        n_home = int(self.home[self.ctx.rank + 1] - self.home[self.ctx.rank])
        z_home = np.zeros((n_home, self.encoder.n_latent), dtype=np.float32)
        for order in self.orders:
            chunks = buckets.chunk_index(order, c)
            owned = np.arange(lo // c, -(-hi // c)) if hi > lo else np.zeros(0, np.int64)
            mine_ids = order[lo:hi]  # the query cells of the owned chunks (cut at shift 0)
            z_mine = np.zeros((len(mine_ids), self.encoder.n_latent), dtype=np.float32)
            sorter = np.argsort(mine_ids)
            for s in range(0, len(owned), per_batch):
                x, mask, query = self._inputs(buckets.with_lookback(chunks, owned[s:s + per_batch]))
                z = self.encoder(x, mask, n_query=c)[mask[:, -c:]]
                z_mine[sorter[np.searchsorted(mine_ids, query, sorter=sorter)]] = z.cpu().numpy()
            # send each cell's z to its home rank
            store = RowStore(self.ctx, np.sort(mine_ids))
            want = np.arange(self.home[self.ctx.rank], self.home[self.ctx.rank + 1])
            pos = np.empty(len(order), dtype=np.int64)
            pos[order] = np.arange(len(order))
            z_home += store.fetch(z_mine[sorter], want, owner_of(lay.bounds, pos[want]))
        return z_home / len(self.orders)

    @torch.no_grad()
    def soft_assign_home(self, z: np.ndarray | None = None) -> np.ndarray:
        z = self.embed_home() if z is None else z
        self.head.eval()
        b = self.cfg.infer_batch
        out = [self.head(torch.from_numpy(z[s:s + b]).to(self.data.device)).cpu().numpy() for s in range(0, len(z), b)]
        return np.concatenate(out) if out else np.zeros((0, self.head.centres.shape[0]), np.float32)

    def init_centres(self, seed: int, z_home: np.ndarray | None = None) -> None:
        """k-means on rank 0 on the gathered z (a uniform subsample beyond KMEANS_MAX_CELLS); centres broadcast."""
        from sklearn.cluster import KMeans

        z = self.embed_home() if z_home is None else z_home
        n = int(self.home[-1])
        if n > KMEANS_MAX_CELLS:  # every rank keeps the same fraction of its cells
            keep = np.random.default_rng(seed + self.ctx.rank).random(len(z)) < KMEANS_MAX_CELLS / n
            z = z[keep]
        z_all = allgather(self.ctx, z)
        centres = torch.zeros_like(self.head.centres.data, device=self.ctx.comm_device)
        if self.ctx.rank == 0:
            km = KMeans(self.head.centres.shape[0], n_init=self.cfg.kmeans_n_init, random_state=seed).fit(z_all)
            centres.copy_(torch.from_numpy(km.cluster_centers_).float())
        dist.broadcast(centres, 0)
        with torch.no_grad():
            self.head.centres.copy_(centres.to(self.head.centres.device))


# ----------------------------------------------------------------------------- the fit
def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def fit(ctx: Context, shard: ad.AnnData, *, n_clusters: int, n_top_genes: int = 2000, seed: int = 0,
        batch_key: str | None = None, layer: str | None = None, allow_noncounts: bool = False,
        progress: bool = True, device: str = "auto", **params):
    """Fit scHashFormer on every rank's shard together (call on all ranks, after :func:`init`).

    Returns, on rank 0, a fitted :class:`schashformer.SCHashFormer` holding the labels, embedding
    and codes of *all* cells in input order (``cell_mask_`` marks the kept ones); None elsewhere.
    """
    from .model import SCHashFormer
    from .validate import is_int

    if n_clusters is None or not is_int(n_clusters) or n_clusters < 2:
        raise ParameterError(f"a distributed run needs n_clusters, an integer >= 2 (--n-clusters K), got {n_clusters!r}")
    model = SCHashFormer(n_clusters, n_top_genes=n_top_genes, seed=seed, device=device,
                         allow_noncounts=allow_noncounts, progress=False, **params)
    model.check_params()
    cfg = model.config
    if cfg.init != "kmeans":
        raise ParameterError("init='leiden' needs the whole hash kNN graph; with --nproc use init=kmeans")
    if cfg.w_consistency > 0:
        raise ParameterError("w_consistency > 0 (stage-2 InfoNCE between two dropout passes) is not available with "
                             "--nproc; leave it at 0 (the default)")
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    rng = np.random.default_rng(seed)
    progress = progress and ctx.rank == 0
    timings: dict = {}

    @contextmanager
    def stage(name):
        start = time.perf_counter()
        yield
        dist.barrier()
        timings[name] = {"seconds": round(time.perf_counter() - start, 3), "peak_rss_gib": round(_peak_rss_gib(), 3)}
        log.info("%s: %.1f s", name, timings[name]["seconds"])

    with stage("preprocess"):
        prep = prepare_shard(ctx, shard, n_top_genes=n_top_genes, layer=layer, allow_noncounts=allow_noncounts)
        kept = allgather(ctx, np.array([prep.n_cells]))
        home = np.concatenate([[0], np.cumsum(kept)]).astype(np.int64)
        n_cells = int(home[-1])
        if n_cells < n_clusters:
            raise ParameterError(f"n_clusters={n_clusters} exceeds the {n_cells} cells with counts")
        batch_index, categories = _batches(ctx, shard, batch_key, prep.cell_mask)
        data = CellData(prep, batch_index, len(categories), ctx.device)

    with stage("stage1_hashing"):
        axes = None if cfg.input_pcs == 0 else torch.from_numpy(principal_axes_global(ctx, prep, cfg.input_pcs,
                                                                                          n_cells))
        indexer = LSHIndexer(prep.n_genes, cfg.hidden, cfg.hash_latent, cfg.hash_heads, cfg.bits_for(n_cells),
                             data.n_batches, cfg.dropout, axes).to(ctx.device)
        start = time.perf_counter()
        history = train_indexer(ctx, indexer, data, home, cfg, rng, progress)
        rate1 = cfg.stage1_steps / max(time.perf_counter() - start, 1e-9)
        codes, key, hidden = hash_cells(indexer, data, cfg.infer_batch)
        codes_all, key_all = allgather(ctx, codes), allgather(ctx, key)
        orders = [buckets.sort_order(codes_all[:, k], key_all[:, k]) for k in range(codes_all.shape[1])]

    with stage("stage2_encoder"):
        token_axes = None if cfg.token_pcs == 0 else principal_axes_global(ctx, prep, cfg.token_pcs, n_cells)
        tokens, scale = _tokens(ctx, prep, hidden, token_axes)
        model.n_clusters_ = n_clusters
        model._build_stage2(tokens.shape[1], prep.n_genes, data.n_batches, ctx.device)
        stage2 = DistributedStage2(ctx, model.encoder_, model.decoder_, model.head_, data, tokens, home, orders, cfg,
                                   rng)
        start = time.perf_counter()
        stage2.pretrain(progress)
        rate2 = stage2.steps_done / max(time.perf_counter() - start, 1e-9)

    with stage("stage2_clustering"):
        stage2.init_centres(seed)
        stage2.cluster(progress)

    with stage("inference"):  # one pass over every cell: embedding and labels
        z = stage2.embed_home()
        labels = stage2.soft_assign_home(z).argmax(1)
    # throughput of this run (the whole group): optimiser steps and embedded cells per second
    timings["stage1_hashing"]["steps_per_s"] = round(rate1, 3)
    timings["stage2_encoder"]["steps_per_s"] = round(rate2, 3)
    timings["inference"]["cells_per_s"] = round(n_cells / max(timings["inference"]["seconds"], 1e-9), 1)

    z_all, labels_all = allgather(ctx, z), allgather(ctx, labels.astype(np.int64))
    mask_all = allgather(ctx, prep.cell_mask.astype(np.uint8)).astype(bool)
    if ctx.rank != 0:
        return None
    model.stats_, model.batch_categories_, model.indexer_ = prep.stats, categories, indexer
    model.token_axes_, model.token_scale_ = token_axes, scale
    model.history_ = history + stage2.history
    model.cell_mask_ = mask_all
    model.codes_ = expand_to_cells(codes_all, mask_all, -1)
    model.embedding_ = expand_to_cells(z_all, mask_all, 0.0)
    model.labels_ = expand_to_cells(labels_all, mask_all, -1)
    model.kmeans_labels_ = None
    model.n_removed_cells_ = int((~mask_all).sum())
    model.max_attention_elements_ = model.encoder_.max_scores_numel
    model.bucket_stats_ = buckets.bucket_stats(codes_all)
    model.timings_ = timings
    model.world_size_ = ctx.world
    model._fitted = True
    return model


def _tokens(ctx: Context, prep: Prepared, hidden: np.ndarray, axes: np.ndarray | None):
    """:func:`schashformer.train.token_features` with the norm-matching scale from all ranks' cells."""
    if axes is None:
        return hidden, None
    pcs = np.concatenate([prep.standardised(np.arange(s, min(s + 65536, prep.n_cells))) @ axes
                          for s in range(0, prep.n_cells, 65536)]) if prep.n_cells else np.zeros((0, axes.shape[1]))
    sums = allreduce(ctx, np.array([(hidden.astype(np.float64) ** 2).sum(), (pcs.astype(np.float64) ** 2).sum()]))
    scale = float(np.sqrt(sums[0] / max(sums[1], 1e-12)))
    return np.concatenate([hidden, scale * pcs], axis=1).astype(np.float32), scale


def _batches(ctx: Context, shard: ad.AnnData, batch_key: str | None, cell_mask: np.ndarray):
    """Batch category index of the kept cells, with the categories of all shards (sorted, as one process sorts)."""
    if batch_key is None:
        return None, []

    def local():
        if batch_key not in shard.obs:
            raise InputError(f"batch_key {batch_key!r} is not a column of adata.obs "
                             f"(columns: {list(shard.obs.columns)})")
        col = shard.obs[batch_key]
        if col.isna().any():
            raise InputError(f"batch_key {batch_key!r} has {int(col.isna().sum())} missing values")
        return sorted(set(col.astype(str)))

    mine = agree(ctx, local)
    every = [None] * ctx.world
    dist.all_gather_object(every, mine)
    categories = sorted(set().union(*every))
    codes = pd.Categorical(shard.obs[batch_key].astype(str), categories=categories).codes
    return codes[cell_mask].astype(np.int64), categories


# ----------------------------------------------------------------------------- command line
def run(args) -> int:
    """One rank of ``schashformer cluster ... --nproc N`` (args from :func:`schashformer.cli._build_parser`)."""
    from . import cli

    ctx = init(args.device)
    try:
        if args.resume:
            raise ParameterError("--resume is not supported with --nproc (distributed runs write no checkpoint)")
        out = Path(args.out)
        if ctx.rank == 0:
            agree(ctx, cli.check_out_dir, out, args.overwrite)
        else:
            agree(ctx, lambda: None)
        start = time.perf_counter()
        shard, n_total, _ = agree(ctx, read_shard, ctx, args.input, format=args.format, labels_key=args.labels_key,
                                  transpose=args.transpose, layer=args.layer)
        if n_total < ctx.world:
            raise ParameterError(f"--nproc {ctx.world} is more processes than the {n_total} cells of {args.input}")
        if ctx.rank == 0:
            print(f"read {args.input}: {n_total} cells x {shard.n_vars} genes, {ctx.world} shards "
                  f"({ctx.backend}, {ctx.device.type})")
        params = cli._parse_params(args.param)
        model = fit(ctx, shard, n_clusters=args.n_clusters, n_top_genes=args.n_top_genes, seed=args.seed,
                    batch_key=args.batch_key, layer=args.layer, allow_noncounts=args.allow_noncounts,
                    progress=not args.quiet, device=args.device, **params)
        read_seconds = time.perf_counter() - start - sum(v["seconds"] for v in
                                                          (model.timings_.values() if model else []))
        failure = None
        if ctx.rank == 0:
            try:
                if _is_h5ad(args):
                    report = _write_h5ad_result(args, out, model, params, start)
                else:
                    report = _write_in_memory_result(args, out, model, params, read_seconds)
                cli._print_report(report, out)
            except SCHashFormerError as exc:
                failure = exc
        agree(ctx, _raise, failure)
        return 0
    except SCHashFormerError as exc:
        if ctx.rank == 0:
            _report_error(exc)
        # under our launcher the error file carries the failure: exit 0 so torchrun adds no trace of its own
        return 0 if os.environ.get(ERROR_FILE_ENV) else 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _is_h5ad(args) -> bool:
    fmt = (args.format or "").lower()
    return fmt in ("h5ad", "anndata") or (args.format is None and Path(args.input).suffix == ".h5ad")


def _labelled_bucket_stats(model, labels) -> None:
    if labels is not None:
        model.bucket_stats_ = buckets.bucket_stats(model.codes_[model.cell_mask_],
                                                   np.asarray(labels)[model.cell_mask_])


def _write_h5ad_result(args, out: Path, model, params: dict, start: float) -> dict:
    """Rank 0's one result for a ``.h5ad`` input, as the out-of-core ``cluster`` writes it: the input
    file copied with the results added (the matrix is never loaded), clusters.csv, metrics.json."""
    from . import cli, cli_scale, tl
    from .streaming import CountSource, data_checksum

    cli.check_out_dir(out, args.overwrite)
    source = CountSource.from_h5ad(args.input, args.layer)
    try:
        t0 = time.perf_counter()
        checksum = data_checksum(source)  # chunk by chunk, the same value as record.data_checksum in memory
        timings = {**model.timings_, "checksum": {"seconds": round(time.perf_counter() - t0, 3)}}
        result = cli_scale._results_only(source)
        if args.labels_key is not None and args.labels_key not in result.obs:
            raise InputError(f"labels_key {args.labels_key!r} is not a column of adata.obs "
                             f"(columns: {list(result.obs.columns)})")
        _labelled_bucket_stats(model, None if args.labels_key is None else result.obs[args.labels_key])
        tl.write_results(result, model, labels_key=args.labels_key, batch_key=args.batch_key, layer=args.layer,
                         checksum=checksum, timings=timings)
        record = result.uns["schashformer"]
        record["input"] = {"path": str(Path(args.input).resolve()), "format": "h5ad", "transpose": False}
        record["distributed"] = {"world_size": int(model.world_size_)}
        report = {"input": str(args.input), "n_cells": source.n_obs, "n_genes_input": source.n_vars,
                  "n_clusters": int(model.n_clusters), "seed": args.seed, "world_size": int(model.world_size_),
                  "metrics": record.get("metrics", {}), "timings": timings, "bucket_stats": model.bucket_stats_,
                  "data_checksum": checksum}
        cli_scale._write(args, out, source, result, model, report, start)
    finally:
        source.close()
    return report


def _write_in_memory_result(args, out: Path, model, params: dict, read_seconds: float) -> dict:
    """Rank 0's one result for the other formats: the input read whole, results written by ``cli.run_cluster``."""
    from . import cli, io

    adata = io.read(args.input, format=args.format, labels_key=args.labels_key, transpose=args.transpose)
    if args.labels_key is not None and args.labels_key in adata.obs:
        _labelled_bucket_stats(model, adata.obs[args.labels_key])
    report = cli.run_cluster(
        adata, out=out, params=cli.estimator_params(args), labels_key=args.labels_key, batch_key=args.batch_key,
        layer=args.layer, overwrite=args.overwrite, umap=not args.no_umap, input_name=str(args.input),
        read_seconds=max(read_seconds, 0.0), model=model,
        source={"path": args.input, "format": args.format, "transpose": args.transpose})
    report["world_size"] = int(model.world_size_)
    return report


def _raise(exc):
    if exc is not None:
        raise exc


def _report_error(exc: SCHashFormerError) -> None:
    where = os.environ.get(ERROR_FILE_ENV)
    if where:  # the launcher prints it, after torchrun has finished
        Path(where).write_text(str(exc))
    else:
        print(f"schashformer: error: {exc}", file=sys.stderr)


def launch(argv: list[str], nproc: int) -> int:
    """Run ``schashformer`` ``argv`` (without ``--nproc``) on ``nproc`` local processes through torchrun.

    Returns the exit status: 0, 2 for a refused input or parameter (the message is printed as
    one line), or torchrun's status when a worker crashed.
    """
    with tempfile.TemporaryDirectory(prefix="schashformer-") as tmp:
        error_file = Path(tmp) / "error.txt"
        env = {**os.environ, ERROR_FILE_ENV: str(error_file), "OMP_NUM_THREADS": os.environ.get(
            "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "schashformer.distributed", *argv]
        code = subprocess.run(cmd, env=env).returncode
        if error_file.exists():
            print(f"schashformer: error: {error_file.read_text()}", file=sys.stderr)
            return 2
        return code


def strip_nproc(argv: list[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry of ``torchrun -m schashformer.distributed cluster INPUT --n-clusters K --out DIR ...``."""
    from .cli import _build_parser

    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet or int(os.environ.get("RANK", 0)) else logging.INFO,
                        format="%(message)s")
    if args.command != "cluster":
        print("schashformer: error: only 'cluster' runs distributed", file=sys.stderr)
        return 2
    try:
        return run(args)
    except SCHashFormerError as exc:  # raised before the group existed (not launched by torchrun ...)
        _report_error(exc)
        return 0 if os.environ.get(ERROR_FILE_ENV) else 2


if __name__ == "__main__":
    sys.exit(main())
