"""probe_fits.py with another default n_top_genes (N_TOP env)."""
import os, sys
from pathlib import Path
BENCH = Path(__file__).resolve().parents[2]  # benchmarks/
sys.path.insert(0, str(BENCH))
from schashformer import SCHashFormer
SCHashFormer.__init__.__kwdefaults__["n_top_genes"] = int(os.environ["N_TOP"])
print("# n_top_genes", os.environ["N_TOP"], flush=True)
sys.argv[0] = str(BENCH / "probe_fits.py")
import probe_fits
probe_fits.main()
