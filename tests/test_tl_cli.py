import json

import numpy as np
import pytest

from schashformer import tl
from schashformer.cli import main
from schashformer.errors import InputError, ParameterError
from schashformer.train import TrainConfig
from tests.conftest import FAST, simulate_counts

FAST_ARGS = [a for k, v in FAST.items() for a in ("--param", f"{k}={v}")]


def test_tl_cluster_writes_keys_and_metrics(sim):
    tl.cluster(sim, 3, labels_key="label", progress=False, **FAST)
    # z = own token (stage-1 hidden + principal components) + attention update
    assert sim.obsm["X_schashformer"].shape == (300, FAST["hash_latent"] + TrainConfig().token_pcs)
    assert sim.obs["schashformer"].dtype.name == "category" and sim.obs["schashformer"].nunique() <= 3
    assert sim.obsm["schashformer_codes"].shape == (300, 3)
    rec = sim.uns["schashformer"]
    assert rec["metrics"]["ari"] > 0.8 and rec["params"]["seed"] == 0 and "stage1_hashing" in rec["timings"]
    with pytest.raises(ParameterError, match="already hold results"):
        tl.cluster(sim, 3, progress=False, **FAST)
    tl.cluster(sim, 3, progress=False, overwrite=True, **FAST)


def test_tl_bad_keys(sim):
    with pytest.raises(InputError, match="labels_key 'cell_type'"):
        tl.cluster(sim, 3, labels_key="cell_type", progress=False)
    sim.obs["empty"] = np.nan
    with pytest.raises(InputError, match="every value is missing"):
        tl.cluster(sim, 3, labels_key="empty", progress=False)


def test_cli_cluster_outputs_and_refusal(tmp_path, capsys):
    adata = simulate_counts(n_cells=300, seed=5)
    adata.write_h5ad(tmp_path / "in.h5ad")
    out = tmp_path / "out"
    argv = ["cluster", str(tmp_path / "in.h5ad"), "--n-clusters", "3", "--labels-key", "label", "--out", str(out),
            "--quiet", *FAST_ARGS]
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["bucket_sizes.png", "clusters.csv", "confusion.png", "metrics.json",
                                                     "model", "result.h5ad", "training_curves.png", "umap.png"]
    report = json.loads((out / "metrics.json").read_text())
    assert report["metrics"]["ari"] > 0.8 and {"acc", "nmi", "f1_macro", "homogeneity"} <= set(report["metrics"])
    assert report["timings"]["stage1_hashing"]["peak_rss_gib"] > 0
    assert "ARI" in capsys.readouterr().out
    # Existing results are refused, with one line and exit code 2; nothing is touched.
    before = (out / "metrics.json").stat().st_mtime_ns
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--overwrite" in err
    assert (out / "metrics.json").stat().st_mtime_ns == before
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


@pytest.mark.parametrize("args,match", [
    (["cluster", "missing.h5ad", "--n-clusters", "3"], "no such file"),
    (["cluster", "{inp}", "--n-clusters", "1"], "n_clusters"),
    (["cluster", "{inp}", "--n-clusters", "5000"], "larger than the number of cells"),
    (["cluster", "{inp}", "--n-clusters", "3", "--labels-key", "nope"], "labels_key 'nope'"),
    (["cluster", "{inp}", "--n-clusters", "3", "--batch-key", "nope"], "batch_key 'nope'"),
    (["cluster", "{inp}", "--n-clusters", "3", "--param", "lr"], "key=value"),
])
def test_cli_bad_input_one_line_no_output(tmp_path, capsys, args, match):
    simulate_counts(n_cells=100, seed=6).write_h5ad(tmp_path / "in.h5ad")
    argv = [a.format(inp=tmp_path / "in.h5ad") for a in args] + ["--out", str(tmp_path / "out"), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and err.count("\n") == 0
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_cli_non_integer_counts(tmp_path, capsys):
    a = simulate_counts(n_cells=100, seed=6)
    a.X = a.X * 0.5
    a.write_h5ad(tmp_path / "norm.h5ad")
    assert main(["cluster", str(tmp_path / "norm.h5ad"), "--n-clusters", "3", "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "non-integer" in capsys.readouterr().err
