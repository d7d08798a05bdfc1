import numpy as np
import pytest
import scipy.sparse as sp

from schashformer.errors import InputError, ParameterError
from schashformer.preprocess import prepare, principal_axes
from tests.conftest import simulate_counts


def test_prepare_keeps_raw_counts_and_stays_sparse(sim):
    prep = prepare(sim, n_top_genes=50)
    assert prep.counts.shape == (300, 50) and sp.isspmatrix_csr(prep.counts) and sp.isspmatrix_csr(prep.logn)
    cols = [list(sim.var_names).index(g) for g in prep.stats.genes]
    assert np.array_equal(prep.counts.toarray(), sim.X.toarray()[:, cols])  # raw counts, not normalised
    assert np.isclose(np.median(prep.size_factors), 1.0, atol=0.05)


def test_standardised_batches(sim):
    prep = prepare(sim, n_top_genes=50)
    x = prep.standardised(np.arange(prep.n_cells))
    assert x.shape == (300, 50) and x.dtype == np.float32
    assert np.allclose(x.mean(0), 0, atol=0.05) and np.allclose(x.std(0, ddof=1)[x.std(0) > 0], 1, atol=0.05)
    assert np.abs(x).max() <= 10.0


def test_hvg_selects_marker_genes(sim):
    prep = prepare(sim, n_top_genes=20)
    assert len(prep.stats.genes) == 20 and prep.n_genes == 20


def test_zero_cells_removed_and_reported(sim):
    x = sim.X.toarray()
    x[[3, 7]] = 0
    sim.X = sp.csr_matrix(x)
    prep = prepare(sim)
    assert prep.n_cells == 298 and not prep.cell_mask[3] and not prep.cell_mask[7]


@pytest.mark.parametrize("value,match", [(np.nan, "NaN"), (np.inf, "NaN/inf"), (-2.0, "negative"), (0.5, "non-integer")])
def test_rejects_bad_values(sim, value, match):
    x = sim.X.toarray()
    x[0, 0] = value
    sim.X = sp.csr_matrix(x)
    with pytest.raises(InputError, match=match):
        prepare(sim)


def test_allow_noncounts(sim):
    sim.X = sim.X * 0.5
    assert prepare(sim, allow_noncounts=True).n_cells == 300


def test_all_zero_input(sim):
    sim.X = sp.csr_matrix(sim.shape, dtype=np.float32)
    with pytest.raises(InputError, match="zero counts"):
        prepare(sim)


def test_bad_n_top_genes(sim):
    with pytest.raises(ParameterError, match="n_top_genes"):
        prepare(sim, n_top_genes=0)


def test_stats_align_new_data_and_warn_on_missing_genes(sim):
    prep = prepare(sim, n_top_genes=50)
    new = simulate_counts(n_cells=40, seed=3)[:, ::-1].copy()  # same genes, other order
    again = prepare(new, stats=prep.stats)
    assert list(again.stats.genes) == list(prep.stats.genes)
    cols = [list(new.var_names).index(g) for g in prep.stats.genes]
    assert np.array_equal(again.counts.toarray(), new.X.toarray()[:, cols])
    partial = new[:, [g for g in new.var_names if g != prep.stats.genes[0]]].copy()
    with pytest.warns(UserWarning, match="missing"):
        p2 = prepare(partial, stats=prep.stats)
    assert p2.counts[:, 0].nnz == 0
    other = new.copy()
    other.var_names = [f"x{j}" for j in range(new.n_vars)]
    with pytest.raises(InputError, match="none of the model"):
        prepare(other, stats=prep.stats)


def test_principal_axes_match_dense_pca():
    """The Gram-matrix PCA (linear in cells, dense only a chunk at a time) spans the same axes as PCA of the dense standardised matrix."""
    prep = prepare(simulate_counts(n_cells=250, n_genes=60, seed=3))
    axes = principal_axes(prep, 5, chunk_bytes=64 * 60 * 4)  # several chunks of 64 rows
    x = prep.logn.toarray()
    x = (x - prep.stats.mean) / prep.stats.std
    _, _, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
    assert axes.shape == (60, 5)
    cosines = np.abs(np.sum(axes * vt[:5].T, axis=0))
    assert np.all(cosines > 0.999), cosines


def test_counts_are_found_in_layers_or_raw_when_x_is_log_normalised(caplog):
    import logging

    import scanpy as sc

    from schashformer.errors import InputError
    from schashformer.preprocess import prepare, resolve_counts

    from .conftest import simulate_counts

    counts = simulate_counts(n_cells=60, n_genes=40, seed=3)
    logged = counts.copy()
    sc.pp.normalize_total(logged, target_sum=1e4)
    sc.pp.log1p(logged)
    # no counts anywhere: the error says where it looked
    with pytest.raises(InputError, match=r"neither adata.layers\['counts'\] nor adata.raw"):
        prepare(logged)
    # counts in layers["counts"]
    with_layer = logged.copy()
    with_layer.layers["counts"] = counts.X.copy()
    with caplog.at_level(logging.WARNING, logger="schashformer"):
        prep = prepare(with_layer)
    assert "using adata.layers['counts']" in caplog.text
    assert (prep.counts != prepare(counts).counts).nnz == 0
    # counts in .raw, X restricted to 30 genes: raw's own genes are read
    with_raw = counts.copy()
    with_raw.raw = with_raw
    with_raw = with_raw[:, :30].copy()
    sc.pp.normalize_total(with_raw, target_sum=1e4)
    sc.pp.log1p(with_raw)
    source, layer, where = resolve_counts(with_raw)
    assert where == "adata.raw.X" and layer is None and source.n_vars == 40 and source.n_obs == 60
    assert (prepare(with_raw).counts != prepare(counts).counts).nnz == 0
    # counts in X: nothing else is consulted, even with a counts layer present
    assert resolve_counts(with_layer, "counts")[2] == "adata.layers['counts']"
    counts.layers["counts"] = logged.X
    assert resolve_counts(counts)[2] == "adata.X"
