"""Batch integration benchmark (issue 5 item 3): mixing and biology scores against peers.

Data: baron mouse pancreas (real batches: two donors, 13 cell types) and 10x PBMC split into
three pseudo-batches with technical shifts (``schashformer.datasets.add_batch_effects``:
per-batch capture efficiency by binomial thinning, log-normal gene-specific efficiencies,
extra dropout; 8 known cell types). Methods, each given the true number of clusters K:

* scHashFormer with ``batch_key`` (the integration path) and without it (no correction);
* scanpy PCA (log1p, 2000 HVG, scaled, 50 PCs) + k-means: no correction;
* harmonypy on the same PCs + k-means (Korsunsky et al. 2019), the standard PyPI integration method;
* scVI (``scvi-tools``) + k-means, when installed (``pip install -e .[bench]``).

Scores (``schashformer.integration``, scib definitions): iLISI, kBET acceptance (per cell type),
batch ASW (mixing); cell-type ASW, cLISI, ARI, NMI (biology). Writes
``benchmarks/results/integration.{csv,md}``.

    OMP_NUM_THREADS=1 python benchmarks/integration.py [--seeds 0 1 2] [--datasets baron pbmc_batches]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd

from schashformer import io, tl
from schashformer.baselines import pca_embedding
from schashformer.app import parse_params
from schashformer.datasets import add_batch_effects
from schashformer.integration import integration_scores

HERE = Path(__file__).resolve().parent
SCORES = ("ilisi", "kbet", "batch_asw", "mixing", "label_asw", "clisi", "ari", "nmi", "biology")  # table order


def load(name: str, data_dir: Path, sim_cells: int):
    """(adata with raw counts, batch_key, labels_key, K, description)."""
    if name == "baron":
        a = io.read(data_dir / "baron_mouse_1886x14878.h5ad")
        return a, "donor", "cell_type", 13, "baron mouse pancreas, 2 real donors"
    if name == "pbmc_batches":
        a = io.read(data_dir / "10X_PBMC_top2000.h5")
        rng = np.random.default_rng(0)
        a = a[np.sort(rng.choice(a.n_obs, min(sim_cells, a.n_obs), replace=False))].copy()
        a = add_batch_effects(a, 3, seed=0)
        return a, "batch", "label", 8, f"10x PBMC ({a.n_obs} cells), 3 simulated batches"
    raise SystemExit(f"unknown data set {name!r} (baron, pbmc_batches)")


def kmeans(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    from sklearn.cluster import KMeans

    return KMeans(k, n_init=10, random_state=seed).fit_predict(x)


def run_methods(adata, batch_key: str, labels_key: str, k: int, seed: int, skip_scvi: bool, params: dict):
    """Yield (method, embedding, clusters, seconds)."""
    for name, key in (("scHashFormer + batch_key", batch_key), ("scHashFormer, no batch_key", None)):
        start = time.perf_counter()
        a = tl.cluster(adata, k, batch_key=key, seed=seed, progress=False, copy=True, **params)
        yield name, a.obsm["X_schashformer"], a.obs["schashformer"].to_numpy(), time.perf_counter() - start
        if key is not None:  # the same fit, batches aligned within its clusters (tl.integrate)
            tl.integrate(a, batch_key)
            yield (name + " + tl.integrate", a.obsm["X_schashformer_integrated"], a.obs["schashformer"].to_numpy(),
                   time.perf_counter() - start)
    start = time.perf_counter()
    x = pca_embedding(adata, seed=seed)
    t_pca = time.perf_counter() - start
    yield "PCA + k-means (no correction)", x, kmeans(x, k, seed), time.perf_counter() - start
    try:
        import harmonypy
    except ImportError:
        print("harmonypy not installed (pip install -e .[bench]): no Harmony row")
    else:
        start = time.perf_counter()
        ho = harmonypy.run_harmony(x, adata.obs[[batch_key]], batch_key, random_state=seed, verbose=False)
        z = np.asarray(ho.Z_corr)
        z = z.T if z.shape[0] != adata.n_obs else z  # harmonypy < 2 returns (dims, cells)
        yield "Harmony (harmonypy) on PCA + k-means", z, kmeans(z, k, seed), t_pca + time.perf_counter() - start
    if skip_scvi:
        return
    try:
        import scvi
    except ImportError:
        print("scvi-tools not installed (pip install -e .[bench]): no scVI row")
        return
    start = time.perf_counter()
    b = adata.copy()
    scvi.settings.seed = seed
    scvi.model.SCVI.setup_anndata(b, batch_key=batch_key)
    model = scvi.model.SCVI(b)
    model.train(max_epochs=min(400, max(50, round(20000 / b.n_obs * 20))), enable_progress_bar=False)
    z = model.get_latent_representation()
    yield "scVI + k-means", z, kmeans(z, k, seed), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(HERE.parent.parent / "shared" / "data"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--datasets", nargs="+", default=["baron", "pbmc_batches"])
    parser.add_argument("--sim-cells", type=int, default=2000, help="PBMC cells split into pseudo-batches")
    parser.add_argument("--skip-scvi", action="store_true")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="TrainConfig field for every scHashFormer fit (e.g. shorter training on a busy machine)")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()
    params = parse_params(args.param)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, described = [], {}
    start_all = time.perf_counter()
    loaded = {name: load(name, Path(args.data_dir), args.sim_cells) for name in args.datasets}
    for seed in args.seeds:  # seed-major: a run cut short still has every data set
        for name in args.datasets:
            adata, batch_key, labels_key, k, what = loaded[name]
            described[name] = what
            for method, emb, clusters, seconds in run_methods(adata, batch_key, labels_key, k, seed, args.skip_scvi, params):
                s = integration_scores(emb, adata.obs[batch_key].to_numpy(), adata.obs[labels_key].to_numpy(), clusters)
                rows.append({"dataset": name, "method": method, "seed": seed, **s, "seconds": seconds})
                print(f"{name} seed {seed} {method}: " + " ".join(f"{c} {s[c]:.3f}" for c in SCORES)
                      + f" ({seconds:.0f} s)", flush=True)
                pd.DataFrame(rows).to_csv(out / "integration.csv", index=False)  # partial results survive a kill
                write_md(pd.DataFrame(rows), args, described, out, (time.perf_counter() - start_all) / 60)
    print((out / "integration.md").read_text())


def write_md(df: pd.DataFrame, args, described: dict, out: Path, total: float) -> None:
    """The markdown table of the rows so far (rewritten after each row, so a cut-short run still has one)."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    machine = (f"{os.cpu_count()}-core {platform.machine()} CPU, {ram:.0f} GiB, no GPU, shared with other jobs "
               "during the run (seconds are wall time, inflated by that sharing)")
    lines = [f"# Batch integration: mixing and biology (seeds {args.seeds})", "",
             f"Machine: {machine}. Whole run: {total:.1f} min. Command: `python benchmarks/integration.py --seeds "
             f"{' '.join(map(str, args.seeds))} --datasets {' '.join(args.datasets)}"
             + "".join(f" --param {p}" for p in args.param) + "`", "",
             "Mixing (higher = batches more mixed): iLISI (scaled to [0, 1]), kBET acceptance (per cell type), "
             "batch ASW (1 - |silhouette on batch| per type). Biology (higher = types better kept): cell-type ASW, "
             "cLISI, ARI and NMI of k-means / scHashFormer clusters (true K). Definitions as in scib (Luecken et al. "
             "2022). Mean ± sd over seeds.", ""]
    for name in [d for d in args.datasets if d in set(df["dataset"])]:
        part = df[df["dataset"] == name]
        lines += [f"## {name}: {described[name]}", "",
                  "| method | iLISI | kBET | batch ASW | **mixing** | type ASW | cLISI | ARI | NMI | **biology** | seeds "
                  "| s/run |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for method, g in part.groupby("method", sort=False):
            cells = [f"{g[c].mean():.3f} ± {g[c].std(ddof=1) if len(g) > 1 else 0:.3f}" for c in SCORES]
            cells[3], cells[8] = f"**{cells[3]}**", f"**{cells[8]}**"
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {len(g)} | {g['seconds'].mean():.0f} |")
        lines.append("")
    (out / "integration.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
