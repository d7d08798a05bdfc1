"""Trajectories on an embedding: PAGA (Wolf et al. 2019) and diffusion pseudotime (Haghverdi et al. 2016).

Both come from scanpy (``sc.tl.paga``, ``sc.tl.diffmap``, ``sc.tl.dpt``); this module chooses
the root, reuses the hash-neighbourhood graph that :func:`schashformer.tl.cluster` stored (no
neighbour search) and leaves the results in scanpy's own keys, so scanpy's plots read them.
"""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
from scipy import stats

from .errors import InputError, ParameterError


def _parse_root(root, adata: ad.AnnData, groups: str | None):
    """A root as ('cell', index) or ('group', boolean mask, description)."""
    if isinstance(root, (bool, np.bool_)):
        raise ParameterError(f"root must be a cell index, a cell name or 'obs_key=value', got {root!r}")
    if isinstance(root, (int, np.integer)):
        if not 0 <= root < adata.n_obs:
            raise ParameterError(f"root cell index {root} is outside 0..{adata.n_obs - 1}")
        return "cell", int(root)
    if not isinstance(root, str) or not root:
        raise ParameterError(f"root must be a cell index, a cell name or 'obs_key=value', got {root!r}")
    if "=" in root:
        key, _, value = root.partition("=")
        key, value = key.strip(), value.strip()
        if key not in adata.obs:
            raise InputError(f"root {root!r}: {key!r} is not a column of adata.obs (columns: {list(adata.obs.columns)})")
        column = adata.obs[key]
        mask = (column.astype(str) == value).to_numpy()
        if not mask.any() and pd.api.types.is_numeric_dtype(column):
            try:  # 'day=0' against a float column holding 0.0
                mask = np.isclose(column.to_numpy(dtype=float), float(value))
            except ValueError:
                pass
        if not mask.any():
            shown = list(pd.unique(column.astype(str)))[:20]
            raise InputError(f"root {root!r}: no cell has {key} == {value!r} (values: {shown})")
        return "group", mask, f"{key}={value}"
    if root in adata.obs_names:
        return "cell", int(adata.obs_names.get_loc(root))
    if groups is not None and groups in adata.obs and (adata.obs[groups].astype(str) == root).any():
        return "group", (adata.obs[groups].astype(str) == root).to_numpy(), f"{groups}={root}"
    raise InputError(f"root {root!r} is neither a cell name, a value of obs[{groups!r}] nor of the form 'obs_key=value'")


def extreme_cell(diffmap: np.ndarray, mask: np.ndarray, component: int = 1) -> int:
    """Index of the cell of ``mask`` most extreme along diffusion ``component``, on the side away from the rest.

    Scanpy's own root choice for a group (``sc.tl.dpt`` tutorials): the group's cell at the end
    of the first non-trivial diffusion component. The end is the one the group lies towards
    (its mean compared with the other cells'), so a root group at either end works.
    """
    dc = diffmap[:, component]
    rows = np.flatnonzero(mask)
    rest = dc[~mask] if (~mask).any() else dc
    pick = np.argmin if dc[rows].mean() <= rest.mean() else np.argmax
    return int(rows[pick(dc[rows])])


def trajectory(adata: ad.AnnData, root, *, use_rep: str = "X_schashformer", groups: str | None = "schashformer",
               neighbors_key: str | None = "schashformer_neighbors", key_added: str = "trajectory",
               n_neighbors: int = 15, n_dcs: int = 10, method: str = "gauss", umap: bool = True, seed: int = 0,
               overwrite: bool = False, copy: bool = False):
    """PAGA graph and diffusion pseudotime on an embedding, written where scanpy writes them.

    The kNN graph is the one stored under ``neighbors_key`` (by :func:`schashformer.tl.cluster`:
    the hash-neighbourhood graph, no neighbour search) when it was built on ``use_rep``; otherwise
    ``sc.pp.neighbors`` builds one on ``obsm[use_rep]`` under ``f"{key_added}_neighbors"``. Then
    ``sc.tl.paga``, ``sc.tl.diffmap`` and ``sc.tl.dpt`` run on the AnnData itself, so ``sc.pl.paga``,
    ``sc.pl.paga_compare`` and ``sc.pl.dpt_timeseries`` read the results.

    Parameters
    ----------
    adata : AnnData holding ``obsm[use_rep]`` (cells, dims), e.g. after :func:`schashformer.tl.cluster`.
    root : where pseudotime starts: a cell index (int), a cell name, ``"obs_key=value"`` (e.g.
        ``"day=0"``) or a value of ``obs[groups]`` (e.g. a cluster ``"3"``). For a group, the root
        is its cell most extreme along the first diffusion component (scanpy practice).
    use_rep : ``obsm`` key of the embedding.
    groups : ``obs`` column of the PAGA nodes (default: scHashFormer clusters); None or a missing
        default: Leiden clusters of the kNN graph, written to ``obs[f"{key_added}_groups"]``.
    neighbors_key : stored neighbours to reuse (scanpy layout, ``uns[neighbors_key]``).
    key_added : prefix of the keys written besides scanpy's own.
    n_neighbors, method : neighbours and kernel (``"gauss"``, the kernel of the diffusion-pseudotime
        paper, or ``"umap"``) of the kNN graph, only when one has to be built.
    n_dcs : diffusion components used by DPT.
    umap : also compute a UMAP initialised from the PAGA graph (``init_pos="paga"``) for plots.
    seed : random seed of Leiden / diffusion map / UMAP.
    overwrite : replace results already there (scanpy's ``uns["paga"]``, ``obs["dpt_pseudotime"]``, ...).
    copy : work on a copy and return it.

    Writes
    ------
    scanpy's keys: ``uns["paga"]`` (``connectivities``, ``connectivities_tree``, ``groups`` = the
    ``obs`` key of the nodes, ``pos`` node positions), ``obsm["X_diffmap"]`` (cells, max(n_dcs, 3)),
    ``uns["diffmap_evals"]``, ``uns["iroot"]``, ``obs["dpt_pseudotime"]`` (cells,) in [0, 1] (NaN for
    cells not connected to the root); ``obsm[f"X_{key_added}_umap"]`` (cells, 2) with ``umap``;
    ``obs[f"{key_added}_groups"]`` when Leiden made the groups (or ``obs[groups]`` had cells
    without a cluster, named ``"unassigned"``); ``uns[key_added]``: ``root`` (cell index),
    ``root_name``, ``groups``, ``use_rep``, ``neighbors_key``, ``params`` and
    ``pseudotime_per_group`` (median per group).

    Returns
    -------
    The AnnData if ``copy``, else None.
    """
    import scanpy as sc

    if not isinstance(adata, ad.AnnData):
        raise InputError(f"expected an AnnData, got {type(adata).__name__}")
    if use_rep not in adata.obsm:
        raise InputError(f"obsm[{use_rep!r}] not found (obsm keys: {list(adata.obsm.keys())}); run "
                         "schashformer.tl.cluster first or pass use_rep=")
    x = np.asarray(adata.obsm[use_rep], dtype=np.float32)
    if x.ndim != 2 or not np.isfinite(x).all():
        raise InputError(f"obsm[{use_rep!r}] must be a finite (cells, dims) array")
    if adata.n_obs < max(n_neighbors + 1, n_dcs + 2):
        raise InputError(f"{adata.n_obs} cells are too few for a trajectory with n_neighbors={n_neighbors}, "
                         f"n_dcs={n_dcs}")
    if method not in ("gauss", "umap"):
        raise ParameterError(f"method must be 'gauss' or 'umap', got {method!r}")
    keys = {"obs": ["dpt_pseudotime"], "obsm": ["X_diffmap"], "uns": ["paga", key_added]}
    taken = [f"{w}[{k!r}]" for w, ks in keys.items() for k in ks if k in getattr(adata, w)]
    if taken and not overwrite:
        raise ParameterError(f"{', '.join(taken)} already hold results; pass overwrite=True or another key_added")
    adata = adata.copy() if copy else adata
    parsed = _parse_root(root, adata, groups)  # before any work: a bad root fails fast

    stored = adata.uns.get(neighbors_key) if neighbors_key else None
    if isinstance(stored, dict) and stored.get("params", {}).get("use_rep") == use_rep \
            and stored.get("connectivities_key") in adata.obsp:
        nk = neighbors_key
    else:
        nk = f"{key_added}_neighbors"
        sc.pp.neighbors(adata, use_rep=use_rep, n_neighbors=n_neighbors, method=method, random_state=seed,
                        key_added=nk)
    group_key = groups
    if groups is None or groups not in adata.obs:
        group_key = f"{key_added}_groups"
        sc.tl.leiden(adata, key_added=group_key, neighbors_key=nk, random_state=seed, flavor="igraph",
                     n_iterations=2, directed=False)
    elif adata.obs[groups].isna().any() or not isinstance(adata.obs[groups].dtype, pd.CategoricalDtype):
        col = adata.obs[groups]
        group_key = f"{key_added}_groups"  # cells without a cluster (zero counts in tl.cluster): their own node
        adata.obs[group_key] = pd.Categorical(np.where(col.isna(), "unassigned", col.astype(str)))
    sc.tl.paga(adata, groups=group_key, neighbors_key=nk)
    sc.tl.diffmap(adata, n_comps=max(n_dcs, 3), neighbors_key=nk, random_state=seed)
    if parsed[0] == "cell":
        iroot, root_name = parsed[1], str(adata.obs_names[parsed[1]])
    else:
        iroot = extreme_cell(adata.obsm["X_diffmap"], parsed[1])
        root_name = f"{adata.obs_names[iroot]} ({parsed[2]})"
    adata.uns["iroot"] = iroot
    sc.tl.dpt(adata, n_dcs=n_dcs, neighbors_key=nk)
    pt = adata.obs["dpt_pseudotime"].to_numpy(dtype=float)
    unreachable = ~np.isfinite(pt)
    if unreachable.any():
        warnings.warn(f"{int(unreachable.sum())} cells are not connected to the root in the kNN graph; their "
                      "pseudotime is NaN", UserWarning, stacklevel=2)
        pt[unreachable] = np.nan
        adata.obs["dpt_pseudotime"] = pt
    sc.pl.paga(adata, show=False, plot=False, random_state=seed)  # node positions: plots and UMAP's init_pos
    if umap:
        umap_key = f"X_{key_added}_umap"
        sc.tl.umap(adata, init_pos="paga", random_state=seed, neighbors_key=nk, key_added=umap_key)
        adata.uns.pop(umap_key, None)  # scanpy's UMAP parameters; recorded in uns[key_added] instead
    group_names = list(adata.obs[group_key].cat.categories)
    per_group = pd.Series(pt).groupby(adata.obs[group_key].to_numpy(), observed=True).median()
    adata.uns[key_added] = {
        "root": iroot, "root_name": root_name, "use_rep": use_rep, "groups": group_key, "neighbors_key": nk,
        "params": {"n_neighbors": n_neighbors, "n_dcs": n_dcs, "method": method, "seed": seed, "root": str(root),
                   "umap": bool(umap)},
        "pseudotime_per_group": {str(g): float(per_group.get(g, np.nan)) for g in group_names},
    }
    return adata if copy else None


def pseudotime_correlation(pseudotime, truth) -> float:
    """Spearman rank correlation of pseudotime with a known order (true time, day, ...), ignoring NaN."""
    pt = np.asarray(pseudotime, dtype=float)
    t = pd.to_numeric(pd.Series(np.asarray(truth).ravel()), errors="coerce").to_numpy(dtype=float)
    if pt.shape != t.shape:
        raise ParameterError(f"pseudotime has {pt.size} entries, the known order {t.size}")
    ok = np.isfinite(pt) & np.isfinite(t)
    if ok.sum() < 3:
        raise InputError("fewer than 3 cells have both a pseudotime and a known order")
    return float(stats.spearmanr(pt[ok], t[ok]).statistic)
