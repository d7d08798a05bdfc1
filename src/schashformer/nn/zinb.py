"""Zero-inflated negative binomial (ZINB) decoder and its negative log-likelihood.

The decoder maps an embedding to the three ZINB parameters per gene: the mean
(scaled by the cell's size factor), the inverse dispersion theta and the logit of
the dropout probability. The likelihood is computed in log space with clamped
parameters so that extreme counts cannot produce inf/NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_EPS = 1e-8
_THETA_MIN, _THETA_MAX = 1e-4, 1e4


class ZINBDecoder(nn.Module):
    """Embedding (+ optional one-hot batch covariate) -> ZINB parameters.

    Parameters
    ----------
    n_input : embedding size.
    n_genes : number of genes reconstructed.
    n_hidden : width of the single hidden layer.
    n_batches : number of batch categories used as a covariate (0 = none).
    """

    def __init__(self, n_input: int, n_genes: int, n_hidden: int = 256, n_batches: int = 0):
        super().__init__()
        self.n_batches = n_batches
        self.body = nn.Sequential(nn.Linear(n_input + n_batches, n_hidden), nn.GELU())
        self.mean = nn.Linear(n_hidden, n_genes)
        self.dispersion = nn.Linear(n_hidden, n_genes)
        self.dropout_logit = nn.Linear(n_hidden, n_genes)

    def forward(self, z: torch.Tensor, size_factors: torch.Tensor, batch_onehot: torch.Tensor | None = None):
        """Return (mu, theta, pi_logit), each (cells, genes); size_factors is (cells,)."""
        if self.n_batches:
            z = torch.cat([z, batch_onehot], dim=1)
        h = self.body(z)
        mu = torch.exp(self.mean(h).clamp(-12.0, 12.0)) * size_factors[:, None]
        theta = F.softplus(self.dispersion(h)).clamp(_THETA_MIN, _THETA_MAX)
        return mu, theta, self.dropout_logit(h)


def zinb_nll(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, pi_logit: torch.Tensor) -> torch.Tensor:
    """Mean ZINB negative log-likelihood of counts ``x`` (cells, genes), in log space.

    The gamma-function terms of the non-zero branch (and, in the backward pass, their digamma)
    are evaluated on the non-zero counts only: most entries of a count matrix are zero, and
    those terms were the largest part of a training step.
    """
    log_theta_mu = torch.log(theta + mu + _EPS)
    # log NB(0) = theta * (log theta - log(theta + mu))
    nb_zero = theta * (torch.log(theta + _EPS) - log_theta_mu)
    softplus_neg_pi = F.softplus(-pi_logit)  # = -log(pi), pi = sigmoid(pi_logit) the dropout probability
    # x == 0: log(pi + (1 - pi) NB(0)), written as logsumexp over the two branches.
    case_zero = F.softplus(-pi_logit + nb_zero) - softplus_neg_pi
    # x > 0: log(1 - pi) + log NB(x), with log(1 - pi) = -softplus(pi_logit) = -(softplus(-pi_logit) + pi_logit),
    # which reuses softplus_neg_pi instead of a second full-size softplus.
    case_nonzero = -(softplus_neg_pi + pi_logit) + nb_zero + x * (torch.log(mu + _EPS) - log_theta_mu)
    nonzero = x >= 0.5
    at = torch.nonzero(nonzero.reshape(-1)).squeeze(1)  # flat positions, found once for both gathers
    xs, th = x.reshape(-1).index_select(0, at), theta.reshape(-1).index_select(0, at)
    gamma_terms = torch.lgamma(xs + th) - torch.lgamma(th) - torch.lgamma(xs + 1.0)
    log_lik = torch.where(nonzero, case_nonzero, case_zero)
    return -(log_lik.sum() + gamma_terms.sum()) / x.numel()
