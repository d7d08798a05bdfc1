import numpy as np
import pytest

from schashformer.errors import InputError, ParameterError
from schashformer.metrics import cluster_accuracy, clustering_scores, per_label_scores

SCORES = ("ari", "nmi", "acc", "f1_macro", "homogeneity", "completeness")


@pytest.mark.parametrize("pred", [[2, 2, 0, 0, 1, 1], ["x", "x", "y", "y", "z", "z"], [7, 7, 3, 3, 0, 0]])
def test_perfect_labelling_scores_one_under_permuted_ids(pred):
    y = ["a", "a", "b", "b", "c", "c"]
    s = clustering_scores(y, pred)
    assert all(np.isclose(s[k], 1.0) for k in SCORES), s
    assert s["n_clusters"] == 3 and s["n_labels"] == 3 and s["n_unlabeled"] == 0
    assert cluster_accuracy(y, pred) == 1.0


def test_acc_by_hand():
    # contingency (labels x clusters 5,6,7): [[2,1,0],[0,2,0],[0,0,1]] -> best matching 2+2+1 = 5 of 6
    y = [0, 0, 0, 1, 1, 2]
    assert np.isclose(cluster_accuracy(y, [5, 5, 6, 6, 6, 7]), 5 / 6)
    # more clusters than labels: labels a(4) b(2), clusters 0:{a,a} 1:{a,a} 2:{b,b} -> 2 + 2 = 4 of 6
    assert np.isclose(cluster_accuracy(list("aaaabb"), [0, 0, 1, 1, 2, 2]), 4 / 6)
    # fewer clusters than labels: one cluster gets everything -> largest label 4 of 6
    assert np.isclose(cluster_accuracy(list("aaaabb"), [0] * 6), 4 / 6)


def test_merged_class_lowers_f1_and_per_label_table():
    y = [0, 0, 0, 1, 1, 2]
    merged = clustering_scores(y, [0, 0, 0, 1, 1, 1])
    assert np.isclose(merged["acc"], 5 / 6)
    assert merged["f1_macro"] < clustering_scores(y, y)["f1_macro"] == 1.0
    # label 2 gets no cluster: F1 0; label 1 precision 2/3, recall 1 -> F1 0.8; label 0 F1 1
    assert np.isclose(merged["f1_macro"], (1 + 0.8 + 0) / 3)
    table = per_label_scores(y, [0, 0, 0, 1, 1, 1])
    assert list(table.index) == ["0", "1", "2"]
    assert list(table.columns) == ["n_cells", "fraction", "matched_cluster", "precision", "recall", "f1"]
    assert table.loc["2", "recall"] == 0 and table.loc["2", "matched_cluster"] == ""
    assert table.loc["0", "f1"] == 1 and table.loc["1", "matched_cluster"] == "1"
    assert np.isclose(table.loc["1", "precision"], 2 / 3) and np.isclose(table["fraction"].sum(), 1.0)


def test_extra_clusters_count_as_errors_in_f1():
    y = list("aaaabb")
    s = clustering_scores(y, [0, 0, 1, 1, 2, 2])  # cluster 0 or 1 is unmatched
    assert np.isclose(s["acc"], 4 / 6) and s["f1_macro"] < 1.0 and s["n_clusters"] == 3


def test_missing_labels_excluded():
    s = clustering_scores(["a", None, "b", np.nan, "b"], [0, 1, 1, 0, 1])
    assert s["n_unlabeled"] == 2 and np.isclose(s["acc"], 1.0) and s["n_labels"] == 2
    # integer labels with NaN become floats; they still match their integer names
    table = per_label_scores(np.array([0, 1, np.nan, 1]), [3, 4, 4, 4])
    assert list(table.index) == ["0", "1"] and table["n_cells"].tolist() == [1, 2]


def test_length_mismatch_and_empty():
    for fn in (cluster_accuracy, clustering_scores, per_label_scores):
        with pytest.raises(ParameterError, match="3 vs 2"):
            fn([1, 2, 3], [1, 2])
    with pytest.raises(InputError):
        clustering_scores([None, np.nan], [0, 1])
