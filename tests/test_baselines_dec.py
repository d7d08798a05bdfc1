"""The DEC / scDeepCluster-style baseline and the ablation switches used by benchmarks/quality.py."""

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from schashformer import SCHashFormer
from schashformer.baselines import ZINBDEC
from schashformer.data import CellData
from schashformer.errors import ParameterError
from schashformer.nn import LSHIndexer, NeighbourhoodEncoder
from schashformer.nn.local_attention import LocalAttention
from schashformer.preprocess import prepare
from schashformer.engine import hashing_phase, run_phase
from schashformer.train import TrainConfig
from tests.conftest import FAST, simulate_counts

# Few steps: mild input noise (the default sd 2.5 needs the full step count, as for scHashFormer
# in conftest.FAST).
DEC_FAST = dict(pretrain_steps=150, cluster_steps=60, noise_sd=0.5, batch_size=128, update_interval=20, kmeans_n_init=3,
                hidden=(64, 32), latent=8, decoder_hidden=64)


def test_dec_recovers_simulated_types():
    adata = simulate_counts(n_cells=300, n_genes=200, n_types=3, seed=0)
    model = ZINBDEC(3, seed=0, **DEC_FAST).fit(adata)
    y = adata.obs["label"]
    assert model.labels_.shape == (300,) and model.embedding_.shape == (300, 8)
    assert adjusted_rand_score(y, model.kmeans_labels_) > 0.9
    assert adjusted_rand_score(y, model.labels_) > 0.9
    # predict on the training cells = argmax q of the final embedding = labels_
    assert np.array_equal(model.predict(adata), model.labels_)
    assert np.allclose(model.transform(adata), model.embedding_, atol=1e-5)
    assert {h["phase"] for h in model.history_} == {"pretrain", "cluster"}


def test_dec_same_seed_same_labels_and_bad_k():
    adata = simulate_counts(n_cells=150, n_genes=100, seed=3)
    fast = {**DEC_FAST, "pretrain_steps": 20, "cluster_steps": 20}
    a = ZINBDEC(3, seed=5, **fast).fit_predict(adata)
    b = ZINBDEC(3, seed=5, **fast).fit_predict(adata)
    assert np.array_equal(a, b)
    with pytest.raises(ParameterError, match="n_clusters"):
        ZINBDEC(1)


def test_encoder_without_attention_ignores_context():
    """attention=False: a query's z depends on its own token only, and attention is never computed."""
    torch.manual_seed(0)
    enc = NeighbourhoodEncoder(12, d_model=16, n_heads=2, n_latent=12, dropout=0.0, token_residual=True,
                               attention=False).eval()
    x = torch.randn(4, 8, 12)
    mask = torch.ones(4, 8, dtype=torch.bool)
    other = x.clone()
    other[:, :4] = torch.randn(4, 4, 12)  # new context (previous chunk), same queries
    z1, z2 = enc(x, mask, n_query=4), enc(other, mask, n_query=4)
    assert z1.shape == (4, 4, 12) and torch.equal(z1, z2)
    assert enc.max_scores_numel == 0
    # the same module with attention does look at the context
    enc.attention = True
    with torch.no_grad():
        enc.to_latent[1].weight.normal_()  # token_residual starts the update at zero: make it visible
    assert not torch.allclose(enc(x, mask, n_query=4), enc(other, mask, n_query=4))
    assert enc.max_scores_numel > 0


def test_fit_without_attention_never_calls_it(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("attention called with attention=False")

    monkeypatch.setattr(LocalAttention, "forward", forbidden)
    adata = simulate_counts(n_cells=200, seed=4)
    model = SCHashFormer(3, seed=0, progress=False, **{**FAST, "attention": False}).fit(adata)
    assert model.max_attention_elements_ == 0 and np.isfinite(model.embedding_).all()
    assert model.labels_.shape == (200,)


@pytest.mark.parametrize("w_zinb, w_contrastive", [(0.0, 1.0), (1.0, 0.0), (1.0, 1.0)])
def test_stage1_loss_weights(w_zinb, w_contrastive):
    """w_zinb = 0 drops the ZINB term (the decoder is never updated); w_contrastive = 0 drops InfoNCE."""
    prep = prepare(simulate_counts(n_cells=120, n_genes=100, seed=5))
    data = CellData(prep)
    torch.manual_seed(0)
    indexer = LSHIndexer(prep.n_genes, 32, 16, 2, 4)
    before = {k: v.clone() for k, v in indexer.decoder.state_dict().items()}
    cfg = TrainConfig(stage1_steps=11, stage1_batch=64, w_zinb=w_zinb, w_contrastive=w_contrastive)
    history = []
    run_phase(hashing_phase(indexer, data, cfg, np.random.default_rng(0)), history, cfg, progress=False)
    for h in history:
        expected = (w_zinb * h["zinb"] + w_contrastive * h["contrastive"] + cfg.w_balance * h["balance"]
                    + cfg.w_quantisation * h["quantisation"])
        assert h["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    decoder_moved = any(not torch.equal(before[k], v) for k, v in indexer.decoder.state_dict().items())
    assert decoder_moved == (w_zinb > 0)


def test_ablation_flags_default_and_validated():
    cfg = TrainConfig()
    assert cfg.attention is True and cfg.w_zinb == 1.0
    with pytest.raises(ParameterError, match="w_zinb"):  # checked when fit starts (the constructor only stores)
        SCHashFormer(3, w_zinb=-1.0).check_params()
    with pytest.raises(ParameterError, match="attention"):
        SCHashFormer(3, attention="no").check_params()
