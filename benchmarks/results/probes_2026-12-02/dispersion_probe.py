"""probe_fits.py with a per-gene ZINB dispersion (scVI's dispersion='gene') in every decoder (patched from outside)."""
import sys
import torch, torch.nn.functional as F
from torch import nn
from pathlib import Path
BENCH = Path(__file__).resolve().parents[2]  # benchmarks/
sys.path.insert(0, str(BENCH))
from schashformer.nn import zinb
Z = zinb.ZINBDecoder
orig_init = Z.__init__
def init(self, *a, **kw):
    orig_init(self, *a, **kw)  # the same random draws as the default decoder; the cell-wise layer is then dropped
    n_genes = self.mean.out_features
    del self.dispersion
    self.dispersion_gene = nn.Parameter(torch.zeros(n_genes))
def forward(self, z, size_factors, batch_onehot=None, genes=None):
    if self.n_batches:
        z = torch.cat([z, batch_onehot], dim=1)
    h = self.body(z)
    def out(layer):
        if genes is None:
            return layer(h).float()
        return F.linear(h, layer.weight[genes], layer.bias[genes]).float()
    mu = torch.exp(out(self.mean).clamp(-12.0, 12.0)) * size_factors[:, None]
    p = self.dispersion_gene if genes is None else self.dispersion_gene[genes]
    theta = F.softplus(p).clamp(zinb._THETA_MIN, zinb._THETA_MAX).expand(len(h), -1)
    return mu, theta, out(self.dropout_logit)
Z.__init__, Z.forward = init, forward
print("# per-gene dispersion", flush=True)
sys.argv[0] = str(BENCH / "probe_fits.py")
import probe_fits
probe_fits.main()
