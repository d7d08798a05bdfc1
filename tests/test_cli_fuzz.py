"""Fuzz test of the command line: hypothesis-generated argument lists and ``--param`` values.

Every case runs ``schashformer.cli.main(argv)`` in-process on tiny simulated data with few training
steps and must end with exit 0 (results written) or 2 (refused with one ``schashformer: error:``
line, or an argparse usage error), never a traceback or another exit status, and a refused run
must leave nothing behind: no ``--out`` folder and no hidden lock, staging or ``.old`` folder (except a
run whose training diverged after a checkpoint, e.g. ``lr=1e10``: it keeps ``OUT/.checkpoint`` and says so,
as documented in docs/VALIDATION.md).
Most cases are refused by validation before anything is read; the valid ones train a few steps.
The plots are replaced by a stub (they are not what is fuzzed and take most of a tiny run's time).
"""

import shutil
import time
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schashformer import app, cli
from schashformer.train import TrainConfig
from tests.conftest import simulate_counts
from tests.test_validation import TINY_ARGS

CASES = 300
FUZZ = settings(max_examples=CASES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))

# values of each option: (valid ones, out-of-range / wrong-type / special ones); valid ones are drawn
# more often, so that a fair share of the cases gets through validation and trains
OPTIONS = {
    "--n-clusters": (["2", "3"], ["1", "0", "-1", "41", "99999999999999999999", "abc", "2.5"]),
    "--resolution": (["0.5", "1", "1e-9"], ["0", "-1", "nan", "inf", "50", "1e308", "abc"]),
    "--seed": (["0", "7", "4294967295"], ["4294967296", "18446744073709551616", "-1", "abc"]),
    "--device": (["auto", "cpu", "cpu:0"], ["cuda:7", "mps", "meta", "gpu0", "", "xla"]),
    "--n-top-genes": (["10", "2000", "1"], ["0", "-5", "abc"]),
    "--checkpoint-every": (["0", "1", "100"], ["-1"]),
    "--layer": (["counts"], ["raw", "nope"]),
    "--labels-key": (["label"], ["nope"]),
    "--batch-key": (["label"], ["nope"]),
    "--format": (["h5ad"], ["csv", "tsv", "loom", "mtx"]),
    "--nproc": (["1"], ["0", "-1"]),
}
FLAGS = ["--transpose", "--no-transpose", "--overwrite", "--resume", "--allow-noncounts", "--no-umap", "--quiet"]
PARAM_KEYS = sorted(TrainConfig.__dataclass_fields__) + ["bogus", "lr ", ""]
PARAM_VALUES = ["0", "1", "2", "-1", "0.5", "1e-3", "1e10", "-1e10", "nan", "inf", "-inf", ".nan", "1e400",
                "99999999999999999999999",
                "abc", "true", "false", "null", "", "[1, 2]", "{a: 1}", "kmeans", "leiden", "0x10", "1_000"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz_inputs")
    a = simulate_counts(n_cells=40, n_genes=30)
    a.layers["counts"] = a.X.copy()
    a.write_h5ad(tmp / "tiny.h5ad")
    df = a.to_df().astype(int)
    df.to_csv(tmp / "tiny.csv")
    (tmp / "text.h5ad").write_text("not a matrix\n")
    (tmp / "folder.csv").mkdir()
    return tmp


@st.composite
def argv_lists(draw, inputs):
    names = ["tiny.h5ad"] * 6 + ["tiny.csv", "missing.h5ad", "text.h5ad", "folder.csv"]
    command = draw(st.sampled_from(["cluster"] * 9 + ["rerun"]))
    argv = [command, str(inputs / draw(st.sampled_from(names)))]
    for option in draw(st.lists(st.sampled_from(sorted(OPTIONS)), max_size=4, unique=True)):
        if command == "cluster" or option == "--device":
            valid, invalid = OPTIONS[option]
            argv += [option, draw(st.sampled_from(valid if draw(st.integers(0, 9)) < 6 else invalid))]
    if command == "cluster" and draw(st.booleans()):
        argv += ["--n-clusters", "3"]  # most runs: K given (faster than estimating it)
    argv += [f for f in draw(st.lists(st.sampled_from(FLAGS), max_size=3, unique=True))
             if command == "cluster" or f in ("--overwrite", "--resume", "--no-umap", "--quiet")]
    fuzz_params = draw(st.booleans())  # half the cases: only the tiny settings
    params = draw(st.lists(st.tuples(st.sampled_from(PARAM_KEYS), st.sampled_from(PARAM_VALUES)), max_size=3)) \
        if fuzz_params else []
    if command == "cluster":
        argv += TINY_ARGS + [a for k, v in params for a in ("--param", f"{k}={v}")]
        if draw(st.integers(0, 9)) == 0:
            argv.append(draw(st.sampled_from(["--param", "--param=lr", "--bogus", "--seed"])))  # malformed
    return argv


@pytest.fixture
def one_thread():
    """Tiny networks run ~10x faster on one torch thread than on several competing for the cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# 300 cases, about 36 of them train: 42-44 s on two shared cores with one torch thread (fast lane)
def test_cli_fuzz_exits_0_or_2_without_traceback(inputs, tmp_path, capsys, monkeypatch, one_thread):
    from schashformer import cli_analysis

    monkeypatch.setattr(app, "write_cluster_plots", lambda *a, **k: {})
    outcomes = {"ok": 0, "refused": 0, "diverged": 0}
    counter = iter(range(10**6))
    start = time.perf_counter()

    @FUZZ
    @given(argv_lists(inputs))
    def case(argv):
        out = tmp_path / f"out{next(counter)}"
        full = [*argv, "--out", str(out), "--quiet"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                code = cli.main(full)
            except SystemExit as exc:  # argparse: usage errors exit with 2
                code = exc.code
        err = capsys.readouterr().err
        assert "Traceback" not in err, (full, err)
        assert code in (0, 2), (full, code, err)
        leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
        assert leftovers == [], (full, leftovers)
        if code == 2:
            errors = [line for line in err.splitlines() if "error:" in line]
            assert len(errors) == 1, (full, err)
            if "last good checkpoint" in err:  # training diverged (e.g. lr=1e10): its checkpoint is kept, by design
                assert sorted(p.name for p in out.iterdir()) == [".checkpoint"], (full, err)
                shutil.rmtree(out)
                outcomes["diverged"] += 1
            else:
                assert not out.exists(), (full, err, sorted(p.name for p in out.iterdir()))
                outcomes["refused"] += 1
        else:
            assert (out / "clusters.csv").is_file(), full
            shutil.rmtree(out)
            outcomes["ok"] += 1

    case()
    seconds = time.perf_counter() - start
    print(f"cli fuzz: {sum(outcomes.values())} cases ({outcomes['ok']} ran, {outcomes['refused']} refused, "
          f"{outcomes['diverged']} diverged in training) in {seconds:.0f} s")
    assert sum(outcomes.values()) >= CASES
    assert outcomes["ok"] >= 5 and outcomes["refused"] >= CASES // 2  # both kinds were exercised
