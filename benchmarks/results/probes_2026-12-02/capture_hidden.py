"""Capture stage-1 hidden layers at several steps of one default fit, the token PCs, labels."""
import sys, os, time, dataclasses
import numpy as np
from pathlib import Path
ROOT = Path(__file__).resolve().parents[3]  # the repository
sys.path.insert(0, str(ROOT / "benchmarks"))
OUT = os.environ.get("OUT", "/tmp/cap")  # where the captured arrays go
os.makedirs(OUT, exist_ok=True)
from quality import SUITE, load
import torch
torch.set_num_threads(2)
from schashformer import SCHashFormer, engine
from pathlib import Path
seed = int(sys.argv[1]); only = sys.argv[2].split(",") if len(sys.argv) > 2 else None
SNAP = {}
orig_phase = engine.hashing_phase
def patched_phase(indexer, data, cfg, rng, **kw):
    ph = orig_phase(indexer, data, cfg, rng, **kw)
    inner = ph.step
    def step(i, bar):
        if i in (25, 50, 100, 200):
            SNAP[i] = engine.hash_cells(indexer, data, 4096)[2]
        return inner(i, bar)
    return dataclasses.replace(ph, step=step)
engine.hashing_phase = patched_phase
orig_tok = engine.token_features
def patched_tok(prep, hidden, axes, *a, **kw):
    out = orig_tok(prep, hidden, axes, *a, **kw)
    SNAP["final"] = hidden.copy(); SNAP["tokens"] = out[0].copy()
    return out
engine.token_features = patched_tok
for f, key in SUITE:
    name = Path(f).stem
    if only and name not in only: continue
    adata, labels, k = load(os.path.join(str(ROOT.parent / "shared" / "data"), f), key)
    SNAP.clear(); t = time.perf_counter()
    m = SCHashFormer(k, seed=seed, device="cpu", progress=False).fit(adata)
    np.savez(f"{OUT}/{name}_{seed}.npz", labels=np.asarray(labels), k=k, final_labels=m.labels_,
             **{f"h{s}": v for s, v in SNAP.items()})
    print(name, seed, round(time.perf_counter() - t, 1), flush=True)
