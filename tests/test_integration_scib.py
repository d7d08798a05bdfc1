"""The hand-written integration scores (schashformer.integration) against scib-metrics' implementations.

The silhouettes agree to float precision. iLISI and kBET agree to a few hundredths, not exactly:
scib-metrics calibrates the LISI kernel on its own neighbour lists and kBET picks a neighbourhood
size per cell type, where ours uses fixed sizes (90 neighbours, perplexity 30; 25 neighbours).
"""

import numpy as np
import pytest
from sklearn.neighbors import NearestNeighbors

from schashformer import integration

sm = pytest.importorskip("scib_metrics")
from scib_metrics.nearest_neighbors import NeighborsResults  # noqa: E402


def _data(shift: float, seed: int = 0, n: int = 900):
    """3 cell types x 2 batches in 10 dimensions; ``shift`` moves batch 1 away from batch 0."""
    rng = np.random.default_rng(seed)
    labels, batches = rng.integers(3, size=n), rng.integers(2, size=n)
    centres = rng.normal(scale=4, size=(3, 10))
    emb = (centres[labels] + rng.normal(size=(n, 10)) + shift * batches[:, None]).astype(np.float32)
    return emb, labels, batches


def _neighbours(emb, k):
    d, i = NearestNeighbors(n_neighbors=k + 1).fit(emb).kneighbors(emb)  # self first, as scib-metrics expects
    return NeighborsResults(indices=i, distances=d)


@pytest.mark.parametrize("shift", [0.0, 1.5])
def test_scores_agree_with_scib_metrics(shift):
    emb, labels, batches = _data(shift)
    np.testing.assert_allclose(integration.label_asw(emb, labels), sm.silhouette_label(emb, labels), atol=1e-5)
    np.testing.assert_allclose(integration.batch_asw(emb, batches, labels), sm.silhouette_batch(emb, labels, batches),
                               atol=1e-5)
    nn90 = _neighbours(emb, 90)
    assert abs(integration.ilisi(emb, batches) - sm.ilisi_knn(nn90, batches, perplexity=30)) < 0.03
    assert abs(integration.clisi(emb, labels) - sm.clisi_knn(nn90, labels, perplexity=30)) < 0.01
    assert abs(integration.kbet_acceptance(emb, batches, labels) - sm.kbet_per_label(_neighbours(emb, 50), batches,
                                                                                      labels)) < 0.05


def test_both_rank_mixed_above_separated_batches():
    (e0, lab0, b0), (e1, lab1, b1) = _data(0.0), _data(1.5)
    assert integration.ilisi(e0, b0) > integration.ilisi(e1, b1) + 0.5
    assert sm.ilisi_knn(_neighbours(e0, 90), b0, perplexity=30) > sm.ilisi_knn(_neighbours(e1, 90), b1, perplexity=30) + 0.5
    assert integration.kbet_acceptance(e0, b0, lab0) > integration.kbet_acceptance(e1, b1, lab1) + 0.5
    assert sm.kbet_per_label(_neighbours(e0, 50), b0, lab0) > sm.kbet_per_label(_neighbours(e1, 50), b1, lab1) + 0.5
