"""Scaling benchmark (issue 4): scHashFormer vs scanpy from 10^4 to 10^6 simulated cells.

Data: ``schashformer.datasets.simulate`` fitted to the 10x PBMC data (8 types, realistic
difficulty: scanpy's ARI on 10^4 cells is ~0.7, as on the real data). The largest size is
simulated once; smaller sizes are its first N cells (a valid N-cell sample: cells are drawn
independently; the simulator's chunk seeding makes whole chunks identical to a smaller simulation).

Peers, each run alone in a subprocess with its own thread settings, a memory cap (the parent
samples the resident memory of the process tree every 0.2 s and kills it above the cap:
recorded as OOM) and a time-out (recorded as TIMEOUT). A peer that fails at one size is not
run at larger sizes (recorded as SKIPPED):

- ``schashformer``: the command line, ``schashformer cluster FILE --n-clusters K --out DIR --no-umap``
  (out of core above 50,000 cells): read, preprocess, both stages, assignment, result files.
- ``scanpy_sparse``: read_h5ad, normalize_total, log1p, HVG (seurat, 2000), PCA (50, sparse,
  implicit centring), 15-NN, Leiden (resolution 1, igraph).
- ``scanpy_textbook``: the same with ``sc.pp.scale(max_value=10)`` before PCA (densifies).

Per run: wall time of the whole subprocess (start-up and imports included), per-stage seconds and
peak resident memory (the process's VmHWM after each stage), the sampled peak of the process tree, ARI/NMI
against the simulated types. Outputs under ``--out`` (default ``benchmarks/results``): ``scale.csv``
(rewritten after every run, so a partial run leaves its rows), ``scale.md`` (table, log-log slopes
of time and memory between 10^5 and 10^6 cells, commands), ``time_vs_cells.png``, ``memory_vs_cells.png``.

    python benchmarks/scale.py                                   # all sizes, all peers (~45 min, 2 cores)
    python benchmarks/scale.py --sizes 10000,100000 --peers schashformer
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIZES = (10_000, 30_000, 100_000, 300_000, 1_000_000)
PEERS = ("schashformer", "scanpy_sparse", "scanpy_textbook")
LABELS_KEY = "cell_type"


# ----------------------------------------------------------------------------- data
def dataset(n: int, largest: int, data_dir: Path, like: str, seed: int) -> Path:
    """Path of the N-cell file: the first N cells of the largest simulation (made once, cached)."""
    from schashformer.datasets import simulate

    data_dir.mkdir(parents=True, exist_ok=True)
    big = data_dir / f"{like}_{largest}_seed{seed}.h5ad"
    if not big.exists():
        print(f"simulating {largest} cells like {like} -> {big}", flush=True)
        simulate(largest, like=like, seed=seed, out=big, progress=True, workers=None)
    if n == largest:
        return big
    path = data_dir / f"{like}_{n}_seed{seed}.h5ad"
    if not path.exists():
        head_h5ad(big, n, path)
    return path


def head_h5ad(src: Path, n: int, dst: Path) -> None:
    """Write the first ``n`` cells of ``src`` (CSR X, obs, var) to ``dst``."""
    import anndata as ad
    import h5py
    from anndata.io import read_elem, sparse_dataset

    with h5py.File(src, "r") as f:
        x = sparse_dataset(f["X"])[:n]
        obs, var = read_elem(f["obs"]).iloc[:n], read_elem(f["var"])
    tmp = dst.with_name("." + dst.name + ".tmp")
    ad.AnnData(x, obs=obs, var=var).write_h5ad(tmp)
    tmp.replace(dst)


# ----------------------------------------------------------------------------- workers (run in the subprocess)
def _rss_gib() -> float:
    from schashformer.resources import peak_rss_gib  # this process's own peak, not its parent's

    return peak_rss_gib()


def _save(out: Path, info: dict) -> None:
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(info, indent=1))
    tmp.replace(out)


def _scores(labels_true, labels_pred) -> dict:
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    return {"ari": float(adjusted_rand_score(labels_true, labels_pred)),
            "nmi": float(normalized_mutual_info_score(labels_true, labels_pred))}


def worker_schashformer(path: Path, out_json: Path, workdir: Path, n_clusters: int, threads: int, seed: int,
                        params: list[str]) -> None:
    import torch

    torch.set_num_threads(threads)
    from schashformer import cli

    out_dir = workdir / "schashformer_out"
    argv = ["cluster", str(path), "--n-clusters", str(n_clusters), "--labels-key", LABELS_KEY, "--out",
            str(out_dir), "--no-umap", "--quiet", "--overwrite", "--seed", str(seed), "--checkpoint-every", "0"]
    argv += [a for kv in params for a in ("--param", kv)]
    info = {"stages": {}}
    start = time.perf_counter()
    rc = cli.main(argv)
    info["in_process_seconds"] = time.perf_counter() - start
    if rc != 0:
        raise RuntimeError(f"schashformer cluster exited with {rc}")
    report = json.loads((out_dir / "metrics.json").read_text())
    info["stages"] = {k: {"seconds": v.get("seconds"), "peak_rss_gib": v.get("peak_rss_gib")}
                      for k, v in report["timings"].items()}
    info["scores"] = {k: report["metrics"][k] for k in ("ari", "nmi")}
    info["out_of_core"] = bool(report.get("out_of_core", False))
    info["peak_rss_gib"] = _rss_gib()
    _save(out_json, info)


def worker_scanpy(path: Path, out_json: Path, scale: bool, threads: int, seed: int) -> None:
    import warnings

    import anndata as ad
    import numpy as np
    import scanpy as sc

    from schashformer.baselines.scanpy_pipeline import _leiden

    warnings.simplefilter("ignore")
    sc.settings.n_jobs = threads
    info = {"stages": {}}
    t = [time.perf_counter()]

    def stage(name):
        now = time.perf_counter()
        info["stages"][name] = {"seconds": round(now - t[0], 3), "peak_rss_gib": round(_rss_gib(), 3)}
        t[0] = now
        _save(out_json, info)  # a run killed later keeps the stages it finished

    a = ad.read_h5ad(path)
    truth = a.obs[LABELS_KEY].to_numpy()
    stage("read")
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    sc.pp.highly_variable_genes(a, n_top_genes=min(2000, a.n_vars), flavor="seurat", subset=True)
    if scale:
        sc.pp.scale(a, max_value=10)
    stage("preprocess")
    sc.pp.pca(a, n_comps=50, random_state=seed)
    stage("pca")
    sc.pp.neighbors(a, n_neighbors=15, random_state=seed)
    stage("neighbors")
    labels = _leiden(a, 1.0, seed)
    stage("leiden")
    info["scores"] = _scores(truth, labels)
    info["n_clusters_found"] = int(np.unique(labels).size)
    info["peak_rss_gib"] = _rss_gib()
    _save(out_json, info)


# ----------------------------------------------------------------------------- the parent: caps and bookkeeping
def _tree_rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and its descendants (from /proc)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo.extend(int(c) for c in f.read().split())
        except (OSError, ValueError):
            pass
    return total


def run_peer(peer: str, path: Path, n: int, args, workdir: Path) -> dict:
    """Run one peer on one file in a capped subprocess; returns its row."""
    workdir.mkdir(parents=True, exist_ok=True)
    out_json = workdir / f"{peer}.json"
    out_json.unlink(missing_ok=True)
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env[var] = str(args.threads)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", peer, "--input", str(path),
           "--worker-json", str(out_json), "--workdir", str(workdir), "--threads", str(args.threads),
           "--seed", str(args.seed if args.fit_seed is None else args.fit_seed), "--n-clusters", str(args.n_clusters)]
    cmd += [a for kv in (args.param or []) for a in ("--param", kv)]
    cap = args.mem_cap_gib * 2**30
    load_before = os.getloadavg()[0]  # other work on the machine shows here (1-minute load average)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(workdir / f"{peer}.log", "w"),
                            start_new_session=True)
    status, peak = "ok", 0
    while proc.poll() is None:
        rss = _tree_rss_bytes(proc.pid)
        peak = max(peak, rss)
        elapsed = time.perf_counter() - start
        if rss > cap or elapsed > args.timeout:
            status = "OOM" if rss > cap else "TIMEOUT"
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            break
        time.sleep(0.2)
    wall = time.perf_counter() - start
    if status == "ok" and proc.returncode != 0:
        # the kernel's OOM killer (SIGKILL) or a MemoryError also mean out of memory
        log = (workdir / f"{peer}.log").read_text()[-2000:]
        status = "OOM" if proc.returncode == -9 or "MemoryError" in log else f"error {proc.returncode}"
    info = json.loads(out_json.read_text()) if out_json.exists() else {"stages": {}}
    row = {"peer": peer, "cells": n, "status": status, "wall_s": round(wall, 1),
           "peak_rss_gib": round(max(peak / 2**30, info.get("peak_rss_gib", 0.0)), 2),
           "ari": info.get("scores", {}).get("ari"), "nmi": info.get("scores", {}).get("nmi"),
           "n_clusters_found": info.get("n_clusters_found", args.n_clusters if peer == "schashformer" else None),
           "stages": info.get("stages", {}), "threads": args.threads, "mem_cap_gib": args.mem_cap_gib,
           "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2)}
    print(f"{peer:16s} {n:>8d} cells: {status:8s} {wall:7.1f} s  peak {row['peak_rss_gib']:5.2f} GiB  "
          f"ARI {row['ari'] if row['ari'] is None else round(row['ari'], 3)}", flush=True)
    return row


def slope(rows: list[dict], peer: str, key: str, lo: int = 100_000, hi: int = 1_000_000) -> float | None:
    """Least-squares slope of log(key) vs log(cells) over the peer's successful runs with lo <= cells <= hi."""
    import numpy as np

    pts = [(r["cells"], r[key]) for r in rows if r["peer"] == peer and r["status"] == "ok" and lo <= r["cells"] <= hi
           and r[key]]
    if len({c for c, _ in pts}) < 2:
        return None
    x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return float(np.polyfit(x, y, 1)[0])


def write_outputs(rows: list[dict], args, started: float) -> None:
    import pandas as pd

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    flat = []
    for r in rows:
        row = {k: v for k, v in r.items() if k != "stages"}
        row["stages"] = "; ".join(f"{k} {v['seconds']:.1f}s" + (f"/{v['peak_rss_gib']:.2f}G" if v.get("peak_rss_gib")
                                                                 else "")
                                  for k, v in r["stages"].items() if v.get("seconds") is not None)
        flat.append(row)
    pd.DataFrame(flat).to_csv(out / "scale.csv", index=False)
    _plots(rows, out)
    lines = ["# Scaling benchmark (issue 4)", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
             f"{_mem_total_gib():.0f} GiB RAM, no GPU; {args.threads} threads per run, one run at a time; memory cap "
             f"{args.mem_cap_gib} GiB, time-out {args.timeout} s per run. Data: simulated like {args.like} "
             f"({args.n_clusters} types, seed {args.seed}), 2000 genes. Whole benchmark: "
             f"{(time.perf_counter() - started) / 60:.1f} min.", "",
             f"Command: `{' '.join(['python', 'benchmarks/scale.py'] + sys.argv[1:])}`", "",
             "| peer | cells | status | wall s | peak GiB | ARI | NMI | clusters | load before/after | stages (s / peak GiB) |",
             "|---|---:|---|---:|---:|---:|---:|---:|---|---|"]
    for r in flat:
        fmt = lambda v, d=3: "" if v is None or v != v else f"{v:.{d}f}"  # noqa: E731
        status = r["status"] + (f" ({r['note']})" if r.get("note") == r.get("note") and r.get("note") else "")
        lines.append(f"| {r['peer']} | {r['cells']:,} | {status} | {fmt(r['wall_s'], 1)} | {fmt(r['peak_rss_gib'], 2)} | "
                     f"{fmt(r['ari'])} | {fmt(r['nmi'])} | {r['n_clusters_found'] or ''} | "
                     f"{fmt(r.get('load_before'), 1)}/{fmt(r.get('load_after'), 1)} | {r['stages']} |")
    lines += ["", "Log-log slopes between 10^5 and 10^6 cells (successful runs):", "",
              "| peer | time slope | memory slope |", "|---|---:|---:|"]
    for peer in dict.fromkeys(r["peer"] for r in rows):
        t, m = slope(rows, peer, "wall_s"), slope(rows, peer, "peak_rss_gib")
        lines.append(f"| {peer} | {'' if t is None else f'{t:.2f}'} | {'' if m is None else f'{m:.2f}'} |")
    ok = {(r["peer"], r["cells"]): r for r in rows if r["status"] == "ok"}
    both = sorted(c for (peer, c) in ok if peer == "schashformer" and ("scanpy_sparse", c) in ok)
    if both:
        c = both[-1]
        a, b = ok[("schashformer", c)], ok[("scanpy_sparse", c)]
        lines += ["", f"At {c:,} cells: scHashFormer {a['wall_s']:.0f} s vs scanpy sparse-PCA {b['wall_s']:.0f} s "
                  f"(ratio {a['wall_s'] / b['wall_s']:.2f}); peak memory {a['peak_rss_gib']:.2f} vs "
                  f"{b['peak_rss_gib']:.2f} GiB; ARI {a['ari']:.3f} vs {b['ari']:.3f}."]
    lines += ["", "Load = the machine's 1-minute load average before and after the run (2 cores: above ~2 means "
              "other work competed with the run)."]
    lines += ["", "Plots: `time_vs_cells.png`, `memory_vs_cells.png` (this folder). OOM = killed at the memory cap "
              "(or by the kernel), TIMEOUT = killed at the time-out, SKIPPED = not run (after a failure at a smaller "
              "size, or with --predict-oom when the peak memory extrapolated linearly from the smaller size exceeds "
              "the cap; the reason is given)."]
    (out / "scale.md").write_text("\n".join(lines) + "\n")


def _mem_total_gib() -> float:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def _plots(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key, label, name in (("wall_s", "wall time (s)", "time_vs_cells.png"),
                             ("peak_rss_gib", "peak resident memory (GiB)", "memory_vs_cells.png")):
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for peer in dict.fromkeys(r["peer"] for r in rows):
            ok = [(r["cells"], r[key]) for r in rows if r["peer"] == peer and r["status"] == "ok"]
            bad = [(r["cells"], r[key], r["status"]) for r in rows if r["peer"] == peer and r["status"] not in
                   ("ok", "SKIPPED")]
            line = ax.plot(*zip(*ok), "o-", label=peer)[0] if ok else None
            color = line.get_color() if line is not None else None
            for c, v, s in bad:
                ax.plot([c], [v], "x", color=color, markersize=10, mew=2)
                ax.annotate(s, (c, v), textcoords="offset points", xytext=(5, 5), fontsize=8, color=color)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("cells")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=",".join(map(str, SIZES)), help="comma-separated cell counts")
    p.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated, from {', '.join(PEERS)}")
    p.add_argument("--like", default="PBMC", help="reference of the simulation (PBMC: 8 types)")
    p.add_argument("--n-clusters", type=int, default=8, help="K given to scHashFormer (the simulated types)")
    p.add_argument("--seed", type=int, default=0, help="seed of the simulation and, without --fit-seed, of the fits")
    p.add_argument("--fit-seed", type=int, default=None,
                   help="seed of the fits only (the same simulated data, another training run)")
    p.add_argument("--threads", type=int, default=2, help="threads per run (torch, BLAS, numba)")
    p.add_argument("--mem-cap-gib", type=float, default=20.0, help="a run above this resident memory is killed (OOM)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds before a run is killed (TIMEOUT)")
    p.add_argument("--peer-sizes", action="append", metavar="PEER=N1,N2",
                   help="run PEER only at these sizes (repeatable); its other sizes are recorded as SKIPPED")
    p.add_argument("--predict-oom", action="store_true",
                   help="skip a run whose peak memory, extrapolated linearly from the peer's previous size, exceeds "
                        "the cap (recorded as SKIPPED with the prediction)")
    p.add_argument("--data-dir", default="/tmp/schashformer_scale", help="simulated .h5ad files (cached)")
    p.add_argument("--out", default=str(HERE / "results"), help="folder for scale.csv, scale.md and the plots")
    p.add_argument("--param", action="append", metavar="KEY=VALUE",
                   help="a TrainConfig field passed to scHashFormer (repeatable); defaults when absent")
    # worker mode (internal)
    p.add_argument("--worker", choices=PEERS, help=argparse.SUPPRESS)
    p.add_argument("--input", help=argparse.SUPPRESS)
    p.add_argument("--worker-json", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        path, out_json = Path(args.input), Path(args.worker_json)
        if args.worker == "schashformer":
            worker_schashformer(path, out_json, Path(args.workdir), args.n_clusters, args.threads, args.seed,
                                args.param or [])
        else:
            worker_scanpy(path, out_json, args.worker == "scanpy_textbook", args.threads, args.seed)
        return 0

    sizes = sorted(int(s) for s in args.sizes.split(","))
    peers = [s.strip() for s in args.peers.split(",")]
    unknown = set(peers) - set(PEERS)
    if unknown:
        p.error(f"unknown peers {sorted(unknown)}; choose from {', '.join(PEERS)}")
    only = {k: {int(v) for v in vs.split(",")} for k, _, vs in (ps.partition("=") for ps in (args.peer_sizes or []))}
    started = time.perf_counter()
    data_dir = Path(args.data_dir)
    rows, failed = [], {}
    for n in sizes:
        path = dataset(n, max(sizes), data_dir, args.like, args.seed)
        for peer in peers:
            if peer in failed:
                rows.append({"peer": peer, "cells": n, "status": "SKIPPED", "wall_s": float("nan"),
                             "peak_rss_gib": float("nan"), "ari": None, "nmi": None, "n_clusters_found": None,
                             "stages": {}, "threads": args.threads, "mem_cap_gib": args.mem_cap_gib,
                             "note": f"{failed[peer]} at a smaller size"})
                continue
            if peer in only and n not in only[peer]:
                rows.append({"peer": peer, "cells": n, "status": "SKIPPED", "wall_s": float("nan"),
                             "peak_rss_gib": float("nan"), "ari": None, "nmi": None, "n_clusters_found": None,
                             "stages": {}, "threads": args.threads, "mem_cap_gib": args.mem_cap_gib,
                             "note": "not run at this size (--peer-sizes)"})
                continue
            prev = [r for r in rows if r["peer"] == peer and r["status"] == "ok"]
            if args.predict_oom and prev:
                guess = prev[-1]["peak_rss_gib"] * n / prev[-1]["cells"]
                if guess > args.mem_cap_gib:
                    note = (f"predicted OOM: {prev[-1]['peak_rss_gib']:.1f} GiB at {prev[-1]['cells']:,} cells "
                            f"-> ~{guess:.0f} GiB > cap {args.mem_cap_gib} GiB")
                    rows.append({"peer": peer, "cells": n, "status": "SKIPPED", "wall_s": float("nan"),
                                 "peak_rss_gib": float("nan"), "ari": None, "nmi": None, "n_clusters_found": None,
                                 "stages": {}, "threads": args.threads, "mem_cap_gib": args.mem_cap_gib, "note": note})
                    print(f"{peer:16s} {n:>8d} cells: SKIPPED ({note})", flush=True)
                    failed[peer] = note
                    write_outputs(rows, args, started)
                    continue
            row = run_peer(peer, path, n, args, data_dir / "runs" / f"{peer}_{n}")
            rows.append(row)
            if row["status"] != "ok":
                failed[peer] = f"{row['status']} at {n}"
            write_outputs(rows, args, started)
    write_outputs(rows, args, started)
    print(f"results in {args.out}/scale.md ({(time.perf_counter() - started) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
