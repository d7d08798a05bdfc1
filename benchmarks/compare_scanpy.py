"""scHashFormer vs scanpy's standard pipeline on the labeled *_top2000.h5 data sets (issue 2).

Every method gets the same raw counts and the true number of clusters; scanpy's Leiden
resolution is bisected to give exactly that K. Writes benchmarks/results/compare_scanpy.{csv,md}.

    python benchmarks/compare_scanpy.py [--seeds 0 1 2] [--data-dir ../shared/data] [--jobs 2]

``--jobs N`` runs N (data set, seed) pairs at once, each in its own process with
N-th of the cores: on small data one process per core uses the CPU better than one
process with several threads. Per-run seconds are then per-process wall times.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import platform
import time
from pathlib import Path

import pandas as pd

from schashformer import io, tl
from schashformer.baselines import scanpy_leiden
from schashformer.metrics import clustering_scores

DATASETS = ("10X_PBMC_top2000", "mouse_bladder_cell_top2000", "worm_neuron_cell_top2000")
HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(HERE.parent.parent / "shared" / "data"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--jobs", type=int, default=2, help="(data set, seed) pairs run at once, one process each")
    parser.add_argument("--readme-only", action="store_true", help="only copy the existing table into README.md")
    args = parser.parse_args()
    if args.readme_only:
        update_readme((Path(args.out) / "compare_scanpy.md").read_text())
        return
    rows = []
    start_all = time.perf_counter()
    tasks = [(str(Path(args.data_dir) / f"{name}.h5"), name, seed) for name in args.datasets for seed in args.seeds]
    threads = str(max(1, (os.cpu_count() or 1) // max(args.jobs, 1)))
    # Thread limits must be in the environment before a worker imports torch (hence spawn):
    # set at run time instead, two workers ran ~5x slower here.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = threads
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
        for pair in pool.map(run_pair, tasks):
            rows.extend(pair)
            print(f"{pair[0]['dataset']} seed {pair[0]['seed']}: " + " | ".join(
                f"{r['method']} ARI {r['ari']:.3f} NMI {r['nmi']:.3f} {r['seconds']:.0f}s" for r in pair), flush=True)
    df = pd.DataFrame(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "compare_scanpy.csv", index=False)
    summary = df.groupby(["dataset", "method"]).agg(
        ARI=("ari", "mean"), ARI_sd=("ari", "std"), NMI=("nmi", "mean"), NMI_sd=("nmi", "std"),
        ACC=("acc", "mean"), F1=("f1_macro", "mean"), seconds=("seconds", "mean")).reset_index()
    total = time.perf_counter() - start_all
    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, {ram_gib:.0f} GiB RAM, no GPU used"
    lines = [f"# scHashFormer vs scanpy (true K), seeds {args.seeds}", "",
             f"Machine: {machine}. Whole comparison: {total / 60:.1f} min. Command: `python benchmarks/compare_scanpy.py --jobs {args.jobs}`", "",
             "| data set | method | ARI (mean ± sd) | NMI (mean ± sd) | ACC | macro F1 | s/run |", "|---|---|---|---|---|---|---|"]
    for r in summary.itertuples():
        lines.append(f"| {r.dataset} | {r.method} | {r.ARI:.3f} ± {r.ARI_sd:.3f} | {r.NMI:.3f} ± {r.NMI_sd:.3f} | "
                     f"{r.ACC:.3f} | {r.F1:.3f} | {r.seconds:.0f} |")
    (out / "compare_scanpy.md").write_text("\n".join(lines) + "\n")
    update_readme("\n".join(lines) + "\n")
    print("\n".join(lines))


def run_pair(task: tuple[str, str, int]) -> list[dict]:
    """scanpy Leiden and scHashFormer on one data set with one seed."""
    path, name, seed = task
    adata = io.read(path)
    y = adata.obs["label"].to_numpy()
    k = int(pd.unique(y).size)
    t = time.perf_counter()
    labels, _ = scanpy_leiden(adata, n_clusters=k, seed=seed)
    rows = [{"dataset": name, "method": "scanpy Leiden (K matched)", "seed": seed,
             **clustering_scores(y, labels), "seconds": time.perf_counter() - t}]
    t = time.perf_counter()
    tl.cluster(adata, k, labels_key="label", seed=seed, progress=False)
    rows.append({"dataset": name, "method": "scHashFormer", "seed": seed, **adata.uns["schashformer"]["metrics"],
                 "seconds": time.perf_counter() - t})
    return rows


def update_readme(table_md: str) -> None:
    """Replace the README's results section (between its markers) with the measured table."""
    readme = HERE.parent / "README.md"
    text = readme.read_text()
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    if start not in text or end not in text:
        return
    body = "\n".join(line for line in table_md.splitlines() if not line.startswith("# "))
    readme.write_text(text[: text.index(start) + len(start)] + "\n" + body.strip() + "\n" + text[text.index(end):])


if __name__ == "__main__":
    main()
