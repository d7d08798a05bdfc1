"""Compare one-seed screen logs of probe_fits.py with the defaults' five-seed log.

For each set: the screen's ARI, the defaults' ARI at the same seed and its difference ('<<' / '++' where it
exceeds the set's five-seed sd), and the difference from the defaults' five-seed mean ('!!' where it is
below by more than that sd). Then the twelve-set means and summed fit seconds.

    python benchmarks/results/probes_2026-12-02_stop6/compare_seed0.py screen_tau05_seed0.log ...
"""
import collections
import statistics as st
import sys
from pathlib import Path

BASE = Path(__file__).resolve().parents[1] / "suite_views_one_batch_5seeds.log"


def read(path):
    ari, secs = collections.defaultdict(dict), collections.defaultdict(dict)
    for line in open(path):
        if line.startswith("#") or not line.strip():
            continue
        p = line.split()
        ari[p[0]][int(p[1])], secs[p[0]][int(p[1])] = float(p[3]), float(p[2])
    return ari, secs


base, base_secs = read(BASE)
for path in sys.argv[1:]:
    print("==", path, open(path).readline().strip())
    ari, secs = read(path)
    rows = []
    for name in ari:
        for seed, a in ari[name].items():
            b, sd, m = base[name][seed], st.stdev(base[name].values()), st.mean(base[name].values())
            flag = " <<" if a - b < -sd else (" ++" if a - b > sd else "   ")
            print(f"{name[:28]:28s} s{seed} {a:.3f} base {b:.3f} d {a - b:+.3f} sd {sd:.3f} "
                  f"t {secs[name][seed]:5.1f}/{base_secs[name][seed]:5.1f}{flag} vs5mean {a - m:+.3f}"
                  + (" !!" if a - m < -sd else ""))
            rows.append((a, b, secs[name][seed], base_secs[name][seed]))
    n = len(rows)
    print(f"5-seed mean over all sets {st.mean(st.mean(v.values()) for v in base.values()):.3f}")
    print(f"n {n} mean {sum(r[0] for r in rows) / n:.3f} base {sum(r[1] for r in rows) / n:.3f} "
          f"time {sum(r[2] for r in rows):.0f}/{sum(r[3] for r in rows):.0f}")
