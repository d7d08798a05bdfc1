import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from schashformer.baselines import pca_kmeans, scanpy_leiden
from schashformer.errors import ParameterError
from schashformer.metrics import cluster_accuracy, clustering_scores, per_label_scores
from tests.conftest import simulate_counts


def test_perfect_clustering_scores_one_under_relabelling():
    y = np.array(["a", "a", "b", "b", "c", "c"])
    s = clustering_scores(y, [2, 2, 0, 0, 1, 1])
    assert all(np.isclose(s[k], 1.0) for k in ("ari", "nmi", "acc", "f1_macro", "homogeneity", "completeness"))


def test_acc_by_hand_and_merged_class_lowers_f1():
    y = [0, 0, 0, 1, 1, 2]
    assert np.isclose(cluster_accuracy(y, [5, 5, 6, 6, 6, 7]), 5 / 6)
    merged = clustering_scores(y, [0, 0, 0, 1, 1, 1])
    assert merged["f1_macro"] < 1.0 and np.isclose(merged["acc"], 5 / 6)
    table = per_label_scores(y, [0, 0, 0, 1, 1, 1])
    assert table.loc["2", "recall"] == 0 and table.loc["0", "f1"] == 1


def test_missing_labels_excluded_and_length_checked():
    s = clustering_scores(["a", None, "b", np.nan], [0, 1, 1, 0])
    assert s["n_unlabeled"] == 2 and np.isclose(s["acc"], 1.0)
    with pytest.raises(ParameterError, match="3 vs 2"):
        clustering_scores([1, 2, 3], [1, 2])


def test_scanpy_baselines_on_simulated_types():
    adata = simulate_counts(n_cells=300, n_genes=200, n_types=3, seed=8)
    labels, info = scanpy_leiden(adata, n_clusters=3, seed=0)
    assert info["n_clusters_found"] == 3 and adjusted_rand_score(adata.obs["label"], labels) > 0.9
    labels, _ = pca_kmeans(adata, 3, seed=0)
    assert adjusted_rand_score(adata.obs["label"], labels) > 0.9
