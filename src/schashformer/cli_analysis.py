"""Command-line forms of the analyses on top of a clustering: ``annotate`` and ``evaluate``, and the
plots ``schashformer cluster`` writes next to its results.

    schashformer annotate QUERY --reference RESULT_DIR --labels-key cell_type --out DIR
    schashformer evaluate RESULT.h5ad --labels-key cell_type --out DIR

Like ``cluster``, each command writes its files into a hidden staging directory and renames it
into place when complete; an output directory holding other files is refused, existing results
are replaced only with ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from sklearn import metrics as skm

from . import app, io, pl
from .annotate import annotate
from .errors import InputError
from .metrics import clustering_scores, per_cluster_scores
from .model import SCHashFormer
from .rare import rare_populations

ANNOTATE_FILES = ("annotation.csv", "annotation.json", "result.h5ad", "umap.png", "confusion.png")
EVALUATE_FILES = ("per_label.csv", "per_cluster.csv", "evaluation.json", "confusion.png")
COMMANDS = ("annotate", "evaluate")


def add_parsers(sub) -> None:
    """Add the ``annotate`` and ``evaluate`` sub-commands to the main parser's sub-parsers."""
    ann = sub.add_parser("annotate", help="transfer labels from a clustered reference to new cells (query)")
    ann.add_argument("query", help="counts to annotate: .h5ad, X/Y .h5, 10x .h5, mtx dir, .csv/.tsv")
    ann.add_argument("--reference", required=True,
                     help="output directory of 'schashformer cluster' (result.h5ad + model/), or a reference .h5ad "
                          "together with --model")
    ann.add_argument("--model", default=None, help="saved model directory (default: REFERENCE/model)")
    ann.add_argument("--labels-key", required=True, help="reference obs column of the labels to transfer")
    ann.add_argument("--out", required=True, help="output directory")
    ann.add_argument("--n-neighbors", type=int, default=15, help="neighbours that vote (default 15)")
    ann.add_argument("--window", type=int, default=24,
                     help="candidates per side in each hash head's sorted order (default 24)")
    ann.add_argument("--min-confidence", type=float, default=0.5,
                     help="below this vote share a cell is called 'unknown' (default 0.5)")
    # --space / --class-balance: None means tl.annotate's defaults (annotate.DEFAULT_SPACE / DEFAULT_CLASS_BALANCE),
    # so that the command line and the API cannot drift apart (and the parser does not import torch)
    ann.add_argument("--space", default=None, choices=("combined", "z", "tokens", "pcs"),
                     help="where neighbours are measured: z, the stage-2 tokens and 50 reference principal "
                          "components side by side (combined), or one of them alone (default combined)")
    ann.add_argument("--class-balance", type=float, default=None,
                     help="divide each label's tally by its reference frequency to this power, in [0, 1] "
                          "(0: plain vote, 1: equal label priors; default 0.5)")
    ann.add_argument("--query-labels-key", default=None,
                     help="query obs column of known labels: report accuracy / macro F1 and a confusion plot")
    ann.add_argument("--format", default=None, help="query file format (default: guess)")
    app.add_output_options(ann, plot_flag="--no-umap", plot_help="skip the UMAP plot")

    ev = sub.add_parser("evaluate", help="per-label and per-cluster precision / recall / F1 of a clustering")
    ev.add_argument("result", help="result.h5ad written by 'schashformer cluster' (or any h5ad with both columns)")
    ev.add_argument("--labels-key", required=True, help="obs column of known labels")
    ev.add_argument("--key", default="schashformer", help="obs column of clusters (default: schashformer)")
    ev.add_argument("--max-fraction", type=float, default=0.02, help="labels below this share are rare (default 0.02)")
    ev.add_argument("--matching", default="hungarian", choices=("hungarian", "majority"),
                    help="cluster -> label matching (default hungarian: one cluster per label)")
    ev.add_argument("--out", required=True, help="output directory")
    ev.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    ev.add_argument("--quiet", action="store_true", help="no progress messages")


def main(args: argparse.Namespace) -> int:
    """Run ``annotate`` or ``evaluate``; errors propagate as :class:`SCHashFormerError` to ``cli.main``."""
    out = Path(args.out)
    names = ANNOTATE_FILES if args.command == "annotate" else EVALUATE_FILES
    app.check_out(out, names, args.overwrite)
    if args.command == "annotate":
        report = run_annotate(args, out)
        called = 1 - report["unknown_fraction"]
        line = f"annotated {report['n_cells']} cells: {called:.1%} called, {report['unknown_fraction']:.1%} unknown"
        if "accuracy" in report:
            line += f"; accuracy {report['accuracy']:.3f}, macro F1 {report['f1_macro']:.3f}"
        print(line)
    else:
        report = run_evaluate(args, out)
        rare = report["rare_labels"]
        print(f"{report['n_labels']} labels, {report['n_clusters']} clusters; macro F1 {report['f1_macro']:.3f}; "
              f"{len(rare)} rare labels (< {args.max_fraction:.0%})"
              + (f", mean F1 {report['rare_f1_mean']:.3f}" if rare else ""))
    print(f"results in {out}/ ({', '.join(n for n in names if (out / n).exists())})")
    return 0


def _reference_and_model(reference: str, model: str | None):

    ref = Path(reference)
    if ref.is_dir():
        h5ad = ref / "result.h5ad"
        if not h5ad.is_file():
            raise InputError(f"--reference {ref}: no result.h5ad there (expected the output directory of "
                             "'schashformer cluster', or a .h5ad file with --model)")
        model_dir = Path(model) if model else ref / app.MODEL_DIR
    else:
        h5ad = ref
        if model is None:
            raise InputError(f"--reference {ref} is a file: pass --model with the model directory fitted on it "
                             "(written by 'schashformer cluster' into OUT/model)")
        model_dir = Path(model)
    return io.read(h5ad), SCHashFormer.load(model_dir, device="cpu")


def run_annotate(args: argparse.Namespace, out: Path) -> dict:
    """``schashformer annotate``: label transfer, written as annotation.csv / .json, result.h5ad and plots."""

    reference, model = _reference_and_model(args.reference, args.model)
    query = io.read(args.query, format=args.format)
    if args.query_labels_key is not None and args.query_labels_key not in query.obs:
        raise InputError(f"--query-labels-key {args.query_labels_key!r} is not a column of the query's obs "
                         f"(columns: {list(query.obs.columns)})")
    key = "schashformer_annotation"
    annotate(query, reference, args.labels_key, model=model, n_neighbors=args.n_neighbors, window=args.window,
             min_confidence=args.min_confidence, key_added=key, overwrite=True,
             **{k: v for k, v in (("space", args.space), ("class_balance", args.class_balance)) if v is not None})
    report = {"query": str(args.query), "reference": str(args.reference), "n_cells": int(query.n_obs),
              **{k: v for k, v in query.uns[key].items()}}
    if args.query_labels_key is not None:

        y = query.obs[args.query_labels_key].astype(str).to_numpy()
        pred = query.obs[key].astype(str).to_numpy()
        report.update(accuracy=float((y == pred).mean()),
                      f1_macro=float(skm.f1_score(y, pred, labels=np.unique(y), average="macro", zero_division=0)))

    def write(staging: Path) -> None:
        table = query.obs[[key, f"{key}_confidence"]].rename(columns={key: "label", f"{key}_confidence": "confidence"})
        table.rename_axis("cell").to_csv(staging / "annotation.csv")
        (staging / "annotation.json").write_text(json.dumps(app.jsonable(report), indent=2))
        io.write_h5ad(query, staging / "result.h5ad")
        if not args.no_umap:
            pl.embedding(query, [key, f"{key}_confidence"] + ([args.query_labels_key] if args.query_labels_key else []),
                         basis=key, save=staging / "umap.png")
        if args.query_labels_key is not None:
            pl.confusion(query, args.query_labels_key, key, save=staging / "confusion.png")

    app.write_atomic(out, ANNOTATE_FILES, args.overwrite, write)
    return report


def run_evaluate(args: argparse.Namespace, out: Path) -> dict:
    """``schashformer evaluate``: per-label / per-cluster tables, a JSON summary and the confusion plot."""

    adata = io.read(args.result, format="h5ad")
    labels = rare_populations(adata, args.labels_key, key=args.key, max_fraction=args.max_fraction,
                              matching=args.matching, overwrite=True)
    clusters = per_cluster_scores(adata.obs[args.labels_key].to_numpy(), adata.obs[args.key].to_numpy())
    scores = clustering_scores(adata.obs[args.labels_key].to_numpy(), adata.obs[args.key].to_numpy())
    rare = labels[labels["rare"]]
    report = {"result": str(args.result), "labels_key": args.labels_key, "key": args.key, "matching": args.matching,
              "max_fraction": args.max_fraction, **scores,
              "rare_labels": {str(k): float(v) for k, v in rare["f1"].items()},
              "rare_f1_mean": float(rare["f1"].mean()) if len(rare) else None}

    def write(staging: Path) -> None:
        labels.to_csv(staging / "per_label.csv")
        clusters.to_csv(staging / "per_cluster.csv")
        (staging / "evaluation.json").write_text(json.dumps(app.jsonable(report), indent=2))
        pl.confusion(adata, args.labels_key, args.key, save=staging / "confusion.png")

    app.write_atomic(out, EVALUATE_FILES, args.overwrite, write)
    return report
