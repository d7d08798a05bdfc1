"""Number of clusters unknown (``n_clusters=None``): the estimator, the estimator's API, CLI, save/load, resume."""

import json

import numpy as np
import pytest

from schashformer import SCHashFormer, buckets, io, tl
from schashformer import n_clusters as nc
from schashformer.checkpoint import Checkpointer
from schashformer.cli import main
from schashformer.errors import InputError, ParameterError
from tests.conftest import DATA, FAST, simulate_counts

FAST_ARGS = [a for k, v in FAST.items() for a in ("--param", f"{k}={v}")]
PBMC = DATA / "10X_PBMC_top2000.h5"


def blobs(n_per=150, k=5, dim=8, seed=0):
    """k well separated Gaussian blobs and two 'hash' orders (sorted by a random projection each)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 8, size=(k, dim))
    y = np.repeat(np.arange(k), n_per)
    z = (centres[y] + rng.normal(size=(len(y), dim))).astype(np.float32)
    orders = [np.argsort(z @ rng.normal(size=dim)) for _ in range(3)]
    return z, orders, y


def test_estimate_finds_separated_blobs_and_resolution_orders_k():
    z, orders, y = blobs()
    k, labels = nc.estimate(z, orders, 16)
    assert k == 5 and labels.shape == y.shape and set(labels) == set(range(5))
    from sklearn.metrics import adjusted_rand_score

    assert adjusted_rand_score(y, labels) > 0.95
    ks = [nc.estimate(z, orders, 16, resolution=r)[0] for r in (0.05, 1.0, 20.0)]
    assert ks[0] <= ks[1] <= ks[2] and ks[0] < ks[2], ks


def test_small_communities_are_merged_into_the_nearest_cluster():
    z, _, _ = blobs(n_per=100, k=3)
    labels = np.repeat([0, 1, 2], 100)
    labels[:3] = 3  # a 3-cell community (1% of 300 cells is under the 10-cell cap of min_size)
    keep = nc.significant(labels, min_size=10)
    merged = nc.merge_small(z, labels, keep)
    assert list(keep) == [0, 1, 2] and merged.max() == 2 and (merged[:3] == 0).all()


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "abc", None, True])
def test_bad_resolution_is_a_parameter_error(bad):
    with pytest.raises(ParameterError, match=r"resolution must be a number > 0"):
        SCHashFormer(resolution=bad).fit(simulate_counts(40, 30))


@pytest.fixture(scope="module")
def pbmc_fit():
    """n_clusters=None on 800 real PBMC cells (8 labeled types), short training."""
    if not PBMC.exists():
        pytest.skip(f"shared data not found at {PBMC}")
    adata = io.read(PBMC)
    adata = adata[np.random.default_rng(0).choice(adata.n_obs, 800, replace=False)].copy()
    # 500 genes and small stage-2 batches keep it short; the ZINB decoder's width dominates stage 2
    _, model = tl.cluster(adata, labels_key="label", seed=0, progress=False, return_model=True, n_top_genes=500,
                          **{**FAST, "chunks_per_batch": 8})
    return adata, model


def test_unknown_k_on_real_pbmc_subset(pbmc_fit, tmp_path):
    adata, model = pbmc_fit
    k = model.n_clusters_
    assert model.n_clusters is None and 3 <= k <= 16, k  # true K is 8 (short training: a sane range only)
    rec = adata.uns["schashformer"]
    assert rec["n_clusters_estimated"] == k and rec["params"]["n_clusters"] == "" and rec["params"]["resolution"] == 0.5
    assert model.labels_.shape == (adata.n_obs,) and set(np.unique(model.labels_)) <= set(range(k))
    assert list(adata.obs["schashformer"].cat.categories) == [str(j) for j in range(k)]
    assert model.head_.centres.shape[0] == k
    assert rec["metrics"]["ari"] > 0.3, rec["metrics"]
    # save / load / predict keep the estimated K
    model.save(tmp_path / "m")
    loaded = SCHashFormer.load(tmp_path / "m")
    assert loaded.n_clusters is None and loaded.n_clusters_ == k
    np.testing.assert_array_equal(loaded.predict(adata[:200]), model.predict(adata[:200]))


def test_higher_resolution_gives_at_least_as_many_clusters_on_real_embedding(pbmc_fit):
    adata, model = pbmc_fit
    z = adata.obsm["X_schashformer"]
    codes = adata.obsm["schashformer_codes"]
    orders = [np.argsort(codes[:, h], kind="stable") for h in range(codes.shape[1])]
    ks = [nc.estimate(z, orders, 16, resolution=r, seed=0)[0] for r in (0.3, 1.0, 3.0)]
    assert ks[0] <= ks[1] <= ks[2] and ks[0] < ks[2], ks
    graph = buckets.hash_knn_graph(z, orders, 16, 15)
    assert graph.shape == (len(z), len(z)) and graph.getnnz(1).max() <= 3 * 16 * codes.shape[1]


def test_cli_without_n_clusters_estimates_k(tmp_path, capsys):
    simulate_counts(n_cells=300, n_types=4, seed=3).write_h5ad(tmp_path / "in.h5ad")
    out = tmp_path / "out"
    assert main(["cluster", str(tmp_path / "in.h5ad"), "--labels-key", "label", "--resolution", "1.0", "--out",
                 str(out), "--quiet", "--no-umap", *FAST_ARGS]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["n_clusters_estimated"] is True and 2 <= report["n_clusters"] <= 8
    assert f"estimated number of clusters: {report['n_clusters']}" in capsys.readouterr().out
    assert report["metrics"]["ari"] > 0.8
    assert main(["cluster", str(tmp_path / "in.h5ad"), "--resolution", "0", "--out", str(tmp_path / "o2"),
                 "--quiet"]) == 2
    assert "resolution must be a number > 0" in capsys.readouterr().err


class Stop(Exception):
    pass


def test_resume_with_estimated_k_gives_the_same_labels(tmp_path, monkeypatch):
    adata = simulate_counts(150, 100, n_types=3, seed=2)
    params = {**FAST, "stage1_steps": 20, "stage2_pretrain_steps": 12, "stage2_cluster_steps": 30,
              "update_interval": 7, "tol": 0.0}
    make = lambda: SCHashFormer(None, seed=1, progress=False, device="cpu", checkpoint_dir=tmp_path / "ck",  # noqa: E731
                                checkpoint_every=10, **params)
    reference = SCHashFormer(None, seed=1, progress=False, device="cpu", **params).fit(adata)
    real_save = Checkpointer.save

    def stopping_at(stop_at):
        def stop(self, phase, step=0, **items):
            real_save(self, phase, step, **items)
            if phase == stop_at:
                raise Stop
        return stop

    for stop_at in ("pretrain_done", "centres", "cluster"):
        monkeypatch.setattr(Checkpointer, "save", stopping_at(stop_at))
        with pytest.raises(Stop):
            make().fit(adata)
        monkeypatch.setattr(Checkpointer, "save", real_save)
        resumed = make().fit(adata, resume=True)
        assert resumed.n_clusters_ == reference.n_clusters_, stop_at
        np.testing.assert_array_equal(resumed.labels_, reference.labels_, err_msg=stop_at)
    # a checkpoint of a run with unknown K is not resumed by a run told K (the fingerprint has n_clusters)
    monkeypatch.setattr(Checkpointer, "save", stopping_at("pretrain_done"))
    with pytest.raises(Stop):
        make().fit(adata)
    monkeypatch.setattr(Checkpointer, "save", real_save)
    with pytest.raises(InputError, match="n_clusters"):
        SCHashFormer(3, seed=1, progress=False, device="cpu", checkpoint_dir=tmp_path / "ck", **params).fit(
            adata, resume=True)
