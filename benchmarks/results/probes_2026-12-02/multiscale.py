import glob, sys, numpy as np, warnings
warnings.filterwarnings("ignore")
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score as ari

def eq(*parts):  # each part scaled to the same mean squared norm
    ref = (parts[0] ** 2).sum(1).mean()
    return np.concatenate([p * np.sqrt(ref / max((p ** 2).sum(1).mean(), 1e-12)) for p in parts], 1)

rows = {}
for f in sorted(glob.glob(sys.argv[1])):
    d = np.load(f, allow_pickle=True)
    y, k = d["labels"], int(d["k"]); seed = int(f.rsplit("_", 1)[1][:-4])
    hf, tok = d["hfinal"], d["htokens"]; w = hf.shape[1]; pcs = tok[:, w:]
    km = lambda x: ari(y, KMeans(k, n_init=20, random_state=seed).fit(x).labels_)
    r = {"tokens": km(tok), "hfinal": km(hf)}
    for s in (25, 50, 100, 200):
        if f"h{s}" in d:
            r[f"h{s}"] = km(d[f"h{s}"])
    for s in (50, 100):
        r[f"h{s}+pc"] = km(eq(d[f"h{s}"], pcs))
        r[f"h{s}+hf+pc"] = km(eq(hf, d[f"h{s}"], pcs))
        r[f"h{s}+hf"] = km(eq(hf, d[f"h{s}"]))
    r["final"] = ari(y, d["final_labels"])
    name = f.split("/")[-1][:-4]; rows[name] = r
    print(name, " ".join(f"{a}={v:.3f}" for a, v in r.items()), flush=True)
ms = list(next(iter(rows.values())))
print("MEAN", " ".join(f"{m}={np.mean([r[m] for r in rows.values()]):.3f}" for m in ms))
