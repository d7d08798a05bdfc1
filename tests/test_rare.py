"""Per-label / per-cluster scores and rare populations (metrics, tl.rare_populations, CLI evaluate)."""

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from schashformer import tl
from schashformer.cli import main
from schashformer.errors import InputError, ParameterError
from schashformer.metrics import per_cluster_scores, per_label_scores, rare_label_scores


def test_majority_matching_gives_a_label_several_clusters():
    y = list("aaaabbc")
    pred = [0, 0, 1, 1, 2, 2, 2]  # label a split over clusters 0 and 1; c merged into b's cluster
    hung = per_label_scores(y, pred)
    assert hung.loc["a", "recall"] == 0.5 and hung.loc["a", "matched_cluster"] in ("0", "1")
    major = per_label_scores(y, pred, matching="majority")
    assert major.loc["a", "f1"] == 1 and major.loc["a", "matched_cluster"] == "0,1"
    assert major.loc["c", "f1"] == 0 and major.loc["c", "matched_cluster"] == ""
    assert np.isclose(major.loc["b", "precision"], 2 / 3)
    with pytest.raises(ParameterError, match="matching"):
        per_label_scores(y, pred, matching="best")


def test_per_cluster_scores_by_hand():
    y = list("aaaabbc")
    t = per_cluster_scores(y, [0, 0, 1, 1, 2, 2, 2])
    assert list(t.index) == ["0", "1", "2"]
    assert t.loc["2", "majority_label"] == "b" and np.isclose(t.loc["2", "precision"], 2 / 3)
    assert t.loc["2", "recall"] == 1 and np.isclose(t.loc["2", "f1"], 0.8)
    assert t.loc["0", "recall"] == 0.5 and t.loc["0", "precision"] == 1
    assert sorted(t["hungarian_label"]) == ["a", "b", "c"]  # one-to-one: c gets a's second cluster (0 cells of c)


def test_rare_label_scores_threshold():
    y = ["big"] * 98 + ["tiny"] * 2
    pred = [0] * 98 + [1, 0]
    rare = rare_label_scores(y, pred, max_fraction=0.05)
    assert list(rare.index) == ["tiny"] and rare.loc["tiny", "recall"] == 0.5
    assert rare_label_scores(y, pred, max_fraction=0.01).empty
    with pytest.raises(ParameterError, match="max_fraction"):
        rare_label_scores(y, pred, max_fraction=0)


def _toy() -> ad.AnnData:
    a = ad.AnnData(np.zeros((100, 2), np.float32))
    a.obs["label"] = ["big"] * 90 + ["mid"] * 9 + ["rare"]
    a.obs["schashformer"] = pd.Categorical(["0"] * 90 + ["1"] * 9 + ["2"])
    return a


def test_tl_rare_populations_writes_uns():
    a = _toy()
    table = tl.rare_populations(a, "label")
    assert list(table.index) == ["rare", "mid", "big"] and table["rare"].tolist() == [True, False, False]
    rec = a.uns["schashformer_populations"]
    assert rec["rare_f1_mean"] == 1.0 and rec["per_label"]["label"][0] == "rare"
    assert rec["per_cluster"]["cluster"] == ["0", "1", "2"]
    with pytest.raises(ParameterError, match="already holds"):
        tl.rare_populations(a, "label")
    with pytest.raises(InputError, match="key 'leiden'"):
        tl.rare_populations(a, "label", key="leiden", key_added="x")


def test_cli_evaluate(tmp_path, capsys):
    a = _toy()
    a.write_h5ad(tmp_path / "r.h5ad")
    out = tmp_path / "ev"
    argv = ["evaluate", str(tmp_path / "r.h5ad"), "--labels-key", "label", "--out", str(out), "--max-fraction", "0.05"]
    assert main(argv) == 0
    assert "1 rare labels" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["confusion.png", "evaluation.json", "per_cluster.csv",
                                                     "per_label.csv"]
    per_label = pd.read_csv(out / "per_label.csv", index_col="label")
    assert per_label.loc["rare", "f1"] == 1 and bool(per_label.loc["rare", "rare"])
    report = json.loads((out / "evaluation.json").read_text())
    assert report["rare_labels"] == {"rare": 1.0} and report["acc"] == 1.0
    assert main(argv) == 2 and "--overwrite" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0
    assert main(["evaluate", str(tmp_path / "r.h5ad"), "--labels-key", "nope", "--out", str(tmp_path / "e2")]) == 2
    assert "labels_key 'nope'" in capsys.readouterr().err and not (tmp_path / "e2").exists()
