"""End-to-end quality floors on real labeled data at default settings (the README's main job)."""

import pytest

from schashformer import io, tl


@pytest.mark.slow
def test_pbmc_default_quality_floor():
    adata = io.read_bundled_pbmc()
    tl.cluster(adata, 8, labels_key="label", seed=0, progress=False)
    m = adata.uns["schashformer"]["metrics"]
    # scanpy Leiden at K=8 measures ARI ~0.76 / NMI ~0.77 here; the floor leaves room for seed noise.
    assert m["ari"] >= 0.60 and m["nmi"] >= 0.65, m


@pytest.mark.slow
def test_all_genes_file_selects_genes(shared_data):
    adata = io.read(shared_data / "mouse_bladder_cell_select_2100.h5")
    tl.cluster(adata, 16, labels_key="label", seed=0, progress=False, stage1_steps=100,
               stage2_pretrain_steps=100, stage2_cluster_steps=100)
    rec = adata.uns["schashformer"]
    assert len(rec["genes"]) == 2000 and rec["metrics"]["nmi"] >= 0.5, rec["metrics"]
