"""probe_fits.py with the stage-1 encoder fed centred log-normalised expression, not standardised (patched
from outside the package).

The package standardises every gene (unit variance, clipped at +-10) before the encoder, as scanpy does
before its PCA; scVI and DCA feed unscaled expression, where a gene weighs by its own variance. Here the
encoder (stage 1, hashing, the stage-2 tokens' hidden part) sees x - mean, times one constant (the inverse
of the mean gene sd, so the input keeps about the same overall scale); the tokens' principal-component part
is unchanged.

    python benchmarks/results/probes_2026-12-02_stop6/input_probe.py --sets all --seeds 0
"""
import sys
from pathlib import Path

import numpy as np
import torch

BENCH = Path(__file__).resolve().parents[2]  # benchmarks/
sys.path.insert(0, str(BENCH))
from schashformer import data as data_module


def inputs(self, rows):
    prep = self.prepared
    x = prep.centred(rows) / np.float32(prep.stats.std.mean())
    return torch.from_numpy(np.clip(x, -10, 10, out=x)).to(self.device)


data_module.CellData.inputs = inputs
print("# stage-1 input: centred log-normalised expression / mean gene sd (not standardised)", flush=True)
sys.argv[0] = str(BENCH / "probe_fits.py")
import probe_fits
probe_fits.main()
