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
import logging
import os
import sys
import time
import warnings
from pathlib import Path

from . import (
    app,
    cli_analysis,
    cli_downstream,  # integration, trajectory
    cli_scale,
    interrupt,
    io,
    outdir,
)
from .distributed import launch, strip_nproc
from .errors import (
    ParameterError,
    SCHashFormerError,
)
from .model import PARAM_DEFAULTS, SCHashFormer
from .validate import resolve

log = logging.getLogger(__name__)


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
                       help=f"continue the interrupted re-run checkpointed in OUT/{app.CHECKPOINT_DIR}")
    again.add_argument("--no-umap", action="store_true", help="skip the UMAP plot")
    again.add_argument("--quiet", action="store_true", help="no progress bars")

    demo = sub.add_parser("demo", help="cluster the bundled 10x PBMC data set (4271 cells, 8 types) and print scores")
    demo.add_argument("--out", default="schashformer_demo", help="output directory (default: schashformer_demo)")
    _common(demo)

    cli_scale.add_parsers(sub)  # simulate; cluster --out-of-core
    cli_analysis.add_parsers(sub)  # annotate, evaluate
    cli_downstream.add_parsers(sub)  # integration, trajectory
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
                   help=f"continue the unfinished run checkpointed in OUT/{app.CHECKPOINT_DIR} (same input, parameters "
                        "and seed); starts from the beginning when there is none")
    p.add_argument("--checkpoint-every", type=int, default=PARAM_DEFAULTS["checkpoint_every"], metavar="STEPS",
                   help=f"training steps between checkpoints (default {PARAM_DEFAULTS['checkpoint_every']}; "
                        "0: only at the end of each phase)")
    p.add_argument("--no-umap", action="store_true", help="skip the UMAP plot")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


_default_showwarning = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """The package's own UserWarnings as one line, like the errors; other warnings as Python shows them."""
    if category is UserWarning and f"{os.sep}schashformer{os.sep}" in str(filename):
        app.warn_user(str(message))
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

        if args.command in cli_analysis.COMMANDS:  # annotate, evaluate: their own output files
            return cli_analysis.main(args)

        if args.command in cli_downstream.COMMANDS:  # integration, trajectory: their own output files
            return cli_downstream.main(args)

        if args.command in cli_scale.COMMANDS:  # simulate: writes one .h5ad, not a results directory
            return cli_scale.main(args)
        out = Path(args.out)
        params = app.estimator_params(args) if args.command != "rerun" else {}
        if args.command == "demo":
            params["n_clusters"] = app.DEMO_CLUSTERS
        _preflight(args, params)  # every parameter, before anything is read or written
        outdir.check_writable(out)  # fail before any work
        with outdir.OutLock(out):  # held until the results are in place: a second run on out is refused
            for line in outdir.recover(out, app.RESULT_FILES + (app.CHECKPOINT_DIR,)):  # a run killed while swapping results
                app.warn_user(line)
            app.check_out_dir(out, args.overwrite, args.resume)  # after recovery: restored results need --overwrite
            checkpoint = out / app.CHECKPOINT_DIR
            return _run(args, argv, out, params)
    except SCHashFormerError as exc:
        print(f"schashformer: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (interrupt.Terminated)
        print(f"schashformer: {interrupt.message(exc, argv, checkpoint)}", file=sys.stderr)
        return interrupt.exit_code(exc)


def _run(args, argv: list[str], out: Path, params: dict) -> int:

    if args.command == "cluster" and args.nproc != 1:

        return launch(strip_nproc(argv), args.nproc)
    if args.command == "rerun":
        report = app.run_rerun(Path(args.result), out=out, input_path=args.input, device=args.device,
                           overwrite=args.overwrite, umap=not args.no_umap, progress=not args.quiet,
                           resume=args.resume)
        same = report.get("rerun", {}).get("identical_labels")
        print("the recorded result holds no labels to compare" if same is None else
              f"labels {'identical to' if same else 'differ from'} the recorded run"
              + ("" if same else f" ({report['rerun']['n_cells_differing']} cells)"))
        app.print_report(report, out)
        return 0
    if args.command == "cluster" and app.wants_out_of_core(args, params.get("train_cells")):
        report = app.run_cluster_out_of_core(args, out, params)  # stream a large .h5ad
        app.print_report(report, out)
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
    report = app.run_cluster(adata, out=out, params=params, labels_key=labels_key, batch_key=args.batch_key,
                         layer=args.layer, overwrite=args.overwrite, umap=not args.no_umap, input_name=str(name),
                         source=source, read_seconds=time.perf_counter() - start, resume=args.resume)
    app.print_report(report, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
