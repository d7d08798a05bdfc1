import sys, glob, numpy as np, warnings
warnings.filterwarnings("ignore")
from sklearn.cluster import KMeans, AgglomerativeClustering
from sklearn.metrics import adjusted_rand_score as ari
from sklearn.neighbors import kneighbors_graph
from sklearn.preprocessing import normalize

def merge(z, lab, k, linkage):
    cents = np.stack([z[lab == c].mean(0) for c in range(lab.max() + 1)])
    ag = AgglomerativeClustering(k, linkage=linkage).fit(cents)
    return ag.labels_[lab]

def starts(z, k, seed):
    out = {}
    km = KMeans(k, n_init=20, random_state=seed).fit(z)
    out["km"] = km.labels_
    for m in (2, 3):
        kmm = KMeans(m * k, n_init=10, random_state=seed).fit(z).labels_
        for link in ("average", "complete", "single"):
            out[f"km{m}k+{link}"] = merge(z, kmm, k, link)
    out["ward"] = AgglomerativeClustering(k, linkage="ward").fit(z).labels_
    g = kneighbors_graph(z, 15, include_self=False)
    out["ward_knn"] = AgglomerativeClustering(k, linkage="ward", connectivity=g).fit(z).labels_
    out["km_cos"] = KMeans(k, n_init=20, random_state=seed).fit(normalize(z)).labels_
    zs = (z - z.mean(0)) / (z.std(0) + 1e-6)
    out["km_std"] = KMeans(k, n_init=20, random_state=seed).fit(zs).labels_
    for w in (0.5, 2.0):
        zw = z.copy(); zw[:, -20:] *= w
        out[f"km_pc{w}"] = KMeans(k, n_init=20, random_state=seed).fit(zw).labels_
    return out

rows = {}
for f in sorted(glob.glob(sys.argv[1] + "/*.npz")):
    d = np.load(f, allow_pickle=True)
    z, y, k = d["z"], d["labels"], int(d["k"])
    name = f.split("/")[-1][:-4]
    seed = int(name.rsplit("_", 1)[1])
    s = starts(z, k, seed)
    s["auto"] = d["start"]; s["final"] = d["final"]
    rows[name] = {m: ari(y, l) for m, l in s.items()}
    print(name, " ".join(f"{m}={v:.3f}" for m, v in rows[name].items()), flush=True)
methods = list(next(iter(rows.values())))
print("MEAN", " ".join(f"{m}={np.mean([r[m] for r in rows.values()]):.3f}" for m in methods))
