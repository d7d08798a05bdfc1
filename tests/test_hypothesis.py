"""Property-based tests: random malformed inputs give a valid result or a documented error, never a crash.

Documented errors are the :class:`SCHashFormerError` subclasses listed in docs/VALIDATION.md. For
``prepare`` the test also knows which inputs must be refused (NaN/inf, negatives, non-integers on
the count path, empty or all-zero matrices, duplicated gene names, overflowing totals) and which must
succeed, and checks that a success holds no NaN or inf anywhere.
"""

import gzip
import warnings
from pathlib import Path
from tempfile import TemporaryDirectory

import anndata as ad
import h5py
import numpy as np
import pytest
import scipy.io
import scipy.sparse as sp
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from schashformer import SCHashFormer, io
from schashformer.errors import InputError, ParameterError, SCHashFormerError
from schashformer.preprocess import CLIP, prepare

MANY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
F32_MAX = float(np.finfo(np.float32).max)
SPECIAL = [np.nan, np.inf, -np.inf, -1.0, -0.5, 0.5, 2.25, 1e6, 1e30, 3e38]


# ----------------------------------------------------------------------------- strategies
@st.composite
def values(draw):
    """Mostly small counts (many zeros), sometimes a special value."""
    if draw(st.integers(0, 9)) < 8:
        return float(draw(st.integers(0, 6)) if draw(st.booleans()) else 0)
    return draw(st.sampled_from(SPECIAL))


@st.composite
def matrices(draw, max_side=9):
    """(cells x genes float64 matrix, cell names, gene names)."""
    n, m = draw(st.integers(0, max_side)), draw(st.integers(0, max_side))
    x = draw(arrays(np.float64, (n, m), elements=values()))
    if n and m and draw(st.booleans()):  # empty rows / columns
        x[draw(st.integers(0, n - 1))] = 0
        x[:, draw(st.integers(0, m - 1))] = 0
    pool = st.sampled_from(["a", "b", "c", "d"])
    cells = [f"c{i}" for i in range(n)]
    genes = [f"g{j}" for j in range(m)]
    if n and draw(st.integers(0, 4)) == 0:
        cells = [draw(pool) for _ in range(n)]
    if m and draw(st.integers(0, 4)) == 0:
        genes = [draw(pool) for _ in range(m)]
    return x, cells, genes


def make_adata(x, cells, genes, storage):
    x32 = x.astype(np.float32)
    if storage == "int":
        x32 = np.clip(np.where(np.isfinite(x32), x32, 0), -1e6, 1e6).astype(np.int64)
    stored = {"dense": x32, "csr": sp.csr_matrix(x32), "csc": sp.csc_matrix(x32), "int": x32}[storage]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = ad.AnnData(stored)
        a.obs_names, a.var_names = cells, genes
    return a


def expected_refusal(x: np.ndarray, genes: list, allow_noncounts: bool) -> bool:
    """Whether ``prepare`` must refuse the matrix (docs/VALIDATION.md V21-V27)."""
    if x.size == 0 or len(set(genes)) < len(genes):
        return True
    if not np.isfinite(x).all() or (x < 0).any():
        return True
    if not allow_noncounts and (np.abs(x - np.round(x)) > 1e-3).any():
        return True
    return not x.any() or (x.sum(1) > F32_MAX).any()


def assert_no_message_newline(exc: BaseException) -> None:
    assert isinstance(exc, SCHashFormerError) and "\n" not in str(exc), repr(exc)


def assert_valid_prepared(prep, x32: np.ndarray) -> None:
    keep = x32.sum(1) > 0
    assert np.array_equal(prep.cell_mask, keep)
    assert prep.n_cells == keep.sum() and 1 <= prep.n_genes <= x32.shape[1]
    for arr in (prep.counts.data, prep.logn.data, prep.size_factors, prep.stats.mean, prep.stats.std):
        assert np.isfinite(arr).all()
    assert (prep.size_factors > 0).all() and (prep.stats.std > 0).all()
    z = prep.standardised(np.arange(prep.n_cells))
    assert np.isfinite(z).all() and np.abs(z).max() <= CLIP


# ----------------------------------------------------------------------------- preprocessing
@MANY
@given(matrices(), st.sampled_from(["dense", "csr", "csc", "int"]), st.booleans(), st.integers(1, 12))
def test_prepare_gives_valid_output_or_a_documented_error(mat, storage, allow_noncounts, n_top_genes):
    x, cells, genes = mat
    a = make_adata(x, cells, genes, storage)
    x32 = np.asarray(a.X.toarray() if sp.issparse(a.X) else a.X, dtype=np.float64)
    must_fail = expected_refusal(x32, genes, allow_noncounts)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prep = prepare(a, n_top_genes=n_top_genes, allow_noncounts=allow_noncounts)
    except InputError as exc:
        assert_no_message_newline(exc)
        assert must_fail, f"refused a valid matrix: {exc}"
        return
    assert not must_fail, "accepted a matrix that must be refused"
    assert_valid_prepared(prep, x32)


@MANY
@given(st.lists(st.sampled_from([f"g{j}" for j in range(12)] + ["x", "y", "z"]), min_size=1, max_size=14),
       st.integers(0, 2**16))
def test_prepare_for_a_trained_model_checks_the_gene_set(names, seed):
    rng = np.random.default_rng(seed)
    train = make_adata(rng.poisson(3.0, (20, 12)).astype(float), [f"c{i}" for i in range(20)],
                       [f"g{j}" for j in range(12)], "csr")
    stats = prepare(train).stats
    new = make_adata(rng.poisson(3.0, (8, len(names))).astype(float), [f"n{i}" for i in range(8)], names, "csr")
    present = len(set(names) & set(stats.genes))
    must_fail = len(set(names)) < len(names) or present < 0.5 * len(stats.genes)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prep = prepare(new, stats=stats)
    except InputError as exc:
        assert_no_message_newline(exc)
        assert must_fail, f"refused a valid gene set: {exc}"
        return
    assert not must_fail
    assert list(prep.stats.genes) == list(stats.genes)
    for arr in (prep.counts.data, prep.logn.data, prep.size_factors):
        assert np.isfinite(arr).all()


# ----------------------------------------------------------------------------- readers
def write(x: np.ndarray, cells, genes, fmt: str, folder: Path) -> Path:
    """Write a matrix in one of the formats the readers accept (no validation: that is the reader's job)."""
    if fmt == "h5ad":
        make_adata(x, cells, genes, "csr").write_h5ad(folder / "m.h5ad")
        return folder / "m.h5ad"
    if fmt == "xy_h5":
        with h5py.File(folder / "m.h5", "w") as f:
            f["X"] = x
        return folder / "m.h5"
    if fmt in ("csv", "tsv.gz"):
        sep = "," if fmt == "csv" else "\t"
        lines = [sep.join(["cell", *genes])] + [sep.join([c, *map(repr, row.tolist())]) for c, row in zip(cells, x)]
        path = folder / f"m.{fmt}"
        text = "\n".join(lines) + "\n"
        if fmt.endswith(".gz"):
            with gzip.open(path, "wt") as f:
                f.write(text)
        else:
            path.write_text(text)
        return path
    if fmt == "mtx":
        scipy.io.mmwrite(folder / "matrix.mtx", sp.coo_matrix(x.T))
        (folder / "barcodes.tsv").write_text("".join(f"{c}\n" for c in cells))
        (folder / "features.tsv").write_text("".join(f"{g}\t{g}\n" for g in genes))
        return folder
    raise AssertionError(fmt)


def read_or_error(path: Path, **kwargs):
    """io.read's result, or None after checking the error is a documented one-line error."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return io.read(path, **kwargs)
    except (InputError, ParameterError) as exc:
        assert_no_message_newline(exc)
        return None


def assert_valid_read(a: ad.AnnData) -> None:
    assert isinstance(a.X, sp.csr_matrix) and a.X.dtype == np.float32
    assert a.n_obs > 0 and a.n_vars > 0
    assert np.isfinite(a.X.data).all() and (a.X.data >= 0).all()
    assert a.obs_names.is_unique and a.var_names.is_unique


@MANY
@given(matrices(max_side=6), st.sampled_from(["h5ad", "xy_h5", "csv", "tsv.gz", "mtx"]))
def test_readers_give_valid_counts_or_a_documented_error(mat, fmt):
    x, cells, genes = mat
    with TemporaryDirectory() as tmp:
        try:
            path = write(x, cells, genes, fmt, Path(tmp))
        except (ValueError, OSError):  # the writing library itself refuses (e.g. anndata and odd names)
            assume(False)
        a = read_or_error(path)
    x32 = x.astype(np.float32)
    must_fail = x.size == 0 or not np.isfinite(x32).all() or (x32 < 0).any()
    if a is None:
        assert must_fail, f"{fmt}: refused a valid matrix"
        return
    assert not must_fail, f"{fmt}: accepted a matrix that must be refused"
    assert_valid_read(a)
    assert a.shape == x.shape and np.array_equal(a.X.toarray(), x32)


@MANY
@given(st.binary(max_size=600), st.sampled_from(["x.h5ad", "x.h5", "x.csv", "x.tsv.gz", "x.mtx", "x.txt", "x.mtx.gz"]))
def test_readers_on_random_bytes(data, name):
    with TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(data)
        a = read_or_error(path)
    if a is not None:
        assert_valid_read(a)


@pytest.fixture(scope="module")
def valid_files(tmp_path_factory):
    """A small valid file per format, to be cut short by the next test."""
    rng = np.random.default_rng(0)
    x = rng.poisson(2.0, (25, 8)).astype(float)
    cells, genes = [f"c{i}" for i in range(25)], [f"g{j}" for j in range(8)]
    files = {}
    for fmt in ("h5ad", "xy_h5", "csv", "tsv.gz"):
        folder = tmp_path_factory.mktemp(fmt.replace(".", "_"))
        files[fmt] = write(x, cells, genes, fmt, folder).read_bytes()
    return files


@MANY
@given(st.sampled_from(["h5ad", "xy_h5", "csv", "tsv.gz"]), st.floats(0, 1, exclude_max=True))
def test_readers_on_truncated_files(valid_files, fmt, fraction):
    data = valid_files[fmt]
    with TemporaryDirectory() as tmp:
        path = Path(tmp) / ("m.h5" if fmt == "xy_h5" else f"m.{fmt}")
        path.write_bytes(data[: int(len(data) * fraction)])
        a = read_or_error(path)
    if a is not None:  # a table cut at a line end is a valid, shorter table
        assert fmt in ("csv", "tsv.gz")
        assert_valid_read(a)


# ----------------------------------------------------------------------------- the whole model, a few examples
TINY = dict(stage1_steps=2, stage2_pretrain_steps=2, stage2_cluster_steps=2, hidden=16, hash_latent=8, d_model=8,
            attn_heads=2, latent=4, kmeans_n_init=1, stage1_batch=32, chunks_per_batch=4)


@FEW
@given(st.integers(3, 30), st.integers(2, 15), st.integers(2, 5), st.integers(0, 2**16), st.booleans())
def test_model_gives_finite_embedding_and_valid_labels_or_a_documented_error(n_cells, n_genes, k, seed, holes):
    rng = np.random.default_rng(seed)
    x = rng.poisson(rng.gamma(1.0, 2.0, n_genes), (n_cells, n_genes)).astype(float)
    if holes:
        x[rng.random(n_cells) < 0.3] = 0
        x[:, rng.random(n_genes) < 0.3] = 0
    a = make_adata(x, [f"c{i}" for i in range(n_cells)], [f"g{j}" for j in range(n_genes)], "csr")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = SCHashFormer(k, seed=seed, device="cpu", progress=False, **TINY).fit(a)
    except SCHashFormerError as exc:
        assert_no_message_newline(exc)
        assert k > (x.sum(1) > 0).sum() or not x.any(), f"refused a valid input: {exc}"
        return
    kept = x.sum(1) > 0
    assert np.isfinite(model.embedding_).all()
    assert ((model.labels_ >= 0) == kept).all() and model.labels_.max() < k
