"""Rare populations (issue 5, item 2): F1 of the rarest labels (< 2% of cells) per method.

Methods, on the same raw counts, K = the true number of labels where a method needs K:
scHashFormer (defaults), scanpy Leiden with K matched (resolution bisected) and at resolution 1.0,
and PCA(50) + k-means (``schashformer.baselines``). A label's F1 uses the one-to-one Hungarian
matching of clusters to labels (as ACC / macro F1); the majority matching (each cluster to its
majority label, fairer to Leiden at resolution 1.0, which returns more clusters than labels) is
in the CSV and in a second table. Data sets without any label below 2% (10x PBMC) are skipped:
they have no rare label to score.

Writes benchmarks/results/rare_populations.{csv,md}; the CSV has one row per (data set, seed,
method, rare label).

    python benchmarks/rare_populations.py [--seeds 0 1 2] [--datasets ...]
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
DATASETS = {"baron_mouse": ("baron_mouse_1886x14878.h5ad", "cell_type"),
            "mouse_bladder_cell_top2000": ("mouse_bladder_cell_top2000.h5", "label"),
            "worm_neuron_cell_top2000": ("worm_neuron_cell_top2000.h5", "label"),
            "10X_PBMC_top2000": ("10X_PBMC_top2000.h5", "label")}
MACHINE = "2-core x86_64 CPU, 24 GiB, no GPU, shared with other jobs during the run"


def methods(adata, k: int, seed: int):
    """(method name, cluster labels, seconds) for every compared method."""
    from schashformer import tl
    from schashformer.baselines import pca_kmeans, scanpy_leiden

    start = time.perf_counter()
    res = tl.cluster(adata, k, seed=seed, progress=False, copy=True)
    yield "scHashFormer", res.obs["schashformer"].to_numpy(), time.perf_counter() - start
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        labels, _ = scanpy_leiden(adata, k, seed=seed)
        yield "scanpy Leiden (K matched)", labels, time.perf_counter() - start
        start = time.perf_counter()
        labels, _ = scanpy_leiden(adata, None, resolution=1.0, seed=seed)
        yield "scanpy Leiden (res 1.0)", labels, time.perf_counter() - start
        start = time.perf_counter()
        labels, _ = pca_kmeans(adata, k, seed=seed)
        yield "PCA + k-means", labels, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(HERE.parent.parent / "shared" / "data"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--datasets", nargs="+", default=[d for d in DATASETS if d != "10X_PBMC_top2000"])
    parser.add_argument("--max-fraction", type=float, default=0.02)
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--from-csv", action="store_true", help="only rewrite the markdown from the existing CSV")
    args = parser.parse_args()
    out = Path(args.out)
    if args.from_csv:
        write_markdown(pd.read_csv(out / "rare_populations.csv", dtype={"label": str}), out / "rare_populations.md",
                       float("nan"), args)
        return

    from schashformer import io
    from schashformer.metrics import per_label_scores

    out.mkdir(parents=True, exist_ok=True)
    rows = []
    t0 = time.perf_counter()
    for name in args.datasets:
        fname, labels_key = DATASETS[name]
        adata = io.read(Path(args.data_dir) / fname)
        y = adata.obs[labels_key].to_numpy()
        k = adata.obs[labels_key].nunique()
        for seed in args.seeds:
            for method, pred, seconds in methods(adata, k, seed):
                hung = per_label_scores(y, pred, matching="hungarian")
                major = per_label_scores(y, pred, matching="majority")
                rare = hung.index[hung["fraction"] < args.max_fraction]
                for lab in rare:
                    rows.append({"dataset": name, "seed": seed, "method": method, "label": lab,
                                 "n_cells": int(hung.loc[lab, "n_cells"]), "fraction": hung.loc[lab, "fraction"],
                                 "f1": hung.loc[lab, "f1"], "precision": hung.loc[lab, "precision"],
                                 "recall": hung.loc[lab, "recall"], "f1_majority": major.loc[lab, "f1"],
                                 "n_clusters": int(pd.Series(pred).nunique()), "seconds": seconds})
                if len(rare) == 0:
                    print(f"{name}: no label below {args.max_fraction:.0%} of cells", flush=True)
                    break
                f1 = np.mean([r["f1"] for r in rows[-len(rare):]])
                print(f"{name} seed {seed} {method}: rare-label F1 {f1:.3f} ({len(rare)} labels, {seconds:.0f}s)",
                      flush=True)
            pd.DataFrame(rows).to_csv(out / "rare_populations.csv", index=False)
            if rows:  # the table so far: a run stopped early still leaves one
                write_markdown(pd.DataFrame(rows), out / "rare_populations.md", time.perf_counter() - t0, args)
    df = pd.DataFrame(rows)
    df.to_csv(out / "rare_populations.csv", index=False)
    write_markdown(df, out / "rare_populations.md", time.perf_counter() - t0, args)


def _duration(seconds: float) -> str:
    return "not timed (table rebuilt from the CSV)" if np.isnan(seconds) else f"{seconds / 60:.1f} min"


def write_markdown(df: pd.DataFrame, path: Path, seconds: float, args) -> None:
    order = ["scHashFormer", "scanpy Leiden (K matched)", "scanpy Leiden (res 1.0)", "PCA + k-means"]
    # Mean over rare labels within a run first, then mean ± sd over seeds.
    per_run = df.groupby(["dataset", "method", "seed"]).agg(f1=("f1", "mean"), f1_maj=("f1_majority", "mean"),
                                                             k=("n_clusters", "first")).reset_index()
    agg = per_run.groupby(["dataset", "method"]).agg(f1=("f1", "mean"), f1_sd=("f1", "std"), maj=("f1_maj", "mean"),
                                                     maj_sd=("f1_maj", "std"), k=("k", "mean"), n=("seed", "size"))
    lines = [f"# Rare populations: F1 of labels below {args.max_fraction:.0%} of cells", "",
             f"Machine: {MACHINE}. Whole run: {_duration(seconds)}. Command: `python benchmarks/rare_populations.py "
             f"--seeds {' '.join(map(str, args.seeds))}`. Mean F1 over the rare labels of a data set, then mean ± sd "
             "over seeds. Hungarian: one cluster per label (as ACC); majority: each cluster to its majority label.",
             "", "| data set | rare labels (cells) | method | clusters | F1 Hungarian | F1 majority | seeds |",
             "|---|---|---|---|---|---|---|"]
    for ds in df["dataset"].unique():
        sizes = df[df["dataset"] == ds].drop_duplicates("label").sort_values("n_cells")
        rare = ", ".join(f"{r.label} ({r.n_cells})" for r in sizes.itertuples())
        for m in order:
            if (ds, m) not in agg.index:
                continue
            r = agg.loc[(ds, m)]
            sd = lambda v: "" if np.isnan(v) else f" ± {v:.3f}"  # noqa: E731
            lines.append(f"| {ds} | {rare} | {m} | {r.k:.0f} | {r.f1:.3f}{sd(r.f1_sd)} | {r.maj:.3f}{sd(r.maj_sd)} "
                         f"| {r.n:.0f} |")
    lines += ["", "Per label (Hungarian F1, mean over seeds):", "",
              "| data set | label | cells | " + " | ".join(order) + " |", "|---|---|---|" + "---|" * len(order)]
    per_label = df.pivot_table(index=["dataset", "label", "n_cells"], columns="method", values="f1", aggfunc="mean")
    for (ds, lab, n), r in per_label.iterrows():
        lines.append(f"| {ds} | {lab} | {n} | " + " | ".join(f"{r.get(m, np.nan):.3f}" for m in order) + " |")
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
