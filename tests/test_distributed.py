"""Distributed training (issues 7, 18): the one engine over torch.distributed, launched by torchrun, gloo on the CPU.

The main test runs ``schashformer cluster --nproc 2`` (two gloo processes on this machine) on
1500 real PBMC cells and compares its labels with a one-process fit of the same parameters.
The others check the pieces without a second process: the seurat gene selection from reduced
sums against scanpy, and a one-rank process group for the row exchange and the statistics.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch.distributed as dist
from sklearn.metrics import adjusted_rand_score

import schashformer as shf
from schashformer import distributed as D
from schashformer import worker
from schashformer.preprocess import GeneSums, log_normalise, prepare, select_genes
from tests.conftest import FAST, simulate_counts

# Short training at the default architecture: the point is agreement between 1 and 2 processes. Without
# dropout the ranks draw exactly the one-process batches, masks and noise, so only the order of floating-point
# sums differs; with dropout each rank draws its own masks and short runs drift apart (ARI 0.61-0.85 between
# 1 and 2 processes over seeds 0-2 here, 0.74-0.995 with the DDP trainer before: docs/DISTRIBUTED.md).
PARAMS = dict(stage1_steps=40, stage1_batch=256, stage2_pretrain_steps=20, stage2_cluster_steps=30,
              update_interval=15, kmeans_n_init=4, dropout=0.0)
N_TOP = 500  # fewer genes than the file has: the distributed run must select the same genes


@pytest.fixture(scope="module")
def pbmc_subset(shared_data, tmp_path_factory) -> Path:
    adata = shf.io.read(shared_data / "10X_PBMC_top2000.h5")
    idx = np.sort(np.random.default_rng(0).choice(adata.n_obs, 1500, replace=False))
    path = tmp_path_factory.mktemp("dist") / "pbmc1500.h5ad"
    adata[idx].copy().write_h5ad(path)
    return path


def _cli(argv: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "schashformer.cli", *argv], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_two_gloo_processes_agree_with_one(pbmc_subset, tmp_path):
    # one process, the ordinary path
    one = shf.io.read(pbmc_subset)
    shf.tl.cluster(one, 8, n_top_genes=N_TOP, seed=0, device="cpu", progress=False, **PARAMS)
    # two processes through the command line: torchrun, gloo, one result written by rank 0
    out = tmp_path / "out2"
    params = [a for k, v in PARAMS.items() for a in ("--param", f"{k}={v}")]
    run = _cli(["cluster", str(pbmc_subset), "--n-clusters", "8", "--n-top-genes", str(N_TOP), "--out", str(out),
                "--device", "cpu", "--labels-key", "label", "--no-umap", "--quiet", "--nproc", "2", *params])
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 shards (gloo, cpu)" in run.stdout
    written = sorted(p.name for p in out.iterdir())
    assert {"result.h5ad", "clusters.csv", "metrics.json"} <= set(written), written
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out2")]  # no staging left
    two = shf.io.read(out / "result.h5ad")
    assert two.n_obs == one.n_obs and list(two.obs_names) == list(one.obs_names)
    # same genes from all-reduced statistics, and labels that agree with one process
    assert list(two.uns["schashformer"]["genes"]) == list(one.uns["schashformer"]["genes"])
    ari = adjusted_rand_score(one.obs["schashformer"], two.obs["schashformer"])
    assert ari >= 0.99, f"ARI between the 1- and 2-process labels is {ari:.3f}"
    clusters = pd.read_csv(out / "clusters.csv")
    assert len(clusters) == 1500 and clusters["schashformer"].nunique() <= 8
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["metrics"]["ari"] > 0.4 and metrics["timings"]["stage1_hashing"]["steps_per_s"] > 0


def test_seurat_hvg_from_sums_matches_scanpy():
    """Genes selected from per-gene sums of two shards, added (what all_reduce does), are scanpy's."""
    import scanpy as sc

    adata = simulate_counts(n_cells=400, n_genes=3000, seed=7)
    x = sp.csr_matrix(adata.X, dtype=np.float32)
    total = np.asarray(x.sum(1)).ravel()
    logn = log_normalise(x[total > 0], total[total > 0])
    sums = GeneSums.of(logn[:200]) + GeneSums.of(logn[200:])
    detected = np.flatnonzero(np.diff(logn.tocsc().indptr) > 0)
    for n_top in (300, 2000):
        hvg = sc.pp.highly_variable_genes(ad.AnnData(logn[:, detected]), n_top_genes=n_top, flavor="seurat",
                                          inplace=False)
        np.testing.assert_array_equal(select_genes(sums, n_top), detected[np.asarray(hvg["highly_variable"], bool)])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def one_rank(monkeypatch):
    """A real gloo process group of one rank in this process."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    ctx = D.init("cpu")
    yield ctx
    if dist.is_initialized():
        dist.destroy_process_group()


def test_exchange_and_statistics_on_one_rank(one_rank, shared_data):
    ctx = one_rank
    # the X/Y .h5 shard reader (h5py row blocks) gives what the ordinary reader gives
    path = shared_data / "mouse_bladder_cell_top2000.h5"
    shard, n, first = D.read_shard(ctx, path)
    full = shf.io.read(path)
    assert (n, first) == (full.n_obs, 0) and list(shard.obs_names) == list(full.obs_names)
    assert (shard.X != full.X).nnz == 0 and (shard.obs["label"].astype(str) == full.obs["label"].astype(str)).all()
    assert ctx.backend == "gloo" and ctx.world == 1
    # rows come back in the order asked for, dense and sparse
    store = D.RowStore(ctx, np.arange(10, 20))
    table = np.arange(10, 20, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    want = np.array([19, 10, 15, 15])
    np.testing.assert_array_equal(store.fetch(table, want, np.zeros(4, np.int64))[:, 0], want)
    m = sp.random(10, 7, density=0.4, format="csr", random_state=0, dtype=np.float32)
    got = store.fetch_csr(m, want, np.zeros(4, np.int64))
    np.testing.assert_array_equal(got.toarray(), m[want - 10].toarray())
    # the shard statistics equal the one-process ones (up to float32 rounding of the sums)
    adata = simulate_counts(n_cells=200, n_genes=300, seed=3)
    ours, ref = prepare(adata, n_top_genes=100, comm=D.DistComm(ctx)), prepare(adata, n_top_genes=100)
    np.testing.assert_array_equal(ours.stats.genes, ref.stats.genes)
    np.testing.assert_array_equal(ours.stats.mean, ref.stats.mean)
    np.testing.assert_array_equal(ours.stats.std, ref.stats.std)
    assert ours.stats.median_library == ref.stats.median_library
    np.testing.assert_array_equal(ours.size_factors, ref.size_factors)
    assert (D.shard_bounds(10, 3) == [0, 3, 6, 10]).all()


def test_refused_input_is_one_line_on_every_rank(one_rank, tmp_path, capsys, monkeypatch):
    # what each torchrun worker does with a bad input: one line, no trace, exit status 2
    argv = ["cluster", str(tmp_path / "missing.h5ad"), "--n-clusters", "3", "--out", str(tmp_path / "o"),
            "--device", "cpu", "--quiet"]
    assert worker.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("schashformer: error:") and "no such file" in err and "Traceback" not in err
    # under the --nproc launcher the message goes to its file and the worker exits 0 (no torchrun trace)
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    D.init("cpu")
    monkeypatch.setenv(D.ERROR_FILE_ENV, str(tmp_path / "error.txt"))
    assert worker.main(argv) == 0
    assert "no such file" in (tmp_path / "error.txt").read_text()
    assert not (tmp_path / "o").exists()


def test_worker_exit_keeps_its_output_and_status():
    # a rank ends by os._exit (no interpreter teardown for gloo's threads to abort in): what it printed
    # into a pipe must still arrive, and its exit status must be the one main returned
    code = "from schashformer.worker import exit_now; print('result written'); exit_now(3)"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # a pipe is block-buffered then
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 3 and run.stdout == "result written\n", (run.returncode, run.stdout, run.stderr)


@pytest.mark.parametrize("extra", [dict(n_clusters=3), dict(n_clusters=None, w_consistency=0.05, init="leiden")])
def test_one_rank_reproduces_the_local_loss_history_step_for_step(one_rank, extra):
    """The same engine runs both: a one-rank torch.distributed fit (DistComm, sharded chunks) equals the
    one-process fit, loss for loss and label for label; K estimation, Leiden init and the consistency
    loss included."""
    adata = simulate_counts(n_cells=300, n_genes=200, n_types=3, seed=4)
    params = {**FAST, **extra, "n_top_genes": 150, "seed": 1, "device": "cpu", "progress": False}
    local = shf.SCHashFormer(**params).fit(adata)
    dist_model = D.fit(one_rank, adata.copy(), shf.SCHashFormer(**params))
    assert [h["step"] for h in dist_model.history_] == [h["step"] for h in local.history_]
    assert dist_model.history_ == local.history_
    np.testing.assert_array_equal(dist_model.labels_, local.labels_)
    np.testing.assert_array_equal(dist_model.embedding_, local.embedding_)
    assert dist_model.n_clusters_ == local.n_clusters_


@pytest.mark.slow
def test_distributed_fit_resumes_bit_exactly(one_rank, tmp_path, monkeypatch):
    """A multi-process fit checkpoints per rank (``rank-R-of-W``) and resumes: a fit stopped right
    after a mid-stage-2 checkpoint and resumed ends with the labels of an uninterrupted one."""
    from schashformer.checkpoint import Checkpointer

    adata = simulate_counts(n_cells=240, n_genes=150, n_types=3, seed=6)
    params = {**FAST, "n_top_genes": 120, "seed": 2, "device": "cpu", "progress": False, "checkpoint_every": 10,
              "tol": 0.0}
    straight = D.fit(one_rank, adata.copy(), shf.SCHashFormer(3, **params))
    real_save = Checkpointer.save

    class Stop(Exception):
        pass

    def stop_in_pretrain(self, phase, step=0, **items):
        real_save(self, phase, step, **items)
        if phase == "pretrain":
            raise Stop
    monkeypatch.setattr(Checkpointer, "save", stop_in_pretrain)
    with pytest.raises(Stop):
        D.fit(one_rank, adata.copy(), shf.SCHashFormer(3, **params), checkpoint_dir=tmp_path / "ck")
    monkeypatch.setattr(Checkpointer, "save", real_save)
    assert (tmp_path / "ck" / "rank-0-of-1" / "checkpoint.pt").exists()
    resumed = D.fit(one_rank, adata.copy(), shf.SCHashFormer(3, **params), checkpoint_dir=tmp_path / "ck", resume=True)
    np.testing.assert_array_equal(resumed.labels_, straight.labels_)
    assert resumed.history_ == straight.history_
    assert not (tmp_path / "ck" / "rank-0-of-1").exists()  # removed after the successful fit
