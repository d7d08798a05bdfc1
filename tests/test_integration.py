"""Integration scores (both under- and over-mixing must show), pseudo-batches, tl/CLI forms, batch_key training."""

import json

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import schashformer as shf
from schashformer import cli
from schashformer.datasets import add_batch_effects
from schashformer.errors import InputError, ParameterError
from schashformer.integration import align_batches, batch_asw, clisi, ilisi, integration_scores, kbet_acceptance, label_asw

from .conftest import FAST, simulate_counts


def _blobs(offset: float, merge_types: bool = False, n: int = 400, seed: int = 0):
    """3 well-separated types x 2 batches; batch 1 shifted by ``offset`` along a direction no type uses."""
    rng = np.random.default_rng(seed)
    types = rng.integers(3, size=n)
    batches = rng.integers(2, size=n)
    centres = np.eye(3, 6) * (0.0 if merge_types else 10.0)
    x = centres[types] + rng.normal(0, 1, (n, 6))
    x[:, 5] += offset * batches
    return x, batches.astype(str), types.astype(str)


def test_scores_see_under_and_over_mixing():
    mixed = integration_scores(*_blobs(0.0))
    apart = integration_scores(*_blobs(12.0))  # under-mixed: batches separate within each type
    merged = integration_scores(*_blobs(0.0, merge_types=True))  # over-mixed: types merged
    for k in ("ilisi", "kbet", "batch_asw"):
        assert mixed[k] > apart[k] + 0.3, (k, mixed[k], apart[k])
    assert mixed["ilisi"] > 0.8 and mixed["kbet"] > 0.7 and apart["ilisi"] < 0.1 and apart["kbet"] < 0.1
    for k in ("label_asw", "clisi"):
        assert mixed[k] > merged[k] + 0.3, (k, mixed[k], merged[k])
    assert merged["ilisi"] > 0.8  # over-mixing looks perfect on mixing alone: biology shows it
    assert 0 <= mixed["mixing"] <= 1 and 0 <= mixed["biology"] <= 1


def test_kbet_per_type_ignores_composition():
    """Batches with different type proportions but mixed within each type pass kBET."""
    rng = np.random.default_rng(1)
    types = np.r_[np.zeros(300, int), np.ones(300, int)]
    batches = np.where(types == 0, rng.uniform(size=600) < 0.8, rng.uniform(size=600) < 0.2).astype(int)
    x = np.eye(2)[types] * 10 + rng.normal(0, 1, (600, 2))
    assert kbet_acceptance(x, batches, types) > 0.7
    assert kbet_acceptance(x, batches) < 0.5  # without labels the composition difference fails the test


def test_score_inputs_are_checked():
    x, b, t = _blobs(0.0, n=50)
    with pytest.raises(ParameterError, match="entries"):
        ilisi(x, b[:10])
    with pytest.raises(InputError, match="2 batches"):
        ilisi(x, np.zeros(50))
    with pytest.raises(InputError, match="missing"):
        batch_asw(x, np.where(np.arange(50) < 3, None, b), t)
    with pytest.raises(InputError, match="finite"):
        integration_scores(np.full((50, 2), np.nan), b, t)
    assert 0 <= label_asw(x, t) <= 1 and 0 <= clisi(x, t) <= 1


def test_baron_donors_real_batches(shared_data):
    """Real donors of baron: PCA keeps cell types apart; donors mix less than a random batch split would."""
    import scanpy as sc

    a = shf.io.read(shared_data / "baron_mouse_1886x14878.h5ad")
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    sc.pp.highly_variable_genes(a, n_top_genes=1000, subset=True)
    sc.pp.pca(a, n_comps=20, random_state=0)
    real = integration_scores(a.obsm["X_pca"], a.obs["donor"], a.obs["cell_type"])
    shuffled = integration_scores(a.obsm["X_pca"], np.random.default_rng(0).permutation(a.obs["donor"].to_numpy()),
                                  a.obs["cell_type"])
    assert real["clisi"] > 0.9 and real["label_asw"] > 0.55
    assert real["ilisi"] < shuffled["ilisi"] - 0.2  # the donor effect is visible
    assert shuffled["kbet"] > real["kbet"]


def test_add_batch_effects_shifts_counts_not_types(shared_data):
    a = shf.io.read(shared_data / "10X_PBMC_top2000.h5")
    b = add_batch_effects(a, 3, seed=0)
    assert b.shape == a.shape and list(b.obs["batch"].cat.categories) == ["batch0", "batch1", "batch2"]
    assert (b.obs["label"].to_numpy() == a.obs["label"].to_numpy()).all()
    x = b.X.toarray()
    assert np.allclose(x, np.round(x)) and (x >= 0).all() and (x <= a.X.toarray()).all()
    lib = pd.Series(x.sum(1)).groupby(b.obs["batch"].to_numpy(), observed=True).median()
    assert lib["batch0"] > 2 * lib["batch2"]  # capture 1.0 vs 0.35
    with pytest.raises(InputError, match="batch"):
        add_batch_effects(b, 2)  # obs already has 'batch'
    with pytest.raises(ParameterError):
        add_batch_effects(a, 1)


def test_align_batches_aligns_within_clusters_only():
    x, b, t = _blobs(12.0)
    aligned = align_batches(x, b, t, shrinkage=0)
    before, after = integration_scores(x, b, t, t), integration_scores(aligned, b, t, t)
    assert after["ilisi"] > 0.8 > 0.1 > before["ilisi"] and after["kbet"] > 0.7
    shrunk = integration_scores(align_batches(x, b, t), b, t, t)  # ~65 cells per group: offsets shrunk ~13%
    assert after["ilisi"] > shrunk["ilisi"] > before["ilisi"] + 0.4
    assert after["clisi"] > 0.95 and after["label_asw"] >= before["label_asw"] - 0.05  # types not merged
    # a cluster seen in one batch only is left exactly where it was
    only = (t == "0") & (b == "0")
    t2 = np.where(only, "solo", t)
    assert np.allclose(align_batches(x, b, t2)[only], x[only])
    with pytest.raises(ParameterError, match="clusters"):
        align_batches(x, b, t[:5])


@pytest.fixture(scope="module")
def batched_fit():
    """Simulated types in two pseudo-batches with strong technical shifts, clustered with batch_key."""
    base = simulate_counts(n_cells=500, n_genes=300, n_types=3, seed=3)
    base.X = sp.csr_matrix(np.round(base.X.toarray() * 3))
    adata = add_batch_effects(base, 2, capture=(1.0, 0.3), gene_sd=1.0, seed=0)
    return shf.tl.cluster(adata, 3, batch_key="batch", labels_key="label", seed=0, progress=False, copy=True, **FAST)


def test_batch_key_fit_then_integrate(batched_fit):
    a = batched_fit.copy()
    assert a.uns["schashformer"]["params"]["batch_key"] == "batch"
    before = shf.tl.integration(a, "batch", "label")
    shf.tl.integrate(a, "batch")
    after = shf.tl.integration(a, "batch", "label", key="schashformer_integrated")
    assert a.obsm["X_schashformer_integrated"].shape == a.obsm["X_schashformer"].shape
    assert after["ilisi"] >= before["ilisi"] and after["batch_asw"] > before["batch_asw"], (before, after)
    assert after["ari"] == before["ari"] and after["clisi"] > 0.9  # clusters unchanged, types kept apart
    with pytest.raises(ParameterError, match="overwrite"):
        shf.tl.integrate(a, "batch")
    with pytest.raises(InputError, match="nope"):
        shf.tl.integrate(a, "nope", overwrite=True)


def test_tl_integration_writes_and_refuses_overwrite(batched_fit):
    a = batched_fit.copy()
    s = shf.tl.integration(a, "batch", "label")
    assert a.uns["schashformer_integration"]["ilisi"] == s["ilisi"] and s["n_cells_scored"] == a.n_obs
    with pytest.raises(ParameterError, match="overwrite"):
        shf.tl.integration(a, "batch", "label")
    with pytest.raises(InputError, match="donor"):
        shf.tl.integration(a, "donor", "label", overwrite=True)
    with pytest.raises(InputError, match="X_pca"):
        shf.tl.integration(a, "batch", "label", use_rep="X_pca", overwrite=True)


def test_cli_integration(batched_fit, tmp_path, capsys):
    path = tmp_path / "result.h5ad"
    shf.io.write_h5ad(batched_fit, path)
    out = tmp_path / "integ"
    assert cli.main(["integration", str(path), "--batch-key", "batch", "--labels-key", "label", "--out", str(out),
                     "--no-plot"]) == 0
    report = json.loads((out / "integration.json").read_text())
    assert set(report["scores"]) >= {"ilisi", "kbet", "batch_asw", "label_asw", "clisi", "ari", "nmi"}
    table = pd.read_csv(out / "integration.csv")
    assert list(table["embedding"]) == ["X_schashformer", "X_schashformer_integrated"]
    assert report["scores_integrated"]["ari"] == report["scores"]["ari"]
    assert "mixing" in capsys.readouterr().out
    assert cli.main(["integration", str(path), "--batch-key", "nope", "--labels-key", "label", "--out",
                     str(tmp_path / "x")]) == 2
    assert "nope" in capsys.readouterr().err
    assert cli.main(["integration", str(path), "--batch-key", "batch", "--labels-key", "label", "--out",
                     str(out)]) == 2  # results there, no --overwrite
