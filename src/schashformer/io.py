"""Readers and writers.

:func:`read` returns an AnnData with raw counts as CSR float32 (cells x genes) from:

========== ==================================================================
format     what
========== ==================================================================
h5ad       AnnData file
xy_h5      HDF5 with dataset ``X`` (cells x genes) and optional ``Y`` (labels
           -> ``obs["label"]``), the layout of deep-clustering benchmarks
10x_h5     10x Genomics CellRanger HDF5 (v3 ``matrix`` group, or v2 genome group)
mtx        Matrix Market directory or file: ``matrix.mtx(.gz)`` (genes x cells)
           with ``barcodes.tsv(.gz)`` and ``features.tsv(.gz)``/``genes.tsv(.gz)``
csv / tsv  dense table (.gz allowed), first column = row names; rows are cells
           unless ``transpose=True`` (rows are genes)
========== ==================================================================

The format is guessed from the extension and, for ``.h5``, from the HDF5 keys.
Writers are atomic: a temporary file in the same directory, then a rename.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from importlib import resources
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp

from .errors import InputError, OutputExistsError

FORMATS = ("h5ad", "xy_h5", "10x_h5", "mtx", "csv", "tsv")


def read(path: str | Path, *, format: str | None = None, labels_key: str | None = None,
         transpose: bool = False) -> ad.AnnData:
    """Read a count matrix into AnnData (CSR float32 counts, unique names).

    Parameters
    ----------
    path : file or (for mtx) directory.
    format : one of ``FORMATS``; guessed when None.
    labels_key : ``obs`` column for the labels of an xy_h5 file (default ``"label"``).
    transpose : csv/tsv only: rows are genes and columns cells.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    fmt = format or _guess_format(path)
    if fmt not in FORMATS:
        raise InputError(f"{path}: unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    readers = {"h5ad": _read_h5ad, "xy_h5": _read_xy_h5, "10x_h5": _read_10x_h5, "mtx": _read_mtx,
               "csv": _read_table, "tsv": _read_table}
    try:
        if fmt == "xy_h5":
            adata = _read_xy_h5(path, labels_key or "label")
        elif fmt in ("csv", "tsv"):
            adata = _read_table(path, "," if fmt == "csv" else "\t", transpose)
        else:
            adata = readers[fmt](path)
    except InputError:
        raise
    except (OSError, KeyError, ValueError, EOFError) as exc:
        raise InputError(f"{path}: cannot be read as {fmt} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    return _finalise(adata, path)


def _guess_format(path: Path) -> str:
    name = path.name.lower()
    if path.is_dir() or name.endswith((".mtx", ".mtx.gz")):
        return "mtx"
    if name.endswith(".h5ad"):
        return "h5ad"
    if name.endswith((".csv", ".csv.gz")):
        return "csv"
    if name.endswith((".tsv", ".tsv.gz", ".txt", ".txt.gz")):
        return "tsv"
    if name.endswith((".h5", ".hdf5")):
        import h5py

        try:
            with h5py.File(path, "r") as f:
                keys = set(f.keys())
        except OSError:
            raise InputError(f"{path}: not a readable HDF5 file (truncated or another format)") from None
        if "X" in keys and ({"obs", "var"} & keys):
            return "h5ad"
        if "X" in keys:
            return "xy_h5"
        if "matrix" in keys or any(k not in ("X", "Y") for k in keys):
            return "10x_h5"
        raise InputError(f"{path}: HDF5 file has no dataset 'X' or 10x 'matrix' group (found: {sorted(keys)})")
    raise InputError(f"{path}: cannot tell the format from the extension; pass format= (--format), one of {', '.join(FORMATS)}")


def _read_h5ad(path: Path) -> ad.AnnData:
    return ad.read_h5ad(path)


def _read_xy_h5(path: Path, labels_key: str) -> ad.AnnData:
    import h5py

    with h5py.File(path, "r") as f:
        if "X" not in f:
            raise InputError(f"{path}: HDF5 file has no dataset 'X' (found: {sorted(f.keys())})")
        x = f["X"][()]
        y = f["Y"][()] if "Y" in f else None
    if x.ndim != 2:
        raise InputError(f"{path}: dataset 'X' has shape {x.shape}; expected cells x genes")
    adata = ad.AnnData(sp.csr_matrix(x, dtype=np.float32))
    adata.obs_names = [f"cell{i}" for i in range(x.shape[0])]
    adata.var_names = [f"gene{j}" for j in range(x.shape[1])]
    if y is not None:
        y = np.asarray(y).ravel()
        if y.shape[0] != x.shape[0]:
            raise InputError(f"{path}: dataset 'Y' has {y.shape[0]} labels for {x.shape[0]} cells")
        if y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
            y = y.astype(np.int64)
        y = y.astype(str) if y.dtype.kind != "S" else np.char.decode(y)
        adata.obs[labels_key] = pd.Categorical(y)
    return adata


def _read_10x_h5(path: Path) -> ad.AnnData:
    import h5py

    with h5py.File(path, "r") as f:
        group = f["matrix"] if "matrix" in f else f[next(iter(f.keys()))]
        shape = tuple(group["shape"][()])
        m = sp.csc_matrix((group["data"][()], group["indices"][()], group["indptr"][()]), shape=shape)
        barcodes = _decode(group["barcodes"][()])
        if "features" in group:
            names = _decode(group["features"]["name"][()])
            ids = _decode(group["features"]["id"][()])
        else:
            names = _decode(group["gene_names"][()])
            ids = _decode(group["genes"][()])
    adata = ad.AnnData(sp.csr_matrix(m.T, dtype=np.float32))
    adata.obs_names, adata.var_names = barcodes, names
    adata.var["gene_ids"] = ids
    return adata


def _decode(values) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def _read_mtx(path: Path) -> ad.AnnData:
    folder = path if path.is_dir() else path.parent
    matrix = path if path.is_file() else _first(folder, ("matrix.mtx.gz", "matrix.mtx"), "matrix.mtx(.gz)")
    barcodes = _first(folder, ("barcodes.tsv.gz", "barcodes.tsv"), "barcodes.tsv(.gz)")
    features = _first(folder, ("features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv"), "features.tsv(.gz) or genes.tsv(.gz)")
    m = sp.csr_matrix(scipy.io.mmread(matrix).T, dtype=np.float32)  # 10x stores genes x cells
    cells = pd.read_csv(barcodes, header=None, sep="\t")[0].astype(str)
    feats = pd.read_csv(features, header=None, sep="\t")
    names = feats[1 if feats.shape[1] > 1 else 0].astype(str)
    if m.shape != (len(cells), len(names)):
        raise InputError(f"{matrix}: matrix is {m.shape[1]} genes x {m.shape[0]} cells but {barcodes.name} has "
                         f"{len(cells)} and {features.name} has {len(names)} rows")
    adata = ad.AnnData(m)
    adata.obs_names, adata.var_names = cells.to_numpy(), names.to_numpy()
    adata.var["gene_ids"] = feats[0].astype(str).to_numpy()
    return adata


def _first(folder: Path, names: tuple[str, ...], what: str) -> Path:
    for name in names:
        if (folder / name).exists():
            return folder / name
    raise InputError(f"{folder}: Matrix Market directory has no {what}")


def _read_table(path: Path, sep: str, transpose: bool) -> ad.AnnData:
    df = pd.read_csv(path, sep=sep, index_col=0)
    if transpose:
        df = df.T
    values = df.to_numpy()
    if values.dtype.kind not in "iuf":
        try:
            values = values.astype(np.float64)
        except ValueError:
            raise InputError(f"{path}: table has non-numeric values (e.g. in column {df.columns[0]!r})") from None
    adata = ad.AnnData(sp.csr_matrix(values, dtype=np.float32))
    adata.obs_names = df.index.astype(str).to_numpy()
    adata.var_names = df.columns.astype(str).to_numpy()
    return adata


def _finalise(adata: ad.AnnData, path: Path) -> ad.AnnData:
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise InputError(f"{path}: the matrix is empty ({adata.n_obs} cells x {adata.n_vars} genes)")
    x = adata.X
    x = sp.csr_matrix(x, dtype=np.float32) if sp.issparse(x) else sp.csr_matrix(np.asarray(x), dtype=np.float32)
    data = x.data
    n_bad = int(np.count_nonzero(~np.isfinite(data)))
    if n_bad:
        raise InputError(f"{path}: the matrix has {n_bad} NaN/inf values; expected raw counts")
    if data.size and data.min() < 0:
        raise InputError(f"{path}: the matrix has {int((data < 0).sum())} negative values; expected raw counts")
    adata.X = x
    for axis, names in (("cell", adata.obs_names), ("gene", adata.var_names)):
        if not names.is_unique:
            warnings.warn(f"{path}: {int(names.duplicated().sum())} duplicated {axis} names were made unique", stacklevel=3)
    adata.obs_names_make_unique()
    adata.var_names_make_unique()
    return adata


# ----------------------------------------------------------------------------- writers
def _atomic(path: Path, overwrite: bool, write) -> Path:
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it")
    tmp = path.with_name("." + path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_h5ad(adata: ad.AnnData, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``adata`` to ``path`` atomically; refuse an existing file unless ``overwrite``."""
    return _atomic(Path(path), overwrite, lambda tmp: adata.write_h5ad(tmp))


def write_text_atomic(path: str | Path, text: str, *, overwrite: bool = False) -> Path:
    """Write ``text`` atomically with the same refuse-unless-overwrite rule."""
    return _atomic(Path(path), overwrite, lambda tmp: tmp.write_text(text))


def file_md5(path: str | Path) -> str:
    """MD5 of a file, read in 1 MiB blocks."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def bundled_pbmc_path() -> Path:
    """The bundled 10x PBMC data set (4271 cells x 2000 genes, 8 labeled types, X/Y layout)."""
    return Path(str(resources.files("schashformer") / "data" / "10X_PBMC_top2000.h5"))


def read_bundled_pbmc() -> ad.AnnData:
    """Read the bundled PBMC data set, labels in ``obs["label"]``."""
    return read(bundled_pbmc_path(), format="xy_h5")
