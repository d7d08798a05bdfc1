import glob, sys, numpy as np
from sklearn.neighbors import NearestNeighbors
from sklearn.metrics import adjusted_rand_score as ari
rows = {}
for f in sorted(glob.glob(sys.argv[1] + "/*.npz")):
    d = np.load(f, allow_pickle=True)
    z, y, lab = d["z"], d["labels"], d["final"].copy()
    name = f.split("/")[-1][:-4]
    _, nn = NearestNeighbors(n_neighbors=16).fit(z).kneighbors(z)
    r = {"final": ari(y, lab)}
    k = lab.max() + 1
    cur = lab.copy()
    for it in range(1, 4):
        votes = np.zeros((len(z), k)); np.add.at(votes, (np.repeat(np.arange(len(z)), 16), cur[nn].ravel()), 1)
        cur = votes.argmax(1)
        r[f"smooth{it}"] = ari(y, cur)
    rows[name] = r
    print(name, " ".join(f"{a}={v:.3f}" for a, v in r.items()))
ms = list(next(iter(rows.values())))
print("MEAN", " ".join(f"{m}={np.mean([r[m] for r in rows.values()]):.4f}" for m in ms))
