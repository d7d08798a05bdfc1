"""Command-line forms of the downstream analyses of a clustering: ``integration`` and ``trajectory``.

    schashformer integration RESULT.h5ad --batch-key donor --labels-key cell_type --out DIR
    schashformer trajectory RESULT.h5ad --root day=0 --out DIR [--truth-key day]

Both read a ``result.h5ad`` written by ``schashformer cluster`` (or any h5ad with the embedding
in ``obsm``), write their files into a staging directory renamed into place when complete
(as ``cluster`` does) and refuse an output directory holding other files or, without
``--overwrite``, earlier results.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from . import app, io
from .errors import InputError
from .io import write_h5ad
from .pl import embedding
from .pl import trajectory as plot_trajectory
from .tl import integrate, integration, trajectory
from .trajectory import pseudotime_correlation

INTEGRATION_FILES = ("integration.json", "integration.csv", "integration.png")
TRAJECTORY_FILES = ("pseudotime.csv", "trajectory.json", "trajectory.png", "result.h5ad")
COMMANDS = ("integration", "trajectory")


def add_parsers(sub) -> None:
    """Add the ``integration`` and ``trajectory`` sub-commands to the main parser's sub-parsers."""
    ig = sub.add_parser("integration", help="batch mixing and biology conservation scores of an embedding, before "
                                            "and after aligning batches within clusters")
    ig.add_argument("result", help="result.h5ad written by 'schashformer cluster' (ideally with --batch-key)")
    ig.add_argument("--batch-key", required=True, help="obs column of batches")
    ig.add_argument("--labels-key", required=True, help="obs column of known cell types")
    ig.add_argument("--key", default="schashformer",
                    help="embedding obsm['X_KEY'] and clusters obs['KEY'] (default: schashformer)")
    ig.add_argument("--out", required=True, help="output directory")
    app.add_output_options(ig, plot_flag="--no-plot", plot_help="skip the UMAP coloured by batch and cell type")

    tr = sub.add_parser("trajectory", help="PAGA graph and diffusion pseudotime on the embedding, with a plot")
    tr.add_argument("result", help="result.h5ad written by 'schashformer cluster'")
    tr.add_argument("--root", required=True,
                    help="start of pseudotime: a cell index, a cell name, OBS_KEY=VALUE (e.g. day=0) or a cluster")
    tr.add_argument("--rep", default="X_schashformer", help="obsm key of the embedding (default X_schashformer)")
    tr.add_argument("--groups", default="schashformer",
                    help="obs column of the PAGA nodes (default: the clusters; Leiden when absent)")
    tr.add_argument("--truth-key", default=None,
                    help="obs column of a known order (day, time): report its Spearman correlation with pseudotime")
    tr.add_argument("--color", action="append", default=None, metavar="OBS_KEY",
                    help="extra obs column to colour a panel of the plot by (repeatable)")
    tr.add_argument("--n-neighbors", type=int, default=15, help="neighbours of the kNN graph (default 15)")
    tr.add_argument("--n-dcs", type=int, default=10, help="diffusion components of DPT (default 10)")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--no-umap", action="store_true",
                    help="plot on diffusion components 1-2 instead of a PAGA-initialised UMAP (faster)")
    tr.add_argument("--out", required=True, help="output directory")
    tr.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    tr.add_argument("--quiet", action="store_true", help="no progress messages")


def _read(path: str):

    if not Path(path).exists():
        raise InputError(f"{path}: no such file")
    return io.read(path)


def main(args: argparse.Namespace) -> int:
    """Run ``integration`` or ``trajectory``; errors propagate as :class:`SCHashFormerError` to ``cli.main``."""

    out = Path(args.out)
    names = INTEGRATION_FILES if args.command == "integration" else TRAJECTORY_FILES
    app.check_out(out, names, args.overwrite)  # fail before any work
    if args.command == "integration":
        report = run_integration(args, out)
        for what, s in (("embedding", report["scores"]), ("batches aligned (tl.integrate)",
                                                          report["scores_integrated"])):
            if s is not None:
                print(f"{what}: mixing " + "  ".join(f"{k} {s[k]:.3f}" for k in ("ilisi", "kbet", "batch_asw"))
                      + " | biology " + "  ".join(f"{k} {s[k]:.3f}" for k in ("label_asw", "clisi", "ari", "nmi")
                                                  if k in s))
    else:
        report = run_trajectory(args, out)
        line = f"pseudotime from {report['root_name']}: {report['n_groups']} PAGA groups"
        if "spearman" in report:
            line += f"; Spearman with {report['truth_key']} {report['spearman']:.3f}"
        print(line)
    print(f"results in {out}/ ({', '.join(n for n in names if (out / n).exists())})")
    return 0


def run_integration(args: argparse.Namespace, out: Path) -> dict:


    adata = _read(args.result)
    scores = integration(adata, batch_key=args.batch_key, labels_key=args.labels_key, key=args.key, overwrite=True)
    aligned = None
    if args.key in adata.obs:  # batches aligned within the clusters (tl.integrate), scored alike
        integrate(adata, args.batch_key, key=args.key, overwrite=True)
        aligned = integration(adata, batch_key=args.batch_key, labels_key=args.labels_key,
                              key=f"{args.key}_integrated", overwrite=True)
    report = {"input": str(args.result), "n_cells": int(adata.n_obs), "batch_key": args.batch_key,
              "labels_key": args.labels_key, "key": args.key,
              "batches": {str(k): int(v) for k, v in adata.obs[args.batch_key].astype(str).value_counts().items()},
              "scores": scores, "scores_integrated": aligned}

    def write(staging: Path) -> None:

        (staging / "integration.json").write_text(json.dumps(report, indent=2))
        rows = [{"embedding": f"X_{args.key}", **scores}]
        if aligned is not None:
            rows.append({"embedding": f"X_{args.key}_integrated", **aligned})
        pd.DataFrame(rows).to_csv(staging / "integration.csv", index=False)
        if not args.no_plot:

            basis = f"{args.key}_integrated" if aligned is not None else args.key
            embedding(adata, [args.batch_key, args.labels_key], basis=basis, save=staging / "integration.png",
                      show=False)

    app.write_atomic(out, INTEGRATION_FILES, args.overwrite, write)
    return report


def run_trajectory(args: argparse.Namespace, out: Path) -> dict:

    adata = _read(args.result)
    for key in [args.truth_key, *(args.color or [])]:
        if key is not None and key not in adata.obs:
            raise InputError(f"{args.result}: {key!r} is not a column of obs (columns: {list(adata.obs.columns)})")
    root = int(args.root) if args.root.lstrip("-").isdigit() else args.root
    trajectory(adata, root, use_rep=args.rep, groups=args.groups, n_neighbors=args.n_neighbors, n_dcs=args.n_dcs,
               umap=not args.no_umap, seed=args.seed, overwrite=True)  # the result file's own copy, never the input file
    run = adata.uns["trajectory"]
    pt = adata.obs["dpt_pseudotime"]
    report = {"input": str(args.result), "n_cells": int(adata.n_obs), "root": int(run["root"]),
              "root_name": str(run["root_name"]), "groups": str(run["groups"]),
              "n_groups": int(adata.obs[run["groups"]].nunique()), "n_unreachable": int(np.isnan(pt.to_numpy()).sum()),
              "pseudotime_per_group": run["pseudotime_per_group"]}
    if args.truth_key:
        report["truth_key"] = args.truth_key
        report["spearman"] = pseudotime_correlation(pt, adata.obs[args.truth_key])
    colours = list(dict.fromkeys([c for c in [args.truth_key, *(args.color or [])] if c]))

    def write(staging: Path) -> None:
        adata.obs[["dpt_pseudotime"]].rename_axis("cell").to_csv(staging / "pseudotime.csv")
        (staging / "trajectory.json").write_text(json.dumps(report, indent=2))
        plot_trajectory(adata, color=colours or None, save=staging / "trajectory.png", show=False)
        write_h5ad(adata, staging / "result.h5ad")

    app.write_atomic(out, TRAJECTORY_FILES, args.overwrite, write)
    return report
