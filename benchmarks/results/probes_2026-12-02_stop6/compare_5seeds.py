"""Compare a configuration's five-seed logs of probe_fits.py with the defaults' five-seed log, set by set.

'<<' marks a set whose mean falls by more than the defaults' sd there; then the twelve-set means, the ratio
of summed fit seconds, and the suite mean per seed.

    python benchmarks/results/probes_2026-12-02_stop6/compare_5seeds.py screen_batch256_seed0.log screen_batch256_seeds1234.log
"""
import collections
import statistics as st
import sys
from pathlib import Path

BASE = Path(__file__).resolve().parents[1] / "suite_views_one_batch_5seeds.log"


def read(paths):
    ari, secs = collections.defaultdict(dict), collections.defaultdict(dict)
    for path in paths:
        for line in open(path):
            if line.startswith("#") or not line.strip():
                continue
            p = line.split()
            ari[p[0]][int(p[1])], secs[p[0]][int(p[1])] = float(p[3]), float(p[2])
    return ari, secs


base, base_secs = read([BASE])
new, new_secs = read(sys.argv[1:])
means_base, means_new, t_base, t_new = [], [], 0.0, 0.0
for name in base:
    seeds = sorted(set(base[name]) & set(new.get(name, {})))
    if len(seeds) < 2:
        continue
    xb, xn = [base[name][s] for s in seeds], [new[name][s] for s in seeds]
    d, sd = st.mean(xn) - st.mean(xb), st.stdev(xb)
    means_base.append(st.mean(xb))
    means_new.append(st.mean(xn))
    t_base += sum(base_secs[name][s] for s in seeds)
    t_new += sum(new_secs[name][s] for s in seeds)
    print(f"{name[:28]:28s} n{len(seeds)} base {st.mean(xb):.3f}±{sd:.3f} new {st.mean(xn):.3f}±{st.stdev(xn):.3f} "
          f"d {d:+.3f}" + (" <<" if d < -sd else ""))
print(f"mean base {st.mean(means_base):.3f} new {st.mean(means_new):.3f}; time {t_new:.0f} / {t_base:.0f} = {t_new / t_base:.3f}")
for seed in range(5):
    names = [n for n in new if seed in new[n] and seed in base[n]]
    if names:
        print(seed, f"{st.mean(base[n][seed] for n in names):.3f} {st.mean(new[n][seed] for n in names):.3f}")
