"""Throughput of the distributed fit with 1, 2, ... ranks (docs/DISTRIBUTED.md).

Runs ``torchrun --standalone --nproc_per_node W -m schashformer.distributed cluster ...`` for each
W on one data set with a fixed number of steps (one thread per rank) and reads the figures the fit
records in ``metrics.json``: optimiser steps per second of stage 1 and of stage-2 pretraining (the
global batch is the same for every W, so steps/s is the speed-up) and cells per second of the final
inference pass. Writes ``benchmarks/results/distributed_<device>.md``.

    python benchmarks/distributed_throughput.py --ranks 1 2 --device cpu
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "10X_PBMC_top2000.h5"
PARAMS = {"stage1_steps": 100, "stage2_pretrain_steps": 60, "stage2_cluster_steps": 60, "update_interval": 30,
          "tol": 0.0, "kmeans_n_init": 4}


def run(world: int, data: Path, device: str, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    params = [a for k, v in PARAMS.items() for a in ("--param", f"{k}={v}")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           "-m", "schashformer.distributed", "cluster", str(data), "--n-clusters", "8", "--out", str(out),
           "--device", device, "--labels-key", "label", "--no-umap", "--quiet", *params]
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    t = json.loads((out / "metrics.json").read_text())["timings"]
    return {"ranks": world, "stage1 steps/s": t["stage1_hashing"]["steps_per_s"],
            "stage2 steps/s": t["stage2_encoder"]["steps_per_s"], "inference cells/s": t["inference"]["cells_per_s"],
            "fit s": round(sum(t[k]["seconds"] for k in ("preprocess", "stage1_hashing", "stage2_encoder",
                                                          "stage2_clustering", "inference")), 1),
            "wall s": round(wall, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--device", default="cpu")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="override a TrainConfig field (e.g. stage1_batch=1024); repeatable")
    p.add_argument("--tag", default="", help="suffix of the results file name")
    args = p.parse_args()
    for item in args.param:
        key, _, value = item.partition("=")
        PARAMS[key] = value
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for w in args.ranks:
            rows.append(run(w, args.data, args.device, Path(tmp) / f"w{w}"))
            print(rows[-1], flush=True)
    base = rows[0]
    cols = list(base)
    lines = [f"Data: {args.data.name}; device {args.device}; machine {platform.machine()}, {os.cpu_count()} CPU cores; "
             f"one thread per rank; parameters {PARAMS}.", "",
             "| " + " | ".join(cols) + " | stage-1 speed-up |", "|" + "---|" * (len(cols) + 1)]
    for r in rows:
        lines.append("| " + " | ".join(str(r[c]) for c in cols)
                     + f" | {r['stage1 steps/s'] / base['stage1 steps/s']:.2f} |")
    out = ROOT / "benchmarks" / "results" / f"distributed_{args.device}{args.tag}.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
