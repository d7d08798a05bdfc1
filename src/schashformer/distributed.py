"""Multi-process training on ``torch.distributed``, launched by ``torchrun``: launch, sharding, collectives.

One process per rank (a GPU with the nccl backend, ``LOCAL_RANK`` picking the GPU, or a CPU
process with gloo). The training itself is the one-process engine (:func:`schashformer.engine.fit`);
this module supplies what distribution changes, and nothing else:

1. **Shards.** Rank r reads rows ``[r N / W, (r + 1) N / W)`` of the input only (``.h5ad``:
   anndata backed mode; X/Y ``.h5``: an h5py row slice; other formats are read whole and
   sliced). A cell's *home* is the rank that read it.
2. **Collectives** (:class:`DistComm`, the engine's :class:`~schashformer.engine.Comm`): sums,
   gathers, broadcasts and the gradient all-reduce. With them the gene statistics
   (:func:`schashformer.preprocess.prepare`'s per-gene sums), principal axes, token scale, view
   noise, cluster frequencies and reported losses are the global ones; every rank draws the same
   global batches from generators seeded alike and computes the rows or chunks it holds, and the
   summed gradients are those of the whole batch.
3. **Rank-owned chunks** (:class:`ShardedChunks`). Hash codes are all-gathered; every rank
   computes the same global sorted order per head, cut into W contiguous ranges of whole
   chunks; rank r owns the chunks that start in its range and fetches the tokens, counts and
   size factors of those cells (plus a halo of one chunk on each side for the look-back and the
   shifted chunk borders) from their home ranks with ``all_to_all``. A chunk's tokens always
   sit on one rank: attention needs no communication.
4. **Result.** Rank 0 gathers labels, embeddings and codes and writes one result, the same
   files as ``schashformer cluster``. Each rank checkpoints its own state
   (``OUT/.checkpoint/rank-R-of-W``), so ``--resume`` works as in one process.

A one-rank group reproduces the one-process fit loss for loss (tests/test_distributed.py).
Launch: ``schashformer cluster IN --out DIR --nproc N`` (one node) or
``torchrun ... -m schashformer.worker cluster IN ...`` (several nodes); see
docs/DISTRIBUTED.md for the design, launch commands and measured figures.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
import torch.distributed as dist

from . import app, buckets, engine, errors, io
from .data import CellData
from .engine import Comm, HomeSum, LocalChunks
from .errors import InputError, ParameterError, SCHashFormerError
from .model import SCHashFormer
from .preprocess import prepare
from .resources import peak_rss_gib
from .streaming import CountSource

log = logging.getLogger(__name__)

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


class GatherRows(torch.autograd.Function):
    """All-gather rows (autograd-aware): forward concatenates every rank's rows in rank order;
    backward returns this rank's slice of the gradient only.

    Every rank computes the same loss of the gathered tensor and multiplies it by the world
    size; the summed gradients (:meth:`DistComm.reduce_gradients`) are then the full gradient.
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

    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    fmt = io.check_format(format) if format is not None else io.guess_format(path)
    if fmt == "h5ad":  # the out-of-core reader of the streaming path: CSR row slices, the rest stays on disk

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

        with h5py.File(path, "r") as f:
            if "X" not in f or f["X"].ndim != 2:
                raise InputError(f"{path}: HDF5 file has no 2-D dataset 'X' (found: {sorted(f.keys())})")
            n = f["X"].shape[0]
            lo, hi = (int(b) for b in shard_bounds(n, ctx.world)[ctx.rank:ctx.rank + 2])
            io.check_dtype(path, f["X"].dtype)
            block = 8192  # dense on disk: densify a block of rows at a time, never the whole shard
            x = sp.vstack([sp.csr_matrix(np.asarray(f["X"][s:min(s + block, hi)], dtype=np.float32))
                           for s in range(lo, hi, block)] or [sp.csr_matrix((0, f["X"].shape[1]), dtype=np.float32)],
                          format="csr")
            y = f["Y"][lo:hi] if "Y" in f else None
        shard = ad.AnnData(x)
        shard.obs_names = [f"cell{i}" for i in range(lo, hi)]
        shard.var_names = [f"gene{j}" for j in range(x.shape[1])]
        if y is not None:
            shard.obs[labels_key or "label"] = io.labels_as_str(np.asarray(y).ravel())
        return shard, n, lo
    full = io.read(path, format=format, labels_key=labels_key, transpose=transpose)
    lo, hi = (int(b) for b in shard_bounds(full.n_obs, ctx.world)[ctx.rank:ctx.rank + 2])
    return full[lo:hi].copy(), full.n_obs, lo


# ----------------------------------------------------------------------------- the engine's collectives
class DistComm(Comm):
    """:class:`schashformer.engine.Comm` over ``torch.distributed``: sums, gathers and broadcasts across ranks."""

    def __init__(self, ctx: Context):
        self.ctx, self.rank, self.world = ctx, ctx.rank, ctx.world

    def allreduce(self, a) -> np.ndarray:
        return allreduce(self.ctx, np.asarray(a))

    def allreduce_tensor(self, t: torch.Tensor) -> torch.Tensor:
        out = t.detach().to(self.ctx.comm_device).clone()
        dist.all_reduce(out)
        return out.to(t.device)

    def allgather(self, a: np.ndarray) -> np.ndarray:
        return allgather(self.ctx, a)

    def gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        if self.world == 1:  # nothing to gather (and no extra autograd node: gradients sum in the same order)
            return t
        sizes = allgather(self.ctx, np.array([len(t)], np.int64)).tolist()
        return GatherRows.apply(t, sizes, self.rank)

    def broadcast(self, a: np.ndarray, src: int = 0) -> np.ndarray:
        t = _to(self.ctx, a)
        dist.broadcast(t, src)
        return t.cpu().numpy()

    def reduce_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the gradients over ranks in one flat all-reduce; a parameter with a gradient on any rank
        gets one on every rank (zeros where it had none), one without a gradient anywhere keeps None."""
        has = allreduce(self.ctx, np.array([p.grad is not None for p in params], np.float64)) > 0
        used = [p for p, h in zip(params, has) if h]
        if not used:
            return
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in used])
        flat = flat.to(self.ctx.comm_device)
        dist.all_reduce(flat)
        flat = flat.to(used[0].device)
        offset = 0
        for p in used:
            summed = flat[offset:offset + p.numel()].view_as(p)
            if p.grad is None:
                p.grad = summed.clone()
            else:  # in place: the gradient keeps its memory layout, so clipping sums in the same order
                p.grad.copy_(summed)
            offset += p.numel()

    def barrier(self) -> None:
        dist.barrier()

    def agree(self, fn, *args, **kwargs):
        return agree(self.ctx, fn, *args, **kwargs)

    def chunk_cells(self, orders: list[np.ndarray], chunk_size: int, features: np.ndarray, data: CellData | None,
                    device: torch.device) -> "ShardedChunks":
        return ShardedChunks(self.ctx, orders, chunk_size, features, data, device)


class ShardedChunks(LocalChunks):
    """The stage-2 chunks this rank owns, and the rows (tokens, counts, P) it holds for them.

    Every rank knows the global sorted order of every hash head (from the all-gathered codes).
    The sorted positions are cut into W contiguous ranges of whole chunks (the same ranges for
    every head); rank r owns the chunks whose first query falls in range r, for any shift of the
    chunk borders. It holds the rows of the cells at positions [lo - C, hi + C) of every head,
    enough for the queries and the look-back chunk of all its chunks, fetched once from their
    home ranks (a cell's home is the rank that read it). A chunk's tokens therefore always sit
    on one rank: attention needs no communication.

    Parameters
    ----------
    features : (home cells, width) tokens of this rank's home cells.
    data : this rank's home cells (counts, size factors, batches).
    """

    def __init__(self, ctx: Context, orders: list[np.ndarray], chunk_size: int, features: np.ndarray,
                 data: CellData | None, device: torch.device):
        self.ctx, self.orders = ctx, orders
        n = len(orders[0])
        n_chunks = -(-n // chunk_size)
        self.bounds = np.minimum(chunk_size * ((np.arange(ctx.world + 1) * n_chunks) // ctx.world), n)
        self.bounds[-1] = n
        lo, hi = self.bounds[ctx.rank], self.bounds[ctx.rank + 1]
        halo = np.arange(lo - chunk_size, hi + chunk_size) % n if hi > lo else np.zeros(0, np.int64)
        self.ids = np.unique(np.concatenate([order[halo] for order in orders]))  # sorted global ids held here
        self.home = np.concatenate([[0], np.cumsum(allgather(ctx, np.array([len(features)])))]).astype(np.int64)
        self.home_store = RowStore(ctx, np.arange(self.home[ctx.rank], self.home[ctx.rank + 1]))
        self.where = owner_of(self.home, self.ids)
        super().__init__(self.home_store.fetch(features, self.ids, self.where), None, chunk_size, device)
        self.n_home = len(features)
        self.counts = self.sf = self.batch_index = None
        self.n_batches = 0 if data is None else data.n_batches
        if data is not None:
            self.counts = self.home_store.fetch_csr(data.prepared.counts, self.ids, self.where)
            self.sf = self.home_store.fetch(data.prepared.size_factors, self.ids, self.where)
            if data.n_batches:
                self.batch_index = self.home_store.fetch(data.batch_index, self.ids, self.where)

    def owned(self, batch) -> np.ndarray:
        n = len(self.orders[batch.head])
        return owner_of(self.bounds, (batch.shift + batch.chunk_ids * self.chunk_size) % n) == self.ctx.rank

    def held_rows(self, ids: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.ids, np.maximum(ids, 0))

    def targets(self, query: np.ndarray):
        rows = self.held_rows(query)
        counts = torch.from_numpy(self.counts[rows].toarray()).to(self.device)
        sf = torch.from_numpy(self.sf[rows]).to(self.device)
        onehot = None
        if self.n_batches:
            b = torch.from_numpy(self.batch_index[rows]).to(self.device)
            onehot = torch.nn.functional.one_hot(b, self.n_batches).float()
        return counts, sf, onehot

    def held(self, home_values: np.ndarray) -> np.ndarray:
        return self.home_store.fetch(home_values, self.ids, self.where)

    def owned_chunks(self, order: np.ndarray) -> np.ndarray:
        lo, hi = self.bounds[self.ctx.rank], self.bounds[self.ctx.rank + 1]
        return np.arange(lo // self.chunk_size, -(-hi // self.chunk_size)) if hi > lo else np.zeros(0, np.int64)

    def home_sum(self, z_home: np.ndarray, order: np.ndarray) -> HomeSum:
        return ExchangedHomeSum(self, z_home, order)

    def to_home(self, z: np.ndarray, query: np.ndarray, order: np.ndarray) -> np.ndarray:
        """Send each query cell's z to its home rank (one exchange per hash head)."""
        sorter = np.argsort(query)
        store = RowStore(self.ctx, query[sorter])
        r = self.ctx.rank
        want = np.arange(self.home[r], self.home[r + 1])
        pos = np.empty(len(order), dtype=np.int64)
        pos[order] = np.arange(len(order))
        return store.fetch(z[sorter], want, owner_of(self.bounds, pos[want]))


class ExchangedHomeSum(HomeSum):
    """One hash head's z of this rank's query cells, collected and, on :meth:`close`, sent to each
    cell's home rank (one exchange per head) and added to its row there."""

    def __init__(self, cells: ShardedChunks, z_home: np.ndarray, order: np.ndarray):
        super().__init__(z_home)
        self.cells, self.order = cells, order
        self.zs, self.queries = [np.zeros((0, z_home.shape[1]), np.float32)], [np.zeros(0, np.int64)]

    def add(self, z: np.ndarray, query: np.ndarray) -> None:
        self.zs.append(z)
        self.queries.append(query)

    def close(self) -> None:
        self.z_home += self.cells.to_home(np.concatenate(self.zs), np.concatenate(self.queries), self.order)


# ----------------------------------------------------------------------------- the fit
def fit(ctx: Context, shard: ad.AnnData, model: SCHashFormer, *, batch_key: str | None = None,
        layer: str | None = None, checkpoint_dir: str | Path | None = None, resume: bool = False):
    """Fit ``model`` on every rank's shard together (call on all ranks, after :func:`init`).

    The same engine as one process (:func:`schashformer.engine.fit`) with :class:`DistComm`.
    With ``checkpoint_dir`` each rank checkpoints its own state in ``checkpoint_dir/rank-R-of-W``
    and ``resume`` continues from there. Returns, on rank 0, ``model`` fitted, holding the
    labels, embedding and codes of *all* cells in input order (``cell_mask_`` marks the kept
    ones); None elsewhere.
    """
    comm = DistComm(ctx)
    agree(ctx, model.check_params)
    cfg, seed = model.config, model.seed
    rng = np.random.default_rng(seed)
    timings: dict = {}

    @contextmanager
    def stage(name):
        start = time.perf_counter()
        yield
        dist.barrier()
        timings[name] = {"seconds": round(time.perf_counter() - start, 3), "peak_rss_gib": round(peak_rss_gib(), 3)}
        log.info("%s: %.1f s", name, timings[name]["seconds"])

    with stage("preprocess"):
        prep = prepare(shard, n_top_genes=model.n_top_genes, layer=layer, allow_noncounts=model.allow_noncounts,
                       comm=comm)
        n_cells = int(allreduce(ctx, np.array([prep.n_cells]))[0])
        if model.n_clusters is not None and n_cells < model.n_clusters:
            raise ParameterError(f"n_clusters={model.n_clusters} exceeds the {n_cells} cells with counts")
        batch_index, categories = _batches(ctx, shard, batch_key, prep.cell_mask)
        data = CellData(prep, batch_index, len(categories), ctx.device)

    checkpointer, state = None, None
    if checkpoint_dir is not None:
        where = Path(checkpoint_dir) / f"rank-{ctx.rank}-of-{ctx.world}"
        checkpointer = agree(ctx, model.checkpointer, prep, data, ctx.device, rng, where)
        state = agree(ctx, checkpointer.load) if resume else None
        if not resume:
            checkpointer.remove()
        phases = [None] * ctx.world
        dist.all_gather_object(phases, None if state is None else (state["phase"], state["step"]))
        if len(set(phases)) > 1:
            raise InputError(f"{checkpoint_dir}: the ranks' checkpoints are at different points ({phases}); "
                             "delete the checkpoint directory to start again")
    start = time.perf_counter()
    result = engine.fit(prep, data, cfg, n_clusters=model.n_clusters, resolution=model.resolution, seed=seed,
                        rng=rng, comm=comm, checkpoint=checkpointer, state=state, progress=model.progress and
                        ctx.rank == 0, stage=stage)
    # throughput of this run (the whole group): optimiser steps and embedded cells per second
    for name, rate in result.steps_per_s.items():
        timings[name]["steps_per_s"] = rate
    timings["inference"]["cells_per_s"] = round(n_cells / max(timings["inference"]["seconds"], 1e-9), 1)
    log.debug("engine: %.1f s", time.perf_counter() - start)

    mask_all = allgather(ctx, prep.cell_mask.astype(np.uint8)).astype(bool)
    gathered = dataclasses.replace(result, z=allgather(ctx, result.z), q=allgather(ctx, result.q))
    if checkpointer is not None and not model.keep_checkpoint:
        checkpointer.remove()
    if ctx.rank != 0:
        return None
    model.stats_, model.batch_categories_ = prep.stats, categories
    model.timings_ = timings
    model.adopt(gathered, mask_all)
    model.cell_mask_ = mask_all
    model.bucket_stats_ = buckets.bucket_stats(result.codes_all)
    model.world_size_ = ctx.world
    return model


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
    """One rank of ``schashformer cluster ... --nproc N`` (args parsed by :func:`schashformer.cli.build_parser`)."""

    ctx = init(args.device)
    try:
        out = Path(args.out)
        if ctx.rank == 0:
            agree(ctx, app.check_out_dir, out, args.overwrite, args.resume)
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
        params = app.estimator_params(args)
        model = SCHashFormer.from_params({**params, "keep_checkpoint": True})
        model = fit(ctx, shard, model, batch_key=args.batch_key, layer=args.layer,
                    checkpoint_dir=out / app.CHECKPOINT_DIR, resume=args.resume)
        read_seconds = time.perf_counter() - start - sum(v["seconds"] for v in
                                                          (model.timings_.values() if model else []))
        failure = None
        if ctx.rank == 0:
            try:
                report = app.write_distributed_result(args, out, model, start, read_seconds)
                app.print_report(report, out)
            except SCHashFormerError as exc:
                failure = exc
        agree(ctx, _raise, failure)
        return 0
    except SCHashFormerError as exc:
        if ctx.rank == 0:
            report_error(exc)
        # under our launcher the error file carries the failure: exit 0 so torchrun adds no trace of its own
        return 0 if os.environ.get(ERROR_FILE_ENV) else 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _raise(exc):
    if exc is not None:
        raise exc


def report_error(exc: SCHashFormerError) -> None:
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
               "-m", "schashformer.worker", *argv]
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
