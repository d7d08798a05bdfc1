"""Every row of docs/VALIDATION.md: the input is refused with the documented type and one-line message.

Each case below carries the row's id (V01...); ``test_every_documented_row_is_tested`` keeps the
table and this file in step. The last part checks that outputs are never half-written and that a
result can be re-run from its own record (``schashformer rerun``).
"""

import gzip
import json
import re
import warnings
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from schashformer import app
from schashformer import SCHashFormer, cli, io, tl
from schashformer.errors import (InputError, OutputError, OutputExistsError, ParameterError, ResourceError,
                                 SCHashFormerError, TrainingError)
from schashformer.preprocess import prepare
from tests.conftest import DATA, simulate_counts

DOC = Path(__file__).resolve().parents[1] / "docs" / "VALIDATION.md"
KLEIN = DATA / "klein_subset_1000x900.h5ad"
TINY = dict(stage1_steps=2, stage2_pretrain_steps=2, stage2_cluster_steps=2, hidden=16, hash_latent=8, d_model=8,
            attn_heads=2, latent=4, kmeans_n_init=1, stage1_batch=64, chunks_per_batch=4)
TINY_ARGS = [a for k, v in TINY.items() for a in ("--param", f"{k}={v}")]


def small(n_cells=40, n_genes=30, seed=0) -> ad.AnnData:
    return simulate_counts(n_cells=n_cells, n_genes=n_genes, seed=seed)


def real_klein() -> ad.AnnData:
    if not KLEIN.exists():
        pytest.skip(f"shared data not found at {KLEIN}")
    return io.read(KLEIN)


@pytest.fixture(scope="module")
def fitted() -> SCHashFormer:
    """A tiny model trained on 60 simulated cells x 40 genes (genes g0..g39)."""
    return SCHashFormer(3, seed=0, progress=False, **TINY).fit(small(60, 40))


# ----------------------------------------------------------------------------- case builders (tmp -> callable)
def write_xy(path, x):
    with h5py.File(path, "w") as f:
        f["X"] = x
    return path


def truncated_h5ad(tmp):
    if not KLEIN.exists():
        pytest.skip(f"shared data not found at {KLEIN}")
    data = KLEIN.read_bytes()
    (tmp / "cut.h5ad").write_bytes(data[: len(data) // 2])
    return lambda: io.read(tmp / "cut.h5ad")


def truncated_gz(tmp):
    with gzip.open(tmp / "t.csv.gz", "wt") as f:
        f.write("cell,g1,g2\n" + "".join(f"c{i},{i % 7},{i % 3}\n" for i in range(5000)))
    data = (tmp / "t.csv.gz").read_bytes()
    (tmp / "cut.csv.gz").write_bytes(data[: len(data) // 2])
    return lambda: io.read(tmp / "cut.csv.gz")


def text_file(tmp, name):
    (tmp / name).write_text("this is not a matrix\n")
    return lambda: io.read(tmp / name)


def hdf5_without_x(tmp):
    with h5py.File(tmp / "noX.h5", "w") as f:
        f["counts"] = np.ones((3, 3))
    return lambda: io.read(tmp / "noX.h5")


def mtx_without_barcodes(tmp):
    import scipy.io

    (tmp / "m").mkdir()
    scipy.io.mmwrite(tmp / "m" / "matrix.mtx", sp.coo_matrix(np.ones((3, 2))))
    (tmp / "m" / "features.tsv").write_text("g1\ng2\ng3\n")
    return lambda: io.read(tmp / "m")


def file_with(tmp, x, name="bad.h5"):
    write_xy(tmp / name, x)
    return lambda: io.read(tmp / name)


def klein_with(tmp, value):
    """The real Klein matrix with one stored value replaced, written back as h5ad."""
    a = real_klein()
    a.X.data[5] = value
    a.write_h5ad(tmp / "klein_bad.h5ad")
    return lambda: io.read(tmp / "klein_bad.h5ad")


def adata_with(value=None, *, dense=None, shape=(20, 10)):
    a = small(*shape)
    if dense is not None:
        a = ad.AnnData(dense)
    elif value is not None:
        a.X = a.X.toarray()
        a.X[3, 4] = value
    return a


def dup_gene_names():
    a = real_klein()[:200].copy()
    a.var_names = list(a.var_names[:-1]) + [a.var_names[0]]
    return a


def batch_with_missing():
    a = small()
    a.obs["donor"] = pd.Categorical(["m1", "m2"] * 20)
    a.obs.loc[a.obs_names[:3], "donor"] = np.nan
    return a


def all_missing(column):
    a = small()
    a.obs[column] = np.nan
    return a


def few_cells_with_counts():
    a = small(10, 30)
    a.X = a.X.toarray()
    a.X[2:] = 0
    return a


def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    return lambda: SCHashFormer(3, device="cuda", progress=False, **TINY).fit(small())


def model_file(tmp, content):
    (tmp / "model").mkdir()
    if isinstance(content, bytes):
        (tmp / "model" / "model.pt").write_bytes(content)
    else:
        torch.save(content, tmp / "model" / "model.pt")
    return lambda: SCHashFormer.load(tmp / "model")


def renamed_genes(fitted, keep):
    """New cells measured on the same genes, with all but ``keep`` of the model's genes renamed."""
    a = small(30, 40, seed=4)
    lost = set(fitted.stats_.genes[keep:])
    a.var_names = [f"other{j}" if g in lost else g for j, g in enumerate(a.var_names)]
    return a


def cluster_twice():
    a = small()
    tl.cluster(a, 3, progress=False, **TINY)
    return lambda: tl.cluster(a, 3, progress=False)


def directory_named(tmp, name):
    (tmp / name).mkdir()
    return lambda: io.read(tmp / name)


def table(tmp, name, text):
    (tmp / name).write_text(text)
    return lambda: io.read(tmp / name)


def out_is_a_file(tmp):
    (tmp / "out").write_text("x")
    return lambda: app.check_out_dir(tmp / "out", overwrite=True)


def out_with(tmp, files):
    out = tmp / "out"
    out.mkdir()
    for name in files:
        (out / name).write_text("x")
    return lambda: app.check_out_dir(out, overwrite=False)


def failing_write(tmp, monkeypatch):
    from schashformer import pl

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pl, "umap_png", disk_full)
    return lambda: app.run_cluster(small(), out=tmp / "out", params={**TINY, "n_clusters": 3, "progress": False})


def checkpoint_of_another_run(tmp):
    a = small()
    SCHashFormer(3, seed=0, progress=False, checkpoint_dir=tmp / "ck", keep_checkpoint=True, **TINY).fit(a)
    return lambda: SCHashFormer(3, seed=1, progress=False, checkpoint_dir=tmp / "ck", **TINY).fit(a, resume=True)


def corrupt_checkpoint(tmp):
    (tmp / "ck").mkdir()
    (tmp / "ck" / "checkpoint.pt").write_bytes(b"garbage")
    return lambda: SCHashFormer(3, progress=False, checkpoint_dir=tmp / "ck", **TINY).fit(small(), resume=True)


def out_with_checkpoint(tmp):
    (tmp / "out" / ".checkpoint").mkdir(parents=True)
    return lambda: app.check_out_dir(tmp / "out", overwrite=False)


def little_memory(monkeypatch, action, available=2**20):
    from schashformer import resources

    monkeypatch.setattr(resources, "available_bytes", lambda: available)
    return action


def big_file(tmp):
    simulate_counts(2000, 300).write_h5ad(tmp / "big.h5ad")  # about 5 MiB as CSR
    return lambda: io.read(tmp / "big.h5ad")


# id -> (build(tmp, monkeypatch, fitted) -> callable, exception type, message pattern)
CASES = {
    "V01": (lambda t, m, f: lambda: io.read(t / "missing.h5ad"), InputError,
            r"missing\.h5ad: no such file or directory"),
    "V02": (lambda t, m, f: directory_named(t, "dir.csv"), InputError,
            r"dir\.csv: is a directory, not a \.csv file"),
    "V03": (lambda t, m, f: text_file(t, "x.h5ad"), InputError, r"x\.h5ad: cannot be read as h5ad: OSError"),
    "V04": (lambda t, m, f: text_file(t, "x.h5"), InputError, r"x\.h5: not a readable HDF5 file"),
    "V05": (lambda t, m, f: text_file(t, "x.xlsx"), InputError, r"cannot tell the format from the extension '\.xlsx'"),
    "V06": (lambda t, m, f: lambda: io.read(t, format="loom"), ParameterError, r"unknown format 'loom'"),
    "V07": (lambda t, m, f: truncated_h5ad(t), InputError, r"cut\.h5ad: cannot be read as h5ad: OSError: .*truncated"),
    "V08": (lambda t, m, f: truncated_gz(t), InputError, r"cut\.csv\.gz: cannot be read as csv: EOFError"),
    "V09": (lambda t, m, f: hdf5_without_x(t), InputError, r"noX\.h5: HDF5 file has neither dataset 'X'"),
    "V10": (lambda t, m, f: mtx_without_barcodes(t), InputError, r"Matrix Market directory has no barcodes\.tsv"),
    "V11": (lambda t, m, f: table(t, "s.csv", "cell,g1,g2\nc1,1,abc\n"), InputError,
            r"s\.csv: table has non-numeric values in column 'g2'"),
    "V12": (lambda t, m, f: file_with(t, np.ones((3, 3), complex)), InputError,
            r"bad\.h5: the matrix has dtype complex128; expected real numbers"),
    "V13": (lambda t, m, f: file_with(t, np.zeros((0, 5))), InputError,
            r"bad\.h5: the matrix is empty \(0 cells x 5 genes\)"),
    "V14": (lambda t, m, f: klein_with(t, np.nan), InputError, r"klein_bad\.h5ad: the matrix has 1 NaN and 0 infinite"),
    "V15": (lambda t, m, f: klein_with(t, -3.0), InputError,
            r"klein_bad\.h5ad: the matrix has 1 negative values \(min -3\)"),
    "V17": (lambda t, m, f: lambda: prepare(np.ones((3, 3))), InputError, r"expected an AnnData, got ndarray"),
    "V18": (lambda t, m, f: lambda: prepare(ad.AnnData(obs=pd.DataFrame(index=["a"]), var=pd.DataFrame(index=["g"]))),
            InputError, r"adata\.X is empty \(None\)"),
    "V19": (lambda t, m, f: lambda: prepare(small(), layer="counts"), InputError, r"layer 'counts' not found"),
    "V20": (lambda t, m, f: lambda: prepare(adata_with(dense=np.array([["1", "x"], ["2", "3"]], dtype=object))),
            InputError, r"adata\.X has dtype object with non-numeric values"),
    "V21": (lambda t, m, f: lambda: prepare(small()[:0].copy()), InputError, r"adata\.X is empty: 0 cells x 30 genes"),
    "V22": (lambda t, m, f: lambda: prepare(adata_with(np.inf)), InputError, r"adata\.X has 1 NaN/inf values"),
    "V23": (lambda t, m, f: lambda: prepare(adata_with(-1.0)), InputError, r"adata\.X has 1 negative values"),
    "V24": (lambda t, m, f: lambda: tl.cluster(adata_with(2.5), 3, progress=False, **TINY), InputError,
            r"adata\.X has 1 non-integer values \(e\.g\. 2\.5\).*allow_noncounts=True"),
    "V25": (lambda t, m, f: lambda: prepare(adata_with(dense=np.zeros((4, 3), np.float32))), InputError,
            r"all 4 cells have zero counts"),
    "V26": (lambda t, m, f: lambda: prepare(adata_with(dense=np.full((2, 3), 3e38, np.float32))), InputError,
            r"adata\.X: the counts of 2 cells sum beyond the float32 range"),
    "V27": (lambda t, m, f: lambda: prepare(dup_gene_names()), InputError,
            r"adata\.var_names has 1 duplicated gene names .*var_names_make_unique"),
    "V29": (lambda t, m, f: lambda: prepare(small(), n_top_genes=0), ParameterError,
            r"n_top_genes must be an integer >= 1"),
    "V30": (lambda t, m, f: lambda: tl.cluster(small(), 3, labels_key="cell_type", progress=False), InputError,
            r"labels_key 'cell_type' is not a column of adata\.obs"),
    "V31": (lambda t, m, f: lambda: tl.cluster(all_missing("ct"), 3, labels_key="ct", progress=False), InputError,
            r"labels_key 'ct': every value is missing"),
    "V32": (lambda t, m, f: lambda: tl.cluster(small(), 3, batch_key="donor", progress=False), InputError,
            r"batch_key 'donor' is not a column of adata\.obs"),
    "V33": (lambda t, m, f: lambda: tl.cluster(all_missing("donor"), 3, batch_key="donor", progress=False), InputError,
            r"batch_key 'donor': every value is missing"),
    "V34": (lambda t, m, f: lambda: tl.cluster(batch_with_missing(), 3, batch_key="donor", progress=False, **TINY),
            InputError, r"batch_key 'donor' has 3 missing values"),
    "V35": (lambda t, m, f: lambda: tl.cluster(small(), 1, progress=False), ParameterError,
            r"n_clusters must be an integer >= 2, got 1"),
    "V66": (lambda t, m, f: lambda: SCHashFormer(None, resolution=0).fit(small()), ParameterError,
            r"resolution must be a number > 0 \(default 0\.5; higher gives more clusters\), got 0"),
    "V67": (lambda t, m, f: lambda: tl.cluster(small(), resolution="abc", progress=False), ParameterError,
            r"resolution must be a number > 0 .*got 'abc'"),
    "V36": (lambda t, m, f: lambda: tl.cluster(small(), 41, progress=False), ParameterError,
            r"n_clusters=41 is larger than the number of cells \(40\)"),
    "V37": (lambda t, m, f: lambda: tl.cluster(few_cells_with_counts(), 3, progress=False, **TINY), ParameterError,
            r"n_clusters=3 exceeds the 2 cells with counts"),
    "V38": (lambda t, m, f: lambda: tl.cluster(small(), 3, stage1_stepz=5), ParameterError,
            r"unknown parameter\(s\) \['stage1_stepz'\]"),
    "V39": (lambda t, m, f: lambda: SCHashFormer(3, stage1_steps="abc").fit(small()), ParameterError,
            r"parameter stage1_steps must be int, got 'abc'"),
    "V68": (lambda t, m, f: lambda: SCHashFormer(3, stage1_steps_subsample=-1).fit(small()), ParameterError,
            r"stage1_steps_subsample must be None or an integer >= 0, got -1"),
    "V40": (lambda t, m, f: lambda: SCHashFormer(3, seed=-1).fit(small()), ParameterError, r"seed must be an integer >= 0, got -1"),
    "V41": (lambda t, m, f: lambda: SCHashFormer(3, device="gpu0", progress=False, **TINY).fit(small()), ParameterError,
            r"device='gpu0' is not a device name"),
    "V42": (lambda t, m, f: no_gpu(m), ParameterError, r"device='cuda' was requested but no CUDA GPU is available"),
    "V43": (lambda t, m, f: lambda: SCHashFormer(3).predict(small()), ParameterError, r"not fitted yet"),
    "V44": (lambda t, m, f: lambda: f.transform(small(10, 40).X), InputError, r"expected an AnnData, got csr_matrix"),
    "V45": (lambda t, m, f: lambda: f.predict(renamed_genes(f, 0)), InputError,
            r"none of the model's \d+ genes are in the input's var_names"),
    "V46": (lambda t, m, f: lambda: f.predict(renamed_genes(f, 12)), InputError,
            r"only 12 of the model's \d+ genes are in the input's var_names .*at least 50% are needed"),
    "V48": (lambda t, m, f: lambda: SCHashFormer.load(t / "nowhere"), InputError,
            r"nowhere: no saved scHashFormer model there"),
    "V49": (lambda t, m, f: model_file(t, b"garbage"), InputError, r"model\.pt: not a readable scHashFormer model"),
    "V50": (lambda t, m, f: model_file(t, {"weights": torch.ones(2)}), InputError,
            r"model\.pt: not a scHashFormer model this version can load \(KeyError: 'init'\)"),
    "V51": (lambda t, m, f: cluster_twice(), ParameterError,
            r"obs\['schashformer'\], obsm\['X_schashformer'\], uns\['schashformer'\](, uns\['schashformer_neighbors'\])? "
            r"already hold results"),
    "V52": (lambda t, m, f: out_with(t, ["result.h5ad", "metrics.json"]), OutputExistsError,
            r"already holds results \(metrics\.json, result\.h5ad\); pass --overwrite"),
    "V53": (lambda t, m, f: out_with(t, ["notes.txt"]), OutputExistsError,
            r"holds files that are not scHashFormer results \(e\.g\. 'notes\.txt'\)"),
    "V54": (lambda t, m, f: out_is_a_file(t), OutputExistsError,
            r"--out .*out exists and is not a directory"),
    "V55": (lambda t, m, f: lambda: app.parse_params(["lr"]), ParameterError, r"--param expects key=value, got 'lr'"),
    "V56": (lambda t, m, f: failing_write(t, m), OutputError,
            r"out: results could not be written \(OSError: \[Errno 28\] No space left on device\)"),
    "V60": (lambda t, m, f: checkpoint_of_another_run(t), InputError,
            r"ck: the checkpoint was written by another run \(differs in seed\); resume with the same data"),
    "V61": (lambda t, m, f: out_with_checkpoint(t), OutputExistsError,
            r"out holds the checkpoint of an unfinished run \(.*out/\.checkpoint\); pass --resume to continue it "
            r"or --overwrite"),
    "V62": (lambda t, m, f: corrupt_checkpoint(t), InputError,
            r"ck/checkpoint\.pt: unreadable checkpoint \(UnpicklingError\); delete it to start again"),
    "V64": (lambda t, m, f: little_memory(m, big_file(t)), ResourceError,
            r"reading .*big\.h5ad needs about \d+ MiB of memory but only 1 MiB is available; free memory"),
    "V65": (lambda t, m, f: little_memory(m, lambda: tl.cluster(small(), 3, progress=False, **TINY), 4096),
            ResourceError, r"clustering 40 cells x 30 genes needs about \d+ KiB of memory but only 4 KiB is available"),
}
# rows whose outcome is a warning, not an error (each has its own test below)
WARNING_CASES = {
    "V16": r"dup\.h5ad: 1 duplicated gene names .* made unique",
    "V28": r"adata\.obs_names has 2 duplicated cell names",
    "V47": r"1 of the model's \d+ genes are missing from the input; they are filled with zeros",
    "V63": r"n_clusters=3 exceeds the [12] distinct hash buckets the cells fall into \(combined over 1 heads of 1 bits\)",
}
RERUN_CASES = ("V57", "V58", "V59")


@pytest.mark.parametrize("row", sorted(CASES))
def test_rejected_input(row, tmp_path, monkeypatch, fitted):
    build, exc_type, pattern = CASES[row]
    action = build(tmp_path, monkeypatch, fitted)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(exc_type) as info:
            action()
    message = str(info.value)
    assert isinstance(info.value, SCHashFormerError)
    assert "\n" not in message, message
    assert re.search(pattern, message), message


def test_v16_duplicated_names_in_files_are_made_unique(tmp_path):
    a = real_klein()[:50].copy()
    a.var_names = [a.var_names[1]] + list(a.var_names[1:])
    a.write_h5ad(tmp_path / "dup.h5ad")
    with pytest.warns(UserWarning, match=WARNING_CASES["V16"]):
        back = io.read(tmp_path / "dup.h5ad")
    assert back.var_names.is_unique and back.var_names[1] == a.var_names[1] + "-1"


def test_v28_duplicated_cell_names_warn_and_keep_positions():
    a = small(20, 30)
    a.obs_names = ["c0", "c0", "c0"] + list(a.obs_names[3:])
    with pytest.warns(UserWarning, match=WARNING_CASES["V28"]):
        prep = prepare(a)
    assert prep.n_cells == 20


def test_v47_some_model_genes_missing_are_zero_filled(fitted):
    a = renamed_genes(fitted, len(fitted.stats_.genes) - 1)
    with pytest.warns(UserWarning, match=WARNING_CASES["V47"]):
        labels = fitted.predict(a)
    assert labels.shape == (30,) and labels.max() < 3


def test_v63_more_clusters_than_hash_buckets_warns_and_clusters():
    with pytest.warns(UserWarning, match=WARNING_CASES["V63"]):
        model = SCHashFormer(3, seed=0, progress=False, **{**TINY, "hash_bits": 1, "hash_heads": 1}).fit(small(60, 40))
    assert len(np.unique(model.codes_, axis=0)) <= 2 and model.labels_.shape == (60,) and model.labels_.min() >= 0
    with warnings.catch_warnings(record=True) as seen:  # automatic bits on the same cells: enough buckets
        warnings.simplefilter("always")
        SCHashFormer(3, seed=0, progress=False, **TINY).fit(small(60, 40))
    assert not [w for w in seen if "distinct hash buckets" in str(w.message)]


def test_allow_noncounts_accepts_what_v24_refuses():
    prep = prepare(adata_with(2.5), allow_noncounts=True)
    assert np.isfinite(prep.logn.data).all()


# ----------------------------------------------------------------------------- the command line: exit 2, one line
@pytest.mark.parametrize("argv,pattern", [
    (["cluster", "{tmp}/missing.h5ad", "--n-clusters", "3"], r"no such file or directory"),
    (["cluster", "{inp}", "--n-clusters", "3", "--device", "cuda:7"], r"device="),
    (["cluster", "{inp}", "--n-clusters", "3", "--param", "hash_bits=0"], r"hash_bits must be in \[1, 62\]"),
    (["cluster", "{inp}", "--n-clusters", "3", "--param", "lr=abc"], r"parameter lr must be float, got 'abc'"),
    (["cluster", "{inp}", "--n-clusters", "3", "--n-top-genes", "0"], r"n_top_genes must be an integer >= 1"),
    (["cluster", "{inp}", "--resolution", "-1"], r"resolution must be a number > 0"),
    (["cluster", "{tmp}/x.h5ad", "--n-clusters", "3"], r"cannot be read as h5ad"),
])
def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, capsys, argv, pattern):
    small().write_h5ad(tmp_path / "in.h5ad")
    (tmp_path / "x.h5ad").write_text("not hdf5")
    argv = [a.format(tmp=tmp_path, inp=tmp_path / "in.h5ad") for a in argv]
    assert cli.main(argv + ["--out", str(tmp_path / "out"), "--quiet", *TINY_ARGS]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("schashformer: error: ") and "\n" not in err and re.search(pattern, err), err
    assert not (tmp_path / "out").exists()


def test_param_values_are_parsed_like_yaml_with_exponents():
    assert app.parse_params(["lr=1e-3", "hash_bits=null", "detach_codes=false", "init=leiden"]) == {
        "lr": 1e-3, "hash_bits": None, "detach_codes": False, "init": "leiden"}


# ----------------------------------------------------------------------------- outputs never half-written
# what `cluster --labels-key ... --no-umap` writes: results, the model and the other plots
RESULTS_NO_UMAP = ["bucket_sizes.png", "clusters.csv", "confusion.png", "metrics.json", "model", "result.h5ad",
                   "training_curves.png"]


def cluster_argv(inp, out, *extra):
    return ["cluster", str(inp), "--n-clusters", "3", "--labels-key", "label", "--out", str(out), "--quiet",
            "--no-umap", *TINY_ARGS, *extra]


def hidden_leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("existing", [False, True])
def test_results_are_staged_then_renamed(tmp_path, monkeypatch, existing):
    small(60, 40).write_h5ad(tmp_path / "in.h5ad")
    if existing:
        (tmp_path / "out").mkdir()  # an empty --out is filled like a new one
    seen = {}
    publish = app._publish

    def spy(staging, out):
        seen["out_before"] = sorted(p.name for p in out.iterdir())  # only the checkpoint of this run
        seen["staged"] = sorted(p.name for p in staging.iterdir())
        seen["staging"] = staging
        publish(staging, out)

    monkeypatch.setattr(app, "_publish", spy)
    assert cli.main(cluster_argv(tmp_path / "in.h5ad", tmp_path / "out")) == 0
    assert seen["out_before"] == [".checkpoint"] and seen["staged"] == RESULTS_NO_UMAP
    assert seen["staging"].parent == tmp_path and ".partial-" in seen["staging"].name
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == seen["staged"]
    assert hidden_leftovers(tmp_path) == []


def test_overwrite_swaps_whole_directory(tmp_path):
    small(60, 40).write_h5ad(tmp_path / "in.h5ad")
    out = tmp_path / "out"
    assert cli.main(cluster_argv(tmp_path / "in.h5ad", out, "--seed", "1")) == 0
    first = (out / "clusters.csv").read_text()
    (out / "umap.png").write_text("stale plot of an older run")
    assert cli.main(cluster_argv(tmp_path / "in.h5ad", out, "--seed", "2")) == 2  # refused, untouched
    assert (out / "clusters.csv").read_text() == first
    assert cli.main(cluster_argv(tmp_path / "in.h5ad", out, "--seed", "2", "--overwrite")) == 0
    assert sorted(p.name for p in out.iterdir()) == RESULTS_NO_UMAP  # stale plot gone
    assert json.loads((out / "metrics.json").read_text())["seed"] == 2
    assert hidden_leftovers(tmp_path) == []


@pytest.mark.parametrize("failure", ["training", "writing", "interrupt"])
def test_failed_run_leaves_nothing(tmp_path, monkeypatch, capsys, failure):
    from schashformer import io as sio

    small(60, 40).write_h5ad(tmp_path / "in.h5ad")
    if failure == "training":
        def diverge(self, *a, **k):
            raise TrainingError("stage 1: loss became nan")
        monkeypatch.setattr(SCHashFormer, "fit", diverge)
    else:
        real = sio.write_h5ad

        def half_then_fail(adata, path, **k):
            real(adata, path, **k)
            Path(path).with_name("clusters.csv").write_text("partial")
            raise KeyboardInterrupt if failure == "interrupt" else OSError(28, "No space left on device")
        monkeypatch.setattr(sio, "write_h5ad", half_then_fail)
    argv = cluster_argv(tmp_path / "in.h5ad", tmp_path / "out")
    if failure == "interrupt":  # one line and exit 130, not a traceback (tests/test_reliability.py, V80)
        assert cli.main(argv) == 130
        assert "resume with: schashformer cluster" in capsys.readouterr().err
    else:
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and ("loss became nan" in err or "could not be written" in err)
    if failure == "training":
        assert sorted(p.name for p in tmp_path.iterdir()) == ["in.h5ad"]  # no out, no staging directory
    else:  # no results and no staging directory; the trained state is kept for --resume
        assert sorted(p.name for p in tmp_path.iterdir()) == ["in.h5ad", "out"]
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".checkpoint"]
        monkeypatch.undo()
        assert cli.main(argv) == 2  # a forgotten --resume does not throw the training away
        assert "pass --resume to continue it" in capsys.readouterr().err
        assert cli.main([*argv, "--resume"]) == 0
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == RESULTS_NO_UMAP


def test_failed_overwrite_keeps_previous_results(tmp_path, monkeypatch):
    from schashformer import io as sio

    small(60, 40).write_h5ad(tmp_path / "in.h5ad")
    out = tmp_path / "out"
    assert cli.main(cluster_argv(tmp_path / "in.h5ad", out)) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}  # model/ is a directory

    def fail(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(sio, "write_h5ad", fail)
    assert cli.main(cluster_argv(tmp_path / "in.h5ad", out, "--overwrite")) == 2
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert (out / ".checkpoint").is_dir()  # the trained state, for --resume
    assert hidden_leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- the run record and rerun
@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory):
    """A CLI run on a copy of the real Klein data (first 300 cells) with tiny training settings."""
    tmp = tmp_path_factory.mktemp("recorded")
    a = real_klein()[:300].copy()
    a.write_h5ad(tmp / "klein300.h5ad")
    assert cli.main(["cluster", str(tmp / "klein300.h5ad"), "--n-clusters", "4", "--labels-key", "day",
                     "--out", str(tmp / "run1"), "--quiet", "--no-umap", "--device", "cpu", *TINY_ARGS]) == 0
    return tmp


def test_record_holds_version_params_seed_checksum_timings_input(recorded_run):
    from schashformer import __version__
    from schashformer.preprocess import count_matrix
    from schashformer.record import data_checksum

    res = ad.read_h5ad(recorded_run / "run1" / "result.h5ad")
    rec = res.uns["schashformer"]
    assert rec["version"] == __version__ and rec["versions"]["torch"] == torch.__version__
    assert rec["seed"] == 0 and rec["params"]["seed"] == 0 and rec["params"]["stage1_steps"] == 2
    assert rec["params"]["n_clusters"] == 4 and rec["params"]["labels_key"] == "day"
    assert rec["params"]["device_used"] == "cpu"
    inp = io.read(recorded_run / "klein300.h5ad")
    assert rec["data_checksum"] == data_checksum(count_matrix(inp)) and rec["data_checksum"].startswith("sha256:")
    assert {"preprocess", "stage1_hashing", "stage2_clustering", "checksum"} <= set(rec["timings"])
    assert Path(rec["input"]["path"]) == (recorded_run / "klein300.h5ad").resolve()


def test_checksum_ignores_storage_layout_not_values():
    from schashformer.record import data_checksum

    dense = np.array([[0, 2, 0, 3], [1, 0, 0, 0], [0, 0, 5, 0]], np.float32)
    x = sp.csr_matrix(dense)
    # the same counts stored with unsorted indices, a duplicate entry (2 = 1 + 1) and an explicit zero
    messy = sp.csr_matrix((np.array([3, 1, 1, 1, 0, 5], np.float32), np.array([3, 1, 1, 0, 2, 2]),
                           np.array([0, 3, 5, 6])), shape=(3, 4))
    assert np.array_equal(messy.toarray(), dense) and not messy.has_canonical_format
    assert data_checksum(x) == data_checksum(messy) == data_checksum(sp.csr_matrix(dense.astype(np.int64)))
    changed = dense.copy()
    changed[2, 2] = 6
    assert data_checksum(sp.csr_matrix(changed)) != data_checksum(x)
    wider = sp.csr_matrix((x.data, x.indices, x.indptr), shape=(3, 5))  # same entries, one more (empty) gene
    assert data_checksum(wider) != data_checksum(x)


def test_rerun_gives_the_same_labels_on_cpu(recorded_run, capsys):
    out = recorded_run / "run2"
    assert cli.main(["rerun", str(recorded_run / "run1" / "result.h5ad"), "--out", str(out), "--quiet",
                     "--no-umap"]) == 0
    assert "labels identical to the recorded run" in capsys.readouterr().out
    first = pd.read_csv(recorded_run / "run1" / "clusters.csv")
    second = pd.read_csv(out / "clusters.csv")
    assert first.equals(second)
    report = json.loads((out / "metrics.json").read_text())
    assert report["rerun"] == {"identical_labels": True, "n_cells_differing": 0}
    rec = ad.read_h5ad(out / "result.h5ad").uns["schashformer"]
    assert rec["params"]["stage1_steps"] == 2 and rec["input"]["path"].endswith("klein300.h5ad")


@pytest.mark.parametrize("row", RERUN_CASES)
def test_rerun_refusals(row, recorded_run, tmp_path, capsys):
    result = recorded_run / "run1" / "result.h5ad"
    if row == "V57":  # an h5ad without a run record
        small().write_h5ad(tmp_path / "plain.h5ad")
        argv, pattern = ["rerun", str(tmp_path / "plain.h5ad")], r"no scHashFormer run record in uns\['schashformer'\]"
    elif row == "V58":  # the input changed since the run
        a = io.read(recorded_run / "klein300.h5ad")
        a.X.data[0] += 1
        a.write_h5ad(tmp_path / "changed.h5ad")
        argv = ["rerun", str(result), "--input", str(tmp_path / "changed.h5ad")]
        pattern = r"changed\.h5ad: the counts differ from those of the recorded run .*refusing to re-run"
    else:  # a Python API run records no input file
        a = small(60, 40)
        tl.cluster(a, 3, progress=False, **TINY)
        a.write_h5ad(tmp_path / "api.h5ad")
        argv, pattern = ["rerun", str(tmp_path / "api.h5ad")], r"the run record has no input path .*pass --input"
    with pytest.raises(InputError, match=pattern):
        app.run_rerun(Path(argv[1]), out=tmp_path / "o", input_path=argv[3] if len(argv) > 2 else None)
    assert cli.main(argv + ["--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and re.search(pattern, err)
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- the table and the tests agree
def test_every_documented_row_is_tested():
    rows = re.findall(r"^\| (V\d\d) \|", DOC.read_text(), flags=re.M)
    from tests.test_reliability import ROWS  # issue 21's rows, each with its own test there

    tested = set(CASES) | set(WARNING_CASES) | set(RERUN_CASES) | set(ROWS)
    assert len(rows) >= 15 and len(rows) == len(set(rows))
    assert set(rows) == tested, (sorted(set(rows) - tested), sorted(tested - set(rows)))
