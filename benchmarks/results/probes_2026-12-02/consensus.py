import glob, sys, numpy as np, warnings
warnings.filterwarnings("ignore")
from sklearn.cluster import KMeans, AgglomerativeClustering
from sklearn.metrics import adjusted_rand_score as ari
rows = {}
for f in sorted(glob.glob(sys.argv[1] + "/*.npz")):
    d = np.load(f, allow_pickle=True)
    z, y, k = d["z"], d["labels"], int(d["k"])
    name = f.split("/")[-1][:-4]; seed = int(name.rsplit("_", 1)[1])
    km = lambda x, kk=k, s=seed: KMeans(kk, n_init=10, random_state=s).fit(x).labels_
    zs = (z - z.mean(0)) / (z.std(0) + 1e-6)
    members = {"z": km(z), "hid": km(z[:, :-20]), "pc": km(z[:, -20:]), "zstd": km(zs),
               "ward": AgglomerativeClustering(k, linkage="ward").fit(z).labels_}
    r = {m: ari(y, l) for m, l in members.items()}
    for combo in (("z", "hid", "pc"), ("z", "hid", "pc", "zstd", "ward"), ("z", "zstd", "ward")):
        onehot = np.concatenate([np.eye(members[m].max() + 1)[members[m]] for m in combo], 1)
        co = onehot @ onehot.T / len(combo)  # co-association
        lab = AgglomerativeClustering(k, metric="precomputed", linkage="average").fit(1 - co).labels_
        r["co:" + "+".join(combo)] = ari(y, lab)
        r["ohkm:" + "+".join(combo)] = ari(y, km(onehot))
    r["final"] = ari(y, d["final"])
    rows[name] = r
    print(name, " ".join(f"{a}={v:.3f}" for a, v in r.items()), flush=True)
ms = list(next(iter(rows.values())))
print("MEAN", " ".join(f"{m}={np.mean([r[m] for r in rows.values()]):.4f}" for m in ms))
