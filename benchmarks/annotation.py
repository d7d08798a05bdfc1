"""Label transfer (issue 5, item 1): scHashFormer ``tl.annotate`` vs scanpy ``ingest`` vs kNN on PCA.

For every labeled data set, stratified 70/30 reference/query splits (one per seed) and, for
mouse pancreas (baron), the donor split mouse1 -> mouse2 (a real cross-batch transfer; the same
cells for every seed, scHashFormer fitted with that seed). Each method sees the reference's labels
only:

* scHashFormer: ``tl.cluster`` on the reference (defaults, K = number of reference labels), then
  ``tl.annotate(query, reference, model=...)`` (hash-index neighbours, distance-weighted,
  class-balanced vote in z + tokens + 50 reference PCs: the defaults). Scored with every cell called
  (``min_confidence=0``) and, at the default threshold, on the confidently called cells (with the
  fraction called "unknown"). Two ablations on the same model: the vote in z alone
  (``space="z"``) and without class balance (``class_balance=0``).
* scanpy ingest: reference normalize_total/log1p/HVG(2000)/PCA(50)/neighbors(15) as in scanpy's
  ingest tutorial, query projected onto its PCA, labels by ``sc.tl.ingest(obs=...)`` (majority of
  the 15 reference neighbours; the UMAP mapping, which does not change the labels, is skipped).
* kNN on PCA(50): scikit-learn ``KNeighborsClassifier(15, weights="distance")`` on the
  reference's scaled PCA, the query projected with the reference's scaling and axes; and the same
  with the genes centred but not scaled (as ingest's PCA), which transfers better across donors.

Writes benchmarks/results/annotation.{csv,md}.

    python benchmarks/annotation.py [--seeds 0 1 2] [--datasets ...] [--data-dir ../shared/data]
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn import metrics as skm

HERE = Path(__file__).resolve().parent
DATASETS = {"10X_PBMC_top2000": ("10X_PBMC_top2000.h5", "label"),
            "mouse_bladder_cell_top2000": ("mouse_bladder_cell_top2000.h5", "label"),
            "worm_neuron_cell_top2000": ("worm_neuron_cell_top2000.h5", "label"),
            "baron_mouse": ("baron_mouse_1886x14878.h5ad", "cell_type")}
ABLATIONS = {"ablation: vote in z only": {"space": "z"}, "ablation: no class balance": {"class_balance": 0.0}}
MACHINE = "2-core x86_64 CPU, 24 GiB, no GPU, shared with other jobs during the run"


def splits(adata, labels_key: str, name: str, seeds: list[int]):
    """(split name, reference index, query index) triples."""
    from sklearn.model_selection import StratifiedShuffleSplit

    y = adata.obs[labels_key].astype(str).to_numpy()
    for seed in seeds:
        ref, qry = next(StratifiedShuffleSplit(1, test_size=0.3, random_state=seed).split(np.zeros(len(y)), y))
        yield f"random 70/30 (seed {seed})", seed, np.sort(ref), np.sort(qry)
    if name == "baron_mouse":
        donor = adata.obs["donor"].astype(str).to_numpy()
        for seed in seeds:
            yield (f"donor mouse1 -> mouse2 (seed {seed})", seed, np.flatnonzero(donor == "mouse1"),
                   np.flatnonzero(donor == "mouse2"))


def scores(y_true, y_pred) -> dict:
    y_true, y_pred = np.asarray(y_true, str), np.asarray(y_pred, str)
    labels = np.unique(y_true)  # macro F1 over the query's true types (a missed type scores 0)
    return {"accuracy": float((y_true == y_pred).mean()),
            "f1_macro": float(skm.f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0))}


def run_schashformer(ref, qry, labels_key: str, seed: int) -> tuple[dict, dict]:
    from schashformer import tl

    start = time.perf_counter()
    k = ref.obs[labels_key].nunique()
    _, model = tl.cluster(ref, k, seed=seed, progress=False, return_model=True, copy=True)
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tl.annotate(qry, ref, labels_key=labels_key, model=model, min_confidence=0.0, key_added="all")
        tl.annotate(qry, ref, labels_key=labels_key, model=model, key_added="conf")
    ann_s = time.perf_counter() - start
    y = qry.obs[labels_key].astype(str).to_numpy()
    out = scores(y, qry.obs["all"])
    called = qry.obs["conf"].astype(str).to_numpy() != "unknown"
    out.update(accuracy_called=float((y[called] == qry.obs["conf"].astype(str).to_numpy()[called]).mean()),
               unknown_fraction=float(1 - called.mean()), seconds=fit_s + ann_s, seconds_annotate=ann_s)
    ablations = {}
    for method, kwargs in ABLATIONS.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = tl.annotate(qry, ref, labels_key=labels_key, model=model, min_confidence=0.0, copy=True, **kwargs)
        ablations[method] = scores(y, res.obs["schashformer_annotation"])
    extra = {"model": model, "ablations": ablations}
    return out, extra


def _lognorm(a, genes=None):
    import anndata as ad
    import scanpy as sc

    b = ad.AnnData(a.X.copy(), obs=a.obs.copy())
    b.var_names = a.var_names.copy()
    sc.pp.normalize_total(b, target_sum=1e4)
    sc.pp.log1p(b)
    if genes is None:
        sc.pp.highly_variable_genes(b, n_top_genes=min(2000, b.n_vars), flavor="seurat")
        genes = b.var_names[b.var["highly_variable"]]
    return b[:, genes].copy(), genes


def run_ingest(ref, qry, labels_key: str, seed: int) -> dict:
    import scanpy as sc

    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r, genes = _lognorm(ref)
        q, _ = _lognorm(qry, genes)
        r.obs[labels_key] = r.obs[labels_key].astype(str).astype("category")
        sc.pp.pca(r, n_comps=50, random_state=seed)
        sc.pp.neighbors(r, n_neighbors=15, random_state=seed)
        # Labels are voted by the reference neighbours found in PCA space whatever the embedding mapped,
        # so the UMAP projection (slow, and irrelevant to the labels) is skipped.
        sc.tl.ingest(q, r, obs=labels_key, embedding_method="pca")
    out = scores(qry.obs[labels_key], q.obs[labels_key])
    out["seconds"] = time.perf_counter() - start
    return out


def run_knn_pca(ref, qry, labels_key: str, seed: int, scaled: bool = True) -> dict:
    from sklearn.decomposition import PCA
    from sklearn.neighbors import KNeighborsClassifier

    start = time.perf_counter()
    r, genes = _lognorm(ref)
    q, _ = _lognorm(qry, genes)
    xr, xq = r.X.toarray(), q.X.toarray()
    mu, sd = xr.mean(0), xr.std(0)
    sd[sd == 0] = 1
    if not scaled:  # centred only, as the PCA of scanpy's ingest
        sd[:] = 1
    xr, xq = np.clip((xr - mu) / sd, -10, 10), np.clip((xq - mu) / sd, -10, 10)
    pca = PCA(50, random_state=seed).fit(xr)
    clf = KNeighborsClassifier(15, weights="distance").fit(pca.transform(xr), ref.obs[labels_key].astype(str))
    out = scores(qry.obs[labels_key], clf.predict(pca.transform(xq)))
    out["seconds"] = time.perf_counter() - start
    return out


def run_exact_z(ref, qry, labels_key: str, model) -> dict:
    """Diagnostic: the same vote on exact (all-pairs) neighbours in z; shows what the hash lookup costs."""
    from sklearn.neighbors import KNeighborsClassifier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zr, zq = model.transform(ref), model.transform(qry)
    clf = KNeighborsClassifier(15, weights="distance").fit(zr, ref.obs[labels_key].astype(str))
    return scores(qry.obs[labels_key], clf.predict(zq))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(HERE.parent.parent / "shared" / "data"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS))
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--diagnose", action="store_true", help="also score exact kNN in z (all pairs)")
    parser.add_argument("--from-csv", action="store_true", help="only rewrite the markdown from the existing CSV")
    args = parser.parse_args()
    if args.from_csv:
        out = Path(args.out)
        write_markdown(pd.read_csv(out / "annotation.csv"), out / "annotation.md", float("nan"), args)
        return

    from schashformer import io

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    t0 = time.perf_counter()
    for name in args.datasets:
        fname, labels_key = DATASETS[name]
        adata = io.read(Path(args.data_dir) / fname)
        for split, seed, ri, qi in splits(adata, labels_key, name, args.seeds):
            ref, qry = adata[ri].copy(), adata[qi].copy()
            base = {"dataset": name, "split": split, "n_reference": len(ri), "n_query": len(qi)}
            ours, extra = run_schashformer(ref, qry.copy(), labels_key, seed)
            first = len(rows)
            rows.append({**base, "method": "scHashFormer annotate", **ours})
            rows.append({**base, "method": "scanpy ingest", **run_ingest(ref, qry, labels_key, seed)})
            rows.append({**base, "method": "kNN on PCA(50)", **run_knn_pca(ref, qry, labels_key, seed)})
            rows.append({**base, "method": "kNN on PCA(50), genes not scaled",
                         **run_knn_pca(ref, qry, labels_key, seed, scaled=False)})
            rows += [{**base, "method": method, **res} for method, res in extra["ablations"].items()]
            if args.diagnose:
                rows.append({**base, "method": "diagnostic: exact kNN in z", **run_exact_z(ref, qry, labels_key,
                                                                                           extra["model"])})
            for r in rows[first:]:
                print(f"{name} | {split} | {r['method']}: acc {r['accuracy']:.3f} F1 {r['f1_macro']:.3f}", flush=True)
            pd.DataFrame(rows).to_csv(out / "annotation.csv", index=False)  # partial results survive a kill
    df = pd.DataFrame(rows)
    df.to_csv(out / "annotation.csv", index=False)
    write_markdown(df, out / "annotation.md", time.perf_counter() - t0, args)


def _duration(seconds: float) -> str:
    return "not timed (table rebuilt from the CSV)" if np.isnan(seconds) else f"{seconds / 60:.1f} min"


def write_markdown(df: pd.DataFrame, path: Path, seconds: float, args) -> None:
    kind = df["split"].str.replace(r" \(seed \d+\)$", "", regex=True)  # one row per kind of split, over seeds
    df = df.assign(kind=kind)
    g = df.groupby(["dataset", "kind", "method"], sort=False)
    summary = g.agg(n=("accuracy", "size"), acc=("accuracy", "mean"), acc_sd=("accuracy", "std"),
                    f1=("f1_macro", "mean"), f1_sd=("f1_macro", "std"), seconds=("seconds", "mean")).reset_index()
    has_conf = "accuracy_called" in df
    lines = ["# Label transfer: scHashFormer annotate vs scanpy ingest vs kNN on PCA", "",
             f"Machine: {MACHINE}. Whole run: {_duration(seconds)}. Command: `python benchmarks/annotation.py "
             f"--seeds {' '.join(map(str, args.seeds))}`. Accuracy and macro F1 (over the query's true types) with "
             "every query cell called; mean ± sd over the seeds (random splits: one split per seed; donor split: the "
             "same cells, scHashFormer fitted and the PCA of ingest and kNN computed with each seed).", "",
             "| data set | split | method | splits | accuracy | macro F1 | s/split |", "|---|---|---|---|---|---|---|"]
    fmt = lambda m, s: f"{m:.3f}" + ("" if np.isnan(s) else f" ± {s:.3f}")  # noqa: E731
    for r in summary.itertuples():
        lines.append(f"| {r.dataset} | {r.kind} | {r.method} | {r.n} | {fmt(r.acc, r.acc_sd)} | {fmt(r.f1, r.f1_sd)} "
                     f"| {'(same fit)' if np.isnan(r.seconds) else f'{r.seconds:.0f}'} |")
    if has_conf:
        ours = df[df["method"] == "scHashFormer annotate"].groupby(["dataset", "kind"], sort=False).agg(
            acc_called=("accuracy_called", "mean"), unknown=("unknown_fraction", "mean")).reset_index()
        lines += ["", "scHashFormer at the default `min_confidence=0.5`: accuracy on the cells it calls, and the "
                  "fraction it calls \"unknown\".", "", "| data set | split | accuracy (called) | unknown |",
                  "|---|---|---|---|"]
        lines += [f"| {r.dataset} | {r.kind} | {r.acc_called:.3f} | {r.unknown:.3f} |" for r in ours.itertuples()]
    lines += ["", "Seconds: scHashFormer includes training the model on the reference (the annotation itself is "
              "`seconds_annotate` in the CSV); ingest includes the reference's PCA and neighbours."]
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
