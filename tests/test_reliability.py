"""Issue 21, "Reliability, round two": each item refused or handled before any training, with one line.

One test (or a few) per item; ``ROWS`` maps each docs/VALIDATION.md row added for the issue to its
test, and ``test_validation.test_every_documented_row_is_tested`` checks the table against it.
New modules (``outdir``, ``interrupt``) are imported inside the tests, so that on code without
them each test fails on its own assertion rather than the whole file on an import.
"""

import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from schashformer import SCHashFormer, cli, io, n_clusters, tl
from schashformer.errors import InputError, OutputExistsError, ParameterError
from tests.conftest import DATA, simulate_counts
from tests.test_validation import TINY, TINY_ARGS, small

PBMC = DATA / "10X_PBMC_top2000.h5"
ROOT = Path(__file__).resolve().parents[1]

# docs/VALIDATION.md rows of issue 21 -> the test that checks each
ROWS = {
    "V69": "test_v69_resolution_too_high_for_the_cells_is_refused_before_training",
    "V70": "test_v70_too_fine_partition_lowers_the_resolution_with_a_warning",
    "V71": "test_v71_table_without_header_or_row_names_is_refused",
    "V72": "test_v72_genes_x_cells_table_without_transpose_is_refused",
    "V73": "test_v73_unwritable_out_is_refused_before_reading",
    "V74": "test_v74_seed_beyond_2_32_is_refused",
    "V75": "test_v75_v76_v77_bad_values_are_one_line_errors",
    "V76": "test_v75_v76_v77_bad_values_are_one_line_errors",
    "V77": "test_v75_v76_v77_bad_values_are_one_line_errors",
    "V78": "test_v78_second_run_on_a_locked_out_is_refused_with_the_pid",
    "V79": "test_v79_old_results_left_by_a_crash_are_recovered",
    "V80": "test_v80_ctrl_c_and_sigterm_are_one_line_and_resumable",
    "V81": "test_v81_raw_counts_are_pointed_to_and_usable",
    "V82": "test_v82_cells_with_zero_counts_are_reported",
    "V83": "test_v83_fewer_genes_than_token_pcs_warns",
    "V84": "test_v84_input_holding_results_is_not_a_python_message",
}


def run(argv, capsys):
    """cli.main(argv) -> (exit status, stderr)."""
    try:
        code = cli.main([str(a) for a in argv])
    except KeyboardInterrupt:  # would abort the whole test session
        pytest.fail("KeyboardInterrupt escaped cli.main: the user sees a traceback")
    return code, capsys.readouterr().err.strip()


def one_error_line(err: str, pattern: str) -> None:
    assert err.startswith("schashformer: error: ") and "\n" not in err and "Traceback" not in err, err
    assert re.search(pattern, err), err


def cluster_argv(inp, out, *extra):
    return ["cluster", str(inp), "--n-clusters", "3", "--out", str(out), "--quiet", "--no-umap", *TINY_ARGS, *extra]


@pytest.fixture
def no_training(monkeypatch):
    """Training fails the test: the refusal must come before it."""
    def fail(*a, **k):
        raise AssertionError("training started")
    monkeypatch.setattr("schashformer.engine.fit", fail)


@pytest.fixture
def pbmc300() -> ad.AnnData:
    if not PBMC.exists():
        pytest.skip(f"shared data not found at {PBMC}")
    return io.read(PBMC)[:300].copy()


# ----------------------------------------------------------------------------- 1: --resolution
def test_v69_resolution_too_high_for_the_cells_is_refused_before_training(pbmc300, tmp_path, capsys, no_training):
    for res in (50, 1000):  # on these cells 5 gave 25 clusters, 50 and 1000 fell back to 2
        with pytest.raises(ParameterError, match=rf"resolution={res} is too high for 300 cells: above about 10 "):
            tl.cluster(pbmc300.copy(), resolution=res, progress=False, **TINY)
    assert n_clusters.max_resolution(300, 15) == pytest.approx(10)
    n_clusters.check_resolution_for(10, 300)
    pbmc300.write_h5ad(tmp_path / "pbmc300.h5ad")
    code, err = run(["cluster", tmp_path / "pbmc300.h5ad", "--resolution", "50", "--out", tmp_path / "out",
                     "--quiet", *TINY_ARGS], capsys)
    assert code == 2
    one_error_line(err, r"resolution=50 is too high for 300 cells.*--n-clusters")
    assert not (tmp_path / "out").exists()


def test_v70_too_fine_partition_lowers_the_resolution_with_a_warning():
    rng = np.random.default_rng(0)
    z = np.concatenate([rng.normal(c, 0.3, size=(100, 4)) for c in (0.0, 5.0, 10.0)]).astype(np.float32)
    orders = [np.argsort(z[:, 0] + 1e-3 * z[:, 1])]
    with pytest.warns(UserWarning, match=r"resolution=1000 split the 300 cells into communities smaller than 2 "
                                         r"cells; used resolution [\d.e+-]+ instead"):
        k, labels = n_clusters.estimate(z, orders, 16, resolution=1000)
    assert k >= 3 and labels.max() + 1 == k  # not the silent fall-back to the 2 largest fragments
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an ordinary resolution: no warning
        n_clusters.estimate(z, orders, 16, resolution=0.5)


# ----------------------------------------------------------------------------- 2: tables without names, orientation
def test_v71_table_without_header_or_row_names_is_refused(tmp_path, capsys):
    counts = np.random.default_rng(0).poisson(2.0, size=(300, 300))
    pd.DataFrame(counts).to_csv(tmp_path / "numbers.csv", header=False, index=False)
    with pytest.raises(InputError, match=r"numbers\.csv: the header holds numbers .* no header row"):
        io.read(tmp_path / "numbers.csv")
    code, err = run(cluster_argv(tmp_path / "numbers.csv", tmp_path / "out"), capsys)
    assert code == 2 and not (tmp_path / "out").exists()
    one_error_line(err, r"numbers\.csv: the header holds numbers")
    # a header but no row names: the first gene would become the cell names
    pd.DataFrame(counts, columns=[f"g{j}" for j in range(300)]).to_csv(tmp_path / "norows.csv", index=False)
    with pytest.raises(InputError, match=r"norows\.csv: the first column holds repeated numbers"):
        io.read(tmp_path / "norows.csv")
    # numbers as names are fine when they are names: a 0, 1, 2, ... index, or distinct (Entrez) gene ids
    pd.DataFrame(counts).to_csv(tmp_path / "index.csv")
    assert io.read(tmp_path / "index.csv").shape == (300, 300)
    entrez = pd.DataFrame(counts, index=[f"c{i}" for i in range(300)], columns=[str(1000 + 7 * j) for j in range(300)])
    entrez.to_csv(tmp_path / "entrez.csv")
    assert io.read(tmp_path / "entrez.csv").shape == (300, 300)


def test_v72_genes_x_cells_table_without_transpose_is_refused(pbmc300, tmp_path, capsys):
    a = pbmc300[:, :300]
    cells_x_genes = pd.DataFrame(a.X.toarray().astype(int), index=a.obs_names, columns=a.var_names)
    cells_x_genes.T.to_csv(tmp_path / "genes_x_cells.tsv", sep="\t")
    cells_x_genes.to_csv(tmp_path / "cells_x_genes.tsv", sep="\t")
    with pytest.raises(InputError, match=r"genes_x_cells\.tsv: the rows look like genes, not cells .*--transpose"):
        io.read(tmp_path / "genes_x_cells.tsv")
    code, err = run(cluster_argv(tmp_path / "genes_x_cells.tsv", tmp_path / "out"), capsys)
    assert code == 2 and not (tmp_path / "out").exists()
    one_error_line(err, r"the rows look like genes, not cells")
    back = io.read(tmp_path / "genes_x_cells.tsv", transpose=True)
    assert list(back.obs_names[:3]) == list(a.obs_names[:3])
    assert io.read(tmp_path / "genes_x_cells.tsv", transpose=False).n_obs == 300  # asked for: rows are cells
    assert list(io.read(tmp_path / "cells_x_genes.tsv").obs_names[:3]) == list(a.obs_names[:3])  # right way round
    args = cli.build_parser().parse_args(["cluster", "x.tsv", "--out", "o", "--no-transpose"])
    assert args.transpose is False
    assert cli.build_parser().parse_args(["cluster", "x.tsv", "--out", "o"]).transpose is None


# ----------------------------------------------------------------------------- 3: unwritable --out
def test_v73_unwritable_out_is_refused_before_reading(tmp_path, capsys, monkeypatch, no_training):
    import tempfile

    small().write_h5ad(tmp_path / "in.h5ad")
    (tmp_path / "file.txt").write_text("a file")
    read = io.read

    def no_reading(*a, **k):
        raise AssertionError("input read")
    monkeypatch.setattr(io, "read", no_reading)
    # a path under a file (refused even for root)
    code, err = run(cluster_argv(tmp_path / "in.h5ad", tmp_path / "file.txt" / "out"), capsys)
    assert code == 2
    one_error_line(err, r"--out .*file\.txt/out: cannot be created, .*file\.txt is a file, not a folder")
    # a read-only parent as os.access reports it to a normal user
    (tmp_path / "ro").mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if Path(p) == tmp_path / "ro" else real_access(p, mode))
    code, err = run(cluster_argv(tmp_path / "in.h5ad", tmp_path / "ro" / "out"), capsys)
    assert code == 2
    one_error_line(err, r"ro/out: cannot write in .*ro \(permission denied\)")
    # a folder where os.access says yes but writing fails (root on a read-only mount, a mode-555 --out)
    (tmp_path / "out555").mkdir()
    real_mkstemp = tempfile.mkstemp

    def refuse(*a, dir=None, **k):
        if dir is not None and Path(dir) == tmp_path / "out555":
            raise PermissionError(13, "Permission denied")
        return real_mkstemp(*a, dir=dir, **k)
    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    code, err = run(cluster_argv(tmp_path / "in.h5ad", tmp_path / "out555"), capsys)
    assert code == 2
    one_error_line(err, r"out555: cannot write in .*out555 \(PermissionError: Permission denied\)")
    assert list((tmp_path / "out555").iterdir()) == []
    monkeypatch.setattr(io, "read", read)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into mode-555 folders")
def test_v73_mode_555_out_is_refused_for_a_normal_user(tmp_path, capsys, no_training):
    small().write_h5ad(tmp_path / "in.h5ad")
    (tmp_path / "out").mkdir(mode=0o555)
    code, err = run(cluster_argv(tmp_path / "in.h5ad", tmp_path / "out"), capsys)
    assert code == 2 and "cannot write in" in err


# ----------------------------------------------------------------------------- 4, 5: seeds and other values
def test_v74_seed_beyond_2_32_is_refused(tmp_path, capsys, no_training):
    SCHashFormer(3, seed=2**32 - 1).check_params()
    for seed in (2**32, 2**64):  # the estimator checks its parameters in check_params (fit, the CLI before reading)
        with pytest.raises(ParameterError, match=rf"seed must be an integer <= 4294967295 .*got {seed}$"):
            SCHashFormer(3, seed=seed).check_params()
    small().write_h5ad(tmp_path / "in.h5ad")
    for seed in ("4294967296", "18446744073709551616"):
        code, err = run(cluster_argv(tmp_path / "in.h5ad", tmp_path / "out", "--seed", seed), capsys)
        assert code == 2 and not (tmp_path / "out").exists()
        one_error_line(err, rf"seed must be an integer <= 4294967295 .*got {seed}")


@pytest.mark.parametrize("extra,pattern", [
    (["--param", "lr=nan"], r"parameter lr must be a finite number, got nan"),
    (["--param", "w_kl=inf"], r"parameter w_kl must be a finite number, got inf"),  # the alpha, renamed
    (["--param", "w_kl=-1"], r"parameter w_kl must be >= 0, got -1"),
    (["--param", "input_noise=-1"], r"parameter input_noise must be >= 0, got -1"),
    (["--device", "mps"], r"device='mps' is not supported; use 'auto', 'cpu' or 'cuda'"),
    (["--device", "meta"], r"device='meta' is not supported"),
])
def test_v75_v76_v77_bad_values_are_one_line_errors(extra, pattern, tmp_path, capsys, no_training):
    small().write_h5ad(tmp_path / "in.h5ad")
    code, err = run(cluster_argv(tmp_path / "in.h5ad", tmp_path / "out", *extra), capsys)
    assert code == 2 and not (tmp_path / "out").exists()
    one_error_line(err, pattern)


def test_v75_v76_v77_api_refuses_the_same_values():
    with pytest.raises(ParameterError, match="lr must be a finite number"):
        SCHashFormer(3, lr=float("nan")).check_params()
    with pytest.raises(ParameterError, match="input_noise must be >= 0"):
        SCHashFormer(3, input_noise=-1.0).check_params()
    with pytest.raises(ParameterError, match="device='meta' is not supported"):
        SCHashFormer(3, device="meta", progress=False, **TINY).fit(small())


# ----------------------------------------------------------------------------- 7: lock and recovery
def test_v78_second_run_on_a_locked_out_is_refused_with_the_pid(tmp_path, capsys, no_training):
    small().write_h5ad(tmp_path / "in.h5ad")
    out = tmp_path / "out"
    # another process holding the lock the way a run does (flock on .out.lock beside out, its pid inside)
    script = ("import fcntl, os, time; "
              f"fd = os.open({str(tmp_path / '.out.lock')!r}, os.O_RDWR | os.O_CREAT); "
              "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, f'{os.getpid()}\\n'.encode()); "
              "print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for extra in ([], ["--overwrite"]):
            code, err = run(cluster_argv(tmp_path / "in.h5ad", out, *extra), capsys)
            assert code == 2
            one_error_line(err, rf"--out .*out is in use by another scHashFormer run \(process {holder.pid}\); wait "
                                r"for it to finish or choose another --out")
    finally:
        holder.kill()
        holder.wait()
    assert not out.exists()
    from schashformer.outdir import OutLock, lock_path

    assert lock_path(out) == tmp_path / ".out.lock" and lock_path(out).exists()  # left by the killed holder: holds no lock, is taken over
    with OutLock(out):
        with pytest.raises(OutputExistsError, match=rf"process {os.getpid()}"):
            OutLock(out).acquire()
    assert not lock_path(out).exists()  # removed when released


def test_v78_concurrent_runs_one_trains_the_other_is_refused_at_once(tmp_path, capsys, monkeypatch):
    """The second run on the same new folder is refused while the first trains, not after its own training."""
    small(60, 40).write_h5ad(tmp_path / "in.h5ad")
    out, seen = tmp_path / "out", {}
    fit = SCHashFormer.fit

    def fit_while_another_run_starts(self, *a, **k):
        if "second" not in seen:  # the second run (if it got this far) trains normally
            seen["second"] = None
            code = cli.main(cluster_argv(tmp_path / "in.h5ad", out, "--overwrite"))
            seen["second"] = (code, capsys.readouterr().err.strip())
        return fit(self, *a, **k)
    monkeypatch.setattr(SCHashFormer, "fit", fit_while_another_run_starts)
    assert cli.main(cluster_argv(tmp_path / "in.h5ad", out)) == 0
    code, err = seen["second"]
    assert code == 2 and f"(process {os.getpid()})" in err, err
    assert (out / "clusters.csv").exists() and not (tmp_path / ".out.lock").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_v79_old_results_left_by_a_crash_are_recovered(tmp_path, capsys, no_training):
    small().write_h5ad(tmp_path / "in.h5ad")
    out = tmp_path / "out"
    # killed between moving the old results aside and the new ones in: out is missing
    old = tmp_path / ".out.old-k1ll"
    (old / ".checkpoint").mkdir(parents=True)
    (old / "clusters.csv").write_text("cell,schashformer\nc0,1\n")
    (old / "metrics.json").write_text("{}")
    code, err = run(cluster_argv(tmp_path / "in.h5ad", out), capsys)
    assert code == 2  # the restored results are not replaced without --overwrite
    assert "restored the results of an earlier run from" in err and "already holds results" in err
    assert (out / "clusters.csv").read_text() == "cell,schashformer\nc0,1\n" and not old.exists()
    # killed after the new results were in place: the replaced ones and a staging folder are deleted
    (old / "model").mkdir(parents=True)
    partial = tmp_path / ".out.partial-k1ll"
    partial.mkdir()
    (partial / "result.h5ad").write_text("half")
    code, err = run(cluster_argv(tmp_path / "in.h5ad", out), capsys)
    assert code == 2 and not old.exists() and not partial.exists()
    assert (out / "clusters.csv").exists()
    # never deleted: a folder of the same name holding something else
    (old / "notes.txt").parent.mkdir()
    (old / "notes.txt").write_text("mine")
    run(cluster_argv(tmp_path / "in.h5ad", out), capsys)
    assert (old / "notes.txt").read_text() == "mine"


# ----------------------------------------------------------------------------- 6: Ctrl-C and SIGTERM
@pytest.mark.parametrize("how", ["sigint", "sigterm"])
def test_v80_ctrl_c_and_sigterm_are_one_line_and_resumable(how, tmp_path, capsys, monkeypatch):
    from schashformer import checkpoint

    small(60, 40).write_h5ad(tmp_path / "in.h5ad")
    out = tmp_path / "out"
    argv = cluster_argv(tmp_path / "in.h5ad", out, "--checkpoint-every", "1", "--seed", "3")
    save = checkpoint.Checkpointer.save

    def save_then_signal(self, phase, step=0, **items):
        save(self, phase, step, **items)
        if phase == "pretrain" and step == 1:
            os.kill(os.getpid(), signal.SIGINT if how == "sigint" else signal.SIGTERM)
            time.sleep(1)  # the handler runs here
    monkeypatch.setattr(checkpoint.Checkpointer, "save", save_then_signal)

    def outside_main(signum, frame):  # SIGTERM outside cli.main (and in code without its handler): fail, not die
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, outside_main)
    # a test run started in the background (nohup, `&`) inherits SIGINT ignored: give Ctrl-C its usual meaning
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code, err = run(argv, capsys)
        restored = signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
        monkeypatch.undo()
    assert restored is outside_main  # cli.main puts back the handler it found
    assert code == (130 if how == "sigint" else 143)
    assert "\n" not in err and "Traceback" not in err, err
    what = "interrupted" if how == "sigint" else r"terminated \(SIGTERM\)"
    assert re.fullmatch(rf"schashformer: {what} at stage 2 pre-training step 1 \(last checkpoint, kept in "
                        rf".*out/\.checkpoint\); resume with: schashformer cluster .* --resume", err), err
    assert sorted(p.name for p in out.iterdir()) == [".checkpoint"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging folder, no lock
    import shlex

    resume = shlex.split(err.split("resume with: ")[1])[1:]
    assert cli.main(resume) == 0 and (out / "clusters.csv").exists()


def test_v80_interrupt_before_any_checkpoint(tmp_path, capsys, monkeypatch):
    small().write_h5ad(tmp_path / "in.h5ad")

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(io, "read", interrupted)
    code, err = run(cluster_argv(tmp_path / "in.h5ad", tmp_path / "out"), capsys)
    assert code == 130 and err == "schashformer: interrupted before the first checkpoint; nothing to resume, run " \
                                  "the command again"


# ----------------------------------------------------------------------------- 8: smaller items
def test_v81_raw_counts_are_pointed_to_and_usable(tmp_path, capsys):
    """Log-normalised X with the counts in .raw: the counts detection clusters .raw (logged, recorded)."""
    a = small(60, 40)
    a.raw = a.copy()
    a.X = np.log1p(a.X.toarray() / a.X.sum(1).A * 1e4)  # scanpy's normalise + log1p, counts kept in .raw
    b = tl.cluster(a.copy(), 3, progress=False, copy=True, **TINY)
    assert b.obs["schashformer"].notna().all() and "raw" in str(b.uns["schashformer"]["checksum_of"])
    c = tl.cluster(a.copy(), 3, layer="raw", progress=False, copy=True, **TINY)  # asked for explicitly
    assert c.uns["schashformer"]["params"]["layer"] == "raw"
    a.write_h5ad(tmp_path / "norm.h5ad")
    code, err = run(cluster_argv(tmp_path / "norm.h5ad", tmp_path / "out"), capsys)
    assert code == 0, err


def test_v82_cells_with_zero_counts_are_reported(tmp_path, capsys):
    a = small(70, 40)
    x = a.X.toarray()
    x[:30] = 0
    a.X = sp.csr_matrix(x)
    a.write_h5ad(tmp_path / "zeros.h5ad")
    code, err = run(cluster_argv(tmp_path / "zeros.h5ad", tmp_path / "out"), capsys)
    assert code == 0
    lines = [line for line in err.splitlines() if "zero counts" in line]
    assert lines == [("schashformer: warning: 30 of 70 cells have zero counts (e.g. 'c0'); they are not clustered: "
                      "label -1 (empty in clusters.csv) and a zero embedding")], err
    labels = pd.read_csv(tmp_path / "out" / "clusters.csv")["schashformer"]
    assert labels[:30].isna().all() and labels[30:].notna().all()


def test_v83_fewer_genes_than_token_pcs_warns():
    a = simulate_counts(60, 15)
    with pytest.warns(UserWarning, match=r"token_pcs=20 exceeds the 15 genes x 60 cells kept; only 15 principal "
                                         r"components are used, so the embedding has 23 columns, not 28"):
        model = SCHashFormer(3, progress=False, **TINY).fit(a)
    assert model.embedding_.shape[1] == 23  # hash_latent 8 + 15
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        SCHashFormer(3, progress=False, **{**TINY, "token_pcs": 10}).fit(a)
    assert not [w for w in seen if "token_pcs" in str(w.message)]


def test_v84_input_holding_results_is_not_a_python_message(tmp_path, capsys):
    a = small(60, 40)
    tl.cluster(a, 3, progress=False, **TINY)  # a result clustered again from the command line
    a.write_h5ad(tmp_path / "result_in.h5ad")
    before = (tmp_path / "result_in.h5ad").read_bytes()
    code, err = run(cluster_argv(tmp_path / "result_in.h5ad", tmp_path / "out"), capsys)
    assert code == 0, err
    assert "overwrite=True" not in err and "key_added" not in err
    assert "the input already holds the results of an earlier run (obs['schashformer']" in err
    assert (tmp_path / "result_in.h5ad").read_bytes() == before  # the input file is never changed


@pytest.mark.slow  # a real process: ~20-40 s of imports and training on a busy machine
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_v80_real_process_signal_mid_training(sig, tmp_path):
    from tests.conftest import FAST

    simulate_counts(300, 200, seed=3).write_h5ad(tmp_path / "in.h5ad")
    params = {**FAST, "stage1_steps": 60, "stage2_pretrain_steps": 400, "stage2_cluster_steps": 40}
    argv = ["cluster", str(tmp_path / "in.h5ad"), "--n-clusters", "3", "--out", str(tmp_path / "out"), "--quiet",
            "--no-umap", "--device", "cpu", "--checkpoint-every", "5",
            *[a for k, v in params.items() for a in ("--param", f"{k}={v}")]]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    # as from a terminal: SIGINT raises KeyboardInterrupt even where this test runs with SIGINT ignored (a
    # background job), which the child would inherit
    entry = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
             "from schashformer.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", entry, *argv], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    ckpt = tmp_path / "out" / ".checkpoint" / "checkpoint.pt"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None and not ckpt.exists():
            time.sleep(0.05)
        assert proc.poll() is None and ckpt.exists(), "no checkpoint before the run ended or within 120 s"
        proc.send_signal(sig)
        err = proc.communicate(timeout=60)[1].strip()
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 128 + sig, (proc.returncode, err)
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert re.match(r"schashformer: (interrupted|terminated \(SIGTERM\)) (at|after) .* \(last checkpoint, kept in .*"
                    r"\); resume with: schashformer cluster .* --resume$", err), err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".checkpoint"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
