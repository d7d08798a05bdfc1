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


def trajectory(adata: ad.AnnData, *, key: str = "trajectory", color: str | list[str] | None = None,
               min_edge: float = 0.05, save: str | Path | None = None, show: bool | None = None):
    """PAGA graph and cells coloured by pseudotime, from :func:`schashformer.tl.trajectory`.

    Panels: the PAGA graph (one node per group, at PAGA's layout, size ~ cells, colour = median
    pseudotime, edge width = PAGA connectivity, edges below ``min_edge`` hidden, the root's group
    ringed); the cells on ``obsm[f"X_{key}_umap"]`` (or the first two diffusion components when
    no UMAP was computed) coloured by ``obs[f"{key}_pseudotime"]`` with the root marked; one more
    panel per ``color`` ``obs`` key (e.g. a known day or branch). Returns the matplotlib Figure.
    """
    if key not in adata.uns or f"{key}_pseudotime" not in adata.obs:
        raise InputError(f"no trajectory under {key!r} (uns[{key!r}] / obs[{key + '_pseudotime'!r}]); run "
                         "schashformer.tl.trajectory first")
    colours = [color] if isinstance(color, str) else list(color or [])
    for c in colours:
        _obs_key(adata, c, "color")
    run = adata.uns[key]
    paga = run["paga"]
    pt = adata.obs[f"{key}_pseudotime"].to_numpy(dtype=float)
    groups = adata.obs[str(run["groups"])].astype(str).to_numpy()
    names = [str(g) for g in paga["groups"]]
    pos = np.asarray(paga["pos"], dtype=float)
    basis = f"X_{key}_umap" if f"X_{key}_umap" in adata.obsm else f"X_{key}_diffmap"
    xy = np.asarray(adata.obsm[basis])[:, :2] if basis.endswith("umap") else np.asarray(adata.obsm[basis])[:, 1:3]
    root = int(run["root"])

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2 + len(colours), figsize=(5.5 * (2 + len(colours)), 4.8), squeeze=False)
    ax = axes[0][0]
    conn = paga["connectivities"].tocoo() if hasattr(paga["connectivities"], "tocoo") else None
    if conn is not None:
        for i, j, w in zip(conn.row, conn.col, conn.data):
            if i < j and w >= min_edge:
                ax.plot(pos[[i, j], 0], pos[[i, j], 1], color="0.4", lw=0.5 + 6 * w, zorder=1)
    sizes = np.array([(groups == g).sum() for g in names], dtype=float)
    med = np.array([np.nanmedian(pt[groups == g]) if (groups == g).any() else np.nan for g in names])
    nodes = ax.scatter(pos[:, 0], pos[:, 1], s=80 + 900 * sizes / max(sizes.max(), 1), c=med, cmap="viridis",
                       vmin=0, vmax=1, edgecolors="k", zorder=2)
    root_group = names.index(str(groups[root])) if str(groups[root]) in names else None
    if root_group is not None:
        ax.scatter(*pos[root_group], s=120 + 900 * sizes[root_group] / max(sizes.max(), 1), facecolors="none",
                   edgecolors="red", linewidths=2.5, zorder=3)
    for name, (px, py) in zip(names, pos):
        ax.annotate(name, (px, py), ha="center", va="center", fontsize=8, zorder=4)
    ax.set_title(f"PAGA graph ({run['groups']}), colour = median pseudotime")
    ax.set_xticks([]), ax.set_yticks([])
    fig.colorbar(nodes, ax=ax, shrink=0.7)

    order = np.argsort(np.nan_to_num(pt, nan=-1))  # late cells on top
    ax = axes[0][1]
    sc_ = ax.scatter(xy[order, 0], xy[order, 1], c=pt[order], s=6, cmap="viridis", vmin=0, vmax=1)
    ax.scatter(*xy[root], marker="*", s=250, c="red", edgecolors="k", label="root", zorder=3)
    ax.legend(frameon=False, loc="best")
    ax.set_title(f"diffusion pseudotime (root {run['root_name']})")
    ax.set_xlabel(basis.removeprefix("X_") + (" 1" if basis.endswith("umap") else " DC1"))
    ax.set_xticks([]), ax.set_yticks([])
    fig.colorbar(sc_, ax=ax, shrink=0.7)
    for ax, c in zip(axes[0][2:], colours):
        col = adata.obs[c]
        if pd.api.types.is_numeric_dtype(col) and not isinstance(col.dtype, pd.CategoricalDtype):
            im = ax.scatter(xy[:, 0], xy[:, 1], c=col.to_numpy(dtype=float), s=6, cmap="magma")
            fig.colorbar(im, ax=ax, shrink=0.7)
        else:
            cats = pd.Categorical(col.astype(str))
            cmap = plt.get_cmap("tab20" if len(cats.categories) > 10 else "tab10")
            for i, cat in enumerate(cats.categories):
                m = cats == cat
                ax.scatter(xy[m, 0], xy[m, 1], s=6, color=cmap(i % cmap.N), label=cat)
            ax.legend(frameon=False, markerscale=3, fontsize=8, loc="best")
        ax.set_title(c)
        ax.set_xticks([]), ax.set_yticks([])
    return _finish(fig, save, show)
