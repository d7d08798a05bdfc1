"""Compare one-seed screen logs of probe_fits.py with the defaults' five-seed log, two ways.

``seed_table.py --baseline`` compares a screen with the defaults at the same seed. That is fair only where the
change leaves the random stream alone; a change that re-draws the start partition behaves as a new seed, so this
script also gives each set's difference from the defaults' mean over all their seeds ('!!' where it falls by more
than their sd there), and the suite means both ways.

    python benchmarks/results/probes_2026-12-02_stop6/compare_seed0.py screen_tau05_seed0.log ...
"""
import statistics
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2]  # benchmarks/
sys.path.insert(0, str(BENCH))
from seed_table import mean_sd, read_logs

base = read_logs([str(BENCH / "results" / "suite_views_one_batch_5seeds.log")])
for path in sys.argv[1:]:
    print("==", path, open(path).readline().strip())
    screen, same_seed = [], []
    for name, per_seed in read_logs([path]).items():
        m, sd = mean_sd(list(base[name].values()))
        for seed, a in per_seed.items():
            b = base[name][seed]
            screen.append(a)
            same_seed.append(b)
            print(f"{name[:28]:28s} s{seed} {a:.3f} | same seed {b:.3f} {a - b:+.3f} | five-seed mean {m:.3f} "
                  f"{a - m:+.3f} (sd {sd:.3f})" + (" !!" if a - m < -sd else ""))
    print(f"suite mean {statistics.fmean(screen):.3f} | same seed {statistics.fmean(same_seed):.3f} | five-seed mean "
          f"{statistics.fmean(mean_sd(list(v.values()))[0] for v in base.values()):.3f}")
