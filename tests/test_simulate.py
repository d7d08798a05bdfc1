"""The reference-fitted count simulator (issue 4): fitted parameters, reproducibility, chunked writing."""

import anndata as ad
import h5py
import numpy as np
import pytest
import scipy.sparse as sp

from schashformer import io
from schashformer.datasets import fit_reference, simulate
from schashformer.errors import OutputExistsError, ParameterError


@pytest.fixture(scope="module")
def pbmc_small():
    a = io.read_bundled_pbmc()
    rows = np.random.default_rng(0).choice(a.n_obs, 1200, replace=False)
    return a[np.sort(rows)].copy()


@pytest.fixture(scope="module")
def params(pbmc_small):
    return fit_reference(pbmc_small, "label", name="PBMC-1200")


def test_fitted_parameters(params, pbmc_small):
    k, g = params.proportions.shape
    assert k == pbmc_small.obs["label"].nunique() and g == pbmc_small.n_vars
    assert np.allclose(params.proportions.sum(1), 1.0, atol=1e-3)
    assert np.isclose(params.type_freq.sum(), 1.0) and (params.theta > 0).all()
    assert ((params.mix_weights >= 0) & (params.mix_weights <= 0.5)).all()
    assert np.allclose(params.mix_partner.sum(1), 1.0) and np.allclose(np.diag(params.mix_partner), 0.0)


def test_simulated_counts_look_like_the_reference(params, pbmc_small):
    sim = simulate(3000, like=params, seed=1)
    x = sim.X
    assert sp.issparse(x) and x.dtype == np.float32 and sim.shape == (3000, pbmc_small.n_vars)
    assert np.array_equal(x.data, np.round(x.data)) and (x.data > 0).all()
    ref_lib = np.median(np.asarray(pbmc_small.X.sum(1)).ravel())
    sim_lib = np.median(np.asarray(x.sum(1)).ravel())
    assert abs(sim_lib / ref_lib - 1) < 0.2, (sim_lib, ref_lib)
    ref_density = pbmc_small.X.nnz / np.prod(pbmc_small.shape)
    assert abs(x.nnz / np.prod(sim.shape) / ref_density - 1) < 0.25
    assert set(sim.obs["cell_type"].cat.categories) == set(params.type_names)


def test_seeded_and_prefix_consistent(params):
    a = simulate(700, like=params, seed=3, chunk_cells=256)
    b = simulate(700, like=params, seed=3, chunk_cells=256)
    c = simulate(512, like=params, seed=3, chunk_cells=256)  # whole chunks: a prefix
    d = simulate(700, like=params, seed=4, chunk_cells=256)
    assert (a.X != b.X).nnz == 0
    assert (a.X[:512] != c.X).nnz == 0 and np.array_equal(a.obs["cell_type"][:512], c.obs["cell_type"])
    assert (a.X != d.X).nnz > 0


def test_written_in_chunks_equals_in_memory(params, tmp_path):
    path = simulate(600, like=params, seed=2, out=tmp_path / "sim.h5ad", chunk_cells=128)
    mem = simulate(600, like=params, seed=2, chunk_cells=128)
    disk = ad.read_h5ad(path)
    assert (disk.X != mem.X).nnz == 0 and sp.issparse(disk.X)
    assert np.array_equal(disk.obs["cell_type"].astype(str), mem.obs["cell_type"].astype(str))
    assert list(disk.var_names) == list(mem.var_names)
    with pytest.raises(OutputExistsError):
        simulate(10, like=params, out=path)
    with pytest.raises(ParameterError):
        simulate(0, like=params)


def test_parallel_workers_write_the_same_file(params, tmp_path):
    one = simulate(700, like=params, seed=5, out=tmp_path / "one.h5ad", chunk_cells=128, workers=1)
    two = simulate(700, like=params, seed=5, out=tmp_path / "two.h5ad", chunk_cells=128, workers=2)
    a, b = ad.read_h5ad(one), ad.read_h5ad(two)
    assert a.X.nnz > 0 and (a.X != b.X).nnz == 0
    assert np.array_equal(a.obs["cell_type"].astype(str), b.obs["cell_type"].astype(str))
    with h5py.File(two) as f:  # room for more than 2^31 non-zeros (10^7 cells)
        assert f["X/indptr"].dtype == np.int64
    with pytest.raises(ParameterError, match="workers"):
        simulate(10, like=params, workers=0)


def test_unequal_types_are_unequal_shallow_and_modestly_different():
    from schashformer.datasets import unequal_types

    adata = simulate(20_000, like="unequal", seed=1)
    sizes = adata.obs["cell_type"].value_counts()
    assert len(sizes) == 10 and 30 < sizes.max() / sizes.min() < 90  # size_ratio 50, sampling noise
    depth = np.median(np.asarray(adata.X.sum(1)).ravel())
    assert 1000 < depth < 2200  # log-normal around 1,500 counts
    params = unequal_types(seed=1)
    log_ratio = np.log(params.proportions / params.proportions[0])  # type t vs type 0, per gene
    log_ratio -= np.median(log_ratio, axis=1, keepdims=True)  # the normalisation shifts every gene alike
    changed = np.abs(log_ratio) > 1e-4
    assert 0.15 <= changed[1:].mean() <= 0.22  # each pair differs on its two 10% DE sets, minus overlap
    assert np.median(np.abs(log_ratio[1][changed[1]])) < 1.5  # modest folds
    with pytest.raises(ParameterError, match="size_ratio"):
        unequal_types(size_ratio=0.5)


def test_simulate_cli_writes_the_unequal_reference(tmp_path):
    from schashformer.cli import main

    out = tmp_path / "u.h5ad"
    assert main(["simulate", "--cells", "500", "--like", "unequal", "--out", str(out), "--quiet"]) == 0
    adata = ad.read_h5ad(out)
    assert adata.shape == (500, 2000) and adata.obs["cell_type"].nunique() >= 8
