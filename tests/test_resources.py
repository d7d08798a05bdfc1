"""Memory guard: estimates from file metadata stay below the real peak, and a run that cannot fit stops early."""

import tracemalloc
import warnings

import h5py
import numpy as np
import pytest
import scipy.io

from schashformer import cli, io, resources
from schashformer.errors import ResourceError
from tests.conftest import simulate_counts


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The same 1500 x 200 counts in every format the readers take."""
    t = tmp_path_factory.mktemp("formats")
    a = simulate_counts(1500, 200, seed=0)
    a.write_h5ad(t / "a.h5ad")
    df = a.to_df()
    df.to_csv(t / "a.csv")
    df.to_csv(t / "a.csv.gz")
    df.to_csv(t / "a.tsv", sep="\t")
    with h5py.File(t / "xy.h5", "w") as f:
        f["X"] = a.X.toarray()
    (t / "m").mkdir()
    scipy.io.mmwrite(t / "m" / "matrix.mtx", a.X.T.tocoo())
    (t / "m" / "barcodes.tsv").write_text("\n".join(a.obs_names) + "\n")
    (t / "m" / "features.tsv").write_text("\n".join(f"{g}\t{g}" for g in a.var_names) + "\n")
    return t, a.X.data.nbytes + a.X.indices.nbytes


@pytest.mark.parametrize("name, fmt", [("a.h5ad", "h5ad"), ("a.csv", "csv"), ("a.csv.gz", "csv"), ("a.tsv", "tsv"),
                                       ("xy.h5", "xy_h5"), ("m", "mtx")])
def test_read_estimate_is_below_the_traced_peak_and_near_the_data(files, name, fmt):
    folder, csr_bytes = files
    estimate = io.estimate_read_bytes(folder / name, fmt)
    tracemalloc.start()
    io.read(folder / name)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert csr_bytes * 0.8 <= estimate <= peak * 1.05, (estimate, peak, csr_bytes)


def test_estimate_of_a_malformed_file_is_left_to_the_reader(tmp_path):
    (tmp_path / "bad.h5").write_bytes(b"not hdf5")
    assert io.estimate_read_bytes(tmp_path / "bad.h5", "xy_h5") == 0


def test_available_memory_is_read_on_linux():
    avail = resources.available_bytes()
    if avail is None:
        pytest.skip("no /proc/meminfo here")
    assert 0 < avail < 2**50


def test_unknown_available_memory_checks_nothing(monkeypatch):
    monkeypatch.setattr(resources, "available_bytes", lambda: None)
    resources.check_fits(2**60, "anything", "")  # no error


def test_cli_stops_before_reading_with_one_line(files, monkeypatch, capsys):
    folder, _ = files
    monkeypatch.setattr(resources, "available_bytes", lambda: 3 * 2**20)
    out = folder.parent / "out"
    assert cli.main(["cluster", str(folder / "a.csv.gz"), "--n-clusters", "3", "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert err.startswith(f"schashformer: error: reading {folder / 'a.csv.gz'} needs about ")
    assert err.split("needs about ")[1].split(" of memory")[0].endswith("MiB")
    assert "but only 3 MiB is available" in err and not out.exists()


def test_fit_estimate_grows_with_the_data(monkeypatch):
    from schashformer.train import TrainConfig

    small, big = (simulate_counts(n, 100, seed=1).X for n in (500, 2000))
    cfg = TrainConfig()
    assert 3 * resources.fit_bytes(small, 5, cfg) < resources.fit_bytes(big, 5, cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert resources.fit_bytes(big.toarray(), 5, cfg) == resources.fit_bytes(big, 5, cfg)  # dense: same non-zeros
    assert resources.fit_bytes(np.array([["a"]], dtype=object), 5, cfg) == 0  # left to preprocessing
    monkeypatch.setattr(resources, "available_bytes", lambda: 1024)
    with pytest.raises(ResourceError, match=r"^x needs about \d+ MiB of memory but only 1 KiB is available; y$"):
        resources.check_fits(resources.fit_bytes(big, 5, cfg), "x", "y")


def test_peak_memory_is_this_process_own_and_grows_with_what_it_touches():
    # fresh interpreters, so the test's own process (whose peak earlier tests set) does not matter
    import subprocess
    import sys

    def child_peak(touch_mib: int) -> float:
        code = ("import numpy as np; from schashformer.resources import peak_rss_gib; "
                f"block = np.ones({touch_mib} * 2**20 // 8); assert block.sum() >= 0; print(peak_rss_gib())")
        return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)

    block = np.ones(300 * 2**20 // 8)  # this process now holds 300 MiB more than a fresh interpreter needs
    assert block.sum() > 0
    idle, touched = child_peak(0), child_peak(300)
    assert touched - idle > 0.2  # GiB: the 300 MiB written count
    # a fresh interpreter reports its own peak, not the peak of the (larger) process that started it
    assert 0 < idle < resources.peak_rss_gib()
