"""benchmarks/seed_table.py: the five-seed tables of docs/METHOD_CHOICES.md from probe_fits.py logs."""

import csv

import pytest

from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def seed_table():
    return load_benchmark("seed_table")


def probe_log(path, rows):
    lines = ["# load 0.5; params {}"]
    lines += [f"{name} {seed} 12.3 {ari} {{\"stage1_hashing\": 9.0}} start {ari}" for name, seed, ari in rows]
    path.write_text("\n".join(lines + ["# load 0.6", ""]))
    return str(path)


def test_tables_from_logs(seed_table, tmp_path):
    ours = [probe_log(tmp_path / "a.log", [("A", 0, 0.80), ("B", 0, 0.50)]),
            probe_log(tmp_path / "b.log", [("A", 1, 0.70), ("B", 1, 0.60), ("B", 0, 0.40)])]  # B 0: last line wins
    runs = seed_table.read_logs(ours)
    assert runs == {"A": {0: 0.80, 1: 0.70}, "B": {0: 0.40, 1: 0.60}}

    table = "\n".join(seed_table.seed_table(runs))
    assert "| A | 0.800 / 0.700 | 0.750 ± 0.071 |" in table
    assert "Suite mean per seed (0, 1): 0.600, 0.650" in table
    assert "Seed sd above 0.03 on 2 of 2 sets" in table

    base = seed_table.read_logs([probe_log(tmp_path / "base.log", [("A", 0, 0.70), ("A", 1, 0.70), ("B", 0, 0.5),
                                                                     ("B", 2, 0.3)])])
    compared = "\n".join(seed_table.baseline_table(runs, base))
    assert "| A | 0.700 ± 0.000 | 0.750 ± 0.071 | +0.050 ** | 2 | 0.000 (2) |" in compared  # beyond the baseline's sd
    # B: the mean over the shared seed 0 only; the flag uses the sd of all the baseline's seeds (0.141)
    assert "| B | 0.500 ± 0.000 | 0.400 ± 0.000 | -0.100 | 1 | 0.141 (2) |" in compared
    one_seed = "\n".join(seed_table.baseline_table(runs, {"A": {0: 0.5}}))
    assert "| A | 0.500 ± 0.000 | 0.800 ± 0.000 | +0.300 | 1 | 0.000 (1) |" in one_seed  # no spread: no flag

    peers_csv = tmp_path / "quality.csv"
    with peers_csv.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["method", "seed", "status", "ari", "dataset"])
        writer.writeheader()
        for dataset, method, ari in (("A", "P", 0.60), ("A", "Q", 0.76), ("B", "P", 0.55), ("B", "Q", 0.30)):
            writer.writerow({"method": method, "seed": 0, "status": "ok", "ari": ari, "dataset": dataset})
        writer.writerow({"method": "Q", "seed": 1, "status": "failed", "ari": "", "dataset": "B"})
    peers = seed_table.read_peers(str(peers_csv))
    assert peers == {"A": {"P": [0.60], "Q": [0.76]}, "B": {"P": [0.55], "Q": [0.30]}}
    against = "\n".join(seed_table.peer_table(runs, peers))
    assert "| A | 0.750 ± 0.071 | Q | 0.760 | -0.010 |" in against
    assert "| B | 0.500 ± 0.141 | P | 0.550 | -0.050 |" in against
    # suite means: P 0.575, Q 0.530; ours 0.625
    assert "Margin over the best by mean (P): +0.050" in against
    assert "Sets more than 0.02 below their best peer: 1: B (-0.050 against P)." in against


def test_bad_line_names_the_file(seed_table, tmp_path):
    bad = tmp_path / "bad.log"
    bad.write_text("A zero 1.0 0.5\n")
    with pytest.raises(SystemExit, match="bad.log:1"):
        seed_table.read_logs([str(bad)])
