"""Readers and writers.

:func:`read` returns an AnnData with raw counts in ``.X`` as a
``scipy.sparse.csr_matrix`` of float32 (cells x genes) and unique string
``obs_names`` / ``var_names``, from any of these formats:

========== ==================================================================
format     what
========== ==================================================================
h5ad       AnnData file (``.h5ad``, or a ``.h5`` that holds an AnnData)
xy_h5      HDF5 with dataset ``X`` (cells x genes) and optional ``Y`` (one
           integer label per cell -> ``obs["label"]``), the layout used by
           deep-clustering benchmarks (``/work/shared/data/*.h5``)
10x_h5     10x Genomics CellRanger HDF5: v3 (group ``matrix`` with
           ``features/name``, ``features/id``) or v2 (one group per genome
           with ``genes`` / ``gene_names``)
mtx        Matrix Market directory, or the ``.mtx(.gz)`` file inside it:
           ``matrix.mtx(.gz)`` (genes x cells, as 10x writes it) with
           ``barcodes.tsv(.gz)`` and ``features.tsv(.gz)`` or ``genes.tsv(.gz)``;
           a common file-name prefix (``GSM1_matrix.mtx.gz``...) is allowed
csv / tsv  dense table (``.csv``, ``.tsv``, ``.txt``, optionally ``.gz``); the
           first column holds row names and the header column names. Rows are
           cells and columns genes; pass ``transpose=True`` when rows are genes
========== ==================================================================

The format is guessed from the extension and, for ``.h5`` files (or files with
an unknown extension that start with the HDF5 signature), from the HDF5 keys.
``format=`` overrides the guess.

Only problems that make the matrix unusable as counts are rejected here
(missing or unreadable files, missing datasets, mismatched shapes, empty
matrices, NaN/inf or negative values); each raises :class:`InputError` with one
line naming the file. Checking that values are integers is left to
preprocessing.

Writers (:func:`write_h5ad`, :func:`write_text_atomic`) are atomic: they write
a hidden temporary file next to the target and then rename it, and refuse to
replace an existing file unless ``overwrite=True``.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import warnings
import zlib
from collections.abc import Callable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp

from . import resources as memory
from .errors import InputError, OutputExistsError, ParameterError

__all__ = ["FORMATS", "read", "write_h5ad", "write_text_atomic", "file_md5", "bundled_pbmc_path",
           "read_bundled_pbmc"]

FORMATS = ("h5ad", "xy_h5", "10x_h5", "mtx", "csv", "tsv")

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_BLOCK_ELEMENTS = 1 << 24  # dense values converted to sparse per block (64 MiB of float32)
_TABLE_ROWS = 2000  # rows of a csv/tsv parsed per chunk
# errors that mean "this file is not what its format says"; anything else is a bug and propagates
_READ_ERRORS = (OSError, KeyError, ValueError, TypeError, EOFError, IndexError, zlib.error)


# ----------------------------------------------------------------------------- public reader
def read(path: str | Path, *, format: str | None = None, labels_key: str | None = None,
         transpose: bool | None = None, var_names_col: str | None = None) -> ad.AnnData:
    """Read a count matrix into AnnData.

    Parameters
    ----------
    path
        File to read, or (for ``mtx``) the directory holding ``matrix.mtx(.gz)``.
    format
        One of :data:`FORMATS` (``"h5ad"``, ``"xy_h5"``, ``"10x_h5"``, ``"mtx"``,
        ``"csv"``, ``"tsv"``). ``None`` guesses from the extension and, for HDF5
        files, from the keys inside.
    labels_key
        ``xy_h5`` only: the ``obs`` column that receives the labels of dataset
        ``Y`` (default ``"label"``). Labels are categorical strings of the integer
        value (``"3"``, not ``"3.0"``).
    transpose
        ``csv`` / ``tsv`` only. ``None`` (default): rows are cells and columns
        genes, but a table whose rows look like genes (their totals vary far more
        than the columns', as genes' do against cells') is refused. ``False``:
        rows are cells, unchecked. ``True``: rows are genes and columns are cells
        (the layout of many published count tables).
    var_names_col
        Name of a ``var`` column to use as gene names instead of the default,
        e.g. ``"gene_ids"`` for Ensembl ids of 10x data (whose default names are
        gene symbols).

    Returns
    -------
    anndata.AnnData
        Cells x genes; ``.X`` is a ``scipy.sparse.csr_matrix`` of float32 raw
        counts. Duplicated cell or gene names are made unique with a warning.

    Raises
    ------
    InputError
        The path does not exist, cannot be read in the chosen format, lacks the
        expected datasets or files, has inconsistent shapes, is empty, or holds
        NaN/inf or negative values.
    ParameterError
        ``format`` is not one of :data:`FORMATS`, or ``transpose=True`` is given
        for a format other than csv/tsv.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    fmt = check_format(format) if format is not None else guess_format(path)
    if transpose and fmt not in ("csv", "tsv"):
        raise ParameterError(f"transpose=True applies to csv/tsv tables only, not to {fmt} ({path})")
    if fmt == "mtx" and not path.is_dir() and not path.is_file():
        raise InputError(f"{path}: not a file or directory")
    if fmt != "mtx" and path.is_dir():
        raise InputError(f"{path}: is a directory; only the mtx format reads a directory")
    memory.check_fits(estimate_read_bytes(path, fmt), f"reading {path}",
                         "free memory, use a machine with more, or split the cells into several files")
    try:
        with warnings.catch_warnings():
            # anndata warns about duplicated names when building the object; _finalise reports them once
            warnings.filterwarnings("ignore", message=".*names are not unique", category=UserWarning)
            adata = _READERS[fmt](path, labels_key=labels_key or "label",
                                  transpose=None if transpose is None else bool(transpose))
    except InputError:
        raise
    except _READ_ERRORS as exc:  # never let a deep h5py/pandas traceback out
        raise InputError(f"{path}: cannot be read as {fmt}: {_one_line(exc)}") from None
    return _finalise(adata, path, var_names_col)


# ----------------------------------------------------------------------------- memory estimate
def estimate_read_bytes(path: str | Path, fmt: str) -> int:
    """Low estimate of the memory :func:`read` needs for ``path`` in format ``fmt``, from metadata only.

    h5ad: X, every layer and raw.X as stored (AnnData loads them whole);
    10x_h5: the stored non-zeros plus their CSR float32; mtx: the header's entry count, read as
    COO (two int32 + float64) and converted to CSR; xy_h5 and csv/tsv (converted to CSR block by
    block): the non-zeros extrapolated from the density of the first rows (csv: rows estimated from
    the file size, through the compression ratio of the first rows for .gz) plus one dense block.
    Returns 0 when the file cannot be inspected: the reader then reports what is wrong with it.
    """
    try:
        return int(_ESTIMATORS[fmt](Path(path)))
    except Exception:  # an estimate is advisory: a malformed file is the reader's to report
        return 0


def _h5_matrix_bytes(node) -> tuple[int, int]:
    """(bytes as stored, non-zeros) of an HDF5 dense dataset or AnnData sparse group."""
    if isinstance(node, h5py.Dataset):
        return node.size * node.dtype.itemsize, node.size
    parts = [node[k] for k in ("data", "indices", "indptr") if k in node]
    return sum(p.size * p.dtype.itemsize for p in parts), node["data"].size


def _estimate_h5ad(path: Path) -> int:
    with h5py.File(path, "r") as f:
        stored = _h5_matrix_bytes(f["X"])[0]
        for key in f["layers"] if "layers" in f else ():
            stored += _h5_matrix_bytes(f["layers"][key])[0]
        if "raw" in f and "X" in f["raw"]:
            stored += _h5_matrix_bytes(f["raw"]["X"])[0]
    return stored


def _estimate_10x(path: Path) -> int:
    with h5py.File(path, "r") as f:
        group = f["matrix"] if "matrix" in f else next(f[k] for k in f if "data" in f[k])
        data, indices = group["data"], group["indices"]
        return data.size * (data.dtype.itemsize + indices.dtype.itemsize + memory.CSR_BYTES_PER_VALUE)


def _estimate_xy(path: Path) -> int:
    with h5py.File(path, "r") as f:
        x = f["X"]
        n, g = x.shape
        sample = np.asarray(x[: min(n, max(1, _BLOCK_ELEMENTS // max(g, 1)), 1000)])
        density = np.count_nonzero(sample) / max(sample.size, 1)
        return int(density * n * g * memory.CSR_BYTES_PER_VALUE + min(n * g, _BLOCK_ELEMENTS) * x.dtype.itemsize)


def _estimate_mtx(path: Path) -> int:
    if path.is_dir():
        path = next(p for p in sorted(path.iterdir()) if p.name.endswith(("matrix.mtx", "matrix.mtx.gz")))
    entries = scipy.io.mminfo(path)[2]
    return entries * (16 + 12)  # COO (int32 row, int32 col, float64) + CSR float64 of it


class _CountingReader:
    """A binary file object that counts the bytes read from it (compressed bytes under gzip)."""

    def __init__(self, raw):
        self.raw, self.count = raw, 0

    def read(self, size=-1):
        data = self.raw.read(size)
        self.count += len(data)
        return data

    def readable(self):
        return True


def _estimate_table(path: Path, sep: bytes) -> int:

    size = path.stat().st_size
    with open(path, "rb") as raw:
        counting = _CountingReader(raw)
        zipped = path.name.lower().endswith(".gz")
        stream = gzip.GzipFile(fileobj=counting) if zipped else raw
        lines = []
        for _ in range(_TABLE_ROWS + 1):
            line = stream.readline()
            if not line:
                break
            lines.append(line)
        # uncompressed bytes per file byte (the gzip reader reads ahead: a slight underestimate of rows)
        ratio = sum(len(line) for line in lines) / max(counting.count, 1) if zipped else 1.0
    if len(lines) < 2:
        return 0
    body = lines[1:]
    fields = [line.rstrip(b"\r\n").split(sep)[1:] for line in body]
    n_cols = max(len(f) for f in fields)
    nonzero = sum(1 for row in fields for v in row if v.strip() not in (b"0", b"0.0", b""))
    n_rows = max(len(body), size * ratio / (sum(len(line) for line in body) / len(body)))
    per_row = nonzero / len(body) * memory.CSR_BYTES_PER_VALUE
    return int(n_rows * per_row + min(n_rows, _TABLE_ROWS) * n_cols * 8)  # + one float64 chunk


_ESTIMATORS: dict[str, Callable[[Path], int]] = {
    "h5ad": _estimate_h5ad, "10x_h5": _estimate_10x, "xy_h5": _estimate_xy, "mtx": _estimate_mtx,
    "csv": lambda p: _estimate_table(p, b","), "tsv": lambda p: _estimate_table(p, b"\t"),
}


# ----------------------------------------------------------------------------- format guessing
def check_format(fmt: str) -> str:
    key = str(fmt).lower().replace("-", "_")
    aliases = {"10x": "10x_h5", "10x_mtx": "mtx", "txt": "tsv", "anndata": "h5ad"}
    key = aliases.get(key, key)
    if key not in FORMATS:
        raise ParameterError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return key


def guess_format(path: Path) -> str:
    name = path.name.lower()
    if path.is_dir():
        if name.endswith((".h5ad", ".h5", ".hdf5", ".csv", ".csv.gz", ".tsv", ".tsv.gz", ".txt", ".txt.gz")):
            raise InputError(f"{path}: is a directory, not a {path.suffix} file")
        return "mtx"
    if name.endswith((".mtx", ".mtx.gz")):
        return "mtx"
    if name.endswith(".h5ad"):
        return "h5ad"
    if name.endswith((".csv", ".csv.gz")):
        return "csv"
    if name.endswith((".tsv", ".tsv.gz", ".txt", ".txt.gz")):
        return "tsv"
    if name.endswith((".h5", ".hdf5", ".he5")) or _has_hdf5_signature(path):
        return _sniff_hdf5(path)
    raise InputError(f"{path}: cannot tell the format from the extension {path.suffix!r}; "
                     f"pass format= (--format), one of {', '.join(FORMATS)}")


def _has_hdf5_signature(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(_HDF5_SIGNATURE)) == _HDF5_SIGNATURE
    except OSError:
        return False


def _sniff_hdf5(path: Path) -> str:
    """Tell h5ad, 10x_h5 and xy_h5 apart by the keys of an HDF5 file."""
    try:
        with h5py.File(path, "r") as f:
            keys = sorted(f.keys())
            encoding = f.attrs.get("encoding-type", b"")
            groups_10x = [k for k in keys if isinstance(f[k], h5py.Group) and {"barcodes", "data"} <= set(f[k].keys())]
    except OSError:
        raise InputError(f"{path}: not a readable HDF5 file (truncated, or another format with an HDF5 name)") from None
    encoding = encoding.decode() if isinstance(encoding, bytes) else str(encoding)
    if encoding == "anndata" or {"X", "obs", "var"} <= set(keys):
        return "h5ad"
    if "matrix" in keys or groups_10x:
        return "10x_h5"
    if "X" in keys:
        return "xy_h5"
    raise InputError(f"{path}: HDF5 file has neither dataset 'X' (xy_h5), a 10x 'matrix' group (10x_h5) "
                     f"nor AnnData groups (h5ad); found: {keys}")


# ----------------------------------------------------------------------------- one reader per format
def _read_h5ad(path: Path) -> ad.AnnData:
    adata = ad.read_h5ad(path)
    if adata.X is None:
        raise InputError(f"{path}: AnnData file has no X matrix (layers: {sorted(adata.layers.keys())}); "
                         "store raw counts in X")
    return adata


def _read_xy_h5(path: Path, labels_key: str) -> ad.AnnData:
    with h5py.File(path, "r") as f:
        found = sorted(f.keys())
        if "X" not in f or not isinstance(f["X"], h5py.Dataset):
            raise InputError(f"{path}: HDF5 file has no dataset 'X' (found: {found})")
        x = f["X"]
        if x.ndim != 2:
            raise InputError(f"{path}: dataset 'X' has shape {x.shape}; expected 2-D cells x genes")
        check_dtype(path, x.dtype)
        counts = _dense_to_csr(x)  # block by block, never the whole dense matrix in memory
        y = f["Y"][()] if "Y" in f else None
    adata = ad.AnnData(counts)
    adata.obs_names = [f"cell{i}" for i in range(counts.shape[0])]
    adata.var_names = [f"gene{j}" for j in range(counts.shape[1])]
    if y is not None:
        labels = labels_as_str(np.asarray(y).ravel())
        if labels.shape[0] != counts.shape[0]:
            raise InputError(f"{path}: dataset 'Y' has {labels.shape[0]} labels for {counts.shape[0]} cells in 'X'")
        adata.obs[labels_key] = pd.Categorical(labels)
    return adata


def labels_as_str(y: np.ndarray) -> np.ndarray:
    """Labels as strings; integral floats print as integers ("3", not "3.0")."""
    if y.dtype.kind == "S":
        return np.char.decode(y, "utf-8")
    if y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
        y = y.astype(np.int64)
    if y.dtype.kind == "O":
        return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in y])
    return y.astype(str)


def _read_10x_h5(path: Path) -> ad.AnnData:
    with h5py.File(path, "r") as f:
        if "matrix" in f:  # CellRanger v3+
            groups = [f["matrix"]]
        else:  # CellRanger v2: one group per genome
            groups = [f[k] for k in f if isinstance(f[k], h5py.Group) and "barcodes" in f[k]]
        if not groups:
            raise InputError(f"{path}: no 10x 'matrix' group or genome group with 'barcodes' (found: {sorted(f.keys())})")
        parts = [_read_10x_group(path, g) for g in groups]
    barcodes = parts[0][1]
    for g, (_, other, _) in zip(groups[1:], parts[1:]):
        if other != barcodes:
            raise InputError(f"{path}: genome groups {groups[0].name!r} and {g.name!r} have different barcodes")
    counts = parts[0][0] if len(parts) == 1 else sp.hstack([p[0] for p in parts], format="csr")
    var = pd.concat([p[2] for p in parts])
    counts, var = _gene_expression_only(counts, var)
    adata = ad.AnnData(counts, var=var.set_index(var["gene_symbols"].to_numpy()))
    adata.obs_names = barcodes
    return adata


def _read_10x_group(path: Path, group: h5py.Group) -> tuple[sp.csr_matrix, list[str], pd.DataFrame]:
    """One 10x matrix group -> (cells x genes CSR, barcodes, var table)."""
    missing = [k for k in ("data", "indices", "indptr", "shape", "barcodes") if k not in group]
    if "features" in group:
        names, ids = group["features"].get("name"), group["features"].get("id")
        types = group["features"].get("feature_type")
        missing += [f"features/{k}" for k, v in (("name", names), ("id", ids)) if v is None]
    else:
        names, ids, types = group.get("gene_names"), group.get("genes"), None
        missing += [k for k, v in (("gene_names", names), ("genes", ids)) if v is None]
    if missing:
        raise InputError(f"{path}: 10x group {group.name!r} lacks {missing} (found: {sorted(group.keys())})")
    n_genes, n_cells = (int(v) for v in group["shape"][()][:2])
    barcodes, names, ids = _decode(group["barcodes"][()]), _decode(names[()]), _decode(ids[()])
    indptr = group["indptr"][()]
    if len(barcodes) != n_cells or len(names) != n_genes or len(ids) != n_genes or len(indptr) != n_cells + 1:
        raise InputError(f"{path}: 10x group {group.name!r} has shape {n_genes} genes x {n_cells} cells but "
                         f"{len(barcodes)} barcodes, {len(names)} gene names, {len(ids)} gene ids and "
                         f"{len(indptr)} indptr entries")
    # 10x stores genes x cells in CSC, whose transpose is cells x genes in CSR (no data copy)
    counts = sp.csr_matrix((group["data"][()], group["indices"][()], indptr), shape=(n_cells, n_genes))
    var = pd.DataFrame({"gene_ids": ids, "gene_symbols": names})
    if types is not None:
        var["feature_types"] = _decode(types[()])
    return counts, barcodes, var


def _gene_expression_only(counts: sp.csr_matrix, var: pd.DataFrame) -> tuple[sp.csr_matrix, pd.DataFrame]:
    """Drop antibody/CRISPR features when gene-expression features are present (as scanpy does)."""
    if "feature_types" not in var:
        return counts, var
    keep = (var["feature_types"] == "Gene Expression").to_numpy()
    if keep.all() or not keep.any():
        return counts, var
    return counts[:, np.flatnonzero(keep)], var.iloc[keep]


def _decode(values: Any) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in np.asarray(values).ravel()]


def _read_mtx(path: Path) -> ad.AnnData:
    if path.is_dir():
        folder = path
        candidates = sorted(p for p in folder.iterdir() if p.name.endswith(("matrix.mtx", "matrix.mtx.gz")))
        if not candidates:
            raise InputError(f"{folder}: Matrix Market directory has no matrix.mtx(.gz) "
                             f"(found: {sorted(p.name for p in folder.iterdir())[:10]})")
        if len(candidates) > 1:
            raise InputError(f"{folder}: several matrices ({', '.join(p.name for p in candidates)}); "
                             "pass the path of one .mtx file")
        matrix = candidates[0]
    else:
        folder, matrix = path.parent, path
    prefix = matrix.name[: matrix.name.lower().rfind("matrix.mtx")] if "matrix.mtx" in matrix.name.lower() else ""
    barcodes = _first(folder, prefix, ("barcodes.tsv.gz", "barcodes.tsv"), "barcodes.tsv(.gz)")
    features = _first(folder, prefix, ("features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv"),
                      "features.tsv(.gz) or genes.tsv(.gz)")
    cells = _read_names(barcodes)[0].tolist()
    feats = _read_names(features)
    ids = feats[0].tolist()
    names = feats[1 if feats.shape[1] > 1 else 0].tolist()
    m = sp.csr_matrix(scipy.io.mmread(matrix))
    if m.shape == (len(names), len(cells)):  # 10x layout: genes x cells
        counts = m.T.tocsr()
    elif m.shape == (len(cells), len(names)):  # already cells x genes
        counts = m
    else:
        raise InputError(f"{matrix}: matrix is {m.shape[0]} x {m.shape[1]} but {barcodes.name} lists "
                         f"{len(cells)} cells and {features.name} {len(names)} genes")
    var = pd.DataFrame({"gene_ids": ids, "gene_symbols": names})
    if feats.shape[1] > 2:
        var["feature_types"] = feats[2].tolist()
    counts, var = _gene_expression_only(counts, var)
    adata = ad.AnnData(counts, var=var.set_index(var["gene_symbols"].to_numpy()))
    adata.obs_names = cells
    return adata


def _first(folder: Path, prefix: str, names: tuple[str, ...], what: str) -> Path:
    for name in names:
        for candidate in (folder / (prefix + name), folder / name):
            if candidate.is_file():
                return candidate
    raise InputError(f"{folder}: Matrix Market directory has no {prefix}{what}")


def _read_names(path: Path) -> pd.DataFrame:
    """A headerless tsv of names, kept as strings ("NA", "1" stay names)."""
    try:
        return pd.read_csv(path, sep="\t", header=None, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise InputError(f"{path}: file is empty") from None


def _read_table(path: Path, sep: str, transpose: bool | None) -> ad.AnnData:
    """Dense table read in row chunks, so only one chunk is dense at a time.

    A table without a header or row names (numbers where the names should be) is refused, and, with
    ``transpose=None``, one whose rows look like genes (:func:`_check_orientation`).
    """
    blocks, row_names, columns = [], [], None
    with pd.read_csv(path, sep=sep, index_col=0, chunksize=_TABLE_ROWS) as reader:
        for chunk in reader:
            columns = chunk.columns if columns is None else columns
            try:
                values = chunk.to_numpy(dtype=np.float32)
            except (ValueError, TypeError):
                raise InputError(f"{path}: table has non-numeric values in column {_non_numeric_column(chunk)!r} "
                                 "(expected row names in the first column, column names in the header)") from None
            blocks.append(sp.csr_matrix(values))
            row_names.extend(chunk.index.astype(str))
    if columns is None:
        raise InputError(f"{path}: table has no rows")
    counts = sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix((0, len(columns)), dtype=np.float32)
    col_names = columns.astype(str).tolist()
    header = pd.read_csv(path, sep=sep, header=None, nrows=1, dtype=str, keep_default_na=False).iloc[0].tolist()[1:]
    _check_table_names(path, header, row_names)
    if transpose is None:
        _check_orientation(path, counts)
    if transpose:
        counts, row_names, col_names = counts.T.tocsr(), col_names, row_names
    adata = ad.AnnData(counts)
    adata.obs_names, adata.var_names = row_names, col_names
    return adata


def _numbers_not_names(names: list[str]) -> bool:
    """All of ``names`` are numbers and not a run of consecutive integers (an index like 0, 1, 2, ...)."""
    values = pd.to_numeric(pd.Series(names, dtype=object), errors="coerce")
    if len(names) == 0 or values.isna().any():
        return False
    v = values.to_numpy(dtype=float)
    return not (np.all(v == np.round(v)) and np.array_equal(v, v[0] + np.arange(len(v))))


def _check_table_names(path: Path, header: list[str], rows: list[str]) -> None:
    """Refuse a table whose header or first column hold counts instead of names.

    pandas takes the first row as column names and the first column as row names, so a table of
    numbers only would silently lose its first cell and gene. Numbers as names are accepted when
    they are distinct and the other axis has real names (e.g. Entrez gene ids), or a 0, 1, 2, ... index.
    """
    head_numeric, rows_numeric = _numbers_not_names(header), _numbers_not_names(rows)
    if head_numeric and (rows_numeric or len(set(header)) < len(header)):
        raise InputError(f"{path}: the header holds numbers (e.g. {header[0]!r}), not gene names: the table seems to "
                         "have no header row, and its first row (and first column) would be taken as names and lost; "
                         "add a header of gene names and a first column of cell names")
    if rows_numeric and len(set(rows)) < len(rows):
        raise InputError(f"{path}: the first column holds repeated numbers (e.g. {rows[0]!r}), not cell names: the "
                         "table seems to have no row names, and its first column would be taken as names and lost; "
                         "add a first column of cell names")


ORIENTATION_MIN = 20  # rows and columns needed before a table's orientation is judged from its totals
ORIENTATION_RATIO = 1.5  # rows look like genes when their log totals spread this much more than the columns'


def _check_orientation(path: Path, counts: sp.csr_matrix) -> None:
    """Refuse (unless transpose is given) a table whose rows look like genes rather than cells.

    Cells' library sizes vary little (sd of log1p totals 0.3-1.0 on the shared data sets) while
    genes' totals span orders of magnitude (sd 1.1-4.1). On random 20-2000 x 20-2000 samples of the
    13 shared data sets no table the right way round was refused, and 35 of 52 transposed ones were
    (not Klein's pre-selected genes, whose totals vary like its cells'). Empty rows and columns are
    left out of the spreads.
    """
    if min(counts.shape) < ORIENTATION_MIN or counts.nnz < ORIENTATION_MIN:
        return
    row_totals, col_totals = (np.asarray(counts.sum(axis), dtype=np.float64).ravel() for axis in (1, 0))
    # empty cells and genes say nothing about the orientation (and would inflate the spread)
    rows, cols = (np.log1p(t[t > 0]).std() for t in (row_totals, col_totals))
    if rows > 1.0 and rows > ORIENTATION_RATIO * cols:
        raise InputError(f"{path}: the rows look like genes, not cells (row totals vary {rows / max(cols, 1e-9):.1f}x "
                         f"more than column totals, sd {rows:.2f} against {cols:.2f} in log counts); pass --transpose "
                         "(transpose=True) if rows are genes, or --no-transpose (transpose=False) to read rows as cells")


def _non_numeric_column(chunk: pd.DataFrame) -> str:
    for col in chunk.columns:
        s = chunk[col]
        if (pd.to_numeric(s, errors="coerce").isna() & s.notna()).any():
            return str(col)
    return str(chunk.columns[0])


_READERS: dict[str, Callable[..., ad.AnnData]] = {
    "h5ad": lambda path, **_: _read_h5ad(path),
    "xy_h5": lambda path, labels_key, **_: _read_xy_h5(path, labels_key),
    "10x_h5": lambda path, **_: _read_10x_h5(path),
    "mtx": lambda path, **_: _read_mtx(path),
    "csv": lambda path, transpose, **_: _read_table(path, ",", transpose),
    "tsv": lambda path, transpose, **_: _read_table(path, "\t", transpose),
}


# ----------------------------------------------------------------------------- validation
def _dense_to_csr(x: Any) -> sp.csr_matrix:
    """Dense 2-D array (numpy or h5py dataset) -> CSR float32, converting blocks of rows."""
    n_rows, n_cols = x.shape
    step = max(1, _BLOCK_ELEMENTS // max(n_cols, 1))
    blocks = [sp.csr_matrix(np.asarray(x[i:i + step]), dtype=np.float32) for i in range(0, n_rows, step)]
    if not blocks:
        return sp.csr_matrix((n_rows, n_cols), dtype=np.float32)
    return blocks[0] if len(blocks) == 1 else sp.vstack(blocks, format="csr")


def _as_csr_float32(x: Any) -> sp.csr_matrix:
    if sp.issparse(x):
        return sp.csr_matrix(x, dtype=np.float32)  # no copy when already CSR float32
    return _dense_to_csr(np.asarray(x))


def check_dtype(path: Path, dtype: np.dtype) -> None:
    if np.dtype(dtype).kind not in "biuf":
        raise InputError(f"{path}: the matrix has dtype {dtype}; expected real numbers (raw counts)")


def _finalise(adata: ad.AnnData, path: Path, var_names_col: str | None) -> ad.AnnData:
    """Common checks: CSR float32, not empty, finite non-negative values, unique string names."""
    check_dtype(path, adata.X.dtype)
    adata.X = _as_csr_float32(adata.X)
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise InputError(f"{path}: the matrix is empty ({adata.n_obs} cells x {adata.n_vars} genes)")
    data = adata.X.data
    n_nan, n_inf = int(np.isnan(data).sum()), int(np.isinf(data).sum())
    if n_nan or n_inf:
        raise InputError(f"{path}: the matrix has {n_nan} NaN and {n_inf} infinite values; expected raw counts")
    n_neg = int((data < 0).sum())
    if n_neg:
        raise InputError(f"{path}: the matrix has {n_neg} negative values (min {data.min():g}); expected raw counts")
    if var_names_col is not None:
        if var_names_col not in adata.var.columns:
            raise InputError(f"{path}: var_names_col {var_names_col!r} is not a var column "
                             f"(available: {list(adata.var.columns)})")
        adata.var_names = adata.var[var_names_col].astype(str).to_numpy()
    adata.obs_names = adata.obs_names.astype(str)
    adata.var_names = adata.var_names.astype(str)
    for axis, names, make_unique in (("cell", adata.obs_names, adata.obs_names_make_unique),
                                     ("gene", adata.var_names, adata.var_names_make_unique)):
        if not names.is_unique:
            dup = names[names.duplicated()]
            warnings.warn(f"{path}: {len(dup)} duplicated {axis} names (e.g. {dup[0]!r}) were made unique "
                          "by appending -1, -2, ...", UserWarning, stacklevel=3)
            make_unique()
    return adata


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = lines[0][:200] if lines else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ----------------------------------------------------------------------------- writers
def _atomic(path: str | Path, overwrite: bool, write: Callable[[Path], Any]) -> Path:
    """Run ``write(tmp)`` on a hidden temp file next to ``path``, then rename it onto ``path``."""
    path = Path(path).expanduser()
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_h5ad(adata: ad.AnnData, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``adata`` to an ``.h5ad`` file atomically.

    ``obs``/``var`` columns and ``uns`` entries that anndata cannot store
    (mixed-type object columns, tuples, paths, arbitrary objects, non-string
    keys) are written as strings or arrays; ``adata`` itself is not modified.

    Parameters
    ----------
    adata
        The object to write.
    path
        Target file; its parent directory is created if needed.
    overwrite
        Replace an existing file. Without it an existing ``path`` raises
        :class:`OutputExistsError`.

    Returns
    -------
    pathlib.Path
        The written path.
    """
    safe = _h5ad_safe(adata)
    return _atomic(path, overwrite, lambda tmp: safe.write_h5ad(tmp))


def write_text_atomic(path: str | Path, text: str, *, overwrite: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically, e.g. a csv or json report.

    Same semantics as :func:`write_h5ad`: refuses an existing file unless
    ``overwrite=True`` and leaves no temporary file behind on failure.
    """
    return _atomic(path, overwrite, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _h5ad_safe(adata: ad.AnnData) -> ad.AnnData:
    """``adata``, or a shallow variant with obs/var/uns that h5ad can store (arrays are shared, not copied)."""
    obs, var = safe_frame(adata.obs), safe_frame(adata.var)
    uns = safe_uns(dict(adata.uns), "uns")
    if obs is adata.obs and var is adata.var and _same(uns, adata.uns):
        return adata
    if adata.is_view:
        adata = adata.copy()
    return ad.AnnData(X=adata.X, obs=obs, var=var, uns=uns, obsm=dict(adata.obsm), varm=dict(adata.varm),
                      obsp=dict(adata.obsp), varp=dict(adata.varp), layers=dict(adata.layers),
                      raw=adata.raw.to_adata() if adata.raw is not None else None)


def _same(new: dict, old: Mapping) -> bool:
    return new.keys() == old.keys() and all(new[k] is old[k] for k in new)


def safe_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Object columns holding non-strings become strings (missing values stay missing)."""
    fixed = {}
    for col in df.columns:
        s = df[col]
        if isinstance(s.dtype, pd.CategoricalDtype):
            cats = s.cat.categories
            if cats.dtype == object and not all(isinstance(c, str) for c in cats):
                fixed[col] = s.astype(str).astype("category")
        elif s.dtype == object and not all(isinstance(v, str) or _missing(v) for v in s):
            fixed[col] = s.map(lambda v: v if isinstance(v, str) or _missing(v) else str(v))
    if not fixed and all(isinstance(c, str) for c in df.columns):
        return df
    out = df.assign(**{str(k): v for k, v in fixed.items()}) if fixed else df.copy()
    out.columns = [str(c) for c in out.columns]
    return out


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and np.isnan(v))


_UNS_SCALARS = (str, bool, int, float, np.generic, pd.DataFrame, type(None))


def safe_uns(value: Any, where: str) -> Any:
    """Recursively turn ``uns`` content into types anndata can write."""
    if isinstance(value, Mapping):
        out = {str(k): safe_uns(v, f"{where}[{k!r}]") for k, v in value.items()}
        same = all(isinstance(k, str) for k in value) and all(out[k] is value[k] for k in value)
        return value if same and isinstance(value, dict) else out
    if isinstance(value, _UNS_SCALARS) or sp.issparse(value):
        return value
    if isinstance(value, np.ndarray):
        return value if value.dtype != object else _safe_sequence(list(value.ravel()), where).reshape(value.shape)
    if isinstance(value, (list, tuple)):
        if value and all(isinstance(v, Mapping) for v in value):
            return {str(i): safe_uns(v, f"{where}[{i}]") for i, v in enumerate(value)}
        return _safe_sequence(list(value), where)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    warnings.warn(f"{where}: {type(value).__name__} cannot be stored in h5ad; writing its str()", UserWarning,
                  stacklevel=4)
    return str(value)


def _safe_sequence(values: list, where: str) -> np.ndarray:
    """A list as a numeric or string array; mixed or ragged content becomes strings."""
    if not values:
        return np.asarray([], dtype=float)
    try:
        arr = np.asarray(values)
    except ValueError:  # ragged nested lists
        arr = None
    if arr is not None and arr.dtype.kind in "biufcU":
        return arr
    return np.asarray(["" if v is None else str(v) for v in values])


# ----------------------------------------------------------------------------- misc
def file_md5(path: str | Path) -> str:
    """Hex MD5 of a file, read in 1 MiB blocks (for recording a data checksum)."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def bundled_pbmc_path() -> Path:
    """Path of the bundled 10x PBMC data set (4271 cells x 2000 genes, 8 labeled types, xy_h5 layout)."""
    path = Path(str(resources.files("schashformer") / "data" / "10X_PBMC_top2000.h5"))
    if not path.is_file():
        raise InputError(f"{path}: bundled data file is missing; reinstall schashformer")
    return path


def read_bundled_pbmc() -> ad.AnnData:
    """Read the bundled PBMC data set; cell-type labels ("1".."8") are in ``obs["label"]``."""
    return read(bundled_pbmc_path(), format="xy_h5")
