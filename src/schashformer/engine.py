"""The training engine: one optimiser loop for every path (in memory, out of core, multi-process).

A fit runs three phases of the same loop (:func:`run_phase`): stage 1 trains the hasher on
shuffled minibatches of rows; stage 2 pre-trains the neighbourhood Transformer on batches of
chunks of the hash-sorted order (ZINB alone), then, after k-means has placed the cluster
centres, trains it with ZINB + KL(P || Q), P refreshed every ``update_interval`` steps.

What differs between one process and ``torch.distributed`` is confined to two objects:

* a :class:`Comm` (here: one process, every collective the identity;
  :class:`schashformer.distributed.DistComm` all-reduces and all-gathers), and
* where the cells of a chunk are held: :class:`LocalChunks` (all cells here) or the rank-owned
  chunks of :class:`schashformer.distributed.ShardedChunks`, made by ``comm.chunk_cells``.

Every process draws the same global batches from generators seeded alike, computes the rows
or chunks it holds (:mod:`schashformer.nn.losses` weights its share), and the gradients are
summed over processes before the step. The out-of-core path trains with this engine on its
subsample and embeds every cell with :class:`NeighbourhoodStage`'s inference pass.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import pairwise_distances_argmin
from tqdm.auto import tqdm

from . import buckets
from . import n_clusters as n_clusters_mod
from .checkpoint import PHASES, Checkpointer
from .data import CellData
from .errors import TrainingError
from .nn import (
    ClusterHead,
    HashingLoss,
    LSHIndexer,
    NeighbourhoodEncoder,
    NeighbourhoodLoss,
    ZINBDecoder,
)
from .nn.cluster_head import target_distribution
from .preprocess import Prepared, principal_axes
from .train import TrainConfig

log = logging.getLogger(__name__)

KMEANS_MAX_CELLS = 200_000  # k-means sees every z up to this many cells, a uniform subsample beyond
# init="auto" builds the graph start on at most this many cells (a uniform subsample beyond; the other cells join
# the nearest centre): the exact kNN search and Leiden's bisection to K cost ~12 s at 50,000 cells on 2 cores,
# ~3 s at 20,000
GRAPH_START_CELLS = 20_000


# ----------------------------------------------------------------------------- collectives
class Comm:
    """The collectives of a fit in one process: every operation is the identity.

    :class:`schashformer.distributed.DistComm` implements the same methods over
    ``torch.distributed``; the engine calls only these.
    """

    rank = 0
    world = 1

    def allreduce(self, a) -> np.ndarray:
        """Sum over processes, float64 (for sums over many cells)."""
        return np.asarray(a, dtype=np.float64)

    def allreduce_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of a tensor over processes, in its own dtype."""
        return t

    def allgather(self, a: np.ndarray) -> np.ndarray:
        """Rows of ``a`` from every process, concatenated in rank order."""
        return a

    def gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Autograd-aware :meth:`allgather` of a tensor's rows (in-batch losses see the whole batch)."""
        return t

    def broadcast(self, a: np.ndarray, src: int = 0) -> np.ndarray:
        """Rank ``src``'s ``a`` on every process."""
        return a

    def reduce_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Sum every parameter's gradient over processes (before clipping and the step)."""

    def barrier(self) -> None:
        """Wait for every process (so stage timings cover the slowest)."""

    def agree(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)``; under torch.distributed a package error raised in any process is
        raised in all of them (so none is left waiting in a collective)."""
        return fn(*args, **kwargs)

    def chunk_cells(self, orders: list[np.ndarray], chunk_size: int, features: np.ndarray, data: CellData | None,
                    device: torch.device) -> "LocalChunks":
        """Where the cells of stage 2's chunks are held: here, all of them."""
        return LocalChunks(features, data, chunk_size, device)


LOCAL = Comm()


# ----------------------------------------------------------------------------- batch positions
class RowCursor:
    """Shuffled minibatches of global row ids, one permutation per epoch drawn from ``rng``.

    Its position (permutation, offset) is saved in a checkpoint and restored, so a resumed fit
    draws what an uninterrupted one draws.
    """

    def __init__(self, n: int, batch: int, rng: np.random.Generator):
        self.n, self.batch, self.rng = n, batch, rng
        self.order: np.ndarray | None = None
        self.pos = 0

    def next(self) -> np.ndarray:
        if self.order is None or self.pos >= self.n:
            self.order, self.pos = self.rng.permutation(self.n), 0
        rows = self.order[self.pos:self.pos + self.batch]
        self.pos += self.batch
        return rows

    def state(self) -> dict:
        return {"order": None if self.order is None else torch.from_numpy(self.order), "pos": self.pos}

    def load(self, state: dict) -> None:
        self.order = None if state["order"] is None else state["order"].numpy()
        self.pos = int(state["pos"])


@dataclass
class ChunkBatch:
    """One stage-2 batch: token ids (chunks, 2C) of the chunks ``chunk_ids`` of head ``head``'s order cut at ``shift``."""

    tokens: np.ndarray
    head: int
    shift: int
    chunk_ids: np.ndarray


class ChunkCursor:
    """Stage-2 batches: each epoch one head's sorted order, cut at a random shift, chunks shuffled.

    The shift and permutation are drawn from ``rng`` when an epoch starts (shift first); the
    position (epoch, shift, permutation, offset) can be checkpointed.
    """

    def __init__(self, orders: list[np.ndarray], chunk_size: int, chunks_per_batch: int, rng: np.random.Generator):
        self.orders, self.chunk_size, self.chunks_per_batch, self.rng = orders, chunk_size, chunks_per_batch, rng
        self.epoch, self.shift, self.pos = -1, 0, 0
        self.ids: np.ndarray | None = None
        self.chunks: np.ndarray | None = None

    def _cut(self) -> None:
        order = self.orders[self.epoch % len(self.orders)]
        self.chunks = buckets.chunk_index(order, self.chunk_size, shift=self.shift)

    def next(self) -> ChunkBatch:
        if self.ids is None or self.pos >= len(self.ids):
            self.epoch += 1
            self.shift = int(self.rng.integers(self.chunk_size))
            self._cut()
            self.ids, self.pos = self.rng.permutation(len(self.chunks)), 0
        ids = self.ids[self.pos:self.pos + self.chunks_per_batch]
        self.pos += self.chunks_per_batch
        return ChunkBatch(buckets.with_lookback(self.chunks, ids), self.epoch % len(self.orders), self.shift, ids)

    def state(self) -> dict:
        return {"epoch": self.epoch, "shift": self.shift, "pos": self.pos,
                "ids": None if self.ids is None else torch.from_numpy(self.ids)}

    def load(self, state: dict) -> None:
        self.epoch, self.shift, self.pos = int(state["epoch"]), int(state["shift"]), int(state["pos"])
        self.ids = None if state["ids"] is None else state["ids"].numpy()
        if self.ids is not None:
            self._cut()


# ----------------------------------------------------------------------------- the loop
STOP = object()  # returned by a step function: the phase has converged
# Device types whose training forward passes run in bfloat16 autocast when cfg.mixed_precision is on.
# Not the CPU: on one with bf16 units it saved a tenth of a 10^6-cell run for 0.005 ARI there and would change
# every in-memory fit; without bf16 units (most CPUs) autocast is slower than float32.
AUTOCAST_DEVICES = ("cuda",)


def training_precision(device: torch.device, cfg: TrainConfig):
    """Context of one training forward pass: bfloat16 autocast on an :data:`AUTOCAST_DEVICES` device with
    bf16 support when ``cfg.mixed_precision``, else nothing (float32). Inference: :func:`inference_precision`."""
    usable = device.type in AUTOCAST_DEVICES and (device.type != "cuda" or torch.cuda.is_bf16_supported())
    return torch.autocast(device.type, dtype=torch.bfloat16) if cfg.mixed_precision and usable else nullcontext()


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices in hardware: a CUDA GPU with bf16 support, or a CPU
    with AVX512-BF16 or AMX units (elsewhere a bf16 product is emulated and slower than float32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    # torch exposes these probes only under private names; a torch without them gets float32
    probes = (getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
    return any(probe() for probe in probes if probe is not None)


def inference_precision(device: torch.device, cfg: TrainConfig):
    """Context of the inference passes of an out-of-core fit (see :mod:`schashformer.streaming`: hashing and
    embedding every cell, and stage 2's embeddings of its training subsample), when ``cfg.mixed_precision``:
    bfloat16 autocast where :func:`native_bf16` (float16 on a CUDA GPU without bf16), else float32.

    These passes set the per-cell slope of a large run (10^6 cells, 2-core AVX512-BF16 CPU: the attention pass
    34 s -> 18 s, hashing 15 s -> 11 s, ARI 0.770 -> 0.771). Matrix products round their inputs to bf16
    (8 mantissa bits) and accumulate in float32; LayerNorm, softmax and the residual sum stay float32, so z
    moves by ~0.3% of its scale. In-memory fits and their inference stay float32: bf16 there moved the
    suite's mean ARI by -0.005, PBMC by more than its seed spread (docs/METHOD_CHOICES.md).
    """
    if not cfg.mixed_precision:
        return nullcontext()
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16 if native_bf16(device) else torch.float16)
    return torch.autocast("cpu", dtype=torch.bfloat16) if native_bf16(device) else nullcontext()


@dataclass
class Phase:
    """One training phase for :func:`run_phase`.

    ``step(i, bar)`` returns the loss module's (loss, terms) for step ``i``, None to skip the
    step (a batch too small to train on) or :data:`STOP` when the phase has converged.
    ``loop_state()`` / ``load_loop(state)`` save and restore the batch position and whatever
    else the step function keeps between steps.
    """

    name: str  # checkpoint phase (:data:`schashformer.checkpoint.PHASES`)
    desc: str  # progress-bar label and error prefix
    n_steps: int
    params: list
    loss: torch.nn.Module  # the loss module (its ``weights`` and ``batch_terms`` give the reported total)
    step: Callable
    loop_state: Callable[[], dict]
    load_loop: Callable[[dict], None]
    history_key: str  # "history1" (stage 1) or "history2" (stage 2), also its checkpoint entry
    stage: int | str


def run_phase(phase: Phase, history: list[dict], cfg: TrainConfig, *, comm: Comm = LOCAL, progress: bool = True,
              checkpoint: Checkpointer | None = None, resume: dict | None = None) -> None:
    """The optimiser loop of every phase: step, non-finite check, gradient reduction, checkpoints.

    ``history`` receives a record every 10 steps and at the last one (the loss is the whole
    batch's, summed over processes). With ``checkpoint`` the state is saved every
    ``checkpoint.every`` steps; ``resume`` (a checkpoint saved in this phase) continues from its
    step with its weights, optimiser, batch position and random generators, so the result
    equals an uninterrupted run.
    """
    # fused: one kernel for every parameter's update, ~7x faster than the per-tensor loop on CPU (10 ms a
    # step at the default widths, a tenth of a small data set's step)
    opt = torch.optim.AdamW(phase.params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    device = phase.params[0].device if phase.params else torch.device("cpu")
    start = 0
    if resume is not None:
        checkpoint.load_modules(resume)
        opt.load_state_dict(resume["optimiser"])
        phase.load_loop(resume["loop"])
        history[:] = list(resume[phase.history_key])
        start = resume["step"]
        checkpoint.restore_rngs(resume)
    bar = tqdm(range(start, phase.n_steps), desc=phase.desc if comm.world == 1 else f"{phase.desc} ({comm.world} ranks)",
               disable=not progress, leave=False, initial=start, total=phase.n_steps)
    for step in bar:
        with training_precision(device, cfg):
            out = phase.step(step, bar)
        if out is STOP:
            break
        if out is not None:
            loss, terms = out
            value, values = _reported(phase.loss, loss, terms, comm)
            if not np.isfinite(value):  # every process has the same value: all stop alike
                kept = "" if checkpoint is None else f"; {checkpoint.describe()}"
                raise TrainingError(f"{phase.desc}, step {step}: loss became {value}; lower lr (now {cfg.lr}) or "
                                    "check the input counts" + kept)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            comm.reduce_gradients(phase.params)
            torch.nn.utils.clip_grad_norm_(phase.params, cfg.grad_clip)
            opt.step()
            if step % 10 == 0 or step == phase.n_steps - 1:
                history.append({"stage": phase.stage, "step": step, "loss": value, **values})
                bar.set_postfix(loss=f"{value:.3f}")
        if checkpoint is not None and checkpoint.due(step + 1, phase.n_steps):
            checkpoint.save(phase.name, step + 1, optimiser=opt.state_dict(), loop=phase.loop_state(),
                            **{phase.history_key: history})


def _reported(module, loss: torch.Tensor, terms: dict, comm: Comm) -> tuple[float, dict]:
    """The whole batch's loss and terms: per-process shares summed, whole-batch terms as they are."""
    if comm.world == 1:
        return loss.item(), {k: v.item() for k, v in terms.items()}
    names = sorted(terms)
    shares = comm.allreduce([terms[k].item() if k not in module.batch_terms else 0.0 for k in names])
    values = {k: (terms[k].item() if k in module.batch_terms else float(s)) for k, s in zip(names, shares)}
    weights = module.weights()
    return float(sum(weights[k] * v for k, v in values.items() if weights.get(k, 0) > 0)), values


# ----------------------------------------------------------------------------- stage 1
def abs_input_sum(data: CellData, chunk: int = 8192) -> tuple[float, int]:
    """(sum of |standardised input|, number of entries) over the cells of ``data``, in row chunks."""
    total = sum(float(data.inputs(rows).abs().sum(dtype=torch.float64)) for rows in data.minibatches(chunk))
    return total, data.n_cells * data.n_genes


def view_noise_sd(data: CellData, cfg: TrainConfig, comm: Comm = LOCAL) -> float:
    """sd of the stage-1 view noise: ``input_noise`` x the mean |standardised input| of all cells
    (of every process); with ``input_noise`` 0 the data pass is skipped."""
    if cfg.input_noise <= 0:
        return 0.0
    total, n = comm.allreduce(abs_input_sum(data))
    return cfg.input_noise * (total / max(n, 1))


def loss_genes(n_genes: int, cfg: TrainConfig, rng: np.random.Generator, device: torch.device) -> torch.Tensor | None:
    """One training step's ZINB gene subset: ``cfg.zinb_genes`` genes drawn from ``rng`` without
    replacement (sorted, for memory order), or None (every gene) when that is unset or not fewer.

    ``rng`` is the fit's generator, drawn alike in every process, so all processes use the same genes."""
    k = cfg.zinb_genes
    if k is None or k >= n_genes:
        return None
    return torch.from_numpy(np.sort(rng.choice(n_genes, k, replace=False))).to(device)


def masked_views(x: torch.Tensor, n_batch: int, mine: np.ndarray | None, keep: float, noise: float,
                 gen: torch.Generator) -> torch.Tensor:
    """Stage 1's two augmented views (2, rows, genes) of ``x`` (rows, genes): each entry kept with probability
    ``keep``, then Gaussian noise of sd ``noise`` added.

    The masks and noise are drawn for the whole batch of ``n_batch`` rows, alike in every process, and
    this process keeps its rows ``mine`` (None: all of them). Both views are drawn as one (2, rows, genes)
    tensor and combined in place, which saves a few temporaries: on a 512 x 2,000 batch with 2 threads the
    draws take 19.8 ms instead of 22.8 (medians), a whole stage-1 step 84 ms instead of 86
    (docs/METHOD_CHOICES.md, "Stage-1 views as one tensor and one encoder pass"). The random stream is the
    one the four separate draws took whenever rows x genes is a multiple of 16 (2,000 genes always is), so
    those fits are unchanged.
    """
    shape = (2, n_batch, x.shape[1])
    keep_mask = torch.rand(shape, generator=gen, device=x.device).lt_(keep)  # 1.0 where kept, 0.0 where masked
    views = (torch.randn(shape, generator=gen, device=x.device).mul_(noise) if noise > 0
             else torch.zeros(shape, device=x.device))
    if mine is not None:
        rows = torch.from_numpy(mine).to(x.device)
        keep_mask, views = keep_mask[:, rows], views[:, rows]
    return views.addcmul_(x, keep_mask)


def hashing_phase(indexer: LSHIndexer, data: CellData, cfg: TrainConfig, rng: np.random.Generator, *,
                  home: np.ndarray | None = None, comm: Comm = LOCAL) -> Phase:
    """Stage 1 as a :class:`Phase`: global minibatches of ``cfg.stage1_batch`` rows, two masked and
    noised views; this process computes the rows it holds.

    ``home`` (world + 1,) are the global-id bounds of each process's cells (None: one process).
    """
    home = np.array([0, data.n_cells]) if home is None else home
    n_global, n_genes = int(home[-1]), data.n_genes
    loss_module = HashingLoss(indexer, tau=cfg.tau, bucket_weight=cfg.bucket_weight, detach_codes=cfg.detach_codes,
                              w_zinb=cfg.w_zinb, w_contrastive=cfg.w_contrastive, w_balance=cfg.w_balance,
                              w_quantisation=cfg.w_quantisation)
    noise = view_noise_sd(data, cfg, comm)
    gen = torch.Generator(device=data.device).manual_seed(int(rng.integers(2**31)))
    rows_of = RowCursor(n_global, min(cfg.stage1_batch, n_global), rng)
    keep = 1.0 - cfg.mask_rate

    def step(i, bar):
        rows = rows_of.next()
        if len(rows) < 2:  # a last batch of one cell has no contrastive pairs
            return None
        indexer.train()
        owner = np.searchsorted(home, rows, side="right") - 1
        mine = np.flatnonzero(owner == comm.rank)
        local = rows[mine] - home[comm.rank]
        x = data.inputs(local)
        counts, sf, onehot = data.targets(local)
        genes = loss_genes(n_genes, cfg, rng, data.device)
        views = masked_views(x, len(rows), None if len(mine) == len(rows) else mine, keep, noise, gen)
        return loss_module(views, counts, sf, onehot, share=len(mine) / len(rows), gather=comm.gather_rows,
                           genes=genes)

    def load_loop(state):
        gen.set_state(state["gen"])
        rows_of.load(state)

    return Phase("stage1", "stage 1 (hashing)", cfg.stage1_steps, list(indexer.parameters()), loss_module, step,
                 lambda: {"gen": gen.get_state(), **rows_of.state()}, load_loop, "history1", 1)


@torch.no_grad()
def hash_cells(indexer: LSHIndexer, data: CellData, batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bucket ids (cells, H), continuous hash embeddings (cells, H, b) and hidden (cells, n_latent)."""
    indexer.eval()
    codes, hs, hidden = [], [], []
    for rows in data.minibatches(batch):
        hid, h = indexer(data.inputs(rows))
        codes.append(indexer.codes(h).cpu().numpy())
        hs.append(h.cpu().numpy())
        hidden.append(hid.cpu().numpy())
    if not codes:  # a process whose cells all had zero counts
        width = indexer.encoder[-1].normalized_shape[0]
        return (np.zeros((0, indexer.n_heads), np.int64), np.zeros((0, indexer.n_heads, indexer.n_bits), np.float32),
                np.zeros((0, width), np.float32))
    return np.concatenate(codes), np.concatenate(hs), np.concatenate(hidden)


def tie_break_keys(h: np.ndarray) -> np.ndarray:
    """(cells, H) scalar key per head from the continuous codes (cells, H, b): orders cells within a bucket."""
    weights = 2.0 ** -np.arange(h.shape[2])
    return np.stack([h[:, k] @ weights for k in range(h.shape[1])], axis=1) if len(h) else np.zeros((0, h.shape[1]))


def sorted_orders(codes: np.ndarray, keys: np.ndarray) -> list[np.ndarray]:
    """One hash-sorted cell order per head (``keys`` from :func:`tie_break_keys` break ties)."""
    return [buckets.sort_order(codes[:, k], keys[:, k]) for k in range(codes.shape[1])]


def token_features(prep: Prepared, hidden: np.ndarray, axes: np.ndarray | None, scale: float | None = None,
                   batch: int = 65536, comm: Comm = LOCAL) -> tuple[np.ndarray, float | None]:
    """Stage-2 tokens (cells, hash_latent + P): the stage-1 hidden layer, then the standardised
    expression projected on the fixed principal ``axes`` (genes, P), times ``scale``.

    The linear part keeps variance that the count likelihood gives little weight to (many small
    types of a shallow data set), the hidden part what only a non-linear encoder finds. With
    ``scale`` None both parts get the same mean squared norm over the cells of every process;
    the scale is returned so new cells can be embedded alike. Computed in row batches: never a
    dense cells x genes copy.
    """
    if axes is None:
        return hidden, None
    pcs = np.concatenate([prep.standardised(np.arange(s, min(s + batch, prep.n_cells))) @ axes
                          for s in range(0, prep.n_cells, batch)]) if prep.n_cells else np.zeros((0, axes.shape[1]))
    if scale is None:
        sums = comm.allreduce([(hidden.astype(np.float64) ** 2).sum(), (pcs.astype(np.float64) ** 2).sum()])
        scale = float(np.sqrt(sums[0] / max(sums[1], 1e-12)))
    return np.concatenate([hidden, scale * pcs], axis=1).astype(np.float32), scale


# ----------------------------------------------------------------------------- stage 2
class LocalChunks:
    """Every cell of the chunks is held in this process: token ids index the tables directly.

    Parameters
    ----------
    features : (cells, width) stage-2 tokens.
    data : the cells' counts, size factors and batches (None: inference only).
    """

    def __init__(self, features: np.ndarray, data: CellData | None, chunk_size: int, device: torch.device):
        self.features = torch.from_numpy(features).to(device)
        self.data, self.chunk_size, self.device = data, chunk_size, device
        self.n_home = len(features)

    def owned(self, batch: ChunkBatch) -> np.ndarray:
        """Which chunks of ``batch`` this process computes."""
        return np.ones(len(batch.chunk_ids), dtype=bool)

    def inputs(self, tokens: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """Token ids (chunks, 2C) -> tokens (chunks, 2C, width), key mask (chunks, 2C), query ids (n,)."""
        c = self.chunk_size
        mask = tokens >= 0
        # float() : tokens may be held in float16 (out-of-core inference); a no-op on float32
        x = self.features[torch.from_numpy(self.held_rows(np.where(mask, tokens, 0))).to(self.device)].float()
        return x, torch.from_numpy(mask).to(self.device), tokens[:, -c:][mask[:, -c:]]

    def held_rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows of the held tables for global ids."""
        return ids

    def targets(self, query: np.ndarray):
        """(counts, size factors, batch one-hot) of the query cells."""
        return self.data.targets(query)

    def held(self, home_values: np.ndarray) -> np.ndarray:
        """Per-cell values (home cells, ...) -> rows for the held cells."""
        return home_values

    def owned_chunks(self, order: np.ndarray) -> np.ndarray:
        """Ids of the chunks (cut at shift 0) whose embedding this process computes."""
        return np.arange(-(-len(order) // self.chunk_size))

    def home_sum(self, z_home: np.ndarray, order: np.ndarray) -> HomeSum:
        """Adds the z of query cells into their rows of ``z_home`` (home cells, latent) as they come."""
        return HomeSum(z_home)


class HomeSum:
    """Accumulates one hash head's z (query cells, latent) into ``z_home`` batch by batch: every
    cell is held here, so nothing is kept between batches (out-of-core inference needs that)."""

    def __init__(self, z_home: np.ndarray):
        self.z_home = z_home

    def add(self, z: np.ndarray, query: np.ndarray) -> None:
        self.z_home[query] += z

    def close(self) -> None:
        pass


class NeighbourhoodStage:
    """Stage 2: the neighbourhood encoder with its ZINB decoder and clustering head, and their passes.

    Tokens are the cells' stage-1 hidden representations, optionally followed by principal
    components (``TrainConfig.token_pcs``, see :func:`token_features`): the hasher has already
    compressed the genes, so stage 2 attends over short vectors and only its ZINB decoder
    touches the gene dimension.

    Parameters
    ----------
    cells : where the chunks' cells are held (:meth:`Comm.chunk_cells`).
    orders : global hash-sorted order per head (identical in every process).
    n_total : cells over all processes.
    """

    def __init__(self, encoder: NeighbourhoodEncoder, decoder: ZINBDecoder, head: ClusterHead | None, cells,
                 orders: list[np.ndarray], cfg: TrainConfig, rng: np.random.Generator, *, comm: Comm = LOCAL,
                 n_total: int | None = None, reduced_precision: bool = False):
        self.encoder, self.decoder, self.head = encoder, decoder, head
        # embed() under inference_precision (an out-of-core fit); in-memory fits embed in float32
        self.reduced_precision = reduced_precision
        self.cells, self.orders, self.cfg, self.rng, self.comm = cells, orders, cfg, rng, comm
        self.n_total = cells.n_home if n_total is None else n_total
        self.history: list[dict] = []
        # exponent of the cluster frequency in DEC's target (cfg.target_balance; None: set by init_centres)
        self.balance = 1.0 if cfg.target_balance is None else float(cfg.target_balance)
        # z of the home cells at the current weights: the start, the first refresh of P, a refresh that stops
        # the clustering phase and the final inference would otherwise embed every cell again with the same weights
        self._embedding: np.ndarray | None = None

    def weights_changed(self) -> None:
        """Forget the embedding computed at the previous weights (a training step or a checkpoint load)."""
        self._embedding = None

    @property
    def device(self) -> torch.device:
        return self.cells.device

    def _loss(self, with_kl: bool) -> NeighbourhoodLoss:
        cfg = self.cfg
        return NeighbourhoodLoss(self.encoder, self.decoder, self.head if with_kl else None, chunk_size=cfg.chunk_size,
                                 tau=cfg.tau, w_zinb=cfg.w_zinb_stage2, w_consistency=cfg.w_consistency, w_kl=cfg.w_kl,
                                 query_noise=cfg.query_noise, w_neighbour=cfg.w_neighbour,
                                 pool_mates=cfg.pool_mates)

    def phase(self, with_kl: bool) -> Phase:
        """Pre-training (ZINB only, phase ``"pretrain"``) or clustering (+ KL(P || Q), ``"cluster"``) as a
        :class:`Phase`; clustering refreshes P every ``update_interval`` steps and stops when fewer than
        ``tol`` of the labels changed since the last refresh."""
        cfg, comm, cells = self.cfg, self.comm, self.cells
        loss_module = self._loss(with_kl)
        modules = [self.encoder, self.decoder] + ([self.head] if with_kl else [])
        batches = ChunkCursor(self.orders, cfg.chunk_size, cfg.chunks_per_batch, self.rng)
        target = {"p": None, "labels": None}  # P of the held cells and the labels at the last refresh
        c = cfg.chunk_size

        def step(i, bar):
            if with_kl and i % cfg.update_interval == 0:
                q = self.soft_assign()
                labels = q.argmax(1)
                if target["labels"] is not None:
                    changed = float(comm.allreduce([(labels != target["labels"]).sum()])[0]) / self.n_total
                    bar.set_postfix(changed=f"{changed:.4f}")
                    if changed < cfg.tol:
                        log.info("stage 2 converged at step %d (%.4f%% labels changed)", i, 100 * changed)
                        return STOP
                target["labels"] = labels
                q_t = torch.from_numpy(q)
                p_home = target_distribution(q_t, comm.allreduce_tensor(q_t.sum(0)), self.balance).numpy()
                target["p"] = torch.from_numpy(cells.held(p_home)).to(self.device)
            for m in modules:
                m.train()
            self.weights_changed()  # the optimiser steps on this step's loss
            batch = batches.next()
            mine = cells.owned(batch)
            n_query = int((batch.tokens[:, -c:] >= 0).sum())
            x, mask, query = cells.inputs(batch.tokens if mine.all() else batch.tokens[mine])
            counts, sf, onehot = cells.targets(query)
            p = None
            if with_kl:
                p = target["p"][torch.from_numpy(cells.held_rows(query)).to(self.device)]
            genes = loss_genes(counts.shape[1], cfg, self.rng, self.device)
            return loss_module(x, mask, counts, sf, onehot, p, share=len(query) / n_query, gather=comm.gather_rows,
                               genes=genes)

        def loop_state():
            loop = batches.state()
            if with_kl:  # P and the labels of the last refresh, so a resume between refreshes uses them
                loop.update(p_all=target["p"].cpu(), last_labels=torch.from_numpy(target["labels"]))
            return loop

        def load_loop(state):
            self.weights_changed()
            batches.load(state)
            if state.get("p_all") is not None:
                target["p"] = state["p_all"].to(self.device)
                target["labels"] = state["last_labels"].numpy()

        name, desc = ("cluster", "stage 2: clustering") if with_kl else ("pretrain", "stage 2: encoder")
        return Phase(name, desc, cfg.stage2_cluster_steps if with_kl else cfg.stage2_pretrain_steps,
                     [p for m in modules for p in m.parameters()], loss_module, step, loop_state, load_loop,
                     "history2", "2-cluster" if with_kl else "2-pretrain")

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def embed(self) -> np.ndarray:
        """Embedding z (home cells, latent): mean over the hash heads' chunkings (cut at shift 0); computed once
        per set of weights (read-only: the same array is returned until :meth:`weights_changed`)."""
        if self._embedding is not None:
            return self._embedding
        self.encoder.eval()
        loss = self._loss(with_kl=False)
        c = self.cfg.chunk_size
        per_batch = max(1, self.cfg.infer_batch // c)
        z_home = np.zeros((self.cells.n_home, self.encoder.n_latent), dtype=np.float32)
        for order in self.orders:
            chunks = buckets.chunk_index(order, c)
            owned = self.cells.owned_chunks(order)
            home = self.cells.home_sum(z_home, order)
            for s in range(0, len(owned), per_batch):
                ids = owned[s:s + per_batch]
                x, mask, query = self.cells.inputs(buckets.with_lookback(chunks, ids))
                consecutive = bool(np.all(np.diff(ids) == 1))  # each chunk's key projections computed once
                with inference_precision(self.device, self.cfg) if self.reduced_precision else nullcontext():
                    z = loss.embed(x, mask, consecutive=consecutive)
                home.add(z.float().cpu().numpy(), query)
            home.close()
        z_home /= len(self.orders)
        self._embedding = z_home
        return z_home

    @torch.no_grad()
    def soft_assign(self, z: np.ndarray | None = None) -> np.ndarray:
        """q (home cells, K)."""
        z = self.embed() if z is None else z
        self.head.eval()
        b = self.cfg.infer_batch
        out = [self.head(torch.from_numpy(z[s:s + b]).to(self.device)).cpu().numpy() for s in range(0, len(z), b)]
        return np.concatenate(out) if out else np.zeros((0, self.head.centres.shape[0]), np.float32)

    # ------------------------------------------------------------------ K and the centres
    def estimate_k(self, resolution: float, seed: int, z_home: np.ndarray | None = None) -> int:
        """K from Leiden on the hash kNN graph of every cell's z (:func:`schashformer.n_clusters.estimate`)."""
        z_all = self.comm.allgather(self.embed() if z_home is None else z_home)
        k = np.zeros(1, np.int64)
        if self.comm.rank == 0:
            k[0], _ = n_clusters_mod.estimate(z_all, self.orders, self.cfg.graph_chunk, resolution=resolution,
                                              n_neighbors=self.cfg.graph_neighbors, seed=seed)
        return int(self.comm.broadcast(k)[0])

    def init_centres(self, seed: int, z_home: np.ndarray | None = None) -> np.ndarray | None:
        """Place the cluster centres (``cfg.init``: 'auto', 'kmeans' or 'leiden', see :meth:`_place_centres`) on rank 0 and
        share them; returns the initial labels of every cell (None when k-means saw a subsample).

        With ``cfg.target_balance`` None, DEC's target follows the start: DEC's size correction (1) after a
        k-means start, none (0) after a graph start, which is chosen where the clusters differ in size."""
        cfg, comm = self.cfg, self.comm
        z = self.embed() if z_home is None else z_home
        k = self.head.centres.shape[0]
        subsample = cfg.init != "leiden" and self.n_total > KMEANS_MAX_CELLS
        if subsample:  # every process keeps the same fraction of its cells
            z = z[np.random.default_rng(seed + comm.rank).random(len(z)) < KMEANS_MAX_CELLS / self.n_total]
        z_all = comm.allgather(z)
        centres = np.zeros((k, z.shape[1]), np.float32)
        labels = np.zeros(len(z_all), np.int64)
        graph_start = np.zeros(1, np.int64)
        if comm.rank == 0:
            labels, centres, start = self._place_centres(z_all, k, seed)
            graph_start[0] = start == "leiden"
        centres = comm.broadcast(np.asarray(centres, np.float32))
        if cfg.target_balance is None:
            self.balance = 0.0 if comm.broadcast(graph_start)[0] else 1.0
        with torch.no_grad():
            self.head.centres.copy_(torch.from_numpy(centres))
        return None if subsample else comm.broadcast(np.asarray(labels, np.int64))

    def _place_centres(self, z: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
        """(labels (cells,), centres (k, d), 'kmeans' or 'leiden') of the start partition of ``z``: k-means ('kmeans'); Leiden at K on
        the hash kNN graph ('leiden', k-means where Leiden cannot reach K); 'auto': k-means or Leiden at K on the
        exact kNN graph, whichever has the higher silhouette."""
        cfg = self.cfg
        if cfg.init == "leiden":
            graph = buckets.hash_knn_graph(z, self.orders, cfg.graph_chunk, cfg.graph_neighbors)
            labels = n_clusters_mod.leiden_with_k(graph, k, seed)
            if labels.max() + 1 == k:
                return labels, n_clusters_mod.centroids(z, labels), "leiden"
            log.info("Leiden found %d clusters instead of %d; using k-means", labels.max() + 1, k)
        km = KMeans(k, n_init=cfg.kmeans_n_init, random_state=seed).fit(z)
        if cfg.init == "auto" and len(z) > k:
            # k-means favours clusters of equal extent (it splits a large type and merges small ones); Leiden on
            # the kNN graph does not, but on data with many similar-sized types it is the worse start. The
            # silhouette on z chooses between them (docs/METHOD_CHOICES.md, "A start chosen by the data").
            rows = np.arange(len(z))
            if len(z) > GRAPH_START_CELLS:
                rows = np.sort(np.random.default_rng(seed).choice(len(z), GRAPH_START_CELLS, replace=False))
            graph = n_clusters_mod.knn_graph(z[rows], cfg.graph_neighbors)
            graph_labels = n_clusters_mod.leiden_with_k(graph, k, seed)
            if graph_labels.max() + 1 == k:
                chosen, scores = n_clusters_mod.best_by_silhouette(
                    z[rows], {"kmeans": km.labels_[rows], "leiden": graph_labels}, seed)
                log.info("start partition: %s (silhouette %s)", chosen, scores)
                if chosen == "leiden":
                    centres = n_clusters_mod.centroids(z[rows], graph_labels)
                    if len(rows) < len(z):  # a subsample: every cell's start label is its nearest centre
                        graph_labels = pairwise_distances_argmin(z, centres)
                    return graph_labels, centres, "leiden"
        return km.labels_, km.cluster_centers_, "kmeans"


# ----------------------------------------------------------------------------- a whole fit
@dataclass
class FitResult:
    """What :func:`fit` trained and computed for the cells of this process (home cells)."""

    indexer: LSHIndexer
    encoder: NeighbourhoodEncoder
    decoder: ZINBDecoder
    head: ClusterHead
    n_clusters: int
    codes: np.ndarray  # (home cells, H)
    codes_all: np.ndarray  # (all cells, H)
    z: np.ndarray  # (home cells, latent)
    q: np.ndarray  # (home cells, K)
    kmeans_labels: np.ndarray | None  # (all cells,) labels of the centre placement (None: subsample)
    token_axes: np.ndarray | None
    token_scale: float | None
    history: list[dict] = field(default_factory=list)
    steps_per_s: dict = field(default_factory=dict)


def fit(prep: Prepared, data: CellData, cfg: TrainConfig, *, n_clusters: int | None, resolution: float, seed: int,
        rng: np.random.Generator, comm: Comm = LOCAL, checkpoint: Checkpointer | None = None, state: dict | None = None,
        progress: bool = True, stage=None, on_codes: Callable[[np.ndarray], None] | None = None,
        reduced_precision: bool = False) -> FitResult:
    """Train both stages on ``data`` (this process's cells) and cluster them.

    Parameters
    ----------
    prep, data : the prepared cells of this process (gene statistics of all processes).
    n_clusters : K, or None to estimate it after pre-training.
    rng : the fit's generator (seeded alike in every process).
    checkpoint, state : the fit's checkpointer and the checkpoint to resume from (None: a fresh fit).
    stage : ``stage(name)`` context manager timing each stage (None: untimed).
    on_codes : called with every cell's codes once stage 1 is done (warnings, bucket statistics).
    reduced_precision : stage 2 embeds every cell (DEC's target refreshes, the start, the final
        inference) under :func:`inference_precision`, as the streamed passes of an out-of-core fit do
        (its training subsample: 5 s of a 10^6-cell run); training steps and stage 1 are unaffected.
    """
    # torch's global generator drives initialisation and dropout: seeded here for a reproducible fit,
    # and the caller's state is restored afterwards (a fit never moves the user's random numbers)
    devices = [data.device] if data.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return _fit(prep, data, cfg, n_clusters=n_clusters, resolution=resolution, seed=seed, rng=rng, comm=comm,
                    checkpoint=checkpoint, state=state, progress=progress, stage=stage or (lambda name: nullcontext()),
                    on_codes=on_codes, reduced_precision=reduced_precision)


def _fit(prep, data, cfg, *, n_clusters, resolution, seed, rng, comm, checkpoint, state, progress, stage,
         on_codes, reduced_precision) -> FitResult:
    device = data.device
    home = np.concatenate([[0], np.cumsum(comm.allgather(np.array([data.n_cells])))]).astype(np.int64)
    n_total = int(home[-1])
    cfg = cfg.for_cells(n_total)  # step counts for this many cells (the configured ones are caps)
    ckpt = checkpoint

    def at(phase):  # the checkpoint was written exactly here: continue from it
        return state is not None and state["phase"] == phase

    def past(phase):  # the checkpoint is at or after this point: skip the work, load its result
        return state is not None and PHASES.index(state["phase"]) >= PHASES.index(phase)

    rates = {}
    with stage("stage1_hashing"):
        axes = None if cfg.input_pcs == 0 else torch.from_numpy(principal_axes(prep, cfg.input_pcs, comm.allreduce))
        indexer = LSHIndexer(prep.n_genes, cfg.hidden, cfg.hash_latent, cfg.hash_heads, cfg.bits_for(n_total),
                             data.n_batches, cfg.dropout, axes).to(device)
        if ckpt is not None:
            ckpt.modules["indexer"] = indexer
        if past("stage1_done"):
            ckpt.load_modules(state)
            history = list(state["history1"])
            codes, h, hidden = ckpt.load_hashes()
        else:
            history = []
            with _rate(rates, "stage1_hashing", cfg.stage1_steps):
                run_phase(hashing_phase(indexer, data, cfg, rng, home=home, comm=comm), history, cfg, comm=comm,
                          progress=progress, checkpoint=ckpt, resume=state if at("stage1") else None)
            codes, h, hidden = hash_cells(indexer, data, cfg.infer_batch)
            if ckpt is not None:
                ckpt.save_hashes(codes, h, hidden)
                ckpt.extra["history1"] = history
                ckpt.save("stage1_done")
        if ckpt is not None:
            ckpt.extra["history1"] = history
        if at("stage1_done"):
            ckpt.restore_rngs(state)
        codes_all = comm.allgather(codes)
        orders = sorted_orders(codes_all, comm.allgather(tie_break_keys(h)))
        if on_codes is not None:
            on_codes(codes_all)

    with stage("stage2_encoder"):
        token_axes = None if cfg.token_pcs == 0 else principal_axes(prep, cfg.token_pcs,
                                                                    comm.allreduce).astype(np.float32)
        tokens, token_scale = token_features(prep, hidden, token_axes, comm=comm)
        z_dim = tokens.shape[1] if cfg.token_residual else cfg.latent
        encoder, decoder = build_stage2(cfg, tokens.shape[1], prep.n_genes, data.n_batches, device)
        # unknown K: the clustering head is built once K is estimated, after pre-training
        head = None if n_clusters is None else ClusterHead(n_clusters, z_dim).to(device)
        stage2 = NeighbourhoodStage(encoder, decoder, head, comm.chunk_cells(orders, cfg.chunk_size, tokens, data,
                                                                             device),
                                    orders, cfg, rng, comm=comm, n_total=n_total, reduced_precision=reduced_precision)
        if ckpt is not None:
            ckpt.modules.update(encoder=encoder, decoder=decoder)
            if head is not None:
                ckpt.modules["head"] = head
        if past("pretrain_done"):
            ckpt.load_modules(state)
            stage2.weights_changed()
            stage2.history = list(state["history2"])
        else:
            with _rate(rates, "stage2_encoder", cfg.stage2_pretrain_steps):
                run_phase(stage2.phase(with_kl=False), stage2.history, cfg, comm=comm, progress=progress,
                          checkpoint=ckpt, resume=state if at("pretrain") else None)
            if ckpt is not None:
                ckpt.save("pretrain_done", history2=stage2.history)
        if at("pretrain_done"):
            ckpt.restore_rngs(state)

    with stage("stage2_clustering"):
        if n_clusters is None:
            if past("centres"):
                n_clusters = int(state["n_clusters_estimated"])
            else:  # only K is kept: k-means at that K places the centres, as when K is given
                n_clusters = stage2.estimate_k(resolution, seed)
                log.info("estimated number of clusters: %d (resolution %g)", n_clusters, resolution)
            stage2.head = ClusterHead(n_clusters, z_dim).to(device)
            if ckpt is not None:
                ckpt.modules["head"] = stage2.head
                ckpt.extra["n_clusters_estimated"] = int(n_clusters)
        if past("centres"):
            ckpt.load_modules(state)
            stage2.weights_changed()
            kmeans_labels = state["kmeans_labels"].numpy()
            stage2.balance = float(state.get("target_balance_used", stage2.balance))
            kmeans_labels = None if kmeans_labels.size == 0 and n_total else kmeans_labels
        else:  # the start partition places the K centres (cfg.init)
            kmeans_labels = stage2.init_centres(seed)
        if ckpt is not None:
            saved = np.zeros(0, np.int64) if kmeans_labels is None else np.asarray(kmeans_labels, dtype=np.int64)
            ckpt.extra["kmeans_labels"] = torch.from_numpy(saved)
            ckpt.extra["target_balance_used"] = stage2.balance
            if not past("centres"):
                ckpt.save("centres", history2=stage2.history)
        if at("centres"):
            ckpt.restore_rngs(state)
        if past("done"):
            ckpt.load_modules(state)
            stage2.weights_changed()
            stage2.history = list(state["history2"])
        else:
            run_phase(stage2.phase(with_kl=True), stage2.history, cfg, comm=comm, progress=progress, checkpoint=ckpt,
                      resume=state if at("cluster") else None)
            if ckpt is not None:
                ckpt.save("done", history2=stage2.history)

    with stage("inference"):  # one pass over every cell: embedding and soft assignment
        z = stage2.embed()
        q = stage2.soft_assign(z)
    return FitResult(indexer, encoder, decoder, stage2.head, n_clusters, codes, codes_all, z, q, kmeans_labels,
                     token_axes, token_scale, history + stage2.history, rates)


def embed_tokens(encoder: NeighbourhoodEncoder, tokens: np.ndarray, orders: list[np.ndarray],
                 cfg: TrainConfig, device: torch.device, *, reduced_precision: bool = False) -> np.ndarray:
    """Embedding z (cells, latent) of cells from their tokens and hash-sorted orders (:func:`sorted_orders`),
    inference in one process. ``tokens`` is read in place (not copied) on the CPU. ``reduced_precision``:
    under :func:`inference_precision` (float32 otherwise)."""
    cells = LocalChunks(tokens, None, cfg.chunk_size, device)
    return NeighbourhoodStage(encoder, None, None, cells, orders, cfg, None, reduced_precision=reduced_precision).embed()


def build_stage2(cfg: TrainConfig, token_width: int, n_genes: int, n_batches: int,
                 device) -> tuple[NeighbourhoodEncoder, ZINBDecoder]:
    """The neighbourhood encoder and its ZINB decoder; with ``token_residual`` z has the token's width."""
    z_dim = token_width if cfg.token_residual else cfg.latent
    encoder = NeighbourhoodEncoder(token_width, cfg.d_model, cfg.attn_heads, z_dim, cfg.layers, cfg.dropout,
                                   cfg.token_residual, cfg.attention, exclude_self=cfg.query_noise > 0,
                                   neighbours=cfg.attention_neighbours).to(device)
    return encoder, ZINBDecoder(z_dim, n_genes, cfg.hidden // 2, n_batches).to(device)


@contextmanager
def _rate(rates: dict, name: str, steps: int):
    """Optimiser steps per second of the block (throughput of the whole group)."""
    start = time.perf_counter()
    yield
    rates[name] = round(steps / max(time.perf_counter() - start, 1e-9), 3)
