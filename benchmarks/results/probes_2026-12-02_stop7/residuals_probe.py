"""probe_fits.py with the stage-1 encoder fed analytic Pearson residuals, not standardised log expression
(patched from outside the package).

Lause, Berens & Kobak (2021, Genome Biology): r = (x - mu) / sqrt(mu + mu^2 / theta), mu = n_c p_g, with n_c a
cell's counts over the selected genes, p_g a gene's share of all counts, theta = 100, clipped at +-sqrt(cells)
(scanpy's `experimental.pp.normalize_pearson_residuals` defaults). A gene then weighs by how far its counts stray
from a shared-profile Poisson-gamma model, not by unit variance; markers keep their large values. The encoder
(stage 1, hashing, the stage-2 tokens' hidden part) sees r; the tokens' principal-component part is unchanged.
Env RESID_CLIP: a fixed clip instead of sqrt(cells).

    python benchmarks/results/probes_2026-12-02_stop7/residuals_probe.py --sets all --seeds 0
"""
import os
import sys
from pathlib import Path

import numpy as np
import torch

BENCH = Path(__file__).resolve().parents[2]  # benchmarks/
sys.path.insert(0, str(BENCH))
from schashformer import data as data_module

THETA = 100.0


def gene_share(prep):
    """(genes,) float32 share of all counts per gene, cached on the prepared data."""
    share = getattr(prep, "_probe_gene_share", None)
    if share is None:
        sums = np.asarray(prep.counts.sum(0), dtype=np.float64).ravel()
        share = (sums / sums.sum()).astype(np.float32)
        prep._probe_gene_share = share
    return share


def inputs(self, rows):
    prep = self.prepared
    counts = prep.counts[rows].toarray()
    n_c = (prep.size_factors[rows] * np.float32(prep.stats.median_library))[:, None]
    mu = n_c * gene_share(prep)[None, :]
    r = (counts - mu) / np.sqrt(mu + mu * mu / THETA)
    clip = float(os.environ.get("RESID_CLIP", np.sqrt(prep.n_cells)))
    return torch.from_numpy(np.clip(r, -clip, clip, out=r)).to(self.device)


data_module.CellData.inputs = inputs
print(f"# stage-1 input: analytic Pearson residuals, theta {THETA}, clip {os.environ.get('RESID_CLIP', 'sqrt(cells)')}",
      flush=True)
sys.argv[0] = str(BENCH / "probe_fits.py")
import probe_fits
probe_fits.main()
