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

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """queries (B, C, d), keys (B, T, d), key_mask (B, T) True = attend -> (B, C, d)."""
        b, c, d = queries.shape
        t, hd = keys.shape[1], d // self.n_heads
        q = self.q(queries).view(b, c, self.n_heads, hd).transpose(1, 2)
        k, v = self.kv(keys).view(b, t, 2, self.n_heads, hd).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) / hd**0.5  # (B, heads, C, T)
        self.max_scores_numel = max(self.max_scores_numel, scores.numel())
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        attn = self.dropout(F.softmax(scores, dim=-1))
        return self.out((attn @ v).transpose(1, 2).reshape(b, c, d))


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
    """

    def __init__(self, n_genes: int, d_model: int = 256, n_heads: int = 4, n_latent: int = 32,
                 n_layers: int = 1, dropout: float = 0.1, token_residual: bool = False, attention: bool = True):
        super().__init__()
        if token_residual and n_latent != n_genes:
            raise ValueError(f"token_residual needs n_latent == input size, got {n_latent} and {n_genes}")
        self.token_residual, self.attention = token_residual, attention
        self.n_latent = n_latent
        self.input = nn.Sequential(nn.Dropout(dropout), nn.Linear(n_genes, d_model))
        self.blocks = nn.ModuleList(_Block(d_model, n_heads, dropout) for _ in range(n_layers))
        self.to_latent = nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, n_latent))
        if token_residual:
            nn.init.zeros_(self.to_latent[1].weight)
            nn.init.zeros_(self.to_latent[1].bias)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor, n_query: int) -> torch.Tensor:
        """x (B, T, genes) with the C = n_query query cells last; key_mask (B, T) -> z (B, C, n_latent).

        The first T - C tokens are context only (the previous chunk).
        """
        c = n_query
        if not self.attention:  # context tokens are only ever read by attention: drop them
            x, key_mask = x[:, -c:], key_mask[:, -c:]
        tokens = self.input(x)
        for block in self.blocks:
            tokens = block(tokens, key_mask, n_query=c, attend=self.attention)
        z = self.to_latent(tokens[:, -c:])
        return x[:, -c:] + z if self.token_residual else z

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

    def forward(self, tokens: torch.Tensor, key_mask: torch.Tensor, n_query: int, attend: bool = True) -> torch.Tensor:
        """tokens (B, T, d) with the n_query query tokens last -> (B, T, d); ``attend=False`` skips attention."""
        # Context tokens keep their value; only query tokens are updated.
        query = tokens[:, -n_query:]
        if attend:
            normed = self.ln_attn(tokens)
            query = query + self.attn(normed[:, -n_query:], normed, key_mask)
        query = query + self.ff(self.ln_ff(query))
        return torch.cat([tokens[:, :-n_query], query], dim=1) if tokens.shape[1] > n_query else query
