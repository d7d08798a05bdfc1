"""Tests of schashformer.io: every format round-trips, real files read, bad inputs fail with one clear line."""

import gzip
import shutil
import warnings

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp

from schashformer import io
from schashformer.errors import InputError, OutputExistsError, ParameterError


# ----------------------------------------------------------------------------- a small count matrix
@pytest.fixture
def counts() -> ad.AnnData:
    """50 cells x 30 genes of negative binomial counts, 3 all-zero cells, integer labels 0..3."""
    rng = np.random.default_rng(7)
    x = rng.negative_binomial(2, 0.4, size=(50, 30)).astype(np.float32)
    x[[4, 17, 33]] = 0
    adata = ad.AnnData(sp.csr_matrix(x))
    adata.obs_names = [f"AAAC{i:04d}-1" for i in range(50)]
    adata.var_names = [f"Gene{j}" for j in range(30)]
    adata.obs["label"] = pd.Categorical(rng.integers(0, 4, size=50).astype(str))
    return adata


def dense(adata: ad.AnnData) -> np.ndarray:
    return adata.X.toarray()


def assert_same_counts(back: ad.AnnData, ref: ad.AnnData, *, names: bool = True) -> None:
    assert isinstance(back.X, sp.csr_matrix) and back.X.dtype == np.float32
    assert back.shape == ref.shape
    np.testing.assert_array_equal(dense(back), dense(ref))
    if names:
        assert list(back.obs_names) == list(ref.obs_names)
        assert list(back.var_names) == list(ref.var_names)


# ----------------------------------------------------------------------------- writers used by the tests
def write_xy_h5(path, x, y=None):
    with h5py.File(path, "w") as f:
        f["X"] = x
        if y is not None:
            f["Y"] = y


def write_10x_v3(path, adata, feature_types=None):
    m = sp.csc_matrix(dense(adata).T.astype(np.int32))  # genes x cells, CSC as CellRanger stores it
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        g["data"], g["indices"], g["indptr"] = m.data, m.indices, m.indptr
        g["shape"] = np.array(m.shape, dtype=np.int32)
        g["barcodes"] = np.array(adata.obs_names, dtype="S")
        feats = g.create_group("features")
        feats["name"] = np.array(adata.var_names, dtype="S")
        feats["id"] = np.array([f"ENSG{j:011d}" for j in range(adata.n_vars)], dtype="S")
        feats["feature_type"] = np.array(feature_types or ["Gene Expression"] * adata.n_vars, dtype="S")
        feats["genome"] = np.array(["GRCh38"] * adata.n_vars, dtype="S")


def write_10x_v2(path, adata, genome="hg19"):
    m = sp.csc_matrix(dense(adata).T.astype(np.int32))
    with h5py.File(path, "w") as f:
        g = f.create_group(genome)
        g["data"], g["indices"], g["indptr"], g["shape"] = m.data, m.indices, m.indptr, np.array(m.shape)
        g["barcodes"] = np.array(adata.obs_names, dtype="S")
        g["gene_names"] = np.array(adata.var_names, dtype="S")
        g["genes"] = np.array([f"ENSG{j:011d}" for j in range(adata.n_vars)], dtype="S")


def write_mtx_dir(folder, adata, *, prefix="", gz=True, features="features.tsv"):
    folder.mkdir(parents=True, exist_ok=True)
    scipy.io.mmwrite(folder / f"{prefix}matrix.mtx", sp.coo_matrix(dense(adata).T))  # genes x cells
    if gz:
        with open(folder / f"{prefix}matrix.mtx", "rb") as src, gzip.open(folder / f"{prefix}matrix.mtx.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        (folder / f"{prefix}matrix.mtx").unlink()
    opener = (lambda p: gzip.open(str(p) + ".gz", "wt")) if gz else (lambda p: open(p, "w"))
    with opener(folder / f"{prefix}barcodes.tsv") as f:
        f.write("".join(f"{c}\n" for c in adata.obs_names))
    with opener(folder / f"{prefix}{features}") as f:
        f.write("".join(f"ENSG{j:011d}\t{g}\tGene Expression\n" for j, g in enumerate(adata.var_names)))


# ----------------------------------------------------------------------------- round trips
def test_h5ad_roundtrip_keeps_obs(counts, tmp_path):
    counts.write_h5ad(tmp_path / "a.h5ad")
    back = io.read(tmp_path / "a.h5ad")
    assert_same_counts(back, counts)
    assert list(back.obs["label"]) == list(counts.obs["label"])


def test_h5ad_with_dense_float64_x_becomes_csr_float32(counts, tmp_path):
    dense_ad = ad.AnnData(dense(counts).astype(np.float64), obs=counts.obs, var=counts.var)
    dense_ad.write_h5ad(tmp_path / "dense.h5ad")
    assert_same_counts(io.read(tmp_path / "dense.h5ad"), counts)


def test_h5ad_stored_under_h5_name_is_sniffed(counts, tmp_path):
    counts.write_h5ad(tmp_path / "anndata.h5")
    back = io.read(tmp_path / "anndata.h5")
    assert_same_counts(back, counts)
    assert "label" in back.obs


@pytest.mark.parametrize("label_dtype", [np.int32, np.float64])
def test_xy_h5_roundtrip(counts, tmp_path, label_dtype):
    y = counts.obs["label"].astype(int).to_numpy().astype(label_dtype)
    write_xy_h5(tmp_path / "xy.h5", dense(counts), y)
    back = io.read(tmp_path / "xy.h5")
    assert_same_counts(back, counts, names=False)
    assert back.obs_names.is_unique and back.var_names.is_unique
    assert isinstance(back.obs["label"].dtype, pd.CategoricalDtype)
    assert list(back.obs["label"]) == list(counts.obs["label"])  # "2", never "2.0"


def test_xy_h5_labels_key_and_no_labels(counts, tmp_path):
    write_xy_h5(tmp_path / "xy.h5", dense(counts).astype(np.int64), counts.obs["label"].astype(int).to_numpy())
    back = io.read(tmp_path / "xy.h5", labels_key="truth")
    assert "truth" in back.obs and "label" not in back.obs
    write_xy_h5(tmp_path / "nolabels.h5", dense(counts))
    back = io.read(tmp_path / "nolabels.h5")
    assert_same_counts(back, counts, names=False)
    assert back.obs.columns.empty


def test_10x_v3_roundtrip(counts, tmp_path):
    write_10x_v3(tmp_path / "filtered_feature_bc_matrix.h5", counts)
    back = io.read(tmp_path / "filtered_feature_bc_matrix.h5")
    assert_same_counts(back, counts)
    assert back.var["gene_ids"].iloc[3] == "ENSG00000000003"
    by_id = io.read(tmp_path / "filtered_feature_bc_matrix.h5", var_names_col="gene_ids")
    assert by_id.var_names[3] == "ENSG00000000003"


def test_10x_v3_keeps_gene_expression_only(counts, tmp_path):
    types = ["Gene Expression"] * (counts.n_vars - 2) + ["Antibody Capture"] * 2
    write_10x_v3(tmp_path / "tenx.h5", counts, feature_types=types)
    back = io.read(tmp_path / "tenx.h5")
    assert_same_counts(back, counts[:, : counts.n_vars - 2])


def test_10x_v2_roundtrip(counts, tmp_path):
    write_10x_v2(tmp_path / "v2.h5", counts)
    assert_same_counts(io.read(tmp_path / "v2.h5"), counts)
    assert_same_counts(io.read(tmp_path / "v2.h5", format="10x_h5"), counts)


def test_mtx_dir_roundtrip(counts, tmp_path):
    write_mtx_dir(tmp_path / "filtered", counts)
    back = io.read(tmp_path / "filtered")
    assert_same_counts(back, counts)
    assert back.var["gene_ids"].iloc[0] == "ENSG00000000000"


def test_mtx_file_path_plain_genes_tsv(counts, tmp_path):
    write_mtx_dir(tmp_path / "v2", counts, gz=False, features="genes.tsv")
    assert_same_counts(io.read(tmp_path / "v2" / "matrix.mtx"), counts)


def test_mtx_with_geo_prefix(counts, tmp_path):
    write_mtx_dir(tmp_path / "geo", counts, prefix="GSM123_")
    assert_same_counts(io.read(tmp_path / "geo"), counts)
    assert_same_counts(io.read(tmp_path / "geo" / "GSM123_matrix.mtx.gz"), counts)


@pytest.mark.parametrize("name,sep", [("t.csv", ","), ("t.tsv.gz", "\t"), ("t.txt", "\t")])
@pytest.mark.parametrize("transpose", [False, True])
def test_table_roundtrip_both_orientations(counts, tmp_path, name, sep, transpose):
    df = pd.DataFrame(dense(counts).astype(int), index=counts.obs_names, columns=counts.var_names)
    (df.T if transpose else df).to_csv(tmp_path / name, sep=sep)
    back = io.read(tmp_path / name, transpose=transpose)
    assert_same_counts(back, counts)


def test_format_override_and_hdf5_without_extension(counts, tmp_path):
    df = pd.DataFrame(dense(counts), index=counts.obs_names, columns=counts.var_names)
    df.to_csv(tmp_path / "counts.dat")
    assert_same_counts(io.read(tmp_path / "counts.dat", format="csv"), counts)
    write_xy_h5(tmp_path / "noext", dense(counts))
    assert_same_counts(io.read(tmp_path / "noext"), counts, names=False)


def test_duplicated_names_are_made_unique_with_a_warning(counts, tmp_path):
    counts.var_names = ["Dup", "Dup"] + list(counts.var_names[2:])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        counts.write_h5ad(tmp_path / "dup.h5ad")
    with pytest.warns(UserWarning, match=r"dup\.h5ad: 1 duplicated gene names"):
        back = io.read(tmp_path / "dup.h5ad")
    assert back.var_names.is_unique and list(back.var_names[:2]) == ["Dup", "Dup-1"]


# ----------------------------------------------------------------------------- real data
@pytest.mark.parametrize("name,shape,n_types", [("10X_PBMC_top2000.h5", (4271, 2000), 8),
                                                ("mouse_bladder_cell_top2000.h5", (2746, 2003), 16)])
def test_real_xy_files(shared_data, name, shape, n_types):
    a = io.read(shared_data / name)
    assert a.shape == shape and isinstance(a.X, sp.csr_matrix) and a.X.dtype == np.float32
    assert a.obs["label"].cat.categories.size == n_types
    assert all(c.isdigit() for c in a.obs["label"].cat.categories)
    with h5py.File(shared_data / name, "r") as f:  # same values as the file, row by row
        np.testing.assert_array_equal(a.X[:5].toarray(), f["X"][:5])


def test_real_h5ad_keeps_cell_type(shared_data):
    a = io.read(shared_data / "baron_mouse_1886x14878.h5ad")
    assert a.shape == (1886, 14878) and isinstance(a.X, sp.csr_matrix) and a.X.dtype == np.float32
    assert "cell_type" in a.obs and a.obs["cell_type"].nunique() == 13


def test_file_md5_matches_md5sums(shared_data):
    sums = {name: digest for digest, name in
            (line.split() for line in (shared_data / "MD5SUMS").read_text().splitlines() if line.strip())}
    assert io.file_md5(shared_data / "mouse_bladder_cell_top2000.h5") == sums["mouse_bladder_cell_top2000.h5"]


def test_bundled_pbmc():
    a = io.read_bundled_pbmc()
    assert a.n_obs == 4271 and a.n_vars == 2000 and a.obs["label"].nunique() == 8
    assert io.bundled_pbmc_path().name == "10X_PBMC_top2000.h5"


def test_bundled_pbmc_is_the_shared_file(shared_data):
    assert io.file_md5(io.bundled_pbmc_path()) == io.file_md5(shared_data / "10X_PBMC_top2000.h5")


# ----------------------------------------------------------------------------- bad inputs
def raises_one_line(match, func, *args, exc=InputError, **kwargs):
    with pytest.raises(exc, match=match) as info:
        func(*args, **kwargs)
    assert "\n" not in str(info.value)
    assert info.value.__cause__ is None  # no chained h5py/pandas traceback
    return info.value


def test_missing_path(tmp_path):
    raises_one_line(r"missing\.h5ad: no such file", io.read, tmp_path / "missing.h5ad")


def test_truncated_h5(tmp_path, shared_data):
    trunc = tmp_path / "trunc.h5"
    trunc.write_bytes((shared_data / "10X_PBMC_top2000.h5").read_bytes()[:1000])
    raises_one_line(r"trunc\.h5: not a readable HDF5", io.read, trunc)
    raises_one_line(r"trunc\.h5: cannot be read as xy_h5", io.read, trunc, format="xy_h5")


def test_truncated_h5ad(tmp_path, shared_data):
    trunc = tmp_path / "trunc.h5ad"
    trunc.write_bytes((shared_data / "baron_mouse_1886x14878.h5ad").read_bytes()[:1000])
    raises_one_line(r"trunc\.h5ad: cannot be read as h5ad", io.read, trunc)


def test_text_file_named_h5(tmp_path):
    (tmp_path / "text.h5").write_text("gene,cell1\nA,1\n")
    raises_one_line(r"text\.h5: not a readable HDF5", io.read, tmp_path / "text.h5")


def test_h5_without_x_names_what_was_found(tmp_path):
    with h5py.File(tmp_path / "noX.h5", "w") as f:
        f["Y"] = np.arange(3)
        f["counts"] = np.ones((3, 2))
    raises_one_line(r"noX\.h5: .*found: \['Y', 'counts'\]", io.read, tmp_path / "noX.h5")
    raises_one_line(r"noX\.h5: HDF5 file has no dataset 'X'", io.read, tmp_path / "noX.h5", format="xy_h5")


def test_unknown_extension_and_format(tmp_path):
    (tmp_path / "data.xyz").write_text("1")
    raises_one_line(r"data\.xyz: cannot tell the format .*format=", io.read, tmp_path / "data.xyz")
    raises_one_line(r"unknown format 'loom'", io.read, tmp_path / "data.xyz", format="loom", exc=ParameterError)


def test_transpose_only_for_tables(counts, tmp_path):
    counts.write_h5ad(tmp_path / "a.h5ad")
    raises_one_line("csv/tsv", io.read, tmp_path / "a.h5ad", transpose=True, exc=ParameterError)


@pytest.mark.parametrize("value,match", [(np.nan, r"bad\.h5: the matrix has 1 NaN and 0 infinite"),
                                         (np.inf, r"bad\.h5: the matrix has 0 NaN and 1 infinite"),
                                         (-1.0, r"bad\.h5: the matrix has 1 negative values")])
def test_nan_inf_negative_values(tmp_path, value, match):
    x = np.ones((5, 4), np.float32)
    x[2, 1] = value
    write_xy_h5(tmp_path / "bad.h5", x)
    raises_one_line(match, io.read, tmp_path / "bad.h5")


def test_nan_in_csv(counts, tmp_path):
    df = pd.DataFrame(dense(counts), index=counts.obs_names, columns=counts.var_names)
    df.iloc[3, 4] = np.nan
    df.to_csv(tmp_path / "nan.csv")
    raises_one_line(r"nan\.csv: the matrix has 1 NaN", io.read, tmp_path / "nan.csv")


def test_non_numeric_csv_names_the_column(tmp_path):
    (tmp_path / "words.csv").write_text("cell,A,B\nc1,1,x\nc2,2,3\n")
    raises_one_line(r"words\.csv: table has non-numeric values in column 'B'", io.read, tmp_path / "words.csv")


@pytest.mark.parametrize("shape", [(0, 4), (4, 0)])
def test_empty_matrix(tmp_path, shape):
    write_xy_h5(tmp_path / "empty.h5", np.zeros(shape, np.float32))
    raises_one_line(r"empty\.h5: the matrix is empty", io.read, tmp_path / "empty.h5")


def test_xy_labels_length_mismatch(tmp_path):
    write_xy_h5(tmp_path / "y.h5", np.ones((5, 3)), np.arange(4))
    raises_one_line(r"y\.h5: dataset 'Y' has 4 labels for 5 cells", io.read, tmp_path / "y.h5")


def test_mtx_missing_barcodes(counts, tmp_path):
    write_mtx_dir(tmp_path / "m", counts)
    (tmp_path / "m" / "barcodes.tsv.gz").unlink()
    raises_one_line(r"m: Matrix Market directory has no barcodes", io.read, tmp_path / "m")


def test_mtx_shape_mismatch(counts, tmp_path):
    write_mtx_dir(tmp_path / "m", counts)
    with gzip.open(tmp_path / "m" / "barcodes.tsv.gz", "wt") as f:
        f.write("only\ntwo\n")
    raises_one_line(r"matrix\.mtx\.gz: matrix is 30 x 50 but barcodes\.tsv\.gz lists 2 cells", io.read,
                    tmp_path / "m")


def test_10x_shape_mismatch(counts, tmp_path):
    write_10x_v3(tmp_path / "tenx.h5", counts)
    with h5py.File(tmp_path / "tenx.h5", "a") as f:
        del f["matrix/barcodes"]
        f["matrix/barcodes"] = np.array([b"x"] * 3)
    raises_one_line(r"tenx\.h5: 10x group '/matrix' has shape 30 genes x 50 cells but 3 barcodes", io.read,
                    tmp_path / "tenx.h5")


def test_10x_missing_features(counts, tmp_path):
    write_10x_v3(tmp_path / "tenx.h5", counts)
    with h5py.File(tmp_path / "tenx.h5", "a") as f:
        del f["matrix/features/name"]
    raises_one_line(r"tenx\.h5: 10x group '/matrix' lacks \['features/name'\]", io.read, tmp_path / "tenx.h5")


def test_missing_var_names_col(counts, tmp_path):
    counts.write_h5ad(tmp_path / "a.h5ad")
    raises_one_line(r"a\.h5ad: var_names_col 'symbol' is not a var column", io.read, tmp_path / "a.h5ad",
                    var_names_col="symbol")


# ----------------------------------------------------------------------------- writers
def test_write_h5ad_refuses_existing_and_overwrites_on_request(counts, tmp_path):
    path = io.write_h5ad(counts, tmp_path / "out" / "r.h5ad")  # parent folder is created
    assert path == tmp_path / "out" / "r.h5ad"
    raises_one_line(r"r\.h5ad already exists; pass overwrite=True", io.write_h5ad, counts, path,
                    exc=OutputExistsError)
    counts.obs["extra"] = "x"
    io.write_h5ad(counts, path, overwrite=True)
    assert "extra" in ad.read_h5ad(path).obs
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["r.h5ad"]


def test_write_h5ad_failure_leaves_no_temp_and_keeps_old_file(counts, tmp_path, monkeypatch):
    path = io.write_h5ad(counts, tmp_path / "r.h5ad")
    before = io.file_md5(path)

    def broken_write(self, filename, *args, **kwargs):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(ad.AnnData, "write_h5ad", broken_write)
    with pytest.raises(OSError, match="disk full"):
        io.write_h5ad(counts, path, overwrite=True)
    with pytest.raises(OSError, match="disk full"):
        io.write_h5ad(counts, tmp_path / "new.h5ad")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.h5ad"]
    assert io.file_md5(path) == before


def test_write_h5ad_makes_obs_and_uns_writable_without_changing_input(counts, tmp_path):
    counts.obs["mixed"] = [1, "a", 2.5, None, True] * 10
    counts.uns["params"] = {"shape": (50, 30), "path": tmp_path, 3: "int key", "mixed": [1, "a"]}
    counts.uns["history"] = [{"step": 1}, {"step": 2}]
    counts.layers["counts"] = counts.X.copy()
    with pytest.warns(UserWarning, match=r"uns\['obj'\]: object cannot be stored"):
        counts.uns["obj"] = object()
        io.write_h5ad(counts, tmp_path / "s.h5ad")
    back = ad.read_h5ad(tmp_path / "s.h5ad")
    assert list(back.obs["mixed"][:3]) == ["1", "a", "2.5"] and pd.isna(back.obs["mixed"].iloc[3])
    assert list(back.uns["params"]["shape"]) == [50, 30] and back.uns["params"]["path"] == str(tmp_path)
    assert back.uns["params"]["3"] == "int key" and list(back.uns["params"]["mixed"]) == ["1", "a"]
    assert back.uns["history"]["1"]["step"] == 2
    np.testing.assert_array_equal(back.layers["counts"].toarray(), dense(counts))
    assert counts.uns["params"]["shape"] == (50, 30) and counts.obs["mixed"].iloc[0] == 1  # input untouched


def test_write_text_atomic(tmp_path):
    path = io.write_text_atomic(tmp_path / "m.json", '{"ari": 0.9}\n')
    assert path.read_text() == '{"ari": 0.9}\n'
    raises_one_line("already exists", io.write_text_atomic, path, "x", exc=OutputExistsError)
    io.write_text_atomic(path, "ünïcode\n", overwrite=True)
    assert path.read_text(encoding="utf-8") == "ünïcode\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json"]


def test_file_md5_streams_large_files(tmp_path):
    import hashlib

    payload = np.random.default_rng(0).bytes(3 * (1 << 20) + 17)  # spans several 1 MiB blocks
    (tmp_path / "blob").write_bytes(payload)
    assert io.file_md5(tmp_path / "blob") == hashlib.md5(payload).hexdigest()
