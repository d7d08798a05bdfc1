"""The training configuration: every hyper-parameter of both stages, and the device rule.

The loops that use it live in :mod:`schashformer.engine`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from .errors import ParameterError


# Passes over the cells of the stage-2 phases at the default caps on 4,271 cells (10x PBMC, where the
# caps were tuned): 100 x 512 / 4271 = 12 and 200 x 512 / 4271 = 24. Smaller data get these many passes
# instead of the caps (TrainConfig.for_cells), never fewer than MIN_STEPS steps. Stage 1 keeps its
# count: fewer stage-1 steps on small data (48 passes) helped mouse pancreas by 0.30 ARI but cost a
# 225-cell cell-line mixture 0.10, whatever the batch size (docs/METHOD_CHOICES.md).
PHASE_EPOCHS = {"pretrain": 12.0, "cluster": 24.0}
MIN_STEPS = 50


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
    # query cells per attention chunk; each query attends over its chunk and the previous one (2C keys). 4
    # rather than 8 (or 16): over five seeds the suite mean rises 0.657 -> 0.662 (16 -> 8: +0.003), no set
    # loses more than its seed sd, and stage 2's clustering phase is shorter; the cost is a larger seed
    # spread on two sets. A stage-2 step holds chunk_size x chunks_per_batch query cells, so this also halved
    # the batch (256 -> 128); at 128 cells, chunks of 8 score 0.013 below chunks of 4 over two seeds
    # (docs/METHOD_CHOICES.md, "Chunks of 4 become the default")
    chunk_size: int = 4
    chunks_per_batch: int = 32
    d_model: int = 256
    attn_heads: int = 4
    layers: int = 1
    latent: int = 32  # width of z when token_residual is off (with it, z has the token's width)
    token_pcs: int = 20  # >0: stage-2 tokens = stage-1 hidden + this many principal components
    token_residual: bool = True  # z = the cell's own token + attention update
    attention: bool = True  # False (ablation): no attention between cells, each token passes the MLPs alone
    stage2_pretrain_steps: int = 100  # at most: smaller data get PHASE_EPOCHS passes (for_cells)
    stage2_cluster_steps: int = 200  # at most, as stage2_pretrain_steps; stops earlier on tol
    # True: fewer stage-2 steps on small data (for_cells); False: exactly the step counts above. Off by
    # default: on mouse pancreas it cost 0.06 mean ARI over 2 seeds (docs/METHOD_CHOICES.md)
    scale_steps: bool = False
    update_interval: int = 25  # steps between refreshes of the target distribution P
    tol: float = 0.001  # stop when fewer than this fraction of labels change between refreshes
    # sd of the noise on each query's own token in stage-2 training (units of the rms token entry); > 0 also
    # hides a cell's own token from its attention, so the update has to come from its hash neighbours
    # (neighbourhood denoising, docs/METHOD_CHOICES.md). 0: the cell's own counts from its clean token.
    query_noise: float = 0.0
    # > 0: each stage-2 query attends only to this many keys of its window, the nearest to its own token (cosine);
    # 0: every key of the window (docs/METHOD_CHOICES.md)
    attention_neighbours: int = 0
    w_consistency: float = 0.0  # stage-2 InfoNCE between two dropout passes (off: token_residual keeps z discriminative)
    # weight of the stage-2 term pulling each query's z towards its nearest chunk mate's (neighbour_pull); 0: off
    w_neighbour: float = 0.0
    # > 0: each stage-2 query's ZINB target adds the counts of this many nearest chunk mates (by token cosine), which
    # the token alone cannot predict (pool_chunk_mates); 0: the cell's own counts
    pool_mates: int = 0
    # weight of the KL clustering loss: scDeepCluster's 1, not METHOD.md's 0.1 (the ZINB term is a mean per
    # entry, so 0.1 left DEC almost idle: +0.005 worm NMI at 1 with refreshes every 25 steps, docs/METHOD_CHOICES.md)
    w_kl: float = 1.0
    w_zinb_stage2: float = 1.0  # weight of the ZINB loss in stage 2
    # exponent of the cluster frequency in DEC's target p = q^2 / f^target_balance: 1 is DEC's (favours equal
    # sizes), 0 sharpens q alone; None follows the start partition: 1 after k-means, 0 after a graph start
    # (chosen where clusters differ in size; docs/METHOD_CHOICES.md, unequal type sizes)
    target_balance: float | None = None
    # Genes in each training step's ZINB loss (both stages): a fresh random subset of this many genes per
    # step, or every gene (None). The per-entry mean stays unbiased; the decoder's output layers and the
    # likelihood, over half of a step's time at 2,000 genes, shrink with it (docs/METHOD_CHOICES.md).
    zinb_genes: int | None = None
    dropout: float = 0.1
    lr: float = 1e-3
    weight_decay: float = 1e-4
    grad_clip: float = 5.0
    kmeans_n_init: int = 20
    # where the cluster centres start: "auto" takes k-means on z (METHOD.md) or Leiden at K on z's exact kNN graph,
    # whichever partition has the higher silhouette (types of very unequal size: +0.15 ARI on the unequal simulation,
    # the suite unchanged, docs/METHOD_CHOICES.md); "kmeans" alone; "leiden" on the hash-neighbourhood kNN graph
    init: str = "auto"
    graph_neighbors: int = 15
    # cells per chunk of the hash kNN graph's candidate windows (3 chunks per hash head; K estimation, init="leiden",
    # tl.hash_neighbors): apart from chunk_size, so small attention windows leave the graph its candidates
    graph_chunk: int = 16
    infer_batch: int = 2048
    # Training forward passes in bfloat16 autocast on CUDA GPUs that support it (the ZINB likelihood,
    # softmax, LayerNorm and distances stay float32; bf16 needs no loss scaling), and the streamed passes over
    # every cell of a large input (hashing, embedding) in bf16 on those GPUs and on CPUs with bf16 units
    # (AVX512-BF16, AMX): a 10^6-cell run ~15% faster on 2 cores at the same ARI (docs/METHOD_CHOICES.md).
    # False: float32 everywhere.
    mixed_precision: bool = True
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

    def for_cells(self, n_cells: int) -> "TrainConfig":
        """The configuration for a fit on ``n_cells`` cells: each stage-2 phase's step count is the
        number of steps that show every cell :data:`PHASE_EPOCHS` times, at least :data:`MIN_STEPS` and
        at most the field's value (so the fields are caps, reached from cap x stage-2 batch / epochs cells
        up: about 1,070 cells at the defaults' 128 query cells a step);
        unchanged when ``scale_steps`` is off.

        Below that size the fixed counts (tuned at ~4k cells) pass over the same cells hundreds of
        times (docs/METHOD_CHOICES.md has the probes).
        """
        if not self.scale_steps:
            return self
        n = max(int(n_cells), 1)
        batches_per_pass = n / min(self.chunk_size * self.chunks_per_batch, n)  # query cells per stage-2 step

        def steps(cap: int, epochs: float) -> int:
            return int(min(cap, max(MIN_STEPS, math.ceil(epochs * batches_per_pass))))

        return replace(self, stage2_pretrain_steps=steps(self.stage2_pretrain_steps, PHASE_EPOCHS["pretrain"]),
                       stage2_cluster_steps=steps(self.stage2_cluster_steps, PHASE_EPOCHS["cluster"]))

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
