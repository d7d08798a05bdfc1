"""Simulated branching differentiation: counts with a known pseudotime and lineage per cell.

A progenitor trunk (true time 0 .. ``branch_point``) splits into ``n_branches`` lineages
(``branch_point`` .. 1). Gene expression follows programmes that switch on or off smoothly
(sigmoid ramps) along time: trunk programmes act in every cell, lineage programmes only after
the split and only in their lineage, so lineages diverge gradually from the branch point, as
in the splatter "paths" model (Zappia et al. 2017) and dyngen's bifurcation backbones.
Counts are negative binomial around those means times a log-normal library size; the default
gene means, dispersions and library sizes are of the order of droplet data restricted to its
variable genes (median one UMI per gene and cell, most genes below that, 60-70% zeros).
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..errors import ParameterError


def _ramp(t: np.ndarray, centre: np.ndarray, width: np.ndarray) -> np.ndarray:
    """Sigmoid switch (cells, genes) from 0 to 1 around ``centre`` over about ``width``."""
    return 1.0 / (1.0 + np.exp(-(t[:, None] - centre[None, :]) / width[None, :]))


def simulate_branching(n_cells: int = 1500, n_genes: int = 1000, *, n_branches: int = 2, branch_point: float = 0.35,
                       dynamic_fraction: float = 0.3, effect_size: float = 1.5, library_median: float | None = None,
                       library_sd: float = 0.4, dispersion_mean: float = 2.0, seed: int = 0) -> ad.AnnData:
    """Counts (cells x genes, sparse CSR float32) of a branching differentiation with known truth.

    Parameters
    ----------
    n_cells, n_genes : size of the matrix.
    n_branches : lineages after the branch point (>= 1; 1 gives a linear trajectory).
    branch_point : true time (0..1) at which the trunk splits.
    dynamic_fraction : fraction of genes in a programme (changing along time); the rest only add noise.
    effect_size : mean |log fold change| of a programme gene between its off and on states.
    library_median, library_sd : median and log-scale sd of the per-cell total counts (default median:
        one count per simulated gene, like droplet data restricted to its variable genes).
    dispersion_mean : mean NB inverse dispersion theta (gamma-distributed over genes; lower = noisier).
    seed : random seed.

    Returns
    -------
    AnnData with ``obs["time"]`` (true pseudotime in [0, 1]), ``obs["branch"]`` (``trunk``,
    ``lineage1``, ...), ``obs["stage"]`` (time cut in five equal bins, for a root such as
    ``stage=0``), ``var["programme"]`` (``trunk``, ``lineage1``, ..., ``none``) and
    ``uns["simulation"]`` (the parameters).
    """
    if n_cells < 10 or n_genes < 10:
        raise ParameterError(f"simulate_branching needs at least 10 cells and 10 genes, got {n_cells} x {n_genes}")
    if n_branches < 1 or not 0 < branch_point < 1 or not 0 < dynamic_fraction <= 1:
        raise ParameterError("need n_branches >= 1, 0 < branch_point < 1 and 0 < dynamic_fraction <= 1; got "
                             f"{n_branches}, {branch_point}, {dynamic_fraction}")
    rng = np.random.default_rng(seed)
    time = np.sort(rng.uniform(0, 1, n_cells))
    lineage = np.where(time < branch_point, 0, rng.integers(1, n_branches + 1, n_cells))  # 0 = trunk

    # Baseline abundance: log-normal relative means, so a few genes dominate as in real data.
    log_mean = rng.normal(0.0, 1.5, n_genes)
    n_dynamic = max(int(round(dynamic_fraction * n_genes)), n_branches + 1)
    dynamic = rng.choice(n_genes, n_dynamic, replace=False)
    programme = np.zeros(n_genes, dtype=np.int64) - 1  # -1: no programme
    programme[dynamic] = rng.integers(0, n_branches + 1, n_dynamic)  # 0 trunk, b lineage b
    sign = rng.choice([-1.0, 1.0], n_genes)
    amplitude = sign * rng.gamma(4.0, effect_size / 4.0, n_genes)
    centre = np.where(programme == 0, rng.uniform(0.0, branch_point, n_genes),
                      rng.uniform(branch_point, 1.0, n_genes))
    width = rng.uniform(0.03, 0.1, n_genes)

    effect = np.zeros((n_cells, n_genes))
    trunk = programme == 0
    effect[:, trunk] = amplitude[trunk] * _ramp(time, centre[trunk], width[trunk])
    for b in range(1, n_branches + 1):
        genes, cells = programme == b, lineage == b
        # Lineage programmes start from their trunk level: ramps measured from the branch point.
        effect[np.ix_(cells, genes)] = amplitude[genes] * _ramp(time[cells], centre[genes], width[genes])
    rel = np.exp(log_mean[None, :] + effect)
    rel /= rel.sum(1, keepdims=True)
    library_median = float(n_genes if library_median is None else library_median)
    library = library_median * np.exp(rng.normal(0.0, library_sd, n_cells))
    mu = rel * library[:, None]
    theta = rng.gamma(2.0, dispersion_mean / 2.0, n_genes)
    counts = rng.poisson(rng.gamma(theta[None, :], mu / theta[None, :]))  # NB as a gamma-Poisson mixture

    names = ["trunk"] + [f"lineage{b}" for b in range(1, n_branches + 1)]
    adata = ad.AnnData(sp.csr_matrix(counts.astype(np.float32)))
    adata.obs_names = [f"cell{i}" for i in range(n_cells)]
    adata.var_names = [f"gene{j}" for j in range(n_genes)]
    adata.obs["time"] = time
    adata.obs["branch"] = pd.Categorical([names[i] for i in lineage], categories=names)
    adata.obs["stage"] = pd.Categorical(np.minimum((time * 5).astype(int), 4).astype(str))
    adata.var["programme"] = pd.Categorical(["none" if p < 0 else names[p] for p in programme],
                                            categories=names + ["none"])
    adata.uns["simulation"] = {"model": "branching", "n_branches": n_branches, "branch_point": branch_point,
                               "dynamic_fraction": dynamic_fraction, "effect_size": effect_size,
                               "library_median": library_median, "library_sd": library_sd,
                               "dispersion_mean": dispersion_mean, "seed": seed}
    return adata
