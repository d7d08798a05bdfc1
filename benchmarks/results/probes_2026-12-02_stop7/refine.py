"""Offline: refine the k-means start on the captured pre-trained z by a model with non-spherical clusters.

On the arrays of `probes_2026-12-02/capture_z.py` (z, the start partition, the final labels, the truth, K):
- lda_conf: linear discriminant analysis (one shared covariance) fitted on the most confident half of each start
  cluster (margin between the nearest and second-nearest centre), then predicting every cell (self-training);
- gmm_tied / gmm_diag: a Gaussian mixture (tied / diagonal covariances) started from the start partition;
- lda_iter: lda_conf repeated 3 times, each from the last labels.

    python benchmarks/results/probes_2026-12-02_stop7/refine.py /tmp/cap
"""
import glob
import sys

import numpy as np
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.metrics import adjusted_rand_score as ari
from sklearn.mixture import GaussianMixture


def centres(z, lab, k):
    return np.stack([z[lab == c].mean(0) if (lab == c).any() else z.mean(0) for c in range(k)])


def confident(z, lab, k, keep=0.5):
    d = ((z[:, None, :] - centres(z, lab, k)[None]) ** 2).sum(-1)
    d.sort(1)
    margin = d[:, 1] - d[:, 0]
    mask = np.zeros(len(z), bool)
    for c in range(k):
        idx = np.flatnonzero(lab == c)
        if len(idx):
            mask[idx[margin[idx] >= np.quantile(margin[idx], 1 - keep)]] = True
    return mask


def lda_conf(z, lab, k):
    m = confident(z, lab, k)
    if len(np.unique(lab[m])) < 2:
        return lab
    return LinearDiscriminantAnalysis().fit(z[m], lab[m]).predict(z)


def gmm(z, lab, k, cov):
    means = centres(z, lab, k)
    g = GaussianMixture(k, covariance_type=cov, means_init=means, random_state=0, max_iter=100, reg_covar=1e-4)
    return g.fit(z).predict(z)


def main(folder):
    rows = []
    for f in sorted(glob.glob(f"{folder}/*.npz")):
        d = np.load(f, allow_pickle=True)
        if "labels" not in d:
            continue
        z, start, truth, k = d["z"].astype(np.float64), d["start"], np.asarray(d["labels"]).astype(str), int(d["k"])
        once = lda_conf(z, start, k)
        iter3 = once
        for _ in range(2):  # rounds 2 and 3; the first is `once`
            iter3 = lda_conf(z, iter3, k)
        r = dict(start=ari(truth, start), final=ari(truth, d["final"]), lda_conf=ari(truth, once),
                 lda_iter=ari(truth, iter3), gmm_tied=ari(truth, gmm(z, start, k, "tied")),
                 gmm_diag=ari(truth, gmm(z, start, k, "diag")))
        rows.append(r)
        print(f.split("/")[-1][:-4].ljust(36), " ".join(f"{n} {v:.3f}" for n, v in r.items()), flush=True)
    print("mean".ljust(36), " ".join(f"{n} {np.mean([r[n] for r in rows]):.3f}" for n in rows[0]))


main(sys.argv[1])
