"""The two training stages and the inference passes.

Stage 1 trains the hasher on shuffled minibatches. Stage 2 trains the neighbourhood
Transformer on batches of chunks of the hash-sorted order: first with the ZINB loss
alone, then, after k-means has placed the cluster centres, with ZINB + KL(P || Q).
All passes are O(cells) per epoch; inference never holds more than one batch dense.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from sklearn.cluster import KMeans
from tqdm.auto import tqdm

from . import buckets
from .checkpoint import Checkpointer
from .data import CellData
from .errors import ParameterError, TrainingError
from .nn import ClusterHead, LSHIndexer, NeighbourhoodEncoder, ZINBDecoder, target_distribution, zinb_nll
from .nn.cluster_head import kl_loss

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Hyper-parameters of both stages (defaults chosen by the benchmarks, see docs).

    The defaults here are the only ones: :class:`schashformer.SCHashFormer` takes every field as a
    keyword argument with this default (a test pins it) and builds this configuration from them
    (its ``config``); the values are checked by :func:`schashformer.validate.check_params`.
    """

    # stage 1: hasher
    input_pcs: int = 0  # >0: a fixed projection on this many principal axes precedes the encoder
    hash_heads: int = 3
    hash_bits: int | None = None  # None: log2(cells / 16), clipped to [4, 16]
    hidden: int = 256
    hash_latent: int = 32
    stage1_steps: int = 400
    stage1_batch: int = 512
    tau: float = 0.8
    mask_rate: float = 0.2
    # sd of the Gaussian noise added to each view, in units of the data's mean |standardised input|
    # (~0.4 on 10x-depth data, where 6.25 gives scDeepCluster's 2.5; 0.15 on the shallow worm data,
    # where a fixed 2.5 drowned its ~16 expressed genes per cell: +0.10 ARI, docs/METHOD_CHOICES.md).
    input_noise: float = 6.25
    w_zinb: float = 1.0  # weight of the stage-1 ZINB reconstruction; 0 drops the term (ablation)
    w_contrastive: float = 0.03  # small: the contrastive term's scale dwarfs the per-entry ZINB NLL
    bucket_weight: float = 1.0  # weight of same-bucket positives relative to the cell's own other view
    detach_codes: bool = False  # True: code losses train the hash heads only, not the encoder
    w_balance: float = 1.0
    w_quantisation: float = 0.1
    # stage 2: neighbourhood Transformer + clustering head
    chunk_size: int = 16
    chunks_per_batch: int = 32
    d_model: int = 256
    attn_heads: int = 4
    layers: int = 1
    latent: int = 32  # width of z when token_residual is off (with it, z has the token's width)
    token_pcs: int = 20  # >0: stage-2 tokens = stage-1 hidden + this many principal components
    token_residual: bool = True  # z = the cell's own token + attention update
    attention: bool = True  # False (ablation): no attention between cells, each token passes the MLPs alone
    stage2_pretrain_steps: int = 100
    stage2_cluster_steps: int = 200
    update_interval: int = 25  # steps between refreshes of the target distribution P
    tol: float = 0.001  # stop when fewer than this fraction of labels change between refreshes
    w_consistency: float = 0.0  # stage-2 InfoNCE between two dropout passes (off: token_residual keeps z discriminative)
    # weight of the KL clustering loss: scDeepCluster's 1, not METHOD.md's 0.1 (the ZINB term is a mean per
    # entry, so 0.1 left DEC almost idle: +0.005 worm NMI at 1 with refreshes every 25 steps, docs/METHOD_CHOICES.md)
    w_kl: float = 1.0
    w_zinb_stage2: float = 1.0  # weight of the ZINB loss in stage 2
    dropout: float = 0.1
    lr: float = 1e-3
    weight_decay: float = 1e-4
    grad_clip: float = 5.0
    kmeans_n_init: int = 20
    init: str = "kmeans"  # centres from k-means on z (METHOD.md), or "leiden" on the hash-neighbourhood kNN graph
    graph_neighbors: int = 15
    infer_batch: int = 2048
    # Inputs with more cells (or backed AnnData) train both stages on a random subsample of this many
    # cells and embed every cell in streaming passes (schashformer.streaming); see docs/METHOD_CHOICES.md.
    train_cells: int = 50_000
    # At most this many stage-1 steps when training on that subsample of a larger input (None: no cap).
    # Halving them cost 0.008 ARI at 10^5 cells and saves a sixth of a 10^6-cell run (docs/METHOD_CHOICES.md).
    stage1_steps_subsample: int | None = 200

    def bits_for(self, n_cells: int) -> int:
        if self.hash_bits is not None:
            return self.hash_bits
        return int(np.clip(round(math.log2(max(n_cells, 2) / 16)), 4, 16))

    def to_dict(self) -> dict:
        return asdict(self)

    def for_subsample(self) -> "TrainConfig":
        """The configuration that trains on the ``train_cells`` subsample of a larger input (out of core)."""
        if self.stage1_steps_subsample is None:
            return self
        return replace(self, stage1_steps=min(self.stage1_steps, self.stage1_steps_subsample))


def resolve_device(device: str | torch.device | None) -> torch.device:
    """'auto' -> CUDA when available, else CPU; an explicit 'cuda' without a GPU is an error."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ParameterError("device='cuda' was requested but no CUDA GPU is available; use device='cpu' or 'auto'")
    return device


def _optimiser(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _step(opt: torch.optim.Optimizer, loss: torch.Tensor, params, cfg: TrainConfig, stage: str, step: int = -1,
          checkpoint: Checkpointer | None = None) -> None:
    """One optimiser step; a non-finite loss stops training before it can touch the weights or a checkpoint."""
    if not torch.isfinite(loss):
        where = f"{stage}, step {step}" if step >= 0 else stage
        kept = "" if checkpoint is None else f"; {checkpoint.describe()}"
        raise TrainingError(f"{where}: loss became {loss.item()}; lower lr (now {cfg.lr}) or check the input counts"
                            + kept)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    opt.step()


class _RowCursor:
    """Shuffled minibatches of rows, one permutation per epoch, drawn from ``rng`` when the epoch starts.

    Draws exactly what ``CellData.minibatches(batch, rng)`` in a loop draws, in the same order, but its
    position (permutation, offset) can be saved in a checkpoint and restored.
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


# ----------------------------------------------------------------------------- stage 1
def train_indexer(indexer: LSHIndexer, data: CellData, cfg: TrainConfig, rng: np.random.Generator,
                  progress: bool = True, checkpoint: Checkpointer | None = None,
                  resume: dict | None = None) -> list[dict]:
    """Train the hasher for ``cfg.stage1_steps`` minibatch steps; returns the loss history.

    With ``checkpoint`` the state is saved every ``checkpoint.every`` steps (phase ``"stage1"``);
    ``resume`` (a checkpoint saved in that phase) continues from its step with its weights,
    optimiser, batch position and random generators, so the result equals an uninterrupted run.
    """
    indexer.train()
    params = list(indexer.parameters())
    opt = _optimiser(params, cfg)
    batch = min(cfg.stage1_batch, data.n_cells)
    noise = view_noise_sd(data, cfg)
    history = []
    gen = torch.Generator(device=data.device).manual_seed(int(rng.integers(2**31)))
    rows_of = _RowCursor(data.n_cells, batch, rng)
    start = 0
    if resume is not None:
        checkpoint.load_modules(resume)
        opt.load_state_dict(resume["optimiser"])
        gen.set_state(resume["loop"]["gen"])
        rows_of.load(resume["loop"])
        history, start = list(resume["history1"]), resume["step"]
        checkpoint.restore_rngs(resume)
    bar = tqdm(range(start, cfg.stage1_steps), desc="stage 1: hashing", disable=not progress, leave=False,
               initial=start, total=cfg.stage1_steps)
    for step in bar:
        rows = rows_of.next()
        if len(rows) >= 2:  # a last batch of one cell has no contrastive pairs
            x = data.inputs(rows)
            counts, sf, onehot = data.targets(rows)
            keep = 1.0 - cfg.mask_rate
            x1 = x * (torch.rand(x.shape, generator=gen, device=x.device) < keep)
            x2 = x * (torch.rand(x.shape, generator=gen, device=x.device) < keep)
            if noise > 0:
                x1 = x1 + noise * torch.randn(x.shape, generator=gen, device=x.device)
                x2 = x2 + noise * torch.randn(x.shape, generator=gen, device=x.device)
            terms = indexer.losses(x1, x2, counts, sf, onehot, tau=cfg.tau, bucket_weight=cfg.bucket_weight,
                                   detach_codes=cfg.detach_codes)
            # w_zinb = 0 leaves the term out of the graph, so the decoder gets no gradient (and no
            # weight-decay step); at the default 1.0 the sum is formed in the same order as before.
            loss = cfg.w_contrastive * terms["contrastive"]
            if cfg.w_zinb > 0:
                loss = (terms["zinb"] if cfg.w_zinb == 1 else cfg.w_zinb * terms["zinb"]) + loss
            loss = loss + cfg.w_balance * terms["balance"] + cfg.w_quantisation * terms["quantisation"]
            _step(opt, loss, params, cfg, "stage 1 (hashing)", step, checkpoint)
            if step % 10 == 0 or step == cfg.stage1_steps - 1:
                history.append({"stage": 1, "step": step, "loss": loss.item(), **{k: v.item() for k, v in terms.items()}})
                bar.set_postfix(loss=f"{loss.item():.3f}")
        if checkpoint is not None and checkpoint.due(step + 1, cfg.stage1_steps):
            checkpoint.save("stage1", step + 1, optimiser=opt.state_dict(), history1=history,
                            loop={"gen": gen.get_state(), **rows_of.state()})
    return history


def _abs_input_sum(data: CellData, chunk: int = 8192) -> tuple[float, int]:
    """(sum of |standardised input|, number of entries) over all cells, in row chunks."""
    total = sum(float(data.inputs(rows).abs().sum(dtype=torch.float64)) for rows in data.minibatches(chunk))
    return total, data.n_cells * data.n_genes


def view_noise_sd(data: CellData, cfg: TrainConfig, reduce=None) -> float:
    """sd of the stage-1 view noise: ``input_noise`` x the mean |standardised input| of all cells.

    ``reduce`` sums the (total, entries) pair over processes (DDP), so every rank gets the same sd;
    with ``input_noise`` 0 the data pass is skipped.
    """
    if cfg.input_noise <= 0:
        return 0.0
    total, n = _abs_input_sum(data)
    if reduce is not None:
        total, n = reduce(np.array((total, n), dtype=np.float64))
    return cfg.input_noise * (total / max(n, 1))


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
    return np.concatenate(codes), np.concatenate(hs), np.concatenate(hidden)


def token_features(prep, hidden: np.ndarray, axes: np.ndarray | None, scale: float | None = None,
                   batch: int = 65536) -> tuple[np.ndarray, float | None]:
    """Stage-2 tokens (cells, hash_latent + P): the stage-1 hidden layer, then the standardised
    expression projected on the fixed principal ``axes`` (genes, P), times ``scale``.

    The linear part keeps variance that the count likelihood gives little weight to (many small
    types of a shallow data set), the hidden part what only a non-linear encoder finds. With
    ``scale`` None both parts get the same mean squared norm; the scale is returned so new
    cells can be embedded alike. Computed in row batches: never a dense cells x genes copy.
    """
    if axes is None:
        return hidden, None
    pcs = np.concatenate([prep.standardised(np.arange(s, min(s + batch, prep.n_cells))) @ axes
                          for s in range(0, prep.n_cells, batch)])
    if scale is None:
        scale = float(np.sqrt((hidden**2).sum(1).mean() / max((pcs**2).sum(1).mean(), 1e-12)))
    return np.concatenate([hidden, scale * pcs], axis=1).astype(np.float32), scale


def sorted_orders(codes: np.ndarray, h: np.ndarray) -> list[np.ndarray]:
    """One hash-sorted cell order per head; ties broken by the continuous code value."""
    weights = 2.0 ** -np.arange(h.shape[2])
    return [buckets.sort_order(codes[:, k], h[:, k] @ weights) for k in range(codes.shape[1])]


# ----------------------------------------------------------------------------- stage 2
def info_nce(a: torch.Tensor, b: torch.Tensor, tau: float) -> torch.Tensor:
    """Symmetric InfoNCE: row i of ``a`` and row i of ``b`` are positives, other rows negatives."""
    a, b = torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(b, dim=1)
    logits = a @ b.T / tau
    target = torch.arange(len(a), device=a.device)
    return 0.5 * (torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.T, target))


class _ChunkCursor:
    """Batches of chunk tokens for stage 2: each epoch one head's sorted order, cut at a random shift, chunks shuffled.

    The shift and permutation are drawn from ``rng`` when an epoch starts (shift first), as the
    original generator did; the position (epoch, shift, permutation, offset) can be checkpointed.
    """

    def __init__(self, orders: list[np.ndarray], cfg: TrainConfig, rng: np.random.Generator):
        self.orders, self.cfg, self.rng = orders, cfg, rng
        self.epoch, self.shift, self.pos = -1, 0, 0
        self.ids: np.ndarray | None = None
        self.chunks: np.ndarray | None = None

    def _cut(self) -> None:
        order = self.orders[self.epoch % len(self.orders)]
        self.chunks = buckets.chunk_index(order, self.cfg.chunk_size, shift=self.shift)

    def next(self) -> np.ndarray:
        if self.ids is None or self.pos >= len(self.ids):
            self.epoch += 1
            self.shift = int(self.rng.integers(self.cfg.chunk_size))
            self._cut()
            self.ids, self.pos = self.rng.permutation(len(self.chunks)), 0
        tokens = buckets.with_lookback(self.chunks, self.ids[self.pos:self.pos + self.cfg.chunks_per_batch])
        self.pos += self.cfg.chunks_per_batch
        return tokens

    def state(self) -> dict:
        return {"epoch": self.epoch, "shift": self.shift, "pos": self.pos,
                "ids": None if self.ids is None else torch.from_numpy(self.ids)}

    def load(self, state: dict) -> None:
        self.epoch, self.shift, self.pos = int(state["epoch"]), int(state["shift"]), int(state["pos"])
        self.ids = None if state["ids"] is None else state["ids"].numpy()
        if self.ids is not None:
            self._cut()


class Stage2:
    """The neighbourhood encoder with its ZINB decoder and clustering head, and their passes.

    Tokens are the cells' stage-1 hidden representations ``features`` (cells, n_latent), optionally
    followed by principal components (``TrainConfig.token_pcs``, see :func:`token_features`):
    the hasher has already compressed the genes, so stage 2 attends over short vectors
    and only its ZINB decoder touches the gene dimension.
    """

    def __init__(self, encoder: NeighbourhoodEncoder, decoder: ZINBDecoder, head: ClusterHead | None,
                 data: CellData, features: np.ndarray, orders: list[np.ndarray], cfg: TrainConfig,
                 rng: np.random.Generator):
        self.encoder, self.decoder, self.head = encoder, decoder, head
        self.data, self.orders, self.cfg, self.rng = data, orders, cfg, rng
        self.features = torch.from_numpy(features).to(data.device)
        self.history: list[dict] = []

    def _embed(self, tokens: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """tokens (chunks, 2C) cell ids -> z of the query cells (n, latent) and their ids."""
        c = self.cfg.chunk_size
        mask = tokens >= 0
        x = self.features[torch.from_numpy(np.where(mask, tokens, 0)).to(self.features.device)]
        z = self.encoder(x, torch.from_numpy(mask).to(x.device), n_query=c)
        query = mask[:, -c:]
        return z[torch.from_numpy(query).to(x.device)], tokens[:, -c:][query]

    def pretrain(self, progress: bool = True, checkpoint: Checkpointer | None = None, resume: dict | None = None) -> None:
        """ZINB-only training of encoder + decoder (checkpoint phase ``"pretrain"``)."""
        self._run(self.cfg.stage2_pretrain_steps, with_kl=False, progress=progress, checkpoint=checkpoint,
                  resume=resume)

    def init_centres(self, seed: int) -> np.ndarray:
        """Place the cluster centres (``cfg.init``: 'kmeans' or 'leiden' on the hash kNN graph); returns the labels."""
        z = self.embed_all()
        k = self.head.centres.shape[0]
        if self.cfg.init == "leiden":
            graph = buckets.hash_knn_graph(z, self.orders, self.cfg.chunk_size, self.cfg.graph_neighbors)
            labels = leiden_with_k(graph, k, seed)
            if labels.max() + 1 == k:
                centres = np.stack([z[labels == j].mean(0) for j in range(k)])
            else:  # Leiden could not hit K exactly: fall back to k-means
                log.info("Leiden found %d clusters instead of %d; using k-means", labels.max() + 1, k)
                centres = None
        if self.cfg.init != "leiden" or centres is None:
            km = KMeans(k, n_init=self.cfg.kmeans_n_init, random_state=seed).fit(z)
            labels, centres = km.labels_, km.cluster_centers_
        with torch.no_grad():
            self.head.centres.copy_(torch.from_numpy(centres).float())
        return labels

    def cluster(self, progress: bool = True, checkpoint: Checkpointer | None = None, resume: dict | None = None) -> None:
        """ZINB + KL(P || Q) training with P refreshed every ``update_interval`` steps (phase ``"cluster"``)."""
        self._run(self.cfg.stage2_cluster_steps, with_kl=True, progress=progress, checkpoint=checkpoint,
                  resume=resume)

    def _run(self, n_steps: int, with_kl: bool, progress: bool, checkpoint: Checkpointer | None = None,
             resume: dict | None = None) -> None:
        """The training loop of both stage-2 phases; see :func:`train_indexer` for ``checkpoint`` and ``resume``."""
        cfg = self.cfg
        modules = [self.encoder, self.decoder] + ([self.head] if with_kl else [])
        params = [p for m in modules for p in m.parameters()]
        opt = _optimiser(params, cfg)
        batches = _ChunkCursor(self.orders, cfg, self.rng)
        p_all, last_labels = None, None
        desc = "stage 2: clustering" if with_kl else "stage 2: encoder"
        phase = "cluster" if with_kl else "pretrain"
        start = 0
        if resume is not None:
            checkpoint.load_modules(resume)
            opt.load_state_dict(resume["optimiser"])
            batches.load(resume["loop"])
            self.history, start = list(resume["history2"]), resume["step"]
            if resume["loop"].get("p_all") is not None:
                p_all = resume["loop"]["p_all"].to(self.data.device)
                last_labels = resume["loop"]["last_labels"].numpy()
            checkpoint.restore_rngs(resume)
        bar = tqdm(range(start, n_steps), desc=desc, disable=not progress, leave=False, initial=start, total=n_steps)
        for step in bar:
            if with_kl and step % cfg.update_interval == 0:
                q_all = self.soft_assign_all()
                labels = q_all.argmax(1)
                if last_labels is not None:
                    changed = float((labels != last_labels).mean())
                    bar.set_postfix(changed=f"{changed:.4f}")
                    if changed < cfg.tol:
                        log.info("stage 2 converged at step %d (%.4f%% labels changed)", step, 100 * changed)
                        break
                last_labels = labels
                p_all = target_distribution(torch.from_numpy(q_all)).to(self.data.device)
            for m in modules:
                m.train()
            tokens = batches.next()
            z, rows = self._embed(tokens)
            counts, sf, onehot = self.data.targets(rows)
            zinb = zinb_nll(counts, *self.decoder(z, sf, onehot))
            loss = cfg.w_zinb_stage2 * zinb
            terms = {"zinb": zinb.item()}
            if cfg.w_consistency > 0:
                # A second pass sees other dropout noise on tokens and attention: its z must still
                # identify the same cell among the batch (SimCSE-style), which keeps z discriminative.
                cons = info_nce(z, self._embed(tokens)[0], cfg.tau)
                loss = loss + cfg.w_consistency * cons
                terms["consistency"] = cons.item()
            if with_kl:
                kl = kl_loss(p_all[torch.from_numpy(rows).to(z.device)], self.head(z))
                loss = loss + cfg.w_kl * kl
                terms["kl"] = kl.item()
            _step(opt, loss, params, cfg, desc, step, checkpoint)
            if step % 10 == 0:
                self.history.append({"stage": "2-cluster" if with_kl else "2-pretrain", "step": step,
                                     "loss": loss.item(), **terms})
            if checkpoint is not None and checkpoint.due(step + 1, n_steps):
                loop = batches.state()
                if with_kl:  # P and the labels of the last refresh, so a resume between refreshes uses them
                    loop.update(p_all=p_all.cpu(), last_labels=torch.from_numpy(last_labels))
                checkpoint.save(phase, step + 1, optimiser=opt.state_dict(), history2=self.history, loop=loop)

    @torch.no_grad()
    def embed_all(self, orders: list[np.ndarray] | None = None) -> np.ndarray:
        """Embedding z of every cell (cells, latent): mean over the hash heads' chunkings."""
        self.encoder.eval()
        orders = self.orders if orders is None else orders
        n = len(orders[0])
        z_sum = np.zeros((n, self.encoder.n_latent), dtype=np.float32)
        per_batch = max(1, self.cfg.infer_batch // self.cfg.chunk_size)
        for order in orders:
            chunks = buckets.chunk_index(order, self.cfg.chunk_size)
            for start in range(0, len(chunks), per_batch):
                ids = np.arange(start, min(start + per_batch, len(chunks)))
                z, rows = self._embed(buckets.with_lookback(chunks, ids))
                z_sum[rows] += z.cpu().numpy()
        return z_sum / len(orders)

    @torch.no_grad()
    def soft_assign_all(self, z: np.ndarray | None = None) -> np.ndarray:
        """q (cells, K) for every cell."""
        z = self.embed_all() if z is None else z
        self.head.eval()
        out = [self.head(torch.from_numpy(z[s:s + self.cfg.infer_batch]).to(self.data.device)).cpu().numpy()
               for s in range(0, len(z), self.cfg.infer_batch)]
        return np.concatenate(out)


def leiden_with_k(graph, n_clusters: int, seed: int, max_iter: int = 30) -> np.ndarray:
    """Leiden (leidenalg, RB modularity) on ``graph`` at the resolution that gives ``n_clusters``, by bisection."""
    import igraph as ig
    import leidenalg

    coo = graph.tocoo()
    upper = coo.row < coo.col
    g = ig.Graph(n=graph.shape[0], edges=list(zip(coo.row[upper].tolist(), coo.col[upper].tolist())))

    def run(resolution: float) -> np.ndarray:
        part = leidenalg.find_partition(g, leidenalg.RBConfigurationVertexPartition,
                                        resolution_parameter=resolution, seed=seed, n_iterations=2)
        return np.asarray(part.membership)

    lo, hi, resolution = 0.0, None, 1.0
    best = None
    for _ in range(max_iter):
        labels = run(resolution)
        k = labels.max() + 1
        if best is None or abs(k - n_clusters) < abs(best.max() + 1 - n_clusters):
            best = labels
        if k == n_clusters:
            break
        if k < n_clusters:
            lo = resolution
            resolution = resolution * 2 if hi is None else (lo + hi) / 2
        else:
            hi = resolution
            resolution = (lo + hi) / 2
    return best
