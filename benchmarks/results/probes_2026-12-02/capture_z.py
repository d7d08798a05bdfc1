"""Capture the pre-trained z (where the DEC centres are placed) of default fits; offline start probes."""
import sys, os, time
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
from schashformer.metrics import clustering_scores
from pathlib import Path

seeds = [int(s) for s in sys.argv[1].split(",")]
CUR = {}
orig = engine.NeighbourhoodStage._place_centres
def patched(self, z, k, seed):
    out = orig(self, z, k, seed)
    np.savez(f"{OUT}/{CUR['name']}_{CUR['seed']}.npz", z=z, start=out[0], kind=out[2])
    return out
engine.NeighbourhoodStage._place_centres = patched
for f, key in SUITE:
    name = Path(f).stem
    adata, labels, k = load(os.path.join(str(ROOT.parent / "shared" / "data"), f), key)
    for seed in seeds:
        CUR.update(name=name, seed=seed)
        t = time.perf_counter()
        m = SCHashFormer(k, seed=seed, device="cpu", progress=False).fit(adata)
        d = np.load(f"{OUT}/{name}_{seed}.npz")
        np.savez(f"{OUT}/{name}_{seed}.npz", z=d["z"], start=d["start"], kind=d["kind"], labels=np.asarray(labels), final=m.labels_, k=k)
        print(name, seed, round(time.perf_counter() - t, 1), round(clustering_scores(labels, m.labels_)["ari"], 3),
              "start", round(clustering_scores(labels, m.kmeans_labels_)["ari"], 3), flush=True)
