"""probe_fits.py with an exponential moving average of the weights in chosen phases (patched from outside).

    EMA_DECAY=0.99 EMA_PHASES=stage1 python benchmarks/results/probes_2026-12-02/ema_probe.py --sets all --seeds 0
"""
import os, sys, dataclasses
import torch
from pathlib import Path
BENCH = Path(__file__).resolve().parents[2]  # benchmarks/
sys.path.insert(0, str(BENCH))
from schashformer import engine

DECAY = float(os.environ.get("EMA_DECAY", "0.99"))
PHASES = os.environ.get("EMA_PHASES", "stage1").split(",")
orig = engine.run_phase

def run_phase(phase, history, cfg, **kw):
    if phase.name not in PHASES or not phase.params:
        return orig(phase, history, cfg, **kw)
    params = [p for p in phase.params if p.requires_grad]
    avg = [p.detach().clone() for p in params]
    inner = phase.step
    def step(i, bar):
        if i > 0:  # the weights after step i-1's update
            with torch.no_grad():
                torch._foreach_lerp_(avg, [p.detach() for p in params], 1 - DECAY)
        return inner(i, bar)
    orig(dataclasses.replace(phase, step=step), history, cfg, **kw)
    with torch.no_grad():
        torch._foreach_lerp_(avg, [p.detach() for p in params], 1 - DECAY)
        for p, a in zip(params, avg):
            p.copy_(a)

engine.run_phase = run_phase
print(f"# EMA decay {DECAY} in phases {PHASES}", flush=True)
sys.argv[0] = str(BENCH / "probe_fits.py")
import probe_fits
probe_fits.main()
