"""Tables from ``probe_fits.py`` logs: ARI per seed, mean ± sd per set, against a baseline and the peers.

``probe_fits.py`` prints one line per fit (data set, seed, seconds, ARI, ...). This script reads one
group of such logs (``--logs``) and prints, in Markdown:

- per set, the ARI of each seed and their mean ± sd; the suite mean per seed and over seeds;
- with ``--baseline LOG ...``: the baseline's mean ± sd beside it (over the seeds both have) and the
  difference, marked ``**`` where it exceeds the baseline's seed sd over all of its seeds (the tuning rule
  of ``docs/METHOD_CHOICES.md``; a one-seed screen is judged by a five-seed baseline's spread);
- with ``--peers quality.csv`` (a ``quality.py`` result, e.g. ``results/peers_suite/quality.csv``):
  the best peer of each set by mean ARI, the difference to it, each peer's suite mean, and the sets
  more than 0.02 below their best peer (issue 19's criterion).

    python benchmarks/seed_table.py --logs results/suite_screen_chunk4_*.log \\
        [--baseline results/suite_5seeds_chunk8_*.log] [--peers results/peers_suite/quality.csv]

A (set, seed) that appears in several logs keeps its last line. Sets are listed in the order of their
first appearance; with ``--baseline`` only the sets and seeds present in both are averaged.
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path


def read_logs(paths: list[str]) -> dict[str, dict[int, float]]:
    """{data set: {seed: ARI}} from ``probe_fits.py`` output lines (comment and empty lines skipped)."""
    runs: dict[str, dict[int, float]] = {}
    for path in paths:
        for number, line in enumerate(Path(path).read_text().splitlines(), 1):
            fields = line.split()
            if not fields or line.startswith("#"):
                continue
            try:
                runs.setdefault(fields[0], {})[int(fields[1])] = float(fields[3])
            except (IndexError, ValueError):
                raise SystemExit(f"{path}:{number}: not a probe_fits.py line (set seed seconds ARI ...): {line!r}")
    return runs


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def read_peers(path: str) -> dict[str, dict[str, list[float]]]:
    """{data set: {method: [ARI per seed]}} from a ``quality.py`` CSV (rows with status 'ok')."""
    peers: dict[str, dict[str, list[float]]] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            if row.get("status") == "ok" and row.get("ari"):
                peers.setdefault(row["dataset"], {}).setdefault(row["method"], []).append(float(row["ari"]))
    return peers


def seed_table(runs: dict[str, dict[int, float]]) -> list[str]:
    seeds = sorted({s for per_seed in runs.values() for s in per_seed})
    lines = ["| data set | ARI per seed " + " / ".join(map(str, seeds)) + " | mean ± sd |", "|---|---|---|"]
    for name, per_seed in runs.items():
        cells = " / ".join(f"{per_seed[s]:.3f}" if s in per_seed else "–" for s in seeds)
        m, sd = mean_sd(list(per_seed.values()))
        lines.append(f"| {name} | {cells} | {m:.3f} ± {sd:.3f} |")
    complete = [s for s in seeds if all(s in per_seed for per_seed in runs.values())]
    if complete:
        means = [statistics.fmean(per_seed[s] for per_seed in runs.values()) for s in complete]
        m, sd = mean_sd(means)
        lines.append("")
        lines.append("Suite mean per seed (" + ", ".join(map(str, complete)) + "): "
                     + ", ".join(f"{v:.3f}" for v in means) + f"; over seeds **{m:.3f} ± {sd:.3f}**.")
    wide = [name for name, per_seed in runs.items() if len(per_seed) > 1 and mean_sd(list(per_seed.values()))[1] > 0.03]
    lines.append(f"Seed sd above 0.03 on {len(wide)} of {len(runs)} sets" + (f": {', '.join(wide)}." if wide else "."))
    return lines


def baseline_table(runs: dict[str, dict[int, float]], base: dict[str, dict[int, float]]) -> list[str]:
    """Means over the seeds both have; the flag compares the difference with the baseline's seed sd over
    all of its seeds (a one-seed screen against a five-seed baseline is judged by the five seeds' spread)."""
    lines = ["| data set | baseline | these logs | Δ | seeds | baseline sd (its seeds) |", "|---|---|---|---|---|---|"]
    ours, theirs = [], []
    for name, per_seed in runs.items():
        seeds = sorted(set(per_seed) & set(base.get(name, {})))
        if not seeds:
            continue
        (bm, bsd), (m, sd) = mean_sd([base[name][s] for s in seeds]), mean_sd([per_seed[s] for s in seeds])
        spread = mean_sd(list(base[name].values()))[1]
        theirs.append(bm)
        ours.append(m)
        flag = " **" if len(base[name]) > 1 and abs(m - bm) > spread else ""
        lines.append(f"| {name} | {bm:.3f} ± {bsd:.3f} | {m:.3f} ± {sd:.3f} | {m - bm:+.3f}{flag} | {len(seeds)} | "
                     f"{spread:.3f} ({len(base[name])}) |")
    if ours:
        lines.append(f"| **mean** | **{statistics.fmean(theirs):.3f}** | **{statistics.fmean(ours):.3f}** | "
                     f"{statistics.fmean(ours) - statistics.fmean(theirs):+.3f} | | |")
    return lines


def peer_table(runs: dict[str, dict[int, float]], peers: dict[str, dict[str, list[float]]]) -> list[str]:
    methods = list(dict.fromkeys(method for name in runs if name in peers for method in peers[name]))
    lines = ["| data set | scHashFormer | best peer | its ARI | Δ | " + " | ".join(methods) + " |",
             "|---|---|---|---|---|" + "---|" * len(methods)]
    ours, best, below = [], [], []
    suite: dict[str, list[float]] = {}
    for name, per_seed in runs.items():
        if name not in peers:
            continue
        means = {method: statistics.fmean(v) for method, v in peers[name].items()}
        top = max(means, key=means.get)
        m, sd = mean_sd(list(per_seed.values()))
        ours.append(m)
        best.append(means[top])
        for method, v in means.items():
            suite.setdefault(method, []).append(v)
        if m - means[top] < -0.02:
            below.append(f"{name} ({m - means[top]:+.3f} against {top})")
        cells = " | ".join("%.3f ± %.3f" % mean_sd(peers[name][method]) if method in peers[name] else "–"
                           for method in methods)
        lines.append(f"| {name} | {m:.3f} ± {sd:.3f} | {top} | {means[top]:.3f} | {m - means[top]:+.3f} | {cells} |")
    if not ours:
        return ["No set of these logs is in the peers' CSV."]
    full = {method: statistics.fmean(v) for method, v in suite.items() if len(v) == len(ours)}  # peers on every set
    lines.append(f"| **mean** | **{statistics.fmean(ours):.3f}** | best per set | {statistics.fmean(best):.3f} | "
                 f"{statistics.fmean(ours) - statistics.fmean(best):+.3f} | "
                 + " | ".join(f"{full[method]:.3f}" if method in full else "–" for method in methods) + " |")
    lines.append("")
    if full:
        top = max(full, key=full.get)
        lines.append("Peer suite means (sets above): " + ", ".join(f"{k} {v:.3f}" for k, v in
                                                                   sorted(full.items(), key=lambda kv: -kv[1]))
                     + f". Margin over the best by mean ({top}): {statistics.fmean(ours) - full[top]:+.3f}.")
    lines.append(f"Sets more than 0.02 below their best peer: {len(below)}" + (f": {'; '.join(below)}." if below else "."))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--logs", nargs="+", required=True, help="probe_fits.py logs of one configuration")
    parser.add_argument("--baseline", nargs="+", default=None, help="probe_fits.py logs to compare against")
    parser.add_argument("--peers", default=None, help="a quality.py CSV of the peers")
    args = parser.parse_args()
    runs = read_logs(args.logs)
    if not runs:
        raise SystemExit(f"no fits in {args.logs}")
    out = seed_table(runs)
    if args.baseline:
        out += [""] + baseline_table(runs, read_logs(args.baseline))
    if args.peers:
        out += [""] + peer_table(runs, read_peers(args.peers))
    print("\n".join(out))


if __name__ == "__main__":
    main()
