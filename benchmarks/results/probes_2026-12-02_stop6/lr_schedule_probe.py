"""probe_fits.py with a learning-rate schedule in chosen phases (patched from outside the package).

The package trains every phase at a constant ``lr``. Here the phases named in LR_PHASES follow a cosine from
LR_PEAK x ``lr`` down to LR_FLOOR x that peak over the phase's steps:

    LR_PHASES=stage1 LR_PEAK=1 LR_FLOOR=0 python benchmarks/results/probes_2026-12-02_stop6/lr_schedule_probe.py --sets all --seeds 0
"""
import dataclasses
import math
import os
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[2]  # benchmarks/
sys.path.insert(0, str(BENCH))
from schashformer import engine

PHASES = os.environ.get("LR_PHASES", "stage1").split(",")
PEAK = float(os.environ.get("LR_PEAK", "1"))
FLOOR = float(os.environ.get("LR_FLOOR", "0"))
ADAMW = torch.optim.AdamW
current = {}  # the optimiser of the phase running now


class RecordedAdamW(ADAMW):
    """AdamW that keeps a handle on itself, so the step wrapper can set its learning rate."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        current["optimiser"] = self


orig = engine.run_phase


def run_phase(phase, history, cfg, **kw):
    if phase.name not in PHASES or not phase.params:
        return orig(phase, history, cfg, **kw)
    inner, n = phase.step, max(phase.n_steps - 1, 1)

    def step(i, bar):
        lr = cfg.lr * PEAK * (FLOOR + (1 - FLOOR) * 0.5 * (1 + math.cos(math.pi * min(i / n, 1.0))))
        for group in current["optimiser"].param_groups:
            group["lr"] = lr
        return inner(i, bar)

    torch.optim.AdamW = RecordedAdamW  # run_phase builds its optimiser from torch.optim
    try:
        orig(dataclasses.replace(phase, step=step), history, cfg, **kw)
    finally:
        torch.optim.AdamW = ADAMW
        current.clear()


engine.run_phase = run_phase
print(f"# cosine lr from {PEAK} x lr to {FLOOR} x that in phases {PHASES}", flush=True)
sys.argv[0] = str(BENCH / "probe_fits.py")
import probe_fits
probe_fits.main()
