"""Plots (matplotlib, no screen needed): each function returns the Figure and, with ``save=``, writes a PNG.

``embedding`` (UMAP coloured by any ``obs`` key), ``confusion`` (labels vs clusters), ``bucket_sizes``
(hash bucket histogram), ``training_curves`` (losses of both stages).
"""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from .errors import InputError, ParameterError
from .metrics import encode_labels, hungarian_matching
from .train import TrainConfig

MAX_UMAP_CELLS = 100_000  # UMAP is for looking at, not analysis: subsample beyond this


def _pyplot():
    import matplotlib

    backend = str(matplotlib.get_backend()).lower()
    if "inline" not in backend and backend not in ("agg", "pdf", "svg", "cairo") and not _has_display():
        matplotlib.use("Agg")  # no screen (and not a notebook): render off-screen
    import matplotlib.pyplot as plt

    return plt


def _has_display() -> bool:

    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def _panels(ax, n: int, figsize: tuple[float, float], **kwargs):
    """(figure, list of ``n`` axes, whether the figure is ours): new axes, or the caller's ``ax``.

    ``ax`` is one matplotlib Axes (for a one-panel plot) or a sequence of ``n`` Axes, as in scanpy.
    """
    if ax is None:
        fig, axes = _pyplot().subplots(1, n, figsize=figsize, squeeze=False, **kwargs)
        return fig, list(axes[0]), True
    axes = list(np.ravel(np.asarray(ax, dtype=object))) if isinstance(ax, (list, tuple, np.ndarray)) else [ax]
    if len(axes) != n:
        raise ParameterError(f"this plot has {n} panel(s); ax= holds {len(axes)} Axes")
    return axes[0].figure, axes, False


def _finish(fig, save: str | Path | None, show: bool | None, own: bool = True):
    """Save ``fig`` as PNG (when ``save``), show it (when asked) and return it.

    ``own``: the figure was made here (not the caller's ``ax=``), so its layout may be tightened.
    """
    plt = _pyplot()
    if own:
        fig.tight_layout()
    if save is not None:
        fig.savefig(save, dpi=110)
    if show:
        plt.show()
    elif save is not None:
        plt.close(fig)  # saved for a file, not kept open (many plots in a loop would pile up)
    return fig


def _obs_key(adata: ad.AnnData, key: str, what: str) -> None:
    if key not in adata.obs:
        raise InputError(f"{what} {key!r} is not a column of adata.obs (columns: {list(adata.obs.columns)})")


def embedding(adata: ad.AnnData, color: str | list[str] | None = None, *, basis: str = "schashformer",
              neighbors_key: str | None = None, umap_key: str | None = None, max_cells: int = MAX_UMAP_CELLS,
              n_neighbors: int = 15, seed: int = 0, ax=None, save: str | Path | None = None,
              show: bool | None = None):
    """UMAP of the embedding ``obsm[f"X_{basis}"]`` coloured by ``obs`` keys (one panel each).

    The UMAP is computed once and kept: ``obsm[umap_key]`` is reused when present; otherwise
    ``sc.tl.umap`` runs on the stored neighbour graph (``uns[neighbors_key]``, written by
    :func:`schashformer.tl.cluster`) and its result is stored in ``obsm[umap_key]``. Without a stored
    graph (e.g. an annotation's embedding) ``sc.pp.neighbors`` builds one on the embedding (on at
    most ``max_cells`` random cells, and then nothing is stored).

    Parameters
    ----------
    adata : AnnData with ``obsm[f"X_{basis}"]`` (cells, latent).
    color : ``obs`` column(s) to colour by (categorical or numeric); default ``basis`` when it is
        an ``obs`` column (the clusters), else no colour.
    basis : name of the embedding (``"schashformer"``, or e.g. an annotation's ``key_added``).
    neighbors_key : the stored graph; default ``uns[basis]["params"]["neighbors_key"]``, else
        ``f"{basis}_neighbors"``.
    umap_key : ``obsm`` key of the UMAP coordinates (cells, 2); default ``f"X_{basis}_umap"``. Pass
        ``"X_umap"`` to draw the UMAP of ``sc.tl.umap``.
    max_cells : without a stored graph, above this many cells a random subset is drawn.
    n_neighbors, seed : neighbours (only when no graph is stored) and UMAP's random state.
    ax : a matplotlib Axes (one colour) or a sequence of Axes, one per colour, to draw into.
    save : PNG path to write; show : call ``plt.show()`` (a saved figure is closed unless ``show``).

    Returns
    -------
    matplotlib Figure. Writes ``obsm[umap_key]`` the first time (when the graph is stored).
    """
    import scanpy as sc

    rep = f"X_{basis}"
    if rep not in adata.obsm:
        raise InputError(f"adata.obsm has no {rep!r} (keys: {list(adata.obsm)}); run tl.cluster first or pass basis=")
    colours = [color] if isinstance(color, str) else list(color or ([basis] if basis in adata.obs else []))
    for c in colours:
        _obs_key(adata, c, "color")
    umap_key = umap_key or f"X_{basis}_umap"
    if neighbors_key is None:
        rec = adata.uns.get(basis, {})
        neighbors_key = (rec.get("params", {}) if isinstance(rec, dict) else {}).get("neighbors_key") \
            or f"{basis}_neighbors"
    view, sub = adata, ""
    if umap_key not in adata.obsm:
        graph = adata.uns.get(neighbors_key)
        if isinstance(graph, dict) and graph.get("params", {}).get("use_rep") == rep \
                and graph.get("connectivities_key") in adata.obsp:
            sc.tl.umap(adata, neighbors_key=neighbors_key, key_added=umap_key, random_state=seed)
            adata.uns.pop(umap_key, None)  # scanpy's UMAP parameters (a, b, random_state); the coordinates stay
        else:  # no graph: a throw-away one on (a subset of) the cells
            if adata.n_obs > max_cells:
                idx = np.random.default_rng(seed).choice(adata.n_obs, max_cells, replace=False)
                view = adata[np.sort(idx)]
                sub = f", {max_cells} of {adata.n_obs} cells"
            small = ad.AnnData(obs=view.obs[colours].copy(), obsm={rep: np.asarray(view.obsm[rep], dtype=np.float32)})
            sc.pp.neighbors(small, use_rep=rep, n_neighbors=min(n_neighbors, max(small.n_obs - 1, 2)),
                            random_state=seed)
            sc.tl.umap(small, random_state=seed)
            if view is adata:
                adata.obsm[umap_key] = small.obsm["X_umap"]
            else:
                view, umap_key = small, "X_umap"
    n = max(len(colours), 1)
    fig, axes, own = _panels(ax, n, (6 * n, 5))
    for a, col in zip(axes, colours or [None]):
        sc.pl.embedding(view, basis=umap_key, color=col, ax=a, show=False,
                        title=f"{col or 'cells'} (UMAP of {rep}{sub})")
    return _finish(fig, save, show, own)


def umap_png(adata: ad.AnnData, path: str | Path, *, key: str = "schashformer", labels_key: str | None = None,
             seed: int = 0) -> Path:
    """UMAP of ``obsm[f"X_{key}"]`` coloured by cluster (and by ``labels_key`` when given), saved as PNG."""
    embedding(adata, [key] + ([labels_key] if labels_key else []), basis=key, seed=seed, save=path, show=False)
    return Path(path)


def confusion(adata: ad.AnnData, labels_key: str, key: str = "schashformer", *, normalize: bool = True,
              ax=None, save: str | Path | None = None, show: bool | None = None):
    """Heat map of known labels (rows) against clusters (columns), ``obs[labels_key]`` vs ``obs[key]``.

    Columns are ordered by the label each cluster is matched to (Hungarian matching, as in ACC), so a
    good clustering shows a diagonal; unmatched clusters come last. With ``normalize`` each row is the
    share of that label's cells per cluster (the cell counts are written in the cells). Cells missing a
    label or a cluster are left out. ``ax``: a matplotlib Axes to draw into; ``save``: PNG path;
    ``show``: call ``plt.show()``. Returns the matplotlib Figure.
    """

    _obs_key(adata, labels_key, "labels_key")
    _obs_key(adata, key, "key")
    t, p, _ = encode_labels(adata.obs[labels_key].to_numpy(), adata.obs[key].to_numpy())
    labels, clusters, table, _, mapping = hungarian_matching(t, p)
    rank = {lab: i for i, lab in enumerate(labels)}
    order = sorted(range(clusters.size), key=lambda j: (rank.get(mapping.get(clusters[j]), labels.size), j))
    table, clusters = table[:, order], clusters[order]
    shown = table / np.maximum(table.sum(1, keepdims=True), 1) if normalize else table
    fig, (ax,), own = _panels(ax, 1, (max(4.0, 0.5 * clusters.size + 2.5), max(3.5, 0.4 * labels.size + 1.5)))
    im = ax.imshow(shown, cmap="Blues", aspect="auto", vmin=0)
    fig.colorbar(im, ax=ax, label="share of the label's cells" if normalize else "cells")
    ax.set_xticks(range(clusters.size), clusters, rotation=90)
    ax.set_yticks(range(labels.size), labels)
    ax.set_xlabel(f"cluster ({key})")
    ax.set_ylabel(f"label ({labels_key})")
    if table.size <= 900:  # numbers stay readable up to ~30 x 30
        top = shown.max() if shown.size else 1
        for i in range(labels.size):
            for j in range(clusters.size):
                if table[i, j]:
                    ax.text(j, i, str(table[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if shown[i, j] > 0.6 * top else "black")
    ax.set_title(f"{labels_key} vs {key}")
    return _finish(fig, save, show, own)


def bucket_sizes(data, *, key: str = "schashformer", chunk_size: int | None = None, ax=None,
                 save: str | Path | None = None, show: bool | None = None):
    """Histogram of hash bucket sizes (cells per bucket), one panel per hash head.

    ``data`` is an AnnData with ``obsm[f"{key}_codes"]`` (cells, heads), a fitted
    :class:`~schashformer.SCHashFormer` (its ``codes_``) or a (cells, heads) array of bucket ids
    (-1 = cell not hashed). ``chunk_size`` (default: the run record's, else the default ``TrainConfig.chunk_size``) is drawn as a line:
    buckets larger than a chunk are split across chunks, singletons borrow neighbours from the
    nearest codes. ``ax``: a sequence of matplotlib Axes, one per head, to draw into; ``save``: PNG
    path; ``show``: call ``plt.show()``. Returns the matplotlib Figure.
    """
    codes = None
    if isinstance(data, ad.AnnData):
        if f"{key}_codes" not in data.obsm:
            raise InputError(f"adata.obsm has no {key + '_codes'!r} (keys: {list(data.obsm)}); run tl.cluster first")
        codes = np.asarray(data.obsm[f"{key}_codes"])
        if chunk_size is None:
            chunk_size = (data.uns.get(key, {}).get("params", {}) or {}).get("chunk_size")
    elif hasattr(data, "codes_"):
        codes = np.asarray(data.codes_)
        chunk_size = chunk_size or data.config.chunk_size
    else:
        codes = np.asarray(data)
    if codes.ndim == 1:
        codes = codes[:, None]
    if codes.ndim != 2 or not np.issubdtype(codes.dtype, np.integer):
        raise InputError(f"bucket codes must be a (cells, heads) integer array, got shape {codes.shape}, "
                         f"dtype {codes.dtype}")
    chunk_size = int(chunk_size or TrainConfig.chunk_size)
    heads = codes.shape[1]
    fig, axes, own = _panels(ax, heads, (4.5 * heads, 3.6), sharey=True)
    for k, ax in enumerate(axes):
        col = codes[:, k][codes[:, k] >= 0]
        _, sizes = np.unique(col, return_counts=True)
        bins = np.unique(np.geomspace(1, max(sizes.max(), 2) + 1, 30).astype(int))
        ax.hist(sizes, bins=bins, color="tab:blue", edgecolor="white")
        ax.set_xscale("log")
        ax.axvline(chunk_size, color="tab:red", ls="--", label=f"chunk size {chunk_size}")
        ax.set_title(f"head {k}: {sizes.size} buckets, median {np.median(sizes):.0f}, max {sizes.max()}")
        ax.set_xlabel("cells per bucket")
        if k == 0:
            ax.set_ylabel("buckets")
            ax.legend(frameon=False)
    return _finish(fig, save, show, own)


def _history_frame(history, key: str) -> pd.DataFrame:
    """Training history as a DataFrame (stage, step, loss, terms) from a model, an AnnData or records."""
    if isinstance(history, ad.AnnData):
        rec = history.uns.get(key, {})
        if "history" not in rec:
            raise InputError(f"adata.uns[{key!r}] holds no training history (written by tl.cluster since 0.1.0); "
                             "pass the model or model.history_ instead")
        history = rec["history"]
    elif hasattr(history, "history_"):
        history = history.history_
    df = pd.DataFrame(history)
    if df.empty or not {"stage", "step", "loss"} <= set(df.columns):
        raise InputError("training history must be records with 'stage', 'step' and 'loss' (model.history_)")
    df["stage"] = df["stage"].astype(str)
    return df


STAGE_NAMES = {"1": "stage 1: hashing", "2-pretrain": "stage 2: encoder (ZINB)", "2-cluster": "stage 2: clustering"}


def training_curves(history, *, key: str = "schashformer", ax=None, save: str | Path | None = None,
                    show: bool | None = None):
    """Loss curves of both training stages, one panel per phase (total loss and each term).

    ``history`` is a fitted :class:`~schashformer.SCHashFormer` (its ``history_``), an AnnData
    clustered by :func:`schashformer.tl.cluster` (``uns[key]["history"]``) or the list of records
    itself (``{"stage", "step", "loss", <term>: value}``). Terms on very different scales share a
    panel, so the y axis is logarithmic where every value is positive. ``ax``: a sequence of
    matplotlib Axes, one per phase, to draw into; ``save``: PNG path; ``show``: call ``plt.show()``.
    Returns the matplotlib Figure.
    """
    df = _history_frame(history, key)
    phases = list(dict.fromkeys(df["stage"]))
    fig, axes, own = _panels(ax, len(phases), (5 * len(phases), 3.8))
    for ax, phase in zip(axes, phases):
        part = df[df["stage"] == phase].sort_values("step")
        # total loss first, then the terms by name: the same order whether read from a model or a saved h5ad
        terms = ["loss"] + sorted(c for c in part.columns if c not in ("stage", "step", "loss") and part[c].notna().any())
        for c in terms:
            ax.plot(part["step"], part[c], label=c, lw=2.2 if c == "loss" else 1.2)
        if (part[terms].dropna(how="all") > 0).all().all():
            ax.set_yscale("log")
        ax.set_title(STAGE_NAMES.get(phase, phase))
        ax.set_xlabel("step")
        ax.legend(frameon=False, fontsize=8)
    axes[0].set_ylabel("loss")
    return _finish(fig, save, show, own)


def trajectory(adata: ad.AnnData, *, key: str = "trajectory", color: str | list[str] | None = None,
               min_edge: float = 0.05, ax=None, save: str | Path | None = None, show: bool | None = None):
    """PAGA graph and cells coloured by pseudotime, from :func:`schashformer.tl.trajectory`.

    Panels: the PAGA graph drawn by ``sc.pl.paga`` (node colour = mean pseudotime, edges below
    ``min_edge`` hidden); the cells on ``obsm[f"X_{key}_umap"]`` (or diffusion components 1-2 when
    no UMAP was computed) coloured by ``obs["dpt_pseudotime"]`` with the root marked; one more panel
    per ``color`` ``obs`` key (e.g. a known day or branch). ``ax``: a sequence of 2 + len(color)
    matplotlib Axes to draw into; ``save``: PNG path; ``show``: call ``plt.show()``. Returns the
    matplotlib Figure.
    """
    import scanpy as sc

    if key not in adata.uns or "paga" not in adata.uns or "dpt_pseudotime" not in adata.obs:
        raise InputError(f"no trajectory under {key!r} (uns[{key!r}], uns['paga'], obs['dpt_pseudotime']); run "
                         "schashformer.tl.trajectory first")
    colours = [color] if isinstance(color, str) else list(color or [])
    for c in colours:
        _obs_key(adata, c, "color")
    run = adata.uns[key]
    pt = adata.obs["dpt_pseudotime"].to_numpy(dtype=float)
    basis = f"X_{key}_umap" if f"X_{key}_umap" in adata.obsm else "X_diffmap"
    xy = np.asarray(adata.obsm[basis])[:, :2] if basis != "X_diffmap" else np.asarray(adata.obsm[basis])[:, 1:3]
    root = int(run["root"])

    plt = _pyplot()
    fig, axes, own = _panels(ax, 2 + len(colours), (5.5 * (2 + len(colours)), 4.8))
    sc.pl.paga(adata, color="dpt_pseudotime", threshold=min_edge, pos=adata.uns["paga"].get("pos"), ax=axes[0],
               show=False, cmap="viridis", title=f"PAGA graph ({adata.uns['paga']['groups']}), mean pseudotime",
               colorbar=True, frameon=False)

    order = np.argsort(np.nan_to_num(pt, nan=-1))  # late cells on top
    ax = axes[1]
    sc_ = ax.scatter(xy[order, 0], xy[order, 1], c=pt[order], s=6, cmap="viridis", vmin=0, vmax=1)
    ax.scatter(*xy[root], marker="*", s=250, c="red", edgecolors="k", label="root", zorder=3)
    ax.legend(frameon=False, loc="best")
    ax.set_title(f"diffusion pseudotime (root {run['root_name']})")
    ax.set_xlabel(basis.removeprefix("X_") + (" 1" if basis != "X_diffmap" else " DC1"))
    ax.set_xticks([]), ax.set_yticks([])
    fig.colorbar(sc_, ax=ax, shrink=0.7)
    for ax, c in zip(axes[2:], colours):
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
    return _finish(fig, save, show, own)
