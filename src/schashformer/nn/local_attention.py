"""Stage 2: the neighbourhood Transformer (sort-and-chunk local attention).

Cells are sorted by hash code and the sorted order is cut into chunks of C cells
(see :mod:`schashformer.buckets`). Each chunk's cells are queries; keys/values are the
chunk itself plus the previous chunk (Reformer's look-back), so a cell at a chunk
border still sees its hash neighbours. A batch is a dense (chunks, C, 2C) problem:
no Python loop over buckets, no cells x cells matrix. The largest attention-score
tensor seen is recorded in ``max_scores_numel`` so tests can assert it does not grow
with the number of cells.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class LocalAttention(nn.Module):
    """Multi-head attention of C queries over T keys per chunk, with a key mask."""

    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_model, 2 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)
        self.max_scores_numel = 0

    def weights(self, queries: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor,
                expand: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention weights (B, heads, C, T) of queries (B, C, d) over keys (B, T, d) before dropout, and
        the values (B, heads, T, d / heads); key_mask (B, T) or per query (B, C, T), True = attend.
        ``expand``: keys are given once per distinct token and this maps their projections to (B, T, 2d)
        (:func:`lookback_expand`)."""
        b, c, d = queries.shape
        hd = d // self.n_heads
        q = self.q(queries).view(b, c, self.n_heads, hd).transpose(1, 2)
        kv = self.kv(keys) if expand is None else expand(self.kv(keys))
        t = kv.shape[1]
        k, v = kv.view(b, t, 2, self.n_heads, hd).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) / hd**0.5  # (B, heads, C, T)
        self.max_scores_numel = max(self.max_scores_numel, scores.numel())
        allowed = key_mask[:, None, None, :] if key_mask.dim() == 2 else key_mask[:, None]
        return F.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1), v

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor,
                expand: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """queries (B, C, d), keys (B, T, d), key_mask and ``expand`` as in :meth:`weights` -> (B, C, d)."""
        b, c, d = queries.shape
        attn, v = self.weights(queries, keys, key_mask, expand)
        return self.out((self.dropout(attn) @ v).transpose(1, 2).reshape(b, c, d))


def lookback_expand(per_chunk: torch.Tensor) -> torch.Tensor:
    """(B + 1, C, ...) values of consecutive chunks, the first being the look-back of the second ->
    (B, 2C, ...): each chunk's look-back then itself, the layout of :func:`schashformer.buckets.with_lookback`."""
    return torch.cat([per_chunk[:-1], per_chunk[1:]], 1)


def without_self(key_mask: torch.Tensor, n_query: int) -> torch.Tensor:
    """Key mask (B, T) with the C = n_query queries last -> per-query mask (B, C, T) in which no query
    attends to its own position; a query with no other key keeps its own (a softmax needs one key)."""
    b, t = key_mask.shape
    own = torch.zeros(n_query, t, dtype=torch.bool, device=key_mask.device)
    own[:, t - n_query:] = torch.eye(n_query, dtype=torch.bool, device=key_mask.device)
    mask = key_mask[:, None, :] & ~own
    return torch.where(mask.any(-1, keepdim=True), mask, key_mask[:, None, :].expand(b, n_query, t))


def nearest_keys(keys: torch.Tensor, queries: torch.Tensor, key_mask: torch.Tensor, k: int) -> torch.Tensor:
    """Per-query mask (B, C, T) keeping, of the keys each query may attend to (``key_mask`` (B, T) or (B, C, T)),
    the ``k`` most similar to it by cosine of the input tokens ``keys`` (B, T, w) and ``queries`` (B, C, w).
    A window holds a few cells of neighbouring types; the nearest of its cells are more often the query's own."""
    with torch.no_grad():
        sim = F.normalize(queries, dim=-1) @ F.normalize(keys, dim=-1).transpose(1, 2)
        allowed = key_mask if key_mask.dim() == 3 else key_mask[:, None, :].expand_as(sim)
        top = sim.masked_fill(~allowed, float("-inf")).topk(min(k, sim.shape[-1]), dim=-1).indices
        # top-k ranks the allowed keys first, so a query with any allowed key keeps at least one (a softmax needs one)
        return torch.zeros_like(allowed).scatter_(-1, top, True) & allowed


class NeighbourhoodEncoder(nn.Module):
    """Input projection -> one pre-LN Transformer block over hash neighbourhoods -> latent z.

    Parameters
    ----------
    n_genes : input size.
    d_model : token width.
    n_heads : attention heads.
    n_latent : size of the embedding z used for clustering.
    n_layers : Transformer blocks (1 in the paper).
    dropout : dropout rate.
    token_residual : z = the query's own input token + a learned update (needs n_latent ==
        n_genes). The update starts at zero, so training starts from the stage-1
        representation and attention can only add to it, not replace it.
    attention : False (ablation) skips the attention sub-layer of every block: each query token
        goes through the input projection, the feed-forward sub-layers and the output layer
        alone, so z depends on the cell's own token only. The attention weights are still
        built (same parameter initialisation), never called.
    exclude_self : no query attends to its own token, so what attention adds comes from the
        neighbours alone (needed when training corrupts the queries: the clean own token among
        the keys would be copied back).
    neighbours : > 0: each query attends only to this many of its window's keys, those nearest to its clean
        input token (cosine; :func:`nearest_keys`); 0: to every key of the window.
    """

    def __init__(self, n_genes: int, d_model: int = 256, n_heads: int = 4, n_latent: int = 32,
                 n_layers: int = 1, dropout: float = 0.1, token_residual: bool = False, attention: bool = True,
                 exclude_self: bool = False, neighbours: int = 0):
        super().__init__()
        if token_residual and n_latent != n_genes:
            raise ValueError(f"token_residual needs n_latent == input size, got {n_latent} and {n_genes}")
        self.token_residual, self.attention, self.exclude_self = token_residual, attention, exclude_self
        self.neighbours = neighbours
        self.n_latent = n_latent
        self.input = nn.Sequential(nn.Dropout(dropout), nn.Linear(n_genes, d_model))
        self.blocks = nn.ModuleList(_Block(d_model, n_heads, dropout) for _ in range(n_layers))
        self.to_latent = nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, n_latent))
        if token_residual:
            nn.init.zeros_(self.to_latent[1].weight)
            nn.init.zeros_(self.to_latent[1].bias)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor, n_query: int,
                query_x: torch.Tensor | None = None, consecutive: bool = False) -> torch.Tensor:
        """x (B, T, genes) with the C = n_query query cells last; key_mask (B, T) -> z (B, C, n_latent).

        The first T - C tokens are context only (the previous chunk). Every block's keys and values are
        the input tokens of all T positions; only the query stream is updated block by block.
        ``query_x`` (B, C, genes): the queries' own input instead of ``x``'s last C rows (a corrupted
        copy in training, :class:`schashformer.nn.losses.NeighbourhoodLoss`), while the keys keep ``x``.
        ``consecutive``: the rows are consecutive chunks of one order with T = 2C, so row j's look-back
        is row j - 1's chunk (inference passes them so); every token's key and value projections are
        then computed once instead of twice, a fifth of the pass.
        """
        c = n_query
        if not self.attention:  # context tokens are only ever read by attention: drop them
            x, key_mask = x[:, -c:], key_mask[:, -c:]
        own = x[:, -c:] if query_x is None else query_x
        expand = None
        if self.attention and consecutive:
            if x.shape[1] != 2 * c:
                raise ValueError(f"consecutive chunks need 2C = {2 * c} tokens per row, got {x.shape[1]}")
            expand = lookback_expand
            context = self.input(torch.cat([x[:1, :c], x[:, -c:]]))  # (B + 1, C, d): each chunk once
            query = context[1:] if query_x is None else self.input(query_x)
        else:
            context = self.input(x)
            query = context[:, -c:] if query_x is None else self.input(query_x)
        if self.attention and self.exclude_self:
            key_mask = without_self(key_mask, c)
        if self.attention and self.neighbours > 0:
            key_mask = nearest_keys(x, x[:, -c:], key_mask, self.neighbours)
        for block in self.blocks:
            query = block(query, context, key_mask, attend=self.attention, expand=expand)
        z = self.to_latent(query)
        return own + z if self.token_residual else z

    @property
    def max_scores_numel(self) -> int:
        """Elements of the largest attention-score tensor seen (chunks x heads x C x T)."""
        return max(block.attn.max_scores_numel for block in self.blocks)


class _Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.ln_attn = nn.LayerNorm(d_model)
        self.attn = LocalAttention(d_model, n_heads, dropout)
        self.ln_ff = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, 2 * d_model), nn.GELU(), nn.Dropout(dropout),
                                nn.Linear(2 * d_model, d_model))

    def forward(self, query: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor,
                attend: bool = True, expand: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """query (B, C, d) attends over context (B, T, d) -> updated query (B, C, d); ``attend=False`` skips
        attention; ``expand`` as in :meth:`LocalAttention.weights`."""
        if attend:
            query = query + self.attn(self.ln_attn(query), self.ln_attn(context), key_mask, expand)
        return query + self.ff(self.ln_ff(query))
