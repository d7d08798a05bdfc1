"""DEC-style clustering head: Student-t soft assignment and its sharpened target."""

from __future__ import annotations

import torch
from torch import nn


class ClusterHead(nn.Module):
    """Soft assignment q_ij = (1 + |z_i - mu_j|^2 / a)^(-(a+1)/2), normalised over j.

    Parameters
    ----------
    n_clusters : K.
    n_latent : embedding size.
    alpha : degrees of freedom a of the Student-t kernel (DEC uses 1).
    """

    def __init__(self, n_clusters: int, n_latent: int, alpha: float = 1.0):
        super().__init__()
        self.alpha = alpha
        self.centres = nn.Parameter(torch.zeros(n_clusters, n_latent))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """z: (cells, n_latent) -> q: (cells, K)."""
        dist2 = torch.cdist(z, self.centres).pow(2)  # (cells, K): K is small, never cells x cells
        q = (1.0 + dist2 / self.alpha).pow(-(self.alpha + 1.0) / 2.0)
        return q / q.sum(1, keepdim=True)


def target_distribution(q: torch.Tensor, frequencies: torch.Tensor | None = None, balance: float = 1.0) -> torch.Tensor:
    """DEC target p_ij = q_ij^2 / f_j^balance, normalised per cell (f_j = sum_i q_ij).

    ``frequencies`` (K,) gives f when ``q`` holds only some of the cells (f summed over processes).
    ``balance`` 1 is DEC's target, which divides by the cluster's size and so favours clusters of
    equal size; 0 only sharpens q, whatever the sizes.
    """
    f = q.sum(0) if frequencies is None else frequencies
    weight = q.pow(2) / f.pow(balance)
    return weight / weight.sum(1, keepdim=True)


def kl_loss(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) averaged over cells."""
    return (p * (torch.log(p + 1e-10) - torch.log(q + 1e-10))).sum(1).mean()
