"""The application layer: fit and write results for every entry point, all at once.

The command line (``schashformer cluster``, ``demo``, ``rerun``), ``main.py``, the out-of-core
path and the multi-process launcher all end here: :func:`run_cluster` (in memory) and
:func:`run_cluster_out_of_core` (a ``.h5ad`` streamed) fit, then write ``result.h5ad``,
``clusters.csv``, ``metrics.json``, the model and the plots into a hidden staging directory
next to ``--out`` that is renamed into place only when every file is complete
(:func:`staged_output`); a failed run leaves no results and no staging directory behind.
Training state is checkpointed in ``OUT/.checkpoint/``; it is deleted with the old contents
of ``OUT`` once the results are in place.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import yaml

from . import buckets, io, pl, record, resources, tl
from .errors import (
    InputError,
    OutputError,
    OutputExistsError,
    ParameterError,
    SCHashFormerError,
)
from .io import estimate_read_bytes
from .model import SCHashFormer
from .pl import umap_png
from .preprocess import count_matrix
from .streaming import CountSource, data_checksum, fit_out_of_core, write_result_h5ad
from .train import TrainConfig
from .version import __version__

log = logging.getLogger(__name__)



# model/ (the fitted model, for `schashformer annotate`) and the plots of write_cluster_plots
RESULT_FILES = ("result.h5ad", "clusters.csv", "metrics.json", "umap.png", "confusion.png", "bucket_sizes.png",
                "training_curves.png", "model")


CHECKPOINT_DIR = ".checkpoint"  # inside --out: the training state of an unfinished run


DEMO_CLUSTERS = 8  # cell types of the bundled PBMC data set that `schashformer demo` clusters


# SCHashFormer parameters with an option of their own (named after the parameter: --n-top-genes sets
# n_top_genes; defaults from SCHashFormer); --param sets every other one
OPTION_PARAMS = ("n_clusters", "resolution", "n_top_genes", "seed", "device", "allow_noncounts", "checkpoint_every")


# SCHashFormer parameters the command line sets itself, and from what
FIXED_PARAMS = {"progress": "--quiet", "checkpoint_dir": "--out", "keep_checkpoint": "--out"}


def parse_params(items: list[str]) -> dict:
    """``--param key=value`` pairs, values parsed as YAML scalars (numbers, booleans, null).

    A key must be a :class:`SCHashFormer` parameter without an option of its own
    (:data:`OPTION_PARAMS`) that the command line does not set itself (:data:`FIXED_PARAMS`);
    the values are checked by :meth:`SCHashFormer.check_params`.
    """
    params = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ParameterError(f"--param expects key=value, got {item!r}")
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):  # YAML reads 1e-3 (no dot) as a string
            try:
                parsed = float(parsed)
            except ValueError:
                pass
        params[key.strip()] = parsed
    for key in params:
        if key in OPTION_PARAMS:
            raise ParameterError(f"--param {key}=...: use --{key.replace('_', '-')}")
        if key in FIXED_PARAMS:
            raise ParameterError(f"--param {key}=...: set by {FIXED_PARAMS[key]}")
    SCHashFormer.from_params(params)  # unknown names
    return params


def estimator_params(args: argparse.Namespace) -> dict:
    """The :class:`SCHashFormer` parameters of a parsed ``cluster`` / ``demo`` command line:
    its parameter options, ``progress`` (not ``--quiet``) and every ``--param``."""
    options = {name: getattr(args, name) for name in OPTION_PARAMS if hasattr(args, name)}
    return {**options, "progress": not args.quiet, **parse_params(getattr(args, "param", None))}


def check_out_dir(out: Path, overwrite: bool, resume: bool = False) -> None:
    """Refuse an output directory that already holds results unless ``overwrite``, and one holding other files.

    A checkpoint of an unfinished run (``OUT/.checkpoint``) is refused unless ``resume`` (continue
    it) or ``overwrite`` (discard it), so that a forgotten ``--resume`` never throws training away.
    """
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"--out {out} exists and is not a directory")
    if not out.is_dir():
        return
    names = sorted(p.name for p in out.iterdir())
    foreign = [n for n in names if n not in RESULT_FILES and n != CHECKPOINT_DIR]
    if foreign:
        raise OutputExistsError(f"--out {out} holds files that are not scHashFormer results (e.g. {foreign[0]!r}); "
                                "choose a new or empty directory")
    results = [n for n in names if n in RESULT_FILES]
    if results and not overwrite:
        raise OutputExistsError(f"{out} already holds results ({', '.join(results)}); pass --overwrite to replace them")
    if CHECKPOINT_DIR in names and not (resume or overwrite):
        raise OutputExistsError(f"{out} holds the checkpoint of an unfinished run ({out / CHECKPOINT_DIR}); "
                                "pass --resume to continue it or --overwrite to discard it and start again")


def _publish(staging: Path, out: Path) -> None:
    """Rename the complete ``staging`` directory to ``out``; old results are swapped out, then deleted."""
    if out.is_dir() and any(out.iterdir()):
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old)
        try:
            os.replace(staging, out)
        except OSError:
            os.replace(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out)  # onto a new name or an empty directory


@contextlib.contextmanager
def staged_output(out: Path, final_check, *, hint: str = ""):
    """Yield a fresh staging directory next to ``out``; on success call ``final_check()`` and publish it as ``out``.

    Whatever fails inside the block, the staging directory is removed and ``out`` is untouched;
    an ``OSError`` becomes one :class:`OutputError` line naming ``out`` (plus ``hint``).
    """
    staging = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private; results get the usual permissions
        yield staging
        final_check()
        _publish(staging, out)
    except SCHashFormerError:
        raise
    except OSError as exc:
        raise OutputError(f"{out}: results could not be written ({type(exc).__name__}: {exc}); no partial results "
                          f"were left there{hint}") from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def run_cluster(adata, *, out: Path, params: dict, labels_key=None, batch_key=None, layer=None, overwrite=False,
                umap=True, input_name: str = "", read_seconds: float = 0.0, source: dict | None = None,
                reference_labels=None, resume: bool = False, model=None) -> dict:
    """Cluster ``adata`` and write the result files into ``out`` all at once; returns metrics.json content.

    ``params``: the :class:`SCHashFormer` parameters (any but ``checkpoint_dir`` and
    ``keep_checkpoint``, which this function sets: the checkpoint lives in ``out``).

    ``model``: an already fitted SCHashFormer (a distributed fit, :mod:`schashformer.distributed`)
    whose results are written instead of fitting here.

    Training is checkpointed in ``out/.checkpoint`` every ``checkpoint_every`` steps; ``resume``
    continues from a checkpoint left there by a killed or failed run. The checkpoint is kept
    until the results are in place, so a failure while writing them needs no new training.

    ``source`` (``path``, ``format``, ``transpose`` of the input file) is added to the run record
    so that ``schashformer rerun`` can read the input again. With ``reference_labels`` (a
    recorded run's labels) the report says whether the new labels are identical.
    """

    check_out_dir(out, overwrite, resume or model is not None)  # a given model: the checkpoint there is its own
    taken = [f"{where}['{key}']" for where, key in (("obs", "schashformer"), ("obsm", "X_schashformer"),
                                                     ("uns", "schashformer")) if key in getattr(adata, where)]
    if taken and model is None:  # e.g. a result.h5ad clustered again: the input file itself is never changed
        warn_user(f"the input already holds the results of an earlier run ({', '.join(taken)}); they are replaced in "
              f"{out / 'result.h5ad'} (the input file is not changed)")
    fixed = sorted({"checkpoint_dir", "keep_checkpoint"} & set(params))
    if fixed:
        raise ParameterError(f"{fixed}: set by the output directory (checkpoints go to OUT/{CHECKPOINT_DIR})")
    if model is not None:
        tl.write_results(adata, model, labels_key=labels_key, batch_key=batch_key, layer=layer)
    else:
        _, model = tl.cluster(adata, labels_key=labels_key, batch_key=batch_key, layer=layer, return_model=True,
                              overwrite=True, resume=resume,
                              **{**params, "checkpoint_dir": out / CHECKPOINT_DIR, "keep_checkpoint": True})
    record = adata.uns["schashformer"]
    if source is not None:
        record["input"] = {"path": str(Path(source["path"]).resolve()), "format": source.get("format") or "",
                           "transpose": bool(source.get("transpose", False))}
    report = {
        "input": input_name, "n_cells": int(adata.n_obs), "n_genes_input": int(adata.n_vars),
        "n_clusters": int(model.n_clusters_), "n_clusters_estimated": model.n_clusters is None, "seed": model.seed,
        "metrics": record.get("metrics", {}),
        "timings": {"read": {"seconds": round(read_seconds, 3)}, **model.timings_},
        "bucket_stats": model.bucket_stats_,
        "data_checksum": record["data_checksum"],
    }
    if reference_labels is not None:
        new, old = (np.asarray(v, dtype=object).astype(str) for v in (adata.obs["schashformer"], reference_labels))
        report["rerun"] = {"identical_labels": bool(np.array_equal(new, old)),
                           "n_cells_differing": int((new != old).sum()) if new.shape == old.shape else -1}

    hint = f" (the trained state is kept in {out / CHECKPOINT_DIR}: rerun with --resume to skip training)"
    # the final check: nothing else appeared in out meanwhile (our checkpoint may; it is deleted with the old out)
    with staged_output(out, lambda: check_out_dir(out, overwrite, resume=True), hint=hint) as staging:
        report["timings"].update(write_cluster_plots(adata, model, staging, labels_key, umap=umap))
        model.save(staging / MODEL_DIR)  # `schashformer annotate --reference OUT` maps new cells with it
        adata.obs[["schashformer"]].rename_axis("cell").to_csv(staging / "clusters.csv")
        io.write_h5ad(adata, staging / "result.h5ad")
        (staging / "metrics.json").write_text(json.dumps(jsonable(report), indent=2))
    return report


def run_rerun(result: Path, *, out: Path, input_path: str | None = None, device: str | None = None,
              overwrite: bool = False, umap: bool = True, progress: bool = True, resume: bool = False) -> dict:
    """Re-run the clustering recorded in ``result`` (a result.h5ad) on its input, which must be unchanged."""


    check_out_dir(out, overwrite, resume)
    if not result.is_file():
        raise InputError(f"{result}: no such file")
    try:
        old = ad.read_h5ad(result, backed="r")  # X stays on disk
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise InputError(f"{result}: cannot be read as h5ad ({type(exc).__name__}: {str(exc)[:120]})") from None
    try:
        rec = record.from_uns(old.uns, where=str(result))
        labels = np.asarray(old.obs["schashformer"]) if "schashformer" in old.obs else None
    finally:
        old.file.close()
    source = {k: record.plain(v) for k, v in dict(rec.get("input") or {}).items()}
    path = input_path or source.get("path")
    if not path:
        raise InputError(f"{result}: the run record has no input path (a Python API run); pass --input FILE")
    if record.plain(rec.get("version")) != __version__:
        log.warning("%s was written by scHashFormer %s, this is %s; labels may differ", result, rec.get("version"),
                    __version__)
    params, fit_args = record.rerun_args(rec)
    recorded_device = record.plain(rec["params"].get("device_used")) or "auto"
    params = {**params, "device": device or recorded_device, "progress": progress}
    SCHashFormer.from_params(params).check_params()  # before reading the input
    adata = io.read(path, format=source.get("format"), transpose=bool(source.get("transpose")))
    checksum = record.data_checksum(count_matrix(adata, fit_args["layer"]))
    if checksum != rec["data_checksum"]:
        raise InputError(f"{path}: the counts differ from those of the recorded run (checksum {checksum[:19]}... now, "
                         f"{str(rec['data_checksum'])[:19]}... recorded); refusing to re-run on other data")
    return run_cluster(adata, out=out, params=params, overwrite=overwrite, umap=umap, input_name=str(path),
                       reference_labels=labels, resume=resume,
                       source={"path": path, "format": source.get("format"), "transpose": source.get("transpose")},
                       **fit_args)


def jsonable(obj):
    """``obj`` with numpy values as Python ones and NaN as None, for ``json.dumps`` (strict JSON has no NaN)."""
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return jsonable(obj.item())
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    return obj


def print_report(report: dict, out: Path) -> None:
    m = report["metrics"]
    if report.get("n_clusters_estimated"):
        print(f"estimated number of clusters: {report['n_clusters']}")
    if m:
        print("scores: " + "  ".join(f"{k.upper()} {m[k]:.3f}" for k in ("ari", "nmi", "acc", "f1_macro") if k in m))
    total = sum(v["seconds"] for v in report["timings"].values())
    peak = max(v.get("peak_rss_gib", 0) for v in report["timings"].values())
    written = [name for name in RESULT_FILES if (out / name).exists()]
    print(f"time {total:.1f} s, peak memory {peak:.2f} GiB; results in {out}/ ({', '.join(written)})")


def warn_user(message: str) -> None:
    print(f"schashformer: warning: {message}", file=sys.stderr)


UMAP_CELLS = 20000  # the UMAP of an out-of-core run shows a random subsample of this many cells


def is_h5ad(args) -> bool:
    """Whether the command's input is a ``.h5ad`` file (``--format h5ad`` / ``anndata``, or its suffix)."""
    fmt = (args.format or "").lower()
    return fmt in ("h5ad", "anndata") or (args.format is None and Path(args.input).suffix == ".h5ad")


def wants_out_of_core(args, train_cells: int | None = None) -> bool:
    """True when ``cluster`` should stream its input: asked for, or a ``.h5ad`` with more than
    ``train_cells`` cells (default: TrainConfig's) or too large to load in half the available memory."""

    train_cells = TrainConfig().train_cells if train_cells is None else train_cells
    path = Path(args.input)
    h5ad = is_h5ad(args)
    if getattr(args, "out_of_core", False):
        if not h5ad:
            raise InputError(f"{path}: --out-of-core reads .h5ad files only; convert it first "
                             "(schashformer.io.read(path).write_h5ad('counts.h5ad'))")
        return True
    if not h5ad or not path.is_file():
        return False
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

    ``params``: the :class:`SCHashFormer` parameters (:func:`schashformer.estimator_params`).
    """

    start = time.perf_counter()
    source = CountSource.from_h5ad(args.input, args.layer)
    print(f"read {args.input} (out of core): {source.n_obs} cells x {source.n_vars} genes")
    try:
        model = SCHashFormer.from_params({**params, "checkpoint_dir": out / CHECKPOINT_DIR,
                                          "keep_checkpoint": True})
        model.check_params()
        fit_out_of_core(model, source, batch_key=args.batch_key, labels_key=args.labels_key, resume=args.resume)
        t0 = time.perf_counter()
        checksum = data_checksum(source, model.stream_scan_)
        timings = {**model.timings_, "checksum": {"seconds": round(time.perf_counter() - t0, 3)}}
        report = _write_streamed(args, out, source, results_only(source), model, checksum, timings, start,
                                 "out_of_core", {"train_cells": int(len(model.train_rows_))}, {"out_of_core": True})
    finally:
        source.close()
    return report


def _write_streamed(args, out: Path, source, result, model, checksum: str, timings: dict, start: float,
                    how: str, how_record: dict, how_report: dict) -> dict:
    """Results of a fit on a ``.h5ad`` whose matrix stays on disk (out of core, or several processes):
    the run record in ``result`` (with the input and ``how`` the fit ran) and the report, written
    with :func:`write_outputs`; returns the report."""
    tl.write_results(result, model, labels_key=args.labels_key, batch_key=args.batch_key, layer=args.layer,
                     checksum=checksum, timings=timings)
    record = result.uns["schashformer"]
    record["input"] = {"path": str(Path(args.input).resolve()), "format": "h5ad", "transpose": False}
    record[how] = how_record
    report = {"input": str(args.input), "n_cells": source.n_obs, "n_genes_input": source.n_vars,
              "n_clusters": int(model.n_clusters_), "seed": model.seed, **how_report,
              "metrics": record.get("metrics", {}), "timings": timings, "bucket_stats": model.bucket_stats_,
              "data_checksum": checksum}
    write_outputs(args, out, source, result, model, report, start)
    return report


def results_only(source):
    """An AnnData with the source's obs and var but no matrix, to receive the results."""

    return ad.AnnData(obs=source.obs.copy(), var=pd.DataFrame(index=source.var_names))


def write_outputs(args, out: Path, source, result, model, report: dict, start: float) -> None:
    """Stage every result file, then rename the staging folder onto ``out`` (as ``run_cluster``)."""

    with staged_output(out, lambda: check_out_dir(out, args.overwrite, resume=True)) as staging:
        t0 = time.perf_counter()
        result.obs[["schashformer"]].rename_axis("cell").to_csv(staging / "clusters.csv")
        write_result_h5ad(Path(args.input), staging / "result.h5ad", result.obs, dict(result.obsm),
                          {"schashformer": result.uns["schashformer"]})
        report["timings"]["write_results"] = {"seconds": round(time.perf_counter() - t0, 3)}
        if "model" in RESULT_FILES:
            model.save(staging / "model")
        if not args.no_umap:
            t0 = time.perf_counter()

            rows = np.sort(np.random.default_rng(args.seed).choice(result.n_obs, min(UMAP_CELLS, result.n_obs),
                                                                    replace=False))
            umap_png(result[rows].copy(), staging / "umap.png", labels_key=args.labels_key)
            report["timings"]["umap_plot"] = {"seconds": round(time.perf_counter() - t0, 3),
                                              "cells": int(len(rows))}
        report["wall_seconds"] = round(time.perf_counter() - start, 3)
        (staging / "metrics.json").write_text(json.dumps(jsonable(report), indent=2))


PLOT_FILES = ("umap.png", "confusion.png", "bucket_sizes.png", "training_curves.png")


MODEL_DIR = "model"  # inside a `schashformer cluster` output: the fitted model, for annotate


def check_out(out: Path, names: tuple[str, ...], overwrite: bool) -> None:
    """Refuse an ``out`` that is a file, holds foreign files, or holds results without ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"--out {out} exists and is not a directory")
    if not out.is_dir():
        return
    present = sorted(p.name for p in out.iterdir())
    foreign = [n for n in present if n not in names]
    if foreign:
        raise OutputExistsError(f"--out {out} holds files that are not results of this command (e.g. {foreign[0]!r}); "
                                "choose a new or empty directory")
    if present and not overwrite:
        raise OutputExistsError(f"{out} already holds results ({', '.join(present)}); pass --overwrite to replace them")


def write_atomic(out: Path, names: tuple[str, ...], overwrite: bool, write) -> None:
    """Call ``write(staging_dir)``, then rename the staging directory to ``out`` (nothing partial is left)."""

    with staged_output(out, lambda: check_out(out, names, overwrite)) as staging:  # nothing else appeared meanwhile
        write(staging)


def write_cluster_plots(adata, model, staging: Path, labels_key: str | None, umap: bool = True) -> dict:
    """The PNGs ``schashformer cluster`` writes next to its results; returns seconds per plot."""


    timings = {}
    plots = [("bucket_sizes.png", lambda p: pl.bucket_sizes(model, save=p)),
             ("training_curves.png", lambda p: pl.training_curves(model, save=p))]
    if umap:
        plots.insert(0, ("umap.png", lambda p: pl.umap_png(adata, p, labels_key=labels_key)))
    if labels_key is not None:
        plots.append(("confusion.png", lambda p: pl.confusion(adata, labels_key, save=p)))
    for name, draw in plots:
        start = time.perf_counter()
        draw(staging / name)
        timings[name.replace(".png", "_plot")] = {"seconds": round(time.perf_counter() - start, 3)}
    return timings


def add_output_options(parser, *, plot_flag: str, plot_help: str) -> None:
    """The options every command that writes a results directory shares: ``--overwrite``, a plot
    switch and ``--quiet``."""
    parser.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    parser.add_argument(plot_flag, action="store_true", help=plot_help)
    parser.add_argument("--quiet", action="store_true", help="no progress messages")


def labelled_bucket_stats(model, labels) -> None:
    """Recompute ``model.bucket_stats_`` with label purity from ``labels`` (all input cells); None: keep them."""
    if labels is not None:
        model.bucket_stats_ = buckets.bucket_stats(model.codes_[model.cell_mask_],
                                                   np.asarray(labels)[model.cell_mask_])


def _write_h5ad_result(args, out: Path, model, start: float) -> dict:
    """Rank 0's one result for a ``.h5ad`` input, as the out-of-core ``cluster`` writes it: the input
    file copied with the results added (the matrix is never loaded), clusters.csv, metrics.json."""

    check_out_dir(out, args.overwrite, resume=True)  # the checkpoint there is this run's own
    source = CountSource.from_h5ad(args.input, args.layer)
    try:
        t0 = time.perf_counter()
        checksum = data_checksum(source)  # chunk by chunk, the same value as record.data_checksum in memory
        timings = {**model.timings_, "checksum": {"seconds": round(time.perf_counter() - t0, 3)}}
        result = results_only(source)
        if args.labels_key is not None and args.labels_key not in result.obs:
            raise InputError(f"labels_key {args.labels_key!r} is not a column of adata.obs "
                             f"(columns: {list(result.obs.columns)})")
        labelled_bucket_stats(model, None if args.labels_key is None else result.obs[args.labels_key])
        world = int(model.world_size_)
        report = _write_streamed(args, out, source, result, model, checksum, timings, start, "distributed",
                                 {"world_size": world}, {"world_size": world})
    finally:
        source.close()
    return report


def _write_in_memory_result(args, out: Path, model, read_seconds: float) -> dict:
    """Rank 0's one result for the other formats: the input read whole, results written by ``run_cluster``."""

    adata = io.read(args.input, format=args.format, labels_key=args.labels_key, transpose=args.transpose)
    if args.labels_key is not None and args.labels_key in adata.obs:
        labelled_bucket_stats(model, adata.obs[args.labels_key])
    report = run_cluster(
        adata, out=out, params=estimator_params(args), labels_key=args.labels_key, batch_key=args.batch_key,
        layer=args.layer, overwrite=args.overwrite, umap=not args.no_umap, input_name=str(args.input),
        read_seconds=max(read_seconds, 0.0), model=model,
        source={"path": args.input, "format": args.format, "transpose": args.transpose})
    report["world_size"] = int(model.world_size_)
    return report


def write_distributed_result(args, out: Path, model, start: float, read_seconds: float) -> dict:
    """Rank 0's one result of a multi-process fit (``model`` holds every cell): as the out-of-core
    ``cluster`` writes a ``.h5ad`` input, as :func:`run_cluster` the other formats."""
    if is_h5ad(args):
        return _write_h5ad_result(args, out, model, start)
    return _write_in_memory_result(args, out, model, read_seconds)
