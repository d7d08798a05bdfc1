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

    def forward(self, z: torch.Tensor, size_factors: torch.Tensor, batch_onehot: torch.Tensor | None = None,
                genes: torch.Tensor | None = None):
        """Return (mu, theta, pi_logit), each (cells, genes); size_factors is (cells,).

        ``genes`` (g,) int64: only these genes' parameters, each (cells, g), computed from those rows of
        the output layers alone (a training step's gene subset, ``TrainConfig.zinb_genes``).
        """
        if self.n_batches:
            z = torch.cat([z, batch_onehot], dim=1)
        h = self.body(z)

        def out(layer: nn.Linear) -> torch.Tensor:
            # float32 from here on: under bfloat16 autocast the likelihood's exp / lgamma would lose precision
            if genes is None:
                return layer(h).float()
            return F.linear(h, layer.weight[genes], layer.bias[genes]).float()

        mu = torch.exp(out(self.mean).clamp(-12.0, 12.0)) * size_factors[:, None]
        theta = F.softplus(out(self.dispersion)).clamp(_THETA_MIN, _THETA_MAX)
        return mu, theta, out(self.dropout_logit)


def zinb_nll(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, pi_logit: torch.Tensor) -> torch.Tensor:
    """Mean ZINB negative log-likelihood of counts ``x`` (cells, genes), in log space.

    ``mu``, ``theta`` and ``pi_logit`` have ``x``'s shape. The value and its gradients with respect to
    them are computed by :class:`_ZINBNLL`, by hand rather than by autograd.
    """
    return _ZINBNLL.apply(x, mu, theta, pi_logit)


def _zinb_nll_autograd(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, pi_logit: torch.Tensor) -> torch.Tensor:
    """The same likelihood through autograd: the reference the hand-written gradients are tested against."""
    log_theta_mu = torch.log(theta + mu + _EPS)
    nb_zero = theta * (torch.log(theta + _EPS) - log_theta_mu)  # log NB(0) = theta (log theta - log(theta + mu))
    softplus_neg_pi = F.softplus(-pi_logit)  # = -log(pi), pi = sigmoid(pi_logit) the dropout probability
    case_zero = F.softplus(-pi_logit + nb_zero) - softplus_neg_pi  # log(pi + (1 - pi) NB(0))
    case_nonzero = -(softplus_neg_pi + pi_logit) + nb_zero + x * (torch.log(mu + _EPS) - log_theta_mu)
    nonzero = x >= 0.5
    gamma_terms = torch.lgamma(x[nonzero] + theta[nonzero]) - torch.lgamma(theta[nonzero]) - torch.lgamma(x[nonzero] + 1.0)
    return -(torch.where(nonzero, case_nonzero, case_zero).sum() + gamma_terms.sum()) / x.numel()


class _ZINBNLL(torch.autograd.Function):
    """ZINB NLL with hand-written gradients: the largest part of a training step on CPU.

    Autograd's graph of this likelihood makes some 75 passes over the (cells, genes) tensors; this
    makes about 25. Every entry is first treated as a zero count (x = 0: log(pi + (1 - pi) NB(0)),
    a logsumexp of the two branches); the non-zero entries, a minority in count data, are then
    corrected on their own, gathered (log(1 - pi) + log NB(x), with its gamma terms).
    """

    @staticmethod
    def forward(ctx, x, mu, theta, pi_logit):
        theta_mu = theta + mu + _EPS
        log_theta_mu = torch.log(theta_mu)
        dlog = torch.log(theta + _EPS).sub_(log_theta_mu)
        nb_zero = theta * dlog  # log NB(0) = theta (log theta - log(theta + mu))
        softplus_neg_pi = F.softplus(-pi_logit)  # -log(pi), pi = sigmoid(pi_logit) the dropout probability
        u = nb_zero - pi_logit
        case_zero = F.softplus(u).sub_(softplus_neg_pi)  # log(pi + (1 - pi) NB(0))
        at = torch.nonzero(x.reshape(-1) >= 0.5).squeeze(1)

        def g(t):  # the entries at the non-zero counts, flat
            return t.reshape(-1).index_select(0, at)

        xs, th, ms = g(x), g(theta), g(mu)
        # x > 0: log(1 - pi) + log NB(x), log(1 - pi) = -(softplus(-pi_logit) + pi_logit)
        case_nonzero = (-(g(softplus_neg_pi) + g(pi_logit)) + g(nb_zero) + xs * (torch.log(ms + _EPS) - g(log_theta_mu))
                        + torch.lgamma(xs + th) - torch.lgamma(th) - torch.lgamma(xs + 1.0))
        total = case_zero.sum() + (case_nonzero - g(case_zero)).sum()
        ctx.save_for_backward(theta, theta_mu, dlog, u, pi_logit, at, xs, th, ms)
        return -total / x.numel()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        theta, theta_mu, dlog, u, pi_logit, at, xs, th, ms = ctx.saved_tensors
        scale = -grad / theta.numel()
        s = torch.sigmoid(u).mul_(scale)  # d case_zero / d nb_zero, scaled
        ratio = theta / theta_mu
        # d nb_zero / d theta = log theta - log(theta + mu) + theta / (theta + eps) - theta / (theta + mu + eps)
        d_theta = (theta / (theta + _EPS)).add_(dlog).sub_(ratio).mul_(s).contiguous()
        d_mu = ratio.mul_(s).neg_().contiguous()
        pi = torch.sigmoid(pi_logit)
        d_pi = (1.0 - pi).mul_(scale).sub_(s).contiguous()  # d case_zero / d pi_logit = (1 - pi) - sigmoid(u)
        # the non-zero entries: overwrite with the derivatives of their own branch
        tm = theta_mu.reshape(-1).index_select(0, at)
        ratio_nz = th / tm
        d_theta.view(-1).index_copy_(0, at, scale * (
            th / (th + _EPS) + dlog.reshape(-1).index_select(0, at) - ratio_nz - xs / tm
            + torch.digamma(xs + th) - torch.digamma(th)))
        d_mu.view(-1).index_copy_(0, at, scale * (xs / (ms + _EPS) - xs / tm - ratio_nz))
        d_pi.view(-1).index_copy_(0, at, -scale * pi.reshape(-1).index_select(0, at))  # d log(1 - pi) = -pi
        return None, d_mu, d_theta, d_pi
