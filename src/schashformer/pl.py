"""Plots (matplotlib, no screen needed)."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np

MAX_UMAP_CELLS = 100_000  # UMAP is for looking at, not analysis: subsample beyond this


def umap_png(adata: ad.AnnData, path: str | Path, *, key: str = "schashformer", labels_key: str | None = None,
             seed: int = 0) -> Path:
    """UMAP of ``obsm[f"X_{key}"]`` coloured by cluster (and by ``labels_key`` when given), saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc

    rep = f"X_{key}"
    view = adata
    if adata.n_obs > MAX_UMAP_CELLS:
        idx = np.random.default_rng(seed).choice(adata.n_obs, MAX_UMAP_CELLS, replace=False)
        view = adata[np.sort(idx)]
    small = ad.AnnData(obs=view.obs[[c for c in (key, labels_key) if c]].copy(), obsm={rep: view.obsm[rep]})
    sc.pp.neighbors(small, use_rep=rep, n_neighbors=15, random_state=seed)
    sc.tl.umap(small, random_state=seed)
    colours = [key] + ([labels_key] if labels_key else [])
    fig, axes = plt.subplots(1, len(colours), figsize=(6 * len(colours), 5), squeeze=False)
    for ax, col in zip(axes[0], colours):
        sc.pl.umap(small, color=col, ax=ax, show=False, title=f"{col} (scHashFormer embedding)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
