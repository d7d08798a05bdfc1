"""The training objectives of both stages as modules: the networks they train plus their losses.

Each loss module computes what *this process* contributes to the loss of one global batch:
terms that are means over cells (ZINB, KL) are weighted by ``share``, this process's fraction of
the batch's cells, and in-batch terms (contrastive, bit balance, consistency) are computed on
rows gathered from every process by ``gather`` (the identity in one process). Summing every
process's gradient (:class:`schashformer.engine.Comm`) then gives the gradient of the whole
batch's loss; in one process ``share`` is 1 and ``gather`` the identity, so nothing changes.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .cluster_head import ClusterHead, kl_loss
from .local_attention import NeighbourhoodEncoder
from .lsh import LSHIndexer, bit_balance_loss, bucket_contrastive_loss
from .zinb import ZINBDecoder, zinb_nll

Gather = Callable[[torch.Tensor], torch.Tensor]


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def info_nce(a: torch.Tensor, b: torch.Tensor, tau: float) -> torch.Tensor:
    """Symmetric InfoNCE: row i of ``a`` and row i of ``b`` are positives, other rows negatives."""
    a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    logits = a @ b.T / tau
    target = torch.arange(len(a), device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def chunk_mate_similarity(tokens: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Cosine of the input ``tokens`` (B, C, width) of each chunk's C queries to their chunk mates, (B, C, C);
    -inf where the pair is not two different present queries (``present`` (B, C)). No gradient: the choice
    of mates is not trained."""
    c = tokens.shape[1]
    with torch.no_grad():
        t = F.normalize(tokens, dim=-1)
        mates = present[:, None, :] & present[:, :, None] & ~torch.eye(c, dtype=torch.bool, device=tokens.device)
        return (t @ t.transpose(1, 2)).masked_fill(~mates, float("-inf"))


def neighbour_pull(z: torch.Tensor, tokens: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Mean cosine distance from each query's z to the z of its nearest chunk mate, the mate's z held fixed.

    ``z`` (B, C, latent) and input ``tokens`` (B, C, width) of each chunk's C query cells, ``present``
    (B, C). A query's mate is the other present query of its chunk whose input token is the most similar
    (cosine); queries without one are left out. Why: z = token + update, and the token alone cannot move
    towards a neighbour; the update can, most directly from what it reads in the window the two share,
    which gives attention a job (whether it takes it is measured by the ``attention=False`` ablation).
    No negatives: an in-batch InfoNCE pushed same-type cells apart and cost mouse bladder 0.09-0.11 ARI;
    the stop-gradient on the mate and the ZINB term keep z from collapsing (SimSiam's argument).
    """
    similarity = chunk_mate_similarity(tokens, present)
    nearest = similarity.argmax(-1)  # (B, C)
    anchor = present & (present.sum(-1, keepdim=True) > 1)  # present queries with a present mate
    if not anchor.any():
        return z.sum() * 0.0
    mate_z = z.gather(1, nearest[..., None].expand_as(z)).detach()
    return 1 - F.cosine_similarity(z[anchor], mate_z[anchor], dim=-1).mean()


def pool_chunk_mates(counts: torch.Tensor, size_factors: torch.Tensor, tokens: torch.Tensor, present: torch.Tensor,
                     n_mates: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's counts and size factor plus those of its ``n_mates`` nearest chunk mates (by token cosine).

    ``counts`` (n, genes) and ``size_factors`` (n,) are the present queries' in the row-major order of
    ``present`` (B, C); ``tokens`` (B, C, width) their input tokens. Returns the pooled (n, genes) and (n,);
    a query with fewer present mates pools the ones it has. Why: a ZINB target that holds a neighbour's
    counts cannot be reconstructed from the cell's own token alone, only by an update that reads the
    window the two share; a sum of counts is still a count, and the summed size factor keeps the mean
    per unit of depth.
    """
    b, c = present.shape
    k = min(n_mates, c - 1)
    if k <= 0 or not len(counts):
        return counts, size_factors
    with torch.no_grad():
        similarity, nearest = chunk_mate_similarity(tokens, present).topk(k, dim=-1)  # (B, C, k)
        position = (torch.cumsum(present.reshape(-1).long(), 0) - 1).view(b, c)  # row of each (chunk, slot) in counts
        mate_rows = position.gather(1, nearest.view(b, -1)).view(b, c, k)[present]  # (n, k)
        valid = torch.isfinite(similarity)[present]  # (n, k)
    pooled, sizes = counts.clone(), size_factors.clone()
    for j in range(k):  # k is 1..C-1: a loop over mate ranks, never over cells
        on = valid[:, j]
        pooled[on] += counts[mate_rows[on, j]]
        sizes[on] += size_factors[mate_rows[on, j]]
    return pooled, sizes


def zinb_on(decoder: ZINBDecoder, z: torch.Tensor, counts: torch.Tensor, size_factors: torch.Tensor,
            batch_onehot: torch.Tensor | None, genes: torch.Tensor | None) -> torch.Tensor:
    """Mean ZINB NLL of ``counts`` (cells, genes) decoded from ``z``; with ``genes`` (g,) only those columns,
    an unbiased estimate of the mean over all genes when the subset is drawn uniformly."""
    target = counts if genes is None else counts.index_select(1, genes)
    return zinb_nll(target, *decoder(z, size_factors, batch_onehot, genes))


class HashingLoss(nn.Module):
    """Stage 1: the hasher's loss on two augmented views of a minibatch.

    ZINB reconstruction of the counts from view 1's hidden layer, the bucket-contrastive loss
    between the views' hash embeddings, bit balance and quantisation (:mod:`schashformer.nn.lsh`).

    Parameters
    ----------
    indexer : the hasher being trained.
    tau, bucket_weight, detach_codes : see :class:`schashformer.train.TrainConfig`.
    w_zinb, w_contrastive, w_balance, w_quantisation : weights of the terms (``w_zinb`` 0 leaves
        the ZINB term out of the graph: the decoder then gets no gradient).
    """

    def __init__(self, indexer: LSHIndexer, *, tau: float, bucket_weight: float, detach_codes: bool, w_zinb: float,
                 w_contrastive: float, w_balance: float, w_quantisation: float):
        super().__init__()
        self.indexer = indexer
        self.tau, self.bucket_weight, self.detach_codes = tau, bucket_weight, detach_codes
        self.w_zinb, self.w_contrastive, self.w_balance, self.w_quantisation = (w_zinb, w_contrastive, w_balance,
                                                                                w_quantisation)

    # terms computed on the whole (gathered) batch, identical in every process; the others are shares
    batch_terms = frozenset({"contrastive", "balance", "quantisation"})

    def weights(self) -> dict[str, float]:
        """Weight of each term in the loss (for the reported total)."""
        return {"zinb": self.w_zinb, "contrastive": self.w_contrastive, "balance": self.w_balance,
                "quantisation": self.w_quantisation}

    def forward(self, views: torch.Tensor, counts: torch.Tensor, size_factors: torch.Tensor,
                batch_onehot: torch.Tensor | None, share: float = 1.0, gather: Gather = _identity,
                genes: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The two views (2, rows, genes) of this process's rows -> (loss, detached terms).

        ``terms["zinb"]`` is this process's share of the ZINB mean (over the ``genes`` subset when
        given, see :func:`zinb_on`); the other terms are the whole batch's (identical in every process).
        """
        ix = self.indexer
        n = views.shape[1]
        # both views through the encoder as one (2 x rows, genes) batch: one larger matrix product and half the
        # kernels (fwd + bwd 17.7 ms instead of 20.0 at 512 x 2,000); the layers act row by row, so each row's
        # output is the same as encoding the views apart (a test pins it)
        hidden = ix.encode(views.reshape(2 * n, views.shape[2]))
        hidden1, hidden2 = hidden[:n], hidden[n:]
        src1, src2 = (hidden1.detach(), hidden2.detach()) if self.detach_codes else (hidden1, hidden2)
        h1, h2 = gather(ix.soft_codes(src1)), gather(ix.soft_codes(src2))
        terms = {"contrastive": bucket_contrastive_loss(h1, h2, ix.codes(h1.detach()), self.tau, self.bucket_weight),
                 "balance": bit_balance_loss(h1), "quantisation": (h1 - h1.detach().round()).abs().mean()}
        loss = self.w_contrastive * terms["contrastive"]
        if n:
            zinb = zinb_on(ix.decoder, hidden1, counts, size_factors, batch_onehot, genes)
            zinb = zinb if share == 1 else zinb * share
            # w_zinb = 0 leaves the term out of the graph (ablation): the decoder gets no gradient
            if self.w_zinb > 0:
                loss = (zinb if self.w_zinb == 1 else self.w_zinb * zinb) + loss
            terms["zinb"] = zinb
        else:  # no rows in this process this step: touch the encoder so every process's graph has it
            terms["zinb"] = hidden1.sum() * 0.0
            loss = loss + terms["zinb"]
        loss = loss + self.w_balance * terms["balance"] + self.w_quantisation * terms["quantisation"]
        return loss, {k: v.detach() for k, v in terms.items()}


class NeighbourhoodLoss(nn.Module):
    """Stage 2: the neighbourhood encoder's ZINB reconstruction, optionally + consistency and KL(P || Q).

    Parameters
    ----------
    encoder, decoder : the neighbourhood Transformer and its ZINB decoder.
    head : the clustering head (None: pre-training, no KL term).
    chunk_size : C, query cells per chunk.
    tau : temperature of the consistency InfoNCE.
    w_zinb, w_consistency, w_kl, w_neighbour : weights of the terms (``w_neighbour``: :func:`neighbour_pull`,
        a mean over this process's queries, weighted by ``share`` like the other means over cells).
    pool_mates : > 0: the ZINB target of each query is its counts plus those of this many nearest chunk
        mates (:func:`pool_chunk_mates`); 0: its own counts.
    query_noise : sd of the Gaussian noise added to each query's own token in training, in units of
        the batch's root-mean-square token entry (0: none). The keys stay clean and (with the
        encoder's ``exclude_self``) exclude the query's own token, so what the corrupted query lacks
        can only be recovered from its hash neighbours: attention gets a job the token cannot do alone.
    """

    def __init__(self, encoder: NeighbourhoodEncoder, decoder: ZINBDecoder, head: ClusterHead | None, *,
                 chunk_size: int, tau: float, w_zinb: float, w_consistency: float, w_kl: float,
                 query_noise: float = 0.0, w_neighbour: float = 0.0, pool_mates: int = 0):
        super().__init__()
        self.encoder, self.decoder, self.head = encoder, decoder, head
        self.chunk_size, self.tau = chunk_size, tau
        self.w_zinb, self.w_consistency, self.w_kl, self.w_neighbour = w_zinb, w_consistency, w_kl, w_neighbour
        self.query_noise, self.pool_mates = query_noise, pool_mates

    batch_terms = frozenset({"consistency"})

    def weights(self) -> dict[str, float]:
        """Weight of each term in the loss (for the reported total)."""
        return {"zinb": self.w_zinb, "consistency": self.w_consistency, "kl": self.w_kl, "neighbour": self.w_neighbour}

    def embed(self, x: torch.Tensor, mask: torch.Tensor, query_x: torch.Tensor | None = None,
              consecutive: bool = False) -> torch.Tensor:
        """Tokens (chunks, 2C, width) with key mask (chunks, 2C) -> z of the present query cells (n, latent);
        ``query_x`` (chunks, C, width) replaces the queries' own tokens (not the keys); ``consecutive`` as
        in :meth:`NeighbourhoodEncoder.forward`."""
        c = self.chunk_size
        return self.encoder(x, mask, n_query=c, query_x=query_x, consecutive=consecutive)[mask[:, -c:]]

    def corrupted_queries(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        """The queries' tokens plus Gaussian noise of sd ``query_noise`` x their rms entry (None when 0)."""
        if self.query_noise <= 0:
            return None
        c = self.chunk_size
        own, present = x[:, -c:], mask[:, -c:]
        rms = own[present].detach().pow(2).mean().sqrt() if present.any() else own.new_ones(())
        return own + (self.query_noise * rms) * torch.randn_like(own)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, counts: torch.Tensor, size_factors: torch.Tensor,
                batch_onehot: torch.Tensor | None, p: torch.Tensor | None, share: float = 1.0,
                gather: Gather = _identity, genes: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """This process's chunks of a batch -> (loss, detached terms); ``p`` (queries, K) the target rows,
        ``genes`` the ZINB term's gene subset (None: all, see :func:`zinb_on`)."""
        c = self.chunk_size
        z_chunks = self.encoder(x, mask, n_query=c, query_x=self.corrupted_queries(x, mask))
        z = z_chunks[mask[:, -c:]]
        if len(z):
            if self.pool_mates > 0:
                counts, size_factors = pool_chunk_mates(counts, size_factors, x[:, -c:], mask[:, -c:], self.pool_mates)
            zinb = zinb_on(self.decoder, z, counts, size_factors, batch_onehot, genes)
        else:  # no query cell in this process this step (a mean over none is undefined)
            zinb = z.sum() * 0.0
        loss = self.w_zinb * zinb
        terms = {"zinb": zinb}
        if self.w_consistency > 0:
            # A second pass sees other dropout noise on tokens and attention: its z must still
            # identify the same cell among the batch (SimCSE-style), which keeps z discriminative.
            cons = info_nce(gather(z), gather(self.embed(x, mask, self.corrupted_queries(x, mask))), self.tau)
            terms["consistency"] = cons
        if self.head is not None:
            kl = kl_loss(p, self.head(z)) if len(z) else z.sum() * 0.0
            terms["kl"] = kl
        if self.w_neighbour > 0:
            terms["neighbour"] = neighbour_pull(z_chunks, x[:, -c:], mask[:, -c:])
            loss = loss + self.w_neighbour * terms["neighbour"]
        if share != 1:  # the means over cells become this process's share of the batch's means
            loss = loss * share
            for name in ("zinb", "kl", "neighbour"):
                if name in terms:
                    terms[name] = terms[name] * share
        if "consistency" in terms:
            loss = loss + self.w_consistency * terms["consistency"]
        if "kl" in terms:
            loss = loss + self.w_kl * terms["kl"]
        return loss, {k: v.detach() for k, v in terms.items()}
