"""At home in a scanpy workflow: after tl.cluster, scanpy's tools and plots run on the stored hash graph.

No neighbour search happens after tl.cluster: ``sc.pp.neighbors`` and scanpy's kNN search are
replaced by functions that fail for the whole test.
"""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import scanpy as sc  # noqa: E402
from sklearn.metrics import adjusted_rand_score  # noqa: E402

import schashformer as shf  # noqa: E402
from tests.conftest import FAST, simulate_counts  # noqa: E402

NK = "schashformer_neighbors"


SEEN = {}  # what the fit left of the caller's random state and its log


@pytest.fixture(scope="module")
def clustered():
    """scanpy's usual layout: raw counts in layers["counts"], log-normalised X; clustered with no layer=."""
    import logging

    import torch

    adata = simulate_counts(n_cells=300, seed=21)
    adata.layers["counts"] = adata.X.copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    np.random.seed(123)
    torch.manual_seed(123)
    np_before, torch_before = np.random.get_state()[1].copy(), torch.get_rng_state().clone()
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("schashformer")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        shf.tl.cluster(adata, 3, labels_key="label", progress=False, **FAST)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    SEEN.update(numpy=np.array_equal(np.random.get_state()[1], np_before),
                torch=torch.equal(torch.get_rng_state(), torch_before),
                log=[r.getMessage() for r in records])
    return adata


def test_counts_layer_is_found_and_global_random_state_is_kept(clustered):
    from schashformer.record import data_checksum
    from schashformer.preprocess import count_matrix

    rec = clustered.uns["schashformer"]
    assert rec["checksum_of"] == "layers['counts']"
    assert rec["data_checksum"] == data_checksum(count_matrix(clustered, "counts"))
    assert any("using adata.layers['counts']" in m for m in SEEN["log"]), SEEN["log"]
    assert any("fitting on cpu" in m for m in SEEN["log"]), SEEN["log"]  # the device is logged
    assert SEEN["numpy"] and SEEN["torch"]  # the caller's generators are as they were


@pytest.fixture
def no_search(monkeypatch):
    """Any neighbour search from here on fails the test."""
    import scanpy.neighbors

    def fail(*args, **kwargs):
        raise AssertionError("a neighbour search ran")

    monkeypatch.setattr(sc.pp, "neighbors", fail)
    monkeypatch.setattr(scanpy.neighbors.Neighbors, "compute_neighbors", fail)


def test_graph_is_in_scanpys_layout_and_close_to_exact_knn(clustered):
    a = clustered
    assert a.uns["schashformer"]["params"]["neighbors_key"] == NK
    graph = a.uns[NK]
    assert graph["connectivities_key"] == f"{NK}_connectivities" and graph["distances_key"] == f"{NK}_distances"
    assert graph["params"]["use_rep"] == "X_schashformer" and graph["params"]["n_neighbors"] == 15
    assert graph["params"]["knn"] == "hash" and graph["params"]["method"] == "gauss"
    d = a.obsp[f"{NK}_distances"].tocsr()
    conn = a.obsp[f"{NK}_connectivities"]
    assert d.shape == conn.shape == (a.n_obs, a.n_obs) and (d.getnnz(1) == 14).all()
    assert abs(conn - conn.T).max() < 1e-6  # symmetric weights, as scanpy's
    z = a.obsm["X_schashformer"]
    rows, cols = d.nonzero()
    np.testing.assert_allclose(d[rows, cols].A1, np.linalg.norm(z[rows] - z[cols], axis=1), rtol=1e-4, atol=1e-4)
    # the hash neighbours are mostly the true nearest neighbours (recall against an exact search)
    full = ((z[:, None, :] - z[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(full, np.inf)
    exact = np.argsort(full, axis=1)[:, :14]
    recall = np.mean([len(set(exact[i]) & set(d[i].indices)) / 14 for i in range(a.n_obs)])
    assert recall > 0.6, recall
    # the graph's candidate chunks are graph_chunk's, not the attention's chunk_size
    params = a.uns["schashformer"]["params"]
    assert params["graph_chunk"] != params["chunk_size"]
    assert graph["params"]["chunk_size"] == params["graph_chunk"]


def test_hash_neighbors_reads_an_older_record_chunk_size(clustered):
    a = clustered.copy()
    del a.uns["schashformer"]["params"]["graph_chunk"]  # a record written before graph_chunk existed
    a.uns["schashformer"]["params"]["chunk_size"] = 12
    shf.tl.hash_neighbors(a, key_added="old_graph")
    assert a.uns["old_graph"]["params"]["chunk_size"] == 12
    assert (a.obsp["old_graph_distances"].getnnz(1) == 14).all()


def test_scanpy_tools_and_plots_without_a_neighbour_search(clustered, no_search, tmp_path):
    a = clustered.copy()
    sc.tl.umap(a, neighbors_key=NK, random_state=0)
    assert a.obsm["X_umap"].shape == (a.n_obs, 2) and np.isfinite(a.obsm["X_umap"]).all()
    sc.tl.leiden(a, neighbors_key=NK, flavor="igraph", n_iterations=2, directed=False, random_state=0)
    assert adjusted_rand_score(a.obs["label"], a.obs["leiden"]) > 0.8
    ax = sc.pl.umap(a, color="schashformer", show=False)
    assert ax.get_title() == "schashformer" and len(ax.collections) >= 1

    shf.tl.trajectory(a, "0", umap=False)
    assert a.uns["trajectory"]["neighbors_key"] == NK  # the stored hash graph, not a new one
    assert a.uns["paga"]["groups"] == "schashformer"
    n = a.obs["schashformer"].cat.categories.size
    assert a.uns["paga"]["connectivities"].shape == (n, n) and a.uns["paga"]["pos"].shape == (n, 2)
    assert np.nanmin(a.obs["dpt_pseudotime"]) == 0 and a.obs["dpt_pseudotime"].iloc[a.uns["iroot"]] == 0
    ax = sc.pl.paga(a, show=False)
    assert ax is not None
    sc.pl.paga(a, show=False, save=False)
    fig = shf.pl.trajectory(a, color="label", save=tmp_path / "t.png")
    assert len(fig.axes) >= 3 and (tmp_path / "t.png").stat().st_size > 5000


def test_pl_embedding_computes_the_umap_once_and_draws_into_given_axes(clustered, no_search, monkeypatch):
    a = clustered.copy()
    assert "X_schashformer_umap" not in a.obsm
    shf.pl.embedding(a, "label", show=False)
    first = a.obsm["X_schashformer_umap"].copy()

    def no_umap(*args, **kwargs):
        raise AssertionError("UMAP recomputed")

    monkeypatch.setattr(sc.tl, "umap", no_umap)
    fig, axes = plt.subplots(1, 2)
    out = shf.pl.embedding(a, ["schashformer", "label"], ax=axes, show=False)
    assert out is fig and [ax.get_title().split(" ")[0] for ax in axes] == ["schashformer", "label"]
    np.testing.assert_array_equal(a.obsm["X_schashformer_umap"], first)
    with pytest.raises(shf.errors.ParameterError, match="2 panel"):
        shf.pl.embedding(a, ["schashformer", "label"], ax=axes[0])
    fig2, ax2 = plt.subplots()
    assert shf.pl.confusion(a, "label", ax=ax2) is fig2 and ax2.images
    plt.close("all")
