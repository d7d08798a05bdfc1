"""probe_fits.py with the genes chosen by scanpy's seurat_v3 flavour (on the counts) instead of seurat (patched).

    HVG_FLAVOR=seurat_v3 python benchmarks/results/probes_2026-12-02/hvg_probe.py --sets ... --seeds 0
"""
import os, sys
import numpy as np
from pathlib import Path
BENCH = Path(__file__).resolve().parents[2]  # benchmarks/
sys.path.insert(0, str(BENCH))
import scanpy as sc
from schashformer import preprocess
FLAVOR = os.environ.get("HVG_FLAVOR", "seurat_v3")
CURRENT = {}
orig_prepare = preprocess.prepare
def prepare(adata, *a, **kw):
    n_top = kw.get("n_top_genes", preprocess.DEFAULT_N_TOP_GENES)
    if adata.n_vars > n_top and kw.get("stats") is None:
        tmp = adata.copy()
        sc.pp.filter_genes(tmp, min_cells=1)
        keep_names = tmp.var_names
        for span in (0.3, 0.5, 0.8):
            try:
                hv = sc.pp.highly_variable_genes(tmp, flavor=FLAVOR, n_top_genes=n_top, inplace=False, span=span)
                break
            except ValueError as e:
                print("# loess failed at span", span, e, flush=True)
        names = set(keep_names[hv["highly_variable"].to_numpy()])
        CURRENT["cols"] = np.flatnonzero([g in names for g in adata.var_names])
    else:
        CURRENT.pop("cols", None)
    return orig_prepare(adata, *a, **kw)
orig_select = preprocess.select_genes
def select_genes(sums, n_top_genes):
    return CURRENT["cols"] if "cols" in CURRENT else orig_select(sums, n_top_genes)
preprocess.prepare = prepare
preprocess.select_genes = select_genes
for mod in list(sys.modules.values()):
    if getattr(mod, "__name__", "").startswith("schashformer") and hasattr(mod, "prepare") and mod is not preprocess:
        if getattr(mod, "prepare") is orig_prepare:
            setattr(mod, "prepare", prepare)
print(f"# HVG flavour {FLAVOR}", flush=True)
sys.argv[0] = str(BENCH / "probe_fits.py")
import probe_fits
probe_fits.main()
