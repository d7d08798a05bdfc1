"""The run record kept in ``adata.uns["schashformer"]``: enough to re-run a result and check its input.

The record holds the package and library versions, every parameter (including the seed
and the device used), a SHA-256 checksum of the count matrix that was clustered, timings
and, for command-line runs, the input file (path, format, orientation). :func:`rerun_args`
turns a stored record back into the arguments of :func:`schashformer.tl.cluster`.
"""

from __future__ import annotations

import hashlib
import platform
from importlib import metadata
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from .errors import InputError
from .version import __version__

_CHUNK = 1 << 22  # elements hashed per update (16-32 MiB)
# the data arguments of tl.cluster stored in the record's params next to the estimator's parameters
# (SCHashFormer.result_params, the device and the device used); "" stands for None in h5ad
FIT_ARGS = ("labels_key", "batch_key", "layer")
# parameters renamed since: old name -> new name (saved models and run records of older versions)
RENAMED = {"alpha": "w_kl", "beta": "w_zinb_stage2"}


def data_checksum(x: sp.csr_matrix) -> str:
    """``"sha256:<hex>"`` of a CSR matrix's shape, values (float32) and sparsity pattern.

    The matrix is taken in canonical form (sorted indices, no duplicates, no stored zeros),
    so the same counts read twice, or stored dense and sparse, give the same checksum.
    Each array is digested on its own and the digests are combined (:func:`combine_checksum`),
    so a streaming reader can digest the row chunks in the pass that reads them anyway.
    """
    x = sp.csr_matrix(x, dtype=np.float32)
    if not x.has_canonical_format or (x.data == 0).any():
        x = x.copy()
        x.sum_duplicates()
        x.eliminate_zeros()
    return combine_checksum(x.shape, *(array_digest(values, dtype) for values, dtype in checksum_parts(x)))


def checksum_parts(x: sp.csr_matrix):
    """(array, dtype) of a canonical CSR matrix in checksum order: indptr, indices, data."""
    return ((x.indptr, np.int64), (x.indices, np.int32), (x.data, np.float32))


def array_digest(values: np.ndarray, dtype, digest=None):
    """``digest`` (a new SHA-256 if None) updated with ``values`` as ``dtype`` bytes, in bounded pieces."""
    digest = hashlib.sha256() if digest is None else digest
    for start in range(0, len(values), _CHUNK):
        digest.update(np.ascontiguousarray(values[start:start + _CHUNK], dtype=dtype).tobytes())
    return digest


def update_row_digests(x: sp.csr_matrix, digests) -> None:
    """Update (indices digest, data digest) with a canonical CSR block of consecutive rows.

    indptr is not digested here: it depends on the rows before the block, so a chunked reader
    keeps the per-row non-zero counts and digests the assembled indptr once at the end.
    """
    for (values, dtype), digest in zip(checksum_parts(x)[1:], digests):
        array_digest(values, dtype, digest)


def combine_checksum(shape, indptr, indices, data) -> str:
    """The checksum from the shape and the SHA-256 digests of indptr, indices and data."""
    digest = hashlib.sha256(np.asarray(shape, dtype=np.int64).tobytes())
    for part in (indptr, indices, data):
        digest.update(part.digest())
    return "sha256:" + digest.hexdigest()


def versions() -> dict[str, str]:
    """Versions of Python and of the libraries that decide the numbers."""

    def version(name: str) -> str:
        try:
            return str(metadata.version(name))
        except metadata.PackageNotFoundError:
            return "not installed"


    libs = {name: version(name) for name in ("numpy", "scipy", "scanpy", "anndata", "scikit-learn")}
    return {"schashformer": __version__, "python": platform.python_version(), "torch": str(torch.__version__),
            "cuda": str(torch.version.cuda or ""), **libs}


def plain(value: Any) -> Any:
    """A value read back from h5ad as a plain Python value; "" (how None is stored) becomes None."""
    if isinstance(value, np.generic):
        value = value.item()
    return None if isinstance(value, str) and value == "" else value


def from_uns(uns: Any, key: str = "schashformer", *, where: str = "adata") -> dict:
    """The run record under ``uns[key]``, checked to hold what a re-run needs."""
    record = uns.get(key) if hasattr(uns, "get") else None
    if not isinstance(record, dict):
        raise InputError(f"{where}: no scHashFormer run record in uns[{key!r}]")
    missing = [k for k in ("params", "data_checksum") if k not in record]
    if missing:
        raise InputError(f"{where}: the run record uns[{key!r}] lacks {missing} (written by an older version?)")
    return record


def rename_legacy(params: dict) -> dict:
    """``params`` with the names of older versions (:data:`RENAMED`) replaced by today's."""
    return {RENAMED.get(name, name): value for name, value in params.items()}


def rerun_args(record: dict) -> tuple[dict, dict]:
    """(estimator parameters, data arguments :data:`FIT_ARGS`) that repeat the recorded run.

    The parameters are every recorded one but the device (``device``, ``device_used``: the caller
    chooses) and where the neighbour graph was written (``neighbors_key``: no part of the result),
    with None restored and old names renamed; a parameter the record lacks (one added since)
    takes its default.
    """
    params = rename_legacy({k: plain(v) for k, v in record["params"].items()
                            if k not in ("device", "device_used", "neighbors_key")})
    fit_args = {k: params.pop(k, None) for k in FIT_ARGS}
    return params, fit_args
