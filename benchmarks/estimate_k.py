"""Number of clusters unknown (issue 7): scHashFormer with ``n_clusters=None`` vs scanpy Leiden at resolution 1.0.

On every labelled set of the tuning suite (``quality.SUITE``) with at least 1,000 cells, for each
seed, in the same process:

* scanpy's standard pipeline with Leiden at its default resolution 1.0 (K found by Leiden);
* scHashFormer with ``n_clusters=None`` (K estimated after stage-2 pre-training), full fit;
* the K estimators we measured, on the very z the fit estimated K from (pre-trained
  embedding, before DEC): Leiden on the hash-neighbourhood graph at several resolutions and
  silhouette-selected k-means. Each gets ARI/NMI of k-means on z at its K (20 starts: the
  clustering head's start in a fit) and the ARI of its own partition (``partition_ari``).

    python benchmarks/estimate_k.py [--seeds 0 1] [--datasets NAME ...] [--jobs 1] [--out DIR] [--continue]

Writes DIR/estimate_k.csv (one row per data set, seed and method) and DIR/estimate_k.md (true K,
estimated K and ARI/NMI as mean ± sd over seeds). ``--jobs N`` runs N (data set, seed) pairs
at once, one spawned process each with cores / N threads (set before torch is imported).
Rows are appended to the csv as each pair finishes (seed by seed, every data set first), so an
interrupted run keeps its results; ``--continue`` skips the pairs already in the csv and
``--report-only`` rewrites the markdown from the csv.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from quality import SUITE  # the tuning suite is defined once, in quality.py

# The suite's sets of at least 1,000 cells (issue 19 asks K within 1.5x on each): name -> (file, label key);
# X/Y h5 files get their labels as obs["label"]
LARGE = ("10X_PBMC_top2000", "mouse_bladder_cell_top2000", "worm_neuron_cell_top2000", "worm_neuron_cell",
         "mouse_bladder_cell_select_2100", "CITE_PBMC_counts", "baron_mouse_1886x14878")
DATASETS = {Path(f).stem: (f, key) for f, key in SUITE if Path(f).stem in LARGE}
SCHF, SCANPY = "scHashFormer (K estimated, resolution {:g})", "scanpy Leiden (res 1.0)"
# estimators compared on the same pre-trained z (name -> keyword arguments of n_clusters.estimate)
ALTERNATIVES = {
    "Leiden on hash graph of z, res 0.5": {"resolution": 0.5},
    "Leiden on hash graph of z, res 1.0": {"resolution": 1.0},
    "Leiden on hash graph of z, res 2.0": {"resolution": 2.0},
    "silhouette over k-means on z (K 2..30)": {"method": "silhouette"},
}


def run_pair(task: tuple[str, str, str, int, float]) -> list[dict]:
    """scanpy Leiden (res 1.0) and scHashFormer (K estimated) on one data set with one seed."""
    from sklearn.cluster import KMeans

    import schashformer.n_clusters as nc
    from schashformer import io, tl
    from schashformer.baselines import scanpy_leiden
    from schashformer.metrics import clustering_scores

    path, name, label_key, seed, resolution = task
    adata = io.read(path)
    adata = adata[adata.obs[label_key].notna()].copy()
    y = adata.obs[label_key].astype(str).to_numpy()
    base = {"dataset": name, "seed": seed, "true_k": int(pd.unique(y).size)}
    rows = []

    start = time.perf_counter()
    labels, _ = scanpy_leiden(adata, seed=seed, resolution=1.0)
    rows.append({**base, "method": SCANPY, "k": int(labels.max() + 1), **clustering_scores(y, labels),
                 "seconds": time.perf_counter() - start})

    seen = {}
    original = nc.estimate

    def recording(z, orders, chunk_size, **kwargs):  # keep the z the fit estimates K from
        seen.update(z=z, orders=orders, chunk_size=chunk_size, kwargs=kwargs)
        return original(z, orders, chunk_size, **kwargs)

    nc.estimate = recording
    try:
        start = time.perf_counter()
        tl.cluster(adata, None, resolution=resolution, labels_key=label_key, seed=seed, progress=False)
        seconds = time.perf_counter() - start
    finally:
        nc.estimate = original
    rec = adata.uns["schashformer"]
    rows.append({**base, "method": SCHF.format(resolution), "k": int(rec["n_clusters_estimated"]), **rec["metrics"], "seconds": seconds})
    mask = np.asarray(adata.obs["schashformer"].notna())  # cells with counts: those z covers
    for method, kwargs in ALTERNATIVES.items():
        start = time.perf_counter()
        args = {**seen["kwargs"], **kwargs}
        k, part = original(seen["z"], seen["orders"], seen["chunk_size"], **args)
        seconds = time.perf_counter() - start
        km = KMeans(k, n_init=20, random_state=seed).fit_predict(seen["z"])
        rows.append({**base, "method": method, "k": k, **clustering_scores(y[mask], km),
                     "partition_ari": clustering_scores(y[mask], part)["ari"], "seconds": seconds})
    return rows


def summarise(df: pd.DataFrame) -> pd.DataFrame:
    df = df.drop_duplicates(["dataset", "seed", "method"])  # peers are rerun with each --resolution
    return df.groupby(["dataset", "method"], sort=False).agg(
        true_k=("true_k", "first"), k=("k", "mean"), k_sd=("k", "std"), ari=("ari", "mean"), ari_sd=("ari", "std"),
        partition_ari=("partition_ari", "mean"),
        nmi=("nmi", "mean"), nmi_sd=("nmi", "std"), seconds=("seconds", "mean"), n_seeds=("seed", "nunique")).reset_index()


def markdown(df: pd.DataFrame, seeds: list[int], command: str, minutes: float, machine: str) -> str:
    s = summarise(df)
    pm = lambda m, sd: f"{m:.3f} ± {0 if np.isnan(sd) else sd:.3f}"  # noqa: E731
    lines = [f"# Number of clusters unknown: estimated K vs true K (seeds {seeds}; the seeds column says how many "
             "finished per data set)", "",
             f"Machine: {machine}. Sum of per-run times: {minutes:.1f} min. Command: `{command}`", "",
             "## scHashFormer (`n_clusters=None`, full fit) vs scanpy Leiden at resolution 1.0", "",
             "| data set | true K | method | seeds | K (mean ± sd) | K / true K | ARI (mean ± sd) | NMI (mean ± sd) | s/run |",
             "|---|---|---|---|---|---|---|---|---|"]
    main = s[s.method.str.startswith(SCHF.split("{")[0]) | (s.method == SCANPY)]
    for r in main.itertuples():
        lines.append(f"| {r.dataset} | {r.true_k} | {r.method} | {r.n_seeds} | "
                     f"{r.k:.1f} ± {0 if np.isnan(r.k_sd) else r.k_sd:.1f} | {r.k / r.true_k:.2f} | {pm(r.ari, r.ari_sd)} | {pm(r.nmi, r.nmi_sd)} | {r.seconds:.0f} |")
    avg = main.groupby("method").agg(ari=("ari", "mean"), nmi=("nmi", "mean")).reset_index()
    lines += ["", "Mean over data sets (of the per-data-set means), and data sets whose mean estimated K is within a "
              "factor 1.5 of the true K:", "", "| method | ARI | NMI | K within 1.5x |", "|---|---|---|---|"]
    for r in avg.itertuples():
        sub = main[main.method == r.method]
        ok = int(((sub.k / sub.true_k).between(1 / 1.5, 1.5)).sum())
        lines.append(f"| {r.method} | {r.ari:.3f} | {r.nmi:.3f} | {ok} of {len(sub)} |")
    lines += ["", "## K estimators on the same pre-trained z (before DEC)", "",
              "ARI/NMI: k-means on z at the estimated K (how a fit uses K); partition ARI: the estimator's own "
              "partition; s: seconds of the estimator alone.", "",
              "| data set | true K | estimator | seeds | K (mean ± sd) | ARI (mean ± sd) | NMI (mean ± sd) | partition ARI | s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in s[s.method.isin(list(ALTERNATIVES))].itertuples():
        lines.append(f"| {r.dataset} | {r.true_k} | {r.method} | {r.n_seeds} | "
                     f"{r.k:.1f} ± {0 if np.isnan(r.k_sd) else r.k_sd:.1f} | {pm(r.ari, r.ari_sd)} | {pm(r.nmi, r.nmi_sd)} | {r.partition_ari:.3f} | {r.seconds:.1f} |")
    alt = s[s.method.isin(list(ALTERNATIVES))].assign(ratio=lambda t: t.k / t.true_k)
    lines += ["", "| estimator | mean ARI | mean NMI | mean partition ARI | K within 1.5x |", "|---|---|---|---|---|"]
    for method, sub in alt.groupby("method", sort=False):
        lines.append(f"| {method} | {sub.ari.mean():.3f} | {sub.nmi.mean():.3f} | {sub.partition_ari.mean():.3f} | "
                     f"{int(sub.ratio.between(1 / 1.5, 1.5).sum())} of {len(sub)} data sets |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(HERE.parent.parent / "shared" / "data"))
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--jobs", type=int, default=1, help="(data set, seed) pairs run at once, one process each")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--resolution", type=float, default=None,
                        help="resolution of the scHashFormer fit (default: the package default)")
    parser.add_argument("--continue", dest="cont", action="store_true", help="skip pairs already in the csv")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the markdown from the csv")
    args = parser.parse_args()
    load_start = os.getloadavg()[0]  # other work on the machine shows in the load (2 cores: above ~2 it competed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    csv = out / "estimate_k.csv"
    done = pd.read_csv(csv) if (args.cont or args.report_only) and csv.exists() else pd.DataFrame()
    from schashformer.n_clusters import DEFAULT_RESOLUTION

    resolution = DEFAULT_RESOLUTION if args.resolution is None else args.resolution
    ours = done[done.method == SCHF.format(resolution)] if not done.empty else done
    finished = set() if ours.empty else set(zip(ours.dataset, ours.seed))
    tasks = []
    for seed in args.seeds:  # seed-major: every data set gets a result before any gets a second seed
        for name in args.datasets:
            path = Path(args.data_dir) / DATASETS[name][0]
            if not path.exists():
                sys.exit(f"estimate_k: {path} not found (--data-dir)")
            if (name, seed) not in finished and not args.report_only:
                tasks.append((str(path), name, DATASETS[name][1], seed, resolution))
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // max(args.jobs, 1)))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # before a worker imports torch (hence spawn)
        os.environ[var] = threads
    df = done
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
        for pair in pool.map(run_pair, tasks):
            df = pd.concat([df, pd.DataFrame(pair)], ignore_index=True)
            df.to_csv(csv, index=False)
            print(f"{pair[0]['dataset']} seed {pair[0]['seed']} (true K {pair[0]['true_k']}): " + " | ".join(
                f"{r['method']} K {r['k']} ARI {r['ari']:.3f}" for r in pair), flush=True)
    if df.empty:
        sys.exit(f"estimate_k: no results in {csv}")
    df = df[df.seed.isin(args.seeds) & df.dataset.isin(args.datasets)]
    seeds = sorted(df.seed.unique().tolist())
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    machine = (f"{os.cpu_count()}-core {platform.machine()} CPU, {ram:.0f} GiB RAM, no GPU, {threads} thread(s) per "
               f"run, one run at a time unless --jobs; 1-min load {load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    command = "python benchmarks/estimate_k.py " + shlex.join(sys.argv[1:])
    text = markdown(df, seeds, command.strip(), df.seconds.sum() / 60, machine)  # sum of per-run times
    (out / "estimate_k.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
