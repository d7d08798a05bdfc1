"""probe_fits.py with the count likelihood or the clustering head's kernel changed (patched from outside the
package).

Env PROBE_NB=1: a negative binomial instead of the ZINB in both stages. The decoder's dropout logit is replaced
by -30 (pi = 1e-13), so log(pi + (1 - pi) NB(0)) = log NB(0) and log(1 - pi) = 0 to float32 precision; the
dropout layer gets no gradient. Why: on UMI counts the NB alone often fits the zeros (Svensson 2020,
"Droplet scRNA-seq is not zero-inflated"), and a zero-inflation that explains a zero away as a dropout can
hide a marker's absence from the embedding.
Env PROBE_ALPHA=a: the Student-t degrees of freedom of the DEC head (DEC's 1; larger a is closer to a
Gaussian kernel, so far cells weigh less in q and the target is sharper around each centre).

    PROBE_NB=1 python results/probes_2026-12-02_stop8/likelihood_head_probe.py --sets all --seeds 0
    PROBE_ALPHA=10 python results/probes_2026-12-02_stop8/likelihood_head_probe.py --sets all --seeds 0
"""
import os
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[2]  # benchmarks/
sys.path.insert(0, str(BENCH))
from schashformer.nn import cluster_head, zinb

NO_DROPOUT_LOGIT = -30.0

if os.environ.get("PROBE_NB") == "1":
    zinb_forward = zinb.ZINBDecoder.forward

    def nb_forward(self, *args, **kwargs):
        mu, theta, pi_logit = zinb_forward(self, *args, **kwargs)
        return mu, theta, torch.full_like(pi_logit, NO_DROPOUT_LOGIT)

    zinb.ZINBDecoder.forward = nb_forward

if "PROBE_ALPHA" in os.environ:
    head_init = cluster_head.ClusterHead.__init__

    def head_init_alpha(self, n_clusters, n_latent, alpha=1.0):
        head_init(self, n_clusters, n_latent, alpha=float(os.environ["PROBE_ALPHA"]))

    cluster_head.ClusterHead.__init__ = head_init_alpha

print(f"# likelihood: {'NB' if os.environ.get('PROBE_NB') == '1' else 'ZINB'}; "
      f"head alpha {os.environ.get('PROBE_ALPHA', '1 (default)')}", flush=True)
sys.argv[0] = str(BENCH / "probe_fits.py")
import probe_fits  # noqa: E402

probe_fits.main()
