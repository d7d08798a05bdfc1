"""Quality benchmark (issue 3): scHashFormer, its ablations and the peers users would pick instead.

Every method gets the same raw counts of the same cells and is told the true number of
clusters K the same way (Leiden: resolution bisected to K, except the resolution-1.0 row).
Each (data set, method, seed) runs in its own process (so peak RSS is that run's alone), with
OMP/MKL/numba threads (--threads; default $OMP_NUM_THREADS, else cores / --jobs) set before
torch is imported. On Linux the processes are forked from the benchmark's own, which has
imported what every run imports (torch, anndata, scikit-learn, the package) once; elsewhere
they are spawned and import it themselves.

    python benchmarks/quality.py [--datasets NAME ...] [--extra FILE.h5ad ... --label-key label]
                                 [--seeds 0 1 2 3 4] [--ablation-seeds 0 1] [--deep-seeds 0 1 2] [--scvi-epochs 100] [--jobs 2] [--threads N] [--methods NAME ...] [--out DIR]

Writes DIR/quality.{md,csv} (per-run rows in the csv, mean ± sd over seeds in the md, with
scHashFormer's hash bucket purity and the published scores of benchmarks/PUBLISHED.md beside
them) and DIR/quality_<metric>.png. With the default --out (benchmarks/results) it also rewrites
the docs/BENCHMARKS.md block between <!-- quality:start --> and <!-- quality:end -->.
"""

from __future__ import annotations

import argparse
import importlib
import multiprocessing
import os
import platform
import resource
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results"
# Every labelled set of the shared data folder (its README), as (file, obs column of the labels): the
# tuning suite. Defaults are chosen on the mean over all of it; no entry carries parameters of its own.
SUITE = (("10X_PBMC_top2000.h5", "label"), ("mouse_bladder_cell_top2000.h5", "label"),
         ("worm_neuron_cell_top2000.h5", "label"), ("worm_neuron_cell.h5", "label"),
         ("mouse_bladder_cell_select_2100.h5", "label"), ("CITE_PBMC_counts.h5", "label"),
         ("baron_mouse_1886x14878.h5ad", "cell_type"), ("Deng.h5ad", "cell_type"),
         ("Camp_brain_SOUP.h5ad", "cell_type"), ("CellBench_sc_celseq2.h5ad", "cell_type"),
         ("CellBench_sc_dropseq.h5ad", "cell_type"), ("CellBench_sc_celseq2_5cl_p3.h5ad", "cell_type"))
DATASETS = tuple(Path(f).stem for f, _ in SUITE)
SCHF = "scHashFormer"
# Ablations as TrainConfig overrides of the defaults (docs/METHOD_CHOICES.md).
ABLATIONS = {
    "scHashFormer, no attention": {"attention": False},
    "scHashFormer, no contrastive": {"w_contrastive": 0.0},
    "scHashFormer, no ZINB (stage 1)": {"w_zinb": 0.0},
}
SCVI_LEIDEN, SCVI_KMEANS = "scVI + Leiden (K matched)", "scVI + k-means"
LEIDEN_RES1, LEIDEN_K = "scanpy Leiden (res 1.0)", "scanpy Leiden (K matched)"
# Methods that one run gives together (one model or graph, two clusterings): the second is never run alone
# when the first is asked for too.
PAIRED = {SCVI_LEIDEN: SCVI_KMEANS, LEIDEN_RES1: LEIDEN_K}
# scvi-tools' own heuristic gives 400 epochs below 20,000 cells: ~10 min per run on one CPU thread
# here, which alone would take the benchmark past an hour. 100 epochs (~3,000 steps at these sizes)
# is the budget used; on worm neurons 400 epochs scored no better (seed 0; docs/METHOD_CHOICES.md).
SCVI_EPOCHS = 100
METHODS = (SCHF, *ABLATIONS, LEIDEN_RES1, LEIDEN_K, "PCA(50) + k-means",
           SCVI_LEIDEN, SCVI_KMEANS, "ZINB-DEC (scDeepCluster-style)")
# Imported once before the runs are forked: every method's run imports these (scanpy is not among them,
# so that it does not count in the peak memory of the runs that never use it).
PRELOAD = ("torch", "anndata", "sklearn.cluster", "sklearn.metrics", "schashformer", "schashformer.metrics",
           "schashformer.baselines")
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS")
METRICS = {"ari": "ARI", "nmi": "NMI", "acc": "ACC", "f1_macro": "macro F1", "seconds": "seconds / run",
           "peak_rss_gib": "peak RSS (GiB)"}


# ----------------------------------------------------------------------------- one run
def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def load(path: str, label_key: str = "label"):
    """The AnnData of ``path`` restricted to cells with a label; returns (adata, labels (cells,) str, K)."""
    from schashformer import io

    adata = io.read(path)
    if label_key not in adata.obs:
        raise KeyError(f"{path}: no obs[{label_key!r}] (columns: {list(adata.obs.columns)})")
    known = ~pd.isna(adata.obs[label_key]).to_numpy()
    if not known.all():  # every method sees the same cells: the labelled ones
        adata = adata[known].copy()
    y = adata.obs[label_key].astype(str).to_numpy()
    return adata, y, int(np.unique(y).size)


def run_method(adata, y: np.ndarray, k: int, method: str, seed: int, label_key: str = "label",
               params: dict | None = None) -> list[dict]:
    """Run one method (a name of :data:`METHODS`) on ``adata`` with K = ``k``; rows of scores.

    ``params`` overrides method settings (TrainConfig fields for scHashFormer and its ablations,
    :class:`schashformer.baselines.ZINBDEC` arguments for the DEC baseline); used by tests to
    shorten runs. The methods of :data:`PAIRED` give both rows of their pair, whichever is asked
    for: the scVI ones from one trained model (or rows with status "not installed"), the scanpy
    Leiden ones from one neighbour graph.
    Each row: method, seed, status, ari, nmi, acc, f1_macro (+ homogeneity, ...), seconds and,
    for scHashFormer runs, purity (mean over hash heads), purity_heads, n_buckets.
    """
    from schashformer.metrics import clustering_scores

    params = dict(params or {})
    extra: dict = {}
    start = time.perf_counter()
    if method == SCHF or method in ABLATIONS:
        from schashformer import SCHashFormer

        model = SCHashFormer(k, seed=seed, device="cpu", progress=False, **{**ABLATIONS.get(method, {}), **params})
        model.fit(adata, labels_key=label_key)
        labels = model.labels_
        purities = [s["purity"] for s in model.bucket_stats_]
        extra = {"purity": float(np.mean(purities)), "purity_heads": " ".join(f"{p:.3f}" for p in purities),
                 "n_buckets": float(np.mean([s["n_buckets"] for s in model.bucket_stats_])),
                 "kmeans_init_ari": clustering_scores(y, model.kmeans_labels_)["ari"]}
    elif method in (LEIDEN_RES1, LEIDEN_K):
        return _run_scanpy_leiden(adata, y, k, seed)
    elif method == "PCA(50) + k-means":
        from schashformer.baselines import pca_kmeans

        labels, _ = pca_kmeans(adata, k, seed=seed, n_pcs=50)
    elif method == "ZINB-DEC (scDeepCluster-style)":
        from schashformer.baselines import ZINBDEC

        model = ZINBDEC(k, seed=seed, **params).fit(adata)
        labels = model.labels_
        extra = {"kmeans_init_ari": clustering_scores(y, model.kmeans_labels_)["ari"]}
    elif method in (SCVI_LEIDEN, SCVI_KMEANS):
        return _run_scvi(adata, y, k, seed, params)
    else:
        raise ValueError(f"unknown method {method!r}; choose from {list(METHODS)}")
    seconds = time.perf_counter() - start
    return [{"method": method, "seed": seed, "status": "ok", **clustering_scores(y, labels), "seconds": seconds,
             **extra}]


def _run_scanpy_leiden(adata, y: np.ndarray, k: int, seed: int) -> list[dict]:
    """scanpy's pipeline (PCA, 15-NN graph) once; Leiden at resolution 1.0 and at the resolution giving K
    on that graph. Each row's seconds: the shared graph plus its own Leiden runs. Two rows."""
    from schashformer.baselines.scanpy_pipeline import leiden_on_graph, neighbour_graph
    from schashformer.metrics import clustering_scores

    start = time.perf_counter()
    a, _ = neighbour_graph(adata, seed=seed)
    graph = time.perf_counter() - start
    rows = []
    for method, n_clusters in ((LEIDEN_RES1, None), (LEIDEN_K, k)):
        t = time.perf_counter()
        labels, resolution, _ = leiden_on_graph(a, n_clusters, resolution=1.0, seed=seed)
        rows.append({"method": method, "seed": seed, "status": "ok", **clustering_scores(y, labels),
                     "seconds": graph + time.perf_counter() - t, "resolution": resolution})
    return rows


def _run_scvi(adata, y: np.ndarray, k: int, seed: int, params: dict) -> list[dict]:
    """scVI (scvi-tools) on the counts of the same 2000 genes scHashFormer selects; its latent
    space clustered by Leiden at K (15-NN graph, bisection) and by k-means. Two rows."""
    try:
        import scvi
    except ImportError:
        return [{"method": m, "seed": seed, "status": "not installed"} for m in (SCVI_LEIDEN, SCVI_KMEANS)]
    import anndata as ad
    import scanpy as sc
    from sklearn.cluster import KMeans

    from schashformer.baselines.scanpy_pipeline import leiden_on_graph
    from schashformer.metrics import clustering_scores
    from schashformer.preprocess import prepare

    start = time.perf_counter()
    prep = prepare(adata)  # same gene selection and empty-cell rule as scHashFormer
    a = ad.AnnData(prep.counts.copy())
    scvi.settings.seed = seed
    scvi.model.SCVI.setup_anndata(a)
    model = scvi.model.SCVI(a, n_latent=params.get("n_latent", 10))
    model.train(max_epochs=params.get("max_epochs", SCVI_EPOCHS), accelerator="cpu", enable_progress_bar=False)
    a.obsm["X_scVI"] = model.get_latent_representation()
    trained = time.perf_counter() - start
    yk = y[prep.cell_mask]
    rows = []
    t = time.perf_counter()
    sc.pp.neighbors(a, n_neighbors=15, use_rep="X_scVI", random_state=seed)
    labels, resolution, _ = leiden_on_graph(a, k, seed=seed)
    rows.append({"method": SCVI_LEIDEN, "seed": seed, "status": "ok", **clustering_scores(yk, labels),
                 "seconds": trained + time.perf_counter() - t, "resolution": resolution})
    t = time.perf_counter()
    labels = KMeans(k, n_init=10, random_state=seed).fit_predict(a.obsm["X_scVI"])
    rows.append({"method": SCVI_KMEANS, "seed": seed, "status": "ok", **clustering_scores(yk, labels),
                 "seconds": trained + time.perf_counter() - t})
    return rows


def run_task(task: dict) -> list[dict]:
    """Worker: read ``task['path']`` and run ``task['method']`` with ``task['seed']``.

    task keys: path, dataset, method, seed, label_key (default "label"), params (optional).
    Rows get dataset, n_cells, K and the process's peak RSS (GiB; run in a fresh process, it is
    this run's own, including reading the data and importing the libraries).
    """
    if os.environ.get("OMP_NUM_THREADS"):  # a forked worker inherits torch's pool size: pin it to the run's share
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    adata, y, k = load(task["path"], task.get("label_key", "label"))
    rows = run_method(adata, y, k, task["method"], task["seed"], task.get("label_key", "label"), task.get("params"))
    rss = _peak_rss_gib()
    for row in rows:
        row.update(dataset=task["dataset"], n_cells=adata.n_obs, K=k, peak_rss_gib=rss)
    return rows


# ----------------------------------------------------------------------------- tables and plots
def summarise(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and sd over seeds per (dataset, method) of every metric; ``n_seeds``; first status seen."""
    ok = df[df["status"] == "ok"]
    cols = [c for c in (*METRICS, "purity") if c in ok]
    agg = ok.groupby(["dataset", "method"])[cols].agg(["mean", "std"])
    agg.columns = [f"{c}_{s}" if s == "std" else c for c, s in agg.columns]
    agg["n_seeds"] = ok.groupby(["dataset", "method"]).size()
    status = df.groupby(["dataset", "method"])["status"].first()
    out = agg.reindex(status.index).assign(status=status).reset_index()
    order = {m: i for i, m in enumerate(METHODS)}
    return out.sort_values(["dataset", "method"], key=lambda s: s.map(order) if s.name == "method" else s,
                           ignore_index=True)


def _pm(mean, sd, digits=3) -> str:
    if pd.isna(mean):
        return "—"
    return f"{mean:.{digits}f}" if pd.isna(sd) else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def markdown(summary: pd.DataFrame, purity: pd.DataFrame | None, header: list[str], published: str | None) -> str:
    """The quality.md text: measured table (best mean ARI / NMI per data set in bold), bucket purity,
    published scores."""
    lines = [*header, "",
             "| data set | method | ARI | NMI | ACC | macro F1 | s / run | peak RSS GiB | seeds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, group in summary.groupby("dataset", sort=False):
        best = {m: group[m].max() for m in ("ari", "nmi")}
        for r in group.itertuples():
            if r.status != "ok":
                lines.append(f"| {name} | {r.method} | {r.status} | | | | | | |")
                continue
            cell = {m: _pm(getattr(r, m), getattr(r, f"{m}_std")) for m in ("ari", "nmi", "acc", "f1_macro")}
            for m in ("ari", "nmi"):
                if np.isclose(getattr(r, m), best[m]):
                    cell[m] = f"**{cell[m]}**"
            lines.append(f"| {name} | {r.method} | {cell['ari']} | {cell['nmi']} | {cell['acc']} | {cell['f1_macro']} "
                         f"| {r.seconds:.0f} | {r.peak_rss_gib:.2f} | {int(r.n_seeds)} |")
    if purity is not None and len(purity):
        lines += ["", "Hash bucket purity of scHashFormer (fraction of same-label pairs among the pairs of cells "
                  "sharing a bucket, mean over hash heads and seeds; chance = the same fraction over all pairs):", "",
                  "| data set | method | purity | chance | buckets per head |", "|---|---|---|---|---|"]
        for r in purity.itertuples():
            lines.append(f"| {r.dataset} | {r.method} | {_pm(r.purity, r.purity_sd)} | {r.chance:.3f} | {r.n_buckets:.0f} |")
    if published:
        lines += ["", published.strip()]
    return "\n".join(lines) + "\n"


def chance_purity(y: np.ndarray) -> float:
    """Fraction of same-label pairs among all pairs of cells: the purity of buckets drawn at random."""
    _, counts = np.unique(y, return_counts=True)
    n = counts.sum()
    return float((counts * (counts - 1)).sum() / (n * (n - 1)))


def plot(summary: pd.DataFrame, out: Path) -> list[Path]:
    """One grouped bar plot per metric (x: data set, bars: methods, error bars: sd over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = summary[summary["status"] == "ok"]
    datasets = list(dict.fromkeys(ok["dataset"]))
    methods = [m for m in METHODS if m in set(ok["method"])]
    paths = []
    width = 0.8 / max(len(methods), 1)
    for metric, title in METRICS.items():
        fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(datasets)), 4))
        for i, m in enumerate(methods):
            sub = ok[ok["method"] == m].set_index("dataset").reindex(datasets)
            ax.bar(np.arange(len(datasets)) + (i - (len(methods) - 1) / 2) * width, sub[metric],
                   width, yerr=sub[f"{metric}_std"].fillna(0), label=m, capsize=2)
        ax.set_xticks(np.arange(len(datasets)), [d.replace("_top2000", "") for d in datasets])
        ax.set_ylabel(title)
        ax.set_title(f"{title}, mean ± sd over seeds")
        ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
        fig.tight_layout()
        path = out / f"quality_{metric}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def write_outputs(rows: list[dict], out: Path, header: list[str], chance: dict[str, float],
                  readme: bool = False) -> str:
    """quality.csv (per run), quality.md (summary) and the plots under ``out``; returns the md text."""
    out.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(rows)
    df.to_csv(out / "quality.csv", index=False)
    summary = summarise(df)
    purity = None
    schf = df[(df["status"] == "ok") & df["method"].str.startswith(SCHF)]
    if "purity" in schf:
        purity = schf.groupby(["dataset", "method"]).agg(
            purity=("purity", "mean"), purity_sd=("purity", "std"), n_buckets=("n_buckets", "mean")).reset_index()
        purity["chance"] = purity["dataset"].map(chance)
        purity = purity.sort_values(["dataset", "method"], key=lambda c: c.map(METHODS.index) if c.name == "method" else c,
                                    ignore_index=True)
    published = HERE / "PUBLISHED.md"
    text = markdown(summary, purity, header, published.read_text() if published.exists() else None)
    (out / "quality.md").write_text(text)
    if summary["status"].eq("ok").any():
        plot(summary, out)
    if readme:
        update_readme(text)
    return text


def update_readme(text: str) -> None:
    """Put the measured tables (not the title, not the published table) between the quality markers of
    docs/BENCHMARKS.md (where the README's benchmark sections moved)."""
    path = HERE.parent / "docs" / "BENCHMARKS.md"
    readme = path.read_text()
    start, end = "<!-- quality:start -->", "<!-- quality:end -->"
    if start not in readme or end not in readme:
        return
    body = text.split("\n## Published")[0]
    body = "\n".join(line for line in body.splitlines() if not line.startswith("# "))
    path.write_text(readme[: readme.index(start) + len(start)] + "\n" + body.strip() + "\n" + readme[readme.index(end):])


def _deep(method: str) -> bool:
    """scVI or ZINB-DEC: the deep peers, which get ``--deep-seeds``."""
    return method.startswith(("scVI", "ZINB"))


def plan_tasks(sets: list[tuple[str, str, str]], args: argparse.Namespace) -> list[dict]:
    """One task per (method, data set, seed): scHashFormer and the cheap peers get ``args.seeds``,
    the ablations ``args.ablation_seeds``, scVI and ZINB-DEC ``args.deep_seeds`` (scVI trained
    ``args.scvi_epochs`` epochs, one task giving both of its rows). Longest methods first, so the
    last runs to finish are short ones. ``sets``: (path, data set name, label key)."""
    methods = list(dict.fromkeys(args.methods))
    for first, second in PAIRED.items():  # one run gives both rows
        if first in methods and second in methods:
            methods.remove(second)
    cost = {m: 0 if m.startswith(SCHF) else 1 if _deep(m) else 2 for m in methods}
    seeds = {m: args.ablation_seeds if m in ABLATIONS else args.deep_seeds if _deep(m) else args.seeds for m in methods}
    params = {m: {"max_epochs": args.scvi_epochs} if m.startswith("scVI") else None for m in methods}
    return [{"path": p, "dataset": n, "label_key": lk, "method": m, "seed": s, "params": params[m]}
            for m in sorted(methods, key=cost.get) for p, n, lk in sets for s in seeds[m]]


# ----------------------------------------------------------------------------- command line
def suite_sets(data_dir: str, names: list[str]) -> list[tuple[str, str, str]]:
    """(path, data set name, label key) of each named set of :data:`SUITE` in ``data_dir``."""
    known = {Path(f).stem: (f, key) for f, key in SUITE}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown data set(s) {unknown}; the suite has {list(known)}")
    return [(str(Path(data_dir) / known[n][0]), n, known[n][1]) for n in names]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(HERE.parent.parent / "shared" / "data"))
    parser.add_argument("--datasets", nargs="*", default=list(DATASETS), help="names of suite data sets (default: all of SUITE)")
    parser.add_argument("--extra", nargs="+", default=[], metavar="FILE", help="further labelled .h5ad/.h5 files")
    parser.add_argument("--label-key", default="label", help="obs column of the labels in --extra files")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--ablation-seeds", type=int, nargs="+", default=[0, 1],
                        help="seeds of the scHashFormer ablations; fewer than --seeds keeps the run under an hour")
    parser.add_argument("--deep-seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="seeds of the deep peers, scVI and ZINB-DEC (the longest runs after scHashFormer's)")
    parser.add_argument("--scvi-epochs", type=int, default=SCVI_EPOCHS,
                        help="scVI training epochs (scvi-tools' heuristic would give 400 here)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, metavar="METHOD",
                        help=f"subset of: {'; '.join(METHODS)}")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once, one process each")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads per run (default: $OMP_NUM_THREADS if set, else cores / jobs)")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args(argv)

    sets = suite_sets(args.data_dir, args.datasets)
    sets += [(str(Path(f)), Path(f).stem, args.label_key) for f in args.extra]
    tasks = plan_tasks(sets, args)
    threads = str(args.threads or os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 1) // max(args.jobs, 1)))
    # Thread limits must be in the environment before torch, numpy's BLAS or numba is first imported.
    for var in THREAD_VARS:
        os.environ[var] = threads
    fork = sys.platform.startswith("linux")  # fork is unsafe on macOS and absent on Windows
    if fork:  # paid once here instead of once per run; no torch op runs here, so no thread pool is forked
        for module in PRELOAD:
            importlib.import_module(module)
    chance = {n: chance_purity(load(p, lk)[1]) for p, n, lk in sets}
    rows, start_all = [], time.perf_counter()
    # One task per process: ru_maxrss is a process's lifetime peak, so a reused worker would report
    # the largest earlier run's memory. A forked process's peak includes the pages it shares with
    # this one (the preloaded modules), as a spawned one's includes its own imports of them.
    with multiprocessing.get_context("fork" if fork else "spawn").Pool(args.jobs, maxtasksperchild=1) as pool:
        for result in pool.imap(run_task, tasks):
            result = [r for r in result if r["method"] in args.methods]  # a PAIRED run gives two rows
            rows.extend(result)
            for r in result:
                line = (f"ARI {r['ari']:.3f} NMI {r['nmi']:.3f} {r['seconds']:.0f}s {r['peak_rss_gib']:.2f} GiB"
                        if r["status"] == "ok" else r["status"])
                print(f"{r['dataset']} | {r['method']} | seed {r['seed']}: {line}", flush=True)
    total = time.perf_counter() - start_all
    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    command = "python benchmarks/quality.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    methods = args.methods
    notes = [f"ablations: seeds {args.ablation_seeds}" if any(m in ABLATIONS for m in methods) else "",
             f"scVI and ZINB-DEC: seeds {args.deep_seeds}" if any(map(_deep, methods)) else "",
             f"scVI: {args.scvi_epochs} epochs" if any(m.startswith("scVI") for m in methods) else ""]
    ablation_note = f" ({'; '.join(n for n in notes if n)})" if any(notes) else ""
    header = [f"# Quality benchmark: true K for every method, seeds {args.seeds}{ablation_note}", "",
              f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, {ram_gib:.0f} GiB RAM, no GPU used; "
              f"{args.jobs} runs at once with {threads} thread(s) each, {'forked' if fork else 'spawned'}. Whole benchmark: {total / 60:.1f} min. "
              f"Command: `{command.strip()}`", "",
              "Mean ± sd over seeds. s / run: wall time of the method on data in memory (reading excluded); "
              "peak RSS: the run's process, including reading the data and imports. Bold: best mean ARI / NMI "
              "of the data set."]
    out = Path(args.out)
    text = write_outputs(rows, out, header, chance, readme=out.resolve() == DEFAULT_OUT.resolve())
    print(text)


if __name__ == "__main__":
    main()
