"""Probe a configuration on the tuning suite: one scHashFormer fit per (data set, seed), one at a time.

The harness behind the probes of ``docs/METHOD_CHOICES.md``: true K, the package defaults except the
``name=value`` overrides given, 2 threads, in this process (fits run one after the other, so the
machine's load is the fit's own). One line per fit on standard output, as it finishes:

    data set, seed, wall seconds, ARI of the labels, per-stage seconds (JSON), ARI of the start partition

    python benchmarks/probe_fits.py [--sets NAME,NAME|all] [--seeds 0,1] [--extra FILE.h5ad --label-key KEY]
                                    [name=value ...]

``--sets`` takes suite file names without their extension (``quality.SUITE``); ``--extra`` adds a
labelled ``.h5ad`` outside the suite (for instance ``schashformer simulate --like unequal``). Values
are read as the command line's ``--param`` reads them (YAML scalars: ``stage2_cluster_steps=50``,
``init=kmeans``, ``target_balance=null``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from quality import SUITE, load  # the tuning suite and its loader are defined once, in quality.py

from schashformer.app import parse_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", default="all", help="suite sets (file names without extension), or 'all'")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--data-dir", default=str(HERE.parent.parent / "shared" / "data"),
                        help="folder of the suite's files")
    parser.add_argument("--extra", default=None, help="a labelled .h5ad outside the suite")
    parser.add_argument("--label-key", default="cell_type", help="obs column of --extra's labels")
    parser.add_argument("params", nargs="*", help="name=value overrides of the defaults")
    args = parser.parse_args()
    from schashformer.errors import ParameterError
    try:
        params = parse_params(args.params)  # the command line's --param parser: YAML scalars, checked names
    except ParameterError as err:
        parser.error(str(err))

    import torch
    torch.set_num_threads(2)
    from schashformer import SCHashFormer
    from schashformer.metrics import clustering_scores

    suite = {Path(f).stem: (f, key) for f, key in SUITE}
    names = list(suite) if args.sets == "all" else [s for s in args.sets.split(",") if s]
    unknown = [n for n in names if n not in suite]
    if unknown:
        parser.error(f"not in the suite: {unknown}; the suite: {list(suite)}")
    jobs = [(n, os.path.join(args.data_dir, suite[n][0]), suite[n][1]) for n in names]
    if args.extra:
        jobs.append((Path(args.extra).stem, args.extra, args.label_key))
    print(f"# load {os.getloadavg()[0]:.1f}; params {params}", flush=True)
    for name, path, key in jobs:
        adata, labels, k = load(path, key)
        for seed in (int(s) for s in args.seeds.split(",")):
            start = time.perf_counter()
            model = SCHashFormer(k, seed=seed, device="cpu", progress=False, **params).fit(adata)
            seconds = time.perf_counter() - start
            stages = {stage: v["seconds"] for stage, v in model.timings_.items()}
            print(name, seed, round(seconds, 1), round(clustering_scores(labels, model.labels_)["ari"], 3),
                  json.dumps(stages), "start", round(clustering_scores(labels, model.kmeans_labels_)["ari"], 3),
                  flush=True)
    print(f"# load {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
