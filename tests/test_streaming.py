"""Out-of-core path (issue 4): streamed statistics equal the in-memory ones, chunks stay bounded,
the fit labels every cell, the command line streams large .h5ad files."""

import json

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from schashformer import record, resources
from schashformer.errors import InputError, ResourceError
from schashformer.model import SCHashFormer
from schashformer.preprocess import gene_stats, prepare, select_genes
from schashformer.streaming import CountSource, chunk_logn, data_checksum, fit_out_of_core, scan

from .conftest import FAST, simulate_counts


@pytest.fixture
def big_sim():
    """600 cells, 3 types, 200 genes, one cell without counts."""
    a = simulate_counts(n_cells=600, n_genes=200, n_types=3, seed=5)
    x = a.X.tolil()
    x[7, :] = 0
    a.X = x.tocsr()
    return a


def test_streamed_gene_statistics_equal_prepare(big_sim):
    ref = prepare(big_sim, n_top_genes=50)
    st = scan(CountSource.from_anndata(big_sim), np.arange(0), chunk_rows=37)
    cols = select_genes(st.sums, 50)
    stats = gene_stats(st.sums, cols, big_sim.var_names, ref.stats.median_library)
    assert list(stats.genes) == list(ref.stats.genes)
    np.testing.assert_allclose(stats.mean, ref.stats.mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.std, ref.stats.std, rtol=1e-5, atol=1e-6)
    assert st.sums.n == 599 and not st.cell_mask[7]


def test_chunk_logn_equals_prepare(big_sim):
    ref = prepare(big_sim, n_top_genes=50)
    columns = big_sim.var_names.get_indexer(ref.stats.genes)
    logn, keep = chunk_logn(sp.csr_matrix(big_sim.X, dtype=np.float32), columns)
    assert np.array_equal(keep, ref.cell_mask)
    assert (logn != ref.logn).nnz == 0


def test_sample_rows_kept_and_checksum_matches(big_sim):
    x = big_sim.X.copy()
    x[3, 5] = 0  # an explicit zero: the checksum is of the canonical matrix
    big_sim.X = x
    src = CountSource.from_anndata(big_sim)
    rows = np.array([0, 40, 41, 599])
    st = scan(src, rows, chunk_rows=41)
    assert (sp.vstack(st.sample) != big_sim.X[rows]).nnz == 0
    assert data_checksum(src, st, chunk_rows=41) == record.data_checksum(big_sim.X)
    assert data_checksum(src, chunk_rows=100) == record.data_checksum(big_sim.X)


def test_backed_file_read_in_bounded_chunks(big_sim, tmp_path):
    path = tmp_path / "cells.h5ad"
    big_sim.write_h5ad(path)
    src = CountSource.from_h5ad(path)
    seen = []
    real = src._x

    class Spy:  # records every row slice asked of the file
        shape = real.shape

        def __getitem__(self, key):
            seen.append(key.stop - key.start)
            return real[key]

    src._x = Spy()
    assert (sp.vstack([b for _, b in src.chunks(64)]) != big_sim.X).nnz == 0
    assert max(seen) <= 64
    src.close()
    big_sim.X = big_sim.X.tocsc()
    big_sim.write_h5ad(tmp_path / "csc.h5ad")
    with pytest.raises(InputError, match="CSC"):
        CountSource.from_h5ad(tmp_path / "csc.h5ad")


def test_fit_out_of_core_labels_every_cell(big_sim, tmp_path):
    path = tmp_path / "cells.h5ad"
    big_sim.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    cap = FAST.get("stage1_steps", 400) // 2  # stage 1 on the subsample stops at stage1_steps_subsample
    # float32 streamed passes (bf16 ones on a CPU with bf16 units: test_inference_precision_of_the_streamed_passes)
    model = SCHashFormer(3, seed=0, progress=False, n_top_genes=100, train_cells=300, mixed_precision=False,
                         **{**FAST, "stage1_steps_subsample": cap})
    model.fit(backed, labels_key="label")  # backed AnnData: routed to the out-of-core path
    assert model.out_of_core_ and len(model.train_rows_) == 300
    assert max(r["step"] for r in model.history_ if r["stage"] == 1) == cap - 1
    assert model.config.stage1_steps == FAST.get("stage1_steps", 400)  # the stored configuration is the user's
    assert model.labels_.shape == (600,) and model.labels_[7] == -1 and (np.delete(model.labels_, 7) >= 0).all()
    assert model.embedding_.shape[0] == 600 and model.codes_.shape == (600, model.config.hash_heads)
    assert {"read_statistics", "train_stage1_hashing", "hash_all", "encode_all", "assign_all"} <= set(model.timings_)
    from sklearn.metrics import adjusted_rand_score

    truth = big_sim.obs["label"].to_numpy()
    keep = model.labels_ >= 0
    assert adjusted_rand_score(truth[keep], model.labels_[keep]) > 0.8
    # the streamed passes (hash, encode, assign chunk by chunk) give every cell what the trained model
    # gives it in memory, up to the float16 rounding of the stored tokens (~5e-4 of their size)
    z_mem = model.transform(big_sim)
    assert z_mem.shape == model.embedding_.shape
    scale = np.abs(z_mem).max()
    np.testing.assert_allclose(z_mem, model.embedding_, rtol=0, atol=5e-3 * scale)
    assert np.abs(z_mem - model.embedding_).mean() < 1e-3 * scale
    assert (model.predict(big_sim) == model.labels_).mean() > 0.99


def test_memory_guard_refuses_before_reading(big_sim, monkeypatch):
    monkeypatch.setattr(resources, "available_bytes", lambda: 1000)
    model = SCHashFormer(3, progress=False, train_cells=100, **FAST)
    with pytest.raises(ResourceError, match="out of core"):
        fit_out_of_core(model, CountSource.from_anndata(big_sim))


@pytest.mark.slow  # a whole command-line run (fast lane under 5 minutes)
def test_cli_streams_h5ad_and_simulates(tmp_path):
    from schashformer import cli

    sim = tmp_path / "sim.h5ad"
    assert cli.main(["simulate", "--cells", "700", "--out", str(sim), "--quiet"]) == 0
    out = tmp_path / "res"
    params = [a for k, v in {**FAST, "train_cells": 400}.items() for a in ("--param", f"{k}={v}")]
    rc = cli.main(["cluster", str(sim), "--n-clusters", "8", "--labels-key", "cell_type", "--out", str(out),
                   "--no-umap", "--quiet", *params])
    assert rc == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["out_of_core"] and report["n_cells"] == 700 and "ari" in report["metrics"]
    res = ad.read_h5ad(out / "result.h5ad")
    src = ad.read_h5ad(sim)
    assert (res.X != src.X).nnz == 0  # the input copied, not rewritten
    assert res.obs["schashformer"].notna().all() and res.obsm["X_schashformer"].shape[0] == 700
    assert res.uns["schashformer"]["data_checksum"] == record.data_checksum(src.X)


def test_inference_precision_of_the_streamed_passes(big_sim, monkeypatch):
    """bfloat16 streamed passes (forced here, as on a GPU or a CPU with bf16 units) keep dtypes, nearly all codes
    and labels, and z within bf16 rounding; ``mixed_precision=False`` keeps float32 whatever the hardware, and
    in-memory inference is float32 either way."""
    from schashformer import engine, streaming

    model = SCHashFormer(3, seed=0, progress=False, n_top_genes=100, mixed_precision=False, **FAST).fit(big_sim)
    src, cpu = CountSource.from_anndata(big_sim), torch.device("cpu")
    codes, ties, tokens, mask = streaming.hash_all(model, src, chunk_rows=128)
    # the streaming pass hashes cells as the in-memory fit did (float rounding may flip a rare bit)
    assert (codes == model.codes_[mask]).all(1).mean() > 0.99
    z32 = streaming.encode_all(model, tokens, engine.sorted_orders(codes, ties), cpu)
    z_mem = model.transform(big_sim)
    monkeypatch.setattr(engine, "native_bf16", lambda device: True)
    off = streaming.hash_all(model, src, chunk_rows=128)
    assert np.array_equal(off[0], codes) and np.array_equal(off[1], ties)  # the flag wins over the hardware
    assert np.array_equal(streaming.encode_all(model, tokens, engine.sorted_orders(codes, ties), cpu), z32)
    model.set_params(mixed_precision=True)
    codes16, ties16, tokens16, mask16 = streaming.hash_all(model, src, chunk_rows=128)
    assert tokens16.dtype == np.float16 and ties16.dtype == np.float64 and np.array_equal(mask, mask16)
    assert (codes16 == codes).mean() > 0.8 and not np.array_equal(ties16, ties)
    assert np.abs(tokens16.astype(np.float32) - tokens).mean() < 0.1 * np.abs(tokens.astype(np.float32)).mean()
    z16 = streaming.encode_all(model, tokens16, engine.sorted_orders(codes16, ties16), cpu)
    assert z16.dtype == np.float32 and not np.array_equal(z16, z32)
    assert np.abs(z16 - z32).mean() < 0.02 * np.abs(z32).mean()
    assert (streaming.assign_all(model, z16, cpu) == streaming.assign_all(model, z32, cpu)).mean() > 0.95
    assert np.array_equal(model.transform(big_sim), z_mem)  # in memory: float32 whatever the flag


def test_reduced_precision_only_out_of_core(big_sim, monkeypatch):
    """An out-of-core fit embeds its training subsample and every cell under inference_precision; an in-memory
    fit never enters it (bf16 there cost the suite 0.005 mean ARI)."""
    from schashformer import engine

    calls = []
    real = engine.inference_precision

    def spy(device, cfg):
        calls.append(device.type)
        return real(device, cfg)

    monkeypatch.setattr(engine, "inference_precision", spy)
    SCHashFormer(3, seed=0, progress=False, n_top_genes=100, **FAST).fit(big_sim)
    assert calls == []
    fit_out_of_core(SCHashFormer(3, seed=0, progress=False, n_top_genes=100, train_cells=300, **FAST),
                    CountSource.from_anndata(big_sim), chunk_rows=128)
    # the subsample's embeddings (start, refreshes, final), then hashing and embedding all 599 kept cells
    assert len(calls) > 10 and set(calls) == {"cpu"}


def test_tl_cluster_on_backed_anndata(big_sim, tmp_path):
    from schashformer import tl

    big_sim.write_h5ad(tmp_path / "cells.h5ad")
    backed = ad.read_h5ad(tmp_path / "cells.h5ad", backed="r")
    tl.cluster(backed, 3, labels_key="label", progress=False, train_cells=300, **FAST)
    assert backed.isbacked and backed.obs["schashformer"].notna().sum() == 599  # the empty cell has no label
    assert backed.uns["schashformer"]["data_checksum"] == record.data_checksum(big_sim.X)
    assert backed.uns["schashformer"]["metrics"]["ari"] > 0.8
