"""probe_fits.py with another target bucket size: b = round(log2(cells / CELLS_PER_BUCKET)) hash bits per head,
clipped to [4, 16], instead of the package's log2(cells / 16) (patched from outside the package).

The bits set how many cells share a bucket: the stage-1 contrastive positives (same-bucket cells), the bit
balance target and the sort order that stage 2 cuts into chunks. The rule dates from the first three sets and had
not been screened on the suite.

    CELLS_PER_BUCKET=8 python results/probes_2026-12-02_stop8/bucket_size_probe.py --sets all --seeds 0
"""
import math
import os
import sys
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parents[2]  # benchmarks/
sys.path.insert(0, str(BENCH))
from schashformer.train import TrainConfig

CELLS_PER_BUCKET = float(os.environ.get("CELLS_PER_BUCKET", "16"))


def bits_for(self, n_cells: int) -> int:
    if self.hash_bits is not None:
        return self.hash_bits
    return int(np.clip(round(math.log2(max(n_cells, 2) / CELLS_PER_BUCKET)), 4, 16))


TrainConfig.bits_for = bits_for
print(f"# hash bits: round(log2(cells / {CELLS_PER_BUCKET:g}))", flush=True)
sys.argv[0] = str(BENCH / "probe_fits.py")
import probe_fits  # noqa: E402

probe_fits.main()
