"""Trajectories: branching simulator, tl.trajectory (PAGA + DPT), pl.trajectory and the CLI form."""

import json

import numpy as np
import pandas as pd
import pytest

import schashformer as shf
from schashformer import cli
from schashformer.datasets import simulate_branching
from schashformer.errors import InputError, ParameterError
from schashformer.trajectory import extreme_cell, pseudotime_correlation

from .conftest import FAST


def _pca_embedded(adata, n_pcs=20):
    import scanpy as sc

    b = adata.copy()
    sc.pp.normalize_total(b, target_sum=1e4)
    sc.pp.log1p(b)
    sc.pp.pca(b, n_comps=n_pcs, random_state=0)
    adata.obsm["X_schashformer"] = b.obsm["X_pca"]
    return adata


@pytest.fixture(scope="module")
def branching():
    return _pca_embedded(simulate_branching(1500, 1000, seed=1))


def test_simulator_truth_and_realism():
    a = simulate_branching(400, 200, n_branches=3, seed=0)
    assert a.shape == (400, 200) and set(a.obs["branch"].cat.categories) == {"trunk", "lineage1", "lineage2",
                                                                            "lineage3"}
    t = a.obs["time"].to_numpy()
    assert (a.obs["branch"].to_numpy()[t < 0.35] == "trunk").all() and (a.obs["branch"] != "trunk")[t >= 0.35].all()
    x = a.X.toarray()
    assert np.allclose(x, np.round(x)) and (x == 0).mean() > 0.5  # sparse counts as in droplet data
    assert 100 < np.median(x.sum(1)) < 400  # one count per gene and cell by default
    assert np.array_equal(x, simulate_branching(400, 200, n_branches=3, seed=0).X.toarray())
    with pytest.raises(ParameterError):
        simulate_branching(400, 200, branch_point=1.5)


def test_trajectory_recovers_time(branching):
    import scanpy as sc

    a = branching.copy()
    sc.pp.neighbors(a, use_rep="X_schashformer", n_neighbors=5, method="gauss")  # the user's own graph must survive
    own = a.obsp["connectivities"].copy()
    shf.tl.trajectory(a, "stage=0", groups=None, umap=False)
    rho = pseudotime_correlation(a.obs["dpt_pseudotime"], a.obs["time"])
    assert rho > 0.85, rho
    # no stored graph for this embedding: one was built under the trajectory's own key, the user's kept
    assert a.uns["trajectory"]["neighbors_key"] == "trajectory_neighbors"
    assert a.uns["neighbors"]["params"]["n_neighbors"] == 5 and (a.obsp["connectivities"] != own).nnz == 0
    run = a.uns["trajectory"]
    root = run["root"]
    assert a.obs["stage"].iloc[root] == "0" and a.obs["dpt_pseudotime"].iloc[root] == 0 and a.uns["iroot"] == root
    # scanpy's own keys
    n = a.obs[a.uns["paga"]["groups"]].cat.categories.size
    assert a.uns["paga"]["groups"] == run["groups"] == "trajectory_groups"
    assert a.uns["paga"]["connectivities"].shape == (n, n) and a.obsm["X_diffmap"].shape == (a.n_obs, 10)
    with pytest.raises(ParameterError, match="overwrite"):
        shf.tl.trajectory(a, "stage=0", groups=None, umap=False)
    # a root at the other end reverses the order
    shf.tl.trajectory(a, "stage=4", groups=None, umap=False, overwrite=True)
    assert pseudotime_correlation(a.obs["dpt_pseudotime"], a.obs["time"]) < -0.5


def test_bad_roots_are_named(branching):
    a = branching.copy()
    with pytest.raises(InputError, match="'dayz'"):
        shf.tl.trajectory(a, "dayz=0")
    with pytest.raises(InputError, match="values"):
        shf.tl.trajectory(a, "stage=9")
    with pytest.raises(ParameterError, match="outside"):
        shf.tl.trajectory(a, 10_000)
    with pytest.raises(InputError, match="X_other"):
        shf.tl.trajectory(a, 0, use_rep="X_other")
    assert "trajectory" not in a.uns


def test_extreme_cell_picks_the_far_end():
    dm = np.c_[np.ones(6), [0.0, 0.1, 0.2, 0.8, 0.9, 1.0]]
    assert extreme_cell(dm, np.array([1, 1, 0, 0, 0, 0], bool)) == 0
    assert extreme_cell(dm, np.array([0, 0, 0, 0, 1, 1], bool)) == 5


def test_plot_and_cli(branching, tmp_path, capsys):
    a = branching.copy()
    a.obs["schashformer"] = pd.Categorical(np.minimum((a.obs["time"] * 6).astype(int), 5).astype(str))
    shf.tl.trajectory(a, "0", umap=False)  # a cluster label as root, PAGA on the clusters
    assert a.uns["trajectory"]["groups"] == "schashformer" and "X_trajectory_umap" not in a.obsm
    fig = shf.pl.trajectory(a, color=["time", "branch"], save=tmp_path / "t.png")
    assert len(fig.axes) >= 4 and (tmp_path / "t.png").stat().st_size > 10_000
    with pytest.raises(InputError, match="tl.trajectory"):
        shf.pl.trajectory(branching)

    path = tmp_path / "result.h5ad"
    shf.io.write_h5ad(branching, path)
    out = tmp_path / "traj"
    assert cli.main(["trajectory", str(path), "--root", "stage=0", "--truth-key", "time", "--color", "branch",
                     "--out", str(out), "--quiet", "--no-umap"]) == 0
    report = json.loads((out / "trajectory.json").read_text())
    assert report["spearman"] > 0.85 and report["truth_key"] == "time"
    pt = pd.read_csv(out / "pseudotime.csv", index_col=0)
    assert pt.shape == (branching.n_obs, 1) and (out / "trajectory.png").stat().st_size > 10_000
    assert "Spearman" in capsys.readouterr().out
    assert cli.main(["trajectory", str(path), "--root", "day=0", "--out", str(tmp_path / "bad")]) == 2
    assert "'day'" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_fitted_embedding_orders_cells(shared_data):
    """End to end on the real time course (klein, days 0-7): a few-step fit, then DPT from day 0.

    A 20-step fit orders the days only roughly (Spearman ~0.5 at 40 steps; the benchmark gives
    the figure at full training); a random order would be ~0.
    """
    a = shf.io.read(shared_data / "klein_subset_1000x900.h5ad")
    shf.tl.cluster(a, 4, seed=0, progress=False,
                   **dict(FAST, stage1_steps=20, stage2_pretrain_steps=20, stage2_cluster_steps=20))
    shf.tl.trajectory(a, "day=0", umap=False)
    assert a.uns["trajectory"]["neighbors_key"] == "schashformer_neighbors"  # the hash graph, no new search
    rho = pseudotime_correlation(a.obs["dpt_pseudotime"], a.obs["day"])
    assert rho > 0.3, rho
    assert a.obs["day"].iloc[a.uns["trajectory"]["root"]] == "0"
