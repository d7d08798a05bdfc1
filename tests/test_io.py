import gzip

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp

from schashformer import io
from schashformer.errors import InputError, OutputExistsError


def _dense(a):
    return a.X.toarray()


def _write_xy(path, counts, labels=None):
    with h5py.File(path, "w") as f:
        f["X"] = counts
        if labels is not None:
            f["Y"] = labels


def test_h5ad_roundtrip(sim, tmp_path):
    sim.write_h5ad(tmp_path / "a.h5ad")
    back = io.read(tmp_path / "a.h5ad")
    assert np.array_equal(_dense(back), _dense(sim))
    assert list(back.obs_names) == list(sim.obs_names) and list(back.obs["label"]) == list(sim.obs["label"])


def test_xy_h5_roundtrip(sim, tmp_path):
    _write_xy(tmp_path / "a.h5", _dense(sim), sim.obs["label"].astype(int).to_numpy().astype(float))
    back = io.read(tmp_path / "a.h5")
    assert np.array_equal(_dense(back), _dense(sim))
    assert list(back.obs["label"]) == list(sim.obs["label"])  # "2", not "2.0"


def test_10x_h5_roundtrip(sim, tmp_path):
    m = sp.csc_matrix(_dense(sim).T.astype(np.int32))  # genes x cells, CSC of that = CSR of cells
    with h5py.File(tmp_path / "tenx.h5", "w") as f:
        g = f.create_group("matrix")
        g["data"], g["indices"], g["indptr"], g["shape"] = m.data, m.indices, m.indptr, m.shape
        g["barcodes"] = np.array(sim.obs_names, dtype="S")
        feats = g.create_group("features")
        feats["name"] = np.array(sim.var_names, dtype="S")
        feats["id"] = np.array([f"ENSG{j}" for j in range(sim.n_vars)], dtype="S")
    back = io.read(tmp_path / "tenx.h5")
    assert np.array_equal(_dense(back), _dense(sim))
    assert list(back.var_names) == list(sim.var_names) and list(back.obs_names) == list(sim.obs_names)


def test_mtx_dir_roundtrip(sim, tmp_path):
    d = tmp_path / "mtx"
    d.mkdir()
    scipy.io.mmwrite(d / "matrix.mtx", sp.coo_matrix(_dense(sim).T))
    with gzip.open(d / "barcodes.tsv.gz", "wt") as f:
        f.write("\n".join(sim.obs_names) + "\n")
    with gzip.open(d / "features.tsv.gz", "wt") as f:
        f.write("\n".join(f"ENSG{j}\t{g}\tGene Expression" for j, g in enumerate(sim.var_names)) + "\n")
    back = io.read(d)
    assert back.shape == sim.shape and np.array_equal(_dense(back), _dense(sim))
    assert list(back.var_names) == list(sim.var_names)


@pytest.mark.parametrize("ext,sep,transpose", [("csv", ",", False), ("tsv.gz", "\t", True)])
def test_table_roundtrip(sim, tmp_path, ext, sep, transpose):
    df = pd.DataFrame(_dense(sim), index=sim.obs_names, columns=sim.var_names)
    path = tmp_path / f"t.{ext}"
    (df.T if transpose else df).to_csv(path, sep=sep)
    back = io.read(path, transpose=transpose)
    assert np.array_equal(_dense(back), _dense(sim)) and list(back.obs_names) == list(sim.obs_names)


@pytest.mark.parametrize("name,shape,n_types", [("10X_PBMC_top2000.h5", (4271, 2000), 8),
                                                ("mouse_bladder_cell_top2000.h5", (2746, 2003), 16)])
def test_real_xy_files(shared_data, name, shape, n_types):
    a = io.read(shared_data / name)
    assert a.shape == shape and a.obs["label"].nunique() == n_types and sp.isspmatrix_csr(a.X)


def test_real_h5ad_and_checksum(shared_data):
    a = io.read(shared_data / "baron_mouse_1886x14878.h5ad")
    assert a.shape == (1886, 14878) and a.obs["cell_type"].nunique() == 13
    sums = dict(line.split()[::-1] for line in (shared_data / "MD5SUMS").read_text().splitlines() if line.strip())
    assert io.file_md5(shared_data / "10X_PBMC_top2000.h5") == sums["10X_PBMC_top2000.h5"]


def test_bundled_pbmc_matches_shared_copy(shared_data):
    a = io.read_bundled_pbmc()
    assert a.shape == (4271, 2000) and a.obs["label"].nunique() == 8
    assert io.file_md5(io.bundled_pbmc_path()) == io.file_md5(shared_data / "10X_PBMC_top2000.h5")


def test_bad_files(tmp_path, shared_data):
    with pytest.raises(InputError, match="no such file"):
        io.read(tmp_path / "missing.h5ad")
    trunc = tmp_path / "trunc.h5"
    trunc.write_bytes((shared_data / "10X_PBMC_top2000.h5").read_bytes()[:1000])
    with pytest.raises(InputError, match="trunc.h5"):
        io.read(trunc)
    text = tmp_path / "text.h5"
    text.write_text("not hdf5")
    with pytest.raises(InputError, match="text.h5"):
        io.read(text)
    with h5py.File(tmp_path / "noX.h5", "w") as f:
        f["Y"] = np.arange(3)
    with pytest.raises(InputError, match="noX.h5"):
        io.read(tmp_path / "noX.h5")
    (tmp_path / "data.xyz").write_text("1")
    with pytest.raises(InputError, match="format"):
        io.read(tmp_path / "data.xyz")


@pytest.mark.parametrize("value,match", [(np.nan, "NaN"), (-1.0, "negative")])
def test_bad_values(tmp_path, value, match):
    x = np.ones((5, 4), np.float32)
    x[2, 1] = value
    _write_xy(tmp_path / "bad.h5", x)
    with pytest.raises(InputError, match=match):
        io.read(tmp_path / "bad.h5")


def test_empty_matrix(tmp_path):
    _write_xy(tmp_path / "empty.h5", np.zeros((0, 4), np.float32))
    with pytest.raises(InputError, match="empty"):
        io.read(tmp_path / "empty.h5")


def test_duplicate_names_made_unique(sim, tmp_path):
    sim.var_names = ["g0"] * 2 + list(sim.var_names[2:])
    sim.write_h5ad(tmp_path / "dup.h5ad")
    with pytest.warns(UserWarning, match="duplicated gene names"):
        back = io.read(tmp_path / "dup.h5ad")
    assert back.var_names.is_unique


def test_write_refuses_existing_and_leaves_no_temp(sim, tmp_path):
    path = tmp_path / "r.h5ad"
    io.write_h5ad(sim, path)
    with pytest.raises(OutputExistsError, match="overwrite"):
        io.write_h5ad(sim, path)
    io.write_h5ad(sim, path, overwrite=True)
    bad = sim.copy()
    bad.uns["unwritable"] = object()
    with pytest.raises(Exception):
        io.write_h5ad(bad, tmp_path / "x.h5ad")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.h5ad"]
