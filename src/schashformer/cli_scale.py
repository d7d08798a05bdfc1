"""Command-line forms for atlas-scale data: ``schashformer simulate`` and out-of-core ``cluster``.

``schashformer simulate --cells N --out F.h5ad --like PBMC`` writes simulated counts fitted to a
real labeled data set (:mod:`schashformer.datasets.simulate`). ``schashformer cluster F.h5ad``
goes through the out-of-core path (:mod:`schashformer.streaming`) automatically when the file
holds more cells than ``train_cells`` (default 50,000) or would take more than half of the
available memory to load, or with ``--out-of-core``: the matrix is never loaded, and
``result.h5ad`` is a copy of the input file with the results added (obs, obsm, uns).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .errors import InputError, ParameterError

COMMANDS = ("simulate",)
UMAP_CELLS = 20000  # the UMAP of an out-of-core run shows a random subsample of this many cells


def add_parsers(sub) -> None:
    """The ``simulate`` sub-command and the ``--out-of-core`` option of ``cluster``."""
    from .datasets.simulate import REFERENCES

    sim = sub.add_parser("simulate", help="write simulated counts fitted to a labeled data set (.h5ad, chunked)")
    sim.add_argument("--cells", type=int, required=True, help="number of cells")
    sim.add_argument("--out", required=True, help="output .h5ad file")
    sim.add_argument("--like", default="PBMC",
                     help=f"reference: {', '.join(REFERENCES)} or a labeled count file (labels in obs['label'])")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    sim.add_argument("--quiet", action="store_true", help="no progress bar")
    cluster = sub.choices.get("cluster")
    if cluster is not None:
        cluster.add_argument("--out-of-core", action="store_true",
                             help="stream the .h5ad in row chunks and train on a subsample (automatic for files "
                                  "with more cells than train_cells or too large to load)")


def main(args) -> int:
    """Run ``simulate``."""
    from .datasets.simulate import simulate

    start = time.perf_counter()
    path = simulate(args.cells, like=args.like, seed=args.seed, out=args.out, overwrite=args.overwrite,
                    progress=not args.quiet)
    print(f"wrote {path}: {args.cells} cells like {args.like} (seed {args.seed}) in {time.perf_counter() - start:.1f} s")
    return 0


def wants_out_of_core(args, train_cells: int | None = None) -> bool:
    """True when ``cluster`` should stream its input: asked for, or a ``.h5ad`` with more than
    ``train_cells`` cells (default: TrainConfig's) or too large to load in half the available memory."""
    from .train import TrainConfig

    train_cells = TrainConfig().train_cells if train_cells is None else train_cells
    path = Path(args.input)
    is_h5ad = (args.format or "").lower() in ("h5ad", "anndata") or (args.format is None and path.suffix == ".h5ad")
    if getattr(args, "out_of_core", False):
        if not is_h5ad:
            raise InputError(f"{path}: --out-of-core reads .h5ad files only; convert it first "
                             "(schashformer.io.read(path).write_h5ad('counts.h5ad'))")
        return True
    if not is_h5ad or not path.is_file():
        return False
    import h5py

    from . import resources
    from .io import estimate_read_bytes

    try:
        with h5py.File(path, "r") as f:
            node = f["X"]
            n_obs = int(node.attrs["shape"][0]) if "shape" in node.attrs else int(node.shape[0])
    except (OSError, KeyError, ValueError, TypeError):
        return False  # the in-memory reader reports what is wrong with the file
    avail = resources.available_bytes()
    too_big = avail is not None and estimate_read_bytes(path, "h5ad") > avail / 2
    return n_obs > train_cells or too_big


def run_cluster_out_of_core(args, out: Path, params: dict) -> dict:
    """``schashformer cluster`` on a ``.h5ad`` streamed from disk; writes the result files into ``out``.

    ``params``: the :class:`SCHashFormer` parameters (:func:`schashformer.cli.estimator_params`).
    """
    from . import cli, tl
    from .model import SCHashFormer
    from .streaming import CountSource, data_checksum, fit_out_of_core, write_result_h5ad

    start = time.perf_counter()
    source = CountSource.from_h5ad(args.input, args.layer)
    print(f"read {args.input} (out of core): {source.n_obs} cells x {source.n_vars} genes")
    try:
        model = SCHashFormer.from_params({**params, "checkpoint_dir": out / cli.CHECKPOINT_DIR,
                                          "keep_checkpoint": True})
        model.check_params()
        fit_out_of_core(model, source, batch_key=args.batch_key, labels_key=args.labels_key, resume=args.resume)
        t0 = time.perf_counter()
        checksum = data_checksum(source, model.stream_scan_)
        timings = {**model.timings_, "checksum": {"seconds": round(time.perf_counter() - t0, 3)}}
        result = results_only(source)
        tl.write_results(result, model, labels_key=args.labels_key, batch_key=args.batch_key, layer=args.layer,
                         checksum=checksum, timings=timings)
        record = result.uns["schashformer"]
        record["input"] = {"path": str(Path(args.input).resolve()), "format": "h5ad", "transpose": False}
        record["out_of_core"] = {"train_cells": int(len(model.train_rows_))}
        report = {"input": str(args.input), "n_cells": source.n_obs, "n_genes_input": source.n_vars,
                  "n_clusters": int(model.n_clusters_), "seed": model.seed, "out_of_core": True,
                  "metrics": record.get("metrics", {}), "timings": timings, "bucket_stats": model.bucket_stats_,
                  "data_checksum": checksum}
        write_outputs(args, out, source, result, model, report, start)
    finally:
        source.close()
    return report


def results_only(source):
    """An AnnData with the source's obs and var but no matrix, to receive the results."""
    import anndata as ad
    import pandas as pd

    return ad.AnnData(obs=source.obs.copy(), var=pd.DataFrame(index=source.var_names))


def write_outputs(args, out: Path, source, result, model, report: dict, start: float) -> None:
    """Stage every result file, then rename the staging folder onto ``out`` (as ``cli.run_cluster``)."""
    from . import cli
    from .streaming import write_result_h5ad

    with cli.staged_output(out, lambda: cli.check_out_dir(out, args.overwrite, resume=True)) as staging:
        t0 = time.perf_counter()
        result.obs[["schashformer"]].rename_axis("cell").to_csv(staging / "clusters.csv")
        write_result_h5ad(Path(args.input), staging / "result.h5ad", result.obs, dict(result.obsm),
                          {"schashformer": result.uns["schashformer"]})
        report["timings"]["write_results"] = {"seconds": round(time.perf_counter() - t0, 3)}
        if "model" in cli.RESULT_FILES:
            model.save(staging / "model")
        if not args.no_umap:
            t0 = time.perf_counter()
            from .pl import umap_png

            rows = np.sort(np.random.default_rng(args.seed).choice(result.n_obs, min(UMAP_CELLS, result.n_obs),
                                                                    replace=False))
            umap_png(result[rows].copy(), staging / "umap.png", labels_key=args.labels_key)
            report["timings"]["umap_plot"] = {"seconds": round(time.perf_counter() - t0, 3),
                                              "cells": int(len(rows))}
        report["wall_seconds"] = round(time.perf_counter() - start, 3)
        (staging / "metrics.json").write_text(json.dumps(cli.jsonable(report), indent=2))
