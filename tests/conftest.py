import importlib.util
from pathlib import Path
from types import ModuleType

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Small networks and few steps: tests check behaviour, benchmarks check quality at defaults.
# Behaviour checks in few steps: the ZINB-led defaults (contrastive weight 0.03, input noise ~2.5 sd)
# need their full step count, so short runs let the contrastive terms lead (weight 1, no noise).
# Quality at the defaults is asserted separately (test_model.fitted, test_quality, benchmarks).
FAST = dict(stage1_steps=40, stage2_pretrain_steps=40, stage2_cluster_steps=40, hidden=64, hash_latent=32,
            input_noise=0.0, w_contrastive=1.0, w_consistency=1.0,
            d_model=32, latent=8, kmeans_n_init=3, update_interval=20, stage1_batch=128)


def load_benchmark(name: str) -> ModuleType:
    """The script ``benchmarks/<name>.py`` as a module (the folder is not a package), for its tests."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not DATA.exists():
        pytest.skip(f"shared data not found at {DATA}")
    return DATA


def simulate_counts(n_cells=300, n_genes=200, n_types=3, seed=0, dispersion=5.0) -> ad.AnnData:
    """Negative binomial counts with type-specific marker genes and varying library sizes."""
    rng = np.random.default_rng(seed)
    types = rng.integers(n_types, size=n_cells)
    base = rng.gamma(1.0, 1.0, size=n_genes)
    means = np.tile(base, (n_types, 1))
    for t in range(n_types):
        markers = rng.choice(n_genes, n_genes // 10, replace=False)
        means[t, markers] *= 8.0
    library = rng.lognormal(0.0, 0.3, size=n_cells)
    mu = means[types] * library[:, None]
    counts = rng.negative_binomial(dispersion, dispersion / (dispersion + mu)).astype(np.float32)
    adata = ad.AnnData(sp.csr_matrix(counts))
    adata.obs_names = [f"c{i}" for i in range(n_cells)]
    adata.var_names = [f"g{j}" for j in range(n_genes)]
    adata.obs["label"] = pd.Categorical(types.astype(str))
    return adata


@pytest.fixture
def sim() -> ad.AnnData:
    return simulate_counts()


@pytest.hookimpl(tryfirst=True)  # before the -m selection reads the marks
def pytest_collection_modifyitems(items):
    """Tests on the shared real data train on it: they run in the full suite (``bash .ci/run --full``,
    what CI runs), not in the fast lane (``-m "not slow"``, the default of ``bash .ci/run``)."""
    for item in items:
        if "shared_data" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)
