"""Trajectory benchmark (issue 5 item 4): diffusion pseudotime on the embedding vs the known order.

Data: simulated branching differentiation (``schashformer.datasets.simulate_branching``: a
trunk splitting into two lineages, NB counts, 1500 cells x 1000 genes, a new data set per seed)
with its true time, and the real mouse ES-cell time course of Klein et al. 2015 (1000 cells,
days 0/2/4/7 after LIF withdrawal). Pseudotime is ``schashformer.tl.trajectory`` (scanpy's
PAGA + diffmap + DPT, root = the extreme cell of the first time point along DC1) on

* the scHashFormer embedding (``tl.cluster`` with K clusters, PAGA on its clusters);
* scanpy's PCA (log1p, HVG, scaled, 50 PCs; PAGA on Leiden clusters): the standard pipeline.

Score: Spearman correlation of pseudotime with the true time (simulation) or the day (Klein);
for the simulation also the mean Spearman within each lineage (trunk + that lineage). Writes
``benchmarks/results/trajectory.{csv,md}`` and one ``trajectory_<data>.png`` per data set
(scHashFormer, first seed).

    OMP_NUM_THREADS=1 python benchmarks/trajectory.py [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd

from schashformer import io, pl, tl
from schashformer.baselines import pca_embedding
from schashformer.app import parse_params
from schashformer.datasets import simulate_branching
from schashformer.trajectory import pseudotime_correlation

HERE = Path(__file__).resolve().parent


def load(name: str, data_dir: Path, seed: int):
    """(adata, root, truth key, K, description)."""
    if name == "branching":
        return (simulate_branching(1500, 1000, seed=seed), "stage=0", "time", 6,
                "simulated branching (trunk + 2 lineages), 1500 cells x 1000 genes, truth = simulated time")
    if name == "klein":
        return (io.read(data_dir / "klein_subset_1000x900.h5ad"), "day=0", "day", 4,
                "Klein 2015 mouse ES cells, 1000 cells x 900 genes, truth = day 0/2/4/7")
    raise SystemExit(f"unknown data set {name!r} (branching, klein)")


def scores(adata, truth: str) -> dict:
    pt = adata.obs["dpt_pseudotime"].to_numpy()
    out = {"spearman": pseudotime_correlation(pt, adata.obs[truth])}
    if "branch" in adata.obs:
        lineages = [c for c in adata.obs["branch"].cat.categories if c != "trunk"]
        per = [pseudotime_correlation(pt[m], adata.obs[truth].to_numpy()[m])
               for c in lineages for m in [adata.obs["branch"].isin(["trunk", c]).to_numpy()]]
        out["spearman_within_lineage"] = float(np.mean(per))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(HERE.parent.parent / "shared" / "data"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--datasets", nargs="+", default=["branching", "klein"])
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="TrainConfig field for every scHashFormer fit (e.g. shorter training on a busy machine)")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()
    params = parse_params(args.param)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, described = [], {}
    start_all = time.perf_counter()
    for name in args.datasets:
        for seed in args.seeds:
            adata, root, truth, k, what = load(name, Path(args.data_dir), seed)
            described[name] = what
            start = time.perf_counter()
            tl.cluster(adata, k, seed=seed, progress=False, **params)
            tl.trajectory(adata, root, seed=seed, umap=False)  # plots on DC1-2: no numba compile
            rows.append({"dataset": name, "method": "scHashFormer embedding + DPT", "seed": seed,
                         **scores(adata, truth), "seconds": time.perf_counter() - start})
            if seed == args.seeds[0]:
                colour = [truth] + (["branch"] if "branch" in adata.obs else [])
                pl.trajectory(adata, color=colour, save=out / f"trajectory_{name}.png", show=False)
            start = time.perf_counter()
            adata.obsm["X_pca"] = pca_embedding(adata, seed=seed)
            tl.trajectory(adata, root, use_rep="X_pca", groups=None, key_added="pca_traj", seed=seed, umap=False,
                          overwrite=True)  # scanpy's keys (uns["paga"], obs["dpt_pseudotime"]) now hold the PCA run
            rows.append({"dataset": name, "method": "scanpy PCA + DPT", "seed": seed, **scores(adata, truth),
                         "seconds": time.perf_counter() - start})
            for r in rows[-2:]:
                print(f"{name} seed {seed} {r['method']}: Spearman {r['spearman']:.3f} ({r['seconds']:.0f} s)",
                      flush=True)
            pd.DataFrame(rows).to_csv(out / "trajectory.csv", index=False)
            write_md(pd.DataFrame(rows), args, described, out, (time.perf_counter() - start_all) / 60)
    print((out / "trajectory.md").read_text())


def write_md(df: pd.DataFrame, args, described: dict, out: Path, total: float) -> None:
    """The markdown table of the rows so far (rewritten after each seed, so a cut-short run still has one)."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    machine = (f"{os.cpu_count()}-core {platform.machine()} CPU, {ram:.0f} GiB, no GPU, shared with other jobs "
               "during the run (seconds are wall time, inflated by that sharing)")
    lines = [f"# Trajectories: Spearman correlation of diffusion pseudotime with the known order (seeds {args.seeds})",
             "", f"Machine: {machine}. Whole run: {total:.1f} min. Command: `python benchmarks/trajectory.py --seeds "
             f"{' '.join(map(str, args.seeds))} --datasets {' '.join(args.datasets)}"
             + "".join(f" --param {p}" for p in args.param) + "`", "",
             "Mean ± sd over seeds (for the simulation each seed is also a new data set). Root: the first time "
             "point's cell most extreme along the first diffusion component. Plots: `trajectory_<data>.png`.", "",
             "| data set | method | Spearman | Spearman within lineage | seeds | s/run |", "|---|---|---|---|---|---|"]
    for (name, method), g in df.groupby(["dataset", "method"], sort=False):
        within = (f"{g['spearman_within_lineage'].mean():.3f} ± {(g['spearman_within_lineage'].std(ddof=1) if len(g) > 1 else 0):.3f}"
                  if "spearman_within_lineage" in g and g["spearman_within_lineage"].notna().any() else "")
        lines.append(f"| {name} | {method} | {g['spearman'].mean():.3f} ± {(g['spearman'].std(ddof=1) if len(g) > 1 else 0):.3f} | "
                     f"{within} | {len(g)} | {g['seconds'].mean():.0f} |")
    lines += ["", *[f"- {n}: {d}" for n, d in described.items()]]
    (out / "trajectory.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
