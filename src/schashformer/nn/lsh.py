"""Stage 1: the learnable multi-head locality-sensitive hasher.

An MLP encodes a cell's standardised expression; H hash heads each map the hidden
layer to b sigmoid units, the continuous hash embedding h in (0, 1)^b. The binary
code of head k is round(h_k); cells with identical codes in a head share that head's
bucket. Losses (:class:`schashformer.nn.losses.HashingLoss`): ZINB reconstruction, an in-batch
contrastive loss whose positives are the other view of the same cell and the cells
in the same bucket, bit balance + decorrelation, and quantisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .zinb import ZINBDecoder


class LSHIndexer(nn.Module):
    """Multi-head learnable hasher.

    Parameters
    ----------
    n_genes : input size.
    n_hidden : width of the encoder's first layer.
    n_latent : width of the hidden representation fed to the hash heads and decoder.
    n_heads : number of hash tables H.
    n_bits : bits per head b.
    n_batches : batch categories passed to the ZINB decoder as a covariate.
    dropout : dropout rate in the encoder.
    projection : optional fixed (genes, p) matrix (e.g. principal axes) applied before the
        encoder; a buffer, saved with the model but never trained.
    """

    def __init__(self, n_genes: int, n_hidden: int = 512, n_latent: int = 128, n_heads: int = 3,
                 n_bits: int = 8, n_batches: int = 0, dropout: float = 0.1,
                 projection: torch.Tensor | None = None):
        super().__init__()
        self.n_heads, self.n_bits = n_heads, n_bits
        if projection is not None:
            self.register_buffer("projection", torch.as_tensor(projection, dtype=torch.float32))
        else:
            self.projection = None
        n_in = n_genes if projection is None else self.projection.shape[1]
        self.encoder = nn.Sequential(
            nn.Linear(n_in, n_hidden), nn.LayerNorm(n_hidden), nn.GELU(), nn.Dropout(dropout),
            # No activation after the last LayerNorm: a GELU there zeroes half of every
            # cell's coordinates and cost 0.07 ARI on mouse bladder (docs/METHOD_CHOICES.md).
            nn.Linear(n_hidden, n_latent), nn.LayerNorm(n_latent),
        )
        self.hash = nn.Linear(n_latent, n_heads * n_bits)
        self.decoder = ZINBDecoder(n_latent, n_genes, n_hidden=n_hidden // 2, n_batches=n_batches)
        # Bit weights turn a row of bits into an integer code (most significant first).
        self.register_buffer("bit_weights", 2 ** torch.arange(n_bits - 1, -1, -1, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor):
        """x: (cells, genes) -> hidden (cells, n_latent), continuous hash h (cells, H, b)."""
        hidden = self.encode(x)
        return hidden, self.soft_codes(hidden)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: (cells, genes) -> hidden (cells, n_latent)."""
        return self.encoder(x if self.projection is None else x @ self.projection)

    def soft_codes(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (cells, n_latent) -> continuous hash h in (0, 1), (cells, H, b)."""
        return torch.sigmoid(self.hash(hidden)).view(-1, self.n_heads, self.n_bits)

    def codes(self, h: torch.Tensor) -> torch.Tensor:
        """Continuous hash (cells, H, b) -> integer bucket ids (cells, H)."""
        return ((h > 0.5).long() * self.bit_weights).sum(-1)


def bucket_contrastive_loss(h1: torch.Tensor, h2: torch.Tensor, codes: torch.Tensor, tau: float,
                            bucket_weight: float = 1.0) -> torch.Tensor:
    """Multi-positive InfoNCE per head, averaged over heads.

    Positives of cell i (view 1) are its own view 2 (weight 1) and every view-2 cell whose
    code in that head equals i's code (weight ``bucket_weight``, shared among them); all
    other cells in the minibatch are negatives.
    """
    n, n_heads, _ = h1.shape
    eye = torch.eye(n, dtype=torch.bool, device=h1.device)
    loss = h1.new_zeros(())
    for k in range(n_heads):  # H is 3..4: a loop over heads, never over buckets
        u1 = F.normalize(2 * h1[:, k] - 1, dim=1)
        u2 = F.normalize(2 * h2[:, k] - 1, dim=1)
        logits = u1 @ u2.T / tau
        same = (codes[:, k, None] == codes[None, :, k]) & ~eye
        log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
        own = log_prob.diagonal()
        bucket = (log_prob * same).sum(1) / same.sum(1).clamp(min=1)
        loss = loss - (own + bucket_weight * bucket).mean() / (1 + bucket_weight)
    return loss / n_heads


def bit_balance_loss(h: torch.Tensor) -> torch.Tensor:
    """Each bit on for ~half the cells, and bits of a head uncorrelated."""
    centred = 2 * h - 1  # (cells, H, b)
    balance = centred.mean(0).pow(2).mean()
    n_bits = h.shape[-1]
    corr = torch.einsum("nhb,nhc->hbc", centred, centred) / h.shape[0]
    off_diag = corr - torch.diag_embed(torch.diagonal(corr, dim1=-2, dim2=-1))
    return balance + off_diag.pow(2).sum((-2, -1)).mean() / max(n_bits * (n_bits - 1), 1)
