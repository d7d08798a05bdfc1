"""schashformer.pl: every plot returns a Figure, writes a PNG, and names a missing key."""

import anndata as ad
import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")

from schashformer import io, pl, tl  # noqa: E402
from schashformer.errors import InputError  # noqa: E402
from tests.conftest import FAST, simulate_counts  # noqa: E402


@pytest.fixture(scope="module")
def clustered():
    adata = simulate_counts(n_cells=300, seed=21)
    _, model = tl.cluster(adata, 3, labels_key="label", progress=False, return_model=True, **FAST)
    return adata, model


def _is_png(path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 2000


def test_embedding_colours_by_any_key_and_subsamples(clustered, tmp_path):
    adata, _ = clustered
    adata = adata.copy()
    del adata.uns["schashformer_neighbors"]  # no stored graph (e.g. an older result): a throw-away one on a subset
    adata.obs["depth"] = np.asarray(adata.X.sum(1)).ravel()
    # one UMAP only (numba compiles it on first use, which dominates the time)
    fig = pl.embedding(adata, ["schashformer", "label", "depth"], max_cells=200, save=tmp_path / "e.png")
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert len(titles) == 3 and all("200 of 300 cells" in t for t in titles) and _is_png(tmp_path / "e.png")
    assert "X_umap" not in adata.obsm and "X_schashformer_umap" not in adata.obsm  # a subset's UMAP is not kept
    with pytest.raises(InputError, match="color 'nope'"):
        pl.embedding(adata, "nope")
    with pytest.raises(InputError, match="'X_other'"):
        pl.embedding(adata, basis="other")


def test_confusion_diagonal_after_matching(tmp_path):
    a = ad.AnnData(np.zeros((6, 1), np.float32))
    a.obs["label"] = list("aabbcc")
    a.obs["cl"] = ["2", "2", "0", "0", "1", "1"]
    fig = pl.confusion(a, "label", "cl", normalize=False, save=tmp_path / "c.png")
    ax = fig.axes[0]
    shown = ax.images[0].get_array()
    assert np.array_equal(np.asarray(shown), np.eye(3) * 2)  # clusters reordered to match labels a, b, c
    assert [t.get_text() for t in ax.get_xticklabels()] == ["2", "0", "1"] and _is_png(tmp_path / "c.png")
    with pytest.raises(InputError, match="labels_key 'x'"):
        pl.confusion(a, "x", "cl")


def test_bucket_sizes_from_adata_model_and_array(clustered, tmp_path):
    adata, model = clustered
    fig = pl.bucket_sizes(adata, save=tmp_path / "b.png")
    assert len(fig.axes) == adata.obsm["schashformer_codes"].shape[1] and _is_png(tmp_path / "b.png")
    n_buckets = len(np.unique(adata.obsm["schashformer_codes"][:, 0]))
    assert f"{n_buckets} buckets" in fig.axes[0].get_title()
    assert len(pl.bucket_sizes(model).axes) == 3
    assert "1 buckets" in pl.bucket_sizes(np.zeros((5, 1), int)).axes[0].get_title()
    with pytest.raises(InputError, match="schashformer_codes"):
        pl.bucket_sizes(ad.AnnData(np.zeros((3, 2), np.float32)))


def test_training_curves_from_model_and_saved_result(clustered, tmp_path):
    adata, model = clustered
    fig = pl.training_curves(model, save=tmp_path / "t.png")
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["stage 1: hashing", "stage 2: encoder (ZINB)", "stage 2: clustering"][:len(titles)]
    assert len(titles) >= 2 and _is_png(tmp_path / "t.png")
    assert len(fig.axes[0].lines) >= 3  # total loss and its terms
    # the run record keeps the history, so a written result.h5ad can be plotted later
    io.write_h5ad(adata, tmp_path / "r.h5ad")
    back = io.read(tmp_path / "r.h5ad")
    fig2 = pl.training_curves(back)
    np.testing.assert_allclose(fig2.axes[0].lines[0].get_ydata(), fig.axes[0].lines[0].get_ydata(), rtol=1e-6)
    with pytest.raises(InputError, match="'stage', 'step' and 'loss'"):
        pl.training_curves([{"x": 1}])
    with pytest.raises(InputError, match="no training history"):
        pl.training_curves(ad.AnnData(np.zeros((2, 2), np.float32)))
