import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from schashformer import SCHashFormer, buckets
from schashformer.errors import InputError, ParameterError
from schashformer.nn import zinb_nll
from tests.conftest import FAST, simulate_counts


@pytest.fixture(scope="module")
def fitted():
    adata = simulate_counts(n_cells=400, n_genes=200, n_types=3, seed=1)
    # Default training: the quality assertion below is about the defaults, not a shortened run.
    model = SCHashFormer(3, seed=0, progress=False).fit(adata, labels_key="label")
    return adata, model


def test_recovers_simulated_types(fitted):
    adata, model = fitted
    assert model.labels_.shape == (400,) and model.embedding_.shape == (400, model.config.hash_latent + model.config.token_pcs)
    assert np.isfinite(model.embedding_).all()
    assert adjusted_rand_score(adata.obs["label"], model.labels_) > 0.9


def test_bucket_stats_reported(fitted):
    _, model = fitted
    assert len(model.bucket_stats_) == model.config.hash_heads
    for s in model.bucket_stats_:
        assert 1 <= s["n_buckets"] <= 400 and 0 <= s["purity"] <= 1 and s["size_max"] >= s["size_median"]
    assert set(model.timings_) == {"preprocess", "stage1_hashing", "stage2_encoder", "stage2_clustering", "inference"}


def test_attention_never_grows_with_cells():
    """The no-N^2 property: the largest attention tensor depends on the chunk layout only."""
    sizes = {}
    for n in (800, 3200):
        m = SCHashFormer(3, seed=0, progress=False, **{**FAST, "infer_batch": 256}).fit(simulate_counts(n_cells=n, seed=2))
        cfg = m.config
        sizes[n] = m.max_attention_elements_
        # chunks x heads x C queries x 2C keys (own chunk + previous chunk), C = chunk_size
        bound = max(cfg.chunks_per_batch, cfg.infer_batch // cfg.chunk_size) * cfg.attn_heads * 2 * cfg.chunk_size**2
        assert sizes[n] == bound
    assert sizes[3200] == sizes[800]


def test_chunk_layout_is_sort_and_chunk():
    codes = np.array([3, 1, 3, 0, 1, 2, 3])
    order = buckets.sort_order(codes, np.zeros(7))
    assert list(codes[order]) == sorted(codes)
    chunks = buckets.chunk_index(order, 3)
    assert chunks.shape == (3, 3) and chunks[-1, -1] == -1 and sorted(chunks[chunks >= 0]) == list(range(7))
    tokens = buckets.with_lookback(chunks, np.array([0, 2]))
    assert (tokens[0, :3] == -1).all() and list(tokens[1, :3]) == list(chunks[1])


def test_same_seed_same_labels():
    adata = simulate_counts(n_cells=200, seed=4)
    a = SCHashFormer(3, seed=7, progress=False, **FAST).fit_predict(adata)
    b = SCHashFormer(3, seed=7, progress=False, **FAST).fit_predict(adata)
    assert np.array_equal(a, b)


def test_save_load_predict(fitted, tmp_path):
    adata, model = fitted
    model.save(tmp_path / "m")
    with pytest.raises(Exception, match="already exists"):
        model.save(tmp_path / "m")
    loaded = SCHashFormer.load(tmp_path / "m", device="cpu")
    assert np.allclose(loaded.transform(adata), model.transform(adata), atol=1e-5)
    assert np.array_equal(loaded.predict(adata), model.predict(adata))
    assert adjusted_rand_score(model.labels_, model.predict(adata)) > 0.9


def test_predict_new_cells(fitted):
    _, model = fitted
    new = simulate_counts(n_cells=150, n_genes=200, n_types=3, seed=1)[:150]
    assert model.predict(new).shape == (150,) and model.transform(new).shape == (150, model.encoder_.n_latent)


def test_bad_parameters(sim):
    with pytest.raises(ParameterError, match="n_clusters"):
        SCHashFormer(1, progress=False, **FAST).fit(sim)
    with pytest.raises(ParameterError, match="larger than the number of cells"):
        SCHashFormer(301, progress=False, **FAST).fit(sim)
    with pytest.raises(ParameterError, match="unknown parameter"):
        SCHashFormer.from_params({"n_clusters": 3, "not_a_param": 1})
    with pytest.raises(TypeError, match="not_a_param"):  # the constructor itself: Python's own error
        SCHashFormer(3, not_a_param=1)
    with pytest.raises(InputError, match="batch_key 'nope'"):
        SCHashFormer(3, progress=False, **FAST).fit(sim, batch_key="nope")
    with pytest.raises(ParameterError, match="not fitted"):
        SCHashFormer(3).predict(sim)
    if not torch.cuda.is_available():
        with pytest.raises(ParameterError, match="no CUDA GPU"):
            SCHashFormer(3, device="cuda", progress=False, **FAST).fit(sim)


def test_batch_covariate(sim):
    sim.obs["batch"] = np.where(np.arange(sim.n_obs) % 2, "a", "b")
    model = SCHashFormer(3, seed=0, progress=False, **FAST).fit(sim, batch_key="batch")
    assert model.batch_categories_ == ["a", "b"] and adjusted_rand_score(sim.obs["label"], model.labels_) > 0.8


def test_zinb_is_finite_for_extreme_values():
    x = torch.tensor([[0.0, 1.0, 1e5]])
    mu = torch.tensor([[1e-8, 1e6, 1e-3]])
    nll = zinb_nll(x, mu, torch.full_like(mu, 1e-4), torch.tensor([[50.0, -50.0, 0.0]]))
    assert torch.isfinite(nll)


def test_zinb_matches_the_textbook_likelihood():
    """The sparse evaluation of the gamma terms gives the ZINB likelihood computed densely by scipy."""
    from scipy import stats

    rng = np.random.default_rng(0)
    x = rng.poisson(rng.random((40, 30)) ** 4 * 5).astype(np.float64)
    mu, theta, logit = rng.gamma(2.0, 1.0, x.shape), rng.gamma(2.0, 1.0, x.shape), rng.normal(size=x.shape)
    pi = 1 / (1 + np.exp(-logit))
    nb = stats.nbinom.pmf(x, theta, theta / (theta + mu))
    expected = -np.log(np.where(x == 0, pi + (1 - pi) * nb, (1 - pi) * nb)).mean()
    as_t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    got = zinb_nll(as_t(x), as_t(mu), as_t(theta), as_t(logit)).item()
    assert (x == 0).mean() > 0.3 and (x > 0).mean() > 0.1
    assert got == pytest.approx(expected, rel=1e-6)


def test_zinb_gradients_match_autograd():
    """The hand-written backward of zinb_nll gives autograd's gradients, extreme values included."""
    from schashformer.nn.zinb import _zinb_nll_autograd

    rng = np.random.default_rng(1)
    shape = (30, 40)
    x = torch.tensor(rng.poisson(rng.random(shape) ** 3 * 8), dtype=torch.float64)
    mu = rng.gamma(2.0, 1.0, shape) * np.where(rng.random(shape) < 0.1, 1e-7, 1.0)
    theta = np.where(rng.random(shape) < 0.1, 1e-4, rng.gamma(2.0, 1.0, shape))
    logit = rng.normal(size=shape) * 10  # beyond softplus's linear threshold (20) for some entries
    leaves = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (mu, theta, logit)]
    ours = zinb_nll(x, *leaves)
    ref = _zinb_nll_autograd(x, *leaves)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-12)
    # gradients are ~1e-3 here; autograd's softplus is exactly linear past 20, ours off by exp(-20) relative
    for got, want in zip(torch.autograd.grad(ours * 3.0, leaves), torch.autograd.grad(ref * 3.0, leaves)):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-10)
    # transposed (non-contiguous) inputs give the transposed gradients
    t_leaves = [leaf.detach().T.requires_grad_() for leaf in leaves]
    for got, want in zip(torch.autograd.grad(zinb_nll(x.T, *t_leaves), t_leaves),
                         torch.autograd.grad(_zinb_nll_autograd(x, *leaves), leaves)):
        torch.testing.assert_close(got, want.T, rtol=1e-7, atol=1e-10)
    benign = [torch.tensor(rng.gamma(2.0, 1.0, (6, 5)), requires_grad=True),
              torch.tensor(rng.gamma(2.0, 1.0, (6, 5)), requires_grad=True),
              torch.tensor(rng.normal(size=(6, 5)), requires_grad=True)]
    counts = torch.tensor(rng.poisson(1.0, (6, 5)), dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda m, t, p: zinb_nll(counts, m, t, p), benign)


def test_hash_knn_graph_links_similar_cells():
    rng = np.random.default_rng(0)
    types = np.repeat(np.arange(4), 100)
    z = rng.normal(size=(400, 8)) * 0.1 + types[:, None] * 3.0
    order = np.argsort(z[:, 0] + rng.normal(size=400) * 0.01)
    graph = buckets.hash_knn_graph(z, [order, rng.permutation(400)], chunk_size=16, n_neighbors=10)
    assert graph.shape == (400, 400) and (graph != graph.T).nnz == 0 and graph.diagonal().sum() == 0
    rows, cols = graph.nonzero()
    assert (types[rows] == types[cols]).mean() > 0.95
    assert graph.getnnz(axis=1).min() >= 10


def test_leiden_init_option(sim):
    model = SCHashFormer(3, seed=0, progress=False, init="leiden", **FAST).fit(sim)
    assert adjusted_rand_score(sim.obs["label"], model.labels_) > 0.8
    with pytest.raises(ParameterError, match="init must be"):
        SCHashFormer(3, init="spectral").fit(sim)


def test_input_pcs_projection_saved_and_loaded(tmp_path):
    adata = simulate_counts(n_cells=200, n_genes=120, seed=7)
    model = SCHashFormer(3, seed=0, progress=False, input_pcs=10, **FAST).fit(adata)
    assert tuple(model.indexer_.projection.shape) == (len(model.stats_.genes), 10)
    model.save(tmp_path / "m")
    loaded = SCHashFormer.load(tmp_path / "m", device="cpu")
    assert torch.equal(loaded.indexer_.projection, model.indexer_.projection)
    assert np.allclose(loaded.transform(adata), model.transform(adata), atol=1e-5)


def test_token_residual_starts_from_the_stage1_token():
    """With token_residual, z equals the query's own token before training and moves only by learning."""
    from schashformer.nn import NeighbourhoodEncoder

    torch.manual_seed(0)
    enc = NeighbourhoodEncoder(8, d_model=16, n_heads=2, n_latent=8, dropout=0.0, token_residual=True).eval()
    x = torch.randn(3, 10, 8)
    mask = torch.ones(3, 10, dtype=torch.bool)
    assert torch.equal(enc(x, mask, n_query=5), x[:, -5:])
    with pytest.raises(ValueError, match="n_latent == input size"):
        NeighbourhoodEncoder(8, n_latent=4, token_residual=True)


def test_token_pcs_tokens_saved_and_loaded(tmp_path):
    """Stage-2 tokens = hidden + scaled principal components; z has the token's width; round trip."""
    adata = simulate_counts(n_cells=200, n_genes=120, seed=8)
    params = {**FAST, "token_pcs": 6, "token_residual": True}
    model = SCHashFormer(3, seed=0, progress=False, **params).fit(adata)
    assert model.token_axes_.shape == (len(model.stats_.genes), 6)
    assert model.embedding_.shape == (200, model.config.hash_latent + 6)
    model.save(tmp_path / "m")
    loaded = SCHashFormer.load(tmp_path / "m", device="cpu")
    assert loaded.token_scale_ == model.token_scale_
    assert np.allclose(loaded.transform(adata), model.transform(adata), atol=1e-5)
    assert (loaded.predict(adata) == model.predict(adata)).all()


def test_stage1_noise_is_relative_to_the_mean_absolute_input(sim):
    """The view noise sd is input_noise x mean |standardised input|, over every cell (row chunks)."""
    from schashformer.data import CellData
    from schashformer.preprocess import prepare
    from schashformer.engine import abs_input_sum, view_noise_sd
    from schashformer.train import TrainConfig

    prep = prepare(sim, n_top_genes=100)
    data = CellData(prep)
    dense = np.abs(prep.standardised(np.arange(prep.n_cells)))
    total, n = abs_input_sum(data, chunk=64)  # 300 cells: several chunks and a short last one
    assert n == dense.size and total == pytest.approx(float(dense.sum(dtype=np.float64)), rel=1e-6)
    assert view_noise_sd(data, TrainConfig(input_noise=1.0)) == pytest.approx(float(dense.mean()), rel=1e-6)
    # a shallower copy of the same cells (a tenth of the counts) has more zeros: smaller mean |input|
    shallow = sim.copy()
    shallow.X = sp.csr_matrix(np.random.default_rng(0).binomial(sim.X.toarray().astype(np.int64), 0.1).astype(np.float32))
    assert view_noise_sd(CellData(prepare(shallow, n_top_genes=100)), TrainConfig(input_noise=1.0)) < view_noise_sd(data, TrainConfig(input_noise=1.0))


def test_stage1_views_mask_then_add_noise_and_split_the_batch_across_processes():
    """Each view keeps an entry with probability keep and adds the noise; a process holding some rows of
    the batch gets exactly those rows of the views that one process would draw for the whole batch."""
    import torch
    from schashformer.engine import masked_views

    x = torch.from_numpy(np.random.default_rng(0).normal(size=(300, 40)).astype(np.float32)) + 5.0  # no zeros
    v1, v2 = masked_views(x, 300, None, 0.8, 0.0, torch.Generator().manual_seed(1))
    for v in (v1, v2):
        kept = v != 0
        assert torch.equal(v[kept], x[kept])  # no noise: an entry is the input or 0
        assert 0.77 < kept.float().mean().item() < 0.83
    assert not torch.equal(v1, v2)  # two masks
    n1, n2 = masked_views(x, 300, None, 0.8, 0.5, torch.Generator().manual_seed(1))
    assert 0.45 < (n1 - v1).std().item() < 0.55  # the same masks (same stream), plus noise of sd 0.5
    mine = np.array([3, 17, 250])
    p1, p2 = masked_views(x[mine], 300, mine, 0.8, 0.5, torch.Generator().manual_seed(1))  # (2, rows, genes)
    assert torch.equal(p1, n1[mine]) and torch.equal(p2, n2[mine])


def test_stage1_encodes_both_views_as_one_batch_row_by_row():
    """HashingLoss encodes the (2, rows, genes) views as one batch: each view's hidden layer equals that view
    encoded alone (dropout included, same random stream), so the batching is not a change of method."""
    import torch
    from schashformer.nn.lsh import LSHIndexer

    torch.manual_seed(0)
    indexer = LSHIndexer(50, n_hidden=32, n_latent=8, n_heads=2, n_bits=4).train()
    views = torch.randn(2, 30, 50)
    with torch.random.fork_rng():
        torch.manual_seed(5)
        apart = [indexer.encode(views[0]), indexer.encode(views[1])]
    with torch.random.fork_rng():
        torch.manual_seed(5)
        together = indexer.encode(views.reshape(60, 50))
    # equal up to float rounding (a matrix product's blocking may depend on its rows); another dropout mask would
    # move entries by O(1)
    assert torch.allclose(together[:30], apart[0], atol=1e-5) and torch.allclose(together[30:], apart[1], atol=1e-5)
    assert not torch.equal(apart[0], indexer.eval().encode(views[0]))  # dropout was on: the test can fail


def test_start_partition_chosen_by_silhouette_keeps_unequal_types():
    """k-means with K = 3 on one wide type and two small ones splits the wide type and merges the small
    ones; Leiden on the kNN graph keeps them, and the silhouette prefers that partition."""
    from schashformer import n_clusters

    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [14.0, 0.0], [16.5, 0.0]])
    sizes, spreads = [1500, 60, 60], [2.0, 0.3, 0.3]
    z = np.concatenate([rng.normal(c, s, size=(m, 2)) for c, m, s in zip(centres, sizes, spreads)]).astype(np.float32)
    types = np.repeat(np.arange(3), sizes)
    graph = n_clusters.knn_graph(z, 15)
    assert graph.shape == (len(z), len(z)) and (graph != graph.T).nnz == 0 and graph.diagonal().sum() == 0
    assert graph.getnnz(axis=1).min() >= 15
    km = KMeans(3, n_init=10, random_state=0).fit_predict(z)
    leiden = n_clusters.leiden_with_k(graph, 3, seed=0)
    assert adjusted_rand_score(types, km) < 0.7 < 0.95 < adjusted_rand_score(types, leiden)
    chosen, scores = n_clusters.best_by_silhouette(z, {"kmeans": km, "leiden": leiden}, seed=0)
    assert chosen == "leiden" and scores["leiden"] > scores["kmeans"]
    # one label: no silhouette, not a candidate
    assert n_clusters.best_by_silhouette(z, {"one": np.zeros(len(z), int), "kmeans": km}, seed=0)[0] == "kmeans"
    # a tie keeps the first-listed partition; a margin above the tolerance does not
    same = n_clusters.best_by_silhouette(z, {"kmeans": km, "leiden": km.copy()}, seed=0)
    assert same[0] == "kmeans" and same[1]["kmeans"] == same[1]["leiden"]
    margin = (scores["leiden"] - scores["kmeans"]) / abs(scores["kmeans"])
    assert n_clusters.best_by_silhouette(z, {"kmeans": km, "leiden": leiden}, seed=0, tie=2 * margin)[0] == "kmeans"


@pytest.mark.parametrize("init", ["auto", "kmeans"])
def test_init_auto_and_kmeans_fit(sim, init):
    model = SCHashFormer(3, seed=0, progress=False, init=init, **FAST).fit(sim)
    assert adjusted_rand_score(sim.obs["label"], model.labels_) > 0.8
    assert model.kmeans_labels_.shape == (sim.n_obs,) and set(np.unique(model.kmeans_labels_)) == {0, 1, 2}


@pytest.mark.parametrize("init, target_balance, expected", [("kmeans", None, 1.0), ("leiden", None, 0.0),
                                                             ("leiden", 0.5, 0.5)])
def test_dec_target_follows_the_start_unless_given(sim, monkeypatch, init, target_balance, expected):
    """target_balance=None: DEC's size correction after a k-means start, none after a graph start."""
    from schashformer import engine

    used = []
    original = engine.target_distribution
    monkeypatch.setattr(engine, "target_distribution", lambda q, f, balance: used.append(balance) or original(q, f, balance))
    SCHashFormer(3, seed=0, progress=False, init=init, target_balance=target_balance, **FAST).fit(sim)
    assert used and set(used) == {expected}
