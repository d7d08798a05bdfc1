from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.metrics import adjusted_rand_score

from schashformer.baselines import pca_kmeans, scanpy_leiden
from schashformer.errors import ParameterError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def read_labeled_h5(path: Path) -> tuple[ad.AnnData, np.ndarray]:
    """AnnData with CSR float32 counts from an HDF5 file holding ``X`` (cells x genes) and ``Y`` (labels)."""
    h5py = pytest.importorskip("h5py")
    with h5py.File(path, "r") as f:
        X = sp.csr_matrix(np.asarray(f["X"], dtype=np.float32))
        y = np.asarray(f["Y"])
    return ad.AnnData(X), y


def poisson_blobs(n_cells=300, n_genes=100, n_types=3, seed=0) -> tuple[ad.AnnData, np.ndarray]:
    """Three well-separated Poisson types: each has its own block of 20 highly expressed genes."""
    rng = np.random.default_rng(seed)
    types = np.repeat(np.arange(n_types), n_cells // n_types)
    rates = np.full((n_types, n_genes), 1.0)
    for t in range(n_types):
        rates[t, t * 20:(t + 1) * 20] = 10.0
    counts = rng.poisson(rates[types]).astype(np.float32)
    return ad.AnnData(sp.csr_matrix(counts)), types


@pytest.fixture(scope="module")
def pbmc():
    path = DATA / "10X_PBMC_top2000.h5"
    if not path.exists():
        pytest.skip(f"shared data not found at {path}")
    return read_labeled_h5(path)


@pytest.mark.slow  # the slowest fast-lane test (fast lane under 5 minutes)
def test_both_baselines_recover_simulated_blobs():
    adata, types = poisson_blobs()
    before = adata.X.copy()
    labels, info = scanpy_leiden(adata, n_clusters=3, seed=0)
    assert info["n_clusters_found"] == 3 and labels.shape == (300,)
    assert adjusted_rand_score(types, labels) > 0.9
    for key in ("time_preprocess", "time_pca", "time_neighbors", "time_leiden", "resolution"):
        assert info[key] >= 0
    labels, info = pca_kmeans(adata, 3, seed=0)
    assert adjusted_rand_score(types, labels) > 0.9 and "time_kmeans" in info
    assert (adata.X != before).nnz == 0  # the input is not modified


def test_leiden_dense_unscaled_and_default_resolution():
    adata, types = poisson_blobs(seed=1)
    adata.X = adata.X.toarray()
    labels, info = scanpy_leiden(adata, seed=0, scale=False)
    assert info["resolution"] == 1.0 and info["n_clusters_found"] == labels.max() + 1 >= 3
    assert adjusted_rand_score(types, labels) > 0.5


def test_one_graph_serves_both_leiden_runs_exactly():
    """The quality benchmark clusters one neighbour graph at resolution 1.0 and at K: the labels equal
    two separate scanpy_leiden runs."""
    from schashformer.baselines.scanpy_pipeline import leiden_on_graph, neighbour_graph

    adata, _ = poisson_blobs(n_types=5, n_cells=300, n_genes=120, seed=3)
    a, info = neighbour_graph(adata, seed=0)
    assert a.n_obs == 300 and "connectivities" in a.obsp and info["time_neighbors"] >= 0
    for n_clusters in (None, 4):
        shared, resolution, _ = leiden_on_graph(a, n_clusters, resolution=1.0, seed=0)
        alone, alone_info = scanpy_leiden(adata, n_clusters, resolution=1.0, seed=0)
        np.testing.assert_array_equal(shared, alone)
        assert resolution == alone_info["resolution"]


def test_bad_parameters_raise():
    adata, _ = poisson_blobs(n_cells=30)
    with pytest.raises(ParameterError, match="n_clusters"):
        scanpy_leiden(adata, n_clusters=0)
    with pytest.raises(ParameterError, match="n_clusters"):
        pca_kmeans(adata, 31)


def test_scanpy_leiden_on_pbmc(pbmc):
    adata, y = pbmc
    labels, info = scanpy_leiden(adata, n_clusters=8, seed=0)
    assert info["n_clusters_found"] == 8 and len(np.unique(labels)) == 8
    assert adjusted_rand_score(y, labels) >= 0.65


def test_pca_kmeans_on_pbmc(pbmc):
    adata, y = pbmc
    labels, _ = pca_kmeans(adata, 8, seed=0)
    assert adjusted_rand_score(y, labels) >= 0.5
