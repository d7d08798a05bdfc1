import sys, glob, numpy as np, warnings
warnings.filterwarnings("ignore")
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score as ari, silhouette_score

def spread_merge(z, lab, k, mode):
    groups = {c: np.flatnonzero(lab == c) for c in range(lab.max() + 1)}
    while len(groups) > k:
        keys = list(groups)
        stats = {c: (z[i].mean(0), ((z[i] - z[i].mean(0)) ** 2).sum(1).mean(), len(i)) for c, i in groups.items()}
        best, pair = np.inf, None
        for ii, a in enumerate(keys):
            for b in keys[ii + 1:]:
                ca, sa, na = stats[a]; cb, sb, nb = stats[b]
                d2 = ((ca - cb) ** 2).sum()
                s = d2 / (sa + sb) if mode == "spread" else d2
                if s < best:
                    best, pair = s, (a, b)
        a, b = pair
        groups[a] = np.concatenate([groups[a], groups.pop(b)])
    out = np.empty(len(lab), int)
    for new, idx in enumerate(groups.values()):
        out[idx] = new
    return out

rows = {}
for f in sorted(glob.glob(sys.argv[1] + "/*.npz")):
    d = np.load(f, allow_pickle=True)
    z, y, k = d["z"], d["labels"], int(d["k"])
    name = f.split("/")[-1][:-4]; seed = int(name.rsplit("_", 1)[1])
    km = KMeans(k, n_init=20, random_state=seed).fit(z).labels_
    r = {"km": ari(y, km)}
    sil = {"km": silhouette_score(z, km)}
    for m in (1.5, 2, 3):
        lab = KMeans(int(round(m * k)), n_init=10, random_state=seed).fit(z).labels_
        for mode in ("spread", "centroid"):
            l2 = spread_merge(z, lab, k, mode)
            r[f"{m}{mode}"] = ari(y, l2); sil[f"{m}{mode}"] = silhouette_score(z, l2)
    r["final"] = ari(y, d["final"])
    rows[name] = r
    print(name, " ".join(f"{a}={v:.3f}" + (f"/{sil[a]:.2f}" if a in sil else "") for a, v in r.items()), flush=True)
methods = list(next(iter(rows.values())))
print("MEAN", " ".join(f"{m}={np.mean([r[m] for r in rows.values()]):.3f}" for m in methods))
