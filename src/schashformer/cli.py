"""Command line: ``schashformer cluster INPUT --n-clusters K --out DIR`` and ``schashformer demo``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from .errors import OutputExistsError, ParameterError, SCHashFormerError

RESULT_FILES = ("result.h5ad", "clusters.csv", "metrics.json", "umap.png")


def _parse_params(items: list[str]) -> dict:
    """``--param key=value`` pairs, values parsed as YAML scalars (numbers, booleans, null)."""
    params = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ParameterError(f"--param expects key=value, got {item!r}")
        params[key.strip()] = yaml.safe_load(value)
    return params


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="schashformer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("cluster", help="cluster a count matrix and write results to --out")
    run.add_argument("input", help=".h5ad, X/Y .h5, 10x .h5, Matrix Market dir/.mtx, or .csv/.tsv(.gz)")
    run.add_argument("--n-clusters", type=int, required=True, help="number of clusters K")
    run.add_argument("--out", required=True, help="output directory")
    _common(run)
    run.add_argument("--format", default=None, help="input format (h5ad, xy_h5, 10x_h5, mtx, csv, tsv); default: guess")
    run.add_argument("--transpose", action="store_true", help="csv/tsv rows are genes, columns cells")

    demo = sub.add_parser("demo", help="cluster the bundled 10x PBMC data set (4271 cells, 8 types) and print scores")
    demo.add_argument("--out", default="schashformer_demo", help="output directory (default: schashformer_demo)")
    _common(demo)
    return parser


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--labels-key", default=None, help="obs column of known labels (evaluation only)")
    p.add_argument("--batch-key", default=None, help="obs column of batches (ZINB covariate)")
    p.add_argument("--layer", default=None, help="layer holding raw counts instead of X")
    p.add_argument("--n-top-genes", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--allow-noncounts", action="store_true", help="accept pre-normalised (non-integer) input")
    p.add_argument("--param", action="append", metavar="KEY=VALUE", help="any TrainConfig field, repeatable")
    p.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    p.add_argument("--no-umap", action="store_true", help="skip the UMAP plot")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse an output directory that already holds results unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"--out {out} exists and is not a directory")
    existing = [name for name in RESULT_FILES if (out / name).exists()]
    if existing and not overwrite:
        raise OutputExistsError(f"{out} already holds results ({', '.join(existing)}); pass --overwrite to replace them")


def run_cluster(adata, *, n_clusters: int, out: Path, labels_key=None, batch_key=None, layer=None,
                n_top_genes=2000, seed=0, device="auto", allow_noncounts=False, params=None, overwrite=False,
                umap=True, progress=True, input_name: str = "", read_seconds: float = 0.0) -> dict:
    """Cluster ``adata`` and write the result files into ``out`` all at once; returns metrics.json content."""
    from . import tl

    check_out_dir(out, overwrite)
    _, model = tl.cluster(adata, n_clusters, labels_key=labels_key, batch_key=batch_key, layer=layer,
                          n_top_genes=n_top_genes, seed=seed, device=device, allow_noncounts=allow_noncounts,
                          progress=progress, return_model=True, overwrite=overwrite, **(params or {}))
    record = adata.uns["schashformer"]
    report = {
        "input": input_name, "n_cells": int(adata.n_obs), "n_genes_input": int(adata.n_vars),
        "n_clusters": int(n_clusters), "seed": seed,
        "metrics": record.get("metrics", {}),
        "timings": {"read": {"seconds": round(read_seconds, 3)}, **model.timings_},
        "bucket_stats": model.bucket_stats_,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        from .io import write_h5ad

        start = time.perf_counter()
        if umap:
            from .pl import umap_png

            umap_png(adata, staging / "umap.png", labels_key=labels_key)
            report["timings"]["umap_plot"] = {"seconds": round(time.perf_counter() - start, 3)}
        adata.obs[["schashformer"]].rename_axis("cell").to_csv(staging / "clusters.csv")
        write_h5ad(adata, staging / "result.h5ad")
        (staging / "metrics.json").write_text(json.dumps(_jsonable(report), indent=2))
        out.mkdir(parents=True, exist_ok=True)
        for f in staging.iterdir():  # every file is complete before any lands in out
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


def _print_report(report: dict, out: Path) -> None:
    m = report["metrics"]
    if m:
        print("scores: " + "  ".join(f"{k.upper()} {m[k]:.3f}" for k in ("ari", "nmi", "acc", "f1_macro") if k in m))
    total = sum(v["seconds"] for v in report["timings"].values())
    peak = max(v.get("peak_rss_gib", 0) for v in report["timings"].values())
    print(f"time {total:.1f} s, peak memory {peak:.2f} GiB; results in {out}/ ({', '.join(RESULT_FILES)})")


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        from . import io

        out = Path(args.out)
        check_out_dir(out, args.overwrite)  # fail before any work
        start = time.perf_counter()
        if args.command == "demo":
            adata, name = io.read_bundled_pbmc(), "bundled 10X_PBMC_top2000.h5"
            n_clusters, labels_key = 8, args.labels_key or "label"
        else:
            adata = io.read(args.input, format=args.format, transpose=args.transpose)
            name, n_clusters, labels_key = args.input, args.n_clusters, args.labels_key
        print(f"read {name}: {adata.n_obs} cells x {adata.n_vars} genes")
        report = run_cluster(adata, n_clusters=n_clusters, out=out, labels_key=labels_key,
                             batch_key=args.batch_key, layer=args.layer, n_top_genes=args.n_top_genes,
                             seed=args.seed, device=args.device, allow_noncounts=args.allow_noncounts,
                             params=_parse_params(args.param), overwrite=args.overwrite, umap=not args.no_umap,
                             progress=not args.quiet, input_name=str(name),
                             read_seconds=time.perf_counter() - start)
        _print_report(report, out)
        return 0
    except SCHashFormerError as exc:
        print(f"schashformer: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
