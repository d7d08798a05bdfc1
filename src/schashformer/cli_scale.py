"""Command-line forms for atlas-scale data: ``schashformer simulate`` and out-of-core ``cluster``.

``schashformer simulate --cells N --out F.h5ad --like PBMC`` writes simulated counts fitted to a
real labeled data set (:mod:`schashformer.datasets.simulate`). ``schashformer cluster F.h5ad``
goes through the out-of-core path (:mod:`schashformer.streaming`) automatically when the file
holds more cells than ``train_cells`` (default 50,000) or would take more than half of the
available memory to load, or with ``--out-of-core``: the matrix is never loaded, and
``result.h5ad`` is a copy of the input file with the results added (obs, obsm, uns).
"""

from __future__ import annotations

import time

from .datasets.simulate import REFERENCES, SYNTHETIC, simulate

COMMANDS = ("simulate",)


def add_parsers(sub) -> None:
    """The ``simulate`` sub-command and the ``--out-of-core`` option of ``cluster``."""

    sim = sub.add_parser("simulate", help="write simulated counts fitted to a labeled data set (.h5ad, chunked)")
    sim.add_argument("--cells", type=int, required=True, help="number of cells")
    sim.add_argument("--out", required=True, help="output .h5ad file")
    sim.add_argument("--like", default="PBMC",
                     help=f"reference: {', '.join(REFERENCES)}, a synthetic one ({', '.join(SYNTHETIC)}: 10 types of "
                          "very unequal size, modest differences) or a labeled count file (labels in obs['label'])")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    sim.add_argument("--workers", type=int, default=None,
                     help="processes drawing chunks at once (default: one per CPU core; the output does not depend on it)")
    sim.add_argument("--quiet", action="store_true", help="no progress bar")
    cluster = sub.choices.get("cluster")
    if cluster is not None:
        cluster.add_argument("--out-of-core", action="store_true",
                             help="stream the .h5ad in row chunks and train on a subsample (automatic for files "
                                  "with more cells than train_cells or too large to load)")


def main(args) -> int:
    """Run ``simulate``."""

    start = time.perf_counter()
    path = simulate(args.cells, like=args.like, seed=args.seed, out=args.out, overwrite=args.overwrite,
                    progress=not args.quiet, workers=args.workers)
    print(f"wrote {path}: {args.cells} cells like {args.like} (seed {args.seed}) in {time.perf_counter() - start:.1f} s")
    return 0


