import sys, glob, numpy as np, warnings, scipy.sparse as sp
warnings.filterwarnings("ignore")
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score as ari
from sklearn.neighbors import kneighbors_graph

def greedy_merge(lab, g, k, mode):
    n = lab.max() + 1
    M = sp.csr_matrix((np.ones(len(lab)), (np.arange(len(lab)), lab)), shape=(len(lab), n))
    E = (M.T @ g @ M).toarray()  # edge weights between clusters
    two_m = E.sum()
    groups = {i: [i] for i in range(n)}
    while len(groups) > k:
        keys = list(groups)
        best, pair = -np.inf, None
        for ii, a in enumerate(keys):
            for b in keys[ii + 1:]:
                vol_a, vol_b = E[a].sum(), E[b].sum()
                if mode == "mod":
                    s = 2 * (E[a, b] / two_m - (vol_a / two_m) * (vol_b / two_m))
                elif mode == "ratio":  # edges relative to the expected under random wiring (PAGA-like)
                    s = E[a, b] / (vol_a * vol_b / two_m)
                elif mode == "minvol":
                    s = E[a, b] / min(vol_a, vol_b)
                if s > best:
                    best, pair = s, (a, b)
        a, b = pair
        E[a] += E[b]; E[:, a] += E[:, b]; E[b] = 0; E[:, b] = 0
        groups[a] += groups.pop(b)
    out = np.empty(n, int)
    for new, (key, members) in enumerate(groups.items()):
        out[members] = new
    return out[lab]

rows = {}
for f in sorted(glob.glob(sys.argv[1] + "/*.npz")):
    d = np.load(f, allow_pickle=True)
    z, y, k = d["z"], d["labels"], int(d["k"])
    name = f.split("/")[-1][:-4]; seed = int(name.rsplit("_", 1)[1])
    g = kneighbors_graph(z, 15, include_self=False); g = ((g + g.T) > 0).astype(float)
    r = {"km": ari(y, KMeans(k, n_init=20, random_state=seed).fit(z).labels_)}
    for m in (1.5, 2, 3):
        lab = KMeans(int(round(m * k)), n_init=10, random_state=seed).fit(z).labels_
        for mode in ("mod", "ratio", "minvol"):
            r[f"{m}{mode}"] = ari(y, greedy_merge(lab, g, k, mode))
    r["final"] = ari(y, d["final"])
    rows[name] = r
    print(name, " ".join(f"{a}={v:.3f}" for a, v in r.items()), flush=True)
methods = list(next(iter(rows.values())))
print("MEAN", " ".join(f"{m}={np.mean([r[m] for r in rows.values()]):.3f}" for m in methods))
