"""Command line: ``schashformer cluster INPUT [--n-clusters K | --resolution R] --out DIR``, ``schashformer rerun RESULT.h5ad
--out DIR`` and ``schashformer demo``.

Results are written to a hidden staging directory next to ``--out`` and renamed into place
only when every file is complete; a failed run leaves no results and no staging directory
behind. Training state is checkpointed in ``OUT/.checkpoint/`` (every ``--checkpoint-every``
steps); ``--resume`` continues a killed or failed run from it, and it is deleted with the
old contents of ``OUT`` once the results are in place.
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
import warnings
from pathlib import Path

import numpy as np
import yaml

from . import interrupt, outdir
from .errors import InputError, OutputError, OutputExistsError, ParameterError, SCHashFormerError
from .model import PARAM_DEFAULTS, SCHashFormer
from .validate import resolve

log = logging.getLogger(__name__)
# model/ (the fitted model, for `schashformer annotate`) and the plots of cli_analysis.write_cluster_plots
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="schashformer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("cluster", help="cluster a count matrix and write results to --out")
    run.add_argument("input", help=".h5ad, X/Y .h5, 10x .h5, Matrix Market dir/.mtx, or .csv/.tsv(.gz)")
    run.add_argument("--n-clusters", type=int, default=PARAM_DEFAULTS["n_clusters"],
                     help="number of clusters K (default: estimated by Leiden on the hash-neighbourhood graph)")
    run.add_argument("--resolution", type=float, default=PARAM_DEFAULTS["resolution"],
                     help=f"without --n-clusters: Leiden resolution, > 0 (default {PARAM_DEFAULTS['resolution']}; "
                          "higher: more, finer clusters)")
    run.add_argument("--out", required=True, help="output directory")
    _common(run)
    run.add_argument("--format", default=None, help="input format (h5ad, xy_h5, 10x_h5, mtx, csv, tsv); default: guess")
    run.add_argument("--transpose", action="store_true", default=None, help="csv/tsv rows are genes, columns cells")
    run.add_argument("--no-transpose", dest="transpose", action="store_false",
                     help="csv/tsv rows are cells, even if they look like genes (by default such a table is refused)")
    run.add_argument("--nproc", type=int, default=1, metavar="N",
                     help="train on N local processes with torch.distributed (torchrun; gloo on CPU, nccl on GPUs); "
                          "see docs/DISTRIBUTED.md")

    again = sub.add_parser("rerun", help="re-run the clustering recorded in a result.h5ad; the input must be unchanged")
    again.add_argument("result", help="result.h5ad written by 'schashformer cluster'")
    again.add_argument("--out", required=True, help="output directory")
    again.add_argument("--input", default=None, help="the input file, if it moved (its checksum must still match)")
    again.add_argument("--device", default=None, help="auto, cpu or cuda (default: the device of the recorded run)")
    again.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    again.add_argument("--resume", action="store_true",
                       help=f"continue the interrupted re-run checkpointed in OUT/{CHECKPOINT_DIR}")
    again.add_argument("--no-umap", action="store_true", help="skip the UMAP plot")
    again.add_argument("--quiet", action="store_true", help="no progress bars")

    demo = sub.add_parser("demo", help="cluster the bundled 10x PBMC data set (4271 cells, 8 types) and print scores")
    demo.add_argument("--out", default="schashformer_demo", help="output directory (default: schashformer_demo)")
    _common(demo)
    from .cli_scale import add_parsers as add_scale_parsers  # simulate; cluster --out-of-core

    add_scale_parsers(sub)
    from .cli_analysis import add_parsers  # annotate, evaluate

    add_parsers(sub)
    from . import cli_downstream  # integration, trajectory

    cli_downstream.add_parsers(sub)
    return parser


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--labels-key", default=None, help="obs column of known labels (evaluation only)")
    p.add_argument("--batch-key", default=None, help="obs column of batches (ZINB covariate)")
    p.add_argument("--layer", default=None, help="layer holding raw counts instead of X ('raw': adata.raw)")
    p.add_argument("--n-top-genes", type=int, default=PARAM_DEFAULTS["n_top_genes"],
                   help=f"highly variable genes used (default {PARAM_DEFAULTS['n_top_genes']})")
    p.add_argument("--seed", type=int, default=PARAM_DEFAULTS["seed"])
    p.add_argument("--device", default=PARAM_DEFAULTS["device"], help="auto, cpu or cuda")
    p.add_argument("--allow-noncounts", action="store_true", default=PARAM_DEFAULTS["allow_noncounts"],
                   help="accept pre-normalised (non-integer) input")
    p.add_argument("--param", action="append", metavar="KEY=VALUE",
                   help="any other parameter of schashformer.SCHashFormer (every TrainConfig field), repeatable")
    p.add_argument("--overwrite", action="store_true",
                   help="replace results already in --out (and discard the checkpoint of an unfinished run there)")
    p.add_argument("--resume", action="store_true",
                   help=f"continue the unfinished run checkpointed in OUT/{CHECKPOINT_DIR} (same input, parameters "
                        "and seed); starts from the beginning when there is none")
    p.add_argument("--checkpoint-every", type=int, default=PARAM_DEFAULTS["checkpoint_every"], metavar="STEPS",
                   help=f"training steps between checkpoints (default {PARAM_DEFAULTS['checkpoint_every']}; "
                        "0: only at the end of each phase)")
    p.add_argument("--no-umap", action="store_true", help="skip the UMAP plot")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


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
    from . import tl

    check_out_dir(out, overwrite, resume)
    taken = [f"{where}['{key}']" for where, key in (("obs", "schashformer"), ("obsm", "X_schashformer"),
                                                     ("uns", "schashformer")) if key in getattr(adata, where)]
    if taken and model is None:  # e.g. a result.h5ad clustered again: the input file itself is never changed
        _warn(f"the input already holds the results of an earlier run ({', '.join(taken)}); they are replaced in "
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
    from .cli_analysis import MODEL_DIR, write_cluster_plots
    from .io import write_h5ad

    hint = f" (the trained state is kept in {out / CHECKPOINT_DIR}: rerun with --resume to skip training)"
    # the final check: nothing else appeared in out meanwhile (our checkpoint may; it is deleted with the old out)
    with staged_output(out, lambda: check_out_dir(out, overwrite, resume=True), hint=hint) as staging:
        report["timings"].update(write_cluster_plots(adata, model, staging, labels_key, umap=umap))
        model.save(staging / MODEL_DIR)  # `schashformer annotate --reference OUT` maps new cells with it
        adata.obs[["schashformer"]].rename_axis("cell").to_csv(staging / "clusters.csv")
        write_h5ad(adata, staging / "result.h5ad")
        (staging / "metrics.json").write_text(json.dumps(jsonable(report), indent=2))
    return report


def run_rerun(result: Path, *, out: Path, input_path: str | None = None, device: str | None = None,
              overwrite: bool = False, umap: bool = True, progress: bool = True, resume: bool = False) -> dict:
    """Re-run the clustering recorded in ``result`` (a result.h5ad) on its input, which must be unchanged."""
    import anndata as ad

    from . import __version__, io, record
    from .preprocess import count_matrix

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
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
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


_default_showwarning = warnings.showwarning


def _warn(message: str) -> None:
    print(f"schashformer: warning: {message}", file=sys.stderr)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """The package's own UserWarnings as one line, like the errors; other warnings as Python shows them."""
    if category is UserWarning and f"{os.sep}schashformer{os.sep}" in str(filename):
        _warn(str(message))
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


def _preflight(args, params: dict) -> None:
    """Every parameter of ``cluster`` / ``demo`` / ``rerun`` checked before the disk is touched."""
    if args.command == "rerun":
        if args.device is not None:
            resolve(args.device)
        return
    if args.command == "cluster" and args.nproc < 1:
        raise ParameterError(f"--nproc must be >= 1, got {args.nproc}")
    SCHashFormer.from_params(params).check_params()
    resolve(args.device)


def main(argv: list[str] | None = None) -> int:
    """The ``schashformer`` command; returns the exit status (0, 2 for a refused input, 130 / 143 when interrupted)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings(), interrupt.signals_raise():
        warnings.showwarning = _show_warning
        warnings.filterwarnings("always", category=UserWarning, module=r"schashformer\.")  # every run shows its own
        return _main(args, argv)


def _main(args, argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    checkpoint = None  # OUT/.checkpoint of the commands that train, for the message on Ctrl-C / SIGTERM
    try:
        from . import cli_analysis

        if args.command in cli_analysis.COMMANDS:  # annotate, evaluate: their own output files
            return cli_analysis.main(args)
        from . import cli_downstream

        if args.command in cli_downstream.COMMANDS:  # integration, trajectory: their own output files
            return cli_downstream.main(args)
        from . import cli_scale

        if args.command in cli_scale.COMMANDS:  # simulate: writes one .h5ad, not a results directory
            return cli_scale.main(args)
        out = Path(args.out)
        params = estimator_params(args) if args.command != "rerun" else {}
        if args.command == "demo":
            params["n_clusters"] = DEMO_CLUSTERS
        _preflight(args, params)  # every parameter, before anything is read or written
        outdir.check_writable(out)  # fail before any work
        with outdir.OutLock(out):  # held until the results are in place: a second run on out is refused
            for line in outdir.recover(out, RESULT_FILES + (CHECKPOINT_DIR,)):  # a run killed while swapping results
                _warn(line)
            check_out_dir(out, args.overwrite, args.resume)  # after recovery: restored results need --overwrite
            checkpoint = out / CHECKPOINT_DIR
            return _run(args, argv, out, params)
    except SCHashFormerError as exc:
        print(f"schashformer: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (interrupt.Terminated)
        print(f"schashformer: {interrupt.message(exc, argv, checkpoint)}", file=sys.stderr)
        return interrupt.exit_code(exc)


def _run(args, argv: list[str], out: Path, params: dict) -> int:
    from . import cli_scale, io

    if args.command == "cluster" and args.nproc != 1:
        from .distributed import launch, strip_nproc

        return launch(strip_nproc(argv), args.nproc)
    if args.command == "rerun":
        report = run_rerun(Path(args.result), out=out, input_path=args.input, device=args.device,
                           overwrite=args.overwrite, umap=not args.no_umap, progress=not args.quiet,
                           resume=args.resume)
        same = report.get("rerun", {}).get("identical_labels")
        print("the recorded result holds no labels to compare" if same is None else
              f"labels {'identical to' if same else 'differ from'} the recorded run"
              + ("" if same else f" ({report['rerun']['n_cells_differing']} cells)"))
        print_report(report, out)
        return 0
    if args.command == "cluster" and cli_scale.wants_out_of_core(args, params.get("train_cells")):
        report = cli_scale.run_cluster_out_of_core(args, out, params)  # stream a large .h5ad
        print_report(report, out)
        return 0
    start = time.perf_counter()
    if args.command == "demo":
        adata, name, labels_key = io.read_bundled_pbmc(), "bundled 10X_PBMC_top2000.h5", args.labels_key or "label"
        source = {"path": io.bundled_pbmc_path(), "format": "xy_h5"}
    else:
        adata = io.read(args.input, format=args.format, transpose=args.transpose)
        name, labels_key = args.input, args.labels_key
        source = {"path": args.input, "format": args.format, "transpose": bool(args.transpose)}
    print(f"read {name}: {adata.n_obs} cells x {adata.n_vars} genes")
    report = run_cluster(adata, out=out, params=params, labels_key=labels_key, batch_key=args.batch_key,
                         layer=args.layer, overwrite=args.overwrite, umap=not args.no_umap, input_name=str(name),
                         source=source, read_seconds=time.perf_counter() - start, resume=args.resume)
    print_report(report, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
