"""Speed on ordinary data sets (issue 22): scHashFormer against scanpy's standard pipeline, one after the other.

On every labelled set of the tuning suite (:data:`quality.SUITE`) and every seed, runs

* scHashFormer at its defaults, told the true K, and
* scanpy's standard pipeline: normalise, log1p, HVG, scale, PCA, 15-NN graph, Leiden at
  resolution 1.0 (its ARI at the resolution bisected to the true K is given beside it),

each in its own fresh process (forked from this one, which has imported torch, anndata,
scikit-learn, scanpy and the package once, so no run pays an import), one run at a time with
every core, so the two methods meet the same machine in the same run. Numba's compilation of
scanpy's and pynndescent's kernels happens inside scanpy's runs, as in a user's fresh session. Seconds are the method's wall time on data in memory
(reading excluded), as in ``benchmarks/quality.py``.

    python benchmarks/speed.py [--datasets NAME ...] [--seeds 0 1 2] [--param name=value ...] [--out DIR]

Writes DIR/speed.{md,csv}: per set the time ratio scHashFormer / scanpy (mean over seeds) and the
ARI of both, then the whole suite's totals.
"""

from __future__ import annotations

import argparse
import importlib
import multiprocessing
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import quality  # noqa: E402  (the suite, its loader and each method's run live there)

SCANPY = quality.LEIDEN_RES1


def table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per data set: seconds and ARI of both methods (mean over seeds) and the time ratio."""
    ok = df[df["status"] == "ok"]
    rows = []
    for name, d in ok.groupby("dataset", sort=False):
        ours, peer = d[d["method"] == quality.SCHF], d[d["method"] == SCANPY]
        peer_k = d[d["method"] == quality.LEIDEN_K]
        rows.append({"data set": name, "cells": int(d["n_cells"].iloc[0]), "K": int(d["K"].iloc[0]),
                     "scHashFormer s": ours["seconds"].mean(), "scanpy s": peer["seconds"].mean(),
                     "ratio": ours["seconds"].mean() / peer["seconds"].mean(),
                     "scHashFormer ARI": ours["ari"].mean(), "scHashFormer ARI sd": ours["ari"].std(ddof=0),
                     "scanpy ARI (res 1.0)": peer["ari"].mean(), "scanpy ARI (K)": peer_k["ari"].mean()})
    return pd.DataFrame(rows)


def markdown(summary: pd.DataFrame, header: list[str]) -> str:
    lines = [*header, "",
             "| data set | cells | K | scHashFormer s | scanpy s | ratio | scHashFormer ARI | scanpy ARI (res 1.0) "
             "| scanpy ARI (K) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in summary.itertuples(index=False):
        lines.append(f"| {r[0]} | {r.cells:,} | {r.K} | {r[3]:.1f} | {r[4]:.1f} | {r.ratio:.2f} | "
                     f"{r[6]:.3f} ± {r[7]:.3f} | {r[8]:.3f} | {r[9]:.3f} |")
    total_ours, total_peer = summary["scHashFormer s"].sum(), summary["scanpy s"].sum()
    lines += ["", f"Whole suite: scHashFormer {total_ours:.0f} s, scanpy {total_peer:.0f} s (ratio "
              f"{total_ours / total_peer:.2f}); sets where scHashFormer is slower: "
              f"{int((summary['ratio'] > 1).sum())} of {len(summary)}; largest ratio {summary['ratio'].max():.2f}. "
              f"Mean ARI: scHashFormer {summary['scHashFormer ARI'].mean():.3f}, scanpy at resolution 1.0 "
              f"{summary['scanpy ARI (res 1.0)'].mean():.3f}, scanpy at K {summary['scanpy ARI (K)'].mean():.3f}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(HERE.parent.parent / "shared" / "data"))
    parser.add_argument("--datasets", nargs="+", default=list(quality.DATASETS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                        help="a scHashFormer parameter for a probe (the default run passes none)")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    threads = str(os.cpu_count() or 1)
    for var in quality.THREAD_VARS:  # before torch, BLAS or numba is first imported
        os.environ.setdefault(var, threads)
    from schashformer.app import parse_params  # imports torch: only now that the thread limits are set

    params = parse_params(args.param)
    fork = sys.platform.startswith("linux")
    if fork:
        for module in (*quality.PRELOAD, "scanpy"):
            importlib.import_module(module)
    sets = quality.suite_sets(args.data_dir, args.datasets)
    tasks = [{"path": p, "dataset": n, "label_key": lk, "method": m, "seed": s,
              "params": params if m == quality.SCHF else None}
             for p, n, lk in sets for s in args.seeds for m in (quality.SCHF, SCANPY)]
    rows, start = [], time.perf_counter()
    load = os.getloadavg()[0]
    context = multiprocessing.get_context("fork" if fork else "spawn")
    for task in tasks:  # one run at a time, each in a fresh process (its own peak memory, no warm caches)
        with context.Pool(1, maxtasksperchild=1) as pool:
            result = pool.apply(quality.run_task, (task,))
        rows.extend(result)
        for r in result:
            print(f"{r['dataset']} | {r['method']} | seed {r['seed']}: ARI {r['ari']:.3f} {r['seconds']:.1f}s",
                  flush=True)
    total = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(rows)
    df.to_csv(out / "speed.csv", index=False)
    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    command = "python benchmarks/speed.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    header = ["# Speed on the labelled suite: scHashFormer vs scanpy's standard pipeline", "",
              f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, {ram_gib:.0f} GiB RAM, no GPU; one run at "
              f"a time with {os.environ['OMP_NUM_THREADS']} thread(s), each in a fresh process; 1-min load "
              f"{load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end. Whole benchmark: {total / 60:.1f} min. "
              f"Seeds {args.seeds}. Command: `{command.strip()}`" + (f" (probe parameters: {params})" if params else ""),
              "", "Seconds: wall time on data in memory (reading excluded), mean over seeds. ratio = scHashFormer / "
              "scanpy (below 1: scHashFormer is faster). scHashFormer is told the true K; scanpy's time is its "
              "pipeline with Leiden at resolution 1.0, and its ARI at the resolution giving K (bisection) is shown too."]
    text = markdown(table(df), header)
    (out / "speed.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
