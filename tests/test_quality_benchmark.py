"""Smoke test of benchmarks/quality.py: its worker and its table/plot writer on a small simulated data set."""

import numpy as np
import pytest

from schashformer import io
from tests.conftest import FAST, load_benchmark, simulate_counts


@pytest.fixture(scope="module")
def quality():
    return load_benchmark("quality")


def test_worker_and_outputs(quality, tmp_path):
    path = tmp_path / "sim.h5ad"
    adata = simulate_counts(n_cells=240, n_genes=150, n_types=3, seed=2)
    adata.obs.loc[adata.obs_names[:5], "label"] = np.nan  # unlabeled cells are left out for every method
    io.write_h5ad(adata, path)
    base = {"path": str(path), "dataset": "sim", "seed": 0}
    params = {"scHashFormer, no attention": FAST,
              "ZINB-DEC (scDeepCluster-style)": dict(pretrain_steps=60, cluster_steps=20, noise_sd=0.5,
                                                     hidden=(32,), latent=8, decoder_hidden=32, kmeans_n_init=2)}
    rows = []
    # scanpy's Leiden rows are left out: its first neighbour search compiles for ~30 s
    for method in ("PCA(50) + k-means", "scHashFormer, no attention", "ZINB-DEC (scDeepCluster-style)",
                   quality.SCVI_LEIDEN):
        rows += quality.run_task({**base, "method": method, "params": params.get(method)})
    by_method = {r["method"]: r for r in rows}
    for method in ("PCA(50) + k-means", "scHashFormer, no attention", "ZINB-DEC (scDeepCluster-style)"):
        r = by_method[method]
        assert r["status"] == "ok" and r["n_cells"] == 235 and r["K"] == 3 and r["n_unlabeled"] == 0
        assert 0 <= r["nmi"] <= 1 and r["seconds"] > 0 and r["peak_rss_gib"] > 0
    assert by_method["PCA(50) + k-means"]["ari"] > 0.9
    r = by_method["scHashFormer, no attention"]
    assert 0 <= r["purity"] <= 1 and len(r["purity_heads"].split()) == FAST.get("hash_heads", 3)
    assert by_method[quality.SCVI_KMEANS]["status"] in ("ok", "not installed")  # scVI rows come in pairs

    header = ["# test", "", "smoke"]
    text = quality.write_outputs(rows, tmp_path / "out", header, {"sim": quality.chance_purity(adata.obs["label"].dropna())})
    assert "| sim | PCA(50) + k-means |" in text and "Hash bucket purity" in text
    assert (tmp_path / "out" / "quality.csv").exists()
    for metric in quality.METRICS:
        assert (tmp_path / "out" / f"quality_{metric}.png").stat().st_size > 0


def test_plan_gives_each_method_its_seeds_and_scvi_its_epochs(quality):
    import argparse

    args = argparse.Namespace(methods=list(quality.METHODS), seeds=[0, 1, 2, 3, 4], ablation_seeds=[0, 1],
                              deep_seeds=[0, 1, 2], scvi_epochs=100)
    sets = [("a.h5", "a", "label"), ("b.h5", "b", "label")]
    tasks = quality.plan_tasks(sets, args)
    seeds = {}
    for t in tasks:
        seeds.setdefault(t["method"], set()).add(t["seed"])
    assert seeds[quality.SCHF] == {0, 1, 2, 3, 4} and seeds["PCA(50) + k-means"] == {0, 1, 2, 3, 4}
    assert all(seeds[m] == {0, 1} for m in quality.ABLATIONS)
    assert seeds["ZINB-DEC (scDeepCluster-style)"] == {0, 1, 2} and seeds[quality.SCVI_LEIDEN] == {0, 1, 2}
    assert quality.SCVI_KMEANS not in seeds  # the scVI Leiden task also gives the k-means row
    assert quality.LEIDEN_K not in seeds and seeds[quality.LEIDEN_RES1] == {0, 1, 2, 3, 4}  # one graph, two rows
    assert all(t["params"] == {"max_epochs": 100} for t in tasks if t["method"] == quality.SCVI_LEIDEN)
    n_runs = 2 * (3 * 5 + 3 * 2 + 2 * 3)  # per data set: scHashFormer, Leiden pair, k-means; 3 ablations; 2 deep peers
    assert len(tasks) == n_runs
    assert tasks[0]["method"].startswith(quality.SCHF) and not tasks[-1]["method"].startswith(("scVI", "ZINB", quality.SCHF))
